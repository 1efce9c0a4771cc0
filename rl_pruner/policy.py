"""Pruning policies: what to remove from one model, in one versioned JSON format.

A policy is written by ``rl-pruner policy`` and by searches, and read by
``rl-pruner apply``. Example (format version 1)::

    {
      "format": "rl-pruner-policy",
      "version": 1,
      "model": {"architecture": "cifar_resnet56", "fingerprint": "sha256:...",
                "input_shape": [3, 32, 32]},
      "criterion": "l1",
      "round_to": 8,
      "pruning_ratios": {"conv1": 0.25, "layer1.0.conv1": 0.5},
      "dropped_blocks": ["layer1.4"],
      "metadata": {"source": "uniform", "macs_target": 0.5}
    }

``pruning_ratios`` maps a layer (the root module of a dependency group, as
``rl-pruner inspect`` lists them) to the fraction of its channels removed, in
[0, 1). A layer left out keeps all its channels. ``dropped_blocks`` lists residual
blocks replaced by the identity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl_pruner.errors import PolicyError

POLICY_FORMAT = "rl-pruner-policy"
POLICY_VERSION = 1
CRITERIA = ("l1", "l2", "lamp", "fpgm", "bn_scale", "apoz", "taylor")
# Criteria that score channels on calibration images, not on the weights alone.
DATA_CRITERIA = ("taylor", "apoz")


@dataclass
class Policy:
    """Per-layer pruning ratios and dropped blocks for one model structure."""

    architecture: str
    fingerprint: str
    input_shape: tuple[int, ...]
    pruning_ratios: dict[str, float]
    dropped_blocks: list[str] = field(default_factory=list)
    criterion: str = "l1"
    round_to: int = 8
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "version": POLICY_VERSION,
            "model": {
                "architecture": self.architecture,
                "fingerprint": self.fingerprint,
                "input_shape": list(self.input_shape),
            },
            "criterion": self.criterion,
            "round_to": self.round_to,
            "pruning_ratios": dict(self.pruning_ratios),
            "dropped_blocks": list(self.dropped_blocks),
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, record: Any, source: str = "policy") -> Policy:
        """Build a policy from parsed JSON, raising PolicyError on any malformed field."""
        if not isinstance(record, Mapping):
            raise PolicyError(f"{source} is not a JSON object; write a policy with 'rl-pruner policy'")
        if record.get("format") != POLICY_FORMAT:
            raise PolicyError(
                f"{source} is not an rl-pruner policy (format={record.get('format')!r}, "
                f"expected {POLICY_FORMAT!r}); write one with 'rl-pruner policy'"
            )
        if record.get("version") != POLICY_VERSION:
            raise PolicyError(
                f"{source} has policy format version {record.get('version')!r}; "
                f"this rl-pruner reads version {POLICY_VERSION}"
            )

        model = _require(record, "model", Mapping, source)
        ratios = _require(record, "pruning_ratios", Mapping, source)
        for layer, ratio in ratios.items():
            check_ratio(ratio, f"{source}: pruning ratio of layer {layer!r}")

        dropped = record.get("dropped_blocks", [])
        if not isinstance(dropped, list) or not all(isinstance(b, str) for b in dropped):
            raise PolicyError(f"{source}: 'dropped_blocks' must be a list of block names")
        criterion = record.get("criterion", "l1")
        check_criterion(criterion, f"{source}: criterion")
        round_to = record.get("round_to", 8)
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise PolicyError(f"{source}: 'round_to' must be an integer >= 1, got {round_to!r}")
        shape = model.get("input_shape", [])
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise PolicyError(f"{source}: 'model.input_shape' must be a list of integers")

        return cls(
            architecture=str(model.get("architecture", "")),
            fingerprint=str(model.get("fingerprint", "")),
            input_shape=tuple(shape),
            pruning_ratios={str(k): float(v) for k, v in ratios.items()},
            dropped_blocks=list(dropped),
            criterion=criterion,
            round_to=round_to,
            metadata=dict(record.get("metadata", {}) or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read and validate a policy JSON file."""
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy {path} not found; pass an existing file to --policy")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"policy {path} is not valid JSON ({err}); fix or regenerate the file") from err
        return cls.from_dict(record, source=f"policy {path}")

    def save(self, path: str | Path) -> None:
        """Write the policy as JSON, creating missing parent directories."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


def _require(record: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind):
        raise PolicyError(f"{source}: field {key!r} is missing or not a JSON {'object' if kind is Mapping else kind.__name__}")
    return value


def check_ratio(ratio: Any, what: str) -> float:
    """Validate a pruning ratio (fraction removed): a number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise PolicyError(f"{what} is {ratio!r}; it must be a number in [0, 1)")
    if not 0.0 <= ratio < 1.0:
        raise PolicyError(f"{what} is {ratio}; pruning ratios are fractions removed, in [0, 1)")
    return float(ratio)


def check_criterion(criterion: Any, what: str = "criterion") -> str:
    if criterion not in CRITERIA:
        raise PolicyError(f"{what} {criterion!r} is unknown; choose one of {', '.join(CRITERIA)}")
    return str(criterion)
