"""PruningEnv: Gymnasium API conformance, the MACs target, determinism, block drops."""

from __future__ import annotations


import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from rl_pruner.engine.estimate import estimate_cost
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.envs import ENV_ID, PruningEnv
from rl_pruner.errors import ConfigError
from rl_pruner.reward import TopOneReward


def _batches(shape: tuple[int, ...], n_images: int = 4, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n_images, *shape, generator=generator),
             torch.randint(0, 10, (n_images,), generator=generator))]


class _ConstantReward:
    """Reward double for tests about the MACs budget, where model quality is not under test."""

    metric = "top1"

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {"reward": 0.5, "top1": 50.0}


def _env(pruner: Pruner, macs_target: float = 0.5, **kwargs) -> PruningEnv:
    batches = _batches(pruner.structure.input_shape)
    return PruningEnv(pruner, TopOneReward(batches), macs_target=macs_target, bn_batches=batches, **kwargs)


def _run_episode(env: PruningEnv, rng: np.random.Generator, seed: int | None = None):
    env.reset(seed=seed)
    rewards, terminated, info = [], False, {}
    while not terminated:
        _, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        assert not truncated
        rewards.append(reward)
    return rewards, info["pruning_episode"]


@pytest.mark.parametrize("model_fixture", ["resnet56", "resnet50"])
def test_check_env_passes(model_fixture: str, request: pytest.FixtureRequest) -> None:
    env = _env(request.getfixturevalue(model_fixture))
    check_env(env, skip_render_check=True)


def test_registered_id_makes_the_env(resnet56: Pruner) -> None:
    batches = _batches((3, 32, 32))
    env = gym.make(ENV_ID, pruner=resnet56, reward=TopOneReward(batches), macs_target=0.5)
    observation, _ = env.reset(seed=0)
    assert env.observation_space.contains(observation)


@pytest.mark.parametrize("model_fixture", ["resnet56", "resnet50"])
@pytest.mark.parametrize(("macs_target", "n_episodes"), [
    # The default suite runs 15 episodes at the hardest target, the slow suite 50.
    (0.3, 15), pytest.param(0.3, 50, marks=pytest.mark.slow), (0.5, 10), (0.7, 10),
])
def test_random_episodes_meet_macs_target(model_fixture: str, macs_target: float, n_episodes: int,
                                          request: pytest.FixtureRequest) -> None:
    pruner: Pruner = request.getfixturevalue(model_fixture)
    env = PruningEnv(pruner, _ConstantReward(), macs_target=macs_target)
    rng = np.random.default_rng(7)
    n_with_drops = 0
    for _ in range(n_episodes):
        rewards, result = _run_episode(env, rng)
        assert abs(result.macs_ratio / macs_target - 1) <= 0.01
        assert all(r == 0.0 for r in rewards[:-1])
        assert rewards[-1] == 0.5
        n_with_drops += bool(result.policy.dropped_blocks)
    assert n_with_drops > 0


def test_final_policy_macs_match_built_model(resnet56: Pruner) -> None:
    env = _env(resnet56, 0.3)
    _, result = _run_episode(env, np.random.default_rng(3))
    pruned = resnet56.apply(result.policy)
    assert count_macs(pruned, (3, 32, 32)) / resnet56.structure.dense_macs == pytest.approx(result.macs_ratio)


def test_same_actions_reproduce_episode(resnet56: Pruner) -> None:
    env = _env(resnet56, 0.4)
    _, first = _run_episode(env, np.random.default_rng(11), seed=5)
    _, second = _run_episode(env, np.random.default_rng(11), seed=5)
    assert first.policy.to_dict() == second.policy.to_dict()
    assert first.reward == second.reward
    assert first.metrics == second.metrics


def test_extreme_actions_stay_feasible(resnet56: Pruner) -> None:
    env = _env(resnet56, 0.3)
    for value in (-1.0, 1.0):
        env.reset()
        terminated, info = False, {}
        while not terminated:
            _, _, terminated, _, info = env.step(np.array([value, value], dtype=np.float32))
        result = info["pruning_episode"]
        assert abs(result.macs_ratio / 0.3 - 1) <= 0.01
        for ratio in result.policy.pruning_ratios.values():
            assert 0.0 <= ratio <= env.max_ratio


def test_dropping_all_blocks_is_refused_below_target(resnet56: Pruner) -> None:
    env = _env(resnet56, 0.9)
    env.reset()
    terminated, info = False, {}
    while not terminated:
        _, _, terminated, _, info = env.step(np.array([-1.0, 1.0], dtype=np.float32))
    result = info["pruning_episode"]
    kept_macs = estimate_cost(resnet56.structure, {}, result.policy.dropped_blocks, 8)[0]
    assert kept_macs >= 0.9 * resnet56.structure.dense_macs


@pytest.mark.parametrize(("key", "value"), [("macs_target", 0.0), ("macs_target", 1.5), ("max_ratio", 1.0)])
def test_invalid_settings_raise(resnet56: Pruner, key: str, value: float) -> None:
    settings = {"macs_target": 0.5, key: value}
    with pytest.raises(ConfigError):
        _env(resnet56, **settings)


def test_unreachable_target_raises(resnet56: Pruner) -> None:
    with pytest.raises(ConfigError, match="out of reach"):
        _env(resnet56, 0.05, max_ratio=0.5)
