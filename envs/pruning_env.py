"""The pruning environment: one episode builds one policy, layer by layer.

Environment card (``rl_pruner/Pruning-v1``)

- **Episode**: one step per prunable layer of the dense model, in network order
  (see :class:`~rl_pruner.engine.structure.ModelStructure`). Every episode has
  exactly that many steps: a layer inside a block that the agent dropped still gets
  its step, whose action is ignored. Equal lengths keep the sub-environments of a
  vectorised search in lockstep, so their expensive final steps run together.
- **Action**: ``Box(-1, 1, (2,), float32)``.

  - ``action[0]`` sets the layer's pruning ratio inside the feasible interval
    ``[low, high]``: ``ratio = low + (action[0] + 1) / 2 x (high - low)``.
    ``high`` is the largest ratio that keeps at least the target MACs when every
    later layer stays unpruned. ``low`` is the smallest ratio for which the target
    stays reachable with every later layer at ``max_ratio``. So
    the MACs target is met by construction; a final correction of at most a few
    rounding steps lands every episode within 1 % of it. NOTE: where one rounding
    step of every layer moves the MACs by more than that (small models with
    ``round_to`` 8, like the demo CNN), the final policy is the closest reachable one.
  - ``action[1] > 0`` drops the residual block that starts at this layer (only at
    the first layer of a removable block, and only if the model without it still
    has at least the target MACs); elsewhere it is ignored.
- **Observation**: ``Box(0, 1, (17,), float32)``, a normalised description of the
  current layer: index, kind (conv 1, linear 0), input channels, channels, kernel
  size, stride, the layer's MACs and parameters, MACs removed so far, MACs still to
  remove, the previous pruning ratio, the feasible ``low`` and ``high`` (both 0 in a
  dropped block), whether the layer starts a removable block, whether it lies inside
  one, the MACs target, and whether its block was dropped.
  Channel counts are divided by the model's largest, MACs and parameters by the
  dense totals.
- **Reward**: 0 at every step but the last; at the last, the reward evaluator's
  score of the pruned model after batch-norm re-estimation (top-1 / 100 on a reward
  split of training images for :class:`~rl_pruner.reward.TopOneReward`).
- **Termination**: after the last layer. Episodes are never truncated.
- **Info**: the terminal step's info holds ``"pruning_episode"`` with the policy, the reward
  evaluator's metrics, the MACs and parameter ratios, and timings.
- **Determinism**: the environment draws no random numbers; the same actions give
  the same policy and, on the same machine and thread count, the same reward.

Version history:

- v1: fixed-length episodes (dropped layers keep their step) and a 17th feature,
  whether the layer's block was dropped. Agents saved with v0 do not load.
- v0: first version.

The environment holds one dense model (inside its :class:`Pruner`), the cached
batch-norm and reward batches, and the structure traced once; an episode applies one
policy to a copy of the dense model and never re-reads images or re-traces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rl_pruner.engine.estimate import estimate_cost
from rl_pruner.engine.pruner import Pruner
from rl_pruner.errors import ConfigError
from rl_pruner.policy import Policy, check_criterion
from rl_pruner.reward import RewardEvaluator

logger = logging.getLogger(__name__)

N_FEATURES = 17
MACS_TOLERANCE = 0.01  # every episode's final MACs lie within this relative distance of the target
_BISECTION_STEPS = 14


@dataclass
class EpisodeResult:
    """Outcome of one episode: the policy, its reward and metrics, its cost and timings."""

    policy: Policy
    reward: float
    metrics: dict[str, float]
    macs_ratio: float
    params_ratio: float
    episode_seconds: float = 0.0
    evaluation_seconds: float = 0.0  # batch-norm re-estimation plus the reward's forward passes
    actions: list[list[float]] = field(default_factory=list)


class PruningEnv(gym.Env[np.ndarray, np.ndarray]):
    """Choose a pruning ratio per layer (and blocks to drop) for a MACs target."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        pruner: Pruner,
        reward: RewardEvaluator,
        *,
        macs_target: float,
        criterion: str = "l1",
        round_to: int = 8,
        max_ratio: float = 0.8,
        allow_block_drop: bool = True,
        bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < macs_target < 1.0:
            raise ConfigError(f"macs_target is {macs_target}; it is the fraction of dense MACs kept, in (0, 1)")
        if not 0.0 < max_ratio < 1.0:
            raise ConfigError(f"max_ratio is {max_ratio}; it must be in (0, 1)")
        check_criterion(criterion)
        self.pruner = pruner
        self.structure = pruner.structure
        self.reward_evaluator = reward
        self.macs_target = macs_target
        self.criterion = criterion
        self.round_to = round_to
        self.max_ratio = max_ratio
        self.allow_block_drop = allow_block_drop
        self.bn_batches = list(bn_batches) if bn_batches else None
        self.goal_macs = macs_target * self.structure.dense_macs

        self.observation_space = gym.spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        layers = self.structure.layers
        self._n_layers = len(layers)
        self._max_channels = max(max(layer.channels, layer.in_channels) for layer in layers)
        self._block_starts = {
            block.first_layer: block.name for block in self.structure.blocks if block.first_layer is not None
        }
        self._check_reachable()
        self._reset_state()

    # Feasibility

    def _check_reachable(self) -> None:
        lowest = self._macs_with(0, self.max_ratio, self.max_ratio, ratios=[], dropped=set())
        if lowest > self.goal_macs * (1 + MACS_TOLERANCE):
            raise ConfigError(
                f"macs_target {self.macs_target} is out of reach: with every layer at max_ratio "
                f"{self.max_ratio} the model keeps {lowest / self.structure.dense_macs:.3f} of its MACs; "
                "raise max_ratio or the target"
            )

    def _macs_with(self, index: int, ratio: float, rest: float, ratios: Sequence[float] | None = None,
                   dropped: set[str] | None = None) -> float:
        """Estimated MACs with decided ratios, ``ratio`` at ``index`` and ``rest`` after it."""
        decided = list(self._ratios if ratios is None else ratios)[:index]
        decided += [0.0] * (index - len(decided))
        vector = decided + [ratio] + [rest] * (self._n_layers - index - 1)
        return estimate_cost(self.structure, vector, self._dropped if dropped is None else dropped,
                             self.round_to)[0]

    def _bounds(self, index: int) -> tuple[float, float]:
        """Feasible pruning ratios of layer ``index``: (low, high)."""
        high = self._bisect(lambda r: self._macs_with(index, r, 0.0) >= self.goal_macs, keep_true_low=True)
        low = self._bisect(lambda r: self._macs_with(index, r, self.max_ratio) <= self.goal_macs, keep_true_low=False)
        return min(low, high), high

    def _bisect(self, predicate: Any, keep_true_low: bool) -> float:
        """Return the largest ratio in [0, max_ratio] where ``predicate`` is true, or with
        ``keep_true_low=False`` the smallest."""
        low, high = 0.0, self.max_ratio
        if keep_true_low:
            if predicate(high):
                return high
            if not predicate(low):
                return 0.0
        else:
            if predicate(low):
                return 0.0
            if not predicate(high):
                return high
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if predicate(middle) == keep_true_low:
                low = middle
            else:
                high = middle
        return low if keep_true_low else high

    # Episode state

    def _reset_state(self) -> None:
        self._index = 0
        self._ratios: list[float] = []
        self._dropped: set[str] = set()
        self._previous_ratio = 0.0
        self._actions: list[list[float]] = []
        self._started = time.perf_counter()
        self._low, self._high = self._bounds(0)

    def _in_dropped_block(self, index: int) -> bool:
        block = self.structure.layers[index].block
        return block is not None and block in self._dropped

    def _observation(self) -> np.ndarray:
        if self._index >= self._n_layers:
            return np.zeros(N_FEATURES, dtype=np.float32)
        layer = self.structure.layers[self._index]
        dense = self.structure.dense_macs
        current = self._macs_with(self._index, 0.0, 0.0)
        features = [
            self._index / max(1, self._n_layers - 1),
            1.0 if layer.kind == "conv" else 0.0,
            layer.in_channels / self._max_channels,
            layer.channels / self._max_channels,
            min(layer.kernel_size, 7) / 7,
            min(layer.stride, 2) / 2,
            layer.macs / dense,
            layer.params / self.structure.dense_params,
            (dense - current) / dense,
            max(0.0, current - self.goal_macs) / dense,
            self._previous_ratio,
            self._low,
            self._high,
            1.0 if layer.name in self._block_starts else 0.0,
            1.0 if layer.block is not None else 0.0,
            self.macs_target,
            1.0 if self._in_dropped_block(self._index) else 0.0,
        ]
        return np.clip(np.asarray(features, dtype=np.float32), 0.0, 1.0)

    # Gymnasium API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._reset_state()
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._index >= self._n_layers:
            raise RuntimeError("step() called after the episode ended; call reset()")
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        self._actions.append([float(a) for a in action])
        layer = self.structure.layers[self._index]

        block = self._block_starts.get(layer.name)
        if block is not None and self.allow_block_drop and action.shape[0] > 1 and action[1] > 0:
            with_drop = self._macs_with(self._index, 0.0, 0.0, dropped=self._dropped | {block})
            if with_drop >= self.goal_macs:
                self._dropped.add(block)

        if self._in_dropped_block(self._index):
            ratio = 0.0
        else:
            fraction = (float(action[0]) + 1.0) / 2.0
            ratio = self._low + fraction * (self._high - self._low)
        self._ratios.append(ratio)
        self._previous_ratio = ratio
        self._index += 1

        if self._index < self._n_layers:
            self._low, self._high = (0.0, 0.0) if self._in_dropped_block(self._index) else self._bounds(self._index)
            return self._observation(), 0.0, False, False, {}

        result = self._finish_episode()
        return self._observation(), result.reward, True, False, {"pruning_episode": result}

    # Episode end

    def _correct_to_target(self, ratios: list[float]) -> list[float]:
        """Move single layers by one rounding step until the MACs are within tolerance of the target."""
        ratios = list(ratios)
        macs = estimate_cost(self.structure, ratios, self._dropped, self.round_to)[0]
        for _ in range(4 * self._n_layers):
            if abs(macs / self.goal_macs - 1) <= MACS_TOLERANCE / 2:
                break
            best = None
            for index, layer in enumerate(self.structure.layers):
                if layer.block is not None and layer.block in self._dropped:
                    continue
                step = max(1, self.round_to) / layer.channels
                for candidate in (ratios[index] + step, ratios[index] - step):
                    if not 0.0 <= candidate <= self.max_ratio:
                        continue
                    trial = ratios[:index] + [candidate] + ratios[index + 1:]
                    trial_macs = estimate_cost(self.structure, trial, self._dropped, self.round_to)[0]
                    if best is None or abs(trial_macs - self.goal_macs) < abs(best[0] - self.goal_macs):
                        best = (trial_macs, trial)
            if best is None or abs(best[0] - self.goal_macs) >= abs(macs - self.goal_macs):
                break
            macs, ratios = best
        return ratios

    def _finish_episode(self) -> EpisodeResult:
        ratios = self._correct_to_target(self._ratios)
        policy = self.pruner.make_policy(
            ratios, sorted(self._dropped), criterion=self.criterion, round_to=self.round_to,
            metadata={"source": "search", "macs_target": self.macs_target},
        )
        result = self.evaluate_policy(policy)
        result.episode_seconds = time.perf_counter() - self._started
        result.actions = self._actions
        return result

    def evaluate_policy(self, policy: Policy) -> EpisodeResult:
        """Apply ``policy``, re-estimate batch norm and score it with the reward evaluator."""
        pruned = self.pruner.apply(policy)
        start = time.perf_counter()
        if self.bn_batches:
            from rl_pruner.engine.batchnorm import reestimate_batchnorm

            reestimate_batchnorm(pruned, self.bn_batches)
        metrics = self.reward_evaluator.evaluate(pruned)
        evaluation_seconds = time.perf_counter() - start
        macs, params = policy.metadata["estimated_macs"], policy.metadata["estimated_params"]
        return EpisodeResult(
            policy=policy,
            reward=float(metrics["reward"]),
            metrics={k: float(v) for k, v in metrics.items() if k != "reward"},
            macs_ratio=macs / self.structure.dense_macs,
            params_ratio=params / self.structure.dense_params,
            evaluation_seconds=evaluation_seconds,
        )
