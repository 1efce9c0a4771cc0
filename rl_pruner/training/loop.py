"""The resumable fine-tuning loop shared by distillation, sparsity training and 2:4 fine-tuning.

:func:`train` runs SGD with momentum under a cosine learning-rate schedule that is
stepped once per optimizer step and reaches 0 after the last step. Each epoch visits
the training images in a permutation drawn from ``(seed, epoch)``, in batches of
``batch_size``, and drops the last incomplete batch. After every epoch it measures the
test top-1 when test batches are given and keeps the weights of the best epoch.

Resuming. With a ``state_path``, the loop writes its whole state there every
``checkpoint_every`` optimizer steps, at the end of every epoch and when Ctrl-C stops
it. The state contains the model, optimizer and scheduler, the epoch, the step, the
epoch's image order, and the random-number generator states of torch, NumPy and
Python. ``train(..., resume=True)`` continues from it. On CPU with
``torch.use_deterministic_algorithms(True)`` and ``num_workers=0``, an interrupted and
resumed run ends with the same weights, bit for bit, as an uninterrupted run with the
same seed, because random augmentations draw from the restored global torch generator.
With ``num_workers > 0`` a resumed epoch hands the remaining images to the workers
differently, so augmentations, and then the weights, differ from an uninterrupted run.

Precision. ``"auto"`` runs forward passes under bfloat16 autocast on a CUDA device that
supports bfloat16 and in float32 everywhere else. ``"bfloat16"`` forces autocast, also
on CPU, and ``"float32"`` disables it. Losses are always computed in float32.

Metrics go to the log, and to MLflow when a tracker is given, once per epoch:
``train/loss`` (mean over the epoch's batches), ``train/lr`` (at the epoch's end),
``eval/top1`` (percent) and any that the hooks add.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rl_pruner.errors import CheckpointError, InputError
from rl_pruner.evaluation import check_num_classes, evaluate_top1
from rl_pruner.models.checkpoint import read_checkpoint
from rl_pruner.models.registry import output_size
from rl_pruner.outputs import atomic_write

logger = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
LossFunction = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``loss(student_logits, labels, teacher_logits)``; ``teacher_logits`` is None without a teacher."""

PRECISIONS = ("auto", "float32", "bfloat16")
STATE_FORMAT = "rl-pruner-training-state"
STATE_VERSION = 1
# Settings that may change between a run and its resumption without changing the
# result: the save interval, and the MLflow run that the CLI records in the settings.
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "tracking.run_id"})


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one fine-tuning run; every value is checked on creation.

    :param epochs: passes over the training data, at least 1.
    :param batch_size: images per optimizer step, at least 1.
    :param learning_rate: initial SGD learning rate, > 0. The cosine schedule lowers it to 0 at the last step.
    :param momentum: SGD momentum, in [0, 1).
    :param weight_decay: L2 weight decay applied to every parameter, >= 0.
    :param seed: seed of the random-number generators and of the image order, >= 0.
    :param precision: ``"auto"``, ``"float32"`` or ``"bfloat16"`` (see the module docstring).
    :param checkpoint_every: optimizer steps between two saves of the resume state, at least 1.
    :param num_workers: data-loader worker processes, >= 0. A bit-identical resume needs 0.
    :param channels_last: store the model's weights and the input batches in channels-last
        memory format. On a 2-core AMD EPYC (AVX2) with PyTorch 2.14, this made the
        forward pass of ResNet-56 on 128 CIFAR images about 30 % faster.
    """

    epochs: int
    batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    precision: str = "auto"
    checkpoint_every: int = 100
    num_workers: int = 0
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs is {self.epochs}; train for at least 1 epoch")
        if self.batch_size < 1:
            raise InputError(f"batch size is {self.batch_size}; it must be a positive number of images")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning rate is {self.learning_rate}; it must be a positive number")
        if not 0.0 <= self.momentum < 1.0:
            raise InputError(f"momentum is {self.momentum}; it must be in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight decay is {self.weight_decay}; it must be 0 or more")
        if self.seed < 0:
            raise InputError(f"seed is {self.seed}; it must be a non-negative integer")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision is {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.checkpoint_every < 1:
            raise InputError(f"checkpoint interval is {self.checkpoint_every}; it must be at least 1 optimizer step")
        if self.num_workers < 0:
            raise InputError(f"number of data-loader workers is {self.num_workers}; it must be 0 or more")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingHooks:
    """Callbacks that extend a training step. This base class changes nothing.

    ``step`` is the number of optimizer steps taken before the current one, counted
    from 0 over the whole run, so it continues across epochs and resumption.
    """

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Edit gradients after ``loss.backward()`` and before the optimizer step."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Edit weights or masks after the optimizer step."""

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Return metrics to log at the end of every epoch, named ``<group>/<name>``."""
        return {}


class MetricsTracker(Protocol):
    """Interface of the tracker that the loop logs to; :class:`rl_pruner.tracking.SearchTracker` implements it."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...


ModelExporter = Callable[[nn.Module, Path], None]
"""Writes a model to a file, for the MLflow artifacts ``model/final.pt`` and ``model/best.pt``."""


@dataclass
class TrainingResult:
    """Per-epoch history and best weights of one run. The model passed to :func:`train` keeps the final weights."""

    history: list[dict[str, float]]
    """One entry per epoch: ``epoch`` (from 1), ``train/loss``, ``train/lr``, ``eval/top1`` and hook metrics."""
    steps: int
    """Optimizer steps taken over the whole run, including those before a resumption."""
    best_epoch: int
    """Epoch (from 1) with the highest ``eval/top1``; the last epoch when no test batches were given."""
    best_top1: float | None
    """Test top-1 in percent of the best epoch, or None without test batches."""
    best_state_dict: dict[str, Tensor] = field(repr=False)
    """Weights of the best epoch, on the CPU."""

    @property
    def final_top1(self) -> float | None:
        """Test top-1 in percent after the last epoch, or None without test batches."""
        return self.history[-1].get("eval/top1") if self.history else None


@dataclass
class _Progress:
    """Position and running statistics of a run; everything here is saved in the resume state."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    order: Tensor | None = None
    loss_sum: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_top1: float | None = None
    best_state_dict: dict[str, Tensor] | None = None


def cross_entropy_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None) -> Tensor:
    """Mean cross-entropy of ``logits`` against ``labels``; ``teacher_logits`` is ignored."""
    return F.cross_entropy(logits, labels)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for plain float32.

    Raises InputError for ``"bfloat16"`` on a CUDA device without bfloat16 support.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision is {precision!r}; use one of {', '.join(PRECISIONS)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "bfloat16":
        if device.type == "cuda" and not cuda_bf16:
            raise InputError(f"precision bfloat16 is not supported on {device}; use float32 or auto")
        return torch.bfloat16
    return None


def train(
    model: nn.Module,
    train_data: Dataset,
    config: TrainingConfig,
    *,
    loss_fn: LossFunction = cross_entropy_loss,
    teacher: nn.Module | None = None,
    hooks: TrainingHooks | None = None,
    test_batches: Iterable[Batch] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    tracker: MetricsTracker | None = None,
    export_model: ModelExporter | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    description: str = "training",
) -> TrainingResult:
    """Train ``model`` in place on ``train_data`` and return the per-epoch history and best weights.

    ``train_data`` yields ``(image tensor, integer label)`` pairs. ``test_batches`` is
    read once per epoch, so it must be a list or a DataLoader, not a generator. With a ``teacher``,
    each batch also goes through the teacher in eval mode without gradients, and
    ``loss_fn`` receives its logits. ``settings`` are extra values that define the run
    (a loss temperature, a penalty strength). They are logged with the config and
    stored in the resume state, and a resumption with other values is rejected.
    Raises DataError when ``train_data`` has a ``classes`` list whose length differs
    from the model's outputs.

    A fresh run seeds torch, NumPy and Python's ``random`` with ``config.seed``. It
    raises InputError when ``state_path`` already exists, so an earlier run is never
    overwritten by accident. ``resume=True`` continues the run saved at ``state_path``
    and raises InputError when that file is missing or was written with other settings.
    Ctrl-C (SIGINT, main thread only) stops the run after the current step: the state
    is saved, then KeyboardInterrupt is raised. A second Ctrl-C stops at once.

    With a ``tracker``, the settings are logged as parameters and the metrics once per
    epoch with the epoch (from 1) as the step. With an ``export_model`` as well, the
    final and best models are logged as the artifacts ``model/final.pt`` and ``model/best.pt``.
    """
    classes = getattr(train_data, "classes", None)
    if classes is not None:
        check_num_classes(output_size(model), classes, getattr(train_data, "root", "(no path)"), "the training data")
    device = torch.device(device)
    run_settings = {**config.to_dict(), **(settings or {})}
    autocast_dtype = resolve_precision(config.precision, device)
    steps_per_epoch = len(train_data) // config.batch_size  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise InputError(
            f"the training data has {len(train_data)} images, fewer than one batch of {config.batch_size}; "  # type: ignore[arg-type]
            "lower the batch size or use more training images"
        )
    total_steps = config.epochs * steps_per_epoch

    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    state_file = Path(state_path) if state_path is not None else None
    position = _start(model, optimizer, scheduler, run_settings, state_file, resume)

    logger.info(
        "%s: %d epochs of %d steps (%d images per step) on %s, precision %s, settings %s",
        description, config.epochs, steps_per_epoch, config.batch_size, device,
        autocast_dtype or torch.float32, run_settings,
    )
    if tracker is not None:
        tracker.log_params(run_settings)

    run = _Run(
        model=model, teacher=teacher, loss_fn=loss_fn, hooks=hooks or TrainingHooks(), optimizer=optimizer,
        scheduler=scheduler, config=config, settings=run_settings, device=device, autocast_dtype=autocast_dtype,
        state_file=state_file, tracker=tracker, position=position,
    )
    bar = tqdm(total=total_steps, initial=position.step, desc=description, unit="step", disable=not progress)
    started = time.perf_counter()
    steps_at_start = position.step
    try:
        with _deferred_interrupt() as stop_requested:
            while position.epoch < config.epochs:
                run.train_epoch(train_data, steps_per_epoch, bar, stop_requested)
                run.finish_epoch(test_batches, progress)
                # Ctrl-C during the evaluation stops the run before the next epoch starts. After the
                # last epoch there is nothing left to stop, so the run completes.
                if stop_requested() and position.epoch < config.epochs:
                    run.stop()
    finally:
        bar.close()

    elapsed = time.perf_counter() - started
    logger.info(
        "%s finished: %d steps in %.1f s (%.1f images/s)", description, position.step - steps_at_start, elapsed,
        (position.step - steps_at_start) * config.batch_size / max(elapsed, 1e-9),
    )
    best_state = position.best_state_dict if position.best_state_dict is not None else _cpu_state(model)
    if tracker is not None and export_model is not None:
        log_models(tracker, export_model, model, best_state)
    return TrainingResult(
        history=list(position.history), steps=position.step, best_epoch=position.best_epoch,
        best_top1=position.best_top1, best_state_dict=best_state,
    )


@dataclass
class _Run:
    """The objects of one call to :func:`train`, and its epoch and step logic."""

    model: nn.Module
    teacher: nn.Module | None
    loss_fn: LossFunction
    hooks: TrainingHooks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainingConfig
    settings: dict[str, Any]
    device: torch.device
    autocast_dtype: torch.dtype | None
    state_file: Path | None
    tracker: MetricsTracker | None
    position: _Progress

    def train_epoch(
        self, train_data: Dataset, steps_per_epoch: int, bar: tqdm, stop_requested: Callable[[], bool]
    ) -> None:
        position = self.position
        if position.order is None:
            position.order = epoch_order(len(train_data), self.config.seed, position.epoch)  # type: ignore[arg-type]
        loader = _epoch_loader(
            train_data, position.order, position.step_in_epoch, steps_per_epoch, self.config,
            epoch=position.epoch, pin_memory=self.device.type == "cuda",
        )

        self.model.train()
        for images, labels in loader:
            loss = self.train_step(images, labels)
            position.loss_sum += loss
            position.step_in_epoch += 1
            position.step += 1
            bar.update(1)
            bar.set_postfix(epoch=position.epoch + 1, loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                            refresh=False)

            if stop_requested():
                self.stop()
            if self.state_file is not None and position.step % self.config.checkpoint_every == 0:
                self.save_state()

    def stop(self) -> None:
        """Save the state and raise KeyboardInterrupt, as Ctrl-C requested."""
        self.save_state()
        where = f"; continue it from {self.state_file} with resume" if self.state_file else ""
        logger.warning("training stopped after step %d%s", self.position.step, where)
        raise KeyboardInterrupt

    def train_step(self, images: Tensor, labels: Tensor) -> float:
        memory_format = torch.channels_last if self.config.channels_last else torch.preserve_format
        images = images.to(self.device, memory_format=memory_format, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with _autocast(self.device, self.autocast_dtype):
            logits = self.model(images)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images).float()
        loss = self.loss_fn(logits.float(), labels, teacher_logits)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.hooks.after_backward(self.model, self.position.step)
        self.optimizer.step()
        self.scheduler.step()
        self.hooks.after_step(self.model, self.position.step)
        return float(loss.detach())

    def finish_epoch(self, test_batches: Iterable[Batch] | None, progress: bool) -> None:
        position = self.position
        epoch = position.epoch + 1
        metrics: dict[str, float] = {
            "train/loss": position.loss_sum / max(position.step_in_epoch, 1),
            "train/lr": float(self.scheduler.get_last_lr()[0]),
        }
        if test_batches is not None:
            metrics["eval/top1"] = evaluate_top1(self.model, test_batches, self.device, disable_progress=not progress)
        metrics.update(self.hooks.epoch_metrics(self.model))
        logger.info("epoch %d: %s", epoch, ", ".join(f"{name} = {value:.4g}" for name, value in metrics.items()))
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=epoch)

        top1 = metrics.get("eval/top1")
        if top1 is not None and (position.best_top1 is None or top1 > position.best_top1):
            position.best_top1 = top1
            position.best_epoch = epoch
            position.best_state_dict = _cpu_state(self.model)
        elif top1 is None:
            position.best_epoch = epoch
            position.best_top1 = None
            position.best_state_dict = None
        position.history.append({"epoch": float(epoch), **metrics})
        position.epoch += 1
        position.step_in_epoch = 0
        position.order = None
        position.loss_sum = 0.0
        self.save_state()

    def save_state(self) -> None:
        if self.state_file is None:
            return
        position = self.position
        record = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "settings": self.settings,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "step": position.step,
            "order": position.order,
            "loss_sum": position.loss_sum,
            "history": position.history,
            "best_epoch": position.best_epoch,
            "best_top1": position.best_top1,
            "best_state_dict": position.best_state_dict,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_states(),
        }
        save_atomically(self.state_file, record)
        logger.debug("saved training state at step %d to %s", position.step, self.state_file)


def epoch_order(n_images: int, seed: int, epoch: int) -> Tensor:
    """Return the order in which epoch ``epoch`` (from 0) visits ``n_images`` training images.

    The permutation depends only on the arguments, so a resumed run can rebuild it,
    and it is also stored in the resume state.
    """
    permutation = np.random.default_rng([seed, epoch]).permutation(n_images)
    return torch.from_numpy(permutation.astype(np.int64))


def read_state_summary(path: str | Path) -> dict[str, Any]:
    """Return the settings and position stored in the resume state at ``path``.

    The keys are ``settings``, ``epoch`` (epochs finished), ``step`` (optimizer steps
    taken) and ``history``. Raises CheckpointError when the file is unreadable or not a
    training state.
    """
    record = _read_state(Path(path))
    return {key: record[key] for key in ("settings", "epoch", "step", "history")}


def _start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    state_file: Path | None,
    resume: bool,
) -> _Progress:
    """Seed a fresh run, or load the saved state into the model, optimizer and scheduler."""
    if not resume:
        if state_file is not None and state_file.exists():
            raise InputError(
                f"training state {state_file} already exists; resume that run, or delete the file to start over"
            )
        _seed_everything(int(settings["seed"]))
        return _Progress()

    if state_file is None:
        raise InputError("resume needs the path of the saved training state")
    if not state_file.is_file():
        raise InputError(f"training state {state_file} not found; start a new run instead of resuming")
    record = _read_state(state_file)
    _check_same_settings(record["settings"], settings, state_file)
    try:
        model.load_state_dict(record["model"])
        optimizer.load_state_dict(record["optimizer"])
        scheduler.load_state_dict(record["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"training state {state_file} does not fit this model ({str(err).splitlines()[0]}); "
            "resume with the model the run started from"
        ) from err
    _set_rng_states(record["rng"])
    logger.info("resuming from %s at epoch %d, step %d", state_file, record["epoch"] + 1, record["step"])
    return _Progress(
        epoch=int(record["epoch"]), step_in_epoch=int(record["step_in_epoch"]), step=int(record["step"]),
        order=record["order"], loss_sum=float(record["loss_sum"]), history=list(record["history"]),
        best_epoch=int(record["best_epoch"]), best_top1=record["best_top1"],
        best_state_dict=record["best_state_dict"],
    )


def _read_state(path: Path) -> dict[str, Any]:
    record = read_checkpoint(path)
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training state saved by rl-pruner; pass the state file of the run")
    if record.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has training-state version {record.get('version')!r}; this rl-pruner reads {STATE_VERSION}"
        )
    return record


def _check_same_settings(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    changed = [
        f"{key} {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    ]
    if changed:
        raise InputError(
            f"training state {path} was saved with other settings ({'; '.join(changed)}); "
            "resume with the settings of the run, or start a new run"
        )


def _epoch_loader(
    train_data: Dataset, order: Tensor, start_batch: int, steps_per_epoch: int, config: TrainingConfig,
    *, epoch: int, pin_memory: bool,
) -> DataLoader:
    """Create a loader over the epoch's remaining full batches, starting at batch ``start_batch``."""
    indices = order[start_batch * config.batch_size : steps_per_epoch * config.batch_size].tolist()
    # Worker processes seed their generators from this one, so it differs per epoch to
    # give every epoch new augmentations.
    worker_seed = int(np.random.default_rng([config.seed, epoch, 1]).integers(2**62))
    return DataLoader(
        train_data,
        batch_size=config.batch_size,
        sampler=indices,
        drop_last=True,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        # Its own generator, so creating the loader draws nothing from the global torch
        # generator that random augmentations in the main process use.
        generator=torch.Generator().manual_seed(worker_seed),
    )


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rng_states() -> dict[str, Any]:
    """Random-number generator states as tensors and plain values, readable with ``weights_only=True``."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(python_state), gauss_next],
    }


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def save_atomically(path: str | Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` with ``torch.save`` so that a crash never leaves a partial file at ``path``."""
    atomic_write(path, lambda temporary: torch.save(dict(record), temporary))


def log_models(
    tracker: MetricsTracker, export_model: ModelExporter, model: nn.Module, best_state: dict[str, Tensor]
) -> None:
    """Log ``model`` and a copy with ``best_state`` as the artifacts ``model/final.pt`` and ``model/best.pt``."""
    with tempfile.TemporaryDirectory() as directory:
        final_path = Path(directory) / "final.pt"
        export_model(model, final_path)
        tracker.log_artifact(final_path, "model")

        best_model = copy.deepcopy(model)
        best_model.load_state_dict(best_state)
        best_path = Path(directory) / "best.pt"
        export_model(best_model, best_path)
        tracker.log_artifact(best_path, "model")


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a stop request that the loop checks after each step.

    Yields a function that returns True once Ctrl-C was pressed. A second Ctrl-C raises
    KeyboardInterrupt at once. Outside the main thread, signals cannot be caught, so
    Ctrl-C keeps its default effect there.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def request_stop(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        logger.warning("stopping after the current step; press Ctrl-C again to stop at once")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)
