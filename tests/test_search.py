"""`rl-pruner search` end to end on the digits demo: MLflow run, apply, resume, Ctrl-C, bad configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "experiments" / "demo.yaml"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rl_pruner.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module, so the demo CNN is trained once and reused by every search."""
    return tmp_path_factory.mktemp("search")


def _store_settings(workdir: Path, name: str) -> list[str]:
    return ["--set", f"tracking.uri=sqlite:///{workdir / name / 'mlflow.db'}",
            "--set", f"output_dir={workdir / 'runs'}", "--set", f"tracking.run_name={name}"]


def _client(workdir: Path, name: str) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / name / 'mlflow.db'}")


def _episode_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "episode/reward"))


def test_search_run_then_apply(workdir: Path) -> None:
    result = _cli("search", str(DEMO_CONFIG), "--set", "episodes=8", *_store_settings(workdir, "e2e"), "--json",
                  cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "not logged" not in result.stderr
    summary = json.loads(result.stdout)
    client = _client(workdir, "e2e")
    run = client.get_run(summary["run_id"])

    assert run.info.status == "FINISHED"
    assert _episode_steps(client, run.info.run_id) == list(range(8))
    assert run.data.params["macs_target"] == "0.5"
    assert run.data.tags["model"] == "digits_cnn"
    assert "baseline/uniform/top1" in run.data.metrics
    assert "test/best/top1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "policies")}
    assert "policies/best_policy.json" in artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "policies/top5")} >= {"policies/top5/rank_1.json"}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/keep_ratios.png", "plots/reward_vs_macs.png"} <= plots
    for record in client.get_metric_history(run.info.run_id, "episode/macs_ratio"):
        # The demo CNN's 32-channel layers with round_to 8 move MACs in steps of a few percent.
        assert abs(record.value / 0.5 - 1) < 0.05

    out = workdir / "applied.pt"
    applied = _cli("apply", "--model", "digits_cnn", "--checkpoint", summary["checkpoint"],
                   "--policy", summary["best_policy_artifact"], "--tracking-uri", summary["tracking_uri"],
                   "--data", "builtin:digits", "--bn-images", "300", "--out", str(out), "--json", cwd=workdir)
    assert applied.returncode == 0, applied.stderr
    report = json.loads(applied.stdout)
    assert report["macs_ratio"] == pytest.approx(summary["best_macs_ratio"])
    assert out.is_file()


def test_resume_continues_the_same_run(workdir: Path) -> None:
    # The demo runs 4 episodes at once: 2 end the first run inside a batch, and the
    # resumed run starts in the middle of one.
    first = _cli("search", str(DEMO_CONFIG), "--set", "episodes=2", *_store_settings(workdir, "resume"), "--json",
                 cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert ("episodes is 2 and ppo.episodes_per_update = 4 run at once, so the last batch evaluates 2 episodes "
            "that are not logged; set episodes to 4 to avoid it") in first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    second = _cli("search", str(DEMO_CONFIG), "--set", "episodes=8", *_store_settings(workdir, "resume"),
                  "--resume", run_id, "--json", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "6 episodes remain" in second.stderr
    assert "set episodes to 6 or 10 to avoid it" in second.stderr
    assert json.loads(second.stdout)["run_id"] == run_id
    assert _episode_steps(_client(workdir, "resume"), run_id) == list(range(8))


def test_ctrl_c_keeps_results_and_can_resume(workdir: Path) -> None:
    args = [sys.executable, "-m", "rl_pruner.cli", "search", str(DEMO_CONFIG), "--set", "episodes=5000",
            *_store_settings(workdir, "interrupt")]
    process = subprocess.Popen(args, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    runs_dir = workdir / "runs"
    before = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    client = _client(workdir, "interrupt")
    run_id = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            # The search makes its run folder once the MLflow store is set up; reading
            # the store before that would race its schema creation.
            started = [p for p in runs_dir.iterdir() if p.is_dir() and p not in before] if runs_dir.exists() else []
            if started and len(_episode_steps(client, started[0].name)) >= 6:
                run_id = started[0].name
                break
        assert run_id is not None, "the search logged no episodes in time"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert f"--resume {run_id}" in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "policies/best_policy.json" in {a.path for a in client.list_artifacts(run_id, "policies")}
    n_done = len(_episode_steps(client, run_id))

    resumed = _cli("search", str(DEMO_CONFIG), "--set", f"episodes={n_done + 3}",
                   *_store_settings(workdir, "interrupt"), "--resume", run_id, "--json", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    steps = _episode_steps(client, run_id)
    assert steps == sorted(set(steps))
    assert len(steps) >= n_done + 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD_CONFIGS = {
    "unknown key": ("episodez: 5\n", "episodez"),
    "wrong type": ("episodes: many\n", "episodes"),
    "missing checkpoint": ("checkpoint: does-not-exist.pt\n", "does-not-exist.pt"),
    "target zero": ("macs_target: 0\n", "macs_target"),
    "target above one": ("macs_target: 1.5\n", "macs_target"),
    "unreachable tracking uri": (None, "127.0.0.1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_cleanly(case: str, workdir: Path) -> None:
    extra, expected = BAD_CONFIGS[case]
    folder = workdir / "bad" / case.replace(" ", "-")
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    text = DEMO_CONFIG.read_text()
    if extra is not None:
        text += extra if not extra.startswith(("episodes:", "macs_target:")) else ""
        overrides = [] if not extra.startswith(("episodes:", "macs_target:")) else ["--set", extra.strip().replace(": ", "=")]
    else:
        overrides = ["--set", f"tracking.uri=http://127.0.0.1:{_closed_port()}"]
    config.write_text(text)
    start = time.monotonic()
    result = _cli("search", str(config), "--set", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
                  "--set", f"output_dir={workdir / 'runs'}", *overrides, cwd=folder, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0]
    database = folder / "mlflow.db"
    if database.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{database}")
        for experiment in client.search_experiments():
            for run in client.search_runs(experiment.experiment_id):
                assert run.info.status == "FAILED"


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    result = _cli("demo", "--workdir", str(tmp_path / "demo"), "--episodes", "6", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert _episode_steps(client, run.info.run_id) == list(range(6))
    assert "policies/best_policy.json" in {a.path for a in client.list_artifacts(run.info.run_id, "policies")}
    assert Path(summary["pruned_model"]).is_file()
    assert summary["pruned_macs"] < summary["dense_macs"]
    assert summary["dense_test_top1"] > 90.0
    assert 0.0 < summary["pruned_test_top1"] <= 100.0


def test_same_seed_reproduces_search_episodes(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_pruner.agents.ppo import EpisodeCallback, build_ppo
    from rl_pruner.config import load_config
    from rl_pruner.search import build_env, prepare_data

    # stable-baselines3's default logger makes an empty SB3-<time> folder in the
    # temporary directory at every learn(). The agent must not leave one behind.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)

    config = load_config(DEMO_CONFIG, [f"output_dir={workdir / 'runs'}", "reward_images=200", "bn_images=100"])
    data = prepare_data(config)
    policies: list[list[dict]] = []
    for _ in range(2):
        env = build_env(config, data)
        found: list[dict] = []

        def keep(result, found=found) -> bool:
            found.append({"policy": result.policy.to_dict(), "reward": result.reward})
            return len(found) < 6

        agent = build_ppo(env, config.ppo, seed=config.seed, episode_length=len(env.structure.layers))
        agent.learn(total_timesteps=1000, callback=EpisodeCallback(keep))
        policies.append(found)
    assert len(policies[0]) == 6
    assert policies[0] == policies[1]
    assert not list(tmp_path.glob("SB3-*"))
