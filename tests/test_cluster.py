"""A search on a real two-node Ray cluster, logging to an MLflow server backed by PostgreSQL.

Everything listens on 127.0.0.1 only: PostgreSQL (started by ``.ci/postgres.sh``,
whose URI the tests read from ``RL_PRUNER_TEST_POSTGRES``), the MLflow server and
both Ray nodes, which ``ray start`` runs on this machine as two separate nodes.

Without ``RL_PRUNER_TEST_POSTGRES`` the test is skipped, except under CI, where
``.ci/run`` sets it and its absence is a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV_VAR = "RL_PRUNER_TEST_POSTGRES"
BIN = Path(sys.executable).parent

# `ray start` turns a 127.0.0.1 node address into this machine's outward address
# unless Ray's multi-node switch is off, and with the switch off it refuses to add
# a second node. The head (and the driver) run with the switch off; the second node
# starts through this wrapper, which keeps the loopback address it is given.
_WORKER_NODE_START = """
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this module's MLflow server; dropped afterwards."""
    admin_uri = os.environ.get(POSTGRES_ENV_VAR)
    if not admin_uri:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV_VAR} is not set; .ci/run starts PostgreSQL and sets it")
        pytest.skip(f"no PostgreSQL for the test: run .ci/postgres.sh and set {POSTGRES_ENV_VAR} to the URI it prints")
    import psycopg

    name = f"rl_pruner_test_{secrets.token_hex(4)}"
    admin = psycopg.connect(admin_uri, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_uri.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="module")
def mlflow_server(postgres_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL backend store and a shared artifact folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres_database,
         "--artifacts-destination", (folder / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head and a second Ray node on 127.0.0.1, one CPU each; yields the address and the
    environment a driver needs (the cluster's token)."""
    folder = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0")
    head_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
             "--include-dashboard=false", "--disable-usage-stats"],
            stdout=(folder / "head.log").open("w"), stderr=subprocess.STDOUT, env=head_env, start_new_session=True,
        ))
        _wait_for_port(port, nodes[0], folder / "head.log")
        nodes.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER_NODE_START, "start", "--block", f"--address={address}",
             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"],
            stdout=(folder / "worker.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        _wait_for_nodes(address, head_env, 2, nodes, folder)
        yield address, head_env
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start --head exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the Ray head did not open port {port}: {log.read_text()[-2000:]}")


def _wait_for_nodes(address: str, env: dict[str, str], count: int, nodes: list[subprocess.Popen[bytes]],
                    folder: Path) -> None:
    script = (f"import ray, json; ray.init(address={address!r}, log_to_driver=False); "
              "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            pytest.fail(f"a ray node exited: {(folder / 'worker.log').read_text()[-2000:]}")
        result = subprocess.run([sys.executable, "-c", script], env=env, check=False, capture_output=True, text=True, timeout=120)
        if result.returncode == 0 and int(result.stdout.strip().splitlines()[-1]) >= count:
            return
        time.sleep(1)
    pytest.fail(f"the cluster never had {count} nodes: {(folder / 'worker.log').read_text()[-2000:]}")


def test_two_node_search_logs_to_postgres_backed_mlflow(
    two_node_cluster: tuple[str, dict[str, str]], mlflow_server: str, shared_data: Path,
    cifar_train_archive: Path, tmp_path: Path,
) -> None:
    address, env = two_node_cluster
    config = {
        "model": "cifar_resnet20",
        "checkpoint": str(shared_data / "checkpoints" / "cifar10-resnet20.th"),
        "data": str(cifar_train_archive),
        "round_to": 1, "reward_images": 64, "bn_images": 64, "batch_size": 64, "episodes": 4,
        "baselines": ["uniform"], "output_dir": str(tmp_path / "runs"),
        "ppo": {"episodes_per_update": 2, "n_epochs": 2},
        "tracking": {"uri": mlflow_server, "experiment": "two-node", "run_name": "two-node"},
        "distributed": {"threads_per_worker": 1},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "rl_pruner.cli", "search", str(tmp_path / "search.yaml"), "--workers", "2",
         "--ray-address", address, "--json"],
        cwd=tmp_path, env=dict(env, PYTHONPATH=str(REPO_ROOT), MLFLOW_DISABLE_TELEMETRY="true"),
        check=False, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout)["run_id"]

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["distributed.workers"] == "2"
    assert run.data.metrics["distributed/worker_nodes"] == 2, "the two workers should run on the two nodes"
    steps = sorted(metric.step for metric in client.get_metric_history(run_id, "episode/reward"))
    assert steps == [0, 1, 2, 3]
    policy_path = client.download_artifacts(run_id, "policies/best_policy.json", str(tmp_path))
    policy = json.loads(Path(policy_path).read_text())
    assert policy["model"]["architecture"] == "cifar_resnet20"
    assert policy["pruning_ratios"]

    binds = _server_binds()
    assert binds and binds <= LOOPBACK, f"Ray, MLflow or PostgreSQL listen beyond the loopback interface: {binds}"


LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}


def _server_binds() -> set[str]:
    """Addresses on which Ray, MLflow or PostgreSQL processes listen."""
    output = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=False).stdout
    binds = set()
    for line in output.splitlines():
        if any(name in line for name in ("raylet", "gcs_server", "ray::", "mlflow", "uvicorn", "postgres")):
            binds.add(line.split()[3].rsplit(":", 1)[0])
    return binds
