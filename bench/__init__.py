"""Benchmarks: throughput ratios measured in one run on the machine at hand (not tests)."""
