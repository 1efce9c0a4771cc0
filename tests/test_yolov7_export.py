"""Export of dense and pruned YOLOv7 models as a model YAML plus state_dict, rebuilt and compared.

Every round trip writes the exported YAML, rebuilds it with ``build_yolov7``, loads the
exported state_dict strictly and requires eval outputs on the reference images to be
exactly equal (``torch.equal``) to the exported model's. Batch-norm statistics and
affine parameters are randomised first, so a misplaced or mismatched weight changes
the outputs.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rl_pruner.data import Normalization
from rl_pruner.engine.pruner import Pruner
from rl_pruner.errors import ConfigError
from rl_pruner.models.registry import LoadedModel
from rl_pruner.models.yolov7 import SPPCSPC, RepConv, YOLOv7, build_yolov7, load_yolov7_config
from rl_pruner.models.yolov7.export import export_yolov7

IMAGE_SIZE = 160
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
MACS_TARGET = 0.5
CONFIGS = ("yolov7-tiny", "yolov7")
# yolov7.yaml's plain round trips are in the slow suite; its mixed-policy round trip and
# SPPCSPC expansion stay in the default one.
SLOW_ON_YOLOV7 = ("yolov7-tiny", pytest.param("yolov7", marks=pytest.mark.slow))
# An SPPCSPC with three pooling windows becomes 12 rows: one row replaced by 12.
EXTRA_ROWS_PER_SPPCSPC = 11


pytestmark = pytest.mark.usefixtures("two_torch_threads")

@pytest.fixture(scope="module")
def images(yolov7_images: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The reference photographs at the test input size."""
    return yolov7_images(IMAGE_SIZE)

def _randomise_batch_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)


class _PrunerCache(dict):
    """Builds and traces each configuration on first use (yolov7.yaml takes about 10 s)."""

    def __init__(self, yolov7_dir: Path) -> None:
        super().__init__()
        self.yolov7_dir = yolov7_dir

    def __missing__(self, name: str) -> Pruner:
        torch.manual_seed(0)
        model = build_yolov7(self.yolov7_dir / f"{name}.yaml")
        _randomise_batch_norms(model)
        loaded = LoadedModel(
            architecture=name,
            model=model.eval(),
            input_shape=INPUT_SHAPE,
            normalization=Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
            num_classes=80,
        )
        self[name] = Pruner(loaded)
        return self[name]


@pytest.fixture(scope="module")
def pruners(yolov7_dir: Path) -> dict[str, Pruner]:
    """One traced Pruner per configuration. Its ``model`` is the dense model with random BN statistics."""
    return _PrunerCache(yolov7_dir)


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def _export_and_rebuild(model: YOLOv7, config: Path, directory: Path) -> tuple[YOLOv7, Path]:
    text, state_dict = export_yolov7(model, config)
    path = directory / f"exported-{config.name}"
    path.write_text(text, encoding="utf-8")
    rebuilt = build_yolov7(path)
    rebuilt.load_state_dict(state_dict, strict=True)
    return rebuilt.eval(), path


def _raw_rows(path: Path) -> list[list]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return raw["backbone"] + raw["head"]


def _n_sppcspc(model: YOLOv7) -> int:
    return sum(isinstance(layer, SPPCSPC) for layer in model.model)


def _assert_round_trip(
    model: YOLOv7, config: Path, directory: Path, images: torch.Tensor, n_added_parameters: int = 0
) -> Path:
    rebuilt, path = _export_and_rebuild(model, config, directory)
    n_kept = len(model.model) - len(model.dropped_layers)
    expected_layers = n_kept + EXTRA_ROWS_PER_SPPCSPC * _n_sppcspc(model)

    assert len(load_yolov7_config(path).layers) == expected_layers
    assert len(rebuilt.model) == expected_layers
    assert rebuilt.dropped_layers == ()
    n_parameters = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in rebuilt.parameters()) == n_parameters + n_added_parameters
    assert torch.equal(_outputs(rebuilt, images), _outputs(model, images))
    return path


@pytest.mark.parametrize("name", SLOW_ON_YOLOV7)
def test_dense_round_trip(
    pruners: dict[str, Pruner], yolov7_dir: Path, images: torch.Tensor, tmp_path: Path, name: str
) -> None:
    config = yolov7_dir / f"{name}.yaml"
    path = _assert_round_trip(pruners[name].model, config, tmp_path, images)

    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    original = yaml.safe_load(config.read_text(encoding="utf-8"))
    assert text.startswith(f"# Written by rl-pruner from {config}.")
    assert raw["width_multiple"] == 1.0
    assert raw["depth_multiple"] == 1.0
    assert raw["nc"] == original["nc"]
    assert raw["anchors"] == original["anchors"]


def test_dense_tiny_rows_unchanged(pruners: dict[str, Pruner], yolov7_dir: Path, tmp_path: Path) -> None:
    # yolov7-tiny has no SPPCSPC and width_multiple 1.0, so every row comes back as written.
    config = yolov7_dir / "yolov7-tiny.yaml"
    text, _ = export_yolov7(pruners["yolov7-tiny"].model, config)
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")

    assert _raw_rows(path) == _raw_rows(config)


def test_sppcspc_expanded(pruners: dict[str, Pruner], yolov7_dir: Path, tmp_path: Path) -> None:
    config = yolov7_dir / "yolov7.yaml"
    model = pruners["yolov7"].model
    text, state_dict = export_yolov7(model, config)
    path = tmp_path / "yolov7.yaml"
    path.write_text(text, encoding="utf-8")
    rows = _raw_rows(path)
    original = _raw_rows(config)

    # yolov7.yaml layer 51 is [-1, 1, SPPCSPC, [512]], with hidden width 512.
    assert original[51] == [-1, 1, "SPPCSPC", [512]]
    assert rows[:51] == original[:51]
    assert rows[51:63] == [
        [-1, 1, "Conv", [512, 1, 1]],  # cv1
        [-1, 1, "Conv", [512, 3, 1]],  # cv3
        [-1, 1, "Conv", [512, 1, 1]],  # cv4
        [-1, 1, "SP", [5]],
        [-2, 1, "SP", [9]],
        [-3, 1, "SP", [13]],
        [[-4, -3, -2, -1], 1, "Concat", [1]],  # cv4 and its pools, as SPPCSPC.forward orders them
        [-1, 1, "Conv", [512, 1, 1]],  # cv5
        [-1, 1, "Conv", [512, 3, 1]],  # cv6
        [-10, 1, "Conv", [512, 1, 1]],  # cv2, reading layer 50
        [[-2, -1], 1, "Concat", [1]],  # cv6 then cv2
        [-1, 1, "Conv", [512, 1, 1]],  # cv7
    ]
    # Later rows: relative entries unchanged, absolute entries past layer 51 shifted.
    assert rows[63] == original[52]
    assert rows[65] == [37, 1, "Conv", [256, 1, 1]]
    assert rows[-1] == [[113, 114, 115], 1, "IDetect", ["nc", "anchors"]]

    for old, new in [("cv1", 51), ("cv3", 52), ("cv4", 53), ("cv5", 58), ("cv6", 59), ("cv2", 60), ("cv7", 62)]:
        assert torch.equal(state_dict[f"model.{new}.conv.weight"], getattr(model.model[51], old).conv.weight)
        assert torch.equal(state_dict[f"model.{new}.bn.running_var"], getattr(model.model[51], old).bn.running_var)


@pytest.mark.parametrize("name", SLOW_ON_YOLOV7)
def test_uniform_pruned_round_trip(
    pruners: dict[str, Pruner], yolov7_dir: Path, images: torch.Tensor, tmp_path: Path, name: str
) -> None:
    pruner = pruners[name]
    pruned = pruner.apply(pruner.uniform_policy(macs_target=MACS_TARGET))
    path = _assert_round_trip(pruned, yolov7_dir / f"{name}.yaml", tmp_path, images)

    widths = [row[3][0] for row in _raw_rows(path) if row[2] == "Conv"]
    assert sum(widths) < sum(row[3][0] for row in _raw_rows(yolov7_dir / f"{name}.yaml") if row[2] == "Conv")
    assert all(width % 8 == 0 for width in widths)


@pytest.mark.parametrize("name", CONFIGS)
def test_mixed_policy_round_trip(
    pruners: dict[str, Pruner], yolov7_dir: Path, images: torch.Tensor, tmp_path: Path, name: str
) -> None:
    pruner = pruners[name]
    rng = random.Random(0)
    ratios = {layer: rng.uniform(0.0, 0.6) for layer in pruner.structure.layer_names}
    dropped = pruner.structure.block_names[::2]
    pruned = pruner.apply(pruner.make_policy(ratios, dropped))
    assert isinstance(pruned, YOLOv7)
    assert pruned.dropped_layers

    path = _assert_round_trip(pruned, yolov7_dir / f"{name}.yaml", tmp_path, images)

    # Each dropped tail removes one input from its Concat, and each expanded SPPCSPC
    # adds two Concat rows with 4 and 2 inputs.
    def n_concat_inputs(rows: list[list]) -> int:
        return sum(len(row[0]) for row in rows if row[2] == "Concat")

    original = _raw_rows(yolov7_dir / f"{name}.yaml")
    expected = n_concat_inputs(original) - len(dropped) + 6 * _n_sppcspc(pruned)
    assert n_concat_inputs(_raw_rows(path)) == expected


def test_repconv_gains_zero_identity(
    pruners: dict[str, Pruner], yolov7_dir: Path, images: torch.Tensor, tmp_path: Path
) -> None:
    # RepConv layer 102 maps layer 75's 128 channels to 256. Pruning half of its output
    # makes the widths equal, so the rebuilt RepConv has an identity branch that the
    # pruned one lacks. The export sets that branch to add zero.
    pruner = pruners["yolov7"]
    ratios = {layer.name: 0.0 for layer in pruner.structure.layers}
    repconv_layer = next(
        layer.name for layer in pruner.structure.layers
        if any(member.module_name == "model.102.rbr_dense.0" and member.dimension == "out" for member in layer.members)
    )
    ratios[repconv_layer] = 0.5
    pruned = pruner.apply(pruner.make_policy(ratios))
    repconv = pruned.model[102]
    assert isinstance(repconv, RepConv)
    assert repconv.rbr_dense[0].weight.shape[:2] == (128, 128)
    assert repconv.rbr_identity is None

    _, state_dict = export_yolov7(pruned, yolov7_dir / "yolov7.yaml")
    assert torch.equal(state_dict["model.113.rbr_identity.weight"], torch.zeros(128))
    # The identity batch norm adds a weight and a bias per channel.
    _assert_round_trip(pruned, yolov7_dir / "yolov7.yaml", tmp_path, images, n_added_parameters=2 * 128)


def test_width_not_multiple_of_8_rejected(pruners: dict[str, Pruner], yolov7_dir: Path) -> None:
    pruner = pruners["yolov7-tiny"]
    pruned = pruner.apply(pruner.uniform_policy(ratio=0.3, round_to=1))
    widths = [module.out_channels for module in pruned.modules() if isinstance(module, nn.Conv2d)]
    assert any(width % 8 for width in widths[:-3])  # the last three are the head's outputs

    with pytest.raises(ConfigError, match=r"layer \d+ \(Conv\) has \d+ output channels") as error:
        export_yolov7(pruned, yolov7_dir / "yolov7-tiny.yaml")
    assert "round_to=8" in str(error.value)


def test_fused_model_rejected(pruners: dict[str, Pruner], yolov7_dir: Path) -> None:
    fused = copy.deepcopy(pruners["yolov7-tiny"].model).fuse()

    with pytest.raises(ConfigError, match="before calling fuse"):
        export_yolov7(fused, yolov7_dir / "yolov7-tiny.yaml")


def test_config_text_accepted(pruners: dict[str, Pruner], yolov7_dir: Path) -> None:
    config = yolov7_dir / "yolov7-tiny.yaml"
    from_path, _ = export_yolov7(pruners["yolov7-tiny"].model, config)
    from_text, state_dict = export_yolov7(pruners["yolov7-tiny"].model, config.read_text(encoding="utf-8"))

    assert from_text.splitlines()[0] == "# Written by rl-pruner from model configuration text."
    assert from_text.splitlines()[1:] == from_path.splitlines()[1:]
    assert set(state_dict) == set(pruners["yolov7-tiny"].model.state_dict())


def test_other_config_rejected(pruners: dict[str, Pruner], yolov7_dir: Path) -> None:
    with pytest.raises(ConfigError, match="Pass the configuration the dense model was built from"):
        export_yolov7(pruners["yolov7-tiny"].model, yolov7_dir / "yolov7.yaml")
