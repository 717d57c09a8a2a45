"""Benchmarks: measured speed and memory, each printing ratios measured side by side in one run.

Run from the repository root as modules: `python -m benchmarks.benchmark_model`.
"""
