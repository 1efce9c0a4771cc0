"""Exact MACs and parameter counts of a built model.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass
of a single sample and halved (its FLOPs count a multiply-accumulate as two). Only
convolutions and matrix products are counted; see :mod:`rl_pruner.engine.cost`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one sample of ``input_shape`` (C, H, W)."""
    was_training = model.training
    model.eval()
    example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())
