"""Bad input to ``rl-pruner finetune`` and ``sparsify``: one stderr line naming the input and the fix, exit code 2.

Zero epochs, a dense --model and an existing --out are covered in tests/test_training.py.
"""

from __future__ import annotations

import argparse
import json
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


def _digits_finetune(pruned: Path, teacher: Path, out: Path) -> argparse.Namespace:
    return _parse("finetune", "--model", f"pruned:{pruned}", "--teacher", str(teacher), "--data", "builtin:digits",
                  "--epochs", "1", "--device", "cpu", "--out", str(out))


def _three_class_folder(directory: Path) -> Path:
    """Write an ImageFolder of three classes with two 8x8 grayscale PNGs each."""
    root = directory / "three-classes"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            Image.new("L", (8, 8), color=60 * index).save(root / name / f"{index}.png")
    return root


@pytest.mark.parametrize(("student", "teacher"), [("digits_cnn", "cifar_resnet20"), ("cifar_resnet20", "digits_cnn")])
def test_finetune_rejects_other_architecture_teacher(
    student: str, teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, pruned = _dense_and_pruned(tmp_path, student)
    other_dense, _ = _dense_and_pruned(tmp_path, teacher)
    out = tmp_path / "finetuned.pt"
    args = _digits_finetune(pruned, other_dense, out)

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
    args = _digits_finetune(pruned, missing, out)

    assert run_training_command(args) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --teacher {missing} cannot be the teacher of pruned:{pruned}, a pruned digits_cnn: "
        f"checkpoint {missing} not found; pass the dense digits_cnn checkpoint that the student was pruned from\n"
    )
    assert not out.exists()


def test_finetune_pickled_teacher_keeps_trust_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    pickled = tmp_path / "pickled.pt"
    torch.save(load_model("digits_cnn", dense).model, pickled)
    out = tmp_path / "finetuned.pt"
    args = _digits_finetune(pruned, pickled, out)

    assert run_training_command(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"rl-pruner: error: --teacher {pickled}: checkpoint {pickled} contains pickled Python objects")
    assert "pass --trust-pickle" in err
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


def _digits_sparsify(dense: Path, out: Path, *extra: str) -> argparse.Namespace:
    return _parse("sparsify", "--model", "digits_cnn", "--checkpoint", str(dense), "--data", "builtin:digits",
                  "--epochs", "1", "--limit", "128", "--batch-size", "64", "--device", "cpu", "--out", str(out),
                  *extra)


@pytest.mark.parametrize(("extra", "message"), [
    (("--bn-l1-warmup", "-5"), "--bn-l1-warmup is -5; pass 0 for a constant penalty or a number of steps"),
    (("--target-sparsity", "-0.1"), "--target-sparsity is -0.1; it must be a share of zero weights in [0, 1)"),
    (("--target-sparsity", "1.0"), "--target-sparsity is 1.0; it must be a share of zero weights in [0, 1)"),
])
def test_sparsify_rejects_values_out_of_range(
    extra: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    out = tmp_path / "out.pt"

    assert run_training_command(_digits_sparsify(dense, out, *extra)) == 2
    assert capsys.readouterr().err == f"rl-pruner: error: {message}\n"
    assert not out.exists()


def test_state_of_another_input_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    before = dense.read_bytes()
    out = tmp_path / "out.pt"

    assert run_training_command(_digits_sparsify(dense, out, "--state", str(dense), "--force")) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --state {dense} is also the --checkpoint file; pass another path to --state\n"
    )
    assert dense.read_bytes() == before
    assert not out.exists()


def test_force_keeps_file_that_is_not_a_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    other = tmp_path / "other.pt"
    other.write_bytes(dense.read_bytes())
    out = tmp_path / "out.pt"

    assert run_training_command(_digits_sparsify(dense, out, "--state", str(other), "--force")) == 2
    err = capsys.readouterr().err
    assert err == (
        f"rl-pruner: error: --state {other} exists but is not a training state saved by rl-pruner, and --force "
        "deletes only those; pass another path to --state\n"
    )
    assert other.read_bytes() == dense.read_bytes()
    assert not out.exists()


def test_existing_state_needs_resume_or_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    out = tmp_path / "out.pt"
    assert run_training_command(_digits_sparsify(dense, out, "--bn-l1", "0")) == 0
    capsys.readouterr()
    state = Path(f"{out}.state")
    saved = state.read_bytes()

    assert run_training_command(_digits_sparsify(dense, tmp_path / "second.pt", "--state", str(state))) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: training state {state} of an earlier run exists; pass --resume to continue it "
        "or --force to start over\n"
    )
    assert state.read_bytes() == saved
    assert not (tmp_path / "second.pt").exists()

    missing = tmp_path / "missing.state"
    assert run_training_command(_digits_sparsify(dense, tmp_path / "third.pt", "--state", str(missing),
                                                 "--resume")) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --resume: training state {missing} not found; start a new run without --resume\n"
    )


NO_BATCHNORM_MODULE = '''
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
'''


def test_sparsify_model_without_batchnorm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "no_batchnorm_model.py").write_text(NO_BATCHNORM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "no_batchnorm_model:build"
    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"
    torch.save(load_model(spec, input_size=8).model.state_dict(), dense)
    data = tmp_path / "rgb"
    for name in ("a", "b", "c"):
        (data / name).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (8, 8), color=(60 * index, 20, 200)).save(data / name / f"{index}.png")
    out = tmp_path / "out.pt"
    common = ("sparsify", "--model", spec, "--checkpoint", str(dense), "--input-size", "8", "--data", str(data),
              "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out))

    assert run_training_command(_parse(*common)) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --model {spec} has no batch norm with a learnable scale for --bn-l1 to act on; "
        "pass --bn-l1 0, with --target-sparsity for magnitude masks\n"
    )
    assert not out.exists()

    assert run_training_command(_parse(*common, "--bn-l1", "0", "--target-sparsity", "0.5", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bn_small_share_before"] is None
    # The default masked layers leave out the first convolution and the classifier, so
    # only the second convolution (576 of the 816 weights) ends half zeros.
    assert summary["zero_weight_share"] == pytest.approx(0.5 * 576 / 816)
    assert out.is_file()


def test_finetune_student_pruned_at_other_input_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    loaded = load_model("cifar_resnet20", input_size=40)
    dense = tmp_path / "dense.pt"
    torch.save(loaded.model.state_dict(), dense)
    pruner = Pruner(loaded)
    pruned_path = tmp_path / "pruned.pt"
    save_pruned_model(pruned_path, pruned_model_record(
        pruner.apply(pruner.uniform_policy(macs_target=0.5, round_to=1)), architecture="cifar_resnet20",
        input_shape=loaded.input_shape, num_classes=10, normalization=loaded.normalization, dropped_blocks=[],
        policy={},
    ))
    data = tmp_path / "ten-classes"
    for label in range(10):
        (data / str(label)).mkdir(parents=True)
        Image.new("RGB", (40, 40), color=(25 * label, 100, 50)).save(data / str(label) / "0.png")
    out = tmp_path / "finetuned.pt"
    args = _parse("finetune", "--model", f"pruned:{pruned_path}", "--teacher", str(dense), "--data", str(data),
                  "--epochs", "1", "--batch-size", "5", "--device", "cpu", "--out", str(out), "--json")

    assert run_training_command(args) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert load_model(f"pruned:{out}").input_shape == (3, 40, 40)


def test_resume_with_other_test_data_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    out = tmp_path / "out.pt"
    assert run_training_command(_digits_sparsify(dense, out, "--test-data", "builtin:digits")) == 0
    capsys.readouterr()
    written = out.read_bytes()

    assert run_training_command(_digits_sparsify(dense, out, "--resume", "--force")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "was saved with other settings (test_data 'builtin:digits' -> None)" in err
    assert out.read_bytes() == written


@pytest.mark.parametrize("clash", ["teacher", "model"])
def test_finetune_out_never_replaces_an_input(
    clash: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    target = dense if clash == "teacher" else pruned
    before = target.read_bytes()
    args = _digits_finetune(pruned, dense, target)
    for force in (False, True):
        args.force = force

        assert run_training_command(args) == 2
        assert capsys.readouterr().err == (
            f"rl-pruner: error: --out {target} is also the --{clash} file; pass another path to --out\n"
        )
        assert target.read_bytes() == before


def test_state_below_file_rejected_early(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a directory\n")
    out = tmp_path / "out.pt"

    assert run_training_command(_digits_sparsify(dense, out, "--state", f"{notes}/run.state")) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --state {notes}/run.state: {notes} is a file, not a directory; "
        "choose a path in a directory\n"
    )
    assert notes.read_text() == "not a directory\n"
    assert not out.exists()


def test_resume_non_state_names_state_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a training state\n")

    assert run_training_command(_digits_sparsify(dense, tmp_path / "out.pt", "--state", str(notes), "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"rl-pruner: error: --state {notes}: checkpoint {notes} is not a PyTorch checkpoint")


def test_resume_accepts_equivalent_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    out = tmp_path / "out.pt"
    assert run_training_command(_digits_finetune(pruned, dense, out)) == 0
    capsys.readouterr()

    args = _digits_finetune(pruned, tmp_path / "." / dense.name, out)
    args.resume = args.force = True
    assert run_training_command(args) == 0, capsys.readouterr().err


def test_sparsify_with_masks_keeps_last_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = _dense_and_pruned(tmp_path, "digits_cnn")
    out = tmp_path / "out.pt"
    args = _digits_sparsify(dense, out, "--bn-l1", "0", "--target-sparsity", "0.9", "--sparsity-end", "1.0",
                            "--mask-update-every", "1", "--epochs", "2", "--test-data", "builtin:digits", "--json")

    assert run_training_command(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_epoch"] == 2
    assert summary["best_top1"] == summary["history"][-1]["eval/top1"]
    state = torch.load(out, weights_only=True)
    model = load_model("digits_cnn").model
    model.load_state_dict(state)
    assert summary["zero_weight_share"] > 0.5


def test_sparsify_rejects_pruned_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    args = _parse("sparsify", "--model", f"pruned:{pruned}", "--checkpoint", str(dense), "--data", "builtin:digits",
                  "--epochs", "1", "--out", str(tmp_path / "out.pt"))

    assert run_training_command(args) == 2
    assert capsys.readouterr().err == (
        f"rl-pruner: error: --model is 'pruned:{pruned}'; sparsify trains a dense model before pruning, "
        "so pass a model name with its --checkpoint\n"
    )


def test_unusable_tracking_uri_names_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, pruned = _dense_and_pruned(tmp_path, "digits_cnn")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    out = tmp_path / "finetuned.pt"
    args = _parse("finetune", "--model", f"pruned:{pruned}", "--teacher", str(dense), "--data", "builtin:digits",
                  "--epochs", "1", "--device", "cpu", "--out", str(out), "--tracking-uri", f"sqlite:///{blocker}/mlflow.db")

    assert run_training_command(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{blocker} is a file, so {blocker / 'mlflow.db'} cannot be created; fix --tracking-uri," in err
    assert not out.exists()
