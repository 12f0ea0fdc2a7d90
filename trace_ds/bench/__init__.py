"""Benchmarks: each arm in its own process, measured figures only."""
