"""One dense model prepared for pruning: its structure, cached scores, and policy helpers.

A :class:`Pruner` traces the dense model once and caches channel scores per
criterion, so many policies can be estimated and applied cheaply (the search
environment applies one per episode).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rl_pruner.engine.apply import apply_policy, validate_policy
from rl_pruner.engine.batchnorm import reestimate_batchnorm
from rl_pruner.engine.estimate import estimate_cost, uniform_ratio_for_target
from rl_pruner.engine.importance import DATA_CRITERIA, compute_importance
from rl_pruner.engine.structure import ModelStructure, analyze_model
from rl_pruner.errors import InputError
from rl_pruner.models.registry import LoadedModel
from rl_pruner.policy import Policy, check_criterion, check_ratio

logger = logging.getLogger(__name__)

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class Pruner:
    """Prunes one dense model by policies; the dense model itself is never changed."""

    def __init__(self, loaded: LoadedModel, calibration_batches: Batches | None = None) -> None:
        if loaded.pruned is not None:
            raise InputError(
                "the model given is already pruned; prune the dense model with its --checkpoint instead"
            )
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.calibration_batches = calibration_batches
        self.structure: ModelStructure = analyze_model(
            self.model, loaded.input_shape, architecture=loaded.architecture
        )
        self._scores: dict[str, dict[str, torch.Tensor]] = {}

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        """Channel scores of every layer for ``criterion``, computed once and cached."""
        check_criterion(criterion)
        if criterion not in self._scores:
            logger.info("computing %s channel scores", criterion)
            self._scores[criterion] = compute_importance(
                self.model, self.structure, criterion, self.calibration_batches
            )
        return self._scores[criterion]

    def preload_scores(self, criterion: str, scores: Mapping[str, torch.Tensor]) -> None:
        """Use ``scores`` (from :meth:`scores` of a Pruner of the same model) for ``criterion``.

        Workers of a distributed search receive the driver's scores this way, so every
        worker ranks channels identically and none recomputes them.
        """
        check_criterion(criterion)
        missing = set(self.structure.layer_names) - set(scores)
        if missing:
            raise InputError(f"{criterion} scores lack layers {sorted(missing)[:3]}; they belong to another model")
        self._scores[criterion] = dict(scores)

    def make_policy(
        self,
        pruning_ratios: Mapping[str, float] | Sequence[float],
        dropped_blocks: Collection[str] = (),
        *,
        criterion: str = "l1",
        round_to: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> Policy:
        """Build a validated policy for this model from ratios (by layer name or in layer order)."""
        if not isinstance(pruning_ratios, Mapping):
            names = self.structure.layer_names
            if len(pruning_ratios) != len(names):
                raise InputError(f"expected {len(names)} pruning ratios, one per layer, got {len(pruning_ratios)}")
            pruning_ratios = dict(zip(names, pruning_ratios, strict=True))
        for name, ratio in pruning_ratios.items():
            check_ratio(ratio, f"pruning ratio of layer {name!r}")
        check_criterion(criterion)
        if round_to < 1:
            raise InputError(f"round_to must be an integer >= 1, got {round_to}")
        macs, params = estimate_cost(self.structure, pruning_ratios, dropped_blocks, round_to)
        policy = Policy(
            architecture=self.structure.architecture,
            fingerprint=self.structure.fingerprint,
            input_shape=self.structure.input_shape,
            pruning_ratios={name: float(ratio) for name, ratio in pruning_ratios.items()},
            dropped_blocks=sorted(dropped_blocks),
            criterion=criterion,
            round_to=round_to,
            metadata={
                "estimated_macs": macs,
                "estimated_params": params,
                "macs_ratio": macs / self.structure.dense_macs,
                **(metadata or {}),
            },
        )
        validate_policy(policy, self.structure)
        return policy

    def uniform_policy(
        self,
        *,
        macs_target: float | None = None,
        ratio: float | None = None,
        dropped_blocks: Collection[str] = (),
        criterion: str = "l1",
        round_to: int = 8,
    ) -> Policy:
        """Build a policy with one pruning ratio for every layer, given or solved for a MACs target (fraction kept)."""
        if (macs_target is None) == (ratio is None):
            raise InputError("give exactly one of --macs-target and --ratio")
        if macs_target is not None:
            if not 0.0 < macs_target <= 1.0:
                raise InputError(f"--macs-target is {macs_target}; it is the fraction of dense MACs kept, in (0, 1]")
            ratio = uniform_ratio_for_target(self.structure, macs_target, round_to, dropped_blocks)
        if ratio is None:
            raise InputError("give one of --macs-target and --ratio")
        check_ratio(ratio, "--ratio")
        ratios = {name: ratio for name in self.structure.layer_names}
        metadata: dict[str, Any] = {"source": "uniform", "uniform_ratio": ratio}
        if macs_target is not None:
            metadata["macs_target"] = macs_target
        return self.make_policy(ratios, dropped_blocks, criterion=criterion, round_to=round_to, metadata=metadata)

    def apply(self, policy: Policy, bn_batches: Batches | None = None) -> nn.Module:
        """Return the pruned model; with ``bn_batches``, batch-norm statistics are re-estimated."""
        if policy.criterion in DATA_CRITERIA and not self.calibration_batches:
            raise InputError(
                f"criterion {policy.criterion!r} needs calibration images; pass --data with training images"
            )
        pruned = apply_policy(self.model, self.structure, policy, self.scores(policy.criterion))
        if bn_batches:
            reestimate_batchnorm(pruned, bn_batches)
        return pruned
