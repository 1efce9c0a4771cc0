"""End-to-end runs of the ``rl-pruner`` command line as a subprocess.

Every bad input must end with exit code 2 and one line on stderr that names the input
and the fix, with no traceback, and must leave the output file as it was. Each run
pays about 3 s of imports (torch and torchvision, measured on 2 cores), so the runs go
concurrently in session fixtures and each case is then checked by its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from rl_pruner.models.registry import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "cifar10-resnet20.th"
OUTPUT_BYTES = b"an output file written before the run\n"
N_WORKERS = min(4, os.cpu_count() or 1)
TIMEOUT_S = 300

Completed = subprocess.CompletedProcess[str]


def run_cli(*args: str | Path) -> Completed:
    """Run ``python -m rl_pruner.cli`` with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # One thread per run, because the fixtures start one run per core.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "rl_pruner.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False,
    )


def run_cli_concurrently(command_lines: list[list[str]]) -> list[Completed]:
    with ThreadPoolExecutor(N_WORKERS) as pool:
        return list(pool.map(lambda args: run_cli(*args), command_lines))


def read_files(directory: Path) -> dict[str, bytes]:
    """Contents of every file under ``directory``, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_edited_policy(source: Path, target: Path, **fields: Any) -> Path:
    record = json.loads(source.read_text())
    record.update(fields)
    target.write_text(json.dumps(record))
    return target


# Input files

@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """Valid and broken input files, by the field name the command lines below use."""
    directory = tmp_path_factory.mktemp("inputs")
    checkpoint = shared_data / "checkpoints" / CHECKPOINT_NAME
    paths = {"checkpoint": checkpoint}

    # The nested directory checks that 'policy uniform' creates the parents of --out.
    paths["policy"] = directory / "policies" / "cifar_resnet20.json"
    paths["policy_resnet56"] = directory / "policies" / "cifar_resnet56.json"
    results = run_cli_concurrently([
        ["policy", "uniform", "--model", model, "--macs-target", "0.5", "--out", str(paths[key])]
        for model, key in (("cifar_resnet20", "policy"), ("cifar_resnet56", "policy_resnet56"))
    ])
    for result in results:
        assert result.returncode == 0, result.stderr

    data = checkpoint.read_bytes()
    paths["truncated"] = directory / "truncated.th"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["not_checkpoint"] = directory / "notes.th"
    paths["not_checkpoint"].write_text("weights are in the other folder\n")

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    state["module.fc.weight"] = state.pop("module.linear.weight")
    paths["renamed"] = directory / "renamed.th"
    torch.save(state, paths["renamed"])
    paths["pickled"] = directory / "pickled.th"
    torch.save(load_model("cifar_resnet20", checkpoint).model, paths["pickled"])

    policy = paths["policy"]
    ratios = json.loads(policy.read_text())["pruning_ratios"]
    paths["ratio_policy"] = write_edited_policy(
        policy, directory / "ratio.json", pruning_ratios={**ratios, "conv1": 1.2}
    )
    paths["criterion_policy"] = write_edited_policy(policy, directory / "criterion.json", criterion="bogus")
    text = policy.read_text()
    paths["malformed_policy"] = directory / "malformed.json"
    paths["malformed_policy"].write_text(text[: len(text) // 2])
    return paths


# Bad input

@dataclass(frozen=True)
class BadInput:
    """A command line that must fail cleanly.

    ``{field}`` in ``args`` and ``named`` is a path from the ``inputs`` fixture, or
    ``{case}`` (the case's own directory) or ``{out}`` (the --out file in it).
    """

    name: str
    args: tuple[str, ...]
    named: tuple[str, ...]  # the input and value that the message must name
    fix: str  # part of the fix that the message must give
    existing_out: bool = True  # write OUTPUT_BYTES to {out} before the run


APPLY = ("apply", "--model", "cifar_resnet20", "--checkpoint", "{checkpoint}", "--policy", "{policy}",
         "--out", "{out}", "--force")
UNIFORM = ("policy", "uniform", "--model", "cifar_resnet20", "--out", "{out}", "--force")


def apply_with(**replacements: str) -> tuple[str, ...]:
    """Return the APPLY command line with the values of some options replaced, e.g. ``checkpoint="{renamed}"``."""
    args = list(APPLY)
    for option, value in replacements.items():
        args[args.index(f"--{option}") + 1] = value
    return tuple(args)


BAD_INPUTS = [
    BadInput("missing-checkpoint",
             ("apply", "--model", "cifar_resnet20", "--checkpoint", "{case}/missing.th", "--policy", "{policy}",
              "--out", "{out}"),
             ("{case}/missing.th",), "pass an existing file to --checkpoint", existing_out=False),
    BadInput("missing-policy", apply_with(policy="{case}/missing.json"),
             ("{case}/missing.json",), "pass an existing file to --policy"),
    BadInput("missing-data",
             ("evaluate", "--model", "cifar_resnet20", "--checkpoint", "{checkpoint}", "--data", "{case}/missing"),
             ("{case}/missing",), "pass a directory in ImageFolder layout", existing_out=False),
    BadInput("missing-pruned-model", ("inspect", "--model", "pruned:{case}/missing.pt"),
             ("{case}/missing.pt",), "--model pruned:PATH", existing_out=False),
    BadInput("truncated-checkpoint", apply_with(checkpoint="{truncated}"),
             ("{truncated}", "truncated"), "re-save or re-download it"),
    BadInput("text-file-checkpoint", apply_with(checkpoint="{not_checkpoint}"),
             ("{not_checkpoint}",), "pass a file written by torch.save"),
    BadInput("checkpoint-of-other-depth",
             apply_with(model="cifar_resnet56", policy="{policy_resnet56}"),
             ("{checkpoint}", "cifar_resnet56"), "pass the --model the checkpoint was trained as"),
    BadInput("checkpoint-renamed-key", apply_with(checkpoint="{renamed}"),
             ("{renamed}", "fc.weight"), "pass the --model the checkpoint was trained as"),
    BadInput("policy-of-other-model", apply_with(policy="{policy_resnet56}"),
             ("{policy_resnet56}", "cifar_resnet56"), "apply it to the model it was made for"),
    BadInput("policy-ratio-above-one", apply_with(policy="{ratio_policy}"),
             ("{ratio_policy}", "'conv1' is 1.2"), "in [0, 1)"),
    BadInput("uniform-ratio-above-one", (*UNIFORM, "--ratio", "1.2"), ("--ratio is 1.2",), "in [0, 1)"),
    BadInput("macs-target-zero", (*UNIFORM, "--macs-target", "0"), ("--macs-target is 0",), "in (0, 1]"),
    BadInput("macs-target-above-one", (*UNIFORM, "--macs-target", "1.5"), ("--macs-target is 1.5",), "in (0, 1]"),
    BadInput("policy-malformed-json", apply_with(policy="{malformed_policy}"),
             ("{malformed_policy}", "not valid JSON"), "fix or regenerate the file"),
    BadInput("uniform-unknown-criterion", (*UNIFORM, "--ratio", "0.5", "--criterion", "bogus"),
             ("'bogus'",), "choose one of l1, l2"),
    BadInput("policy-unknown-criterion", apply_with(policy="{criterion_policy}"),
             ("{criterion_policy}", "'bogus'"), "choose one of l1, l2"),
    BadInput("uniform-existing-out", tuple(a for a in UNIFORM if a != "--force") + ("--ratio", "0.5"),
             ("{out}",), "pass --force to overwrite it"),
    BadInput("apply-existing-out", tuple(a for a in APPLY if a != "--force"),
             ("{out}",), "pass --force to overwrite it"),
    BadInput("apply-out-is-checkpoint", apply_with(checkpoint="{out}"),
             ("--out {out} is also the --checkpoint file",), "pass another path to --out"),
    BadInput("apply-out-is-policy", apply_with(policy="{out}"),
             ("--out {out} is also the --policy file",), "pass another path to --out"),
    BadInput("uniform-out-below-a-file", (*UNIFORM, "--ratio", "0.5", "--out", "{out}/policy.json"),
             ("{out}/policy.json",), "choose a path in a directory"),
    BadInput("uniform-out-is-directory", (*UNIFORM, "--ratio", "0.5", "--out", "{case}"),
             ("{case}",), "pass a file path"),
    BadInput("pickled-model-untrusted", apply_with(checkpoint="{pickled}"),
             ("{pickled}", "pickled Python objects"), "pass --trust-pickle"),
    BadInput("input-size-zero", ("inspect", "--model", "cifar_resnet20", "--input-size", "0"),
             ("--input-size is 0",), "positive number of pixels", existing_out=False),
    BadInput("unknown-option", ("inspect", "--model", "cifar_resnet20", "--no-such-option"),
             ("--no-such-option",), "--help", existing_out=False),
]


@dataclass
class Outcome:
    """One bad-input run, with the files of its case directory before and after it."""

    result: Completed
    fields: dict[str, str]
    files_before: dict[str, bytes]
    files_after: dict[str, bytes]


@pytest.fixture(scope="session")
def bad_input_outcomes(
    request: pytest.FixtureRequest, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Run the selected BAD_INPUTS concurrently, each in its own directory."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), BadInput)
    ]
    fields_by_case, command_lines, before = {}, [], {}
    for case in selected:
        directory = tmp_path_factory.mktemp(case.name)
        out = directory / ("out.json" if case.args[0] == "policy" else "out.pt")
        if case.existing_out:
            out.write_bytes(OUTPUT_BYTES)
        fields = {key: str(path) for key, path in inputs.items()} | {"case": str(directory), "out": str(out)}
        fields_by_case[case.name] = fields
        command_lines.append([arg.format(**fields) for arg in case.args])
        before[case.name] = read_files(directory)

    results = run_cli_concurrently(command_lines)

    return {
        case.name: Outcome(result, fields_by_case[case.name], before[case.name],
                           read_files(Path(fields_by_case[case.name]["case"])))
        for case, result in zip(selected, results, strict=True)
    }


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.name)
def test_bad_input_fails_cleanly(case: BadInput, bad_input_outcomes: dict[str, Outcome]) -> None:
    outcome = bad_input_outcomes[case.name]
    stderr = outcome.result.stderr
    lines = stderr.strip().splitlines()

    assert outcome.result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rl-pruner: error: "), stderr
    for named in case.named:
        assert named.format(**outcome.fields) in lines[0]
    assert case.fix in lines[0]
    assert outcome.result.stdout == ""
    assert outcome.files_after == outcome.files_before


# Valid input

@pytest.fixture(scope="session")
def valid_runs(
    inputs: dict[str, Path], cifar_train_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Completed]:
    """Run inspect and apply on valid input concurrently, because they do not depend on each other."""
    out = tmp_path_factory.mktemp("apply") / "pruned.pt"
    command_lines = {
        "inspect": ["inspect", "--model", "cifar_resnet20", "--json"],
        "inspect_pickled": ["inspect", "--model", "cifar_resnet20", "--checkpoint", str(inputs["pickled"]),
                            "--trust-pickle", "--json"],
        # Batch norm re-estimated on 200 training images.
        "apply": ["apply", "--model", "cifar_resnet20", "--checkpoint", str(inputs["checkpoint"]),
                  "--policy", str(inputs["policy"]), "--out", str(out),
                  "--data", str(cifar_train_archive), "--bn-images", "200", "--json"],
    }
    results = run_cli_concurrently(list(command_lines.values()))
    return dict(zip(command_lines, results, strict=True))


def parse_json_output(result: Completed) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    record = json.loads(result.stdout)
    assert isinstance(record, dict)
    return record


def test_inspect_json_lists_structure(valid_runs: dict[str, Completed]) -> None:
    inspection = parse_json_output(valid_runs["inspect"])

    # ResNet-20 has 3 stages of 3 blocks. Its 12 layers are the first convolution of each
    # block, plus one group per stage for the block outputs (in stage 1 it includes the stem).
    # The first blocks of stages 2 and 3 change the shape, so only 7 blocks are removable.
    assert len(inspection["layers"]) == 12
    assert [block["name"] for block in inspection["removable_blocks"]] == [
        "layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2",
    ]
    assert inspection["pruned"] is False


def test_trusted_pickle_loads(valid_runs: dict[str, Completed]) -> None:
    inspection = parse_json_output(valid_runs["inspect_pickled"])

    assert inspection["fingerprint"] == parse_json_output(valid_runs["inspect"])["fingerprint"]


def test_apply_writes_pruned_model(valid_runs: dict[str, Completed]) -> None:
    applied = parse_json_output(valid_runs["apply"])

    # The policy keeps at most half of the dense MACs.
    assert Path(applied["out"]).is_file()
    assert applied["bn_reestimated_on"] == 200
    assert 0 < applied["macs_ratio"] <= 0.5
    assert applied["after"]["params"] < applied["before"]["params"]


def test_evaluate_reads_pruned_model(valid_runs: dict[str, Completed], cifar_test_archive: Path) -> None:
    applied = parse_json_output(valid_runs["apply"])
    result = run_cli("evaluate", "--model", f"pruned:{applied['out']}", "--data", cifar_test_archive,
                     "--limit", "200", "--json")

    evaluation = parse_json_output(result)
    assert evaluation["images"] == 200
    assert isinstance(evaluation["top1"], float)
    assert 0.0 <= evaluation["top1"] <= 100.0
    assert evaluation["macs"] == applied["after"]["macs"]
