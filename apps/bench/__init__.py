"""Benchmarks: python -m apps.bench.run (see docs/benchmarks.md)."""
