"""Bad input to ``rl-pruner finetune`` and ``sparsify``: one stderr line naming the input and the fix, exit code 2.

Zero epochs, a dense --model and an existing --out are covered in tests/test_training.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import pruned_model_record, save_pruned_model
from rl_pruner.models.registry import load_model
from rl_pruner.training.cli import add_training_commands, run_training_command


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rl-pruner")
    add_training_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def _dense_and_pruned(directory: Path, architecture: str) -> tuple[Path, Path]:
    """Save an untrained ``architecture`` as a dense checkpoint and pruned uniformly to half its MACs."""
    torch.manual_seed(0)
    loaded = load_model(architecture)
    dense = directory / f"{architecture}.pt"
    torch.save(loaded.model.state_dict(), dense)
    pruner = Pruner(loaded)
    pruned = pruner.apply(pruner.uniform_policy(macs_target=0.5, round_to=1))
    pruned_path = directory / f"{architecture}-pruned.pt"
    save_pruned_model(pruned_path, pruned_model_record(
        pruned, architecture=architecture, input_shape=loaded.input_shape, num_classes=loaded.num_classes,
        normalization=loaded.normalization, dropped_blocks=[], policy={},
    ))
    return dense, pruned_path


def _three_class_folder(directory: Path) -> Path:
    """Write an ImageFolder of three classes with two 8x8 grayscale PNGs each."""
    root = directory / "three-classes"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            Image.new("L", (8, 8), color=60 * index).save(root / name / f"{index}.png")
    return root


@pytest.mark.parametrize(("student", "teacher"), [("digits_cnn", "cifar_resnet20"), ("cifar_resnet20", "digits_cnn")])
def test_finetune_rejects_teacher_of_other_architecture(
    student: str, teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, pruned = _dense_and_pruned(tmp_path, student)
    other_dense, _ = _dense_and_pruned(tmp_path, teacher)
    out = tmp_path / "finetuned.pt"
    args = _parse("finetune", "--model", f"pruned:{pruned}", "--teacher", str(other_dense),
                  "--data", "builtin:digits", "--epochs", "1", "--device", "cpu", "--out", str(out))

    assert run_training_command(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"rl-pruner: error: --teacher {other_dense} cannot be the teacher of pruned:{pruned}, "
                          f"a pruned {student}: checkpoint {other_dense} does not fit model {student}: ")
    assert err.endswith(f"; pass the dense {student} checkpoint that the student was pruned from\n")
    assert not out.exists()


def test_finetune_rejects_missing_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    missing = tmp_path / "missing.pt"
    out = tmp_path / "finetuned.pt"
    args = _parse("finetune", "--model", f"pruned:{pruned}", "--teacher", str(missing),
                  "--data", "builtin:digits", "--epochs", "1", "--device", "cpu", "--out", str(out))

    assert run_training_command(args) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --teacher {missing} cannot be the teacher of pruned:{pruned}, a pruned digits_cnn: "
        f"checkpoint {missing} not found; pass the dense digits_cnn checkpoint that the student was pruned from\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--data", "--test-data"])
@pytest.mark.parametrize("command", ["finetune", "sparsify"])
def test_rejects_data_with_other_classes(
    command: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    three_classes = _three_class_folder(tmp_path)
    data = {"--data": "builtin:digits", "--test-data": "builtin:digits", flag: str(three_classes)}
    model = (["--model", f"pruned:{pruned}", "--teacher", str(dense)] if command == "finetune"
             else ["--model", "digits_cnn", "--checkpoint", str(dense)])
    out = tmp_path / "out.pt"
    args = _parse(command, *model, "--data", data["--data"], "--test-data", data["--test-data"],
                  "--epochs", "1", "--device", "cpu", "--out", str(out))

    assert run_training_command(args) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: {flag} {three_classes} has 3 classes but the model outputs 10; "
        f"point {flag} at a data set with the model's 10 classes\n"
    )
    assert not out.exists()
    assert not Path(f"{out}.state").exists()
