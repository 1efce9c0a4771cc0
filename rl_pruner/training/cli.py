"""The ``finetune``, ``sparsify`` and ``pipeline`` subcommands of ``rl-pruner``.

``rl_pruner.cli`` registers them with :func:`add_training_commands` and hands a parsed
command to :func:`run_training_command`. That function reports like the other
subcommands: bad input ends with one line on stderr and exit code 2, and success
prints a human-readable report, or one JSON object with ``--json``. This module
imports torch only inside the handlers, so building the parser stays fast.

``rl-pruner finetune --model pruned:PATH --teacher CHECKPOINT --data D --epochs E --out PATH``
distills a pruned model from the dense checkpoint it was pruned from and writes the
weights of the best epoch (by test top-1 with ``--test-data``, else the last) as a pruned
model. ``rl-pruner sparsify --model NAME --checkpoint CHECKPOINT --data D --epochs E --out PATH``
trains a dense model with the batch-norm L1 penalty and, with ``--target-sparsity``,
gradual magnitude masks, and writes its state dict for pruning with ``--checkpoint``.
Both save a resume state beside ``--out`` (``--state``) and continue it with ``--resume``.
``rl-pruner pipeline CONFIG`` runs the stages of a search configuration's ``pipeline:``
section, such as sparsify, search, apply and finetune (see :mod:`rl_pruner.pipeline`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_pruner.errors import InputError, RLPrunerError
from rl_pruner.outputs import check_distinct_files, check_output_path, input_files

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from rl_pruner.models.registry import LoadedModel
    from rl_pruner.tracking import SearchTracker
    from rl_pruner.training.loop import TrainingConfig, TrainingResult

logger = logging.getLogger(__name__)

TRAINING_COMMANDS = ("finetune", "sparsify", "pipeline")
DEFAULT_EXPERIMENT = "rl-pruner-training"
STATE_SUFFIX = ".state"
TRACKING_RUN_KEY = "tracking.run_id"


def add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``finetune``, ``sparsify`` and ``pipeline`` on the ``rl-pruner`` subcommand parsers.

    Each parser stores its handler as ``args.training_handler`` and its report as
    ``args.training_report``, for :func:`run_training_command`.
    """
    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a pruned model by distillation from its dense teacher"
    )
    finetune.add_argument("--model", required=True,
                          help="pruned model to fine-tune, as pruned:PATH (a file written by 'rl-pruner apply')")
    finetune.add_argument("--teacher", required=True,
                          help="dense checkpoint of the architecture the model was pruned from")
    finetune.add_argument("--temperature", type=float, default=4.0,
                          help="softmax temperature of the distillation term, > 0 (default 4)")
    finetune.add_argument("--alpha", type=float, default=0.9,
                          help="weight of the distillation term in [0, 1]; 1 - alpha weighs the cross-entropy (default 0.9)")
    _add_common_arguments(finetune, out_help="pruned model file to write (load it as --model pruned:PATH)")
    finetune.set_defaults(training_handler=run_finetune, training_report=report_finetune)

    sparsify = subparsers.add_parser(
        "sparsify", help="train a dense model with a batch-norm L1 penalty (and magnitude masks) before pruning"
    )
    sparsify.add_argument("--model", required=True, help="model name, e.g. cifar_resnet20 or resnet50")
    sparsify.add_argument("--checkpoint", required=True, help="dense checkpoint to start from")
    sparsify.add_argument("--input-size", type=int, default=None,
                          help="input height and width in pixels (default: the model's own)")
    sparsify.add_argument("--bn-l1", type=float, default=1e-4,
                          help="strength of the L1 penalty on batch-norm scales, >= 0 (default 1e-4)")
    sparsify.add_argument("--bn-l1-warmup", type=int, default=0,
                          help="optimizer steps of a linear warm-up of --bn-l1 from 0 (default 0: constant)")
    sparsify.add_argument("--target-sparsity", type=float, default=0.0,
                          help="share of zero weights per masked layer at the end of the cubic schedule, in [0, 1) "
                               "(default 0: no magnitude masks)")
    sparsify.add_argument("--sparsity-end", type=float, default=0.75,
                          help="fraction of the run after which the target sparsity is reached, in (0, 1] (default 0.75)")
    sparsify.add_argument("--mask-update-every", type=int, default=100,
                          help="optimizer steps between two updates of the magnitude masks (default 100)")
    _add_common_arguments(sparsify, out_help="state dict file to write (load it with --checkpoint)")
    sparsify.set_defaults(training_handler=run_sparsify, training_report=report_sparsify)

    pipeline = subparsers.add_parser(
        "pipeline", help="run the stages of a search configuration's pipeline section, e.g. sparsify, search, "
                         "apply and finetune, as child runs of one MLflow run"
    )
    pipeline.add_argument("config", help="search configuration YAML with a pipeline section (see experiments/)")
    pipeline.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a configuration key, e.g. --set pipeline.finetune.epochs=5")
    pipeline.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a report")
    pipeline.set_defaults(
        training_handler=run_pipeline_command, training_report=report_pipeline,
        interrupt_message="rl-pruner: interrupted; the pipeline's open MLflow runs are marked KILLED, and the "
                          "stages that finished keep their outputs under output_dir/<pipeline run id>\n",
    )


def _add_common_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow checkpoints that are pickled models; this runs code stored in the file")

    parser.add_argument("--data", required=True,
                        help="training images: ImageFolder directory, .tar/.tar.gz of one, or builtin:digits")
    parser.add_argument("--test-data", default=None,
                        help="test images, measured after every epoch to keep the best epoch (default: none)")
    parser.add_argument("--limit", type=int, default=None,
                        help="train on a seeded subset of N training images (default: all)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train without random crops and horizontal flips")

    parser.add_argument("--epochs", type=int, required=True, help="passes over the training images, at least 1")
    parser.add_argument("--batch-size", type=int, default=128, help="images per optimizer step (default 128)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="initial SGD learning rate; a cosine schedule lowers it to 0 (default 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum in [0, 1) (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order and of the subset (default 0)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 autocast on CUDA GPUs that support it, else float32 (default auto)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")
    parser.add_argument("--data-workers", type=int, default=0,
                        help="data-loader worker processes; a bit-identical resume needs 0 (default 0)")
    parser.add_argument("--channels-last", action="store_true",
                        help="keep weights and images in channels-last memory format, often faster on CPUs")

    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="optimizer steps between two saves of the resume state (default 100)")
    parser.add_argument("--state", default=None,
                        help=f"resume state file (default: --out with '{STATE_SUFFIX}' appended)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --state")

    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI to log settings, metrics and models to (default: no tracking)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT})")

    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--force", action="store_true",
                        help="overwrite --out if it exists and, without --resume, start over from a new --state")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a report")


def run_training_command(args: argparse.Namespace) -> int:
    """Run a parsed ``finetune``, ``sparsify`` or ``pipeline`` command, print its result and return the exit code."""
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.training_handler
    report: Callable[[dict[str, Any]], str] = args.training_report
    try:
        result = handler(args)
    except RLPrunerError as err:
        sys.stderr.write(f"rl-pruner: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        if getattr(args, "interrupt_message", None) is not None:
            sys.stderr.write(args.interrupt_message)
            return 130
        state = _state_path(args)
        if state.is_file():
            sys.stderr.write(f"rl-pruner: interrupted; the training state is saved in {state}. "
                             "Continue it by running the same command with --resume\n")
        else:
            sys.stderr.write("rl-pruner: interrupted before training started; nothing was saved\n")
        return 130
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(report(result))
    return 0


# pipeline

def run_pipeline_command(args: argparse.Namespace) -> dict[str, Any]:
    """Load ``args.config`` with its ``--set`` overrides and run its pipeline; return the pipeline summary."""
    from rl_pruner.pipeline import load_pipeline_config, run_pipeline
    from rl_pruner.preflight import check_endpoints

    config = load_pipeline_config(args.config, args.overrides)
    check_endpoints(config, uses_ray=config.distributed.workers > 0)
    return run_pipeline(config)


def report_pipeline(result: dict[str, Any]) -> str:
    from rl_pruner.pipeline import format_pipeline_report

    return format_pipeline_report(result)


# finetune

def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Distill the pruned ``--model`` from ``--teacher``; write the best weights to ``--out``; return a summary."""
    _check_no_input_replaced(args)
    out = check_output_path(args.out, args.force)
    _check_state_path(args)
    from rl_pruner.models.registry import PRUNED_PREFIX, load_model
    from rl_pruner.training.distill import (
        DistillationSettings,
        check_pruned_student,
        distill,
    )

    config = _training_config(args)
    distillation = DistillationSettings(temperature=args.temperature, alpha=args.alpha)
    if not args.model.startswith(PRUNED_PREFIX):
        raise InputError(
            f"--model is {args.model!r}; finetune needs a pruned model as {PRUNED_PREFIX}PATH, "
            "a file written by 'rl-pruner apply'"
        )
    student = load_model(args.model)
    teacher = _load_teacher(args, student)
    check_pruned_student(student, teacher)
    train_data = _training_dataset(args, student)
    test_batches = _test_loader(args, student)

    device = _device(args.device)
    _discard_old_state(args)
    top1_before = _top1_before(student.model, test_batches, device, args.resume)
    with _tracker(args, "finetune") as tracker:
        result = distill(
            student.model, teacher.model, train_data, config, distillation, test_batches=test_batches,
            state_path=_state_path(args), resume=args.resume, tracker=tracker,
            export_model=lambda model, path: _save_pruned(model, student, path),
            settings=_run_settings(args, tracker), device=device,
        )
        student.model.load_state_dict(result.best_state_dict)
        _save_pruned(student.model, student, out)
    return {
        **_summary(args, result, config, tracker),
        "out": str(out),
        "model": args.model,
        "teacher": str(args.teacher),
        "architecture": student.architecture,
        "temperature": distillation.temperature,
        "alpha": distillation.alpha,
        "top1_before": top1_before,
    }


def report_finetune(result: dict[str, Any]) -> str:
    lines = [
        f"distilled {result['model']} from {result['teacher']} for {_epochs(result)} -> {result['out']}",
        f"load it with --model pruned:{result['out']}",
    ]
    lines += _report_history(result)
    return "\n".join(lines) + "\n"


# sparsify

def run_sparsify(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--model`` with the sparsity settings; write its state dict to ``--out``; return a summary."""
    _check_no_input_replaced(args)
    out = check_output_path(args.out, args.force)
    _check_state_path(args)
    if args.input_size is not None and args.input_size < 1:
        raise InputError(f"--input-size is {args.input_size}; it must be a positive number of pixels")
    from rl_pruner.models.registry import PRUNED_PREFIX, load_model
    from rl_pruner.training.sparsity import (
        BNPenaltySchedule,
        CubicSparsitySchedule,
        batchnorm_layers,
        bn_scale_share_below,
        train_sparse,
    )

    config = _training_config(args)
    if args.bn_l1_warmup < 0:
        raise InputError(f"--bn-l1-warmup is {args.bn_l1_warmup}; pass 0 for a constant penalty or a number of steps")
    if not 0.0 <= args.target_sparsity < 1.0:
        raise InputError(f"--target-sparsity is {args.target_sparsity}; it must be a share of zero weights in [0, 1)")
    bn_penalty = BNPenaltySchedule(
        strength=args.bn_l1, kind="linear_warmup" if args.bn_l1_warmup > 0 else "constant",
        warmup_steps=args.bn_l1_warmup,
    )
    if args.model.startswith(PRUNED_PREFIX):
        raise InputError(
            f"--model is {args.model!r}; sparsify trains a dense model before pruning, so pass a model name "
            "with its --checkpoint"
        )
    loaded = load_model(args.model, args.checkpoint, trust_pickle=args.trust_pickle, input_size=args.input_size)
    has_batchnorm = bool(batchnorm_layers(loaded.model))
    if not has_batchnorm and args.bn_l1 > 0:
        raise InputError(
            f"--model {args.model} has no batch norm with a learnable scale for --bn-l1 to act on; "
            "pass --bn-l1 0, with --target-sparsity for magnitude masks"
        )
    train_data = _training_dataset(args, loaded)
    test_batches = _test_loader(args, loaded)

    magnitude = None
    if args.target_sparsity > 0:
        if not 0.0 < args.sparsity_end <= 1.0:
            raise InputError(f"--sparsity-end is {args.sparsity_end}; it must be a fraction of the run in (0, 1]")
        total_steps = config.epochs * (len(train_data) // config.batch_size)
        magnitude = CubicSparsitySchedule(
            final_sparsity=args.target_sparsity, begin_step=0,
            end_step=max(1, round(args.sparsity_end * total_steps)), update_every=args.mask_update_every,
        )

    device = _device(args.device)
    _discard_old_state(args)
    share_before = bn_scale_share_below(loaded.model) if has_batchnorm else None
    top1_before = _top1_before(loaded.model, test_batches, device, args.resume)
    with _tracker(args, "sparsify") as tracker:
        result = train_sparse(
            loaded.model, train_data, config, bn_penalty=bn_penalty, magnitude=magnitude,
            test_batches=test_batches, state_path=_state_path(args), resume=args.resume, tracker=tracker,
            export_model=_save_state_dict, settings=_run_settings(args, tracker), device=device,
        )
        if magnitude is None:
            loaded.model.load_state_dict(result.best_state_dict)
        else:
            # An earlier epoch may score better but has not reached the target sparsity, so the last one is kept.
            result.best_epoch, result.best_top1 = config.epochs, result.final_top1
        _save_state_dict(loaded.model, out)
    return {
        **_summary(args, result, config, tracker),
        "out": str(out),
        "model": args.model,
        "checkpoint": str(args.checkpoint),
        "bn_l1": args.bn_l1,
        "bn_l1_warmup": args.bn_l1_warmup,
        "target_sparsity": args.target_sparsity,
        "top1_before": top1_before,
        "bn_small_share_before": share_before,
        "bn_small_share_after": bn_scale_share_below(loaded.model) if has_batchnorm else None,
        "zero_weight_share": _zero_weight_share(loaded.model),
    }


def report_sparsify(result: dict[str, Any]) -> str:
    lines = [
        f"trained {result['model']} with batch-norm L1 {result['bn_l1']:g} for {_epochs(result)} -> {result['out']}"
    ]
    if result["bn_small_share_before"] is not None:
        before = 100 * result["bn_small_share_before"]
        after = 100 * result["bn_small_share_after"]
        lines.append(f"batch-norm scales below 1e-2: {before:.1f} % before, {after:.1f} % after")
    criterion = "bn_scale" if result["bn_l1"] > 0 else "l1"
    lines += [
        f"zero weights in convolutions and linear layers: {100 * result['zero_weight_share']:.1f} %",
        f"make a policy for it with --model {result['model']} --checkpoint {result['out']} --criterion {criterion}",
    ]
    lines += _report_history(result)
    return "\n".join(lines) + "\n"


def _load_teacher(args: argparse.Namespace, student: LoadedModel) -> LoadedModel:
    """Load ``--teacher`` as the student's architecture, with errors that name --teacher instead of --checkpoint."""
    from rl_pruner.errors import CheckpointError
    from rl_pruner.models.registry import load_model

    try:
        # The student's record stores the input size it was pruned at, and the teacher must take the same.
        return load_model(student.architecture, args.teacher, trust_pickle=args.trust_pickle,
                          input_size=student.input_shape[-1])
    except CheckpointError as err:
        if "--trust-pickle" in str(err):
            # That fix (re-save the state_dict, or --trust-pickle) applies to --teacher unchanged.
            raise CheckpointError(f"--teacher {args.teacher}: {err}") from err
        # The loader's own fix names --checkpoint or --model, which finetune reads differently,
        # so only the problem before the last "; " is kept.
        problem = str(err).rpartition("; ")[0] or str(err)
        raise CheckpointError(
            f"--teacher {args.teacher} cannot be the teacher of {args.model}, a pruned {student.architecture}: "
            f"{problem}; pass the dense {student.architecture} checkpoint that the student was pruned from"
        ) from err


# Shared steps

def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.state) if args.state else Path(args.out + STATE_SUFFIX)


def _check_no_input_replaced(args: argparse.Namespace) -> None:
    """Raise InputError when --out or --state is the file of an input, even with --force."""
    # Inputs first, so that a clash names the output to change.
    check_distinct_files({**input_files(args), "--out": Path(args.out), "--state": _state_path(args)})


def _check_state_path(args: argparse.Namespace) -> None:
    """Raise InputError when --state is not a writable file path, or does not fit --resume and --force.

    Without --resume an existing state is deleted only with --force, and only once it
    reads as a training state, so a mistyped --state never deletes a checkpoint.
    """
    from rl_pruner.errors import CheckpointError
    from rl_pruner.training.loop import read_state_summary

    state = check_output_path(_state_path(args), force=True, flag="--state")
    if args.resume:
        if not state.is_file():
            raise InputError(f"--resume: training state {state} not found; start a new run without --resume")
        try:
            read_state_summary(state)
        except CheckpointError as err:
            raise InputError(f"--state {state}: {err}") from err
        return
    if not state.exists():
        return
    if not args.force:
        raise InputError(
            f"training state {state} of an earlier run exists; pass --resume to continue it or --force to start over"
        )
    try:
        read_state_summary(state)
    except CheckpointError as err:
        raise InputError(
            f"--state {state} exists but is not a training state saved by rl-pruner, and --force deletes only "
            "those; pass another path to --state"
        ) from err


def _discard_old_state(args: argparse.Namespace) -> None:
    """With --force and without --resume, delete the resume state of an earlier run so that a new run starts."""
    state = _state_path(args)
    if args.force and not args.resume and state.is_file():
        logger.warning("--force: deleting the resume state %s of an earlier run", state)
        state.unlink()


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    from rl_pruner.training.loop import TrainingConfig

    return TrainingConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, seed=args.seed, precision=args.precision,
        checkpoint_every=args.checkpoint_every, num_workers=args.data_workers, channels_last=args.channels_last,
    )


def _training_dataset(args: argparse.Namespace, loaded: LoadedModel) -> Dataset:
    """Open ``--data`` with training augmentation, check its classes, and take the ``--limit`` subset."""
    from torch.utils.data import Subset

    from rl_pruner.data import build_image_folder, open_dataset, subset_indices
    from rl_pruner.evaluation import check_num_classes

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit is {args.limit}; it must be a positive number of images")
    if str(args.data).startswith("builtin:"):
        # The built-in digits have no augmentation; they are used as they are.
        dataset = open_dataset(args.data, image_size=loaded.image_size, normalization=loaded.normalization,
                               split="train", seed=args.seed)
    else:
        dataset = build_image_folder(args.data, image_size=loaded.image_size, normalization=loaded.normalization,
                                     augment=not args.no_augment)
    check_num_classes(loaded.num_classes, dataset.classes, args.data, "--data")
    _check_image_shape(dataset, loaded, "--data", args.data)
    if args.limit is None:
        return dataset
    return Subset(dataset, subset_indices(len(dataset), args.limit, args.seed))


def _test_loader(args: argparse.Namespace, loaded: LoadedModel) -> DataLoader | None:
    if args.test_data is None:
        return None
    from rl_pruner.data import make_loader, open_dataset
    from rl_pruner.evaluation import check_num_classes

    dataset = open_dataset(args.test_data, image_size=loaded.image_size, normalization=loaded.normalization,
                           split="test", seed=args.seed)
    check_num_classes(loaded.num_classes, dataset.classes, args.test_data, "--test-data")
    _check_image_shape(dataset, loaded, "--test-data", args.test_data)
    return make_loader(dataset, batch_size=args.batch_size, num_workers=args.data_workers)


def _check_image_shape(dataset: Dataset, loaded: LoadedModel, flag: str, path: str) -> None:
    """Raise DataError unless the first image of ``dataset`` has the model's input shape."""
    from rl_pruner.errors import DataError

    shape = tuple(dataset[0][0].shape)
    if shape != tuple(loaded.input_shape):
        raise DataError(
            f"{flag} {path} has images of shape {shape} (channels, height, width), but the model takes "
            f"{tuple(loaded.input_shape)}; pass images the model was trained on"
        )


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} needs a CUDA GPU, and none is available; use --device cpu")
    return device


def _top1_before(model: nn.Module, test_batches: DataLoader | None, device: Any, resume: bool) -> float | None:
    """Test top-1 of the model before training, or None without test data or when resuming."""
    if test_batches is None or resume:
        return None
    from rl_pruner.evaluation import evaluate_top1

    return evaluate_top1(model, test_batches, device)


class _NoTracker:
    """Stands in for a tracker context when no --tracking-uri is given."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


def _tracker(args: argparse.Namespace, command: str) -> SearchTracker | _NoTracker:
    """Open an MLflow run for this command, or on --resume the run that the saved state names, if any.

    ``args.parent_run_id``, set by a pipeline and absent from the command line, makes the run a child of that run.
    """
    if args.tracking_uri is None:
        return _NoTracker()
    from rl_pruner.tracking import SearchTracker
    from rl_pruner.training.loop import read_state_summary

    resume_run_id = None
    state = _state_path(args)
    if args.resume and state.is_file():
        resume_run_id = read_state_summary(state)["settings"].get(TRACKING_RUN_KEY)
    return SearchTracker(
        args.tracking_uri, args.experiment, run_name=f"{command} {Path(args.out).name}",
        tags={"rl_pruner.command": command, "rl_pruner.model": args.model}, resume_run_id=resume_run_id,
        parent_run_id=getattr(args, "parent_run_id", None), uri_setting="--tracking-uri",
    )


def _run_settings(args: argparse.Namespace, tracker: SearchTracker | None) -> dict[str, Any]:
    settings: dict[str, Any] = {"data": _same_path(args.data), "limit": args.limit, "augment": not args.no_augment}
    # A resumption that changes these would mix two runs (or keep a best epoch from other test data).
    for key in ("test_data", "teacher"):
        if getattr(args, key, None) is not None:
            settings[key] = _same_path(getattr(args, key))
    if getattr(args, "input_size", None) is not None:
        settings["input_size"] = str(args.input_size)
    if tracker is not None:
        settings[TRACKING_RUN_KEY] = tracker.run_id
    return settings


def _same_path(value: str) -> str:
    """Return ``value`` as an absolute path, so that ``data``, ``./data/`` and ``$PWD/data`` compare equal."""
    return value if value.startswith("builtin:") else str(Path(value).resolve())


def _zero_weight_share(model: nn.Module) -> float:
    """Share of zero entries over the weights of every convolution and linear layer."""
    from torch import nn

    weights = [module.weight for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    n_zero = sum(int((weight == 0).sum()) for weight in weights)
    return n_zero / max(sum(weight.numel() for weight in weights), 1)


def _save_pruned(model: nn.Module, student: LoadedModel, path: Path) -> None:
    from rl_pruner.engine.serialization import pruned_model_record, save_pruned_model

    record = student.pruned or {}
    save_pruned_model(path, pruned_model_record(
        model, architecture=student.architecture, input_shape=student.input_shape,
        num_classes=student.num_classes, normalization=student.normalization,
        dropped_blocks=list(record.get("dropped_blocks", [])), policy=dict(record.get("policy", {})),
    ))


def _save_state_dict(model: nn.Module, path: Path) -> None:
    from rl_pruner.training.loop import save_atomically

    save_atomically(path, {name: value.detach().cpu() for name, value in model.state_dict().items()})


def _summary(
    args: argparse.Namespace, result: TrainingResult, config: TrainingConfig, tracker: SearchTracker | None
) -> dict[str, Any]:
    return {
        "data": str(args.data),
        "test_data": args.test_data,
        "epochs": config.epochs,
        "steps": result.steps,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_top1": result.best_top1,
        "final_top1": result.final_top1,
        "state": str(_state_path(args)),
        "run_id": tracker.run_id if tracker is not None else None,
        "tracking_uri": args.tracking_uri,
    }


def _epochs(result: dict[str, Any]) -> str:
    return f"{result['epochs']} epoch" + ("" if result["epochs"] == 1 else "s")


def _report_history(result: dict[str, Any]) -> list[str]:
    lines = ["", f"{result['steps']} optimizer steps", f"{'epoch':>5} {'loss':>9} {'lr':>9} {'top-1':>8}"]
    if result.get("top1_before") is not None:
        lines.append(f"{'start':>5} {'':>9} {'':>9} {result['top1_before']:>7.2f}%")
    for entry in result["history"]:
        top1 = f"{entry['eval/top1']:>7.2f}%" if "eval/top1" in entry else f"{'-':>8}"
        lines.append(f"{int(entry['epoch']):>5} {entry['train/loss']:>9.4f} {entry['train/lr']:>9.2e} {top1}")
    if result.get("best_top1") is not None:
        lines.append(f"kept epoch {result['best_epoch']} (best test top-1 {result['best_top1']:.2f} %)")
    if result.get("run_id"):
        lines.append(f"MLflow run {result['run_id']} at {result['tracking_uri']}")
    return lines
