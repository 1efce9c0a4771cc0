"""Batch-norm L1 sparsity training of ResNet-20, then pruning by batch-norm scale at half the MACs.

The trained CIFAR-10 ResNet-20 is trained for 1 epoch on the whole training archive
(random crops and flips) with cross-entropy plus an L1 penalty on every batch-norm
scale. The penalty's strength is 5e-3, warmed up linearly over the first 50 steps.
Settings: SGD with momentum 0.9, learning rate 0.02 with a cosine schedule, weight
decay 5e-4, batch 128. The strength
is far above network slimming's 1e-5 to 1e-4 because one epoch has about 1/160 of
the steps of the original's training run. With momentum 0.9 it lowers every scale by
up to about 0.2 over the epoch, on top of what the cross-entropy does. A strength of
0.1 (up to about 4) made the model collapse to a training loss of 2.0 within 70 steps.

Reported for the original and the sparsified model: the share of batch-norm scales
below 1e-2, the test top-1, and the test top-1 after pruning. Pruning uses the
``bn_scale`` criterion and one pruning ratio in every layer, solved for a 0.5 MACs
target with round_to 1. Batch-norm statistics are re-estimated on 2,000 training
images, and there is no fine-tuning after pruning.

With --max-minutes, Ctrl-C is sent to the process once that much training time has
passed. The run then saves its state to --state and prunes and measures the weights it
has reached, recorded with "finished": false. --resume continues it.

Run: python benchmarks/sparsify.py  -> benchmarks/results/sparsify.json
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from _common import cifar_training_data, shared_data, train_for_at_most, training_arguments, write_result
from torch import nn

from rl_pruner.engine.pruner import Pruner
from rl_pruner.evaluation import evaluate_top1
from rl_pruner.models.registry import LoadedModel, load_model
from rl_pruner.training.loop import TrainingConfig, read_state_summary
from rl_pruner.training.sparsity import (
    SMALL_BN_SCALE,
    BNPenaltySchedule,
    bn_scale_share_below,
    train_sparse,
)

MACS_TARGET = 0.5
BN_IMAGES = 2000
CONFIG = TrainingConfig(epochs=1, batch_size=128, learning_rate=0.02, momentum=0.9, weight_decay=5e-4, seed=0,
                        checkpoint_every=20, channels_last=True)
BN_PENALTY = BNPenaltySchedule(strength=5e-3, kind="linear_warmup", warmup_steps=50)


def prune_and_measure(loaded: LoadedModel, model: nn.Module, bn_batches: list, test_batches: list) -> dict[str, Any]:
    """Prune ``model`` by batch-norm scale at the MACs target and return its test top-1 and MACs ratio."""
    pruner = Pruner(dataclasses.replace(loaded, model=model.eval()))
    policy = pruner.uniform_policy(macs_target=MACS_TARGET, criterion="bn_scale", round_to=1)
    pruned = pruner.apply(policy, bn_batches)
    return {"pruned_top1": evaluate_top1(pruned, test_batches), "macs_ratio": policy.metadata["macs_ratio"],
            "uniform_ratio": policy.metadata["uniform_ratio"]}


def main() -> None:
    args = training_arguments(__doc__.splitlines()[0], "sparsify", "resume state file of the sparsity training")
    data = shared_data()
    loaded = load_model("cifar_resnet20", data / "checkpoints" / "cifar10-resnet20.th")
    splits = cifar_training_data(BN_IMAGES)
    train_augmented = splits.train_augmented
    bn_batches, test_batches = splits.bn_batches, splits.test_batches

    original = {
        "bn_small_share": bn_scale_share_below(loaded.model),
        "dense_top1": evaluate_top1(loaded.model, test_batches),
        **prune_and_measure(loaded, copy.deepcopy(loaded.model), bn_batches, test_batches),
    }
    print(f"original: {original}")

    sparsified_model = copy.deepcopy(loaded.model)
    run = train_for_at_most(
        lambda: train_sparse(sparsified_model, train_augmented, CONFIG, bn_penalty=BN_PENALTY,
                             state_path=args.state, resume=args.resume),
        args.max_minutes,
    )

    progress = read_state_summary(args.state)
    sparsified = {
        "bn_small_share": bn_scale_share_below(sparsified_model),
        "dense_top1": evaluate_top1(sparsified_model, test_batches),
        **prune_and_measure(loaded, sparsified_model, bn_batches, test_batches),
    }
    print(f"sparsified ({progress['step']} steps): {sparsified}")

    write_result("sparsify", {
        "model": "cifar_resnet20", "macs_target": MACS_TARGET, "round_to": 1, "criterion": "bn_scale",
        "small_bn_scale": SMALL_BN_SCALE, "bn_images": BN_IMAGES, "train_images": len(train_augmented),
        "test_images": splits.n_test_images, "config": CONFIG.to_dict(), "bn_penalty": BN_PENALTY.to_dict(),
        "finished": run.finished, "steps_done": progress["step"],
        "steps_total": CONFIG.epochs * (len(train_augmented) // CONFIG.batch_size),
        "seconds_this_invocation": run.seconds, "resumed": args.resume, "state": str(args.state),
        "original": original, "sparsified": sparsified,
    })


if __name__ == "__main__":
    main()
