"""Implementations of the CLI subcommands; :mod:`rl_pruner.cli` parses their arguments."""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_pruner.data import load_batches, open_dataset, subset_indices
from rl_pruner.engine.macs import count_macs, count_params
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import pruned_model_record, save_pruned_model
from rl_pruner.errors import InputError
from rl_pruner.evaluation import check_num_classes, evaluate_top1, measure_latency
from rl_pruner.models.registry import PRUNED_PREFIX, LoadedModel, is_detector, load_model
from rl_pruner.policy import Policy

logger = logging.getLogger(__name__)


def _load(args: argparse.Namespace) -> LoadedModel:
    _check_positive(args.input_size, "--input-size", unit="pixels")
    return load_model(
        args.model, args.checkpoint, trust_pickle=args.trust_pickle, input_size=args.input_size
    )


def _check_positive(value: int | None, flag: str, allow_zero: bool = False, unit: str = "images") -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{flag} is {value}; it must be a positive number of {unit}")


def _training_batches(loaded: LoadedModel, data: str, n_images: int, seed: int, batch_size: int) -> list:
    if is_detector(loaded.architecture):
        return _detector_image_batches(loaded, data, n_images, seed, batch_size)
    dataset = open_dataset(data, image_size=loaded.image_size, normalization=loaded.normalization)
    check_num_classes(loaded.num_classes, dataset.classes, data)
    indices = subset_indices(len(dataset), n_images, seed)
    return load_batches(dataset, indices, batch_size)


def _is_data_yaml(data: str) -> bool:
    return Path(data).suffix.lower() in (".yaml", ".yml")


def _detector_image_batches(loaded: LoadedModel, data: str, n_images: int, seed: int, batch_size: int) -> list:
    """(images, placeholder labels) batches for a detector, from a data YAML's train split or an image folder."""
    from rl_pruner.detection.data import load_detection_batches, load_image_batches

    size = loaded.input_shape[-1]
    if _is_data_yaml(data):
        images = [batch for batch, _ in load_detection_batches(data, "train", size, batch_size, n_images, seed)]
    else:
        images = load_image_batches(data, size, batch_size, n_images, seed)
    return [(batch, torch.zeros(len(batch), dtype=torch.long)) for batch in images]


def _stage_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of all convolutions under each top-level module."""
    channels: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            channels[name.split(".")[0]] += module.out_channels
    return dict(channels)


def _human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f}"


# inspect

def run_inspect(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load(args)
    if loaded.pruned is not None:
        return {
            "model": args.model, "architecture": loaded.architecture, "pruned": True,
            "input_shape": list(loaded.input_shape),
            "macs": count_macs(loaded.model, loaded.input_shape), "params": count_params(loaded.model),
            "dropped_blocks": loaded.pruned["dropped_blocks"],
            "channels_per_stage": _stage_channels(loaded.model),
        }
    structure = Pruner(loaded).structure
    return {
        "model": args.model,
        "architecture": loaded.architecture,
        "pruned": False,
        "input_shape": list(loaded.input_shape),
        "fingerprint": structure.fingerprint,
        "macs": structure.dense_macs,
        "params": structure.dense_params,
        "layers": [
            {
                "index": layer.index, "name": layer.name, "kind": layer.kind, "channels": layer.channels,
                "in_channels": layer.in_channels, "kernel_size": layer.kernel_size, "stride": layer.stride,
                "macs": layer.macs, "params": layer.params, "block": layer.block,
                "group": sorted({m.module_name for m in layer.members}),
            }
            for layer in structure.layers
        ],
        "removable_blocks": [
            {"name": b.name, "first_layer": b.first_layer, "macs": b.macs, "params": b.params}
            for b in structure.blocks
        ],
        "classifier": structure.output_module,
        "output_modules": list(structure.output_modules),
    }


def report_inspect(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['architecture']}), input {result['input_shape']}",
             f"MACs {_human(result['macs'])} ({result['macs']:,}), params {_human(result['params'])} ({result['params']:,})"]
    if result["pruned"]:
        lines.append(f"pruned model; dropped blocks: {', '.join(result['dropped_blocks']) or 'none'}")
        return "\n".join(lines) + "\n"
    outputs = result.get("output_modules") or [result["classifier"]]
    kind = "classifier" if len(outputs) == 1 else "output modules"
    lines.append(f"structure {result['fingerprint']}; {kind} {', '.join(outputs)} never lose output channels")
    lines.append("")
    lines.append(f"{'#':>3} {'layer':<28} {'kind':<6} {'ch':>5} {'k':>2} {'s':>2} {'MACs':>10} {'group':>6}  block")
    for layer in result["layers"]:
        lines.append(
            f"{layer['index']:>3} {layer['name']:<28} {layer['kind']:<6} {layer['channels']:>5} "
            f"{layer['kernel_size']:>2} {layer['stride']:>2} {_human(layer['macs']):>10} "
            f"{len(layer['group']):>6}  {layer['block'] or '-'}"
        )
    lines.append("")
    lines.append(f"{len(result['removable_blocks'])} removable blocks:")
    for block in result["removable_blocks"]:
        lines.append(f"  {block['name']:<20} MACs {_human(block['macs']):>10}  params {_human(block['params']):>9}")
    return "\n".join(lines) + "\n"


# evaluate

def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    _check_positive(args.limit, "--limit")
    _check_positive(args.batch_size, "--batch-size")
    _check_positive(args.latency_batch, "--latency-batch")
    loaded = _load(args)
    if is_detector(loaded.architecture):
        return _evaluate_detector(args, loaded)
    dataset = open_dataset(args.data, image_size=loaded.image_size, normalization=loaded.normalization,
                           split="test", seed=args.seed)
    check_num_classes(loaded.num_classes, dataset.classes, args.data)
    indices = subset_indices(len(dataset), args.limit, args.seed)
    from rl_pruner.data import make_loader

    loader = make_loader(dataset, indices, batch_size=args.batch_size)
    top1 = evaluate_top1(loaded.model, loader)
    latency = measure_latency(
        loaded.model, loaded.input_shape, batch_size=args.latency_batch, warmup=3, repeats=10
    )
    return {
        "model": args.model,
        "data": str(args.data),
        "images": len(indices),
        "top1": top1,
        "macs": count_macs(loaded.model, loaded.input_shape),
        "params": count_params(loaded.model),
        "latency": dict(latency),
        "latency_batch": args.latency_batch,
    }


def _evaluate_detector(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    """mAP of a detector on the ``val`` split of a YOLO-format data YAML, with MACs, params and latency."""
    from rl_pruner.detection.data import load_detection_batches
    from rl_pruner.detection.reward import DetectionMAPReward

    if not _is_data_yaml(args.data):
        raise InputError(
            f"--data {args.data}: a detector is evaluated on labelled images; pass the data YAML of a "
            "YOLO-format set (its 'val' split is read)"
        )
    from rl_pruner.search import check_detector_classes

    check_detector_classes(loaded, args.data, "--data")
    if args.checkpoint is None and loaded.pruned is None:
        logger.warning("no --checkpoint: evaluating the untrained %s as built", args.model)
    batches = load_detection_batches(args.data, "val", loaded.input_shape[-1], args.batch_size, args.limit, args.seed)
    scores = DetectionMAPReward(batches).evaluate(loaded.model)
    latency = measure_latency(
        loaded.model, loaded.input_shape, batch_size=args.latency_batch, warmup=3, repeats=10
    )
    return {
        "model": args.model,
        "data": str(args.data),
        "images": sum(len(images) for images, _ in batches),
        "map50": scores["map50"],
        "map50_95": scores["map50_95"],
        "macs": count_macs(loaded.model, loaded.input_shape),
        "params": count_params(loaded.model),
        "latency": dict(latency),
        "latency_batch": args.latency_batch,
    }


def report_evaluate(result: dict[str, Any]) -> str:
    latency = result["latency"]
    if "top1" in result:
        accuracy = f"top-1   {result['top1']:.2f} %\n"
    else:
        accuracy = f"mAP@0.5 {result['map50']:.4f}\nmAP@0.5:0.95 {result['map50_95']:.4f}\n"
    return (
        f"model   {result['model']}\n"
        f"data    {result['data']} ({result['images']:,} images)\n"
        f"{accuracy}"
        f"MACs    {_human(result['macs'])} ({result['macs']:,})\n"
        f"params  {_human(result['params'])} ({result['params']:,})\n"
        f"latency {latency['median_ms']:.2f} ms median at batch {result['latency_batch']} "
        f"on {latency['num_threads']} CPU threads\n"
    )


# policy

def run_policy(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load(args)
    pruner = Pruner(loaded)
    dropped = [name for name in args.drop_blocks.split(",") if name]
    policy = pruner.uniform_policy(
        macs_target=args.macs_target, ratio=args.ratio, dropped_blocks=dropped,
        criterion=args.criterion, round_to=args.round_to,
    )
    policy.save(args.out)
    return {
        "policy": str(args.out),
        "model": args.model,
        "uniform_ratio": policy.metadata["uniform_ratio"],
        "macs_target": args.macs_target,
        "estimated_macs": policy.metadata["estimated_macs"],
        "estimated_params": policy.metadata["estimated_params"],
        "macs_ratio": policy.metadata["macs_ratio"],
        "dropped_blocks": policy.dropped_blocks,
    }


def report_policy(result: dict[str, Any]) -> str:
    return (
        f"wrote {result['policy']}: ratio {result['uniform_ratio']:.4f} in every layer, "
        f"estimated MACs {_human(result['estimated_macs'])} ({result['macs_ratio']:.3f} of dense), "
        f"params {_human(result['estimated_params'])}\n"
    )


# apply

def read_policy(location: str, tracking_uri: str | None) -> Policy:
    """Read a policy from a JSON file, or from an MLflow artifact given as runs:/<run_id>/<path>."""
    if location.startswith("runs:/"):
        from rl_pruner.tracking import download_policy

        return download_policy(location, tracking_uri)
    return Policy.load(location)


def run_apply(args: argparse.Namespace) -> dict[str, Any]:
    _check_positive(args.bn_images, "--bn-images", allow_zero=True)
    _check_positive(args.calibration_images, "--calibration-images")
    if args.checkpoint is not None and args.random_init:
        raise InputError("--random-init prunes the model as built, so it cannot be combined with --checkpoint; drop one")
    if args.checkpoint is None and not args.random_init and not args.model.startswith(PRUNED_PREFIX):
        raise InputError(
            f"apply needs the dense weights of {args.model}: pass --checkpoint PATH "
            "(or --random-init to prune the untrained model as built)"
        )
    policy = read_policy(args.policy, args.tracking_uri)
    if args.input_size is None and len(policy.input_shape) == 3 and not args.model.startswith(PRUNED_PREFIX):
        # A policy is made for one input size (it is part of the structure fingerprint).
        args.input_size = policy.input_shape[-1]
    loaded = _load(args)
    calibration = None
    if args.data is not None and policy.criterion in ("apoz", "taylor"):
        calibration = _training_batches(loaded, args.data, args.calibration_images, args.seed, args.batch_size)
    pruner = Pruner(loaded, calibration)
    from rl_pruner.engine.apply import validate_policy

    validate_policy(policy, pruner.structure, source=f"policy {args.policy}")
    bn_batches = None
    if args.data is not None and args.bn_images > 0:
        bn_batches = _training_batches(loaded, args.data, args.bn_images, args.seed + 1, args.batch_size)
    pruned = pruner.apply(policy, bn_batches)

    record = pruned_model_record(
        pruned,
        architecture=loaded.architecture,
        input_shape=loaded.input_shape,
        num_classes=loaded.num_classes,
        normalization=loaded.normalization,
        dropped_blocks=policy.dropped_blocks,
        policy=policy.to_dict(),
    )
    save_pruned_model(args.out, record)
    before = {"macs": pruner.structure.dense_macs, "params": pruner.structure.dense_params,
              "channels": _stage_channels(loaded.model)}
    after = {"macs": count_macs(pruned, loaded.input_shape), "params": count_params(pruned),
             "channels": _stage_channels(pruned)}
    return {
        "out": str(Path(args.out)),
        "model": args.model,
        "policy": args.policy,
        "criterion": policy.criterion,
        "dropped_blocks": policy.dropped_blocks,
        "bn_reestimated_on": sum(len(labels) for _, labels in bn_batches) if bn_batches else 0,
        "random_init": bool(args.random_init),
        "before": before,
        "after": after,
        "macs_ratio": after["macs"] / before["macs"],
        "params_ratio": after["params"] / before["params"],
    }


def report_apply(result: dict[str, Any]) -> str:
    before, after = result["before"], result["after"]
    lines = [
        f"pruned {result['model']} with {result['policy']} (criterion {result['criterion']}) -> {result['out']}",
        f"load it with --model pruned:{result['out']}",
        "",
        f"{'':<16} {'before':>14} {'after':>14} {'ratio':>7}",
        f"{'MACs':<16} {_human(before['macs']):>14} {_human(after['macs']):>14} {result['macs_ratio']:>7.3f}",
        f"{'params':<16} {_human(before['params']):>14} {_human(after['params']):>14} {result['params_ratio']:>7.3f}",
    ]
    for stage, channels in before["channels"].items():
        kept = after["channels"].get(stage, 0)
        lines.append(f"{'channels ' + stage:<16} {channels:>14} {kept:>14} {kept / channels:>7.3f}")
    if result["dropped_blocks"]:
        lines.append(f"dropped blocks: {', '.join(result['dropped_blocks'])}")
    if result["bn_reestimated_on"]:
        lines.append(f"batch norm re-estimated on {result['bn_reestimated_on']} training images")
    elif not result.get("random_init"):
        lines.append("batch norm NOT re-estimated: accuracy is far below what it can be; "
                     "pass --data with training images")
    return "\n".join(lines) + "\n"


# search

# export-yaml

def run_export_yaml(args: argparse.Namespace) -> dict[str, Any]:
    """Write a pruned YOLOv7 as ``model.yaml`` plus ``weights.pt`` (a plain state_dict) in ``--out``."""
    import yaml

    from rl_pruner.models.yolov7 import YOLOv7, export_yolov7
    from rl_pruner.outputs import atomic_write

    if not args.model.startswith(PRUNED_PREFIX):
        raise InputError(f"--model {args.model}: export-yaml reads a pruned model; pass pruned:PATH from 'rl-pruner apply'")
    loaded = load_model(args.model)
    config_text = loaded.pruned.get("model_config") if loaded.pruned else None
    if not isinstance(loaded.model, YOLOv7) or not config_text:
        raise InputError(f"--model {args.model} is not a pruned YOLOv7 (architecture {loaded.architecture}); "
                         "only YOLOv7 models have a model YAML to write")
    yaml_text, state_dict = export_yolov7(loaded.model, config_text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "weights.pt", lambda path: torch.save(state_dict, path))
    atomic_write(out / "model.yaml", lambda path: Path(path).write_text(yaml_text, encoding="utf-8"))
    return {
        "model": args.model,
        "yaml": str(out / "model.yaml"),
        "weights": str(out / "weights.pt"),
        "input_size": loaded.input_shape[-1],
        "layers": sum(len(yaml.safe_load(yaml_text)[part]) for part in ("backbone", "head")),
    }


def report_export_yaml(result: dict[str, Any]) -> str:
    return (
        f"wrote {result['yaml']} ({result['layers']} layers) and {result['weights']}\n"
        f"load them with --model yolov7:{result['yaml']} --checkpoint {result['weights']} "
        f"--input-size {result['input_size']}\n"
    )


def _mlflow_command() -> str:
    """Return the mlflow executable beside this Python, so a printed command works without an activated venv."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file() and shutil.which("mlflow") != str(beside):
        return str(beside)
    return "mlflow"


def _interrupted_hint(config_path: str, run_id: str | None) -> None:
    import sys

    if run_id is not None:
        sys.stderr.write(
            f"rl-pruner: search stopped; what it found is logged in run {run_id}. "
            f"Continue it with: rl-pruner search {config_path} --resume {run_id}\n"
        )


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from rl_pruner.config import load_config
    from rl_pruner.search import run_search as search

    config = getattr(args, "search_config", None) or load_config(args.config, args.overrides)
    started: list[str] = []
    try:
        summary = search(config, resume_run_id=args.resume, on_start=started.append)
    except KeyboardInterrupt:
        _interrupted_hint(args.config, started[0] if started else None)
        raise
    summary["tracking_uri"] = config.tracking.uri
    summary["data"] = config.data
    summary["model"] = config.model
    summary["checkpoint"] = config.checkpoint
    return summary


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from rl_pruner.config import load_config
    from rl_pruner.distributed.sweep import run_sweep as sweep

    config = getattr(args, "search_config", None) or load_config(args.config, args.overrides)
    summary = sweep(config)
    summary["tracking_uri"] = config.tracking.uri
    return summary


def report_sweep(result: dict[str, Any]) -> str:
    lines = [f"sweep run {result['run_id']}: {len(result['trials'])} trials, each a child run"]
    for target, row in result["best_per_target"].items():
        lines.append(f"target {target}: best accuracy {row['accuracy']:.2f} at {row['macs_ratio']:.3f} of dense MACs "
                     f"(run {row['run_id']}, policy {row['policy']})")
    lines.append(f"Pareto front: runs:/{result['run_id']}/plots/pareto.png at {result['tracking_uri']}")
    return "\n".join(lines) + "\n"


def report_search(result: dict[str, Any]) -> str:
    lines = [f"search run {result['run_id']}: {result['episodes']} episodes at a MACs target of "
             f"{result['macs_target']}"]
    if "best_reward" in result:
        lines.append(f"best reward {result['best_reward']:.4f} at {result['best_macs_ratio']:.3f} of dense MACs; "
                     f"policy saved to {result['best_policy']}")
    for name, record in result["baselines"].items():
        lines.append(f"baseline {name:<12} reward {record['reward']:.4f} at {record['macs_ratio']:.3f} of dense MACs")
    for name, top1 in result.get("test_top1", {}).items():
        lines.append(f"test top-1 {name:<12} {top1:.2f} %")
    for metric in ("map50", "map50_95"):
        for name, value in result.get(f"test_{metric}", {}).items():
            lines.append(f"test {metric} {name:<12} {value:.4f}")
    if "best_policy_artifact" in result:
        checkpoint = f" --checkpoint {result['checkpoint']}" if result.get("checkpoint") else " --random-init"
        lines.append("")
        lines.append(f"apply it: rl-pruner apply --model {result['model']}{checkpoint} "
                     f"--policy {result['best_policy_artifact']} --tracking-uri {result['tracking_uri']} "
                     f"--data {result['data']} --out pruned.pt")
    lines.append(f"browse it: {_mlflow_command()} ui --backend-store-uri {result['tracking_uri']}")
    return "\n".join(lines) + "\n"


# demo

def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Train the digits CNN, search a policy at half its MACs, apply the best one, evaluate both."""
    from rl_pruner.config import config_from_dict
    from rl_pruner.demo import demo_config, train_digits_model
    from rl_pruner.search import prepare_data
    from rl_pruner.search import run_search as search
    from rl_pruner.tracking import download_policy

    _check_positive(args.episodes, "--episodes", unit="episodes")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "digits_cnn.pt"
    if not checkpoint.is_file():
        logger.info("training the demo CNN on scikit-learn's digits")
        model, _ = train_digits_model()
        torch.save(model.state_dict(), checkpoint)

    record = demo_config(workdir, checkpoint)
    if args.episodes is not None:
        record["episodes"] = args.episodes
    config = config_from_dict(record, source="the built-in demo configuration")
    summary = search(config)
    run_id = summary["run_id"]

    policy = download_policy(summary["best_policy_artifact"], config.tracking.uri)
    # The search's own batch-norm split, so the pruned model matches the search's test score.
    data = prepare_data(config)
    loaded = data.loaded
    pruned = Pruner(loaded).apply(policy, data.bn_batches)
    out = workdir / run_id / "digits_cnn-pruned.pt"
    save_pruned_model(out, pruned_model_record(
        pruned, architecture=loaded.architecture, input_shape=loaded.input_shape,
        num_classes=loaded.num_classes, normalization=loaded.normalization,
        dropped_blocks=policy.dropped_blocks, policy=policy.to_dict(),
    ))

    reloaded = load_model(f"pruned:{out}")
    test = open_dataset(config.test_data or config.data, image_size=None, split="test", seed=config.seed)
    test_batches = load_batches(test, None, config.batch_size, disable_progress=True)
    return {
        **summary,
        "tracking_uri": config.tracking.uri,
        "checkpoint": str(checkpoint),
        "pruned_model": str(out),
        "dense_test_top1": evaluate_top1(loaded.model, test_batches, disable_progress=True),
        "pruned_test_top1": evaluate_top1(reloaded.model, test_batches, disable_progress=True),
        "dense_macs": count_macs(loaded.model, loaded.input_shape),
        "pruned_macs": count_macs(reloaded.model, loaded.input_shape),
    }


def report_demo(result: dict[str, Any]) -> str:
    return (
        f"dense digits CNN:  top-1 {result['dense_test_top1']:.2f} % at {_human(result['dense_macs'])} MACs\n"
        f"pruned (no fine-tuning): top-1 {result['pruned_test_top1']:.2f} % at {_human(result['pruned_macs'])} MACs"
        f" ({result['pruned_macs'] / result['dense_macs']:.3f} of dense)\n"
        f"pruned model: {result['pruned_model']} (load it with --model pruned:{result['pruned_model']})\n"
        f"MLflow run {result['run_id']} finished: {result['episodes']} episodes, best reward {result['best_reward']:.4f}\n"
        f"open the MLflow UI: {_mlflow_command()} ui --backend-store-uri {result['tracking_uri']}"
        "  (it starts in about 20 s; then open http://127.0.0.1:5000)\n"
    )
