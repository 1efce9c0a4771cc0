"""Helpers shared by the benchmark scripts: reference data paths and result files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def shared_data() -> Path:
    """Reference data directory: ``$RL_PRUNER_SHARED_DATA``, else ``shared/data`` beside the checkout."""
    configured = os.environ.get("RL_PRUNER_SHARED_DATA")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise SystemExit(f"reference data not found at {path}; set RL_PRUNER_SHARED_DATA")
    return path


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` with the machine description to benchmarks/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def training_arguments(description: str, name: str, state_help: str) -> argparse.Namespace:
    """Parse the options shared by the training benchmarks, set up logging and seed torch.

    ``name`` names the default resume state file, ``<tmp>/rl-pruner-benchmark-<name>.pt``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--state", type=Path, default=Path(tempfile.gettempdir()) / f"rl-pruner-benchmark-{name}.pt",
                        help=state_help)
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop training after this many minutes and record the partial result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


@dataclass
class TimedRun:
    """Outcome of :func:`train_for_at_most`: the training function's result (None when stopped) and wall time."""

    result: Any
    finished: bool
    seconds: float


def train_for_at_most(train: Callable[[], Any], max_minutes: float | None) -> TimedRun:
    """Call ``train``, sending this process Ctrl-C (SIGINT) once ``max_minutes`` have passed.

    The training loop saves its state at the next step boundary and raises
    KeyboardInterrupt, which ends the run here with ``finished`` False.
    """
    timer = None
    if max_minutes is not None:
        timer = threading.Timer(max_minutes * 60, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
    started = time.perf_counter()
    try:
        return TimedRun(train(), True, time.perf_counter() - started)
    except KeyboardInterrupt:
        return TimedRun(None, False, time.perf_counter() - started)
    finally:
        if timer is not None:
            timer.cancel()


@dataclass
class CifarTrainingData:
    """CIFAR-10 JPEG splits of the training benchmarks, read from the reference data."""

    train_augmented: Any
    bn_batches: list
    test_batches: list
    n_test_images: int


def cifar_training_data(bn_images: int) -> CifarTrainingData:
    """Open the training archive with augmentation, and read ``bn_images`` training images
    (without augmentation) for batch-norm re-estimation and the whole test archive as batches."""
    from rl_pruner.data import build_image_folder, load_batches, split_indices

    data = shared_data()
    train_plain = build_image_folder(data / "cifar10-jpeg" / "train.tar.gz", image_size=None)
    train_augmented = build_image_folder(data / "cifar10-jpeg" / "train.tar.gz", image_size=None, augment=True)
    test = build_image_folder(data / "cifar10-jpeg" / "test.tar.gz", image_size=None)
    (bn_indices,) = split_indices(len(train_plain), [bn_images], seed=0)
    return CifarTrainingData(train_augmented, load_batches(train_plain, bn_indices, 250),
                             load_batches(test, None, 500), len(test))
