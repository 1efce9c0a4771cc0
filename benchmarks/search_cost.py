"""Search cost: the share of each episode spent outside the reward's forward passes.

An episode's evaluation time (``episode/evaluation_seconds``: batch-norm
re-estimation plus the reward's forward passes) is compared with the wall time
between consecutive batches of episodes (the sub-environments of one rollout step in
lockstep), read from MLflow's metric timestamps, which also covers the environment's
steps, pruning, PPO's updates and MLflow logging.

Run on a finished search:
    python benchmarks/search_cost.py --tracking-uri sqlite:///PATH/mlflow.db --run-id RUN_ID
or without arguments to run a short ResNet-56 search first (24 episodes, a PPO
update every 4). Writes benchmarks/results/search_cost.json.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from _common import REPO_ROOT, shared_data, write_result
from mlflow.tracking import MlflowClient


def _history(client: MlflowClient, run_id: str, name: str) -> dict[int, tuple[float, int]]:
    return {m.step: (m.value, m.timestamp) for m in client.get_metric_history(run_id, name)}


def measure(tracking_uri: str, run_id: str) -> dict:
    client = MlflowClient(tracking_uri=tracking_uri)
    rewards = _history(client, run_id, "episode/reward")
    evaluation = _history(client, run_id, "episode/evaluation_seconds")
    batches = _logged_batches(rewards, evaluation)
    if len(batches) < 2:
        raise SystemExit(f"run {run_id} has {len(batches)} complete batches of episodes; at least 2 are needed")
    # Batch k's wall time runs from the logging of batch k-1 to that of batch k, and
    # contains the evaluations of batch k's episodes.
    wall = (rewards[batches[-1][-1]][1] - rewards[batches[0][-1]][1]) / 1000
    measured = [step for batch in batches[1:] for step in batch]
    evaluated = sum(evaluation[step][0] for step in measured)
    run = client.get_run(run_id)
    return {
        "run_id": run_id,
        "model": run.data.params.get("model"),
        "macs_target": run.data.params.get("macs_target"),
        "reward_images": run.data.params.get("reward_images"),
        "bn_images": run.data.params.get("bn_images"),
        "episodes_per_batch": len(batches[0]),
        "episodes_measured": len(measured),
        "wall_seconds": wall,
        "evaluation_seconds": evaluated,
        "share_outside_evaluation": 1 - evaluated / wall,
        "episodes_per_minute": len(measured) / (wall / 60),
    }


def _logged_batches(rewards: dict[int, tuple[float, int]], evaluation: dict[int, tuple[float, int]]) -> list[list[int]]:
    """Group episodes into the batches that were logged together, dropping an incomplete last batch.

    Sub-environments run their episodes in lockstep, so a batch's episodes are logged
    within milliseconds of each other, after all of them were evaluated. Batches are
    at least one evaluation apart. A search can stop in the middle of a batch, and the
    episodes it evaluated past its budget are not logged.
    """
    steps = sorted(rewards)
    gap_ms = 500 * min(evaluation[step][0] for step in steps)
    batches = [[steps[0]]]
    for previous, step in itertools.pairwise(steps):
        if rewards[step][1] - rewards[previous][1] > gap_ms:
            batches.append([])
        batches[-1].append(step)
    size = max(len(batch) for batch in batches)
    while batches and len(batches[-1]) < size:
        batches.pop()
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri")
    parser.add_argument("--run-id")
    args = parser.parse_args()
    if args.tracking_uri and args.run_id:
        result = measure(args.tracking_uri, args.run_id)
    else:
        from rl_pruner.config import load_config
        from rl_pruner.search import run_search

        data = shared_data()
        store = Path(tempfile.mkdtemp(prefix="rl-pruner-cost-"))
        uri = f"sqlite:///{store / 'mlflow.db'}"
        config = load_config(REPO_ROOT / "experiments" / "resnet56-cifar10.yaml", [
            "episodes=24", "ppo.episodes_per_update=4", "baselines=[uniform]", "test_data=null",
            f"checkpoint={data / 'checkpoints' / 'cifar10-resnet56.th'}",
            f"data={data / 'cifar10-jpeg' / 'train.tar.gz'}",
            f"tracking.uri={uri}", f"output_dir={store / 'runs'}",
        ])
        result = measure(uri, run_search(config)["run_id"])
    print(f"{result['share_outside_evaluation']:.1%} of episode time outside evaluation, "
          f"{result['episodes_per_minute']:.2f} episodes per minute")
    write_result("search_cost", result)


if __name__ == "__main__":
    main()
