"""Test top-1 of ResNet-56 pruned to half its MACs, before and after distillation fine-tuning.

The trained CIFAR-10 ResNet-56 is pruned with one L1 pruning ratio in every layer,
solved for a 0.5 MACs target with round_to 1 (as in criteria.py), and its batch-norm
statistics are re-estimated on 2,000 training images. The pruned model is then
distilled from the dense model for 2 epochs on the whole training archive with random
crops and flips. Settings: SGD with momentum 0.9, learning rate 0.01 with a cosine
schedule, weight decay 5e-4, batch 128, temperature 4, alpha 0.9. Top-1 is measured on the whole
CIFAR-10 JPEG test split for the dense model, the pruned model before fine-tuning,
and after each epoch. The acceptance line is a gain of at least 8 points over the
pruned model before fine-tuning.

Weights and inputs are in channels-last memory format, which is faster on CPUs. The
resume state goes to --state (default: a file in the system's temporary folder), so a
stopped run continues with --resume. With --max-minutes, the run stops once that much
wall time has passed since the start of training, saves its state, measures the test
top-1 of the weights so far and writes them with "finished": false.

Run: python benchmarks/finetune.py  -> benchmarks/results/finetune.json
"""

from __future__ import annotations

from _common import cifar_training_data, shared_data, train_for_at_most, training_arguments, write_result

from rl_pruner.engine.pruner import Pruner
from rl_pruner.evaluation import evaluate_top1
from rl_pruner.models.registry import load_model
from rl_pruner.training.distill import DistillationSettings, distill
from rl_pruner.training.loop import TrainingConfig, read_state_summary

MACS_TARGET = 0.5
BN_IMAGES = 2000
REQUIRED_GAIN_POINTS = 8.0
CONFIG = TrainingConfig(epochs=2, batch_size=128, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, seed=0,
                        checkpoint_every=20, channels_last=True)
DISTILLATION = DistillationSettings(temperature=4.0, alpha=0.9)


def main() -> None:
    args = training_arguments(__doc__.splitlines()[0], "finetune", "resume state file of the distillation run")
    data = shared_data()
    loaded = load_model("cifar_resnet56", data / "checkpoints" / "cifar10-resnet56.th")
    splits = cifar_training_data(BN_IMAGES)
    train_augmented = splits.train_augmented
    bn_batches, test_batches = splits.bn_batches, splits.test_batches
    dense_top1 = evaluate_top1(loaded.model, test_batches)

    pruner = Pruner(loaded)
    policy = pruner.uniform_policy(macs_target=MACS_TARGET, round_to=1)
    pruned = pruner.apply(policy, bn_batches)
    pruned_top1 = evaluate_top1(pruned, test_batches)
    print(f"dense {dense_top1:.2f} %, pruned before fine-tuning {pruned_top1:.2f} %")

    common = {
        "model": "cifar_resnet56", "macs_target": MACS_TARGET, "round_to": 1, "criterion": policy.criterion,
        "macs_ratio": policy.metadata["macs_ratio"], "bn_images": BN_IMAGES,
        "train_images": len(train_augmented), "test_images": splits.n_test_images,
        "config": CONFIG.to_dict(), "distillation": DISTILLATION.to_dict(),
        "dense_top1": dense_top1, "pruned_top1": pruned_top1, "required_gain_points": REQUIRED_GAIN_POINTS,
        "resumed": args.resume, "state": str(args.state),
    }
    run = train_for_at_most(
        lambda: distill(pruned, loaded.model, train_augmented, CONFIG, DISTILLATION, test_batches=test_batches,
                        state_path=args.state, resume=args.resume),
        args.max_minutes,
    )
    if not run.finished:
        steps_done = read_state_summary(args.state)["step"]
        partial_top1 = evaluate_top1(pruned, test_batches)
        print(f"stopped after step {steps_done} of {CONFIG.epochs * (len(train_augmented) // CONFIG.batch_size)}: "
              f"{partial_top1:.2f} % ({partial_top1 - pruned_top1:+.2f} points); continue with --resume")
        write_result("finetune", {
            **common, "finished": False, "steps_done": steps_done, "partial_top1": partial_top1,
            "gain_points_so_far": partial_top1 - pruned_top1, "seconds_this_invocation": run.seconds,
        })
        return
    result = run.result
    final_top1 = result.history[-1]["eval/top1"]
    gain = final_top1 - pruned_top1
    print(f"after {CONFIG.epochs} epochs of distillation: {final_top1:.2f} % ({gain:+.2f} points)")

    write_result("finetune", {
        **common, "finished": True, "finetuned_top1": final_top1, "best_top1": result.best_top1,
        "gain_points": gain, "passed": gain >= REQUIRED_GAIN_POINTS, "history": result.history,
        "steps": result.steps, "seconds_this_invocation": run.seconds,
    })


if __name__ == "__main__":
    main()
