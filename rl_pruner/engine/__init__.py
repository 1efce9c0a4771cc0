"""The pruning engine: dependency groups, importance, policy application, MACs."""
