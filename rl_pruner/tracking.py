"""MLflow tracking of policy searches: one MLflow run per search.

A search opens a :class:`SearchTracker`, logs its configuration once with
:meth:`SearchTracker.log_params`, one batch of ``episode/<name>`` metrics per
episode, and at the end the best policies as JSON artifacts::

    policies/best_policy.json        the best policy (rank 1)
    policies/top5/rank_<k>.json      the best five, k = 1..5

``rl-pruner apply --policy runs:/<run_id>/policies/best_policy.json`` reads such
an artifact back through :func:`download_policy`.

With the default store, ``sqlite:///mlflow.db``, runs go to ``mlflow.db`` in the
working directory and artifacts to ``mlartifacts/`` beside it, so
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` started in that directory
shows both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# MLflow 3 sends usage telemetry to an outside host unless it is disabled. rl-pruner
# makes no network connections of its own accord, so telemetry is off unless the user
# sets the variable.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# With a tracking server, MLflow writes "View run ... at: URL" to stdout when a run
# ends, which would corrupt `--json` output; the CLI reports the run itself.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from matplotlib.figure import Figure
from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.entities.run_status import RunStatus
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from rl_pruner.errors import ConfigError, PolicyError
from rl_pruner.policy import Policy

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
BEST_POLICY_PATH = "policies/best_policy.json"
TOP_POLICIES_DIR = "policies/top5"
N_TOP_POLICIES = 5
RESUME_TAG_PREFIX = "resume/"
# MLflow's UI nests a run under the run whose id this tag holds.
PARENT_RUN_TAG = "mlflow.parentRunId"
SUPPORTED_SCHEMES = ("http", "https", "sqlite", "file", "a plain directory path")

# Scheme-less tracking URIs that MLflow reads as Databricks workspaces, not as directories.
_MLFLOW_URI_KEYWORDS = ("databricks", "databricks-uc", "uc")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def check_tracking_uri(uri: str, timeout_s: float = 5.0, *, setting: str = "tracking.uri") -> None:
    """Check that MLflow can record runs at ``uri``, without creating anything.

    ``http(s)://`` servers must return HTTP 200 for ``GET <uri>/health`` within
    ``timeout_s`` seconds. For ``sqlite:///<path>``, ``file:<path>`` and plain paths, the
    directory that will hold the store must exist and be writable, or its nearest
    existing ancestor must be a writable directory so that it can be created.

    Raises ConfigError naming the URI and the fix. The fix names ``setting``, where the
    user gave the URI: the config key, or a command's option.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s, setting)
    elif scheme == "sqlite":
        database = _sqlite_database_path(uri)
        _check_writable(database, uri, setting, is_dir=False)
    elif scheme == "file":
        _check_file_store_allowed(uri)
        _check_writable(Path(local_file_uri_to_path(uri)), uri, setting, is_dir=True)
    elif scheme == "" and uri.strip() and uri not in _MLFLOW_URI_KEYWORDS:
        _check_file_store_allowed(uri)
        _check_writable(Path(uri), uri, setting, is_dir=True)
    else:
        raise ConfigError(
            f"tracking URI {_redact(uri)!r} is not supported by rl-pruner; use one of "
            f"{', '.join(SUPPORTED_SCHEMES)} (for example {DEFAULT_TRACKING_URI}) in {setting}"
        )


def _check_server(uri: str, timeout_s: float, setting: str) -> None:
    # mlflow's own HTTP helper applies the same credentials and TLS settings
    # (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_INSECURE_TLS, ...) as the runs will.
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    outcome: dict[str, Any] = {}

    def request_health() -> None:
        try:
            outcome["response"] = http_request(
                get_default_host_creds(uri), "/health", "GET",
                max_retries=0, timeout=timeout_s, raise_on_status=False,
            )
        except Exception as err:  # noqa: BLE001 - reported to the caller below
            outcome["error"] = err

    # The request runs in a daemon thread because the socket timeout bounds each
    # connect and read, not the DNS lookup or the sum over several addresses.
    thread = threading.Thread(target=request_health, name="mlflow-health-check", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)

    if thread.is_alive():
        reason = f"timed out after {timeout_s:g} s"
    elif "error" in outcome:
        reason = _first_line(outcome["error"])
        password = urlsplit(uri).password
        if password:
            reason = reason.replace(password, "***")
    elif outcome["response"].status_code != 200:
        reason = f"GET /health returned HTTP {outcome['response'].status_code}"
    else:
        return
    raise ConfigError(
        f"tracking server at {_redact(uri)} is not reachable ({reason}); "
        f"start it with 'mlflow server --host 127.0.0.1 --port PORT' or fix {setting}"
    )


def _check_file_store_allowed(uri: str) -> None:
    # MLflow 3.17's FileStore raises on creation unless this variable is true.
    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(
            f"tracking URI {uri!r} is a file store, which MLflow keeps in maintenance mode and "
            f"rejects unless {MLFLOW_ALLOW_FILE_STORE.name}=true; use {DEFAULT_TRACKING_URI} "
            f"(or 'mlflow migrate-filestore' for existing runs) or set the variable"
        )


def _sqlite_database_path(uri: str) -> Path:
    try:
        database = make_url(uri).database
    except ArgumentError as err:
        raise ConfigError(
            f"tracking URI {_redact(uri)!r} is not a valid SQLite URI ({err}); "
            f"write it as sqlite:///relative/path.db or sqlite:////absolute/path.db"
        ) from err
    if not database or database == ":memory:":
        raise ConfigError(
            f"tracking URI {_redact(uri)!r} names no database file, so the search would not be "
            f"kept; write it as sqlite:///mlflow.db or sqlite:////absolute/path.db"
        )
    return Path(database)


def _check_writable(path: Path, uri: str, setting: str, *, is_dir: bool) -> None:
    """Check that ``path`` (a store directory or a database file) can be written or created."""
    target = path.absolute()
    if target.exists():
        if is_dir and not target.is_dir():
            problem = f"{target} is not a directory"
        elif not is_dir and target.is_dir():
            problem = f"{target} is a directory, not a database file"
        elif not os.access(target, os.W_OK):
            problem = f"{target} is not writable"
        else:
            problem = None
        if problem is None and not is_dir and not os.access(target.parent, os.W_OK | os.X_OK):
            # SQLite writes its journal beside the database file.
            problem = f"directory {target.parent} is not writable"
    else:
        ancestor = next(parent for parent in target.parents if parent.exists())
        if not ancestor.is_dir():
            problem = f"{ancestor} is a file, so {target} cannot be created"
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            problem = f"directory {ancestor} is not writable, so {target} cannot be created"
        else:
            problem = None
    if problem is not None:
        raise ConfigError(
            f"tracking URI {_redact(uri)!r} cannot be used: {problem}; "
            f"fix {setting}, for example {DEFAULT_TRACKING_URI} in a writable working directory"
        )


def _artifact_location(uri: str) -> str | None:
    """Return ``file://.../mlartifacts`` beside a SQLite database, else None (the store decides)."""
    if urlsplit(uri).scheme.lower() != "sqlite":
        return None
    database = _sqlite_database_path(uri)
    return (database.absolute().parent / ARTIFACTS_DIR_NAME).as_uri()


class SearchTracker:
    """One MLflow run that records one policy search.

    Entering the context checks the tracking URI, sets it as MLflow's tracking URI
    for the process (it stays set after exit), gets or creates ``experiment`` and
    starts a run, or re-opens ``resume_run_id``. Leaving it ends the run as
    FINISHED, as KILLED after KeyboardInterrupt, or as FAILED after any other
    exception, which is re-raised.

    :param tracking_uri: MLflow tracking URI, see :func:`check_tracking_uri`.
    :param experiment: MLflow experiment name.
    :param run_name: name of a new run, or None for a generated one. Ignored on resume.
    :param tags: tags set on the run, new or resumed.
    :param resume_run_id: id of a run of ``experiment`` to append to.
    :param parent_run_id: id of the run that this run is a child of, set as the tag
        ``mlflow.parentRunId`` so that the MLflow UI nests the run under it.
    :param set_active: make the run MLflow's active run, as ``mlflow.start_run`` does.
        False creates a new run through the client only, so that other runs, such as the
        stages of a pipeline, can start and end in this process while this one is open.
        False cannot be combined with ``resume_run_id``.
    :param uri_setting: where the user gave ``tracking_uri`` (``tracking.uri`` in a config,
        ``--tracking-uri`` on a command line), named in the error's fix.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        set_active: bool = True,
        uri_setting: str = "tracking.uri",
    ) -> None:
        if not set_active and resume_run_id is not None:
            raise ValueError("SearchTracker resumes a run only as the active run; pass set_active=True")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {key: _truncate(value, MAX_TAG_VAL_LENGTH) for key, value in (tags or {}).items()}
        if parent_run_id is not None:
            self.tags[PARENT_RUN_TAG] = parent_run_id
        self.resume_run_id = resume_run_id
        self.set_active = set_active
        self.uri_setting = uri_setting
        self._run_id: str | None = None
        self._client: MlflowClient | None = None
        self._logged_params: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        """Id of the MLflow run; available inside the context and after it."""
        if self._run_id is None:
            raise RuntimeError("SearchTracker.run_id is set only once the tracker's context is entered")
        return self._run_id

    @property
    def client(self) -> MlflowClient:
        """MLflow client bound to ``tracking_uri``."""
        if self._client is None:
            raise RuntimeError("SearchTracker.client is available only once the tracker's context is entered")
        return self._client

    def __enter__(self) -> SearchTracker:
        check_tracking_uri(self.tracking_uri, setting=self.uri_setting)
        if urlsplit(self.tracking_uri).scheme.lower() == "sqlite":
            # SQLAlchemy creates the database file but not its directory.
            _sqlite_database_path(self.tracking_uri).absolute().parent.mkdir(parents=True, exist_ok=True)

        mlflow.set_tracking_uri(self.tracking_uri)
        self._client = MlflowClient(self.tracking_uri)
        experiment_id = self._get_or_create_experiment()

        if not self.set_active:
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=resolve_tags(self.tags))
            logger.info(
                "created MLflow run %s (%s) in experiment %r at %s, not as the active run",
                run.info.run_id, run.info.run_name, self.experiment, _redact(self.tracking_uri),
            )
        elif self.resume_run_id is None:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name, tags=self.tags)
            logger.info(
                "started MLflow run %s (%s) in experiment %r at %s",
                run.info.run_id, run.info.run_name, self.experiment, _redact(self.tracking_uri),
            )
        else:
            previous = self._get_resumable_run(experiment_id)
            run = mlflow.start_run(run_id=self.resume_run_id, tags=self.tags)
            self._logged_params = dict(previous.data.params)
            logger.info(
                "resumed MLflow run %s in experiment %r at %s",
                run.info.run_id, self.experiment, _redact(self.tracking_uri),
            )
        self._run_id = run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        try:
            self._end(status)
        except MlflowException:
            if exc_type is None:
                raise
            # The search's own exception explains more, so it propagates instead of this one.
            logger.exception("failed to end MLflow run %s as %s", self.run_id, RunStatus.to_string(status))

    def _end(self, status: int) -> None:
        status_name = RunStatus.to_string(status)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status_name)
        else:
            # Someone ended or replaced the fluent run, so mark ours through the client.
            self.client.set_terminated(self.run_id, status=status_name)
        logger.info("ended MLflow run %s as %s", self.run_id, status_name)

    def _get_or_create_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=_artifact_location(self.tracking_uri)
                )
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                # Another process created it between the lookup and the creation.
                experiment = self.client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} (id {experiment.experiment_id}) is deleted; "
                f"restore it with 'mlflow experiments restore --experiment-id {experiment.experiment_id}' "
                f"or choose another tracking.experiment"
            )
        return experiment.experiment_id

    def _get_resumable_run(self, experiment_id: str) -> Run:
        """Return the run to resume, raising ConfigError unless it is a live run of the experiment."""
        run_id = self.resume_run_id
        where = f"at {_redact(self.tracking_uri)}"
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            raise ConfigError(
                f"run {run_id!r} to resume is not found {where} ({_first_line(err)}); "
                f"pass the id of an existing run of experiment {self.experiment!r}"
            ) from err
        if run.info.experiment_id != experiment_id:
            raise ConfigError(
                f"run {run_id!r} to resume belongs to experiment id {run.info.experiment_id}, "
                f"not to {self.experiment!r} (id {experiment_id}) {where}; "
                f"set tracking.experiment to the run's experiment or start a new run"
            )
        if run.info.lifecycle_stage == LifecycleStage.DELETED:
            raise ConfigError(
                f"run {run_id!r} to resume is deleted {where}; restore it with "
                f"'mlflow runs restore --run-id {run_id}' or start a new run"
            )
        if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
            logger.warning(
                "run %s is still marked RUNNING; resuming it while another process writes to it "
                "mixes the two searches", run_id,
            )
        return run

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters, flattening nested mappings to dotted keys (``agent.n_steps``).

        Values become strings truncated to MLflow's limit of 6000 characters. A key
        already logged with the same value is skipped. MLflow rejects a parameter
        re-logged with another value, so a value that changed on resume is logged as
        the tag ``resume/<key>`` instead, and on a new run the MlflowException is raised.
        """
        new_params: dict[str, str] = {}
        changed: dict[str, str] = {}
        for key, value in _flatten(params):
            text = _truncate(value, MAX_PARAM_VAL_LENGTH)
            logged = self._logged_params.get(key)
            if logged == text:
                continue
            if logged is not None and self.resume_run_id is not None:
                changed[RESUME_TAG_PREFIX + key] = text
            else:
                new_params[key] = text

        for chunk in _chunks(list(new_params.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in chunk])
            self._logged_params.update(chunk)
        if changed:
            logger.info("parameters changed on resume, logged as tags: %s", ", ".join(sorted(changed)))
            self.set_tags(changed)

    def log_episode(self, index: int, metrics: Mapping[str, float]) -> None:
        """Log one episode's metrics as ``episode/<name>`` at step ``index``, in one request."""
        self._log_metric_batch({f"episode/{name}": value for name, value in metrics.items()}, step=index)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics under the names given (``baseline/uniform/top1``); step None logs step 0."""
        self._log_metric_batch(metrics, step=0 if step is None else step)

    def _log_metric_batch(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp_ms, step) for key, value in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; values become strings truncated to MLflow's limit of 8000 characters."""
        entries = [RunTag(key, _truncate(value, MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_policy(self, policy: Policy, artifact_path: str) -> None:
        """Write ``policy`` as JSON to the artifact file ``artifact_path`` (``policies/x.json``)."""
        self.client.log_text(self.run_id, policy.to_json(), artifact_path)

    def log_best_policies(self, ranked: Sequence[tuple[float, Policy]]) -> None:
        """Log the best policies, given as (reward, policy) pairs ordered best first.

        The first goes to ``policies/best_policy.json``, the first five to
        ``policies/top5/rank_<k>.json`` with k from 1. The rewards are not written,
        because the episode metrics already hold them.
        """
        if not ranked:
            logger.warning("no policies to log for run %s; the search evaluated none", self.run_id)
            return
        self.log_policy(ranked[0][1], BEST_POLICY_PATH)
        for rank, (_, policy) in enumerate(ranked[:N_TOP_POLICIES], start=1):
            self.log_policy(policy, f"{TOP_POLICIES_DIR}/rank_{rank}.json")

    def log_figure(self, figure: Figure, artifact_path: str) -> None:
        """Save a matplotlib figure as the artifact file ``artifact_path``; its suffix sets the format."""
        self.client.log_figure(self.run_id, figure, artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts, under ``artifact_path`` if given."""
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)


def download_policy(location: str, tracking_uri: str | None) -> Policy:
    """Download and validate a policy artifact given as ``runs:/<run_id>/<path>``.

    ``tracking_uri`` None means MLflow's current tracking URI (``MLFLOW_TRACKING_URI``
    or MLflow's default). Raises PolicyError when the location is malformed, the run
    or the artifact is not found, or the file is not a valid policy.
    """
    uri = mlflow.get_tracking_uri() if tracking_uri is None else tracking_uri
    match = _RUNS_URI.match(location)
    if match is None:
        raise PolicyError(
            f"policy location {location!r} is not of the form runs:/<run_id>/<artifact path>; "
            f"copy the path from the run's artifacts in the MLflow UI"
        )

    def not_found(reason: str) -> PolicyError:
        return PolicyError(
            f"policy {location} not found in the tracking store at {_redact(uri)} ({reason}); "
            f"list the run's artifacts in the MLflow UI or pass --tracking-uri"
        )

    if urlsplit(uri).scheme.lower() == "sqlite":
        # Opening a missing SQLite file would create an empty store as a side effect.
        try:
            database = _sqlite_database_path(uri)
        except ConfigError as err:
            raise not_found(str(err)) from err
        if not database.is_file():
            raise not_found(f"no database file {database.absolute()}")

    with tempfile.TemporaryDirectory(prefix="rl-pruner-policy-") as download_dir:
        try:
            local_path = download_artifacts(
                artifact_uri=location, dst_path=download_dir, tracking_uri=uri
            )
        except (MlflowException, OSError) as err:
            raise not_found(_first_line(err)) from err
        path = Path(local_path)
        if not path.is_file():
            raise not_found("the path is a directory of artifacts, not a policy file")
        # Parsed here rather than with Policy.load so that errors name the runs:/ location
        # instead of the temporary download.
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"policy {location} is not valid JSON ({err}); log the policy again") from err
    return Policy.from_dict(record, source=f"policy {location}")


def _flatten(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, prefix=f"{name}.")
        else:
            yield name, value


def _truncate(value: Any, max_length: int) -> str:
    text = str(value)
    if len(text) > max_length:
        logger.debug("truncated a value of %d characters to MLflow's limit of %d", len(text), max_length)
        return text[:max_length]
    return text


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _redact(uri: str) -> str:
    """Return ``uri`` with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
