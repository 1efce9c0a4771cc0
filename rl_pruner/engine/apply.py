"""Applying a policy: drop blocks and remove the least important channels per layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from rl_pruner.engine.estimate import pruned_counts
from rl_pruner.engine.structure import ModelStructure, drop_blocks
from rl_pruner.errors import PolicyError
from rl_pruner.policy import Policy


def validate_policy(policy: Policy, structure: ModelStructure, source: str = "policy") -> None:
    """Raise PolicyError unless ``policy`` was made for this model structure."""
    if policy.fingerprint != structure.fingerprint:
        raise PolicyError(
            f"{source} was made for model {policy.architecture!r} (structure {policy.fingerprint}), "
            f"but the model given is {structure.architecture!r} (structure {structure.fingerprint}); "
            "apply it to the model it was made for, or make a new policy with 'rl-pruner policy'"
        )
    layer_names = set(structure.layer_names)
    unknown = [name for name in policy.pruning_ratios if name not in layer_names]
    if unknown:
        raise PolicyError(
            f"{source} names layers the model does not have ({', '.join(unknown[:3])}); "
            "list the model's layers with 'rl-pruner inspect'"
        )
    block_names = set(structure.block_names)
    unknown_blocks = [name for name in policy.dropped_blocks if name not in block_names]
    if unknown_blocks:
        raise PolicyError(
            f"{source} drops blocks that are not removable in this model ({', '.join(unknown_blocks[:3])}); "
            "list removable blocks with 'rl-pruner inspect'"
        )


def channels_to_prune(scores: torch.Tensor, n_pruned: int) -> list[int]:
    """Indices of the ``n_pruned`` lowest scores; ties go to the lower index."""
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:n_pruned].tolist())


def apply_policy(
    model: nn.Module,
    structure: ModelStructure,
    policy: Policy,
    scores: dict[str, torch.Tensor],
) -> nn.Module:
    """Return a pruned copy of the dense ``model``; the original is not changed.

    ``scores`` are the per-layer channel scores of :func:`compute_importance` for
    the policy's criterion. Channels are removed first, on the dense layout that the
    structure's index maps describe; then dropped residual blocks become ``nn.Identity``
    and dropped depth blocks are removed by the model (:func:`drop_blocks`). Layers
    inside a dropped block are not pruned.
    """
    validate_policy(policy, structure)
    pruned_model = copy.deepcopy(model)
    modules = dict(pruned_model.named_modules())
    dropped = set(policy.dropped_blocks)
    counts = pruned_counts(structure, policy.pruning_ratios, policy.round_to)
    # Index maps number channels in the dense layout. A module fed by a concatenation
    # belongs to several layers, and removing one layer's slice first would shift the
    # later slices, so each module dimension collects its dense indices from every
    # layer and is pruned once.
    removals: dict[tuple[str, Callable], set[int]] = {}
    for layer, n_pruned in zip(structure.layers, counts, strict=True):
        if n_pruned == 0 or (layer.block is not None and layer.block in dropped):
            continue
        root_channels = channels_to_prune(scores[layer.name], n_pruned)
        for member in layer.members:
            channels = removals.setdefault((member.module_name, member.handler), set())
            channels.update(c for root in root_channels for c in member.index_map[root])
    # Modules outside a dropped depth block that read its exit layer (a concatenation's
    # consumer) lose all of its channels. The block's own modules are removed below.
    for block in structure.blocks:
        if block.name not in dropped or block.exit_layer is None:
            continue
        for member in structure.layer(block.exit_layer).members:
            if _inside(member.module_name, block.modules):
                continue
            channels = removals.setdefault((member.module_name, member.handler), set())
            channels.update(c for indices in member.index_map for c in indices)
    for (module_name, handler), channels in removals.items():
        if channels:
            handler(modules[module_name], sorted(channels))
    drop_blocks(pruned_model, sorted(dropped))
    return pruned_model.eval()


def _inside(module_name: str, block_modules: tuple[str, ...]) -> bool:
    return any(module_name == member or module_name.startswith(member + ".") for member in block_modules)
