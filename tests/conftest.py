"""Fixtures shared by the test modules: paths into the reference data directory, the
YOLOv7 reference configurations and photographs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    from rl_pruner.engine.pruner import Pruner

# No test may reach outside hosts: MLflow 3's usage telemetry is off for every test.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

SHARED_DATA_ENV_VAR = "RL_PRUNER_SHARED_DATA"
DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path}; set {SHARED_DATA_ENV_VAR} to the reference data directory")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Reference data directory: ``$RL_PRUNER_SHARED_DATA``, else ``shared/data`` beside the checkout."""
    configured = os.environ.get(SHARED_DATA_ENV_VAR)
    return _require(Path(configured) if configured else DEFAULT_SHARED_DATA)


@pytest.fixture(scope="module")
def two_torch_threads() -> Iterator[None]:
    """Run a module's forward passes on two CPU threads, restoring the count afterwards.

    Modules that run large models use it with ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def yolov7_dir(shared_data: Path) -> Path:
    """The folder of the official YOLOv7 configurations and the two reference photographs."""
    path = shared_data / "yolov7"
    if not all((path / name).exists() for name in ("yolov7.yaml", "yolov7-tiny.yaml")):
        pytest.skip(f"YOLOv7 reference configurations not found in {path}")
    return path


@pytest.fixture(scope="session")
def yolov7_images(yolov7_dir: Path) -> Callable[[int], torch.Tensor]:
    """A function of the side in pixels that returns the reference photographs, resized
    (not letterboxed) to that square, as one batch in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    def load(size: int) -> torch.Tensor:
        tensors = []
        for path in sorted(yolov7_dir.glob("*.jpg")):
            image = Image.open(path).convert("RGB").resize((size, size))
            tensors.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0)
        if not tensors:
            pytest.skip(f"no reference images in {yolov7_dir}")
        return torch.stack(tensors)

    return load


@pytest.fixture(scope="session")
def cifar_test_archive(shared_data: Path) -> Path:
    """CIFAR-10 test split as JPEGs: 10,000 images, 1,000 per class."""
    return _require(shared_data / "cifar10-jpeg" / "test.tar.gz")


@pytest.fixture(scope="session")
def cifar_train_archive(shared_data: Path) -> Path:
    """CIFAR-10 training split as JPEGs: 50,000 images, 5,000 per class."""
    return _require(shared_data / "cifar10-jpeg" / "train.tar.gz")


@pytest.fixture(scope="session")
def resnet56(shared_data: Path) -> Pruner:
    """The trained CIFAR-10 ResNet-56, traced once for the whole test session."""
    from rl_pruner.engine.pruner import Pruner
    from rl_pruner.models.registry import load_model

    return Pruner(load_model("cifar_resnet56", shared_data / "checkpoints" / "cifar10-resnet56.th"))


@pytest.fixture(scope="session")
def resnet50() -> Pruner:
    """torchvision's ResNet-50 with random weights, traced once for the whole test session."""
    from rl_pruner.engine.pruner import Pruner
    from rl_pruner.models.registry import load_model

    return Pruner(load_model("resnet50"))
