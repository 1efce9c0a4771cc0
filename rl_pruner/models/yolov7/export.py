"""Export of a pruned YOLOv7 as an official-style model YAML with explicit widths, plus its weights.

:func:`export_yolov7` rewrites the rows of the YAML that the dense model was built
from so that :func:`~rl_pruner.models.yolov7.model.build_yolov7` rebuilds the pruned
model, and renames the pruned model's state_dict to match:

- ``width_multiple`` and ``depth_multiple`` become 1.0, and each Conv and RepConv row
  states its actual output channels. Every other argument is kept as written, e.g.
  the string ``nn.LeakyReLU(0.1)``.
- Layers removed by depth pruning are left out, the rest are renumbered, and every
  ``from`` entry is recomputed: a relative entry (negative) stays relative, an absolute
  one stays absolute.
- Each SPPCSPC layer becomes twelve plain layers (nine plus one SP per pooling
  window), because pruning sizes its internal convolutions independently and its
  row has a single width. See :func:`_expand_sppcspc` for the layer order.

A YAML cannot express every pruned model. The loader rounds each Conv width up to a
multiple of 8, except the head width (anchors x (classes + 5)), so widths pruned with
``round_to`` below 8 are rejected. Fused models (batch norms folded, RepConv branches
merged) are rejected too, because the YAML describes the unfused layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from rl_pruner.errors import ConfigError
from rl_pruner.models.yolov7.model import MODULES, DroppedLayer, YOLOv7
from rl_pruner.models.yolov7.modules import SPPCSPC, Conv, IDetect, RepConv, batch_norm

logger = logging.getLogger(__name__)

# The loader keeps a width that is a multiple of this (with width_multiple 1.0) and
# rounds any other width up to one.
WIDTH_DIVISOR = 8

_WIDTH_MODULES = ("Conv", "RepConv")
_TOP_LEVEL_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors")


@dataclass(frozen=True)
class _Reference:
    """An input of an exported row: a new layer index (-1 is the image) and how to write it."""

    target: int
    relative: bool


@dataclass
class _Row:
    """One row of the exported YAML, with the weights it takes over."""

    part: str  # "backbone" or "head"
    references: list[_Reference]
    takes_list: bool
    number: int
    module: str
    args: list[Any]
    # (old state_dict prefix, new state_dict prefix) pairs.
    renames: list[tuple[str, str]] = field(default_factory=list)
    # Entries the exported layer has and the model's layer lacks, by new state_dict key.
    added_state: dict[str, torch.Tensor] = field(default_factory=dict)


def export_yolov7(model: YOLOv7, config_path_or_text: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Write ``model`` (dense or pruned, unfused) as model YAML text and a matching state_dict.

    Args:
        model: a YOLOv7 built from ``config_path_or_text``, possibly channel-pruned and
            depth-pruned by :class:`~rl_pruner.engine.pruner.Pruner`.
        config_path_or_text: the YAML the dense model was built from, as a path, or as
            the YAML text itself (a ``str`` containing a line break is taken as text).

    Returns:
        The YAML text and the state_dict. ``build_yolov7`` on a file with that text,
        followed by ``load_state_dict(state_dict, strict=True)``, gives a model whose
        eval outputs equal ``model``'s exactly. The tensors are those of
        ``model.state_dict()``, not copies, plus zero identity branches where a pruned
        RepConv gains one (see :func:`_zero_identity_branches`). Top-level keys other
        than nc, anchors, the multiples and the layer lists are not written.

    Raises:
        ConfigError: the configuration is unreadable or does not describe ``model``, the
            model is fused, or a pruned width cannot be written (prune with round_to 8).
    """
    raw, source = _read_config(config_path_or_text)
    parts = _layer_parts(raw, source)
    _check_layers_match(model, parts, source)
    _check_unfused(model)

    rows = _exported_rows(model, parts, source)
    text = _yaml_text(raw, model.head.nc, rows, source)
    state_dict = _renamed_state_dict(model, rows)
    logger.info("exported %s: %d layers in the YAML (from %d), %d tensors", source, len(rows),
                len(model.model) - len(model.dropped_layers), len(state_dict))
    return text, state_dict


def _read_config(config: str | Path) -> tuple[dict[str, Any], str]:
    """Return the parsed YAML and a description of where it came from, for messages."""
    if isinstance(config, str) and "\n" in config:
        text, source = config, "model configuration text"
    else:
        path = Path(config)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read model configuration {path}: {err.strerror or err}") from err
        source = str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    missing = [key for key in (*_TOP_LEVEL_KEYS, "backbone", "head") if key not in raw]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}. It is not a YOLOv7 model configuration")
    return raw, source


def _layer_parts(raw: dict[str, Any], source: str) -> list[tuple[str, list[Any]]]:
    """Return ``(part, row)`` for every layer row, backbone first."""
    parts = []
    for part in ("backbone", "head"):
        if not isinstance(raw[part], list):
            raise ConfigError(f"{source}: {part} must be a list of [from, number, module, args] rows")
        for row in raw[part]:
            if not isinstance(row, list) or len(row) != 4 or not isinstance(row[3], list):
                raise ConfigError(f"{source}: layer {len(parts)}: expected [from, number, module, args], got {row!r}")
            parts.append((part, row))
    return parts


def _check_layers_match(model: YOLOv7, parts: list[tuple[str, list[Any]]], source: str) -> None:
    """Raise ConfigError unless every row names the type of the model's layer at its index."""
    if len(parts) != len(model.model):
        raise ConfigError(f"{source} has {len(parts)} layers but the model has {len(model.model)}. "
                          "Pass the configuration the dense model was built from")
    for index, (layer, (_, row)) in enumerate(zip(model.model, parts, strict=True)):
        if isinstance(layer, DroppedLayer):
            continue
        name = row[2].strip() if isinstance(row[2], str) else row[2]
        module_type = MODULES.get(name) if isinstance(name, str) else None
        members = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        if not isinstance(module_type, type) or not all(type(member) is module_type for member in members):
            raise ConfigError(f"{source}: layer {index} is {name!r} but the model's layer {index} is "
                              f"{type(layer).__name__}. Pass the configuration the dense model was built from")


def _check_unfused(model: YOLOv7) -> None:
    for name, module in model.named_modules():
        fused = (
            (isinstance(module, Conv) and module.bn is None)
            or (isinstance(module, RepConv) and module.rbr_reparam is not None)
            or (isinstance(module, IDetect) and module.ia is None)
        )
        if fused:
            raise ConfigError(f"{name} is fused, and a model YAML describes unfused layers. "
                              "Export the pruned model before calling fuse()")


def _exported_rows(model: YOLOv7, parts: list[tuple[str, list[Any]]], source: str) -> list[_Row]:
    """Build the rows of the exported YAML, with ``from`` entries as new layer indices."""
    head_width = model.head.na * model.head.no

    # New index of each kept layer's first row and of the row that yields its output.
    first_row: dict[int, int] = {}
    output_row: dict[int, int] = {-1: -1}
    n_rows = 0
    for index, layer in enumerate(model.model):
        if index in model.dropped_layers:
            continue
        first_row[index] = n_rows
        n_rows += _n_sppcspc_rows(layer) if isinstance(layer, SPPCSPC) else 1
        output_row[index] = n_rows - 1

    rows: list[_Row] = []
    for index, layer in enumerate(model.model):
        if index in model.dropped_layers:
            continue
        part, (from_field, _, module, args) = parts[index]
        references = _references(model, index, from_field, output_row, source)
        if isinstance(layer, SPPCSPC):
            rows.extend(_expand_sppcspc(layer, index, part, references[0], first_row[index], head_width, source))
            continue
        members = list(layer) if isinstance(layer, nn.Sequential) else [layer]
        row_args = list(args)
        if module.strip() in _WIDTH_MODULES:
            row_args[0] = _layer_width(members, index, module.strip(), head_width, source)
        rows.append(_Row(
            part=part,
            references=references,
            takes_list=isinstance(from_field, list),
            number=len(members),
            module=module,
            args=row_args,
            renames=[(f"model.{index}.", f"model.{first_row[index]}.")],
            added_state=_zero_identity_branches(members, first_row[index]),
        ))
    return rows


def _zero_identity_branches(members: Sequence[nn.Module], position: int) -> dict[str, torch.Tensor]:
    """Return state_dict entries for identity branches that the rebuilt RepConvs gain.

    RepConv has an identity branch exactly when its input and output widths are equal
    (at stride 1). Pruning can make the widths of a RepConv equal that had none, and a
    YAML row cannot leave the branch out. A batch norm with weight and bias 0 makes the
    branch add exactly 0 in eval mode, so outputs stay equal.

    NOTE: in training mode the branch is trainable and its weight grows away from 0, so
    fine-tuning the exported model trains a RepConv with an identity branch.
    """
    added = {}
    for repeat, member in enumerate(members):
        if not isinstance(member, RepConv) or member.rbr_identity is not None or member.rbr_dense is None:
            continue
        dense = member.rbr_dense[0]
        if dense.stride != (1, 1) or dense.weight.shape[0] != dense.weight.shape[1] * dense.groups:
            continue
        identity = batch_norm(dense.weight.shape[0]).to(device=dense.weight.device, dtype=dense.weight.dtype)
        nn.init.zeros_(identity.weight)
        prefix = f"model.{position}." + (f"{repeat}." if len(members) > 1 else "") + "rbr_identity."
        added.update({prefix + key: tensor.detach() for key, tensor in identity.state_dict().items()})
    return added


def _references(
    model: YOLOv7, index: int, from_field: Any, output_row: dict[int, int], source: str
) -> list[_Reference]:
    """Map the model's current inputs of layer ``index`` to new rows, written as the YAML wrote them."""
    entries = from_field if isinstance(from_field, list) else [from_field]
    relative: dict[int, bool] = {}
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise ConfigError(f"{source}: layer {index}: from must be a layer index or a list of them, got {entry!r}")
        if index == 0 and entry == -1:
            relative.setdefault(-1, False)  # the image stays -1 in any form
        else:
            relative.setdefault(index + entry if entry < 0 else entry, entry < 0)

    references = []
    for input_layer in model.sources[index]:
        if input_layer not in relative or input_layer not in output_row:
            raise ConfigError(f"{source}: layer {index} reads layer {input_layer} in the model but its from "
                              f"field is {from_field!r}. Pass the configuration the dense model was built from")
        references.append(_Reference(output_row[input_layer], relative[input_layer]))
    return references


def _n_sppcspc_rows(block: SPPCSPC) -> int:
    return 9 + len(block.m)


def _expand_sppcspc(
    block: SPPCSPC, index: int, part: str, block_input: _Reference, first: int, head_width: int, source: str
) -> list[_Row]:
    """Write an SPPCSPC as plain layers that compute what its forward computes.

    The rows, from new index ``first``: cv1, cv3 (3x3), cv4, one SP per pooling window
    (each reading cv4), Concat [cv4, pools in order], cv5, cv6 (3x3), cv2 (reading the
    block input), Concat [cv6, cv2], cv7. Every Conv uses the default activation (SiLU),
    as the block's do.
    """
    def conv_row(name: str, kernel_size: int, references: list[_Reference], position: int) -> _Row:
        conv = getattr(block, name)
        width = _checked_width(conv.conv.weight.shape[0], index, f"SPPCSPC {name}", head_width, source)
        return _Row(part, references, False, 1, "Conv", [width, kernel_size, 1],
                    renames=[(f"model.{index}.{name}.", f"model.{position}.")])

    def previous(position: int, steps: int = 1) -> _Reference:
        return _Reference(position - steps, relative=True)

    n_pools = len(block.m)
    concat_pools = first + 3 + n_pools
    cv2_position = concat_pools + 3
    rows = [
        conv_row("cv1", 1, [_Reference(block_input.target, block_input.relative)], first),
        conv_row("cv3", 3, [previous(first + 1)], first + 1),
        conv_row("cv4", 1, [previous(first + 2)], first + 2),
    ]
    for pool in block.m:
        rows.append(_Row(part, [_Reference(first + 2, relative=True)], False, 1, "SP", [_pool_size(pool, index, source)]))
    pooled = [_Reference(first + 2 + offset, relative=True) for offset in range(n_pools + 1)]
    rows.append(_Row(part, pooled, True, 1, "Concat", [1]))
    rows += [
        conv_row("cv5", 1, [previous(concat_pools + 1)], concat_pools + 1),
        conv_row("cv6", 3, [previous(concat_pools + 2)], concat_pools + 2),
        conv_row("cv2", 1, [_Reference(block_input.target, block_input.relative)], cv2_position),
        _Row(part, [previous(cv2_position + 1, 2), previous(cv2_position + 1)], True, 1, "Concat", [1]),
        conv_row("cv7", 1, [previous(cv2_position + 2)], cv2_position + 2),
    ]
    return rows


def _pool_size(pool: nn.Module, index: int, source: str) -> int:
    """Return the window of an SPPCSPC max pool, which an SP layer with that window reproduces."""
    kernel_size, stride, padding = pool.kernel_size, pool.stride, pool.padding
    if not isinstance(kernel_size, int) or stride != 1 or padding != kernel_size // 2:
        raise ConfigError(f"{source}: layer {index} (SPPCSPC) pools with kernel {kernel_size}, stride "
                          f"{stride}, padding {padding}, which an SP layer cannot reproduce")
    return kernel_size


def _layer_width(members: Sequence[nn.Module], index: int, module: str, head_width: int, source: str) -> int:
    """Return the output width shared by a layer's repeated modules."""
    widths = {_output_width(member) for member in members}
    if len(widths) != 1:
        raise ConfigError(f"{source}: layer {index} ({module}) repeats modules of different widths "
                          f"{sorted(widths)}, which one row cannot express")
    return _checked_width(widths.pop(), index, module, head_width, source)


def _output_width(module: nn.Module) -> int:
    if isinstance(module, Conv):
        return module.conv.weight.shape[0]
    if isinstance(module, RepConv) and module.rbr_dense is not None:
        return module.rbr_dense[0].weight.shape[0]
    raise TypeError(f"no output width for {type(module).__name__}")


def _checked_width(width: int, index: int, where: str, head_width: int, source: str) -> int:
    """Return ``width`` if the loader keeps it as written, else raise ConfigError."""
    if width % WIDTH_DIVISOR == 0 or width == head_width:
        return width
    raise ConfigError(
        f"{source}: layer {index} ({where}) has {width} output channels, which a model YAML cannot "
        f"express because the loader rounds every width up to a multiple of {WIDTH_DIVISOR} (except the "
        f"head width {head_width}). Prune with round_to=8 and export again"
    )


def _yaml_text(raw: dict[str, Any], num_classes: int, rows: list[_Row], source: str) -> str:
    lines = [
        f"# Written by rl-pruner from {source}.",
        "# Widths are explicit: width_multiple and depth_multiple are 1.0, each Conv and RepConv",
        "# lists its actual output channels, and SPPCSPC blocks are written as plain layers.",
        "",
        f"nc: {num_classes}",
        "depth_multiple: 1.0",
        "width_multiple: 1.0",
        "",
        "anchors:",
        *(f"  - {_flow(level)}" for level in raw["anchors"]),
    ]
    for part in ("backbone", "head"):
        lines += ["", f"{part}:"]
        part_rows = [(position, row) for position, row in enumerate(rows) if row.part == part]
        if not part_rows:
            lines[-1] += " []"
        for position, row in part_rows:
            from_values = [
                reference.target - position if reference.relative else reference.target
                for reference in row.references
            ]
            from_field: Any = from_values if row.takes_list else from_values[0]
            lines.append(f"  - {_flow([from_field, row.number, row.module, row.args])}  # {position}")
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """Return ``value`` as one line of flow-style YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()


def _renamed_state_dict(model: YOLOv7, rows: list[_Row]) -> dict[str, torch.Tensor]:
    """Return the model's state_dict with every key moved to its exported layer index."""
    source_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for row in rows:
        for old_prefix, new_prefix in row.renames:
            for key, tensor in source_state.items():
                if key.startswith(old_prefix):
                    state[new_prefix + key[len(old_prefix):]] = tensor
        state.update(row.added_state)
    n_added = sum(len(row.added_state) for row in rows)
    if len(state) != len(source_state) + n_added:
        raise RuntimeError(f"exported {len(state)} of the model's {len(source_state)} state_dict entries, "
                           "so a layer holds weights that no exported row takes over")
    return state


__all__ = ["export_yolov7"]
