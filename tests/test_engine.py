"""Pruning engine: structure, shortcut handling, estimator, criteria, serialization."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from rl_pruner.engine.apply import apply_policy
from rl_pruner.engine.batchnorm import reestimate_batchnorm
from rl_pruner.engine.estimate import estimate_cost, kept_channels_for_ratio
from rl_pruner.engine.macs import count_macs, count_params
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import load_pruned_model, pruned_model_record, save_pruned_model
from rl_pruner.engine.shortcut_pruner import CUSTOMIZED_PRUNERS, ZeroPadShortcutPruner
from rl_pruner.engine.structure import analyze_model
from rl_pruner.models.cifar_resnet import CIFAR_DEPTHS, ZeroPadShortcut
from rl_pruner.models.registry import load_model
from rl_pruner.policy import CRITERIA, Policy

torch.manual_seed(0)


def _random_policy(pruner: Pruner, rng: random.Random, round_to: int, n_dropped: int = 2):
    structure = pruner.structure
    ratios = {layer.name: rng.uniform(0.0, 0.8) for layer in structure.layers}
    dropped = rng.sample(structure.block_names, n_dropped)
    return pruner.make_policy(ratios, dropped, round_to=round_to)


@pytest.mark.parametrize(("channels", "ratio", "round_to", "kept"), [
    (64, 0.3, 8, 48), (64, 0.3, 1, 45), (16, 0.9, 8, 8), (16, 0.0, 8, 16),
    (10, 0.5, 8, 8), (10, 0.0, 8, 10), (10, 0.05, 8, 10), (10, 0.15, 8, 8), (3, 0.99, 1, 1), (64, 0.999, 8, 8),
])
def test_kept_channels_rounding(channels: int, ratio: float, round_to: int, kept: int) -> None:
    assert kept_channels_for_ratio(channels, ratio, round_to) == kept


def test_resnet50_reference_counts(resnet50: Pruner) -> None:
    structure = resnet50.structure
    assert structure.dense_params == 25_557_032
    assert abs(structure.dense_macs / 4.11e9 - 1) < 0.01
    assert count_macs(resnet50.model, (3, 224, 224)) == structure.dense_macs
    assert structure.output_module == "fc"
    # 16 bottlenecks, 4 of them with a downsample.
    assert len(structure.blocks) == 12


def test_cifar_structure_groups_residual_streams(resnet56: Pruner) -> None:
    names = resnet56.structure.layer_names
    # Stem plus 27 block-internal layers plus the residual streams of stages 2 and 3.
    assert len(names) == 30
    assert {"conv1", "layer2.0.conv2", "layer3.0.conv2"} <= set(names)
    assert resnet56.structure.layer("conv1").block is None
    assert resnet56.structure.layer("layer1.1.conv1").block == "layer1.1"
    assert len(resnet56.structure.blocks) == 25


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
def test_cifar_every_depth_and_ratio_prunes(depth: int) -> None:
    pruner = Pruner(load_model(f"cifar_resnet{depth}"))
    for ratio in (0.1, 0.5, 0.9):
        policy = pruner.make_policy([ratio] * len(pruner.structure.layers), round_to=1)
        pruned = pruner.apply(policy)
        out = pruned(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10), ratio
        estimated = estimate_cost(pruner.structure, policy.pruning_ratios, (), 1)
        assert estimated == (count_macs(pruned, (3, 32, 32)), count_params(pruned)), ratio


def test_torch_pruning_pruner_works_with_shortcut_handler() -> None:
    """Torch-Pruning's own pruner at 50 % gives a working model once the shortcut is registered."""
    model = load_model("cifar_resnet56").model
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[model.linear], customized_pruners=dict(CUSTOMIZED_PRUNERS),
    )
    pruner.step()
    assert model(example).shape == (1, 10)


def test_shortcut_pruning_matches_zeroed_dense() -> None:
    shortcut = ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    removed_in, removed_out = [0, 3, 15], [1, 8, 9, 20, 31]
    reference_input = x.clone()
    reference_input[:, removed_in] = 0
    keep_out = [c for c in range(32) if c not in removed_out]
    expected = shortcut(reference_input)[:, keep_out]

    handler = ZeroPadShortcutPruner()
    handler.prune_in_channels(shortcut, removed_in)
    handler.prune_out_channels(shortcut, removed_out)
    keep_in = [c for c in range(16) if c not in removed_in]
    assert torch.equal(shortcut(x[:, keep_in]), expected)
    assert shortcut.out_channels == 27
    assert shortcut.in_channels == 13


def test_block_internal_pruning_equals_masking(resnet56: Pruner) -> None:
    """Removing block-internal channels equals zeroing their batch-norm outputs in the dense model."""
    layer = "layer2.3.conv1"
    policy = resnet56.make_policy({layer: 0.5}, round_to=1)
    pruned = resnet56.apply(policy)
    scores = resnet56.scores("l1")[layer]
    removed = torch.sort(scores, stable=True).indices[:16]
    masked = load_model("cifar_resnet56").model
    masked.load_state_dict(resnet56.model.state_dict())
    bn = masked.layer2[3].bn1
    with torch.no_grad():
        bn.weight[removed] = 0
        bn.bias[removed] = 0
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(pruned(x), masked.eval()(x), atol=1e-5)


class _ConcatInOrder(nn.Module):
    """Two branches concatenated in network order, then one output convolution."""

    rl_pruner_output_modules = ("head",)

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 16, 1)
        self.second = nn.Conv2d(3, 16, 1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.first(x), self.second(x)], dim=1))


def test_concat_inputs_pruned_in_order() -> None:
    """Each branch's removed channels leave the consumer's matching input slice, whatever the order."""
    model = _ConcatInOrder().eval()
    structure = analyze_model(model, (3, 8, 8), architecture="concat")
    policy = Policy("concat", structure.fingerprint, (3, 8, 8), {"first": 0.5, "second": 0.5}, round_to=1)
    # Ascending scores drop the first branch's channels 0-7, descending ones the second's 8-15.
    scores = {"first": torch.arange(16.0), "second": -torch.arange(16.0)}
    pruned = apply_policy(model, structure, policy, scores)

    x = torch.randn(2, 3, 8, 8)
    kept = torch.cat([model.first(x)[:, 8:], model.second(x)[:, :8]], dim=1)
    weight = model.head.weight[:, [*range(8, 16), *range(16, 24)]]
    expected = nn.functional.conv2d(kept, weight, model.head.bias)
    assert pruned.head.in_channels == 16
    assert torch.allclose(pruned(x), expected, atol=1e-6)


def test_zero_policy_is_bit_identical(resnet56: Pruner) -> None:
    policy = resnet56.make_policy({}, round_to=8)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(resnet56.apply(policy)(x), resnet56.model(x))


@pytest.mark.parametrize("model_fixture", ["resnet56", "resnet50"])
def test_estimator_matches_exact_count(model_fixture: str, request: pytest.FixtureRequest) -> None:
    pruner: Pruner = request.getfixturevalue(model_fixture)
    rng = random.Random(1)
    for _ in range(4):
        policy = _random_policy(pruner, rng, round_to=8)
        pruned = pruner.apply(policy)
        exact = (count_macs(pruned, pruner.structure.input_shape), count_params(pruned))
        estimated = estimate_cost(pruner.structure, policy.pruning_ratios, policy.dropped_blocks, 8)
        assert estimated == exact


def test_resnet50_round_to_8_with_dropped_blocks(resnet50: Pruner, tmp_path: Path) -> None:
    policy = resnet50.uniform_policy(macs_target=0.5, round_to=8, dropped_blocks=["layer2.1", "layer3.2"])
    pruned = resnet50.apply(policy)
    macs = count_macs(pruned, (3, 224, 224))
    assert abs(macs / resnet50.structure.dense_macs - 0.5) < 0.02
    assert isinstance(pruned.get_submodule("layer2.1"), nn.Identity)
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels % 8 == 0, name
            if name != "conv1":
                assert module.in_channels % 8 == 0, name
    _assert_reload_identical(pruned, policy, "resnet50", (3, 224, 224), 1000, tmp_path)


def _assert_reload_identical(model: nn.Module, policy, architecture: str, shape, n_classes: int, tmp_path: Path) -> None:
    from rl_pruner.data import IMAGENET_NORMALIZATION

    path = tmp_path / "pruned.pt"
    record = pruned_model_record(
        model, architecture=architecture, input_shape=shape, num_classes=n_classes,
        normalization=IMAGENET_NORMALIZATION, dropped_blocks=policy.dropped_blocks, policy=policy.to_dict(),
    )
    save_pruned_model(path, record)
    torch.load(path, weights_only=True)  # no code is unpickled
    loaded = load_pruned_model(path)
    x = torch.randn(2, *shape)
    assert torch.equal(loaded.model(x), model(x))


def test_resnet56_uniform_half_macs_saves_and_reloads(resnet56: Pruner, tmp_path: Path) -> None:
    policy = resnet56.uniform_policy(macs_target=0.5, round_to=1, dropped_blocks=["layer1.3", "layer3.5"])
    pruned = resnet56.apply(policy)
    assert abs(count_macs(pruned, (3, 32, 32)) / resnet56.structure.dense_macs - 0.5) < 0.02
    _assert_reload_identical(pruned, policy, "cifar_resnet56", (3, 32, 32), 10, tmp_path)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("model_fixture", ["resnet56", "resnet50"])
def test_every_criterion_prunes(criterion: str, model_fixture: str, request: pytest.FixtureRequest) -> None:
    pruner: Pruner = request.getfixturevalue(model_fixture)
    shape = pruner.structure.input_shape
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(4, *shape, generator=generator), torch.randint(0, 10, (4,), generator=generator))]
    pruner.calibration_batches = calibration
    scores = pruner.scores(criterion)
    assert set(scores) == set(pruner.structure.layer_names)
    for layer in pruner.structure.layers:
        assert scores[layer.name].shape == (layer.channels,)
        assert torch.isfinite(scores[layer.name]).all()
    policy = pruner.uniform_policy(macs_target=0.5, criterion=criterion, round_to=8)
    pruned = pruner.apply(policy)
    assert pruned(calibration[0][0][:1]).shape[1] == pruner.loaded.num_classes
    # The dense model is left as it was: no gradients, eval mode.
    assert all(p.grad is None for p in pruner.model.parameters())


def test_batchnorm_reestimation_uses_batches(resnet56: Pruner) -> None:
    model = load_model("cifar_resnet20").model
    batches = [(torch.randn(8, 3, 32, 32) * 2 + 1, torch.zeros(8, dtype=torch.long))]
    reestimate_batchnorm(model, batches)
    stem_input = batches[0][0]
    with torch.no_grad():
        expected_mean = model.conv1(stem_input).mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn1.running_mean, expected_mean, atol=1e-5)
    assert not model.training
    assert model.bn1.momentum == 0.1
