"""Baseline channel allocations that a learned policy is compared against.

A baseline decides only *how many* channels each layer keeps, at the same MACs target
as the search. It returns a :class:`~rl_pruner.policy.Policy` (pruning ratios only),
and the search applies it like its own policies: the channels removed inside each
layer are chosen by the search's criterion, followed by its batch-norm re-estimation
and reward. So a baseline's accuracy can differ from what Torch-Pruning's own pruned
model would reach, because only the per-layer counts are taken from Torch-Pruning.

- ``uniform``: one pruning ratio for every layer, solved for the MACs target by
  :meth:`Pruner.uniform_policy <rl_pruner.engine.pruner.Pruner.uniform_policy>`.
- ``global_l1``: Torch-Pruning's global pruning with ``MagnitudeImportance(p=1)``. A
  channel's score is the L1 norm of its weights, averaged over the modules of its
  layer's dependency group and divided by the layer's mean score. All channels of all
  layers are ranked together and the lowest are removed.
- ``global_lamp``: the same with ``LAMPImportance(p=2)``. Squared L2 norms are divided
  by the sum of the scores at least as large in the same layer (the LAMP
  normalisation, arXiv 2010.07611), so each layer's largest channel scores 1.

Torch-Pruning's ``pruning_ratio`` is the fraction of all channels removed, not of
MACs, so :func:`global_allocation` searches it until the pruned model's MACs are
within a tolerance of the target. Each search step deep-copies the dense model,
traces it with Torch-Pruning and prunes it. Measured on a shared, busy 2-core CPU at
MACs targets 0.3 and 0.5, a search took 3 to 9 steps of 0.15-0.4 s each on
``cifar_resnet56`` and 0.4-4 s each on ``resnet50``. The first search in a process
took several seconds longer.

Known limits:

- No baseline drops blocks. Torch-Pruning's global pruning removes channels only, and
  ``uniform`` is built without dropped blocks.
- Torch-Pruning 1.6.1 does not apply ``max_pruning_ratio`` per layer in one-shot global
  pruning, and it leaves a layer dense when all of its channels fall below the
  threshold. :func:`global_allocation` therefore gives the most important channels
  of each layer an infinite score, so every layer keeps at least
  ``1 - max_ratio`` of its channels.
- That floor assumes one score per output channel. Grouped convolutions (other than
  depthwise ones) average scores over groups inside Torch-Pruning, so there the floor
  is not exact.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch_pruning as tp
from torch import nn

from rl_pruner.engine.estimate import kept_channels_for_ratio
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.shortcut_pruner import CUSTOMIZED_PRUNERS
from rl_pruner.errors import ConfigError
from rl_pruner.policy import Policy

logger = logging.getLogger(__name__)

GLOBAL_IMPORTANCES = ("l1", "lamp")
MAX_SEARCH_STEPS = 12


class Baseline(Protocol):
    """A function that builds one baseline policy for a pruner at a MACs target."""

    def __call__(self, pruner: Pruner, macs_target: float, *, criterion: str, round_to: int) -> Policy: ...


def uniform_allocation(pruner: Pruner, macs_target: float, *, criterion: str, round_to: int) -> Policy:
    """Build the policy that removes the same fraction of channels from every layer.

    ``macs_target`` is the fraction of dense MACs kept, in (0, 1].
    """
    policy = pruner.uniform_policy(macs_target=macs_target, round_to=round_to, criterion=criterion)
    policy.metadata["source"] = "uniform"
    return policy


@dataclass
class _Trial:
    """One run of Torch-Pruning's global pruning at one channel ratio."""

    n_kept_total: int  # channels kept over all layers, before Torch-Pruning's rounding
    torch_pruning_ratio: float
    model: nn.Module
    macs: int


def global_allocation(
    pruner: Pruner,
    macs_target: float,
    *,
    importance: str,
    criterion: str,
    round_to: int,
    max_ratio: float = 0.9,
    tolerance: float = 0.005,
) -> Policy:
    """Build the policy whose per-layer channel counts come from Torch-Pruning's global pruning.

    :param macs_target: Fraction of dense MACs kept, in (0, 1].
    :param importance: Channel ranking used to allocate channels, ``"l1"`` or ``"lamp"``.
    :param criterion: Criterion of the returned policy, which chooses the channels
        removed inside each layer when the policy is applied.
    :param round_to: Multiple that kept channel counts are rounded to, as in any
        rl-pruner policy (1 for no rounding).
    :param max_ratio: Largest fraction of any layer's channels removed, in (0, 1).
    :param tolerance: Relative MACs error at which the search stops, > 0. After
        ``MAX_SEARCH_STEPS`` steps the closest result is used, and a warning is logged
        if it is outside the tolerance.
    :raises ConfigError: on an argument out of range, or when ``round_to`` > 1 and
        Torch-Pruning leaves a layer with a channel count that rl-pruner's rounding
        cannot produce.
    """
    _check_global_arguments(macs_target, importance, round_to, max_ratio, tolerance)
    started = time.perf_counter()
    trial = _search_global_pruning(pruner, macs_target, importance, round_to, max_ratio, tolerance)
    elapsed = time.perf_counter() - started

    ratios = _pruning_ratios_of(trial.model, pruner, round_to)
    policy = pruner.make_policy(
        ratios,
        criterion=criterion,
        round_to=round_to,
        metadata={
            "source": f"global_{importance}",
            "torch_pruning_ratio": trial.torch_pruning_ratio,
            "macs_target": macs_target,
            "max_ratio": max_ratio,
        },
    )

    # The policy must describe the very model Torch-Pruning produced, MAC for MAC.
    if policy.metadata["estimated_macs"] != trial.macs:
        raise RuntimeError(
            f"global_{importance}: the policy's estimated MACs ({policy.metadata['estimated_macs']}) "
            f"differ from the Torch-Pruning model's counted MACs ({trial.macs}); "
            "the structure's layers and Torch-Pruning's groups disagree"
        )
    logger.info("global_%s allocation: %.4f of dense MACs (target %.4f) in %.1f s",
                importance, trial.macs / pruner.structure.dense_macs, macs_target, elapsed)
    return policy


def _check_global_arguments(
    macs_target: float, importance: str, round_to: int, max_ratio: float, tolerance: float
) -> None:
    if not 0.0 < macs_target <= 1.0:
        raise ConfigError(f"macs_target is {macs_target}; it is the fraction of dense MACs kept, in (0, 1]")
    if importance not in GLOBAL_IMPORTANCES:
        raise ConfigError(
            f"importance {importance!r} is unknown for global allocation; choose one of {', '.join(GLOBAL_IMPORTANCES)}"
        )
    if round_to < 1:
        raise ConfigError(f"round_to is {round_to}; it must be an integer >= 1")
    if not 0.0 < max_ratio < 1.0:
        raise ConfigError(f"max_ratio is {max_ratio}; it is the largest fraction of a layer removed, in (0, 1)")
    if tolerance <= 0.0:
        raise ConfigError(f"tolerance is {tolerance}; it is a relative MACs error and must be > 0")


def _search_global_pruning(
    pruner: Pruner, macs_target: float, importance: str, round_to: int, max_ratio: float, tolerance: float
) -> _Trial:
    """Prune copies at a sequence of channel counts until the MACs are within ``tolerance``.

    The unknown is the total number of channels kept, an integer because Torch-Pruning
    keeps ``int(total x (1 - pruning_ratio))`` channels. The bracket narrows like a
    bisection, but each trial is placed by linear interpolation of sqrt(MACs), which
    is nearly linear in the channels kept (regula falsi with the Illinois rule), so
    few steps are needed.
    """
    structure = pruner.structure
    goal = macs_target * structure.dense_macs
    n_total = sum(layer.channels for layer in structure.layers)
    n_kept_min = sum(_min_kept_channels(layer.channels, max_ratio, round_to) for layer in structure.layers)
    base = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else tp.importance.LAMPImportance(p=2)
    scorer = _FloorImportance(base, max_ratio, round_to)

    if goal >= structure.dense_macs or n_kept_min >= n_total:
        # The target is 1.0, or max_ratio and round_to leave no channel that may be removed.
        best = _prune_globally(pruner, n_total, n_total, scorer, round_to, max_ratio)
        _warn_if_far(best, goal, tolerance, importance, structure.dense_macs)
        return best

    # MACs are >= goal at "above" and <= goal at "below". "below" starts at
    # (0 channels, 0 MACs), an extrapolation that is never tried.
    above = _BracketEnd(n_total, math.sqrt(structure.dense_macs) - math.sqrt(goal))
    below = _BracketEnd(0, -math.sqrt(goal))
    best: _Trial | None = None
    last_moved: _BracketEnd | None = None
    for _ in range(MAX_SEARCH_STEPS):
        n_kept = _next_trial(below, above, n_kept_min)
        if n_kept is None:
            break
        trial = _prune_globally(pruner, n_kept, n_total, scorer, round_to, max_ratio)
        logger.info("global_%s: Torch-Pruning pruning_ratio %.4f keeps %.4f of dense MACs",
                    importance, trial.torch_pruning_ratio, trial.macs / structure.dense_macs)
        if best is None or abs(trial.macs - goal) < abs(best.macs - goal):
            best = trial
        if abs(trial.macs - goal) <= tolerance * goal:
            break

        moved, other_end = (above, below) if trial.macs > goal else (below, above)
        moved.n_kept, moved.residual = n_kept, math.sqrt(trial.macs) - math.sqrt(goal)
        # Illinois rule: when one end moves twice in a row, the interpolation is stuck on
        # the curved or flat side, so halve the other end's residual to pull the next trial over.
        if last_moved is moved:
            other_end.residual /= 2
        last_moved = moved

    assert best is not None  # the first step always runs because n_kept_min < n_total
    _warn_if_far(best, goal, tolerance, importance, structure.dense_macs)
    return best


def _warn_if_far(trial: _Trial, goal: float, tolerance: float, importance: str, dense_macs: int) -> None:
    error = trial.macs / goal - 1
    if abs(error) > tolerance:
        # NOTE: with round_to > 1 on small models, one threshold step can move many layers
        # by round_to channels at once, so some targets are not reachable within tolerance.
        logger.warning(
            "global_%s: the closest allocation found keeps %.4f of dense MACs, %.1f %% from the target %.4f; "
            "lower round_to or raise max_ratio to get closer",
            importance, trial.macs / dense_macs, 100 * error, goal / dense_macs,
        )


@dataclass
class _BracketEnd:
    """One end of the search bracket: channels kept and sqrt(MACs) - sqrt(goal) there."""

    n_kept: int
    residual: float


def _next_trial(below: _BracketEnd, above: _BracketEnd, n_kept_min: int) -> int | None:
    """Channels to keep in the next trial, or None when no untried count is left in the bracket."""
    low = max(below.n_kept + 1, n_kept_min)
    high = above.n_kept - 1
    if low > high:
        return None

    width = above.n_kept - below.n_kept
    fraction = -below.residual / (above.residual - below.residual)
    n_kept = round(below.n_kept + fraction * width)

    # Stay a sixteenth of the bracket away from its ends, so it shrinks by that much at least.
    margin = width // 16
    return min(max(n_kept, low, below.n_kept + margin), high, above.n_kept - margin)


def _prune_globally(
    pruner: Pruner, n_kept: int, n_total: int, importance: _FloorImportance, round_to: int, max_ratio: float
) -> _Trial:
    """Prune a copy of the dense model with Torch-Pruning so that ``n_kept`` channels remain."""
    # Torch-Pruning keeps int(n_total x (1 - ratio)) channels. Half a channel of margin
    # stops float error from changing that integer.
    ratio = 0.0 if n_kept >= n_total else 1.0 - (n_kept + 0.5) / n_total
    model = copy.deepcopy(pruner.model)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    example_input = torch.zeros(1, *pruner.structure.input_shape, device=device)
    importance.use_model(model)

    torch_pruner = tp.pruner.MetaPruner(
        model,
        example_input,
        importance=importance,
        global_pruning=True,
        pruning_ratio=ratio,
        max_pruning_ratio=max_ratio,
        ignored_layers=[modules[name] for name in (pruner.structure.output_modules or (pruner.structure.output_module,))],
        round_to=round_to if round_to > 1 else None,
        customized_pruners=dict(CUSTOMIZED_PRUNERS),
    )
    torch_pruner.step()

    # Only the shapes are needed from here on, and on the meta device the counting
    # forward pass does no arithmetic (resnet50: 0.2 s instead of 5.3 s on a shared 2-core CPU).
    model.to("meta")
    return _Trial(n_kept, ratio, model, count_macs(model, pruner.structure.input_shape))


def _min_kept_channels(channels: int, max_ratio: float, round_to: int) -> int:
    """Minimum channels a layer keeps: ``1 - max_ratio`` of them, rounded up to ``round_to``."""
    kept = max(1, math.ceil(round(channels * (1.0 - max_ratio), 9)))
    kept = round_to * math.ceil(kept / round_to)
    return min(kept, channels)


class _FloorImportance(tp.importance.Importance):
    """Wraps a Torch-Pruning importance and marks each layer's top channels as never pruned.

    Torch-Pruning removes channels whose score is at or below one global threshold,
    then rounds each layer's kept count down to a multiple of ``round_to``. Giving a
    layer's ``_min_kept_channels`` best channels an infinite score keeps them above any
    threshold that the search reaches, and since that count is a multiple of
    ``round_to``, rounding down does not go below it.

    Scores are cached by root module name, because every trial prunes a fresh copy of
    the same dense model. :meth:`use_model` sets the copy that is scored next.
    """

    def __init__(self, base: tp.importance.Importance, max_ratio: float, round_to: int) -> None:
        self.base = base
        self.max_ratio = max_ratio
        self.round_to = round_to
        self._module_names: dict[nn.Module, str] = {}
        self._scores: dict[str, torch.Tensor | None] = {}

    def use_model(self, model: nn.Module) -> None:
        self._module_names = {module: name for name, module in model.named_modules()}

    def __call__(self, group: tp.dependency.Group) -> torch.Tensor | None:
        root_name = self._module_names[group[0].dep.target.module]
        if root_name not in self._scores:
            self._scores[root_name] = self._floored_scores(group)
        scores = self._scores[root_name]
        return None if scores is None else scores.clone()

    def _floored_scores(self, group: tp.dependency.Group) -> torch.Tensor | None:
        scores = self.base(group)
        if scores is None:
            return None
        n_protected = _min_kept_channels(len(scores), self.max_ratio, self.round_to)
        protected = torch.topk(scores, n_protected).indices
        scores = scores.clone()
        scores[protected] = math.inf
        return scores


def _pruning_ratios_of(model: nn.Module, pruner: Pruner, round_to: int) -> dict[str, float]:
    """Pruning ratio per layer that reproduces the channel counts of a Torch-Pruning model."""
    modules = dict(model.named_modules())
    ratios = {}
    for layer in pruner.structure.layers:
        root = modules[layer.name]
        kept = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
        ratios[layer.name] = _ratio_for_kept(layer.name, layer.channels, kept, round_to)
    return ratios


def _ratio_for_kept(layer_name: str, channels: int, kept: int, round_to: int) -> float:
    """Pruning ratio for which :func:`kept_channels_for_ratio` returns exactly ``kept``.

    ``(channels - kept) / channels`` reproduces every count from 1 to ``channels`` with
    ``round_to`` 1, and every multiple of ``round_to`` from ``round_to`` to ``channels``.
    A loop over all layer widths up to 4096 found no exception. Because rl-pruner rounds
    to the nearest multiple of ``round_to``, other counts are out of reach when
    ``round_to`` > 1. That includes some full widths: a layer of 10 channels that
    Torch-Pruning leaves dense becomes 8 under ``round_to`` 8, so it raises here.
    """
    ratio = (channels - kept) / channels
    if kept_channels_for_ratio(channels, ratio, round_to) == kept:
        return ratio
    raise ConfigError(
        f"layer {layer_name!r}: Torch-Pruning kept {kept} of its {channels} channels, which rl-pruner's "
        f"rounding to multiples of round_to={round_to} cannot reproduce "
        f"(it gives {kept_channels_for_ratio(channels, ratio, round_to)}); use round_to 1 for this baseline"
    )


BASELINES: dict[str, Baseline] = {
    "uniform": uniform_allocation,
    "global_l1": functools.partial(global_allocation, importance="l1"),
    "global_lamp": functools.partial(global_allocation, importance="lamp"),
}


def make_baseline(name: str, pruner: Pruner, macs_target: float, *, criterion: str, round_to: int) -> Policy:
    """Build the baseline policy ``name`` (a key of :data:`BASELINES`) at ``macs_target``."""
    if name not in BASELINES:
        raise ConfigError(f"baseline {name!r} is unknown; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](pruner, macs_target, criterion=criterion, round_to=round_to)
