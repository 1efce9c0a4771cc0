"""The PPO agent (stable-baselines3) that learns pruning policies.

The defaults (see :class:`rl_pruner.config.PPOConfig`) suit episodes whose only
reward comes at the end. ``gamma=1`` gives every layer's action the episode's reward,
and each update uses several episodes. A small initial action spread
(``log_std_init=-1``, a standard deviation of 0.37 on the [-1, 1] action scale) makes
early episodes explore around the middle of each layer's feasible interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv

from rl_pruner.config import PPOConfig

logger = logging.getLogger(__name__)


def build_ppo(env: gym.Env | VecEnv, config: PPOConfig, *, seed: int, episode_length: int) -> PPO:
    """Create a PPO agent whose rollout contains ``episodes_per_update`` full episodes.

    ``env`` is one environment, or a vectorised one whose sub-environments share the
    episodes of a rollout evenly (``episodes_per_update`` a multiple of their number).
    """
    n_envs = env.num_envs if isinstance(env, VecEnv) else 1
    if config.episodes_per_update % n_envs:
        raise ValueError(f"episodes_per_update {config.episodes_per_update} is not a multiple of {n_envs} environments")
    n_steps = config.episodes_per_update // n_envs * episode_length
    # The largest minibatch size up to the configured one that divides the rollout, so
    # no minibatch is truncated.
    rollout = n_steps * n_envs
    batch_size = max(size for size in range(1, min(config.batch_size, rollout) + 1) if rollout % size == 0)
    agent = PPO(
        "MlpPolicy",
        env,
        learning_rate=config.learning_rate,
        n_steps=n_steps,
        batch_size=batch_size,
        n_epochs=config.n_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        clip_range=config.clip_range,
        ent_coef=config.ent_coef,
        vf_coef=config.vf_coef,
        max_grad_norm=config.max_grad_norm,
        policy_kwargs={"net_arch": list(config.net_arch), "log_std_init": config.log_std_init},
        seed=seed,
        device="cpu",
        verbose=0,
    )
    _set_quiet_logger(agent)
    return agent


def load_ppo(path: str | Path, env: gym.Env | VecEnv) -> PPO:
    """Load an agent saved with ``PPO.save`` and attach ``env`` to it."""
    agent = PPO.load(str(path), env=env, device="cpu")
    _set_quiet_logger(agent)
    return agent


def _set_quiet_logger(agent: PPO) -> None:
    """Give ``agent`` a logger that writes nowhere.

    Without a logger of its own, every ``learn()`` call makes stable-baselines3 create
    an empty ``SB3-<time>`` folder in the system temporary directory, even at
    ``verbose=0``. The search logs what it needs to MLflow itself.
    """
    agent.set_logger(Logger(folder=None, output_formats=[]))


class EpisodeCallback(BaseCallback):
    """Callback that passes every finished episode to ``on_episode``.

    Training stops when ``on_episode`` returns False. ``should_stop`` is polled at every
    step, so a stop request (Ctrl-C) ends training at a step boundary. The episode in
    progress is then dropped, never half logged.
    """

    def __init__(self, on_episode: Callable[[Any], bool], should_stop: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self.on_episode = on_episode
        self.should_stop = should_stop

    def _on_step(self) -> bool:
        keep_going = True
        for info in self.locals.get("infos", []):
            result = info.get("pruning_episode")
            if result is not None:
                keep_going = self.on_episode(result) and keep_going
        if self.should_stop is not None and self.should_stop():
            return False
        return keep_going
