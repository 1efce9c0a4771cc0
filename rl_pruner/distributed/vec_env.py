"""Vectorised pruning environments: many episodes at once, in this process or on Ray workers.

A search collects ``ppo.episodes_per_update`` episodes per PPO update. They run as that
many sub-environments in lockstep: every episode has one step per layer (see
:class:`~rl_pruner.envs.pruning_env.PruningEnv`), so all of them reach their final,
expensive step (prune, re-estimate batch norm, score) together.

Where the sub-environments run is separate from what they compute:

- :class:`LocalVecEnv` steps all of them in this process.
- :class:`RayVecEnv` splits them over N Ray actors. Each actor receives the model,
  the reward batches and the channel scores once, through Ray's object store. It
  steps its share of the sub-environments, so the N final steps run in parallel.

Each sub-environment sees the same actions wherever it runs, and the environment
draws no random numbers. So with the same torch thread count per worker, a search
gives the same episodes with 1 or N workers.

Fault tolerance: the driver keeps the actions of every episode in progress. When an
actor dies, :class:`RayVecEnv` starts a replacement, replays those actions to
rebuild the episodes' state, and repeats the step. No episode is lost or reported
twice, because episodes are reported by the driver, from the step results.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rl_pruner.engine.pruner import Pruner
from rl_pruner.envs.pruning_env import EpisodeResult, PruningEnv
from rl_pruner.errors import ConfigError, RLPrunerError
from rl_pruner.models.registry import LoadedModel
from rl_pruner.policy import Policy
from rl_pruner.reward import RewardEvaluator

logger = logging.getLogger(__name__)

WORKER_NAME_PREFIX = "rl-pruner-episodes-"

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EnvSpec:
    """Everything a worker needs to build sub-environments; sent to each worker once.

    :param loaded: The dense model.
    :param reward: The reward evaluator, with its batches.
    :param bn_batches: Batches for batch-norm re-estimation after pruning.
    :param scores: Channel scores per criterion, computed once by the driver so every
        worker prunes the same channels.
    :param env_kwargs: Keyword arguments of :class:`PruningEnv` (macs_target, criterion,
        round_to, max_ratio, allow_block_drop).
    """

    loaded: LoadedModel
    reward: RewardEvaluator
    bn_batches: list[tuple[torch.Tensor, torch.Tensor]]
    scores: dict[str, dict[str, torch.Tensor]]
    env_kwargs: dict[str, Any]


class EpisodeRunner:
    """A group of sub-environments that share one dense model and one set of batches.

    One runner lives in each Ray actor (or in the driver, for :class:`LocalVecEnv`).
    Its ``step`` resets finished sub-environments at once, as SB3's vectorised
    environments do, and puts the final observation in ``info["terminal_observation"]``.

    :param spec: What the sub-environments are built from.
    :param n_envs: Number of sub-environments, >= 1.
    :param n_threads: Torch threads of this process, or None to leave the setting alone.
    :param pruner: An existing :class:`Pruner` of ``spec.loaded`` to share (in process).
    """

    def __init__(self, spec: EnvSpec, n_envs: int, n_threads: int | None = None,
                 pruner: Pruner | None = None) -> None:
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        if pruner is None:
            pruner = Pruner(spec.loaded)
            for criterion, scores in spec.scores.items():
                pruner.preload_scores(criterion, scores)
        self.pruner = pruner
        self.envs = [PruningEnv(pruner, spec.reward, bn_batches=spec.bn_batches, **spec.env_kwargs)
                     for _ in range(n_envs)]

    def reset(self) -> np.ndarray:
        return np.stack([env.reset()[0] for env in self.envs])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        observations, rewards, dones, infos = [], [], [], []
        for env, action in zip(self.envs, actions, strict=True):
            observation, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if done:
                info["terminal_observation"] = observation
                observation, _ = env.reset()
            observations.append(observation)
            rewards.append(reward)
            dones.append(done)
            infos.append(info)
        return np.stack(observations), np.asarray(rewards, np.float32), np.asarray(dones), infos

    def replay(self, histories: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Reset every sub-environment and re-run the actions of its episode in progress."""
        observations = []
        for env, actions in zip(self.envs, histories, strict=True):
            observation, _ = env.reset()
            for action in actions:
                observation, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    raise RuntimeError("a replayed episode ended early; the environment is not deterministic")
            observations.append(observation)
        return np.stack(observations)

    def evaluate(self, policies: Sequence[Policy]) -> list[EpisodeResult]:
        return [self.envs[0].evaluate_policy(policy) for policy in policies]

    def get_attr(self, name: str) -> list[Any]:
        return [getattr(env, name) for env in self.envs]

    def node_id(self) -> str:
        """Id of the Ray node this runner's process lives on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


class _PruningVecEnvBase(VecEnv):
    """Bookkeeping shared by the local and the Ray implementation."""

    def __init__(self, n_envs: int, observation_space: gym.Space, action_space: gym.Space) -> None:
        self._actions: np.ndarray | None = None
        # Actions of each sub-environment's episode in progress, for replays.
        self.histories: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
        super().__init__(n_envs, observation_space, action_space)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)

    def _record(self, actions: np.ndarray, dones: np.ndarray) -> None:
        for index, (action, done) in enumerate(zip(actions, dones, strict=True)):
            if done:
                self.histories[index] = []
            else:
                self.histories[index].append(action)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError("pruning sub-environments are configured when they are built; set_attr is not supported")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        raise AttributeError("pruning sub-environments expose no methods to call through the vectorised environment")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def evaluate_policies(self, policies: Sequence[Policy]) -> list[EpisodeResult]:
        """Score whole policies (the baselines) with the sub-environments' reward."""
        raise NotImplementedError


class LocalVecEnv(_PruningVecEnvBase):
    """All sub-environments in this process, sharing ``pruner``."""

    def __init__(self, spec: EnvSpec, n_envs: int, pruner: Pruner | None = None) -> None:
        self.runner = EpisodeRunner(spec, n_envs, pruner=pruner)
        first = self.runner.envs[0]
        super().__init__(n_envs, first.observation_space, first.action_space)

    def reset(self) -> VecEnvObs:
        self.histories = [[] for _ in range(self.num_envs)]
        return self.runner.reset()

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async() must come before step_wait()"
        observations, rewards, dones, infos = self.runner.step(self._actions)
        self._record(self._actions, dones)
        return observations, rewards, dones, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":
            return [None for _ in self._get_indices(indices)]
        values = self.runner.get_attr(attr_name)
        return [values[index] for index in self._get_indices(indices)]

    def evaluate_policies(self, policies: Sequence[Policy]) -> list[EpisodeResult]:
        return self.runner.evaluate(policies)


class WorkerLost(RLPrunerError):
    """Ray workers kept dying: more replacements were needed than allowed."""


class RayVecEnv(_PruningVecEnvBase):
    """Sub-environments split over ``n_workers`` Ray actors, each with ``n_threads`` torch threads.

    Must be created inside :func:`rl_pruner.distributed.cluster.ray_cluster`.

    :param spec: What the sub-environments are built from; put in the object store once.
    :param n_envs: Number of sub-environments (episodes per PPO update).
    :param n_workers: Number of actors, 1 <= n_workers <= n_envs. Sub-environments are
        split into contiguous, nearly equal shares.
    :param n_threads: Torch threads, and Ray CPUs reserved, per actor.
    :param max_replacements: Actors that may be replaced over the search before it fails.
    """

    def __init__(self, spec: EnvSpec, n_envs: int, n_workers: int, n_threads: int = 1,
                 max_replacements: int = 10) -> None:
        import ray

        if not 1 <= n_workers <= n_envs:
            raise ValueError(f"n_workers must be in [1, {n_envs}], got {n_workers}")
        cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
        if n_workers * n_threads > cluster_cpus:
            # Ray would queue the workers until CPUs appear, and the search would wait silently.
            # NOTE: a cluster that autoscales may add CPUs later; it is rejected here all the same.
            raise ConfigError(
                f"{n_workers} workers x {n_threads} thread(s) need {n_workers * n_threads} CPUs but the Ray "
                f"cluster has {cluster_cpus}; lower --workers or distributed.threads_per_worker, or add nodes"
            )
        self._ray = ray
        self.n_threads = n_threads
        self.max_replacements = max_replacements
        self.n_replacements = 0
        self._runner_class = ray.remote(EpisodeRunner)
        # A worker that died, is unreachable, or whose node left the cluster.
        self._lost_worker_errors = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                                    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)
        # Named, so that operators (and tests) can find a search's workers in the cluster.
        self._name_prefix = f"{WORKER_NAME_PREFIX}{uuid.uuid4().hex[:8]}-"
        self._n_started = 0
        self._spec_ref = ray.put(spec)
        bounds = np.linspace(0, n_envs, n_workers + 1).round().astype(int)
        self.shares = [range(int(start), int(end)) for start, end in itertools.pairwise(bounds)]
        self.workers = [self._start_worker(share) for share in self.shares]
        observation_space, action_space = ray.get(self.workers[0].get_attr.remote("observation_space"))[0], \
            ray.get(self.workers[0].get_attr.remote("action_space"))[0]
        super().__init__(n_envs, observation_space, action_space)

    def _start_worker(self, share: range) -> Any:
        name = f"{self._name_prefix}{self._n_started}"
        self._n_started += 1
        options = {"num_cpus": self.n_threads, "max_restarts": 0, "name": name}
        return self._runner_class.options(**options).remote(self._spec_ref, len(share), self.n_threads)

    def worker_nodes(self) -> list[str]:
        """Ray node id of each current worker, in share order."""
        return self._call_all(lambda position: self.workers[position].node_id.remote(), replay_on_loss=False)

    def worker_ids(self) -> list[str]:
        """Ray actor ids of the current workers, in share order."""
        return [worker._actor_id.hex() for worker in self.workers]

    # VecEnv API

    def reset(self) -> VecEnvObs:
        self.histories = [[] for _ in range(self.num_envs)]
        parts = self._call_all(lambda position: self.workers[position].reset.remote(), replay_on_loss=False)
        return np.concatenate(parts)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None, "step_async() must come before step_wait()"
        actions = self._actions
        parts = self._call_all(
            lambda position: self.workers[position].step.remote(actions[self.shares[position].start:self.shares[position].stop])
        )
        observations = np.concatenate([part[0] for part in parts])
        rewards = np.concatenate([part[1] for part in parts])
        dones = np.concatenate([part[2] for part in parts])
        infos = [info for part in parts for info in part[3]]
        self._record(actions, dones)
        return observations, rewards, dones, infos

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":
            return [None for _ in self._get_indices(indices)]
        parts = self._call_all(lambda position: self.workers[position].get_attr.remote(attr_name), replay_on_loss=False)
        values = [value for part in parts for value in part]
        return [values[index] for index in self._get_indices(indices)]

    def evaluate_policies(self, policies: Sequence[Policy]) -> list[EpisodeResult]:
        """Score policies spread round-robin over the workers."""
        assigned = [list(range(worker, len(policies), len(self.workers))) for worker in range(len(self.workers))]
        parts = self._call_all(
            lambda position: self.workers[position].evaluate.remote([policies[i] for i in assigned[position]]),
            replay_on_loss=False,
        )
        results: list[EpisodeResult | None] = [None] * len(policies)
        for indices, part in zip(assigned, parts, strict=True):
            for index, result in zip(indices, part, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    # Calls with replacement of lost workers

    def _call_all(self, call: Callable[[int], Any], replay_on_loss: bool = True) -> list[Any]:
        """Run ``call(position)`` for every worker in parallel; replace workers that die.

        With ``replay_on_loss``, a replacement first replays its share's episodes in progress.
        """
        futures = [call(position) for position in range(len(self.workers))]
        results = []
        for position, future in enumerate(futures):
            while True:
                try:
                    results.append(self._ray.get(future))
                    break
                except self._lost_worker_errors as err:
                    self._replace(position, err, replay_on_loss)
                    future = call(position)
        return results

    def _replace(self, position: int, err: Exception, replay: bool) -> None:
        if self.n_replacements >= self.max_replacements:
            raise WorkerLost(
                f"Ray workers died {self.n_replacements + 1} times (last: {type(err).__name__}); "
                f"check the workers' memory and logs, or raise distributed.max_worker_replacements"
            ) from err
        self.n_replacements += 1
        share = self.shares[position]
        logger.warning("Ray worker %d (sub-environments %d-%d) died: %s; starting a replacement",
                       position, share.start, share.stop - 1, type(err).__name__)
        started = time.perf_counter()
        # An unavailable actor may come back; it must not step these episodes twice.
        self._ray.kill(self.workers[position], no_restart=True)
        worker = self._start_worker(share)
        self.workers[position] = worker
        if replay:
            histories = [self.histories[index] for index in share]
            # A replacement that dies during the replay is replaced in turn.
            try:
                self._ray.get(worker.replay.remote(histories))
            except self._lost_worker_errors as again:
                self._replace(position, again, replay)
                return
        logger.info("replacement worker ready after %.1f s", time.perf_counter() - started)
        # NOTE: a replacement waits until the cluster has a free CPU for it, so a
        # search whose only spare node left waits until a node joins.
