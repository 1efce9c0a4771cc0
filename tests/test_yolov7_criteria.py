"""Every importance criterion on YOLOv7, the identity of a zero policy, and pruning a fused model.

The big configuration (``yolov7.yaml``) is traced once for the module, at 160x160 input,
with the two reference images as calibration batches. Its batch norms get random affine
parameters and running statistics first, so that ``bn_scale`` has no ties and fusion
folds non-trivial statistics.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import test_yolov7_pruning as pruning_tests
import torch
from test_yolov7_pruning import INPUT_SHAPE, MACS_TARGET, _pruner
from torch import nn

from rl_pruner.engine.apply import apply_policy
from rl_pruner.engine.estimate import estimate_cost
from rl_pruner.engine.importance import compute_importance
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.errors import InputError
from rl_pruner.models.registry import IDENTITY_NORMALIZATION, LoadedModel
from rl_pruner.models.yolov7 import YOLOv7, fuse_yolov7
from rl_pruner.models.yolov7.modules import Conv, RepConv
from rl_pruner.policy import CRITERIA, Policy

# A fixture shared with the pruning tests: pytest looks fixtures up among the module's attributes.
images = pruning_tests.images

pytestmark = pytest.mark.usefixtures("two_torch_threads")

# Tolerance on raw level maps (logits, not pixels), as a fraction of their largest magnitude (at least 1).
FUSION_TOLERANCE = 1e-4
# A RepConv's layer is named by its 3x3 branch, which fusion replaces with rbr_reparam.
REPCONV_ROOT_BEFORE, REPCONV_ROOT_AFTER = "rbr_dense.0", "rbr_reparam"


def _randomise_batchnorms(model: nn.Module, seed: int = 1) -> None:
    """Set every batch norm's scale, shift and running statistics to random values (variances in [0.5, 2])."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n_channels = module.num_features
                module.weight.copy_(torch.rand(n_channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n_channels, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n_channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n_channels, generator=generator) * 1.5 + 0.5)


@pytest.fixture(scope="module")
def yolov7_pruner(yolov7_dir: Path, images: torch.Tensor) -> Pruner:
    """The traced yolov7.yaml model with random batch-norm statistics. Scores are computed on first use."""
    pruner = _pruner(yolov7_dir, "yolov7", images)
    _randomise_batchnorms(pruner.model)
    return pruner


@pytest.fixture(scope="module")
def dense_output_shape(yolov7_pruner: Pruner, images: torch.Tensor) -> torch.Size:
    return _outputs(yolov7_pruner.model, images).shape


@pytest.fixture(scope="module")
def fully_fused_pruner(yolov7_pruner: Pruner) -> Pruner:
    """A traced copy of the yolov7.yaml model with Conv, RepConv and the head's implicit layers fused."""
    return _fused_pruner(yolov7_pruner.model, "all")


@pytest.fixture(scope="module")
def tiny_pruner(yolov7_dir: Path, images: torch.Tensor) -> Pruner:
    return _pruner(yolov7_dir, "yolov7-tiny", images)


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def _level_maps(model: YOLOv7, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval().level_maps(images)


def _max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))


def _fused_pruner(dense: YOLOv7, fuse: str) -> Pruner:
    """Trace a fused copy of ``dense``: ``fuse`` is "convolutions" (Conv and RepConv) or "all"."""
    fused = copy.deepcopy(dense)
    if fuse == "all":
        fuse_yolov7(fused)
    else:
        for module in fused.modules():
            if isinstance(module, (Conv, RepConv)):
                module.fuse()
    loaded = LoadedModel(
        architecture=f"yolov7-fused-{fuse}",
        model=fused,
        input_shape=INPUT_SHAPE,
        normalization=IDENTITY_NORMALIZATION,
        num_classes=80,
    )
    return Pruner(loaded)


def _transfer_policy(source: Pruner, target: Pruner, policy: Policy) -> tuple[Policy, dict[str, torch.Tensor]]:
    """The same per-layer ratios and l1 scores as ``policy``, keyed by the fused model's layer names."""
    source_layers, target_layers = source.structure.layers, target.structure.layers
    ratios = [policy.pruning_ratios[layer.name] for layer in source_layers]
    scores = source.scores(policy.criterion)
    target_scores = {
        target_layer.name: scores[source_layer.name]
        for source_layer, target_layer in zip(source_layers, target_layers, strict=True)
    }
    target_policy = target.make_policy(ratios, criterion=policy.criterion, round_to=policy.round_to)
    return target_policy, target_scores


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_prunes_yolov7(
    yolov7_pruner: Pruner, images: torch.Tensor, dense_output_shape: torch.Size, criterion: str
) -> None:
    pruner = yolov7_pruner
    policy = pruner.uniform_policy(macs_target=MACS_TARGET, criterion=criterion)
    pruned = pruner.apply(policy)

    scores = pruner.scores(criterion)
    assert set(scores) == set(pruner.structure.layer_names)
    assert all(torch.isfinite(score).all() for score in scores.values())
    assert _outputs(pruned, images).shape == dense_output_shape

    exact = count_macs(pruned, INPUT_SHAPE)
    estimated, _ = estimate_cost(pruner.structure, policy.pruning_ratios, round_to=policy.round_to)
    assert abs(estimated - exact) <= 0.005 * exact
    assert abs(exact / pruner.structure.dense_macs - MACS_TARGET) < 0.05

    head, dense_head = pruned.head, pruner.model.head
    for level, conv in enumerate(head.m):
        assert head.ia[level].channel == head.ia[level].implicit.shape[1] == conv.in_channels
        assert head.im[level].channel == head.im[level].implicit.shape[1] == conv.out_channels
    assert any(conv.in_channels < dense.in_channels for conv, dense in zip(head.m, dense_head.m, strict=True))


def test_taylor_scores_vary(yolov7_pruner: Pruner) -> None:
    scores = yolov7_pruner.scores("taylor")
    assert all(float(score.max()) > float(score.min()) for score in scores.values())
    assert all(parameter.grad is None for parameter in yolov7_pruner.model.parameters())


def test_calibration_loss_has_gradient(tiny_pruner: Pruner, images: torch.Tensor) -> None:
    model = copy.deepcopy(tiny_pruner.model)
    loss = model.rl_pruner_calibration_loss(images, torch.zeros(len(images), dtype=torch.long))
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert model.model[0].conv.weight.grad is not None
    assert float(model.model[0].conv.weight.grad.abs().sum()) > 0.0


def test_calibration_loss_checked() -> None:
    class VectorLoss(nn.Sequential):
        def rl_pruner_calibration_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return self(images).flatten()

    model = VectorLoss(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    structure = Pruner(LoadedModel(
        architecture="vector-loss", model=model, input_shape=(3, 8, 8), normalization=IDENTITY_NORMALIZATION, num_classes=4
    )).structure
    batches = [(torch.rand(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))]
    with pytest.raises(InputError, match="tensor of shape"):
        compute_importance(model, structure, "taylor", batches)


@pytest.mark.parametrize("name", ["yolov7", "yolov7-tiny"])
def test_zero_policy_bit_identical(
    yolov7_pruner: Pruner, tiny_pruner: Pruner, images: torch.Tensor, name: str
) -> None:
    pruner = yolov7_pruner if name == "yolov7" else tiny_pruner
    pruned = pruner.apply(pruner.make_policy([0.0] * len(pruner.structure.layers)))
    assert torch.equal(_outputs(pruned, images), _outputs(pruner.model, images))


@pytest.mark.slow
def test_fused_layers_match_unfused(yolov7_pruner: Pruner, fully_fused_pruner: Pruner) -> None:
    layers, fused_layers = yolov7_pruner.structure.layers, fully_fused_pruner.structure.layers

    assert any(REPCONV_ROOT_BEFORE in layer.name for layer in layers)
    assert len(fused_layers) == len(layers)
    for layer, fused_layer in zip(layers, fused_layers, strict=True):
        assert fused_layer.name == layer.name.replace(REPCONV_ROOT_BEFORE, REPCONV_ROOT_AFTER)
        assert fused_layer.channels == layer.channels


def test_fusion_order_repconv(yolov7_pruner: Pruner, images: torch.Tensor) -> None:
    """Fusing Conv and RepConv before or after pruning gives the same raw level maps.

    The head stays unfused here, because fusing it first also shifts the output biases
    (the next test measures that shift).
    """
    policy = yolov7_pruner.uniform_policy(macs_target=MACS_TARGET, criterion="l1")
    pruned_then_fused = fuse_yolov7(yolov7_pruner.apply(policy))

    fused = _fused_pruner(yolov7_pruner.model, "convolutions")
    fused_policy, fused_scores = _transfer_policy(yolov7_pruner, fused, policy)
    fused_then_pruned = fuse_yolov7(apply_policy(fused.model, fused.structure, fused_policy, fused_scores))
    assert all(module.rbr_reparam is not None for module in fused.model.modules() if isinstance(module, RepConv))

    expected = _level_maps(pruned_then_fused, images)
    scale = max(1.0, max(float(level.abs().max()) for level in expected))
    assert _max_difference(_level_maps(fused_then_pruned, images), expected) <= FUSION_TOLERANCE * scale


@pytest.mark.slow
def test_fusion_order_implicit_offsets(
    yolov7_pruner: Pruner, fully_fused_pruner: Pruner, images: torch.Tensor
) -> None:
    """Fusing the whole model first keeps the implicit offsets of removed head inputs.

    Fusion folds ImplicitA's offset ``a`` into the output convolution's bias as ``W a``
    (scaled by ImplicitM). Pruning afterwards removes input channels from ``W`` but not
    their share of that bias, while pruning first removes both. So the two orders
    differ by exactly that share, a constant per output channel.
    """
    policy = yolov7_pruner.uniform_policy(macs_target=MACS_TARGET, criterion="l1")
    pruned = yolov7_pruner.apply(policy)
    dense_head, pruned_head = yolov7_pruner.model.head, pruned.head
    pruned_then_fused = fuse_yolov7(copy.deepcopy(pruned))

    fused = fully_fused_pruner
    fused_policy, fused_scores = _transfer_policy(yolov7_pruner, fused, policy)
    fused_then_pruned = apply_policy(fused.model, fused.structure, fused_policy, fused_scores)
    assert fused.model.head.ia is None

    expected = _level_maps(pruned_then_fused, images)
    scale = max(1.0, max(float(level.abs().max()) for level in expected))
    for level, (actual, reference) in enumerate(zip(_level_maps(fused_then_pruned, images), expected, strict=True)):
        dense_offset = dense_head.m[level].weight.flatten(1) @ dense_head.ia[level].implicit.flatten()
        kept_offset = pruned_head.m[level].weight.flatten(1) @ pruned_head.ia[level].implicit.flatten()
        removed_share = (dense_head.im[level].implicit.flatten() * (dense_offset - kept_offset)).detach()
        shift = removed_share.view(1, dense_head.na, 1, 1, dense_head.no)
        assert float(removed_share.abs().max()) > FUSION_TOLERANCE * scale
        assert float((actual - reference - shift).abs().max()) <= FUSION_TOLERANCE * scale
