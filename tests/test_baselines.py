"""Baseline allocations: uniform, and Torch-Pruning's global L1 and LAMP pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rl_pruner import config
from rl_pruner.agents import baselines
from rl_pruner.agents.baselines import BASELINES, global_allocation, make_baseline
from rl_pruner.engine.estimate import estimate_cost, kept_channels_for_ratio
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.errors import ConfigError
from rl_pruner.models.registry import load_model
from rl_pruner.policy import Policy

TARGETS = (0.3, 0.5)
IMPORTANCES = ("l1", "lamp")
CASES = [(importance, target) for importance in IMPORTANCES for target in TARGETS]


class _TrialRecorder:
    """Wraps ``baselines._prune_globally`` to keep every Torch-Pruning model it builds."""

    def __init__(self) -> None:
        self.trials: list[baselines._Trial] = []
        self._prune_globally = baselines._prune_globally

    def __call__(self, *args, **kwargs) -> baselines._Trial:
        trial = self._prune_globally(*args, **kwargs)
        self.trials.append(trial)
        return trial

    def trial_of(self, policy: Policy) -> baselines._Trial:
        """The Torch-Pruning trial that a policy was converted from."""
        ratio = policy.metadata["torch_pruning_ratio"]
        return next(trial for trial in reversed(self.trials) if trial.torch_pruning_ratio == ratio)


def _kept_channels(model: nn.Module, pruner: Pruner) -> dict[str, int]:
    modules = dict(model.named_modules())
    kept = {}
    for layer in pruner.structure.layers:
        module = modules[layer.name]
        kept[layer.name] = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    return kept


def _policy_kept_channels(policy: Policy, pruner: Pruner) -> dict[str, int]:
    return {
        layer.name: kept_channels_for_ratio(layer.channels, policy.pruning_ratios[layer.name], policy.round_to)
        for layer in pruner.structure.layers
    }


@pytest.fixture(scope="module")
def resnet56(shared_data: Path) -> Pruner:
    return Pruner(load_model("cifar_resnet56", shared_data / "checkpoints" / "cifar10-resnet56.th"))


@pytest.fixture(scope="module")
def resnet56_global(resnet56: Pruner) -> tuple[dict[tuple[str, float], Policy], _TrialRecorder]:
    """Global allocations at round_to 1, built once through ``make_baseline``."""
    recorder = _TrialRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "_prune_globally", recorder)
        policies = {
            (importance, target): make_baseline(
                f"global_{importance}", resnet56, target, criterion="l1", round_to=1
            )
            for importance, target in CASES
        }
    return policies, recorder


@pytest.fixture(scope="module")
def resnet50_lamp() -> tuple[Pruner, Policy, _TrialRecorder]:
    """Random-weight ResNet-50 with a global LAMP allocation at round_to 8."""
    torch.manual_seed(0)
    pruner = Pruner(load_model("resnet50"))
    recorder = _TrialRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "_prune_globally", recorder)
        policy = global_allocation(pruner, 0.5, importance="lamp", criterion="l1", round_to=8)
    return pruner, policy, recorder


@pytest.mark.parametrize(("importance", "target"), CASES)
def test_global_allocation_meets_macs_target(resnet56_global, importance: str, target: float) -> None:
    policy = resnet56_global[0][importance, target]
    assert abs(policy.metadata["macs_ratio"] / target - 1) <= 0.01
    assert policy.metadata["source"] == f"global_{importance}"
    assert 0.0 < policy.metadata["torch_pruning_ratio"] < 1.0
    assert policy.dropped_blocks == []


@pytest.mark.parametrize(("importance", "target"), CASES)
def test_global_allocation_matches_torch_pruning(resnet56, resnet56_global, importance: str, target: float) -> None:
    policies, recorder = resnet56_global
    policy = policies[importance, target]
    trial = recorder.trial_of(policy)
    estimated_macs = estimate_cost(resnet56.structure, policy.pruning_ratios, (), policy.round_to)[0]
    assert estimated_macs == trial.macs
    assert _policy_kept_channels(policy, resnet56) == _kept_channels(trial.model, resnet56)


@pytest.mark.parametrize(("importance", "target"), CASES)
def test_global_allocation_is_not_uniform(resnet56_global, importance: str, target: float) -> None:
    ratios = resnet56_global[0][importance, target].pruning_ratios.values()
    assert max(ratios) - min(ratios) > 0.1
    assert max(ratios) <= 0.9


@pytest.mark.parametrize(("importance", "target"), CASES)
def test_global_policy_applies_exactly(resnet56, resnet56_global, importance: str, target: float) -> None:
    policy = resnet56_global[0][importance, target]
    pruned = resnet56.apply(policy)
    assert count_macs(pruned, (3, 32, 32)) == policy.metadata["estimated_macs"]
    with torch.no_grad():
        logits = pruned(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_resnet50_round_to_8_keeps_multiples(resnet50_lamp) -> None:
    pruner, policy, recorder = resnet50_lamp
    kept = _policy_kept_channels(policy, pruner)
    assert all(count % 8 == 0 for count in kept.values()), kept
    assert kept == _kept_channels(recorder.trial_of(policy).model, pruner)
    assert policy.metadata["estimated_macs"] == recorder.trial_of(policy).macs
    assert abs(policy.metadata["macs_ratio"] / 0.5 - 1) <= 0.01


def test_resnet50_lamp_stops_at_max_ratio(resnet50_lamp) -> None:
    # Without the floor, Torch-Pruning 1.6.1 cuts layer4.0.conv3 of this model to 200 of
    # its 2048 channels, past max_ratio 0.9. With it, some layer stops exactly at the floor.
    pruner, policy, _ = resnet50_lamp
    kept = _policy_kept_channels(policy, pruner)
    at_floor = [
        layer.name for layer in pruner.structure.layers
        if kept[layer.name] == baselines._min_kept_channels(layer.channels, 0.9, 8)
    ]
    assert max(policy.pruning_ratios.values()) <= 0.9
    assert at_floor


def test_uniform_baseline_passes_through(resnet56) -> None:
    policy = make_baseline("uniform", resnet56, 0.5, criterion="l2", round_to=8)
    expected = resnet56.uniform_policy(macs_target=0.5, round_to=8, criterion="l2")
    assert policy.pruning_ratios == expected.pruning_ratios
    assert policy.metadata["source"] == "uniform"
    assert policy.criterion == "l2"
    assert len(set(policy.pruning_ratios.values())) == 1


def test_make_baseline_unknown_name(resnet56) -> None:
    with pytest.raises(ConfigError, match="baseline 'global_l3' is unknown"):
        make_baseline("global_l3", resnet56, 0.5, criterion="l1", round_to=8)


def test_baseline_names_match_config() -> None:
    assert set(BASELINES) == set(config.BASELINES)


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("importance", "l2", "importance 'l2' is unknown"),
    ("max_ratio", 1.0, "max_ratio is 1.0"),
    ("macs_target", 0.0, "macs_target is 0.0"),
    ("tolerance", 0.0, "tolerance is 0.0"),
])
def test_global_allocation_rejects_bad_argument(resnet56, argument: str, value, message: str) -> None:
    arguments = {"macs_target": 0.5, "importance": "l1", "max_ratio": 0.9, "tolerance": 0.005, argument: value}
    with pytest.raises(ConfigError, match=message):
        global_allocation(resnet56, criterion="l1", round_to=8, **arguments)


@pytest.mark.parametrize("channels", [1, 3, 16, 64, 257, 2048])
def test_ratio_for_kept_round_trips_any_count(channels: int) -> None:
    for kept in range(1, channels + 1):
        ratio = baselines._ratio_for_kept("conv1", channels, kept, 1)
        assert kept_channels_for_ratio(channels, ratio, 1) == kept
    for kept in range(8, channels + 1, 8):
        ratio = baselines._ratio_for_kept("conv1", channels, kept, 8)
        assert kept_channels_for_ratio(channels, ratio, 8) == kept


@pytest.mark.parametrize(("channels", "kept"), [(64, 20), (10, 9), (64, 4)])
def test_ratio_for_kept_rejects_unroundable_count(channels: int, kept: int) -> None:
    with pytest.raises(ConfigError, match=f"layer 'layer1.0.conv1': Torch-Pruning kept {kept} of its {channels}"):
        baselines._ratio_for_kept("layer1.0.conv1", channels, kept, 8)
