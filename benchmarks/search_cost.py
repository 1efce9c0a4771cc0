"""Search cost: the share of each episode spent outside the reward's forward passes.

An episode's evaluation time (``episode/evaluation_seconds``: batch-norm
re-estimation plus the reward's forward passes) is compared with the wall time
between consecutive episodes, read from MLflow's metric timestamps, which also
covers the environment's steps, pruning, PPO's updates and MLflow logging.

Run on a finished search:
    python benchmarks/search_cost.py --tracking-uri sqlite:///PATH/mlflow.db --run-id RUN_ID
or without arguments to run a short ResNet-56 search first (24 episodes, a PPO
update every 4). Writes benchmarks/results/search_cost.json.
"""

from __future__ import annotations

import argparse
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
    steps = sorted(rewards)
    if len(steps) < 3:
        raise SystemExit(f"run {run_id} has {len(steps)} episodes; at least 3 are needed")
    # Episode k's wall time runs from the logging of episode k-1 to that of episode k.
    wall = (rewards[steps[-1]][1] - rewards[steps[0]][1]) / 1000
    evaluated = sum(evaluation[step][0] for step in steps[1:])
    run = client.get_run(run_id)
    return {
        "run_id": run_id,
        "model": run.data.params.get("model"),
        "macs_target": run.data.params.get("macs_target"),
        "reward_images": run.data.params.get("reward_images"),
        "bn_images": run.data.params.get("bn_images"),
        "episodes_measured": len(steps) - 1,
        "wall_seconds": wall,
        "evaluation_seconds": evaluated,
        "share_outside_evaluation": 1 - evaluated / wall,
        "episodes_per_minute": (len(steps) - 1) / (wall / 60),
    }


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
