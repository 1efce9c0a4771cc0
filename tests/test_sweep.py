"""`rl-pruner sweep`: Ray Tune trials as MLflow child runs, a table per target and a Pareto PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rl_pruner.distributed.sweep import pareto_front
from rl_pruner.tracking import PARENT_RUN_TAG

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_CONFIG = REPO_ROOT / "experiments" / "sweep-resnet20-cifar10.yaml"


def test_pareto_front_drops_dominated_points() -> None:
    points = [(0.3, 40.0), (0.5, 60.0), (0.5, 55.0), (0.7, 58.0), (0.7, 70.0), (0.31, 39.0)]
    # (0.5, 55) loses to (0.5, 60); (0.7, 58) to (0.5, 60); (0.31, 39) to (0.3, 40).
    assert pareto_front(points) == [0, 1, 4]


def test_sweep_of_three_targets_and_two_seeds(tmp_path: Path, shared_data: Path, cifar_train_archive: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        "checkpoint": str(shared_data / "checkpoints" / "cifar10-resnet20.th"),
        "data": str(cifar_train_archive),
        "test_data": "null",
        "reward_images": "64", "bn_images": "64", "batch_size": "64", "episodes": "2",
        "ppo.episodes_per_update": "2", "ppo.n_epochs": "1",
        "output_dir": str(tmp_path / "runs"), "tracking.uri": uri,
        "sweep.max_concurrent_trials": "2",
    }
    args = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run([sys.executable, "-m", "rl_pruner.cli", "sweep", str(SWEEP_CONFIG), *args, "--json"],
                            cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)

    client = MlflowClient(uri)
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'")
    assert len(children) == 6
    assert all(child.info.status == "FINISHED" for child in children)
    combinations = {(child.data.params["macs_target"], child.data.params["seed"]) for child in children}
    assert combinations == {(target, seed) for target in ("0.3", "0.5", "0.7") for seed in ("0", "1")}
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "episode/reward")) == 2

    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.json", "sweep/best_per_target.md", "sweep/best_per_target.json"} <= artifacts
    pareto = Path(client.download_artifacts(parent.info.run_id, "plots/pareto.png", str(tmp_path)))
    assert pareto.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pareto.stat().st_size > 10_000
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/best_per_target.json",
                                                      str(tmp_path))).read_text())
    assert set(table) == {"0.3", "0.5", "0.7"}
    for target, row in table.items():
        assert abs(row["macs_ratio"] - float(target)) <= 0.01 * float(target)
        policy = client.download_artifacts(parent.info.run_id, f"policies/target_{target}/best_policy.json",
                                           str(tmp_path / target))
        assert json.loads(Path(policy).read_text())["pruning_ratios"]


@pytest.mark.parametrize("override, message", [
    ("sweep.search_alg=bayes", "sweep.search_alg"),
    ("sweep.macs_targets=[0.5,1.5]", "sweep.macs_targets"),
])
def test_bad_sweep_section_is_one_line(tmp_path: Path, override: str, message: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run([sys.executable, "-m", "rl_pruner.cli", "sweep", str(SWEEP_CONFIG), "--set", override,
                             "--set", f"output_dir={tmp_path}"], cwd=REPO_ROOT, env=env, capture_output=True,
                            check=False, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
