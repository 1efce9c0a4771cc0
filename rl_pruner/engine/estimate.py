"""Channel rounding and the fast cost estimator.

The estimator returns the MACs and parameters a policy will produce without building
the pruned model: it applies :func:`kept_channels_for_ratio` to every layer and sums
the cost terms recorded by :func:`~rl_pruner.engine.structure.analyze_model`. It
uses the same rounding as :func:`~rl_pruner.engine.apply.apply_policy`, so both agree
on every layer's channel count.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from rl_pruner.engine.cost import term_cost
from rl_pruner.engine.structure import ModelStructure


def kept_channels_for_ratio(channels: int, pruning_ratio: float, round_to: int) -> int:
    """Channels a layer keeps when ``pruning_ratio`` of them is removed.

    The kept count is the nearest of the multiples of ``round_to`` below ``channels``
    and ``channels`` itself (halves round up), and is at least ``round_to`` (or 1). For example
    64 channels at ratio 0.3 keep 44.8 -> 48 with round_to 8, or 45 with round_to 1.
    """
    exact = channels * (1.0 - pruning_ratio)
    step = max(1, round_to)
    kept = step * math.floor(exact / step + 0.5)
    # A width that is not a multiple of round_to may also stay whole: at ratio 0 a
    # 10-channel layer keeps 10, not 8.
    if kept >= channels or channels - exact <= abs(exact - kept):
        return channels
    return int(max(step, kept, 1))


def pruned_counts(
    structure: ModelStructure, pruning_ratios: Mapping[str, float] | Sequence[float], round_to: int
) -> list[int]:
    """Pruned channel count per layer, in the structure's layer order."""
    if isinstance(pruning_ratios, Mapping):
        ratios = [pruning_ratios.get(layer.name, 0.0) for layer in structure.layers]
    else:
        ratios = list(pruning_ratios)
    return [
        layer.channels - kept_channels_for_ratio(layer.channels, ratio, round_to)
        for layer, ratio in zip(structure.layers, ratios, strict=True)
    ]


def estimate_cost(
    structure: ModelStructure,
    pruning_ratios: Mapping[str, float] | Sequence[float],
    dropped_blocks: Collection[str] = (),
    round_to: int = 8,
) -> tuple[int, int]:
    """(MACs, params) of the model a policy produces, without building it."""
    pruned = pruned_counts(structure, pruning_ratios, round_to)
    dropped = set(dropped_blocks)
    layer_index = {layer.name: layer.index for layer in structure.layers}
    for block in structure.blocks:
        # A dropped depth block's exit channels disappear from the layers that read them.
        if block.name in dropped and block.exit_layer is not None:
            index = layer_index[block.exit_layer]
            pruned[index] = structure.layers[index].channels
    macs = params = 0
    for term in structure.cost_terms:
        if term.block is not None and term.block in dropped:
            continue
        term_macs, term_params = term_cost(term, pruned)
        macs += term_macs
        params += term_params
    return macs, params


def uniform_ratio_for_target(
    structure: ModelStructure,
    macs_target: float,
    round_to: int,
    dropped_blocks: Collection[str] = (),
    tolerance: float = 1e-4,
) -> float:
    """Find the single pruning ratio whose estimated MACs come closest to ``macs_target``.

    ``macs_target`` is the fraction of the dense MACs to keep. Rounding makes the
    achievable MACs a step function of the ratio, so the result is the ratio with
    the smallest relative error among the bisection's candidates.
    """
    goal = macs_target * structure.dense_macs

    def macs_at(ratio: float) -> int:
        return estimate_cost(structure, [ratio] * len(structure.layers), dropped_blocks, round_to)[0]

    low, high = 0.0, 0.999
    best_ratio, best_error = 0.0, abs(macs_at(0.0) - goal)
    while high - low > tolerance:
        middle = (low + high) / 2
        macs = macs_at(middle)
        error = abs(macs - goal)
        if error < best_error:
            best_ratio, best_error = middle, error
        if macs > goal:
            low = middle
        else:
            high = middle
    return best_ratio
