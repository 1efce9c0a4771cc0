"""Sweeps: many searches (MACs targets x seeds x PPO values) run as Ray Tune trials.

``rl-pruner sweep CONFIG.yaml`` reads a search configuration whose ``sweep`` section
lists the values to try (see :class:`rl_pruner.config.SweepConfig`). It opens one
MLflow parent run, then Ray Tune runs one trial per combination. Each trial is a whole
search, in process on its Tune worker, logged as a child run of the parent. When the
trials end, the parent run gets:

- ``sweep/trials.json``: every trial's values, run id, best reward, MACs ratio and test top-1;
- ``sweep/best_per_target.md`` and ``.json``: the best policy found per MACs target;
- ``plots/pareto.png``: accuracy against MACs ratio of every trial, with the Pareto front;
- ``policies/target_<t>/best_policy.json``: the best policy per target.

A trial that fails is reported in ``trials.json`` with its error, and the sweep exits
with an error after logging the others.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from rl_pruner.config import BUILTIN_PREFIX, SearchConfig, config_from_dict, config_to_dict, flatten_config
from rl_pruner.distributed.cluster import ray_cluster
from rl_pruner.errors import RLPrunerError
from rl_pruner.plots import plot_pareto_front
from rl_pruner.policy import Policy
from rl_pruner.tracking import SearchTracker, check_tracking_uri, download_policy

logger = logging.getLogger(__name__)

ACCURACY_KEY = "accuracy"


class SweepFailed(RLPrunerError):
    """One or more trials of a sweep failed; the others were logged."""


def trial_space(config: SearchConfig) -> dict[str, Any]:
    """Ray Tune's parameter space for ``config.sweep``, keyed by dotted configuration keys."""
    from ray import tune

    sweep = config.sweep
    space: dict[str, Any] = {
        "macs_target": tune.grid_search(sweep.macs_targets or [config.macs_target]),
        "seed": tune.grid_search(sweep.seeds or [config.seed]),
    }
    for name, values in config_to_dict(config)["sweep"]["ppo"].items():
        if not values:
            continue
        key = f"ppo.{name}"
        space[key] = tune.grid_search(values) if sweep.search_alg == "grid" else tune.choice(values)
    return space


def trial_config(base: SearchConfig, values: dict[str, Any]) -> SearchConfig:
    """Build the search configuration of one trial: ``base`` with the trial's ``values`` set.

    The trial runs its episodes in its own process (``distributed.workers`` 0) and
    carries no ``sweep`` section, so its MLflow parameters are the search's own.
    """
    record = config_to_dict(base)
    for key, value in values.items():
        section = record
        *parents, leaf = key.split(".")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    record["distributed"]["workers"] = 0
    record["tracking"]["run_name"] = _trial_name(values)
    del record["sweep"]
    return config_from_dict(record, source="a sweep trial")


def _absolute_paths(config: SearchConfig) -> dict[str, Any]:
    """``config`` as a mapping whose paths no longer depend on the working directory,
    which differs on Tune's workers."""
    record = config_to_dict(config)
    for key in ("data", "test_data", "checkpoint", "output_dir"):
        value = record[key]
        if value is not None and not value.startswith(BUILTIN_PREFIX):
            record[key] = str(Path(value).expanduser().resolve())
    uri = record["tracking"]["uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        record["tracking"]["uri"] = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:
        record["tracking"]["uri"] = str(Path(uri).expanduser().resolve())
    return record


def _trial_name(values: dict[str, Any]) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
             f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sorted(values.items())]
    return "trial " + " ".join(parts)


def _run_trial(values: dict[str, Any], base_record: dict[str, Any], parent_run_id: str, n_threads: int) -> None:
    """Tune's function trainable: one search, reported to Tune once at its end."""
    import torch
    from ray import tune

    from rl_pruner.search import run_search

    torch.set_num_threads(n_threads)
    base = config_from_dict(base_record, source="the sweep configuration")
    config = trial_config(base, values)
    summary = run_search(config, parent_run_id=parent_run_id)
    test = summary.get("test_top1", {}).get("best")
    tune.report({
        "run_id": summary["run_id"],
        "best_reward": summary.get("best_reward", float("nan")),
        "macs_ratio": summary.get("best_macs_ratio") or float("nan"),
        "test_top1": float("nan") if test is None else test,
        "best_policy_artifact": summary.get("best_policy_artifact", ""),
    })


def run_sweep(config: SearchConfig) -> dict[str, Any]:
    """Run the sweep described by ``config.sweep`` and return its summary."""
    check_tracking_uri(config.tracking.uri)
    sweep = config.sweep
    storage = Path(config.output_dir).resolve() / "tune"
    base_record = _absolute_paths(config)
    config = config_from_dict(base_record, source="the sweep configuration")
    tags = {"model": config.model, "kind": "sweep", "criterion": config.criterion}
    run_name = config.tracking.run_name or f"sweep {config.model}"
    with ray_cluster(config.distributed.ray_address) as cluster, \
            SearchTracker(config.tracking.uri, config.tracking.experiment, run_name=run_name, tags=tags) as parent:
        # Imported only now: the cluster must be set up before Ray is first imported,
        # which decides whether a local cluster listens on 127.0.0.1 only.
        from ray import tune

        parent.log_params({key: value for key, value in flatten_config(config).items()
                           if key.startswith("sweep.") or key in ("model", "data", "criterion", "episodes")})
        # Tune pickles the trainable, so it captures plain values only.
        parent_run_id, n_threads = parent.run_id, sweep.cpus_per_trial

        def trainable(values: dict[str, Any]) -> None:
            _run_trial(values, base_record, parent_run_id, n_threads)

        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": sweep.cpus_per_trial}),
            param_space=trial_space(config),
            tune_config=tune.TuneConfig(num_samples=sweep.num_samples,
                                        max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"sweep-{parent.run_id}", storage_path=str(storage), verbose=0),
        )
        logger.info("sweep %s: Tune runs its trials on %d CPUs", parent.run_id, cluster["n_cpus"])
        # Tune prints its trial table on stdout; it goes to stderr, with the other
        # progress output, so that stdout holds only the report (or --json).
        with contextlib.redirect_stdout(sys.stderr):
            results = tuner.fit()
        trials = [_trial_record(result) for result in results]
        summary = _log_sweep(parent, config, trials)
    failed = [trial for trial in trials if trial.get("error")]
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {len(trials)} sweep trials failed (first: {failed[0]['error']}); "
            f"see sweep/trials.json in MLflow run {summary['run_id']}"
        )
    return summary


def _trial_record(result: Any) -> dict[str, Any]:
    values = {key: value for key, value in result.config.items()}
    record: dict[str, Any] = {"values": values}
    if result.error is not None:
        record["error"] = str(result.error).strip().splitlines()[-1] if str(result.error).strip() else repr(result.error)
        return record
    metrics = result.metrics or {}
    for key in ("run_id", "best_reward", "macs_ratio", "test_top1", "best_policy_artifact"):
        record[key] = metrics.get(key)
    return record


def _accuracy(trial: dict[str, Any]) -> float:
    """Test top-1 where the search had test data, else the reward (in percent)."""
    test = trial.get("test_top1")
    if test is not None and not math.isnan(test):
        return float(test)
    return 100.0 * float(trial.get("best_reward") or float("nan"))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (lower MACs ratio, higher accuracy), by MACs ratio."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for index in order:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def _log_sweep(parent: SearchTracker, config: SearchConfig, trials: list[dict[str, Any]]) -> dict[str, Any]:
    done = [trial for trial in trials if not trial.get("error") and trial.get("run_id")]
    for trial in done:
        trial[ACCURACY_KEY] = _accuracy(trial)
    best_per_target: dict[float, dict[str, Any]] = {}
    for trial in done:
        target = float(trial["values"]["macs_target"])
        if target not in best_per_target or trial[ACCURACY_KEY] > best_per_target[target][ACCURACY_KEY]:
            best_per_target[target] = trial

    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        (folder / "trials.json").write_text(json.dumps(trials, indent=2, default=str))
        table = {f"{target:g}": _table_row(trial) for target, trial in sorted(best_per_target.items())}
        (folder / "best_per_target.json").write_text(json.dumps(table, indent=2))
        (folder / "best_per_target.md").write_text(_markdown_table(table))
        for name in ("trials.json", "best_per_target.json", "best_per_target.md"):
            parent.log_artifact(folder / name, "sweep")
    for target, trial in best_per_target.items():
        policy: Policy = download_policy(trial["best_policy_artifact"], config.tracking.uri)
        parent.log_policy(policy, f"policies/target_{target:g}/best_policy.json")
        parent.log_metrics({f"sweep/target_{target:g}/accuracy": trial[ACCURACY_KEY],
                            f"sweep/target_{target:g}/macs_ratio": float(trial["macs_ratio"])})

    points = [(float(trial["macs_ratio"]), trial[ACCURACY_KEY]) for trial in done]
    labels = [_trial_name(trial["values"]).removeprefix("trial ") for trial in done]
    has_test = all(trial.get("test_top1") is not None and not math.isnan(trial["test_top1"]) for trial in done)
    ylabel = "test top-1 (%)" if has_test else "reward-split top-1 (%)"
    parent.log_figure(plot_pareto_front(points, pareto_front(points), labels, ylabel), "plots/pareto.png")
    parent.log_metrics({"sweep/trials": float(len(trials)), "sweep/failed": float(len(trials) - len(done))})
    return {"run_id": parent.run_id, "trials": copy.deepcopy(trials),
            "best_per_target": {f"{target:g}": _table_row(trial) for target, trial in best_per_target.items()}}


def _table_row(trial: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": trial["run_id"], "accuracy": trial[ACCURACY_KEY], "macs_ratio": trial["macs_ratio"],
            "best_reward": trial["best_reward"], "values": trial["values"],
            "policy": trial["best_policy_artifact"]}


def _markdown_table(table: dict[str, dict[str, Any]]) -> str:
    lines = ["| MACs target | accuracy | MACs ratio | reward | run | values |", "| --- | --- | --- | --- | --- | --- |"]
    for target, row in table.items():
        values = ", ".join(f"{key}={value}" for key, value in sorted(row["values"].items()))
        lines.append(f"| {target} | {row['accuracy']:.2f} | {row['macs_ratio']:.4f} | {row['best_reward']:.4f} | "
                     f"{row['run_id']} | {values} |")
    return "\n".join(lines) + "\n"
