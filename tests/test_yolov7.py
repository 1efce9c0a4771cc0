"""YOLOv7 models: safe configuration loading, architecture size, fusion, real-image forward."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from PIL import Image
from torch import nn

from rl_pruner.detection.nms import non_max_suppression
from rl_pruner.engine.macs import count_macs, count_params
from rl_pruner.errors import ConfigError
from rl_pruner.models.yolov7 import (
    ActivationSpec,
    IDetect,
    RepConv,
    YOLOv7,
    build_yolov7,
    load_yolov7_config,
)
from rl_pruner.models.yolov7.pruners import (
    YOLOV7_PRUNERS,
    head_output_convs,
    trace_forward,
)

# Sizes with RepConv and the implicit layers fused (and batch norms folded), 80 classes,
# as the official YOLOv7 code reports them: parameters, and GFLOPs at 640x640 with one
# multiply-accumulate counted as two operations.
PUBLISHED_SIZES = {
    "yolov7.yaml": (36_905_341, 104.7),
    "yolov7-tiny.yaml": (6_219_709, 13.7),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Run this module's forward passes on one CPU thread, restoring the count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(yolov7_dir: Path) -> YOLOv7:
    torch.manual_seed(0)
    return build_yolov7(yolov7_dir / "yolov7-tiny.yaml").eval()


def _randomize_statistics(model: nn.Module, seed: int) -> None:
    """Give every batch norm and implicit layer values far from their identity defaults."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.2, 0.2)
                uniform(module.running_mean, -0.2, 0.2)
                uniform(module.running_var, 0.5, 2.0)
            elif isinstance(module, IDetect) and module.ia is not None and module.im is not None:
                for layer in module.ia:
                    uniform(layer.implicit, -0.3, 0.3)
                for layer in module.im:
                    uniform(layer.implicit, 0.7, 1.3)


def _write_config(
    tmp_path: Path,
    layer: str,
    head: str = "[[-1], 1, IDetect, [nc, anchors]]",
    width_multiple: float = 1.0,
) -> Path:
    """A small configuration: ``layer``, a strided Conv, then ``head``."""
    text = textwrap.dedent(f"""\
        nc: 2
        depth_multiple: 1.0
        width_multiple: {width_multiple}
        anchors:
          - [10,13, 16,30, 33,23]
        backbone:
          [{layer},
           [-1, 1, Conv, [16, 3, 2]],
          ]
        head:
          [{head}]
        """)
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


# --- configuration loading ---


def test_config_resolves_arguments(yolov7_dir: Path) -> None:
    config = load_yolov7_config(yolov7_dir / "yolov7-tiny.yaml")
    assert config.num_classes == 80
    assert len(config.layers) == 78
    assert config.layers[0].args == (32, 3, 2, None, 1, ActivationSpec("nn.LeakyReLU", (0.1,)))
    upsample = next(layer for layer in config.layers if layer.module == "nn.Upsample")
    assert upsample.args == (None, 2, "nearest")
    head = config.layers[-1]
    assert head.sources == (74, 75, 76)
    assert head.args[0] == 80
    assert head.args[1] == [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def test_config_num_classes_override(yolov7_dir: Path) -> None:
    config = load_yolov7_config(yolov7_dir / "yolov7.yaml", num_classes=3)
    assert config.num_classes == 3
    assert config.layers[-1].args[0] == 3


def test_config_relative_sources(yolov7_dir: Path) -> None:
    config = load_yolov7_config(yolov7_dir / "yolov7.yaml")
    assert config.layers[0].sources == (-1,)
    assert config.layers[10].sources == (9, 7, 5, 4)
    assert config.layers[54].sources == (37,)


def test_malicious_call_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "config-code-ran"
    path = _write_config(tmp_path, f"[-1, 1, Conv, [8, 3, 1, None, 1, __import__('os').system('touch {marker}')]]")

    with pytest.raises(ConfigError) as raised:
        build_yolov7(path)

    message = str(raised.value)
    assert "layer 0" in message
    assert "__import__('os').system" in message
    assert not marker.exists()


@pytest.mark.parametrize("argument", [
    "os.system('true')",
    "nn.Module.__subclasses__()",
    "(lambda: 1)()",
    "open('/etc/passwd')",
    "nn.LeakyReLU(__import__('os'))",
    "nn.LeakyReLU(x=0.1)",
    "[x for x in (1, 2)]",
    "nc.__class__",
    "anchors[0]",
    "1 + 2",
])
def test_unsafe_argument_rejected(tmp_path: Path, argument: str) -> None:
    path = _write_config(tmp_path, f'[-1, 1, Conv, [8, 3, 1, None, 1, "{argument}"]]')

    with pytest.raises(ConfigError, match="layer 0"):
        load_yolov7_config(path)


def test_unknown_module_rejected(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "[-1, 1, __import__, ['os']]")

    with pytest.raises(ConfigError, match="unknown module '__import__'"):
        build_yolov7(path)


@pytest.mark.parametrize(("text", "expected"), [
    ("nc: [1\n", "not valid YAML"),
    ("- 1\n- 2\n", "mapping at the top level"),
    ("nc: 80\n", "missing key"),
])
def test_invalid_yaml_rejected(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=expected):
        load_yolov7_config(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_yolov7_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("layer", "expected"), [
    ("[5, 1, Conv, [8, 3, 1]]", "does not name an earlier layer"),
    ("[-1, 0, Conv, [8, 3, 1]]", "number must be a positive integer"),
    ("[-1, 1, Conv]", r"expected \[from, number, module, args\]"),
    ("[-1, 1, Conv, [8, 3, 1, None, 1, True, 7]]", "do not fit the module"),
])
def test_malformed_layer_rejected(tmp_path: Path, layer: str, expected: str) -> None:
    path = _write_config(tmp_path, layer)

    with pytest.raises(ConfigError, match=expected):
        build_yolov7(path)


def test_head_required(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "[-1, 1, Conv, [8, 3, 1]]", head="[-1, 1, MP, []]")

    with pytest.raises(ConfigError, match="must be a detection head"):
        build_yolov7(path)


def test_width_multiple_scales_channels(tmp_path: Path) -> None:
    # 8 x 0.5 = 4 and 16 x 0.5 = 8, each rounded up to a multiple of 8.
    path = _write_config(tmp_path, "[-1, 1, Conv, [8, 3, 1]]", width_multiple=0.5)

    model = build_yolov7(path)

    assert model.model[0].conv.out_channels == 8
    assert model.model[1].conv.out_channels == 8
    assert model.head.m[0].in_channels == 8
    assert model.head.stride.tolist() == [2.0]


# --- architecture ---


@pytest.mark.parametrize("config_name", sorted(PUBLISHED_SIZES))
def test_fused_size_matches_official(yolov7_dir: Path, config_name: str) -> None:
    expected_params, expected_gflops = PUBLISHED_SIZES[config_name]
    model = build_yolov7(yolov7_dir / config_name, num_classes=80).fuse()

    assert count_params(model) == expected_params

    # On the meta device the forward pass computes shapes only, so counting is instant.
    gflops = 2 * count_macs(model.to("meta"), (3, 640, 640)) / 1e9
    assert gflops == pytest.approx(expected_gflops, rel=0.01)


def test_official_parameter_names(yolov7_dir: Path) -> None:
    keys = set(build_yolov7(yolov7_dir / "yolov7.yaml").state_dict())

    for key in [
        "model.0.conv.weight",
        "model.0.bn.running_mean",
        "model.0.bn.num_batches_tracked",
        "model.51.cv7.bn.weight",
        "model.102.rbr_dense.0.weight",
        "model.102.rbr_dense.1.running_var",
        "model.102.rbr_1x1.0.weight",
        "model.104.rbr_1x1.1.bias",
        "model.105.m.0.weight",
        "model.105.m.2.bias",
        "model.105.ia.0.implicit",
        "model.105.im.2.implicit",
        "model.105.anchors",
        "model.105.anchor_grid",
    ]:
        assert key in keys, key
    assert not any(key.endswith(".stride") for key in keys)


def test_fused_parameter_names(tiny: YOLOv7) -> None:
    keys = set(copy.deepcopy(tiny).fuse().state_dict())

    assert "model.0.conv.bias" in keys
    assert "model.0.bn.weight" not in keys
    assert "model.77.m.0.weight" in keys
    assert not any(".ia." in key or ".im." in key for key in keys)


def test_head_strides_and_anchors(tiny: YOLOv7) -> None:
    head = tiny.head

    assert head.stride.tolist() == [8.0, 16.0, 32.0]
    assert head.anchor_grid[2, 0, 2, 0, 0].tolist() == [373.0, 326.0]
    assert head.anchors[2, 2].tolist() == pytest.approx([373 / 32, 326 / 32])


# --- fusion ---


@pytest.mark.parametrize(("config_name", "size"), [("yolov7-tiny.yaml", 160), ("yolov7.yaml", 128)])
def test_fusion_preserves_outputs(yolov7_dir: Path, config_name: str, size: int) -> None:
    torch.manual_seed(1)
    model = build_yolov7(yolov7_dir / config_name).eval()
    _randomize_statistics(model, seed=2)
    fused = copy.deepcopy(model).fuse()
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        expected = model(images)
        actual = fused(images)

    # Boxes are in pixels (up to a few hundred), so float32 rounding is relative.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fusion_exact_in_float64(yolov7_dir: Path) -> None:
    torch.manual_seed(4)
    model = build_yolov7(yolov7_dir / "yolov7-tiny.yaml").double().eval()
    _randomize_statistics(model, seed=5)
    fused = copy.deepcopy(model).fuse()
    images = torch.rand(1, 3, 96, 96, dtype=torch.float64)

    with torch.no_grad():
        difference = (fused(images) - model(images)).abs().max().item()

    assert difference < 1e-9


@pytest.mark.parametrize(("channels_in", "channels_out", "stride", "groups"), [
    (16, 16, 1, 1),  # with the identity branch
    (16, 16, 1, 4),  # grouped, with the identity branch
    (16, 32, 1, 1),
    (16, 16, 2, 1),
])
def test_repconv_fusion(channels_in: int, channels_out: int, stride: int, groups: int) -> None:
    torch.manual_seed(6)
    block = RepConv(channels_in, channels_out, 3, stride, g=groups).double().eval()
    _randomize_statistics(block, seed=7)
    inputs = torch.randn(2, channels_in, 12, 12, dtype=torch.float64)

    with torch.no_grad():
        expected = block(inputs)
        block.fuse()
        actual = block(inputs)

    assert block.rbr_dense is None
    assert block.rbr_1x1 is None
    assert block.rbr_identity is None
    assert block.rbr_reparam is not None
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# --- forward pass on a real image ---


def _load_image(path: Path, size: int) -> torch.Tensor:
    """RGB image resized to size x size, as a (1, 3, size, size) tensor in [0, 1]."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def test_forward_on_real_image(yolov7_dir: Path, tiny: YOLOv7) -> None:
    size = 320
    images = _load_image(yolov7_dir / "horses.jpg", size)
    n_predictions = 3 * sum((size // stride) ** 2 for stride in (8, 16, 32))

    with torch.no_grad():
        predictions = tiny(images)

    assert predictions.shape == (1, n_predictions, 85)
    assert torch.isfinite(predictions).all()
    assert predictions[..., 4:].min() >= 0.0
    assert predictions[..., 4:].max() <= 1.0
    detections = non_max_suppression(predictions, conf_threshold=0.001)
    assert len(detections) == 1
    assert detections[0].shape[1] == 6


def test_training_mode_returns_level_maps(yolov7_dir: Path) -> None:
    model = build_yolov7(yolov7_dir / "yolov7.yaml", num_classes=3).train()
    images = _load_image(yolov7_dir / "horses.jpg", 320)

    with torch.no_grad():
        maps = model(images)

    assert [tuple(level.shape) for level in maps] == [
        (1, 3, 40, 40, 8),
        (1, 3, 20, 20, 8),
        (1, 3, 10, 10, 8),
    ]


# --- pruning ---


def test_implicit_layers_pruned_with_channels(yolov7_dir: Path) -> None:
    torch.manual_seed(8)
    model = build_yolov7(yolov7_dir / "yolov7-tiny.yaml").eval()
    head = model.head
    graph = tp.DependencyGraph().build_dependency(
        model, torch.zeros(1, 3, 64, 64), forward_fn=trace_forward, customized_pruners=dict(YOLOV7_PRUNERS)
    )
    feeding_conv = model.model[74].conv  # the 128 channels entering head level 0
    kept = [channel for channel in range(128) if channel % 4]
    expected_offset = head.ia[0].implicit[:, kept].clone()

    graph.get_pruning_group(feeding_conv, tp.prune_conv_out_channels, idxs=list(range(0, 128, 4))).prune()

    assert head.m[0].in_channels == 96
    assert head.ia[0].channel == 96
    torch.testing.assert_close(head.ia[0].implicit, expected_offset)
    assert [conv.out_channels for conv in head_output_convs(model)] == [255, 255, 255]
    with torch.no_grad():
        predictions = model(torch.rand(1, 3, 64, 64))
    assert predictions.shape == (1, 3 * (64 + 16 + 4), 85)
