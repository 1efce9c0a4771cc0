"""Fixtures shared by the test modules: paths into the reference data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def cifar_test_archive(shared_data: Path) -> Path:
    """CIFAR-10 test split as JPEGs: 10,000 images, 1,000 per class."""
    return _require(shared_data / "cifar10-jpeg" / "test.tar.gz")


@pytest.fixture(scope="session")
def cifar_train_archive(shared_data: Path) -> Path:
    """CIFAR-10 training split as JPEGs: 50,000 images, 5,000 per class."""
    return _require(shared_data / "cifar10-jpeg" / "train.tar.gz")
