"""A search run recorded by SearchTracker, viewed in the real MLflow UI through headless Chromium.

The test starts ``mlflow ui`` on a free port of 127.0.0.1 and renders two pages of the
run with ``chromium --dump-dom``, which executes the single-page app before it
prints the DOM. Chromium resolves no host other than 127.0.0.1, so the page cannot
reach anything else. Screenshots go to tmp_path and, when ``RL_PRUNER_SCREENSHOT_DIR``
is set, are copied there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from rl_pruner.plots import plot_reward_vs_macs
from rl_pruner.policy import Policy
from rl_pruner.tracking import SearchTracker, check_tracking_uri

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_DIR_ENV_VAR = "RL_PRUNER_SCREENSHOT_DIR"
SERVER_START_TIMEOUT_S = 60.0
BROWSER_TIMEOUT_S = 60.0
# Virtual time lets the app finish its API requests and rendering before the DOM is dumped.
VIRTUAL_TIME_BUDGET_MS = 10_000
N_EPISODES = 5
RUN_NAME = "ui-test-search"

# MLflow reads these in the server process: no usage telemetry, and no job runner,
# whose worker processes would slow the start and are not needed to browse runs.
SERVER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


@dataclass
class RecordedRun:
    database: Path
    experiment_id: str
    run_id: str


@dataclass
class UIServer:
    base_url: str
    log_path: Path


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} not found; install it with 'apt-get install -y chromium'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedRun]:
    """Record a finished search-like run in a fresh SQLite store, restoring MLflow's global state after."""
    store_dir = tmp_path_factory.mktemp("ui-store")
    database = store_dir / "mlflow.db"
    policy = Policy(
        architecture="cifar_resnet20",
        fingerprint="sha256:abc",
        input_shape=(3, 32, 32),
        pruning_ratios={"conv1": 0.25},
        dropped_blocks=[],
        criterion="l1",
        round_to=8,
    )
    macs_ratios = [0.7, 0.6, 0.55, 0.5, 0.48]
    rewards = [0.2, 0.35, 0.3, 0.5, 0.45]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous_uri = mlflow.get_tracking_uri()
        try:
            with SearchTracker(f"sqlite:///{database}", "rl-pruner-ui-test", run_name=RUN_NAME) as tracker:
                tracker.log_params({"model": "cifar_resnet20", "target_macs_ratio": 0.5, "agent": {"n_steps": 64}})
                for episode in range(N_EPISODES):
                    tracker.log_episode(
                        episode,
                        {"reward": rewards[episode], "top1": 0.9 - 0.01 * episode, "macs_ratio": macs_ratios[episode]},
                    )
                tracker.log_best_policies([(0.5, policy)])
                figure = plot_reward_vs_macs(macs_ratios, rewards, range(N_EPISODES), target=0.5)
                tracker.log_figure(figure, "plots/reward_vs_macs.png")
            experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)

    yield RecordedRun(database=database, experiment_id=experiment_id, run_id=tracker.run_id)


# Requests to the local server bypass any proxy set in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    # NOTE: another process could take the port between this check and the server's bind;
    # the start then fails with the server log in the message.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log_path: Path, n_lines: int = 20) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-n_lines:])


def _wait_for_health(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow ui exited with code {process.returncode}; its log ends:\n{_log_tail(log_path)}")
        try:
            with _DIRECT.open(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"mlflow ui did not return HTTP 200 for /health within {SERVER_START_TIMEOUT_S:g} s; "
        f"its log ends:\n{_log_tail(log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # mlflow ui runs uvicorn as a child process, so the whole process group is stopped.
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@pytest.fixture(scope="module")
def ui_server(chromium: Path, recorded_run: RecordedRun) -> Iterator[UIServer]:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = recorded_run.database.parent / "mlflow-ui.log"
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", f"sqlite:///{recorded_run.database}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=recorded_run.database.parent,
            env={**os.environ, **SERVER_ENV},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_health(base_url, process, log_path)
        yield UIServer(base_url=base_url, log_path=log_path)
    finally:
        _stop(process)


def render(chromium: Path, url: str, screenshot: Path, profile_dir: Path) -> str:
    """Load ``url`` in headless Chromium, save a screenshot, and return the rendered DOM."""
    command = [
        str(chromium),
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        # Chromium crashes when /dev/shm is small, as Docker's default of 64 MB is. Debian's launcher
        # adds this flag itself only when its /dev/shm check works, and the check fails when
        # findmnt lists /dev/shm twice.
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile_dir}",
        "--window-size=1400,1000",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=BROWSER_TIMEOUT_S, check=False)
    stderr_tail = "\n".join(result.stderr.decode(errors="replace").splitlines()[-10:])
    assert result.returncode == 0, f"chromium exited with code {result.returncode} on {url}:\n{stderr_tail}"
    assert screenshot.read_bytes().startswith(b"\x89PNG"), f"chromium wrote no PNG screenshot of {url}:\n{stderr_tail}"
    return result.stdout.decode(errors="replace")


def keep_screenshot(screenshot: Path) -> None:
    target_dir = os.environ.get(SCREENSHOT_DIR_ENV_VAR)
    if target_dir:
        Path(target_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(target_dir) / screenshot.name)


def run_page_url(server: UIServer, run: RecordedRun, tab: str = "") -> str:
    return f"{server.base_url}/#/experiments/{run.experiment_id}/runs/{run.run_id}{tab}"


def test_check_tracking_uri_accepts_ui(ui_server: UIServer) -> None:
    check_tracking_uri(ui_server.base_url, timeout_s=10.0)


def test_run_overview_shows_metrics(chromium: Path, ui_server: UIServer, recorded_run: RecordedRun, tmp_path: Path) -> None:
    screenshot = tmp_path / "mlflow_run_overview.png"

    dom = render(chromium, run_page_url(ui_server, recorded_run), screenshot, tmp_path / "chromium-profile")
    keep_screenshot(screenshot)

    assert RUN_NAME in dom, f"run name missing from the page; server log ends:\n{_log_tail(ui_server.log_path)}"
    assert recorded_run.run_id in dom
    assert "Finished" in dom
    assert "episode/reward" in dom
    assert "episode/macs_ratio" in dom


def test_run_artifacts_show_best_policy(
    chromium: Path, ui_server: UIServer, recorded_run: RecordedRun, tmp_path: Path
) -> None:
    screenshot = tmp_path / "mlflow_run_artifacts.png"
    url = run_page_url(ui_server, recorded_run, "/artifacts/policies/best_policy.json")

    dom = render(chromium, url, screenshot, tmp_path / "chromium-profile")
    keep_screenshot(screenshot)

    assert 'artifact-name="best_policy.json"' in dom, (
        f"best_policy.json missing from the artifact tree; server log ends:\n{_log_tail(ui_server.log_path)}"
    )
    assert 'artifact-name="plots"' in dom
    # The preview pane shows the file's content, which the server reads from the artifact store.
    assert "rl-pruner-policy" in dom
    assert "cifar_resnet20" in dom
