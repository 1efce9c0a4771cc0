"""Episodes per minute of a ResNet-56 search with 1 and with 2 Ray workers, one torch thread each.

Both searches run on a private Ray cluster on this machine with the same seed and
configuration: 4 episodes at once (``ppo.episodes_per_update``), split over the
workers. The rate counts the episodes after the first group, from MLflow's metric
timestamps, so start-up (Ray, the workers loading the model) is left out. The
script also checks that both searches logged the same episodes (rewards, MACs ratios)
and found the same best policy.

    python benchmarks/distributed.py [--episodes 16] [--reward-images 1000]

Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import shared_data, write_result
from mlflow.tracking import MlflowClient

GROUP = 4


def _search(workers: int, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rl_pruner.config import config_from_dict
    from rl_pruner.distributed.cluster import ray_cluster
    from rl_pruner.search import run_search

    data = shared_data()
    config = config_from_dict({
        "model": "cifar_resnet56",
        "checkpoint": str(data / "checkpoints" / "cifar10-resnet56.th"),
        "data": str(data / "cifar10-jpeg" / "train.tar.gz"),
        "macs_target": 0.5, "round_to": 1, "reward_images": args.reward_images, "bn_images": args.bn_images,
        "batch_size": 250, "episodes": args.episodes, "baselines": [], "output_dir": str(folder / "runs"),
        "ppo": {"episodes_per_update": GROUP},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "distributed-benchmark",
                     "run_name": f"{workers} workers"},
        "distributed": {"workers": workers, "threads_per_worker": 1},
    }, source="benchmark configuration")
    with ray_cluster("local", n_cpus=2):
        summary = run_search(config)
    client = MlflowClient(config.tracking.uri)
    rewards = sorted(client.get_metric_history(summary["run_id"], "episode/reward"), key=lambda m: m.step)
    macs = sorted(client.get_metric_history(summary["run_id"], "episode/macs_ratio"), key=lambda m: m.step)
    evaluation = client.get_metric_history(summary["run_id"], "episode/evaluation_seconds")
    # Episodes after the first group, over the time since that group was logged.
    measured = len(rewards) - GROUP
    seconds = (rewards[-1].timestamp - rewards[GROUP - 1].timestamp) / 1000
    best = json.loads(Path(summary["best_policy"]).read_text())
    return {
        "workers": workers,
        "episodes": len(rewards),
        "episodes_per_minute": 60 * measured / seconds,
        "measured_episodes": measured,
        "measured_seconds": seconds,
        "mean_evaluation_seconds": sum(m.value for m in evaluation) / len(evaluation),
        "rewards": [m.value for m in rewards],
        "macs_ratios": [m.value for m in macs],
        "best_reward": summary["best_reward"],
        "best_pruning_ratios": best["pruning_ratios"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--reward-images", type=int, default=1000)
    parser.add_argument("--bn-images", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as directory:
        runs = [_search(workers, Path(directory) / f"w{workers}", args) for workers in (1, 2)]
    single, double = runs
    same = single["rewards"] == double["rewards"] and single["macs_ratios"] == double["macs_ratios"] \
        and single["best_pruning_ratios"] == double["best_pruning_ratios"]
    speedup = double["episodes_per_minute"] / single["episodes_per_minute"]
    for run in runs:
        print(f"{run['workers']} worker(s): {run['episodes_per_minute']:.2f} episodes/min "
              f"({run['measured_episodes']} episodes in {run['measured_seconds']:.1f} s)")
    print(f"speed-up {speedup:.2f}x; same episodes and best policy: {same}")
    write_result("distributed", {
        "model": "cifar_resnet56", "reward_images": args.reward_images, "bn_images": args.bn_images,
        "episodes_per_update": GROUP, "torch_threads_per_worker": 1,
        "speedup": speedup, "same_episodes_and_policy": same,
        "runs": [{key: value for key, value in run.items() if key not in ("rewards", "macs_ratios")}
                 for run in runs],
        "rewards_1_worker": single["rewards"], "rewards_2_workers": double["rewards"],
    })


if __name__ == "__main__":
    main()
