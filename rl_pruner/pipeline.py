"""Pipelines: sparsify, search, apply and finetune in a row, each stage a child of one MLflow run.

A search configuration may carry a ``pipeline:`` section (:class:`PipelineConfig`).
``rl-pruner search`` ignores it, and ``rl-pruner pipeline CONFIG.yaml`` runs it::

    pipeline:
      stages: [sparsify, search, apply, finetune]
      sparsify: {epochs: 10, bn_l1: 1.0e-4, lr: 0.01, batch_size: 128}
      apply: {bn_images: null}
      finetune: {epochs: 10, temperature: 4.0, alpha: 0.9, lr: 0.01, batch_size: 128}

The stages run in this order, each as the command of the same name would:

- ``sparsify`` trains ``checkpoint`` with the batch-norm L1 penalty on ``data``, and its
  output replaces ``checkpoint`` in the stages after it.
- ``search`` is ``rl-pruner search`` with the rest of the configuration.
- ``apply`` prunes the checkpoint with the search's best policy and re-estimates
  batch norm on ``bn_images`` training images.
- ``finetune`` distills the pruned model from the checkpoint it was pruned from, the
  sparsified one when ``sparsify`` ran.

Every output goes under ``output_dir/<pipeline run id>/``::

    dense.pt                     digits_cnn trained on the fly, only when checkpoint is null
    sparsify/sparsified.pt       the sparsified dense state dict (and its resume state)
    search/<search run id>/      the search's outputs, best_policy.json among them
    apply/pruned.pt              the pruned model
    finetune/finetuned.pt        the fine-tuned pruned model (load it as pruned:PATH)
    summary.json                 per stage: MLflow run id, output path, metrics

In MLflow, the pipeline run (tag ``rl_pruner.command`` = ``pipeline``) logs the
configuration as parameters, ``summary.json`` as the artifact ``pipeline/summary.json``
and the metrics ``pipeline/<stage>/<name>``, e.g. ``pipeline/finetune/test_top1``
(percent). Each stage is one child run, with the tag ``mlflow.parentRunId``. When a
stage fails, the pipeline run ends FAILED, the error names the stage, and the outputs
of the stages before it stay where they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rl_pruner.errors import ConfigError, RLPrunerError

if TYPE_CHECKING:
    from rl_pruner.config import SearchConfig
    from rl_pruner.tracking import SearchTracker

logger = logging.getLogger(__name__)

PIPELINE_STAGES = ("sparsify", "search", "apply", "finetune")
# Each stage needs the output of the stage named here.
STAGE_INPUTS = {"apply": "search", "finetune": "apply"}
SUMMARY_ARTIFACT_DIR = "pipeline"
SUMMARY_FILE = "summary.json"


@dataclass
class SparsifyStageConfig:
    """Settings of the ``sparsify`` stage. Other options keep the defaults of ``rl-pruner sparsify``.

    :param epochs: Passes over the training images, >= 1.
    :param bn_l1: Strength of the L1 penalty on batch-norm scales, >= 0.
    :param lr: Initial SGD learning rate, > 0, lowered to 0 by a cosine schedule.
    :param batch_size: Images per optimizer step, >= 1.
    :param data: Training images, or None for the search's ``data``.
    """

    epochs: int = 10
    bn_l1: float = 1e-4
    lr: float = 0.01
    batch_size: int = 128
    data: str | None = None


@dataclass
class ApplyStageConfig:
    """Settings of the ``apply`` stage.

    :param bn_images: Training images that re-estimate batch-norm statistics after
        pruning, >= 0 (0 skips it), or None for the search's ``bn_images``, which is
        what the search scored its policies with.
    """

    bn_images: int | None = None


@dataclass
class FinetuneStageConfig:
    """Settings of the ``finetune`` stage. Other options keep the defaults of ``rl-pruner finetune``.

    :param epochs: Passes over the training images, >= 1.
    :param temperature: Softmax temperature of the distillation term, > 0.
    :param alpha: Weight of the distillation term, in [0, 1]; 1 - alpha weighs the cross-entropy.
    :param lr: Initial SGD learning rate, > 0, lowered to 0 by a cosine schedule.
    :param batch_size: Images per optimizer step, >= 1.
    :param data: Training images, or None for the search's ``data``.
    """

    epochs: int = 10
    temperature: float = 4.0
    alpha: float = 0.9
    lr: float = 0.01
    batch_size: int = 128
    data: str | None = None


@dataclass
class PipelineConfig:
    """The ``pipeline:`` section of a search configuration, run by ``rl-pruner pipeline``.

    :param stages: Stages to run, in the order sparsify, search, apply, finetune, each at
        most once. Apply needs search, and finetune needs apply. :func:`load_pipeline_config`
        checks this and the ranges below, but ``rl-pruner search`` does not.
    :param sparsify: Settings of the sparsify stage.
    :param apply: Settings of the apply stage.
    :param finetune: Settings of the finetune stage.
    """

    stages: list[str] = field(default_factory=lambda: list(PIPELINE_STAGES))
    sparsify: SparsifyStageConfig = field(default_factory=SparsifyStageConfig)
    apply: ApplyStageConfig = field(default_factory=ApplyStageConfig)
    finetune: FinetuneStageConfig = field(default_factory=FinetuneStageConfig)


class PipelineStageError(RLPrunerError):
    """Failure of one pipeline stage, whose message names the stage and ends with the stage's own fix."""

    def __init__(self, message: str, stage: str, exit_code: int) -> None:
        super().__init__(message)
        self.stage = stage
        self.exit_code = exit_code


# Configuration


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> SearchConfig:
    """Read a search configuration like :func:`rl_pruner.config.load_config` and validate its pipeline section.

    Raises ConfigError for everything that ``load_config`` rejects and for the checks of
    :func:`check_pipeline`.
    """
    from rl_pruner.config import load_config

    config = load_config(path, overrides)
    check_pipeline(config, _Where(str(path), list(overrides)))
    return config


@dataclass
class _Where:
    """The configuration file and its overrides, so that an error names what to fix."""

    file: str
    overrides: list[str]

    def override_of(self, key: str) -> str | None:
        for override in reversed(self.overrides):
            overridden = override.partition("=")[0].strip()
            if key == overridden or key.startswith(f"{overridden}."):
                return override
        return None

    def error(self, key: str, problem: str, example: str) -> ConfigError:
        override = self.override_of(key)
        if override is not None:
            return ConfigError(f"--set {override}: {problem}; pass e.g. --set {key}={example}")
        return ConfigError(f"config {self.file}: {problem}; fix {key!r} in {self.file} or pass --set {key}={example}")


def check_pipeline(config: SearchConfig, where: _Where) -> None:
    """Raise ConfigError for an invalid stage list, a value out of range or a missing path of ``config.pipeline``."""
    _check_stages(config.pipeline.stages, where)
    _check_ranges(config.pipeline, where)
    _check_stage_data(config.pipeline, where)
    _check_dense_weights(config, where)


def _check_stages(stages: list[str], where: _Where) -> None:
    key = "pipeline.stages"
    full = _flow_list(PIPELINE_STAGES)
    if not stages:
        raise where.error(key, f"{key!r} is empty; list the stages to run, in the order {full}", full)
    for stage in stages:
        if stage not in PIPELINE_STAGES:
            matches = difflib.get_close_matches(stage, PIPELINE_STAGES, n=1)
            hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            raise where.error(
                key, f"{key!r} names the unknown stage {stage!r}{hint}; the stages are {full}",
                _flow_list([matches[0] if matches and s == stage else s for s in stages]),
            )

    in_order = [stage for stage in PIPELINE_STAGES if stage in stages]
    if stages != in_order:
        raise where.error(
            key, f"{key!r} is {_flow_list(stages)}; stages run at most once each, in the order {full}",
            _flow_list(in_order),
        )
    for stage, needed in STAGE_INPUTS.items():
        if stage in stages and needed not in stages:
            fixed = [s for s in PIPELINE_STAGES if s in stages or s == needed]
            raise where.error(
                key, f"{key!r} is {_flow_list(stages)}, but stage {stage} needs the output of stage {needed}; "
                     f"add {needed} before {stage}",
                _flow_list(fixed),
            )


def _check_ranges(pipeline: PipelineConfig, where: _Where) -> None:
    sparsify, finetune = pipeline.sparsify, pipeline.finetune
    checks: list[tuple[str, float | int | None, bool, str, str]] = [
        ("pipeline.sparsify.epochs", sparsify.epochs, sparsify.epochs >= 1, ">= 1", "10"),
        ("pipeline.sparsify.bn_l1", sparsify.bn_l1, sparsify.bn_l1 >= 0, ">= 0", "1.0e-4"),
        ("pipeline.sparsify.lr", sparsify.lr, sparsify.lr > 0, "> 0", "0.01"),
        ("pipeline.sparsify.batch_size", sparsify.batch_size, sparsify.batch_size >= 1, ">= 1", "128"),
        ("pipeline.apply.bn_images", pipeline.apply.bn_images,
         pipeline.apply.bn_images is None or pipeline.apply.bn_images >= 0, ">= 0 or null", "1000"),
        ("pipeline.finetune.epochs", finetune.epochs, finetune.epochs >= 1, ">= 1", "10"),
        ("pipeline.finetune.temperature", finetune.temperature, finetune.temperature > 0, "> 0", "4.0"),
        ("pipeline.finetune.alpha", finetune.alpha, 0.0 <= finetune.alpha <= 1.0, "in [0, 1]", "0.9"),
        ("pipeline.finetune.lr", finetune.lr, finetune.lr > 0, "> 0", "0.01"),
        ("pipeline.finetune.batch_size", finetune.batch_size, finetune.batch_size >= 1, ">= 1", "128"),
    ]
    for key, value, accepted, requirement, example in checks:
        if not accepted:
            raise where.error(key, f"{key!r} is {value!r}; it must be {requirement}", example)


def _check_stage_data(pipeline: PipelineConfig, where: _Where) -> None:
    from rl_pruner.config import BUILTIN_DATASETS, BUILTIN_PREFIX

    for stage, value in (("sparsify", pipeline.sparsify.data), ("finetune", pipeline.finetune.data)):
        key = f"pipeline.{stage}.data"
        if value is None:
            continue
        if value.startswith(BUILTIN_PREFIX):
            if value not in BUILTIN_DATASETS:
                raise where.error(
                    key, f"{key!r} is {value!r}, an unknown built-in data set; the built-in data sets are "
                         f"{', '.join(BUILTIN_DATASETS)}", BUILTIN_DATASETS[0],
                )
        elif not Path(value).expanduser().exists():
            raise where.error(key, f"{key} {value} not found (resolved to {Path(value).expanduser().absolute()})",
                              "PATH")


def _check_dense_weights(config: SearchConfig, where: _Where) -> None:
    from rl_pruner.models.registry import DEMO_NAME

    stages = config.pipeline.stages
    training = [stage for stage in ("sparsify", "finetune") if stage in stages]
    if training and config.model.startswith("yolov7:"):
        raise where.error(
            "pipeline.stages", f"stages {' and '.join(training)} train classifiers, and {config.model} is a detector",
            _flow_list([stage for stage in stages if stage not in training]),
        )
    needs_weights = [stage for stage in ("sparsify", "apply", "finetune") if stage in stages]
    if config.checkpoint is None and config.model != DEMO_NAME and needs_weights:
        raise where.error(
            "checkpoint", f"'checkpoint' is null, but stage {needs_weights[0]} needs the dense weights of {config.model}",
            "PATH",
        )


def _flow_list(items: Sequence[str]) -> str:
    return "[" + ",".join(items) + "]"


# Running


def run_pipeline(config: SearchConfig) -> dict[str, Any]:
    """Run the stages of ``config.pipeline`` under one MLflow parent run; return the pipeline summary.

    The summary is what ``summary.json`` contains: the parent ``run_id``, ``output_dir``
    and, for each stage that started, its ``status`` and, once finished, its child
    ``run_id``, ``output`` path, ``metrics`` and, except for search, the equivalent ``command``. Raises PipelineStageError when a stage
    fails with an RLPrunerError, after the parent run is marked FAILED. Other exceptions
    also mark it FAILED (KILLED for KeyboardInterrupt) and propagate unchanged.
    """
    from rl_pruner.config import flatten_config
    from rl_pruner.tracking import SearchTracker, check_tracking_uri

    check_tracking_uri(config.tracking.uri)
    tags = {"rl_pruner.command": "pipeline", "rl_pruner.model": config.model,
            "rl_pruner.stages": ",".join(config.pipeline.stages)}
    # The parent is not MLflow's active run, so that each stage can start and end its own.
    parent = SearchTracker(config.tracking.uri, config.tracking.experiment,
                           run_name=config.tracking.run_name or "pipeline", tags=tags, set_active=False)
    with parent:
        parent.log_params(flatten_config(config))
        pipeline = _Pipeline(config, parent)
        pipeline.run()
    return pipeline.summary


class _Pipeline:
    """The stages of one pipeline run and what they hand on: the dense checkpoint, the policy, the pruned model."""

    def __init__(self, config: SearchConfig, parent: SearchTracker) -> None:
        self.config = config
        self.parent = parent
        self.run_dir = Path(config.output_dir) / parent.run_id
        self.checkpoint = config.checkpoint
        self.policy: str | None = None
        self.pruned: Path | None = None
        self.summary: dict[str, Any] = {
            "run_id": parent.run_id, "output_dir": str(self.run_dir), "tracking_uri": config.tracking.uri,
            "experiment": config.tracking.experiment, "stages": {},
        }

    def run(self) -> None:
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "sparsify": self.sparsify, "search": self.search, "apply": self.apply, "finetune": self.finetune,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._prepare_demo_checkpoint()
            for stage in self.config.pipeline.stages:
                logger.info("pipeline %s: stage %s starts", self.parent.run_id, stage)
                self.summary["stages"][stage] = {"status": "RUNNING"}
                try:
                    record = runners[stage]()
                except RLPrunerError as err:
                    self._record_failure(stage, err)
                    raise PipelineStageError(
                        f"pipeline stage {stage} failed (pipeline run {self.parent.run_id}; the outputs of the "
                        f"stages before it are kept in {self.run_dir}): {err}",
                        stage=stage, exit_code=err.exit_code,
                    ) from err
                except BaseException as err:
                    self._record_failure(stage, err)
                    raise
                self.summary["stages"][stage] = {"status": "FINISHED", **record}
                self._log_stage_metrics(stage, record["metrics"])
        finally:
            self._write_summary()

    def _record_failure(self, stage: str, err: BaseException) -> None:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        self.summary["stages"][stage] = {"status": status, "error": str(err) or type(err).__name__}
        self.summary["failed_stage"] = stage

    def _log_stage_metrics(self, stage: str, metrics: dict[str, float | None]) -> None:
        values = {f"pipeline/{stage}/{name}": value for name, value in metrics.items() if value is not None}
        if values:
            self.parent.log_metrics(values)

    def _write_summary(self) -> None:
        path = self.run_dir / SUMMARY_FILE
        path.write_text(json.dumps(self.summary, indent=2, default=str) + "\n", encoding="utf-8")
        self.parent.log_artifact(path, SUMMARY_ARTIFACT_DIR)

    def _prepare_demo_checkpoint(self) -> None:
        """Train the demo CNN when it has no checkpoint, so that every stage uses the same dense weights."""
        from rl_pruner.models.registry import DEMO_NAME

        if self.checkpoint is not None or self.config.model != DEMO_NAME:
            return
        import torch

        from rl_pruner.demo import train_digits_model

        path = self.run_dir / "dense.pt"
        logger.warning("no checkpoint given for %s: training it on the digits, saved to %s", DEMO_NAME, path)
        model, _ = train_digits_model(seed=self.config.seed, progress=False)
        torch.save(model.state_dict(), path)
        self.checkpoint = str(path)
        self.summary["dense_checkpoint"] = str(path)

    # Stages

    def sparsify(self) -> dict[str, Any]:
        from rl_pruner.training.cli import run_sparsify

        settings = self.config.pipeline.sparsify
        out = self._stage_dir("sparsify") / "sparsified.pt"
        argv = ["sparsify", "--model", self.config.model, "--checkpoint", str(self.checkpoint),
                "--data", settings.data or self.config.data, "--epochs", str(settings.epochs),
                "--bn-l1", repr(settings.bn_l1), "--lr", repr(settings.lr), "--batch-size", str(settings.batch_size),
                *self._training_options(), "--out", str(out)]
        if self.config.input_size is not None:
            argv += ["--input-size", str(self.config.input_size)]
        result = run_sparsify(self._parse(argv))

        self.checkpoint = str(out)
        metrics = {"test_top1": result["best_top1"], "bn_small_share": result["bn_small_share_after"]}
        return _record(result["run_id"], out, metrics, argv)

    def search(self) -> dict[str, Any]:
        from rl_pruner.search import run_search

        config = dataclasses.replace(
            self.config, checkpoint=self.checkpoint, output_dir=str(self._stage_dir("search")),
            tracking=dataclasses.replace(self.config.tracking, run_name="search"),
        )
        summary = run_search(config, parent_run_id=self.parent.run_id)
        if "best_policy_artifact" not in summary:
            raise RLPrunerError(f"search run {summary['run_id']} found no policy; raise 'episodes'")

        self.policy = summary["best_policy_artifact"]
        metric = self.config.reward.metric
        metrics = {f"test_{metric}": summary.get(f"test_{metric}", {}).get("best"),
                   "best_reward": summary["best_reward"], "macs_ratio": summary["best_macs_ratio"]}
        return _record(summary["run_id"], Path(summary["best_policy"]), metrics)

    def apply(self) -> dict[str, Any]:
        from rl_pruner.commands import run_apply
        from rl_pruner.tracking import SearchTracker

        config = self.config
        bn_images = config.pipeline.apply.bn_images
        bn_images = config.bn_images if bn_images is None else bn_images
        out = self._stage_dir("apply") / "pruned.pt"
        argv = ["apply", "--model", config.model, "--checkpoint", str(self.checkpoint), "--policy", str(self.policy),
                "--tracking-uri", config.tracking.uri, "--data", config.data, "--bn-images", str(bn_images),
                "--calibration-images", str(max(config.calibration_images, 1)),
                "--batch-size", str(config.batch_size), "--seed", str(config.seed), "--out", str(out)]
        if config.trust_pickle:
            argv.append("--trust-pickle")
        if config.input_size is not None:
            argv += ["--input-size", str(config.input_size)]

        tags = {"rl_pruner.command": "apply", "rl_pruner.model": config.model}
        with SearchTracker(config.tracking.uri, config.tracking.experiment, run_name=f"apply {out.name}",
                           tags=tags, parent_run_id=self.parent.run_id) as tracker:
            tracker.log_params({"policy": self.policy, "checkpoint": self.checkpoint, "bn_images": bn_images,
                                "out": str(out)})
            result = run_apply(self._parse(argv))
            metrics = {"macs_ratio": result["macs_ratio"], "params_ratio": result["params_ratio"],
                       "test_top1": self._test_top1(out)}
            tracker.log_metrics({f"apply/{name}": value for name, value in metrics.items() if value is not None})
        self.pruned = out
        return _record(tracker.run_id, out, metrics, argv)

    def finetune(self) -> dict[str, Any]:
        from rl_pruner.training.cli import run_finetune

        settings = self.config.pipeline.finetune
        out = self._stage_dir("finetune") / "finetuned.pt"
        argv = ["finetune", "--model", f"pruned:{self.pruned}", "--teacher", str(self.checkpoint),
                "--data", settings.data or self.config.data, "--epochs", str(settings.epochs),
                "--temperature", repr(settings.temperature), "--alpha", repr(settings.alpha),
                "--lr", repr(settings.lr), "--batch-size", str(settings.batch_size),
                *self._training_options(), "--out", str(out)]
        result = run_finetune(self._parse(argv))

        metrics = {"test_top1": result["best_top1"], "test_top1_before": result["top1_before"]}
        return _record(result["run_id"], out, metrics, argv)

    # Helpers

    def _stage_dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _training_options(self) -> list[str]:
        """Options that sparsify and finetune share: seed, test data, trust, and this pipeline's MLflow store."""
        config = self.config
        options = ["--seed", str(config.seed), "--tracking-uri", config.tracking.uri,
                   "--experiment", config.tracking.experiment]
        if config.test_data is not None:
            options += ["--test-data", config.test_data]
        if config.trust_pickle:
            options.append("--trust-pickle")
        return options

    def _parse(self, argv: list[str]) -> argparse.Namespace:
        """Parse ``argv`` as an ``rl-pruner`` command line, so that each stage gets that command's defaults."""
        from rl_pruner.cli import build_parser

        args = build_parser().parse_args(argv)
        args.parent_run_id = self.parent.run_id
        return args

    def _test_top1(self, pruned_path: Path) -> float | None:
        """Top-1 in percent of the pruned model on ``test_data``, or None without test data or for a detector."""
        if self.config.test_data is None or self.config.reward.metric != "top1":
            return None
        import torch

        from rl_pruner.data import make_loader, open_dataset
        from rl_pruner.evaluation import evaluate_top1
        from rl_pruner.models.registry import load_model

        loaded = load_model(f"pruned:{pruned_path}")
        dataset = open_dataset(self.config.test_data, image_size=loaded.image_size,
                               normalization=loaded.normalization, split="test", seed=self.config.seed)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batches = make_loader(dataset, batch_size=self.config.batch_size)
        return evaluate_top1(loaded.model, batches, device, disable_progress=True)


def _record(
    run_id: str | None, output: Path, metrics: dict[str, float | None], argv: list[str] | None = None
) -> dict[str, Any]:
    """Summarise one finished stage; ``argv`` is the equivalent ``rl-pruner`` command line, if there is one."""
    record: dict[str, Any] = {"run_id": run_id, "output": str(output), "metrics": metrics}
    if argv is not None:
        record["command"] = "rl-pruner " + " ".join(argv)
    return record


def format_pipeline_report(result: dict[str, Any]) -> str:
    """Format a pipeline summary as the human-readable report of ``rl-pruner pipeline``."""
    lines = [f"pipeline run {result['run_id']}: {', '.join(result['stages'])} -> {result['output_dir']}"]
    for stage, record in result["stages"].items():
        top1 = record.get("metrics", {}).get("test_top1")
        score = f"test top-1 {top1:6.2f} %" if top1 is not None else f"{'':15}"
        lines.append(f"  {stage:<9} run {record.get('run_id') or '-':<32} {score}  {record.get('output', '')}")
    final = result["stages"].get("finetune") or result["stages"].get("apply")
    if final is not None:
        lines.append(f"load the final model with --model pruned:{final['output']}")
    lines.append(f"MLflow experiment {result['experiment']!r} at {result['tracking_uri']}")
    return "\n".join(lines) + "\n"
