"""SearchTracker, download_policy and check_tracking_uri against real SQLite stores, and the plots."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rl_pruner.errors import ConfigError, PolicyError
from rl_pruner.plots import plot_best_reward_curve, plot_keep_ratios, plot_reward_vs_macs
from rl_pruner.policy import Policy
from rl_pruner.tracking import SearchTracker, check_tracking_uri, download_policy

EXPERIMENT = "rl-pruner-test"


def make_policy(ratio: float = 0.25) -> Policy:
    return Policy(
        architecture="cifar_resnet20",
        fingerprint="sha256:abc",
        input_shape=(3, 32, 32),
        pruning_ratios={"conv1": ratio},
        dropped_blocks=[],
        criterion="l1",
        round_to=8,
    )


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file with MLflow's tables, copied per test because MLflow's schema migrations take seconds."""
    database = tmp_path_factory.mktemp("template-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Return the URI of a fresh SQLite store in tmp_path. MLflow's global tracking URI and active run are restored after the test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous_uri = mlflow.get_tracking_uri()
    shutil.copy(empty_store, tmp_path / "mlflow.db")

    yield f"sqlite:///{tmp_path / 'mlflow.db'}"

    while mlflow.active_run() is not None:
        mlflow.end_run()
    # set_tracking_uri also sets MLFLOW_TRACKING_URI, which monkeypatch restores afterwards.
    mlflow.set_tracking_uri(previous_uri)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Return every artifact file path of the run, descending into directories."""
    paths: set[str] = set()
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            paths |= artifact_paths(client, run_id, entry.path)
        else:
            paths.add(entry.path)
    return paths


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# SearchTracker

def test_search_run_logs_and_finishes(tracking_uri: str, tmp_path: Path) -> None:
    ranked = [(0.9, make_policy(0.5)), (0.8, make_policy(0.25)), (0.7, make_policy(0.125))]

    with SearchTracker(tracking_uri, EXPERIMENT, run_name="search-1", tags={"model": "cifar_resnet20"}) as tracker:
        tracker.log_params({"seed": 0, "agent": {"n_steps": 64, "learning_rate": 3e-4}})
        for episode in range(3):
            tracker.log_episode(episode, {"reward": 0.1 * episode, "top1": 0.5, "macs_ratio": 0.5})
        tracker.log_metrics({"baseline/uniform/top1": 0.6})
        tracker.log_best_policies(ranked)
        tracker.log_figure(plot_best_reward_curve([0, 1, 2], [0.0, 0.1, 0.2]), "plots/best_reward.png")
        run_id = tracker.run_id

    assert mlflow.active_run() is None
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "search-1"
    assert run.data.tags["model"] == "cifar_resnet20"
    assert run.data.params == {"seed": "0", "agent.n_steps": "64", "agent.learning_rate": "0.0003"}

    history = client.get_metric_history(run_id, "episode/reward")
    assert [metric.step for metric in history] == [0, 1, 2]
    assert [metric.value for metric in history] == pytest.approx([0.0, 0.1, 0.2])
    assert run.data.metrics["episode/top1"] == 0.5
    assert run.data.metrics["baseline/uniform/top1"] == 0.6

    assert artifact_paths(client, run_id) == {
        "policies/best_policy.json",
        "policies/top5/rank_1.json",
        "policies/top5/rank_2.json",
        "policies/top5/rank_3.json",
        "plots/best_reward.png",
    }
    assert run.info.artifact_uri == (tmp_path / "mlartifacts").as_uri() + f"/{run_id}/artifacts"


def test_search_run_keeps_top_five(tracking_uri: str) -> None:
    ranked = [(1.0 - rank / 10, make_policy(rank / 10)) for rank in range(7)]

    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.log_best_policies(ranked)

    client = MlflowClient(tracking_uri)
    assert artifact_paths(client, tracker.run_id, "policies/top5") == {
        f"policies/top5/rank_{rank}.json" for rank in range(1, 6)
    }
    best = download_policy(f"runs:/{tracker.run_id}/policies/best_policy.json", tracking_uri)
    fifth = download_policy(f"runs:/{tracker.run_id}/policies/top5/rank_5.json", tracking_uri)
    assert best.pruning_ratios == {"conv1": 0.0}
    assert fifth.pruning_ratios == {"conv1": 0.4}


def test_search_run_fails_on_exception(tracking_uri: str) -> None:
    tracker = SearchTracker(tracking_uri, EXPERIMENT)
    with pytest.raises(ValueError, match="boom"):
        with tracker:
            tracker.log_episode(0, {"reward": 1.0})
            raise ValueError("boom")

    assert mlflow.active_run() is None
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).info.status == "FAILED"


def test_search_run_killed_on_interrupt(tracking_uri: str) -> None:
    tracker = SearchTracker(tracking_uri, EXPERIMENT)
    with pytest.raises(KeyboardInterrupt):
        with tracker:
            raise KeyboardInterrupt

    assert mlflow.active_run() is None
    assert MlflowClient(tracking_uri).get_run(tracker.run_id).info.status == "KILLED"


def test_resume_appends_to_same_run(tracking_uri: str) -> None:
    with SearchTracker(tracking_uri, EXPERIMENT) as first:
        first.log_params({"seed": 0, "agent": {"n_steps": 64}})
        for episode in range(2):
            first.log_episode(episode, {"reward": float(episode)})

    with SearchTracker(tracking_uri, EXPERIMENT, resume_run_id=first.run_id) as second:
        second.log_params({"seed": 0, "agent": {"n_steps": 128}, "resumed_from_episode": 2})
        for episode in range(2, 4):
            second.log_episode(episode, {"reward": float(episode)})

    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [metric.step for metric in client.get_metric_history(first.run_id, "episode/reward")] == [0, 1, 2, 3]
    assert run.data.params == {"seed": "0", "agent.n_steps": "64", "resumed_from_episode": "2"}
    assert run.data.tags["resume/agent.n_steps"] == "128"
    assert "resume/seed" not in run.data.tags


def test_resume_unknown_run_raises(tracking_uri: str) -> None:
    with pytest.raises(ConfigError, match="0123456789abcdef.*not found"):
        with SearchTracker(tracking_uri, EXPERIMENT, resume_run_id="0123456789abcdef"):
            pass

    assert mlflow.active_run() is None


def test_resume_run_of_other_experiment_raises(tracking_uri: str) -> None:
    with SearchTracker(tracking_uri, "another-experiment") as other:
        pass

    with pytest.raises(ConfigError, match="belongs to experiment"):
        with SearchTracker(tracking_uri, EXPERIMENT, resume_run_id=other.run_id):
            pass

    assert MlflowClient(tracking_uri).get_run(other.run_id).info.status == "FINISHED"


def test_changed_param_on_new_run_raises(tracking_uri: str) -> None:
    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.log_params({"seed": 0})
        tracker.log_params({"seed": 0})
        with pytest.raises(MlflowException):
            tracker.log_params({"seed": 1})


def test_long_param_value_truncated(tracking_uri: str) -> None:
    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.log_params({"layers": "x" * 7000})

    value = MlflowClient(tracking_uri).get_run(tracker.run_id).data.params["layers"]
    assert value == "x" * 6000


@pytest.mark.usefixtures("tracking_uri")
def test_tracker_rejects_bad_uri_before_run(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    with pytest.raises(ConfigError):
        with SearchTracker(f"sqlite:///{blocker}/mlflow.db", EXPERIMENT):
            pass

    assert mlflow.active_run() is None
    assert not (tmp_path / "mlartifacts").exists()


@pytest.mark.usefixtures("tracking_uri")
def test_tracker_creates_database_directory(tmp_path: Path) -> None:
    database = tmp_path / "new" / "dir" / "mlflow.db"

    with SearchTracker(f"sqlite:///{database}", EXPERIMENT) as tracker:
        tracker.log_metrics({"eval/top1": 0.9}, step=3)

    assert database.is_file()
    history = MlflowClient(f"sqlite:///{database}").get_metric_history(tracker.run_id, "eval/top1")
    assert [metric.step for metric in history] == [3]


# download_policy

def test_download_policy_round_trip(tracking_uri: str) -> None:
    policy = make_policy()
    policy.metadata = {"source": "search"}
    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.log_policy(policy, "policies/best_policy.json")

    loaded = download_policy(f"runs:/{tracker.run_id}/policies/best_policy.json", tracking_uri)

    assert loaded == policy


@pytest.mark.parametrize(
    "location",
    [
        "policies/best_policy.json",
        "runs:/only-a-run-id",
        "runs://policies/best_policy.json",
        "runs:/0123456789abcdef/policies/best_policy.json",
        "runs:/{run_id}/policies/missing.json",
        "runs:/{run_id}/policies",
    ],
)
def test_download_policy_bad_location_raises(tracking_uri: str, location: str) -> None:
    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.log_policy(make_policy(), "policies/best_policy.json")

    with pytest.raises(PolicyError) as excinfo:
        download_policy(location.format(run_id=tracker.run_id), tracking_uri)

    assert "\n" not in str(excinfo.value)


def test_download_policy_invalid_file_raises(tracking_uri: str) -> None:
    with SearchTracker(tracking_uri, EXPERIMENT) as tracker:
        tracker.client.log_text(tracker.run_id, "{not json", "policies/broken.json")
        tracker.client.log_text(tracker.run_id, '{"format": "other"}', "policies/other.json")

    with pytest.raises(PolicyError, match="not valid JSON"):
        download_policy(f"runs:/{tracker.run_id}/policies/broken.json", tracking_uri)
    with pytest.raises(PolicyError, match="not an rl-pruner policy"):
        download_policy(f"runs:/{tracker.run_id}/policies/other.json", tracking_uri)


def test_download_policy_missing_database_raises(tmp_path: Path) -> None:
    database = tmp_path / "absent.db"

    with pytest.raises(PolicyError, match="no database file"):
        download_policy("runs:/0123456789abcdef/policies/best_policy.json", f"sqlite:///{database}")

    assert not database.exists()


# check_tracking_uri

def test_check_closed_port_raises_quickly() -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    with pytest.raises(ConfigError, match="not reachable.*mlflow server"):
        check_tracking_uri(uri, timeout_s=2.0)

    assert time.monotonic() - started < 10.0


def test_check_silent_server_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # The listener accepts connections into its backlog but never sends a response.
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()

        with pytest.raises(ConfigError, match="not reachable"):
            check_tracking_uri(uri, timeout_s=1.0)

        assert time.monotonic() - started < 3.0


class _HealthHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature fixed by the base class
        pass


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (503, False)])
def test_check_http_server_health(status: int, reachable: bool) -> None:
    handler = type("Handler", (_HealthHandler,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if reachable:
            check_tracking_uri(uri, timeout_s=5.0)
        else:
            with pytest.raises(ConfigError, match="HTTP 503"):
                check_tracking_uri(uri, timeout_s=5.0)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "uri_template",
    [
        "sqlite:///{tmp}/mlflow.db",
        "sqlite:///{tmp}/not/yet/created/mlflow.db",
        "file://{tmp}/mlruns",
        "{tmp}/mlruns",
    ],
)
def test_check_usable_local_uri_passes(tmp_path: Path, uri_template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    check_tracking_uri(uri_template.format(tmp=tmp_path))

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "uri_template",
    [
        "sqlite:///{blocker}/mlflow.db",
        "sqlite:///{blocker}/sub/dir/mlflow.db",
        "file://{blocker}/mlruns",
        "{blocker}/mlruns",
        "{blocker}",
    ],
)
def test_check_path_under_file_raises(tmp_path: Path, uri_template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    with pytest.raises(ConfigError, match="cannot be used"):
        check_tracking_uri(uri_template.format(blocker=blocker))


@pytest.mark.parametrize(
    "uri",
    ["ftp://example.invalid/mlruns", "postgresql://user@localhost/mlflow", "databricks", "sqlite://", "sqlite:///:memory:", ""],
)
def test_check_unsupported_uri_raises(uri: str) -> None:
    with pytest.raises(ConfigError):
        check_tracking_uri(uri)


@pytest.mark.parametrize("uri_template", ["file://{tmp}/mlruns", "{tmp}/mlruns"])
def test_check_file_store_needs_opt_in(tmp_path: Path, uri_template: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_tracking_uri(uri_template.format(tmp=tmp_path))


@pytest.mark.usefixtures("tracking_uri")
def test_file_store_run_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store_uri = (tmp_path / "mlruns").as_uri()

    with SearchTracker(store_uri, EXPERIMENT) as tracker:
        tracker.log_episode(0, {"reward": 1.0})
        tracker.log_policy(make_policy(), "policies/best_policy.json")

    assert MlflowClient(store_uri).get_run(tracker.run_id).info.status == "FINISHED"
    assert download_policy(f"runs:/{tracker.run_id}/policies/best_policy.json", store_uri) == make_policy()


def test_check_uri_message_hides_password() -> None:
    uri = f"http://user:secret@127.0.0.1:{closed_port()}"

    with pytest.raises(ConfigError) as excinfo:
        check_tracking_uri(uri, timeout_s=2.0)

    assert "secret" not in str(excinfo.value)
    assert "user:***@127.0.0.1" in str(excinfo.value)


# plots

def test_keep_ratio_plot_bars() -> None:
    layers = ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]

    figure = plot_keep_ratios(layers, [0.5, 0.75, 0.25, 1.0], [0.6] * 4, dropped_layers={"layer1.1.conv1"})

    axes = figure.axes[0]
    uniform_bars, best_bars = axes.containers
    assert len(uniform_bars) == 4
    assert [bar.get_height() for bar in best_bars] == [0.5, 0.75, 0.0, 1.0]
    assert [label.get_text() for label in axes.get_xticklabels()] == layers
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["uniform policy", "best policy", "dropped block"]


def test_keep_ratio_plot_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one keep ratio per layer"):
        plot_keep_ratios(["conv1", "conv2"], [0.5], [0.5, 0.5])


def test_reward_vs_macs_plot_points() -> None:
    baselines = {"uniform": (0.5, 0.2), "global l1": (0.48, 0.25)}

    figure = plot_reward_vs_macs([0.4, 0.5, 0.6, 0.55, 0.52], [0.1, 0.3, 0.2, 0.5, 0.4], range(5), 0.5, baselines)

    axes = figure.axes[0]
    assert len(axes.collections) == 1
    assert len(axes.collections[0].get_offsets()) == 5
    assert len(axes.lines) == 1 + len(baselines)
    assert [text.get_text() for text in axes.texts] == ["uniform", "global l1"]
    assert len(figure.axes) == 2


def test_best_reward_curve_is_running_max() -> None:
    figure = plot_best_reward_curve([0, 1, 2, 3], [0.1, 0.3, 0.2, 0.5])

    line = figure.axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([0.1, 0.3, 0.3, 0.5])
