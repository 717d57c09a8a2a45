"""Checkpoints: the orbax manager with fingerprints, quarantine and failed-write handling
(`manager`), and the raw readers of a run's files (`restore`: its config, its params).

This package sits below systems/ and train/: it knows neither, so a system can start from
another run's params (E2 from FashionCLIP, FashionViL downstream from pretraining) and the
trainer can save and resume, without an import cycle. Loading a whole run (its system built from
its config, params on a mesh) needs the system registry: fashion_jax/train/restore.py.
"""
