"""The built-in demo: the digits data set, the digits CNN, its training and its pruning."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from rl_pruner.config import config_from_dict, load_config
from rl_pruner.data import load_batches
from rl_pruner.demo import (
    DEMO_SETTINGS,
    DIGITS_INPUT_SHAPE,
    DIGITS_NORMALIZATION,
    DigitsDataset,
    DigitsNet,
    demo_config,
    digits_top1,
    load_builtin_dataset,
    load_digits_splits,
    train_digits_model,
)
from rl_pruner.engine.pruner import Pruner
from rl_pruner.errors import ConfigError
from rl_pruner.models.registry import build_architecture, load_model

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

N_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's load_digits


@pytest.fixture(scope="module")
def splits() -> tuple[DigitsDataset, DigitsDataset]:
    return load_digits_splits(seed=0)


@pytest.fixture(scope="module")
def trained() -> tuple[DigitsNet, float]:
    started = time.perf_counter()
    model, top1 = train_digits_model(seed=0, progress=False)
    logger.info("train_digits_model took %.1f s and reached %.2f %% test top-1", time.perf_counter() - started, top1)
    return model, top1


# Data


def test_split_sizes(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    train, test = splits
    assert len(train) == 1297
    assert len(test) == 500


def test_split_items_like_image_folder(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    for dataset in splits:
        image, label = dataset[0]
        assert dataset.classes == [str(digit) for digit in range(10)]
        assert image.shape == DIGITS_INPUT_SHAPE
        assert image.dtype == torch.float32
        assert isinstance(label, int)


def test_split_is_stratified(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    train, test = splits
    train_counts = Counter(train.targets)
    test_counts = Counter(test.targets)
    for label, total in enumerate(N_PER_CLASS):
        assert train_counts[label] + test_counts[label] == total
        assert abs(test_counts[label] - total * 500 / 1797) <= 1


def test_split_is_normalised(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    images = torch.cat([dataset.tensors[0] for dataset in splits])
    assert float(images.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(images.std()) == pytest.approx(1.0, abs=1e-3)


def test_split_deterministic(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    again = load_digits_splits(seed=0)
    other = load_digits_splits(seed=1)
    for first, second in zip(splits, again, strict=True):
        assert torch.equal(first.tensors[0], second.tensors[0])
        assert first.targets == second.targets
    assert not torch.equal(splits[1].tensors[0], other[1].tensors[0])


def test_split_loads_in_batches(splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    batches = load_batches(splits[0], list(range(300)), batch_size=128, disable_progress=True)
    assert [len(labels) for _, labels in batches] == [128, 128, 44]
    assert batches[0][0].shape == (128, *DIGITS_INPUT_SHAPE)


@pytest.mark.parametrize(("split", "size"), [("train", 1297), ("test", 500)])
def test_builtin_dataset(split: str, size: int) -> None:
    assert len(load_builtin_dataset("builtin:digits", split)) == size


@pytest.mark.parametrize(("name", "split"), [("builtin:mnist", "train"), ("builtin:digits", "val")])
def test_builtin_dataset_unknown(name: str, split: str) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        load_builtin_dataset(name, split)


# Model and training


def test_registry_builds_digits_model() -> None:
    model, input_shape = build_architecture("digits_cnn")
    assert isinstance(model, DigitsNet)
    assert input_shape == DIGITS_INPUT_SHAPE

    loaded = load_model("digits_cnn")
    assert loaded.normalization == DIGITS_NORMALIZATION
    assert loaded.image_size is None
    assert loaded.num_classes == 10


def test_training_reaches_accuracy(trained: tuple[DigitsNet, float]) -> None:
    model, top1 = trained
    assert top1 >= 95.0
    assert not model.training


def test_training_restores_thread_count(trained: tuple[DigitsNet, float]) -> None:
    # The fixture has already trained; a short run checks the setting around the call.
    n_threads = torch.get_num_threads()
    train_digits_model(epochs=1, progress=False)
    assert torch.get_num_threads() == n_threads


# Pruning


def test_residual_blocks_removable() -> None:
    assert Pruner(load_model("digits_cnn")).structure.block_names == ["layer1.0", "layer1.1", "layer2.0"]


def test_uniform_pruning_runs(trained: tuple[DigitsNet, float], splits: tuple[DigitsDataset, DigitsDataset]) -> None:
    loaded = load_model("digits_cnn")
    loaded.model.load_state_dict(trained[0].state_dict())
    pruner = Pruner(loaded)

    policy = pruner.uniform_policy(macs_target=0.5)
    pruned = pruner.apply(policy)

    images = splits[1].tensors[0]
    with torch.inference_mode():
        logits = pruned(images)
    assert logits.shape == (500, 10)
    assert policy.metadata["macs_ratio"] == pytest.approx(0.5, abs=0.05)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in loaded.model.parameters())


def test_block_drop_runs() -> None:
    pruner = Pruner(load_model("digits_cnn"))
    policy = pruner.make_policy([0.25] * len(pruner.structure.layer_names), dropped_blocks=["layer1.1"])
    pruned = pruner.apply(policy)
    assert pruned(torch.zeros(2, *DIGITS_INPUT_SHAPE)).shape == (2, 10)


# Demo configuration


def test_demo_settings_match_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    assert config_from_dict(DEMO_SETTINGS) == load_config("experiments/demo.yaml")


def test_demo_config_uses_checkpoint(tmp_path: Path, trained: tuple[DigitsNet, float]) -> None:
    model, top1 = trained
    checkpoint = tmp_path / "digits_cnn.pt"
    torch.save(model.state_dict(), checkpoint)

    config = config_from_dict(demo_config(tmp_path, checkpoint))
    assert config.checkpoint == str(checkpoint)
    assert config.output_dir == str(tmp_path)
    assert config.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"

    loaded = load_model(config.model, config.checkpoint)
    test = load_builtin_dataset(config.data, "test", config.seed)
    assert digits_top1(loaded.model, test) == pytest.approx(top1)
