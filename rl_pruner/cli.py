"""The ``rl-pruner`` command line.

Every subcommand prints a human-readable report, or one JSON object with ``--json``.
Bad input ends with one line on stderr naming the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rl_pruner import __version__
from rl_pruner.errors import InputError, RLPrunerError
from rl_pruner.outputs import check_distinct_files, check_output_path, input_files
from rl_pruner.training.cli import add_training_commands, run_training_command

logger = logging.getLogger("rl_pruner")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"rl-pruner: error: {message} (see '{self.prog} --help')\n")


def _add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    parser.add_argument("--model", required=True,
                        help="model name (resnet50, cifar_resnet56, package.module:factory), yolov7:MODEL.yaml "
                             "or pruned:PATH")
    parser.add_argument("--checkpoint", required=checkpoint_required, default=None,
                        help="dense checkpoint (a state_dict, or a dict holding one)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a checkpoint that is a pickled model; this runs code stored in the file")
    parser.add_argument("--input-size", type=int, default=None,
                        help="input height and width in pixels (default: the model's own, 32 for CIFAR, 224 otherwise)")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image subsets (default 0)")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a report")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="rl-pruner",
        description="Search per-layer pruning policies for CNNs with reinforcement learning, then apply them.",
    )
    parser.add_argument("--version", action="version", version=f"rl-pruner {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-v) or debug detail (-vv)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    inspect = commands.add_parser("inspect", help="list prunable layers, dependency groups and removable blocks")
    _add_model_arguments(inspect)
    _add_output_arguments(inspect)

    evaluate = commands.add_parser("evaluate", help="top-1, MACs, parameters and latency of a model")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True,
                          help="test images: ImageFolder directory or .tar/.tar.gz of one; for a detector, the data "
                               "YAML of a YOLO-format set (its val split)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N images (default: all)")
    evaluate.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement (default 1)")
    _add_data_arguments(evaluate)
    _add_output_arguments(evaluate)

    policy = commands.add_parser("policy", help="make a policy without searching")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, parser_class=_ArgumentParser)
    uniform = policy_commands.add_parser("uniform", help="one pruning ratio for every layer")
    _add_model_arguments(uniform)
    target = uniform.add_mutually_exclusive_group(required=True)
    target.add_argument("--macs-target", type=float, help="fraction of the dense MACs to keep, in (0, 1]")
    target.add_argument("--ratio", type=float, help="fraction of channels removed in every layer, in [0, 1)")
    uniform.add_argument("--criterion", default="l1", help="channel importance: l1, l2, lamp, fpgm, bn_scale, apoz, taylor")
    uniform.add_argument("--round-to", type=int, default=8, help="keep a multiple of this many channels (default 8)")
    uniform.add_argument("--drop-blocks", default="", help="comma-separated removable blocks to drop")
    uniform.add_argument("--out", required=True, help="policy JSON file to write")
    uniform.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_output_arguments(uniform)

    apply = commands.add_parser("apply", help="prune a checkpoint with a policy and save the smaller model")
    _add_model_arguments(apply)
    apply.add_argument("--random-init", action="store_true",
                       help="prune the model as built, without --checkpoint (an untrained model, for trials)")
    apply.add_argument("--policy", required=True, help="policy JSON file, or runs:/<run_id>/<path> in MLflow")
    apply.add_argument("--out", required=True, help="pruned model file to write (load it as --model pruned:PATH)")
    apply.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    apply.add_argument("--data", default=None,
                       help="training images for batch-norm re-estimation and the apoz/taylor criteria")
    apply.add_argument("--bn-images", type=int, default=2000,
                       help="training images used to re-estimate batch-norm statistics (default 2000; 0 skips)")
    apply.add_argument("--calibration-images", type=int, default=512,
                       help="training images for the apoz and taylor criteria (default 512)")
    apply.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ policies")
    _add_data_arguments(apply)
    _add_output_arguments(apply)

    export = commands.add_parser(
        "export-yaml", help="write a pruned YOLOv7 as a model YAML with explicit widths plus its state_dict"
    )
    export.add_argument("--model", required=True, metavar="pruned:PATH", help="a pruned YOLOv7 written by apply")
    export.add_argument("--out", required=True, metavar="DIR",
                        help="folder for model.yaml and weights.pt (load them with --model yolov7:DIR/model.yaml "
                             "--checkpoint DIR/weights.pt)")
    export.add_argument("--force", action="store_true", help="overwrite model.yaml and weights.pt in --out")
    _add_output_arguments(export)

    search = commands.add_parser("search", help="learn a pruning policy with PPO, tracked in MLflow")
    search.add_argument("config", help="search configuration YAML (see experiments/)")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key, e.g. --set episodes=50 --set ppo.learning_rate=1e-3")
    search.add_argument("--resume", default=None, metavar="RUN_ID",
                        help="continue a stopped search in the same MLflow run")
    _add_distributed_arguments(search)
    _add_output_arguments(search)

    sweep = commands.add_parser(
        "sweep", help="run many searches (targets x seeds x PPO values from the sweep section) with Ray Tune"
    )
    sweep.add_argument("config", help="search configuration YAML with a sweep section (see experiments/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a configuration key, e.g. --set sweep.seeds=[0,1]")
    sweep.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="local (default: a cluster on this machine, on 127.0.0.1), auto, HOST:PORT or "
                            "ray://HOST:PORT")
    _add_output_arguments(sweep)

    demo = commands.add_parser(
        "demo", help="train a small CNN on scikit-learn's digits, search a policy for it, and apply it"
    )
    demo.add_argument("--workdir", default="rl-pruner-demo",
                      help="folder for the checkpoint, the MLflow store and the pruned model (default rl-pruner-demo)")
    demo.add_argument("--episodes", type=int, default=None, help="search episodes (default 40)")
    _add_output_arguments(demo)

    add_training_commands(commands)
    return parser


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="Ray workers that run episodes (default from the configuration: 0, in this process)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="local (default: a cluster on this machine, on 127.0.0.1), auto, HOST:PORT or "
                             "ray://HOST:PORT")


def _distributed_overrides(args: argparse.Namespace) -> None:
    """Turn --workers and --ray-address into configuration overrides, validated with the rest."""
    if getattr(args, "workers", None) is not None:
        args.overrides.append(f"distributed.workers={args.workers}")
    if args.ray_address is not None:
        args.overrides.append(f"distributed.ray_address={json.dumps(args.ray_address)}")


def _check_search_endpoints(args: argparse.Namespace) -> None:
    """Read the configuration and probe its servers before the commands' slow imports."""
    from rl_pruner.config import load_config
    from rl_pruner.preflight import check_endpoints

    args.search_config = load_config(args.config, args.overrides)
    uses_ray = args.command == "sweep" or args.search_config.distributed.workers > 0
    if args.ray_address is not None and not uses_ray:
        raise InputError(
            f"--ray-address {args.ray_address} has no effect: distributed.workers is 0, so episodes run in this "
            "process; add --workers N to run them on the cluster"
        )
    check_endpoints(args.search_config, uses_ray=uses_ray)


def _emit(args: argparse.Namespace, result: dict[str, Any], report: Callable[[dict[str, Any]], str]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(report(result))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if hasattr(args, "training_handler"):
        return run_training_command(args)
    try:
        # Checked before importing the commands, which load torch and take seconds.
        if args.command in ("policy", "apply"):
            # An --out that is an input is rejected even with --force, so that check comes first.
            check_distinct_files({**input_files(args), "--out": Path(args.out)})
            check_output_path(args.out, args.force)
        if args.command == "export-yaml":
            for name in ("model.yaml", "weights.pt"):
                check_output_path(str(Path(args.out) / name), args.force, flag=f"--out {args.out}: file")
        if args.command in ("search", "sweep"):
            _distributed_overrides(args)
            _check_search_endpoints(args)
        from rl_pruner import commands

        handlers: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
            "inspect": commands.run_inspect,
            "evaluate": commands.run_evaluate,
            "policy": commands.run_policy,
            "apply": commands.run_apply,
            "export-yaml": commands.run_export_yaml,
            "search": commands.run_search,
            "sweep": commands.run_sweep,
            "demo": commands.run_demo,
        }
        result = handlers[args.command](args)
    except RLPrunerError as err:
        sys.stderr.write(f"rl-pruner: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("rl-pruner: interrupted\n")
        return 130
    _emit(args, result, getattr(commands, f"report_{args.command.replace('-', '_')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
