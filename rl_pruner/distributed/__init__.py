"""Distributed search: episodes on Ray workers, and sweeps of searches with Ray Tune."""
