"""Rewards for the pruning search: how good a pruned model is, as one number.

A reward evaluator takes the pruned model (batch-norm statistics already
re-estimated) and returns ``{"reward": r, <metric>: value}``. The search environment
calls it once per episode; detectors plug in an mAP evaluator with the same method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from rl_pruner.evaluation import evaluate_top1

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class RewardEvaluator(Protocol):
    """Scores a pruned model; ``metric`` names the quantity the reward is made of."""

    metric: str

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return ``{"reward": r, self.metric: value}`` with r in [0, 1]."""
        ...


class TopOneReward:
    """Top-1 accuracy on cached reward batches; the reward is top-1 / 100.

    The batches must come from training data (a reward split), never from the test
    split, so the search does not select policies on the data it is judged on.
    """

    metric = "top1"

    def __init__(self, batches: Batches) -> None:
        if not batches:
            raise ValueError("the reward split is empty; give it at least one batch of images")
        self.batches = list(batches)
        self.n_images = sum(len(labels) for _, labels in self.batches)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        top1 = evaluate_top1(model, self.batches, disable_progress=True)
        return {"reward": top1 / 100.0, "top1": top1}
