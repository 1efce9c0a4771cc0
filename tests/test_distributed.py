"""Searches whose episodes run on Ray workers: same episodes as one worker, killed workers, bad addresses.

One private Ray cluster (on 127.0.0.1) serves the whole module; each search in it
uses a short ResNet-20 configuration on real CIFAR-10 images.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from rl_pruner.config import SearchConfig, config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, shared_data: Path, train_archive: Path, **changes: Any) -> SearchConfig:
    record: dict[str, Any] = {
        "model": "cifar_resnet20",
        "checkpoint": str(shared_data / "checkpoints" / "cifar10-resnet20.th"),
        "data": str(train_archive),
        "macs_target": 0.5,
        "round_to": 1,
        "reward_images": 64,
        "bn_images": 64,
        "batch_size": 64,
        "episodes": 6,
        "baselines": ["uniform", "global_l1"],
        "output_dir": str(tmp_path / "runs"),
        "ppo": {"episodes_per_update": 2, "n_epochs": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "distributed"},
        "distributed": {"workers": 2, "threads_per_worker": 1},
    }
    for key, value in changes.items():
        section = record
        *parents, leaf = key.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = value
    return config_from_dict(record, source="test configuration")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[dict[str, Any]]:
    """A private two-CPU Ray cluster on 127.0.0.1, shared by the module's searches."""
    from rl_pruner.distributed.cluster import ray_cluster

    with ray_cluster("local", n_cpus=2) as cluster:
        yield cluster


def test_local_cluster_listens_on_loopback_only(ray_local: dict[str, Any]) -> None:
    output = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
    binds = {line.split()[3].rsplit(":", 1)[0] for line in output.splitlines()
             if any(name in line for name in ("raylet", "gcs_server", "ray::"))}

    assert binds, "no Ray server found listening"
    assert binds <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, binds


def test_search_and_sweep_modules_do_not_import_ray() -> None:
    # A local cluster stays on 127.0.0.1 only if Ray is first imported after
    # ray_cluster() sets its multi-node switch, so these modules must not import it.
    script = ("import sys, rl_pruner.cli, rl_pruner.commands, rl_pruner.search, rl_pruner.distributed.sweep; "
              "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _episodes(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, "episode/reward"))


def test_one_and_two_workers_give_the_same_episodes(tmp_path: Path, shared_data: Path, cifar_train_archive: Path,
                                                    ray_local: dict[str, Any]) -> None:
    from rl_pruner.search import run_search

    results = {}
    for workers in (1, 2):
        config = _config(tmp_path / f"w{workers}", shared_data, cifar_train_archive, **{"distributed.workers": workers})
        summary = run_search(config)
        client = MlflowClient(config.tracking.uri)
        history = sorted(client.get_metric_history(summary["run_id"], "episode/macs_ratio"), key=lambda m: m.step)
        rewards = sorted(client.get_metric_history(summary["run_id"], "episode/reward"), key=lambda m: m.step)
        best = json.loads(Path(summary["best_policy"]).read_text())
        results[workers] = ([m.value for m in rewards], [m.value for m in history], best["pruning_ratios"],
                            summary["baselines"])

    assert len(results[1][0]) == 6
    assert results[1] == results[2]


def test_killed_worker_is_replaced(
    tmp_path: Path, shared_data: Path, cifar_train_archive: Path, ray_local: dict[str, Any]
) -> None:
    import ray

    from rl_pruner.distributed.vec_env import WORKER_NAME_PREFIX
    from rl_pruner.search import run_search

    config = _config(tmp_path, shared_data, cifar_train_archive, episodes=8)
    client = MlflowClient(config.tracking.uri)
    started: list[str] = []
    killed: list[str] = []

    def kill_a_worker_mid_search() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if not started or len(_episodes(client, started[0])) < 2:
                continue
            names = sorted((actor["name"], actor["namespace"]) for actor in ray.util.list_named_actors(all_namespaces=True)
                           if actor["name"].startswith(WORKER_NAME_PREFIX))
            if not names:
                continue
            handle = ray.get_actor(names[0][0], namespace=names[0][1])
            killed.append(handle._actor_id.hex())
            ray.kill(handle, no_restart=True)
            return

    killer = threading.Thread(target=kill_a_worker_mid_search, daemon=True)
    killer.start()
    summary = run_search(config, on_start=started.append)
    killer.join(timeout=10)

    assert killed, "the worker was never killed"
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["distributed/worker_replacements"] >= 1
    steps = _episodes(client, summary["run_id"])
    assert steps == list(range(8))
    alive = {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}
    assert not any(name.startswith(WORKER_NAME_PREFIX) for name in alive), "workers outlived their search"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "rl_pruner.cli", *args], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_unreachable_ray_address_fails_fast(tmp_path: Path, address: str) -> None:
    address = address.format(port=_closed_port())
    started = time.monotonic()
    result = _cli("search", str(REPO_ROOT / "experiments" / "demo.yaml"), "--workers", "2", "--ray-address", address,
                  "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"output_dir={tmp_path}",
                  cwd=tmp_path)
    elapsed = time.monotonic() - started

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert address in lines[0]
    assert "not reachable" in lines[0]
    assert "--ray-address" in lines[0]
    assert elapsed < 30
    assert not (tmp_path / "mlflow.db").exists()


def test_auto_address_without_live_cluster_fails_fast(tmp_path: Path) -> None:
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    record.write_text(f"127.0.0.1:{_closed_port()}")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true", RAY_TMPDIR=str(tmp_path))
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "rl_pruner.cli", "search", str(REPO_ROOT / "experiments" / "demo.yaml"),
               "--workers", "2", "--ray-address", "auto"]

    stale = subprocess.run(command, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=60)
    record.unlink()
    missing = subprocess.run(command, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=60)

    assert stale.returncode == 2, stale.stderr
    assert "not reachable" in stale.stderr
    assert len(stale.stderr.strip().splitlines()) == 1
    assert missing.returncode == 2, missing.stderr
    assert "found no Ray cluster" in missing.stderr


def test_ray_address_without_workers_is_rejected(tmp_path: Path) -> None:
    result = _cli("search", str(REPO_ROOT / "experiments" / "demo.yaml"), "--ray-address", "auto", cwd=tmp_path)

    assert result.returncode == 2
    assert "--ray-address auto has no effect" in result.stderr
    assert "--workers" in result.stderr


def test_more_worker_cpus_than_cluster_is_rejected(tmp_path: Path, shared_data: Path, cifar_train_archive: Path,
                                                  ray_local: dict[str, Any]) -> None:
    from rl_pruner.errors import ConfigError
    from rl_pruner.search import run_search

    config = _config(tmp_path, shared_data, cifar_train_archive, **{"distributed.threads_per_worker": 2})
    with pytest.raises(ConfigError, match="need 4 CPUs but the Ray cluster has 2"):
        run_search(config)


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = _cli("search", str(REPO_ROOT / "experiments" / "demo.yaml"), "--workers", "2",
                  "--set", f"tracking.uri={uri}", "--set", f"output_dir={tmp_path}", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert uri in lines[0]
    assert "not reachable" in lines[0]
    assert time.monotonic() - started < 30


def test_more_workers_than_parallel_episodes_is_rejected(tmp_path: Path) -> None:
    result = _cli("search", str(REPO_ROOT / "experiments" / "demo.yaml"), "--workers", "64", cwd=tmp_path)

    assert result.returncode == 2
    assert "distributed.workers" in result.stderr
    assert "episodes_per_update" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
