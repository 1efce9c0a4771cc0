"""Training after or before pruning: distillation, sparsity training and 2:4 fine-tuning.

- :mod:`rl_pruner.training.loop`: the resumable SGD loop that the three share.
- :mod:`rl_pruner.training.distill`: knowledge distillation of a pruned student from its dense teacher.
- :mod:`rl_pruner.training.sparsity`: batch-norm L1 penalty and gradual magnitude masks before pruning.
- :mod:`rl_pruner.training.semistructured`: 2:4 semi-structured masks, fine-tuning and export.
- :mod:`rl_pruner.training.cli`: the ``finetune`` and ``sparsify`` subcommands.
"""
