"""MACs and parameters of one module as a function of the channels that remain.

The convention throughout rl-pruner: MACs are the multiply-accumulates of
convolutions and linear layers for one input sample, as ``torch.utils.flop_counter``
counts them (its FLOPs are 2 x MACs). Batch norm, activations, additions and pooling
are not counted; on ResNet-50 they would add about 0.8 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CostTerm:
    """One module's cost record.

    ``in_sources`` and ``out_sources`` list (layer index, member channels per root
    channel): that dimension loses ``factor x pruned root channels`` for each layer
    that feeds it. A factor above 1 comes from flattening, where each channel of a
    feature map becomes several linear inputs.
    """

    module_name: str
    kind: str  # "conv", "linear", "channelwise" (batch norm and the like) or "fixed"
    base_in: int
    base_out: int
    in_sources: tuple[tuple[int, float], ...]
    out_sources: tuple[tuple[int, float], ...]
    kernel_area: int  # weights per (input, output) channel pair: kh x kw, or 1 for linear
    macs_per_position: int  # kernel_area x output positions per sample (linear: rows)
    groups: int
    depthwise: bool
    bias: bool
    params: int  # dense parameter count of this module
    block: str | None  # removable block containing the module, if any


def kept_channels(base: int, sources: tuple[tuple[int, float], ...], pruned: Sequence[int] | None) -> int:
    """Channels of one dimension left after each source layer lost ``pruned[layer]``."""
    if pruned is None:
        return base
    return base - round(sum(factor * pruned[index] for index, factor in sources))


def term_cost(term: CostTerm, pruned: Sequence[int] | None) -> tuple[int, int]:
    """(MACs, params) of one module; ``pruned`` is the pruned channel count per layer."""
    if term.kind == "fixed":
        return 0, term.params
    c_out = kept_channels(term.base_out, term.out_sources, pruned)
    if term.kind == "channelwise":
        return 0, term.params // term.base_out * c_out
    if term.depthwise:
        c_in, groups = c_out, c_out
    else:
        c_in, groups = kept_channels(term.base_in, term.in_sources, pruned), term.groups
    pairs = c_in // groups * c_out
    return pairs * term.macs_per_position, pairs * term.kernel_area + (c_out if term.bias else 0)
