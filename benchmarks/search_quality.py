"""Search quality on CIFAR-10 ResNet-56: the best PPO policy against the baseline allocations.

For each MACs target, one search (experiments/resnet56-cifar10.yaml: l1 criterion,
round_to 1, a reward split of 5,000 training images, batch norm re-estimated on
1,000 others, no fine-tuning) runs the given number of episodes. Its best policy and
the baselines (uniform, Torch-Pruning's global L1 and LAMP allocations, all with the
same criterion, batch-norm re-estimation and budget) are then scored on the whole
CIFAR-10 JPEG test split (10,000 images).

Run: python benchmarks/search_quality.py [--episodes 248] [--targets 0.3 0.5] [--seed 0]
  -> benchmarks/results/search_quality.json (the MLflow store goes to a temporary folder)
Entries of targets that are not run again are kept, each with the environment version
and date it was measured with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, RESULTS_DIR, shared_data, write_result

from rl_pruner import envs
from rl_pruner.config import load_config
from rl_pruner.search import run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=248)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = shared_data()
    store = Path(tempfile.mkdtemp(prefix="rl-pruner-quality-"))
    results = _earlier_targets()
    for target in args.targets:
        overrides = [
            f"macs_target={target}", f"episodes={args.episodes}", f"seed={args.seed}",
            f"checkpoint={data / 'checkpoints' / 'cifar10-resnet56.th'}",
            f"data={data / 'cifar10-jpeg' / 'train.tar.gz'}",
            f"test_data={data / 'cifar10-jpeg' / 'test.tar.gz'}",
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"output_dir={store / 'runs'}",
        ]
        config = load_config(REPO_ROOT / "experiments" / "resnet56-cifar10.yaml", overrides)
        start = time.perf_counter()
        summary = run_search(config)
        minutes = (time.perf_counter() - start) / 60
        test = summary["test_top1"]
        baselines = {name: test[name] for name in config.baselines}
        margin = test["best"] - max(baselines.values())
        results[str(target)] = {
            "episodes": summary["episodes"], "seed": args.seed, "minutes": minutes,
            "episodes_per_minute": summary["episodes"] / minutes,
            "best_reward": summary["best_reward"], "best_macs_ratio": summary["best_macs_ratio"],
            "test_top1": test, "margin_over_best_baseline": margin,
            "baseline_rewards": {name: record["reward"] for name, record in summary["baselines"].items()},
            "best_reward_per_episode": summary.get("best_reward_curve", []),
            "run_id": summary["run_id"], "environment": envs.ENV_ID, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        print(f"target {target}: best {test['best']:.2f} %, baselines "
              + ", ".join(f"{n} {v:.2f} %" for n, v in baselines.items()) + f", margin {margin:+.2f} points")
        write_result("search_quality", {"model": "cifar_resnet56", "criterion": config.criterion,
                                        "reward_images": config.reward_images, "bn_images": config.bn_images,
                                        "targets": dict(sorted(results.items(), key=lambda item: float(item[0])))})


def _earlier_targets() -> dict[str, dict]:
    """Return the per-target entries of the existing result file, or an empty dict without one."""
    path = RESULTS_DIR / "search_quality.json"
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text())["targets"])


if __name__ == "__main__":
    main()
