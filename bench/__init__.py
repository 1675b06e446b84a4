"""Benchmarks: each figure a ratio against a baseline or a floor measured in the same run."""
