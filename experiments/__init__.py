"""Experiments: comparisons, ablations and report figures behind the tables of docs/results/.

Run from the repository root as modules: `python -m experiments.e2_compare ...`.
"""
