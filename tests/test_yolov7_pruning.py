"""Structured pruning of YOLOv7 detectors by the engine: tracing, costing, applying, criteria.

The model attribute ``rl_pruner_output_modules`` names the head's per-level output
convolutions, so they keep their width. The implicit layers of the head are pruned with
the channels they carry. Every criterion on yolov7.yaml, ``taylor`` included, is
tested in ``test_yolov7_criteria.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from rl_pruner.data import Normalization
from rl_pruner.engine.estimate import estimate_cost
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import (
    load_pruned_model,
    pruned_model_record,
    save_pruned_model,
)
from rl_pruner.engine.structure import OUTPUT_MODULES_ATTRIBUTE, analyze_model
from rl_pruner.errors import InputError
from rl_pruner.models.registry import LoadedModel
from rl_pruner.models.yolov7 import ImplicitA, ImplicitM, YOLOv7, build_yolov7

IMAGE_SIZE = 160
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
MACS_TARGET = 0.5
# Prunable layers (dependency groups) that analyze_model finds in each configuration.
EXPECTED_LAYERS = {"yolov7-tiny": 55, "yolov7": 89}
# Environment variable naming the YAML that build_configured_yolov7 reads.
CONFIG_ENV_VAR = "RL_PRUNER_TEST_YOLOV7_CONFIG"


def build_configured_yolov7() -> YOLOv7:
    """Zero-argument factory for the model registry: the YOLOv7 of ``$RL_PRUNER_TEST_YOLOV7_CONFIG``."""
    return build_yolov7(os.environ[CONFIG_ENV_VAR])


pytestmark = pytest.mark.usefixtures("two_torch_threads")

@pytest.fixture(scope="module")
def images(yolov7_images: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The reference photographs at the test input size."""
    return yolov7_images(IMAGE_SIZE)

def _pruner(
    yolov7_dir: Path, name: str, calibration: torch.Tensor | None = None, architecture: str | None = None
) -> Pruner:
    torch.manual_seed(0)
    model = build_yolov7(yolov7_dir / f"{name}.yaml").eval()
    loaded = LoadedModel(
        architecture=architecture or name,
        model=model,
        input_shape=INPUT_SHAPE,
        normalization=Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        num_classes=80,
    )
    batches = None
    if calibration is not None:
        batches = [(calibration[i:i + 1], torch.zeros(1, dtype=torch.long)) for i in range(len(calibration))]
    return Pruner(loaded, calibration_batches=batches)


class _PrunerCache(dict):
    """Traces each configuration on first use, so no single test pays for both."""

    def __init__(self, yolov7_dir: Path, images: torch.Tensor) -> None:
        super().__init__()
        self.yolov7_dir = yolov7_dir
        self.images = images

    def __missing__(self, name: str) -> Pruner:
        self[name] = _pruner(self.yolov7_dir, name, self.images)
        return self[name]


@pytest.fixture(scope="module")
def pruners(yolov7_dir: Path, images: torch.Tensor) -> dict[str, Pruner]:
    """One traced Pruner per configuration, with the reference images as calibration batches."""
    return _PrunerCache(yolov7_dir, images)


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_structure_traced(pruners: dict[str, Pruner], name: str) -> None:
    structure = pruners[name].structure
    head_index = len(pruners[name].model.model) - 1

    assert len(structure.layers) == EXPECTED_LAYERS[name]
    assert structure.output_modules == tuple(f"model.{head_index}.m.{level}" for level in range(3))
    assert structure.output_module == structure.output_modules[0]
    assert not set(structure.output_modules) & set(structure.layer_names)
    assert structure.dense_macs == count_macs(pruners[name].model, INPUT_SHAPE)


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_uniform_policy_prunes(pruners: dict[str, Pruner], images: torch.Tensor, name: str) -> None:
    pruner = pruners[name]
    policy = pruner.uniform_policy(macs_target=MACS_TARGET, round_to=8)
    pruned = pruner.apply(policy)

    exact = count_macs(pruned, INPUT_SHAPE)
    estimated, _ = estimate_cost(pruner.structure, policy.pruning_ratios, round_to=8)
    assert abs(estimated - exact) <= 0.005 * exact
    assert abs(exact / pruner.structure.dense_macs - MACS_TARGET) < 0.05
    assert _outputs(pruned, images).shape == _outputs(pruner.model, images).shape

    outputs = set(pruner.structure.output_modules)
    dense_modules = dict(pruner.model.named_modules())
    for module_name, module in pruned.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module_name in outputs:
            assert module.out_channels == dense_modules[module_name].out_channels
        else:
            assert module.out_channels % 8 == 0, module_name


def test_implicit_layers_shrink(pruners: dict[str, Pruner]) -> None:
    pruner = pruners["yolov7"]
    pruned = pruner.apply(pruner.uniform_policy(macs_target=MACS_TARGET))
    head = pruned.head
    assert isinstance(pruned, YOLOv7)

    implicit_layers = [m for m in head.modules() if isinstance(m, (ImplicitA, ImplicitM))]
    assert implicit_layers
    for level, conv in enumerate(head.m):
        assert head.ia[level].channel == head.ia[level].implicit.shape[1] == conv.in_channels
        assert head.im[level].channel == head.im[level].implicit.shape[1] == conv.out_channels
    dense_head = pruner.model.head
    assert any(conv.in_channels < dense.in_channels for conv, dense in zip(head.m, dense_head.m, strict=True))


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_zero_policy_is_identity(pruners: dict[str, Pruner], images: torch.Tensor, name: str) -> None:
    pruner = pruners[name]
    policy = pruner.make_policy([0.0] * len(pruner.structure.layers))
    pruned = pruner.apply(policy)
    assert torch.equal(_outputs(pruned, images), _outputs(pruner.model, images))


@pytest.mark.parametrize("criterion", ["l1", "l2", "lamp", "fpgm", "bn_scale", "apoz"])
def test_criteria_prune_tiny(pruners: dict[str, Pruner], images: torch.Tensor, criterion: str) -> None:
    pruner = pruners["yolov7-tiny"]
    policy = pruner.uniform_policy(macs_target=MACS_TARGET, criterion=criterion)
    pruned = pruner.apply(policy)

    scores = pruner.scores(criterion)
    assert set(scores) == set(pruner.structure.layer_names)
    assert all(torch.isfinite(score).all() for score in scores.values())
    assert abs(count_macs(pruned, INPUT_SHAPE) / pruner.structure.dense_macs - MACS_TARGET) < 0.05
    assert _outputs(pruned, images).shape == _outputs(pruner.model, images).shape


def test_saved_model_reloads(
    yolov7_dir: Path, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry rebuilds a user model from "module:factory". Pytest puts this
    # directory on the import path, so the factory of this module is importable.
    monkeypatch.setenv(CONFIG_ENV_VAR, str(yolov7_dir / "yolov7-tiny.yaml"))
    pruner = _pruner(yolov7_dir, "yolov7-tiny", architecture=f"{__name__}:build_configured_yolov7")
    policy = pruner.uniform_policy(macs_target=MACS_TARGET)
    pruned = pruner.apply(policy)
    record = pruned_model_record(
        pruned,
        architecture=pruner.loaded.architecture,
        input_shape=INPUT_SHAPE,
        num_classes=80,
        normalization=pruner.loaded.normalization,
        dropped_blocks=[],
        policy=policy.to_dict(),
    )
    path = tmp_path / "tiny-pruned.pt"
    save_pruned_model(path, record)

    torch.load(path, weights_only=True)
    loaded = load_pruned_model(path)
    assert torch.equal(_outputs(loaded.model, images), _outputs(pruned, images))


@pytest.mark.parametrize("declared", [[], ["missing"]])
def test_invalid_output_modules_rejected(declared: list[str]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    setattr(model, OUTPUT_MODULES_ATTRIBUTE, declared)
    with pytest.raises(InputError, match=OUTPUT_MODULES_ATTRIBUTE):
        analyze_model(model, (3, 16, 16), architecture="two-convs")


def test_declared_output_modules_kept_whole() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    setattr(model, OUTPUT_MODULES_ATTRIBUTE, ["2"])
    structure = analyze_model(model, (3, 16, 16), architecture="two-convs")
    assert structure.output_modules == ("2",)
    assert structure.layer_names == ["0"]
