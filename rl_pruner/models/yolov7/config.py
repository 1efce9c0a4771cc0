"""Safe loading of YOLOv7 model configurations (the official ``*.yaml`` layout).

A configuration contains ``nc`` (number of classes), ``depth_multiple``,
``width_multiple``, ``anchors`` and two layer lists, ``backbone`` then ``head``. Each
layer is ``[from, number, module, args]``. ``from`` is the input layer index, or a list
of them, where negative values count back from the current layer (-1 is the previous
one). ``number`` repeats the module, ``module`` names it, and ``args`` are its
constructor arguments.

The official loader runs every string argument through ``eval``. Here each string is
parsed with :mod:`ast` and only these forms are accepted:

- literals: numbers, strings, ``None``, ``True``, ``False``, lists and tuples of them,
  and a unary minus on a number;
- the names ``nc`` and ``anchors``, which take their values from the configuration;
- a bare identifier such as ``nearest``, kept as the string it spells (the
  interpolation mode of ``nn.Upsample`` is written this way);
- a call of an activation constructor from :data:`ACTIVATIONS` (``nn.LeakyReLU(0.1)``)
  with literal arguments.

Anything else (attribute access, subscripts, lambdas, comprehensions, other calls) is
rejected with a :class:`~rl_pruner.errors.ConfigError` that names the layer and the
text, and nothing in it is evaluated.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from rl_pruner.errors import ConfigError

# Activation constructors that layer arguments may call, with the keyword arguments
# each accepts. Positional arguments must be literal numbers or booleans.
ACTIVATIONS: dict[str, tuple[type[nn.Module], frozenset[str]]] = {
    "nn.LeakyReLU": (nn.LeakyReLU, frozenset({"negative_slope", "inplace"})),
    "nn.ReLU": (nn.ReLU, frozenset({"inplace"})),
    "nn.SiLU": (nn.SiLU, frozenset({"inplace"})),
    "nn.Hardswish": (nn.Hardswish, frozenset({"inplace"})),
    "nn.Identity": (nn.Identity, frozenset()),
}

# Names that layer arguments may use, resolved from the configuration's own fields.
CONFIG_NAMES = ("nc", "anchors")

_REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


@dataclass(frozen=True)
class ActivationSpec:
    """An activation constructor call read from a configuration, built on demand."""

    constructor: str  # a key of ACTIVATIONS, e.g. "nn.LeakyReLU"
    args: tuple[float | bool, ...] = ()
    kwargs: tuple[tuple[str, float | bool], ...] = ()

    def build(self) -> nn.Module:
        """Return a new activation module."""
        module_type, _ = ACTIVATIONS[self.constructor]
        return module_type(*self.args, **dict(self.kwargs))


@dataclass(frozen=True)
class LayerSpec:
    """One ``[from, number, module, args]`` row, with its arguments already resolved."""

    index: int
    sources: tuple[int, ...]  # absolute input layer indices; -1 is the model input
    repeats: int  # before the depth multiple is applied
    module: str  # module name as written, e.g. "Conv" or "nn.Upsample"
    args: tuple[Any, ...]
    takes_list: bool  # whether ``from`` was a list (the module then receives a list)


@dataclass(frozen=True)
class YOLOv7Config:
    """A validated YOLOv7 model configuration."""

    num_classes: int
    depth_multiple: float
    width_multiple: float
    anchors: tuple[tuple[float, ...], ...]  # per detection level: w1, h1, w2, h2, ... in pixels
    layers: tuple[LayerSpec, ...]
    source: str  # file the configuration was read from, for messages


def load_yolov7_config(
    path: str | Path,
    num_classes: int | None = None,
    module_names: Sequence[str] | None = None,
    text: str | None = None,
) -> YOLOv7Config:
    """Read and validate a YOLOv7 model YAML without evaluating any of its text.

    With ``text``, that YAML text is parsed and ``path`` only names it in messages (a
    pruned model file carries the text of the configuration it was built from).

    ``num_classes`` replaces the file's ``nc`` (and so every argument written as
    ``nc``). ``module_names`` restricts the ``module`` column to those names; by default
    any name is accepted here and checked when the model is built.

    Raises:
        ConfigError: the file is missing, is not valid YAML, lacks a key, or a layer is
            malformed or contains an argument outside the accepted forms.
    """
    path = Path(path)
    raw = _read_yaml(path, text)
    source = str(path)

    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}. A YOLOv7 model "
                          f"configuration needs {', '.join(_REQUIRED_KEYS)}")
    n_classes = _positive_int(raw["nc"], "nc", source) if num_classes is None else num_classes
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {n_classes!r}")
    depth_multiple = _positive_number(raw["depth_multiple"], "depth_multiple", source)
    width_multiple = _positive_number(raw["width_multiple"], "width_multiple", source)
    anchors = _anchors(raw["anchors"], source)

    names = {"nc": n_classes, "anchors": [list(level) for level in anchors]}
    rows = _layer_rows(raw, source)
    layers = tuple(
        _layer(index, row, names, module_names, source) for index, row in enumerate(rows)
    )
    return YOLOv7Config(
        num_classes=n_classes,
        depth_multiple=depth_multiple,
        width_multiple=width_multiple,
        anchors=anchors,
        layers=layers,
        source=source,
    )


def _read_yaml(path: Path, text: str | None = None) -> dict[str, Any]:
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read model configuration {path}: {err.strerror or err}") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key} must be finite, got {value!r}")
    return float(value)


def _anchors(value: Any, source: str) -> tuple[tuple[float, ...], ...]:
    """Return anchor sizes per level. Every level needs the same even number of values."""
    expected = "a list of levels, each a list of anchor widths and heights in pixels"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: anchors must be {expected}, got {value!r}")
    levels = []
    for level in value:
        if not isinstance(level, list) or not level or len(level) % 2:
            raise ConfigError(f"{source}: anchors must be {expected}, but level {level!r} "
                              "does not contain an even number of values")
        for size in level:
            if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
                raise ConfigError(f"{source}: anchor sizes must be positive numbers, got {size!r}")
        levels.append(tuple(float(size) for size in level))
    if len({len(level) for level in levels}) != 1:
        raise ConfigError(f"{source}: every anchor level must contain the same number of anchors")
    return tuple(levels)


def _layer_rows(raw: Mapping[str, Any], source: str) -> list[Any]:
    rows: list[Any] = []
    for part in ("backbone", "head"):
        if not isinstance(raw[part], list):
            raise ConfigError(f"{source}: {part} must be a list of [from, number, module, args] rows")
        rows.extend(raw[part])
    return rows


def _layer(
    index: int,
    row: Any,
    names: Mapping[str, Any],
    module_names: Sequence[str] | None,
    source: str,
) -> LayerSpec:
    where = f"{source}: layer {index}"
    if not isinstance(row, list) or len(row) != 4:
        raise ConfigError(f"{where}: expected [from, number, module, args], got {row!r}")
    from_field, repeats, module, args = row

    sources = _sources(from_field, index, where)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"{where}: number must be a positive integer, got {repeats!r}")
    if not isinstance(module, str):
        raise ConfigError(f"{where}: module must be a name, got {module!r}")
    module = module.strip()
    if module_names is not None and module not in module_names:
        raise ConfigError(f"{where}: unknown module {module!r}. Known modules: "
                          f"{', '.join(sorted(module_names))}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}: args must be a list, got {args!r}")

    resolved = tuple(_argument(value, names, where) for value in args)
    return LayerSpec(
        index=index,
        sources=sources,
        repeats=repeats,
        module=module,
        args=resolved,
        takes_list=isinstance(from_field, list),
    )


def _sources(from_field: Any, index: int, where: str) -> tuple[int, ...]:
    """Return absolute input indices. Only layer 0 may read the model input (-1)."""
    entries = from_field if isinstance(from_field, list) else [from_field]
    if not entries:
        raise ConfigError(f"{where}: from must name at least one layer")
    sources = []
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise ConfigError(f"{where}: from must be a layer index or a list of them, got {entry!r}")
        absolute = index + entry if entry < 0 else entry
        is_model_input = index == 0 and entry == -1
        if not is_model_input and not 0 <= absolute < index:
            raise ConfigError(f"{where}: from entry {entry} does not name an earlier layer")
        sources.append(-1 if is_model_input else absolute)
    return tuple(sources)


def _argument(value: Any, names: Mapping[str, Any], where: str) -> Any:
    """Resolve one argument: YAML scalars and lists pass as they are, strings are parsed safely."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list):
        return [_argument(item, names, where) for item in value]
    if isinstance(value, str):
        return _parse_expression(value, names, where)
    raise ConfigError(f"{where}: argument {value!r} of type {type(value).__name__} is not allowed")


def _parse_expression(text: str, names: Mapping[str, Any], where: str) -> Any:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"{where}: argument {text!r} is not a valid expression") from err
    try:
        return _node_value(tree.body, names)
    except _RejectedExpression as err:
        raise ConfigError(f"{where}: argument {text!r} is not allowed ({err}). Arguments may be "
                          "literals, nc, anchors, or an activation call such as "
                          "nn.LeakyReLU(0.1)") from None


class _RejectedExpression(Exception):
    """An expression node outside the accepted forms (internal to the parser)."""


def _node_value(node: ast.expr, names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return node.value
        raise _RejectedExpression(f"constant {node.value!r}")
    if isinstance(node, ast.Name):
        # A bare word that is not a configuration name is data, such as 'nearest'.
        return names.get(node.id, node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_node_value(item, names) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _literal_number(node.operand)
        return -operand
    if isinstance(node, ast.Call):
        return _activation(node)
    raise _RejectedExpression(f"{type(node).__name__} expressions are not accepted")


def _literal_number(node: ast.expr) -> float | int | bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float)):
        return node.value
    raise _RejectedExpression("only literal numbers and booleans may be used here")


def _activation(node: ast.Call) -> ActivationSpec:
    constructor = _dotted_name(node.func)
    if constructor not in ACTIVATIONS:
        raise _RejectedExpression(
            f"call of {constructor or 'an expression'} (callable constructors: "
            f"{', '.join(ACTIVATIONS)})"
        )
    _, keywords = ACTIVATIONS[constructor]
    args = tuple(_literal_number(arg) for arg in node.args)
    kwargs = []
    for keyword in node.keywords:
        if keyword.arg not in keywords:
            raise _RejectedExpression(f"keyword {keyword.arg!r} of {constructor}")
        kwargs.append((keyword.arg, _literal_number(keyword.value)))
    return ActivationSpec(constructor=constructor, args=args, kwargs=tuple(kwargs))


def _dotted_name(node: ast.expr) -> str | None:
    """Return an ``nn.Name`` callee as that string, and None for any other callee."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "nn"
    ):
        return f"nn.{node.attr}"
    return None
