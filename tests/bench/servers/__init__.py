"""Baseline servers the benchmark measures forkserver against."""
