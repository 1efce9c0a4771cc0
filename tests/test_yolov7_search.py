"""The CLI on YOLOv7-tiny end to end: a fidelity-reward search logged to MLflow, apply,
export as YAML plus weights, inspect and evaluate, and the detector-specific errors.

The search runs experiments/yolov7-tiny-fidelity.yaml at a reduced input size on the two
reference photographs, with the randomly initialised detector (no trained weights are
in the reference data).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rl_pruner.models.registry import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "experiments" / "yolov7-tiny-fidelity.yaml"
INPUT_SIZE = 128
EPISODES = 4


def _cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", "rl_pruner.cli", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_yaml(shared_data: Path) -> Path:
    path = shared_data / "yolov7" / "yolov7-tiny.yaml"
    if not path.exists():
        pytest.skip(f"YOLOv7 reference configurations not found in {path.parent}")
    return path


@pytest.fixture(scope="module")
def searched(tiny_yaml: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One short search, shared by the tests that read its run or apply its policy."""
    workdir = tmp_path_factory.mktemp("yolov7-search")
    result = _cli(
        "search", str(CONFIG), "--json",
        "--set", f"model=yolov7:{tiny_yaml}", "--set", f"data={tiny_yaml.parent}",
        "--set", f"input_size={INPUT_SIZE}", "--set", f"episodes={EPISODES}",
        "--set", "baselines=[uniform]", "--set", f"output_dir={workdir / 'runs'}",
        "--set", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    return workdir, json.loads(result.stdout)


def test_search_logs_to_mlflow(searched: tuple[Path, dict]) -> None:
    workdir, summary = searched
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])

    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "episode/reward")) == list(range(EPISODES))
    assert len(client.get_metric_history(run.info.run_id, "episode/fidelity_map50")) == EPISODES
    assert "baseline/uniform/fidelity_map50" in run.data.metrics
    assert run.data.params["reward.metric"] == "fidelity_map50"
    for record in client.get_metric_history(run.info.run_id, "episode/macs_ratio"):
        assert abs(record.value / 0.5 - 1) < 0.05
    assert "policies/best_policy.json" in {a.path for a in client.list_artifacts(run.info.run_id, "policies")}


def test_apply_export_and_reload(searched: tuple[Path, dict], tiny_yaml: Path) -> None:
    workdir, summary = searched
    out = workdir / "pruned.pt"
    applied = _cli("apply", "--model", f"yolov7:{tiny_yaml}", "--random-init",
                   "--policy", summary["best_policy_artifact"], "--tracking-uri", summary["tracking_uri"],
                   "--data", str(tiny_yaml.parent), "--bn-images", "2", "--out", str(out), "--json", cwd=workdir)
    assert applied.returncode == 0, applied.stderr
    report = json.loads(applied.stdout)
    assert abs(report["macs_ratio"] / 0.5 - 1) < 0.05

    exported = _cli("export-yaml", "--model", f"pruned:{out}", "--out", str(workdir / "export"), "--json",
                    cwd=workdir)
    assert exported.returncode == 0, exported.stderr

    pruned = load_model(f"pruned:{out}")
    rebuilt = load_model(f"yolov7:{workdir / 'export' / 'model.yaml'}", workdir / "export" / "weights.pt",
                         input_size=INPUT_SIZE)
    images = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE)
    dense = load_model(f"yolov7:{tiny_yaml}", input_size=INPUT_SIZE).model
    with torch.no_grad():
        outputs = pruned.model(images)
        assert torch.equal(rebuilt.model(images), outputs)
        assert outputs.shape == dense(images).shape

    again = _cli("export-yaml", "--model", f"pruned:{out}", "--out", str(workdir / "export"), cwd=workdir)
    assert again.returncode == 2
    assert "already exists" in again.stderr


def test_apply_without_weights_asks_for_them(searched: tuple[Path, dict], tiny_yaml: Path) -> None:
    workdir, summary = searched
    result = _cli("apply", "--model", f"yolov7:{tiny_yaml}", "--policy", summary["best_policy_artifact"],
                  "--tracking-uri", summary["tracking_uri"], "--out", str(workdir / "never.pt"), cwd=workdir)
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr
    assert "--random-init" in result.stderr
    assert not (workdir / "never.pt").exists()


def _labelled_set(root: Path, yolov7_dir: Path) -> Path:
    """A two-image YOLO-format set: both photographs, one hand-placed box each."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in sorted(yolov7_dir.glob("*.jpg")):
            shutil.copy(image, root / "images" / split / image.name)
            (root / "labels" / split / f"{image.stem}.txt").write_text("17 0.5 0.5 0.4 0.6\n")
    names = ", ".join(f"c{index}" for index in range(80))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [{names}]\n")
    return root / "data.yaml"


def test_inspect_and_evaluate(tiny_yaml: Path, tmp_path: Path) -> None:
    inspected = _cli("inspect", "--model", f"yolov7:{tiny_yaml}", "--input-size", str(INPUT_SIZE), "--json",
                     cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    structure = json.loads(inspected.stdout)
    assert len(structure["layers"]) == 55
    assert len(structure["removable_blocks"]) == 8
    assert structure["output_modules"] == [f"model.77.m.{level}" for level in range(3)]

    data_yaml = _labelled_set(tmp_path / "set", tiny_yaml.parent)
    evaluated = _cli("evaluate", "--model", f"yolov7:{tiny_yaml}", "--input-size", str(INPUT_SIZE),
                     "--data", str(data_yaml), "--latency-batch", "1", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert scores["images"] == 2
    assert 0.0 <= scores["map50_95"] <= scores["map50"] <= 1.0

    folder = _cli("evaluate", "--model", f"yolov7:{tiny_yaml}", "--input-size", str(INPUT_SIZE),
                  "--data", str(tiny_yaml.parent), cwd=tmp_path)
    assert folder.returncode == 2
    assert "data YAML" in folder.stderr


def test_evaluate_rejects_other_class_count(tiny_yaml: Path, tmp_path: Path) -> None:
    data_yaml = _labelled_set(tmp_path / "set", tiny_yaml.parent)
    data_yaml.write_text(data_yaml.read_text().replace(", ".join(f"c{i}" for i in range(80)), "cat, dog, horse"))
    result = _cli("evaluate", "--model", f"yolov7:{tiny_yaml}", "--input-size", str(INPUT_SIZE),
                  "--data", str(data_yaml), cwd=tmp_path)
    assert result.returncode == 2
    assert "names 3 classes but" in result.stderr
    assert "predicts 80" in result.stderr


def test_apply_rejects_random_init_with_checkpoint(tiny_yaml: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    result = _cli("apply", "--model", f"yolov7:{tiny_yaml}", "--random-init", "--checkpoint", str(weights),
                  "--policy", str(tmp_path / "policy.json"), "--out", str(tmp_path / "never.pt"), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot be combined with --checkpoint" in result.stderr
    assert not (tmp_path / "never.pt").exists()


def test_classifier_metric_rejected_for_detector(tiny_yaml: Path, tmp_path: Path) -> None:
    result = _cli("search", str(CONFIG), "--set", f"model=yolov7:{tiny_yaml}", "--set", "reward.metric=top1",
                  cwd=tmp_path)
    assert result.returncode == 2
    assert "reward.metric" in result.stderr
    assert "detector" in result.stderr
