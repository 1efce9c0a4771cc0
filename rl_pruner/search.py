"""The search: PPO learns a pruning policy on :class:`PruningEnv`, tracked in MLflow.

:func:`run_search` is what ``rl-pruner search CONFIG.yaml`` runs:

1. load the dense model and carve disjoint reward, batch-norm and calibration
   splits from the training data (read once, kept in memory);
2. score the baseline allocations (uniform, Torch-Pruning's global L1 and LAMP)
   with the same criterion, batch-norm re-estimation and reward;
3. let PPO run the configured number of episodes, logging each to MLflow and
   keeping the five best policies;
4. log the best policies, plots and (with ``test_data``) the test top-1 of the best
   policy and the baselines.

Ctrl-C stops at the next step and logs what was found. The run is then marked KILLED,
and ``--resume RUN_ID`` continues it with the saved agent and best policies.
"""

from __future__ import annotations

import heapq
import json
import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rl_pruner.agents.baselines import make_baseline
from rl_pruner.agents.ppo import EpisodeCallback, build_ppo, load_ppo
from rl_pruner.config import SearchConfig, flatten_config
from rl_pruner.data import load_batches, open_dataset, split_indices
from rl_pruner.distributed.cluster import ray_cluster, threads_per_worker
from rl_pruner.distributed.vec_env import EnvSpec, LocalVecEnv, RayVecEnv
from rl_pruner.engine.batchnorm import reestimate_batchnorm
from rl_pruner.engine.importance import DATA_CRITERIA
from rl_pruner.engine.pruner import Pruner
from rl_pruner.envs.pruning_env import EpisodeResult, PruningEnv
from rl_pruner.errors import ConfigError, DataError
from rl_pruner.evaluation import check_num_classes, evaluate_top1
from rl_pruner.models.registry import DEMO_NAME, LoadedModel, is_detector, load_model
from rl_pruner.policy import Policy
from rl_pruner.reward import RewardEvaluator, TopOneReward
from rl_pruner.tracking import PARENT_RUN_TAG, SearchTracker, check_tracking_uri

logger = logging.getLogger(__name__)

N_BEST = 5
STATE_DIR = "state"


@dataclass
class SearchData:
    """The dense model, its reward evaluator and the cached batches one search uses.

    For a detector, ``bn_batches`` and ``calibration_batches`` hold (images, targets)
    pairs whose targets are not read, and ``test_batches`` feed ``test_reward``.
    """

    loaded: LoadedModel
    reward: RewardEvaluator
    bn_batches: list
    calibration_batches: list | None
    test_batches: list | None
    test_reward: RewardEvaluator | None = None


@dataclass
class SearchState:
    """Progress of a search (episodes, history, best policies, baselines), saved for ``--resume``."""

    episodes_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)  # (reward, episode, policy)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, episode: int, result: EpisodeResult) -> None:
        self.history.append({"episode": episode, "reward": result.reward, "macs_ratio": result.macs_ratio,
                             **result.metrics})
        entry = (result.reward, -episode, result.policy.to_dict())
        if len(self.best) < N_BEST:
            heapq.heappush(self.best, entry)
        else:
            heapq.heappushpop(self.best, entry)
        self.episodes_done = episode + 1

    def ranked(self) -> list[tuple[float, Policy]]:
        return [(reward, Policy.from_dict(policy)) for reward, _, policy in sorted(self.best, reverse=True)]

    @property
    def best_reward(self) -> float:
        return max((reward for reward, _, _ in self.best), default=float("nan"))

    def to_json(self) -> str:
        return json.dumps({"episodes_done": self.episodes_done, "history": self.history,
                           "best": [list(entry) for entry in self.best], "baselines": self.baselines})

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        record = json.loads(text)
        state = cls(record["episodes_done"], record["history"], [], record["baselines"])
        state.best = [(float(r), int(e), p) for r, e, p in record["best"]]
        heapq.heapify(state.best)
        return state


def _dataset(path: str, loaded: LoadedModel, split: str, seed: int) -> Any:
    return open_dataset(path, image_size=loaded.image_size, normalization=loaded.normalization,
                        split=split, seed=seed)


def _train_demo_checkpoint(config: SearchConfig) -> str:
    """Train the demo CNN once per seed and output folder; return its checkpoint path."""
    from rl_pruner.demo import train_digits_model

    path = Path(config.output_dir) / f"digits_cnn-seed{config.seed}.pt"
    if not path.is_file():
        logger.warning("no checkpoint given for %s: training it on the digits, saved to %s", config.model, path)
        model, _ = train_digits_model(seed=config.seed, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return str(path)


def prepare_data(config: SearchConfig) -> SearchData:
    """Load the model and read the reward, batch-norm and calibration splits once.

    The demo network (``digits_cnn``) is trained on the fly when no checkpoint is given,
    and ``config.checkpoint`` is set to the file it was saved to.
    """
    if config.model == DEMO_NAME and config.checkpoint is None:
        config.checkpoint = _train_demo_checkpoint(config)
    loaded = load_model(config.model, config.checkpoint, trust_pickle=config.trust_pickle,
                        input_size=config.input_size)
    if is_detector(loaded.architecture):
        return _prepare_detection_data(config, loaded)
    train = _dataset(config.data, loaded, "train", config.seed)
    check_num_classes(loaded.num_classes, train.classes, config.data, "the config's data")
    needs_calibration = config.criterion in DATA_CRITERIA
    sizes = [config.reward_images, config.bn_images]
    if needs_calibration:
        sizes.append(config.calibration_images)
    splits = split_indices(len(train), sizes, config.seed)
    logger.info("reading %d reward, %d batch-norm and %d calibration images", *sizes, *([0] * (3 - len(sizes))))
    reward_batches = load_batches(train, splits[0], config.batch_size)
    bn_batches = load_batches(train, splits[1], config.batch_size) if config.bn_images else []
    calibration = load_batches(train, splits[2], config.batch_size) if needs_calibration else None
    test_batches = None
    if config.test_data:
        test = _dataset(config.test_data, loaded, "test", config.seed)
        check_num_classes(loaded.num_classes, test.classes, config.test_data, "the config's test_data")
        test_batches = load_batches(test, None, config.batch_size)
    return SearchData(loaded, TopOneReward(reward_batches), bn_batches, calibration, test_batches)


def _prepare_detection_data(config: SearchConfig, loaded: LoadedModel) -> SearchData:
    """Read a detector's reward, batch-norm and calibration images once, in disjoint splits.

    ``data`` is a folder of images for the fidelity metrics. For the labelled metrics it
    is a YOLO-format data YAML, whose ``train`` split is read. ``test_data`` is a data
    YAML whose ``val`` split scores the best policy.
    """
    from rl_pruner.detection.data import load_detection_batches, load_image_batches
    from rl_pruner.detection.reward import DetectionMAPReward, FidelityReward

    size = loaded.input_shape[-1]
    for key in ("data", "test_data"):
        path = getattr(config, key)
        if path is not None and (key == "test_data" or not config.reward.metric.startswith("fidelity_")):
            check_detector_classes(loaded, path, key)
    settings = config.reward
    fidelity = settings.metric.startswith("fidelity_")
    sizes = [config.reward_images, config.bn_images]
    if config.criterion in DATA_CRITERIA:
        sizes.append(config.calibration_images)
    total = sum(sizes)
    if fidelity:
        items = [(images, [torch.zeros(0, 5)]) for images in
                 load_image_batches(config.data, size, 1, limit=total, seed=config.seed)]
    else:
        items = load_detection_batches(config.data, "train", size, 1, limit=total, seed=config.seed)
    if len(items) < total:
        raise ConfigError(
            f"data {config.data} holds {len(items)} images, but reward_images + bn_images"
            f"{' + calibration_images' if len(sizes) == 3 else ''} = {total}; lower them or add images"
        )
    splits = split_indices(len(items), sizes, config.seed)
    reward_items = _rebatch([items[i] for i in splits[0]], config.batch_size)
    bn_batches = _without_targets(_rebatch([items[i] for i in splits[1]], config.batch_size))
    calibration = None
    if len(sizes) == 3:
        calibration = _without_targets(_rebatch([items[i] for i in splits[2]], config.batch_size))
    reward: RewardEvaluator
    if fidelity:
        reward = FidelityReward(loaded.model, [images for images, _ in reward_items], metric=settings.metric,
                                conf_threshold=settings.conf_threshold, iou_threshold=settings.iou_threshold,
                                max_ground_truths=settings.max_ground_truths)
    else:
        reward = DetectionMAPReward(reward_items, metric=settings.metric, iou_threshold=settings.iou_threshold)
    test_batches, test_reward = None, None
    if config.test_data:
        test_batches = load_detection_batches(config.test_data, "val", size, config.batch_size)
        metric = settings.metric.removeprefix("fidelity_")
        test_reward = DetectionMAPReward(test_batches, metric=metric, iou_threshold=settings.iou_threshold)
    return SearchData(loaded, reward, bn_batches, calibration, test_batches, test_reward)


def check_detector_classes(loaded: LoadedModel, data_yaml: str, what: str) -> None:
    """Raise DataError unless the data YAML names as many classes as the detector predicts."""
    from rl_pruner.detection.data import class_names

    names = class_names(data_yaml)
    if len(names) != loaded.num_classes:
        raise DataError(
            f"{what} {data_yaml} names {len(names)} classes but {loaded.architecture} predicts "
            f"{loaded.num_classes}; use the data YAML the detector was trained on, or a model YAML with nc: {len(names)}"
        )


def _rebatch(items: list[tuple[torch.Tensor, list[torch.Tensor]]], batch_size: int) -> list:
    """Join one-image (images, targets) pairs into batches of ``batch_size``."""
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batches.append((torch.cat([images for images, _ in chunk]), [t for _, targets in chunk for t in targets]))
    return batches


def _without_targets(batches: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, placeholder labels) pairs, the form batch-norm re-estimation and the criteria read."""
    return [(images, torch.zeros(len(images), dtype=torch.long)) for images, _ in batches]


def _env_kwargs(config: SearchConfig) -> dict[str, Any]:
    return {"macs_target": config.macs_target, "criterion": config.criterion, "round_to": config.round_to,
            "max_ratio": config.max_ratio, "allow_block_drop": config.allow_block_drop}


def build_env(config: SearchConfig, data: SearchData, pruner: Pruner | None = None) -> PruningEnv:
    """Build one pruning environment for ``config``, on a new :class:`Pruner` unless one is given."""
    pruner = pruner or Pruner(data.loaded, data.calibration_batches)
    return PruningEnv(pruner, data.reward, bn_batches=data.bn_batches, **_env_kwargs(config))


def build_vec_env(config: SearchConfig, data: SearchData, pruner: Pruner) -> LocalVecEnv | RayVecEnv:
    """``ppo.episodes_per_update`` sub-environments, in process or on ``distributed.workers``
    Ray workers (then inside :func:`~rl_pruner.distributed.cluster.ray_cluster`)."""
    spec = EnvSpec(data.loaded, data.reward, list(data.bn_batches),
                   {config.criterion: pruner.scores(config.criterion)}, _env_kwargs(config))
    n_envs = config.ppo.episodes_per_update
    settings = config.distributed
    if settings.workers == 0:
        return LocalVecEnv(spec, n_envs, pruner=pruner)
    threads = threads_per_worker(settings.workers, settings.threads_per_worker)
    logger.info("running %d sub-environments on %d Ray workers, %d torch thread(s) each",
                n_envs, settings.workers, threads)
    return RayVecEnv(spec, n_envs, settings.workers, n_threads=threads,
                     max_replacements=settings.max_worker_replacements)


def _test_score(pruner: Pruner, policy: Policy, data: SearchData) -> float:
    """Top-1 (percent) of a classifier, or the mAP (fraction) of a detector, on the test data."""
    pruned = pruner.apply(policy)
    reestimate_batchnorm(pruned, data.bn_batches)
    if data.test_reward is not None:
        return data.test_reward.evaluate(pruned)[data.test_reward.metric]
    return evaluate_top1(pruned, data.test_batches or [], disable_progress=True)


class Search:
    """One search run: the environment, the agent, the tracker and what was found."""

    def __init__(self, config: SearchConfig, tracker: SearchTracker, data: SearchData, state: SearchState) -> None:
        self.config = config
        self.tracker = tracker
        self.data = data
        self.state = state
        self.pruner = Pruner(data.loaded, data.calibration_batches)
        self.structure = self.pruner.structure
        self.vec_env = build_vec_env(config, data, self.pruner)
        self.output_dir = Path(config.output_dir) / tracker.run_id
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._progress: tqdm | None = None
        self._stop_requested = False
        self._started = time.perf_counter()
        self._episodes_at_start = state.episodes_done

    # Baselines

    def score_baselines(self) -> None:
        names = [name for name in self.config.baselines if name not in self.state.baselines]
        policies = [make_baseline(name, self.pruner, self.config.macs_target, criterion=self.config.criterion,
                                  round_to=self.config.round_to) for name in names]
        for name, policy, result in zip(names, policies, self.vec_env.evaluate_policies(policies), strict=True):
            record = {"reward": result.reward, "macs_ratio": result.macs_ratio, **result.metrics,
                      "policy": policy.to_dict()}
            self.state.baselines[name] = record
            self.tracker.log_metrics({f"baseline/{name}/{key}": value for key, value in record.items()
                                      if isinstance(value, float)})
            self.tracker.log_policy(policy, f"policies/baselines/{name}.json")
            logger.info("baseline %s: reward %.4f at %.3f of dense MACs", name, result.reward, result.macs_ratio)

    # Episodes

    def _on_episode(self, result: EpisodeResult) -> bool:
        # Episodes finish in groups of ppo.episodes_per_update; those past the
        # configured count are dropped so exactly that many are logged.
        if self.state.episodes_done >= self.config.episodes:
            return False
        episode = self.state.episodes_done
        self.state.add(episode, result)
        self.tracker.log_episode(episode, {
            "reward": result.reward, **result.metrics, "macs_ratio": result.macs_ratio,
            "params_ratio": result.params_ratio, "best_reward": self.state.best_reward,
            "dropped_blocks": float(len(result.policy.dropped_blocks)),
            "seconds": result.episode_seconds, "evaluation_seconds": result.evaluation_seconds,
        })
        if self._progress is not None:
            minutes = (time.perf_counter() - self._started) / 60
            rate = (self.state.episodes_done - self._episodes_at_start) / max(minutes, 1e-9)
            self._progress.set_postfix(best=f"{self.state.best_reward:.4f}", macs=f"{result.macs_ratio:.3f}",
                                       eps_per_min=f"{rate:.1f}", refresh=False)
            self._progress.update(1)
        if self.state.episodes_done % self.config.ppo.episodes_per_update == 0:
            self.save_state()
        return self.state.episodes_done < self.config.episodes

    def train(self, agent_path: Path | None) -> None:
        remaining = self.config.episodes - self.state.episodes_done
        if remaining <= 0:
            return
        self._warn_of_unlogged_episodes(remaining)
        episode_length = len(self.structure.layers)
        if agent_path is not None:
            self.agent = load_ppo(agent_path, self.vec_env)
        else:
            self.agent = build_ppo(self.vec_env, self.config.ppo, seed=self.config.seed, episode_length=episode_length)
        self._progress = tqdm(total=self.config.episodes, initial=self.state.episodes_done, unit="episode",
                              desc="search", dynamic_ncols=True)
        callback = EpisodeCallback(self._on_episode, should_stop=lambda: self._stop_requested)
        previous_handler = self._catch_ctrl_c()
        try:
            # An upper bound: the callback stops training after the last episode.
            self.agent.learn(total_timesteps=2 * (remaining + self.vec_env.num_envs) * episode_length, callback=callback,
                             reset_num_timesteps=agent_path is None)
        finally:
            self._progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if self._stop_requested:
            raise KeyboardInterrupt

    def _warn_of_unlogged_episodes(self, remaining: int) -> None:
        """Warn when the episode budget ends inside a batch of sub-environment episodes.

        The sub-environments step in lockstep, so the last batch evaluates all its
        episodes, and those past the budget cost time without being logged.
        """
        at_once = self.vec_env.num_envs
        surplus = -remaining % at_once
        if not surplus:
            return
        fewer = self.config.episodes - remaining % at_once
        more = self.config.episodes + surplus
        choices = f"{fewer} or {more}" if fewer > self.state.episodes_done else str(more)
        budget = f"{remaining} episodes remain" if self.state.episodes_done else f"episodes is {remaining}"
        logger.warning("%s and ppo.episodes_per_update = %d run at once, so the last batch evaluates %d episodes "
                       "that are not logged; set episodes to %s to avoid it", budget, at_once, surplus, choices)

    def _catch_ctrl_c(self) -> Any:
        """Turn the first Ctrl-C into a stop at the next step boundary; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.warning("stopping after the current step; press Ctrl-C again to stop at once")

        return signal.signal(signal.SIGINT, request_stop)

    # Results

    def save_state(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            state_path = Path(directory) / "search_state.json"
            state_path.write_text(self.state.to_json())
            self.tracker.log_artifact(state_path, STATE_DIR)
            if getattr(self, "agent", None) is not None:
                agent_path = Path(directory) / "ppo.zip"
                self.agent.save(str(agent_path))
                self.tracker.log_artifact(agent_path, STATE_DIR)

    def log_results(self, evaluate_test: bool = True) -> dict[str, Any]:
        """Log the best policies, plots and, with ``evaluate_test``, test scores; return a summary."""
        from rl_pruner.plots import plot_best_reward_curve, plot_keep_ratios, plot_reward_vs_macs

        self.save_state()
        if isinstance(self.vec_env, RayVecEnv):
            self.tracker.log_metrics({"distributed/worker_replacements": float(self.vec_env.n_replacements),
                                      "distributed/worker_nodes": float(len(set(self.vec_env.worker_nodes())))})
        ranked = self.state.ranked()
        summary: dict[str, Any] = {
            "run_id": self.tracker.run_id, "episodes": self.state.episodes_done,
            "macs_target": self.config.macs_target,
            "baselines": {name: {k: v for k, v in record.items() if k != "policy"}
                          for name, record in self.state.baselines.items()},
        }
        if not ranked:
            return summary
        self.tracker.log_best_policies(ranked)
        best_reward, best = ranked[0]
        best.save(self.output_dir / "best_policy.json")
        summary["best_reward_curve"] = _running_max([h["reward"] for h in self.state.history])
        summary.update({"best_reward": best_reward, "best_policy": str(self.output_dir / "best_policy.json"),
                        "best_policy_artifact": f"runs:/{self.tracker.run_id}/policies/best_policy.json",
                        "best_macs_ratio": best.metadata.get("macs_ratio")})

        history = self.state.history
        structure = self.structure
        uniform = self.state.baselines.get("uniform", {}).get("policy")
        uniform_ratios = uniform["pruning_ratios"] if uniform else {}
        dropped_layers = {layer.name for layer in structure.layers if layer.block in set(best.dropped_blocks)}
        figures = {
            "plots/keep_ratios.png": plot_keep_ratios(
                structure.layer_names, [1 - best.pruning_ratios.get(n, 0.0) for n in structure.layer_names],
                [1 - uniform_ratios.get(n, 0.0) for n in structure.layer_names], dropped_layers),
            "plots/reward_vs_macs.png": plot_reward_vs_macs(
                [h["macs_ratio"] for h in history], [h["reward"] for h in history],
                [int(h["episode"]) for h in history], self.config.macs_target,
                {name: (r["macs_ratio"], r["reward"]) for name, r in self.state.baselines.items()}),
            "plots/best_reward.png": plot_best_reward_curve(
                [int(h["episode"]) for h in history], _running_max([h["reward"] for h in history])),
        }
        for path, figure in figures.items():
            self.tracker.log_figure(figure, path)

        if self.data.test_batches and evaluate_test:
            metric = self.data.test_reward.metric if self.data.test_reward is not None else "top1"
            test_scores = {"best": _test_score(self.pruner, best, self.data)}
            for name, record in self.state.baselines.items():
                test_scores[name] = _test_score(self.pruner, Policy.from_dict(record["policy"]), self.data)
            self.tracker.log_metrics({f"test/{name}/{metric}": value for name, value in test_scores.items()})
            summary[f"test_{metric}"] = test_scores
        return summary


def _running_max(values: list[float]) -> list[float]:
    best, result = float("-inf"), []
    for value in values:
        best = max(best, value)
        result.append(best)
    return result


def _restore(tracker: SearchTracker) -> tuple[SearchState, Path | None]:
    """Download the saved state and agent of the run being resumed."""
    import mlflow

    directory = Path(tempfile.mkdtemp(prefix="rl-pruner-resume-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path=STATE_DIR,
                                                          dst_path=str(directory)))
    except Exception as err:  # MLflow raises several exception types for a missing artifact
        raise ConfigError(
            f"run {tracker.run_id} has no saved search state ({type(err).__name__}); "
            "only searches started by 'rl-pruner search' can be resumed"
        ) from err
    state = SearchState.from_json((local / "search_state.json").read_text())
    agent = local / "ppo.zip"
    return state, agent if agent.is_file() else None


def run_search(config: SearchConfig, *, resume_run_id: str | None = None,
               on_start: Callable[[str], None] | None = None,
               parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) one search and return its summary; see the module docstring.

    With ``distributed.workers`` > 0, episodes run on Ray workers of the cluster at
    ``distributed.ray_address``. ``parent_run_id`` makes the MLflow run a child of that
    run (a sweep's).
    """
    # Both checked before the data are read, which can take minutes. SearchTracker
    # checks the URI again on its own because it is also used without run_search.
    check_tracking_uri(config.tracking.uri)
    with ExitStack() as stack:
        if config.distributed.workers > 0:
            stack.enter_context(ray_cluster(config.distributed.ray_address))
        data = prepare_data(config)
        torch.manual_seed(config.seed)
        tags = {"model": config.model, "macs_target": str(config.macs_target), "criterion": config.criterion}
        if parent_run_id is not None:
            tags[PARENT_RUN_TAG] = parent_run_id
        tracker = stack.enter_context(SearchTracker(
            config.tracking.uri, config.tracking.experiment, run_name=config.tracking.run_name,
            tags=tags, resume_run_id=resume_run_id,
        ))
        if on_start is not None:
            on_start(tracker.run_id)
        tracker.log_params(flatten_config(config))
        state, agent_path = _restore(tracker) if resume_run_id else (SearchState(), None)
        search = Search(config, tracker, data, state)
        stack.callback(search.vec_env.close)
        try:
            search.score_baselines()
            search.train(agent_path)
        except KeyboardInterrupt:
            logger.warning("interrupted after %d episodes; logging what was found", state.episodes_done)
            search.log_results(evaluate_test=False)
            raise
        return search.log_results()
