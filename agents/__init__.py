"""Agents that learn pruning policies."""
