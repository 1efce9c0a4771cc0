"""Estimator against exact counts: 20 random mixed policies each on ResNet-56 and ResNet-50.

For each policy (random pruning ratios in [0, 0.8] for every layer, two random blocks
dropped, round_to 8) the pruned model is built and counted exactly; the estimator's
MACs and parameters are compared, and its time per call is measured.

Run: python benchmarks/estimator.py  -> benchmarks/results/estimator.json
"""

from __future__ import annotations

import random
import statistics
import time

from _common import shared_data, write_result

from rl_pruner.engine.estimate import estimate_cost
from rl_pruner.engine.macs import count_macs, count_params
from rl_pruner.engine.pruner import Pruner
from rl_pruner.models.registry import load_model

N_POLICIES = 20
TIMED_CALLS = 200


def measure(pruner: Pruner, seed: int) -> dict:
    structure = pruner.structure
    rng = random.Random(seed)
    rows, call_ms = [], []
    for _ in range(N_POLICIES):
        ratios = {layer.name: rng.uniform(0.0, 0.8) for layer in structure.layers}
        dropped = rng.sample(structure.block_names, 2)
        policy = pruner.make_policy(ratios, dropped, round_to=8)
        start = time.perf_counter()
        for _ in range(TIMED_CALLS):
            macs, params = estimate_cost(structure, ratios, dropped, 8)
        call_ms.append((time.perf_counter() - start) * 1000 / TIMED_CALLS)
        pruned = pruner.apply(policy)
        exact_macs = count_macs(pruned, structure.input_shape)
        exact_params = count_params(pruned)
        rows.append({
            "macs_ratio": exact_macs / structure.dense_macs,
            "estimated_macs": macs, "exact_macs": exact_macs,
            "estimated_params": params, "exact_params": exact_params,
            "macs_error": abs(macs - exact_macs) / exact_macs,
            "params_error": abs(params - exact_params) / exact_params,
        })
    return {
        "policies": rows,
        "max_macs_error": max(r["macs_error"] for r in rows),
        "max_params_error": max(r["params_error"] for r in rows),
        "estimator_ms_mean": statistics.mean(call_ms),
        "estimator_ms_max": max(call_ms),
    }


def main() -> None:
    checkpoint = shared_data() / "checkpoints" / "cifar10-resnet56.th"
    results = {
        "cifar_resnet56": measure(Pruner(load_model("cifar_resnet56", checkpoint)), seed=0),
        "resnet50": measure(Pruner(load_model("resnet50")), seed=1),
    }
    for name, result in results.items():
        print(f"{name}: max MACs error {result['max_macs_error']:.2e}, max params error "
              f"{result['max_params_error']:.2e}, estimator {result['estimator_ms_mean']:.3f} ms per call")
    write_result("estimator", {"n_policies": N_POLICIES, "round_to": 8, "dropped_blocks": 2, "models": results})


if __name__ == "__main__":
    main()
