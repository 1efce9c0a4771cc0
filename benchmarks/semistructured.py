"""2:4 semi-structured sparsity on ResNet-20: test top-1 before and after 1 epoch of masked fine-tuning.

Every eligible layer of the trained CIFAR-10 ResNet-20 gets its 2:4 mask (2 of every 4
consecutive weights along the input dimension kept, by magnitude). That is every
convolution except the first (3 * 3 * 3 = 27 weights per filter, not a multiple of 4)
and the linear classifier. Top-1 on the whole CIFAR-10 JPEG test split is measured
four times. First for the dense model, then for the masked model without fine-tuning,
with its own batch-norm statistics and with them re-estimated on 2,000 training
images. Last after 1 epoch of fine-tuning with the masks held on the whole training
archive with random crops and flips. Settings: cross-entropy, SGD with momentum 0.9,
learning rate 0.01 with a cosine schedule, weight decay 5e-4, batch 128. The export to sparse semi-structured tensors
is attempted last. Without a CUDA GPU of compute capability 8.0 or newer, it records
why it did not run.

With --max-minutes, Ctrl-C is sent to the process once that much training time has
passed. The run then saves its state to --state and measures the weights it has
reached, recorded with "finished": false. --resume continues it.

Run: python benchmarks/semistructured.py  -> benchmarks/results/semistructured.json
"""

from __future__ import annotations

import copy

import torch
from _common import cifar_training_data, shared_data, train_for_at_most, training_arguments, write_result

from rl_pruner.engine.batchnorm import reestimate_batchnorm
from rl_pruner.evaluation import evaluate_top1
from rl_pruner.models.registry import load_model
from rl_pruner.training.loop import TrainingConfig, read_state_summary
from rl_pruner.training.semistructured import (
    attach_two_four_masks,
    count_two_four_violations,
    eligible_layers,
    export_semi_structured,
    fine_tune_two_four,
)
from rl_pruner.training.sparsity import remove_weight_masks

BN_IMAGES = 2000
CONFIG = TrainingConfig(epochs=1, batch_size=128, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, seed=0,
                        checkpoint_every=20, channels_last=True)


def main() -> None:
    args = training_arguments(__doc__.splitlines()[0], "semistructured", "resume state file of the masked fine-tuning")
    data = shared_data()
    loaded = load_model("cifar_resnet20", data / "checkpoints" / "cifar10-resnet20.th")
    splits = cifar_training_data(BN_IMAGES)
    train_augmented = splits.train_augmented
    bn_batches, test_batches = splits.bn_batches, splits.test_batches
    layers = eligible_layers(loaded.model)

    dense_top1 = evaluate_top1(loaded.model, test_batches)
    masked = copy.deepcopy(loaded.model)
    attach_two_four_masks(masked, layers)
    remove_weight_masks(masked)
    masked_top1 = evaluate_top1(masked, test_batches)
    masked_bn_top1 = evaluate_top1(reestimate_batchnorm(copy.deepcopy(masked), bn_batches), test_batches)
    print(f"dense {dense_top1:.2f} %, masked {masked_top1:.2f} %, masked with batch norm re-estimated "
          f"{masked_bn_top1:.2f} %")

    model = copy.deepcopy(loaded.model)
    run = train_for_at_most(
        lambda: fine_tune_two_four(model, train_augmented, CONFIG, layers=layers, state_path=args.state,
                                   resume=args.resume),
        args.max_minutes,
    )

    progress = read_state_summary(args.state)
    modules = dict(model.named_modules())
    violations = sum(count_two_four_violations(modules[name].weight) for name in layers)
    finetuned_top1 = evaluate_top1(model, test_batches)
    export = export_semi_structured(model, layers)
    print(f"after {progress['step']} steps of masked fine-tuning: {finetuned_top1:.2f} %; export: "
          f"{export.reason or ', '.join(export.exported_layers)}")

    n_masked = sum(modules[name].weight.numel() for name in layers)
    n_weights = sum(module.weight.numel() for module in modules.values() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)))
    write_result("semistructured", {
        "model": "cifar_resnet20", "masked_layers": layers, "masked_weight_share": n_masked / n_weights,
        "bn_images": BN_IMAGES, "train_images": len(train_augmented), "test_images": splits.n_test_images,
        "config": CONFIG.to_dict(), "finished": run.finished, "steps_done": progress["step"],
        "steps_total": CONFIG.epochs * (len(train_augmented) // CONFIG.batch_size),
        "seconds_this_invocation": run.seconds, "resumed": args.resume, "state": str(args.state),
        "dense_top1": dense_top1, "masked_top1": masked_top1, "masked_bn_reestimated_top1": masked_bn_top1,
        "finetuned_top1": finetuned_top1, "groups_breaking_2_4_after": violations,
        "export": {"reason": export.reason, "exported_layers": export.exported_layers,
                   "skipped_layers": export.skipped_layers},
    })


if __name__ == "__main__":
    main()
