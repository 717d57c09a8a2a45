"""The raw readers of a run's files: its config and its params, without its system.

  load_workdir_config(workdir) -> ConfigDict     <workdir>/config.json, written at the run's start
  read_params(workdir, step=None) -> (params, step)
      every parameter of checkpoint `step` (None = newest) as host numpy arrays, in the tree the
      checkpoint holds (its orbax metadata), verified against the saved fingerprints.

Both open the workdir read-only (manager.Checkpointer(read_only=True)): a training process may
own it; nothing is deleted, moved or created. A system uses read_params to start from another
run (E2 from a FashionCLIP run, FashionViL downstream from pretraining); loading a run with its
system and onto a mesh is fashion_jax/train/restore.py.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from fashion_jax.checkpoint import manager


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`, written at its start)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    ckpt = manager.Checkpointer(workdir, read_only=True)
    try:
      ckpt.require()  # No checkpoints either: NoCheckpointError says so, and how to train.
      steps = ckpt.all_steps()
    finally:
      ckpt.close()
    raise FileNotFoundError(
        f"{path} does not exist although {ckpt.directory} holds checkpoints {steps}: the run's "
        "config is unknown; pass it explicitly (launch.evaluate --config=FILE, or "
        "fashion_jax.train.restore.load_params(config, workdir)).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def read_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """(host numpy params, step) of checkpoint `step` (None = newest) of `workdir`.

  The abstract tree comes from the checkpoint's metadata (ShapeDtypeStructs without a sharding
  restore as numpy arrays); the restore runs under jax.ensure_compile_time_eval so that it also
  works while an init is being traced (E2 reads its pretrained arrays there).
  """
  ckpt = manager.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.require(step)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                            ckpt.state_metadata(step)["params"])
    with jax.ensure_compile_time_eval():
      params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, params), step
