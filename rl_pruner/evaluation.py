"""Top-1 accuracy, forward-pass latency, and the class-count check between a model and a data set."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import TypedDict

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rl_pruner.errors import DataError, InputError

logger = logging.getLogger(__name__)


class LatencyStats(TypedDict):
    """Wall time of one forward pass over a batch, from :func:`measure_latency`."""

    median_ms: float
    mean_ms: float
    images_per_s: float
    """Throughput from the median: ``batch_size * 1000 / median_ms``."""
    num_threads: int
    """``torch.get_num_threads()`` during the measurement."""


def evaluate_top1(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    *,
    disable_progress: bool = False,
) -> float:
    """Compute the top-1 accuracy of ``model`` in percent over every image in ``batches``.

    ``batches`` is a DataLoader or a list of ``(images, labels)`` pairs, as returned by
    ``rl_pruner.data.load_batches``. Each image counts once, so batches of different
    sizes are weighted by their size. The model is moved to ``device`` and run in eval
    mode under ``torch.inference_mode``, then its previous train or eval mode is restored.
    Raises DataError when ``batches`` contains no images.
    """
    was_training = model.training
    model.to(device)
    model.eval()

    n_correct = 0
    n_images = 0
    progress = tqdm(batches, desc="evaluating", unit="batch", disable=True if disable_progress else None)
    try:
        with torch.inference_mode():
            for images, labels in progress:
                logits = model(images.to(device, non_blocking=True))
                if logits.ndim != 2:
                    raise ValueError(
                        f"evaluate_top1 needs a classifier whose output has shape (batch, classes), got {tuple(logits.shape)}"
                    )
                predictions = logits.argmax(dim=1).cpu()
                n_correct += int((predictions == labels.cpu()).sum())
                n_images += len(labels)
    finally:
        model.train(was_training)

    if n_images == 0:
        raise DataError("no images to evaluate: the batches are empty; check the data set path and image limit")
    accuracy = 100.0 * n_correct / n_images
    logger.info("eval/top1 = %.2f %% on %d images", accuracy, n_images)
    return accuracy


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int,
    warmup: int,
    repeats: int,
    device: str | torch.device = "cpu",
) -> LatencyStats:
    """Measure the wall time of one forward pass of ``model`` on a random batch.

    ``input_shape`` is the shape of one image without the batch dimension, for example
    ``(3, 32, 32)``. The model is moved to ``device`` and runs in eval mode under
    ``torch.inference_mode``. ``warmup`` untimed passes come first, then ``repeats``
    passes are each timed with ``time.perf_counter``. On CUDA each timed pass ends with
    ``torch.cuda.synchronize``. CPU times depend on the current torch thread setting
    (``torch.set_num_threads``), which this function reads but does not change. The
    model's previous train or eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise InputError(f"latency batch size must be a positive number of images, got {batch_size}")
    if warmup < 0:
        raise InputError(f"latency warm-up must be 0 or more forward passes, got {warmup}")
    if repeats < 1:
        raise InputError(f"latency repeats must be a positive number of forward passes, got {repeats}")

    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    inputs = torch.randn(batch_size, *input_shape, device=device)

    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(inputs)
            _synchronize(device)
            times_ms = [_time_forward_ms(model, inputs, device) for _ in range(repeats)]
    finally:
        model.train(was_training)

    median_ms = statistics.median(times_ms)
    stats = LatencyStats(
        median_ms=median_ms,
        mean_ms=statistics.fmean(times_ms),
        images_per_s=batch_size * 1000.0 / median_ms,
        num_threads=torch.get_num_threads(),
    )
    logger.info(
        "latency/median_ms = %.3f, latency/mean_ms = %.3f, latency/images_per_s = %.1f "
        "(batch %d, %d repeats, %s, %d threads)",
        stats["median_ms"],
        stats["mean_ms"],
        stats["images_per_s"],
        batch_size,
        repeats,
        device,
        stats["num_threads"],
    )
    return stats


def check_num_classes(
    model_outputs: int, dataset_classes: Sequence[str], data_path: str | os.PathLike[str], source: str = "--data"
) -> None:
    """Raise DataError unless the data set has as many classes as the model has outputs.

    ``source`` names where the user gave ``data_path`` (an option, a config key), so
    that the message names what to change.
    """
    if len(dataset_classes) != model_outputs:
        raise DataError(
            f"{source} {data_path} has {len(dataset_classes)} classes but the model outputs {model_outputs}; "
            f"point {source} at a data set with the model's {model_outputs} classes"
        )


def _time_forward_ms(model: nn.Module, inputs: Tensor, device: torch.device) -> float:
    started = time.perf_counter()
    model(inputs)
    _synchronize(device)
    return (time.perf_counter() - started) * 1000.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
