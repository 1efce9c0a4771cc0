"""Gymnasium environments for pruning-policy search."""
