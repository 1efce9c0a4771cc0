"""Helpers shared by the benchmark scripts: reference data paths and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def shared_data() -> Path:
    """Reference data directory: ``$RL_PRUNER_SHARED_DATA``, else ``shared/data`` beside the checkout."""
    configured = os.environ.get("RL_PRUNER_SHARED_DATA")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise SystemExit(f"reference data not found at {path}; set RL_PRUNER_SHARED_DATA")
    return path


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` with the machine description to benchmarks/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
