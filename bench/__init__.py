"""Benchmark scripts (not tests): each prints its figures and appends them to BENCHMARKS.md."""
