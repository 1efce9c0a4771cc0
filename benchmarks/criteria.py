"""Test top-1 of ResNet-56 pruned to half its MACs with each importance criterion.

Same uniform allocation for every criterion (one pruning ratio in every layer, solved
for a 0.5 MACs target with round_to 1, since ResNet-56's 16-channel stage allows only
8 or 16 channels with round_to 8), batch-norm statistics re-estimated on 2,000
training images, no fine-tuning, top-1 on the whole CIFAR-10 JPEG test split. The
apoz and taylor criteria use 512 other training images for calibration.

A second allocation, "block-internal", prunes only the first convolution's output
channels inside each residual block (ratio 0.5) and leaves residual streams intact,
as the classic L1 filter-pruning recipe for CIFAR ResNets does; it is reported for
scale.

Run: python benchmarks/criteria.py  -> benchmarks/results/criteria.json
"""

from __future__ import annotations

import time

import torch
from _common import shared_data, write_result

from rl_pruner.data import build_image_folder, load_batches, split_indices
from rl_pruner.engine.pruner import Pruner
from rl_pruner.evaluation import evaluate_top1
from rl_pruner.models.registry import load_model
from rl_pruner.policy import CRITERIA

MACS_TARGET = 0.5
BN_IMAGES = 2000
CALIBRATION_IMAGES = 512


def main() -> None:
    torch.manual_seed(0)
    data = shared_data()
    loaded = load_model("cifar_resnet56", data / "checkpoints" / "cifar10-resnet56.th")
    train = build_image_folder(data / "cifar10-jpeg" / "train.tar.gz", image_size=None)
    test = build_image_folder(data / "cifar10-jpeg" / "test.tar.gz", image_size=None)
    bn_indices, calibration_indices = split_indices(len(train), [BN_IMAGES, CALIBRATION_IMAGES], seed=0)
    bn_batches = load_batches(train, bn_indices, 250)
    calibration = load_batches(train, calibration_indices, 128)
    test_batches = load_batches(test, None, 500)
    pruner = Pruner(loaded, calibration)
    dense_top1 = evaluate_top1(loaded.model, test_batches)

    uniform = pruner.uniform_policy(macs_target=MACS_TARGET, round_to=1)
    internal_ratios = {
        layer.name: 0.5 for layer in pruner.structure.layers if layer.block is not None or
        (layer.name.endswith(".conv1") and layer.name.count(".") == 2)
    }
    rows = {}
    for criterion in CRITERIA:
        for allocation, ratios in (("uniform", uniform.pruning_ratios), ("block-internal", internal_ratios)):
            start = time.perf_counter()
            policy = pruner.make_policy(ratios, criterion=criterion, round_to=1)
            pruned = pruner.apply(policy, bn_batches)
            top1 = evaluate_top1(pruned, test_batches)
            rows.setdefault(criterion, {})[allocation] = {
                "top1": top1, "macs_ratio": policy.metadata["macs_ratio"],
                "seconds": time.perf_counter() - start,
            }
            print(f"{criterion:>9} {allocation:>15}: top-1 {top1:.2f} % at {policy.metadata['macs_ratio']:.3f} MACs")
    write_result("criteria", {
        "model": "cifar_resnet56", "macs_target": MACS_TARGET, "round_to": 1,
        "bn_images": BN_IMAGES, "calibration_images": CALIBRATION_IMAGES,
        "test_images": len(test), "dense_top1": dense_top1, "criteria": rows,
    })


if __name__ == "__main__":
    main()
