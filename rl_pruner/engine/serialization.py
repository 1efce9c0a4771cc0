"""Saving pruned models in a form that loads with ``torch.load(..., weights_only=True)``.

A pruned model file is a ``torch.save`` of plain values and tensors only, so loading
it never unpickles code::

    {
      "format": "rl-pruner-pruned-model", "version": 1,
      "architecture": "cifar_resnet56",     # rebuilds the dense model
      "input_shape": [3, 32, 32], "num_classes": 10,
      "normalization": {"mean": [...], "std": [...]},
      "dropped_blocks": ["layer1.4"],       # removed as the policy removed them
      "modules": {"layer1.0.conv1": {"type": "Conv2d", "in_channels": 16, ...}, ...},
      "policy": {...},                      # the policy that was applied
      "model_config": "...",                # a yolov7:PATH model's YAML text, so PATH
                                            # need not exist where the file is loaded
      "state_dict": {...},
    }

:func:`load_pruned_model` rebuilds the dense architecture by name, resizes every
recorded module to its pruned shape, replaces dropped blocks and loads the weights
key for key. The CLI reads such files as ``--model pruned:PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_pruner.data import Normalization
from rl_pruner.engine.structure import drop_blocks
from rl_pruner.errors import CheckpointError
from rl_pruner.models.checkpoint import read_checkpoint
from rl_pruner.models.cifar_resnet import ZeroPadShortcut
from rl_pruner.models.yolov7.modules import ImplicitA, ImplicitM
from rl_pruner.outputs import atomic_write

PRUNED_FORMAT = "rl-pruner-pruned-model"
PRUNED_VERSION = 1


def _module_record(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": module.in_channels,
                "out_channels": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"type": "BatchNorm", "num_features": module.num_features}
    if isinstance(module, ZeroPadShortcut):
        return {"type": "ZeroPadShortcut", **module.structure()}
    if isinstance(module, (ImplicitA, ImplicitM)):
        return {"type": "Implicit", "channel": module.channel}
    return None


def pruned_model_record(
    model: nn.Module,
    *,
    architecture: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    normalization: Normalization,
    dropped_blocks: list[str],
    policy: dict[str, Any],
) -> dict[str, Any]:
    """Everything :func:`load_pruned_model` needs, as plain values and tensors."""
    from rl_pruner.models.registry import YOLOV7_PREFIX

    modules = {}
    for name, module in model.named_modules():
        record = _module_record(module)
        if record is not None:
            modules[name] = record
    extra = {}
    if architecture.startswith(YOLOV7_PREFIX):
        config_path = Path(architecture[len(YOLOV7_PREFIX):])
        try:
            extra["model_config"] = config_path.read_text(encoding="utf-8")
        except OSError as err:
            raise CheckpointError(
                f"cannot read the model YAML {config_path} to store with the pruned model: {err.strerror or err}"
            ) from err
    return {
        **extra,
        "format": PRUNED_FORMAT,
        "version": PRUNED_VERSION,
        "architecture": architecture,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "dropped_blocks": list(dropped_blocks),
        "modules": modules,
        "policy": policy,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def save_pruned_model(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically: a crash never leaves a partial file."""
    atomic_write(path, lambda temporary: torch.save(record, temporary))


def _resize_module(module: nn.Module, record: dict[str, Any], state: dict[str, torch.Tensor], prefix: str) -> None:
    kind = record.get("type")
    if kind == "Conv2d":
        module.in_channels = int(record["in_channels"])
        module.out_channels = int(record["out_channels"])
        module.groups = int(record["groups"])
    elif kind == "Linear":
        module.in_features = int(record["in_features"])
        module.out_features = int(record["out_features"])
    elif kind == "BatchNorm":
        module.num_features = int(record["num_features"])
    elif kind == "ZeroPadShortcut":
        module.load_structure(record)
    elif kind == "Implicit":
        module.channel = int(record["channel"])
    for name, param in list(module.named_parameters(recurse=False)):
        saved = state.get(prefix + name)
        if saved is not None and saved.shape != param.shape:
            setattr(module, name, nn.Parameter(torch.empty_like(saved), requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        saved = state.get(prefix + name)
        if saved is not None and buffer is not None and saved.shape != buffer.shape:
            module._buffers[name] = torch.empty_like(saved)


def load_pruned_model(path: str | Path) -> Any:
    """Rebuild a model saved by :func:`save_pruned_model`; returns a ``LoadedModel``."""
    from rl_pruner.models.registry import LoadedModel, build_architecture, default_image_size

    if not Path(path).is_file():
        raise CheckpointError(
            f"pruned model {path} not found; pass a file written by 'rl-pruner apply' as --model pruned:PATH"
        )
    record = read_checkpoint(path)
    if not isinstance(record, dict) or record.get("format") != PRUNED_FORMAT:
        raise CheckpointError(
            f"{path} is not a pruned model saved by rl-pruner; use 'rl-pruner apply' to make one, "
            "or pass a dense checkpoint with --checkpoint"
        )
    if record.get("version") != PRUNED_VERSION:
        raise CheckpointError(f"{path} has pruned-model version {record.get('version')!r}; this rl-pruner reads {PRUNED_VERSION}")
    try:
        model, _ = build_architecture(
            record["architecture"], int(record["num_classes"]), config_text=record.get("model_config")
        )
        drop_blocks(model, list(record["dropped_blocks"]))
        modules = dict(model.named_modules())
        state = record["state_dict"]
        for name, module_record in record["modules"].items():
            if name not in modules:
                raise KeyError(f"module {name}")
            _resize_module(modules[name], module_record, state, f"{name}." if name else "")
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"pruned model {path} is inconsistent ({err}); re-create it with 'rl-pruner apply'") from err
    model.eval()
    normalization = Normalization(tuple(record["normalization"]["mean"]), tuple(record["normalization"]["std"]))
    return LoadedModel(
        architecture=record["architecture"],
        model=model,
        input_shape=tuple(record["input_shape"]),
        normalization=normalization,
        num_classes=int(record["num_classes"]),
        image_size=default_image_size(record["architecture"], tuple(record["input_shape"])),
        pruned=record,
    )
