"""``rl-pruner pipeline``: sparsify, search, apply and finetune as child runs of one MLflow run.

The chain runs on the digits demo with one epoch per training stage and a few search
episodes, so the file stays within a few minutes on two loaded CPU cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from rl_pruner.cli import main
from rl_pruner.models.registry import load_model
from rl_pruner.pipeline import PIPELINE_STAGES, load_pipeline_config, run_pipeline
from rl_pruner.tracking import PARENT_RUN_TAG

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO_ROOT / "experiments" / "pipeline-demo.yaml"
# Small budgets: one pass over the digits per training stage and two PPO updates.
TINY = ["episodes=8", "pipeline.sparsify.epochs=1", "pipeline.sparsify.batch_size=256",
        "pipeline.finetune.epochs=1", "pipeline.finetune.batch_size=256"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the digits layers are too small for more to help."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _overrides(directory: Path, *extra: str) -> list[str]:
    return [f"tracking.uri=sqlite:///{directory / 'mlflow.db'}", f"output_dir={directory / 'runs'}", *TINY, *extra]


def _set_flags(overrides: list[str]) -> list[str]:
    return [flag for override in overrides for flag in ("--set", override)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], MlflowClient, Path]:
    """The summary of one full pipeline run, a client of its store, and its directory."""
    directory = tmp_path_factory.mktemp("pipeline")
    config = load_pipeline_config(EXPERIMENT, _overrides(directory))
    summary = run_pipeline(config)
    return summary, MlflowClient(f"sqlite:///{directory / 'mlflow.db'}"), directory


def test_parent_and_children_finished(finished: tuple[dict[str, Any], MlflowClient, Path]) -> None:
    summary, client, _ = finished
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rl_pruner.command"] == "pipeline"
    assert PARENT_RUN_TAG not in parent.data.tags

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(run.info.run_id for run in children) == sorted(
        summary["stages"][stage]["run_id"] for stage in PIPELINE_STAGES
    )
    for stage in PIPELINE_STAGES:
        child = client.get_run(summary["stages"][stage]["run_id"])
        assert child.info.status == "FINISHED", stage
        assert child.data.tags[PARENT_RUN_TAG] == parent.info.run_id, stage
        assert summary["stages"][stage]["status"] == "FINISHED", stage


def test_summary_artifact_and_metrics(
    finished: tuple[dict[str, Any], MlflowClient, Path], tmp_path: Path
) -> None:
    summary, client, directory = finished
    local = client.download_artifacts(summary["run_id"], "pipeline/summary.json", str(tmp_path))
    logged = json.loads(Path(local).read_text())
    assert list(logged["stages"]) == list(PIPELINE_STAGES)
    assert logged["stages"] == json.loads(json.dumps(summary["stages"]))
    assert Path(logged["output_dir"]) == directory / "runs" / summary["run_id"]
    for record in logged["stages"].values():
        assert Path(record["output"]).is_relative_to(directory / "runs" / summary["run_id"])
        assert Path(record["output"]).is_file()

    metrics = client.get_run(summary["run_id"]).data.metrics
    for stage in PIPELINE_STAGES:
        assert 0.0 <= metrics[f"pipeline/{stage}/test_top1"] <= 100.0, stage
    assert metrics["pipeline/finetune/test_top1"] == summary["stages"]["finetune"]["metrics"]["test_top1"]
    assert 0.0 < metrics["pipeline/apply/macs_ratio"] < 1.0


def test_search_used_sparsified_checkpoint(finished: tuple[dict[str, Any], MlflowClient, Path]) -> None:
    summary, client, _ = finished
    sparsified = summary["stages"]["sparsify"]["output"]
    assert sparsified.endswith("sparsify/sparsified.pt")
    search = client.get_run(summary["stages"]["search"]["run_id"])
    assert search.data.params["checkpoint"] == sparsified
    apply = client.get_run(summary["stages"]["apply"]["run_id"])
    assert apply.data.params["checkpoint"] == sparsified
    assert apply.data.params["policy"] == f"runs:/{search.info.run_id}/policies/best_policy.json"
    assert f"--teacher {sparsified} " in summary["stages"]["finetune"]["command"]


def test_final_model_loads_pruned(finished: tuple[dict[str, Any], MlflowClient, Path]) -> None:
    summary, _, _ = finished
    final = summary["stages"]["finetune"]["output"]
    assert final.endswith("finetune/finetuned.pt")
    loaded = load_model(f"pruned:{final}")
    assert loaded.architecture == "digits_cnn"
    assert loaded.num_classes == 10
    dense_params = sum(p.numel() for p in load_model("digits_cnn").model.parameters())
    assert sum(p.numel() for p in loaded.model.parameters()) < dense_params


def test_search_ignores_pipeline_section() -> None:
    config = load_pipeline_config(EXPERIMENT)
    assert config.pipeline.stages == list(PIPELINE_STAGES)
    assert config.pipeline.sparsify.epochs == 3
    assert config.pipeline.apply.bn_images is None


@pytest.mark.parametrize(("stages", "fix"), [
    ("[search,sparsify]", "--set pipeline.stages=[sparsify,search]"),
    ("[search,search]", "--set pipeline.stages=[search]"),
    ("[sparsify,finetune]", "--set pipeline.stages=[sparsify,apply,finetune]"),
    ("[search,finetune]", "--set pipeline.stages=[search,apply,finetune]"),
    ("[sparsify,serch]", "--set pipeline.stages=[sparsify,search]"),
    ("[]", "--set pipeline.stages=[sparsify,search,apply,finetune]"),
])
def test_bad_stage_order_rejected(
    stages: str, fix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["pipeline", str(EXPERIMENT), *_set_flags(_overrides(tmp_path, f"pipeline.stages={stages}"))])

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"rl-pruner: error: --set pipeline.stages={stages}: 'pipeline.stages' ")
    assert err.endswith(f"pass e.g. {fix}\n")
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()


def test_failing_stage_marks_parent_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_image_folder = tmp_path / "empty"
    not_image_folder.mkdir()
    overrides = _overrides(tmp_path, "episodes=4", "pipeline.stages=[search,apply,finetune]",
                           f"pipeline.finetune.data={not_image_folder}")

    code = main(["pipeline", str(EXPERIMENT), *_set_flags(overrides), "--json"])

    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("rl-pruner: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("rl-pruner: error: pipeline stage finetune failed (pipeline run ")
    assert f"data set {not_image_folder} contains no class folders" in errors[0]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("rl-pruner-pipeline").experiment_id],
        filter_string="tags.`rl_pruner.command` = 'pipeline'",
    )
    assert parent.info.status == "FAILED"
    run_dir = tmp_path / "runs" / parent.info.run_id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_stage"] == "finetune"
    assert summary["stages"]["finetune"]["status"] == "FAILED"
    for stage in ("search", "apply"):
        assert summary["stages"][stage]["status"] == "FINISHED", stage
        assert client.get_run(summary["stages"][stage]["run_id"]).info.status == "FINISHED", stage
    assert (run_dir / "apply" / "pruned.pt").is_file()
    assert Path(summary["stages"]["search"]["output"]).is_file()
    assert not (run_dir / "finetune" / "finetuned.pt").exists()
