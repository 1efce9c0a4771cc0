"""Gymnasium environments for pruning-policy search.

Importing this package registers ``rl_pruner/Pruning-v1``::

    import gymnasium as gym
    import rl_pruner.envs
    env = gym.make("rl_pruner/Pruning-v1", pruner=pruner, reward=reward, macs_target=0.5)
"""

import gymnasium

from rl_pruner.envs.pruning_env import PruningEnv

ENV_ID = "rl_pruner/Pruning-v1"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="rl_pruner.envs.pruning_env:PruningEnv")

__all__ = ["ENV_ID", "PruningEnv"]
