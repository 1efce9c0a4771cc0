"""rl-pruner: search per-layer pruning policies for CNNs with reinforcement learning."""

__version__ = "0.1.0"
