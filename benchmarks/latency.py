"""CPU latency of dense ResNet-50 against the same model pruned to half its MACs.

The pruned model comes from a uniform L1 policy at a 0.5 MACs target with round_to 8
(random weights: latency does not depend on their values). Latency is the median
wall time of one forward pass, after warm-up, at batch 1 and 32, on all torch threads.

Run: python benchmarks/latency.py  -> benchmarks/results/latency.json
"""

from __future__ import annotations

import torch
from _common import write_result

from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.evaluation import measure_latency
from rl_pruner.models.registry import load_model

SETTINGS = {1: (5, 20), 32: (2, 5)}  # batch size -> (warm-up passes, timed passes)


def main() -> None:
    torch.manual_seed(0)
    pruner = Pruner(load_model("resnet50"))
    policy = pruner.uniform_policy(macs_target=0.5, round_to=8)
    pruned = pruner.apply(policy)
    shape = (3, 224, 224)
    result: dict = {
        "dense_macs": pruner.structure.dense_macs,
        "pruned_macs": count_macs(pruned, shape),
        "batches": {},
    }
    result["macs_ratio"] = result["pruned_macs"] / result["dense_macs"]
    for batch_size, (warmup, repeats) in SETTINGS.items():
        dense = measure_latency(pruner.model, shape, batch_size=batch_size, warmup=warmup, repeats=repeats)
        small = measure_latency(pruned, shape, batch_size=batch_size, warmup=warmup, repeats=repeats)
        speedup = dense["median_ms"] / small["median_ms"]
        result["batches"][str(batch_size)] = {"dense": dict(dense), "pruned": dict(small), "speedup": speedup}
        print(f"batch {batch_size}: dense {dense['median_ms']:.1f} ms, pruned {small['median_ms']:.1f} ms, "
              f"speed-up {speedup:.2f}x")
    write_result("latency", result)


if __name__ == "__main__":
    main()
