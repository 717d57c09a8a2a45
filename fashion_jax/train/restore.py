"""Loading a trained run for every reader: its system (built from its config) and its params.

  load_trained(workdir, step=None) -> (system, host numpy params, step)   on this host
  load_params(config, workdir, step=None) -> (params, step, mesh)          sharded over a mesh
  check_workdir(workdir, config, ckpt, params)   another experiment's workdir is refused

The readers (api, search, launch.evaluate, export, the cross-encoder's two-tower, prepare) use
these; they open checkpoints read-only. The raw files (config.json, params without a system)
are fashion_jax/checkpoint/restore.py.
"""

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from fashion_jax import systems
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import state as state_lib

# Config sections whose change makes an existing checkpoint another experiment's.
IDENTITY_KEYS = ("system", "model")


def plain_json(value) -> Any:
  """Config subtree -> plain JSON value (tuples become lists), for comparisons."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def check_workdir(workdir: str, config: ml_collections.ConfigDict,
                  ckpt: checkpoint_lib.Checkpointer, params: Any, *,
                  resuming: bool = True) -> None:
  """Refuses a workdir whose newest checkpoint belongs to another system/model config.

  Compares IDENTITY_KEYS of `<workdir>/config.json`, then every parameter path and shape of the
  saved state against `params` (ShapeDtypeStructs). Raises ConfigError naming both values.
  `resuming` (the trainer): also warns which other config sections differ from the run's.
  Readers pass False: they load onto their own mesh and evaluations by design.
  """
  step = ckpt.latest_step()
  if step is None:
    return
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in IDENTITY_KEYS:
      new_value = plain_json(config.get(key))
      if key in old and old[key] != new_value:
        raise config_check.ConfigError(
            f"Workdir {workdir} holds checkpoint {step} of another config: {key}="
            f"{old[key]!r} there, {key}={new_value!r} here. Use another --workdir.")
    changed = sorted(k for k in set(old) | set(config.keys())
                     if old.get(k) != plain_json(config.get(k)))
    if changed and resuming:
      logging.warning("Resuming %s with changed config sections: %s", workdir, changed)
  saved_params = None
  for candidate in sorted(ckpt.all_steps(), reverse=True):
    try:  # An unreadable (corrupt) checkpoint is the restore fallback's business, not ours.
      saved_params = ckpt.state_metadata(candidate)["params"]
      step = candidate
      break
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Cannot read the metadata of checkpoint %d (%s: %s).", candidate,
                      type(e).__name__, str(e)[:200])
  if saved_params is None:
    return
  want = {sharding_lib.path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}
  have = {sharding_lib.path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(saved_params)}
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      raise config_check.ConfigError(
          f"Workdir {workdir} holds checkpoint {step} of another model: parameter {name} has "
          f"shape {have.get(name)} there and {want.get(name)} in this config "
          f"(system={config.system!r}). Use another --workdir.")


def load_trained(workdir: str, *, step: int | None = None) -> tuple[Any, Any, int]:
  """(system, host numpy params, step) of checkpoint `step` (None = newest) of a run.

  For inference and export on this host: the run's own config, restored onto one device
  whatever mesh trained it (orbax reshards).
  """
  config = checkpoint_restore.load_workdir_config(workdir)
  config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  params, step, _ = load_params(config, workdir, step=step)
  return systems.get_system(config), jax.device_get(params), step


def load_params(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
                ) -> tuple[Any, int, jax.sharding.Mesh]:
  """Params of checkpoint `step` (None = newest) of `workdir`, sharded over the config's mesh.

  The mesh may differ from the one that trained: orbax reads each shard where it now belongs.
  Returns (params, step, mesh). Raises checkpoint.NoCheckpointError (a FileNotFoundError)
  naming the workdir and the steps there. Opens the workdir read-only: a training process may
  own it (its in-flight saves are left alone; nothing is moved or created).
  """
  config = config_check.with_defaults(config)
  config_check.check(config, num_devices=jax.device_count(), process_count=jax.process_count())
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  system = systems.get_system(config)
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    ckpt.require(step)
    steps = ckpt.all_steps()
    check_workdir(workdir, config, ckpt, shapes.params, resuming=False)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            shapes.params, shapes.shardings)
    # An explicit step must be that step; the newest falls back to an older one (warned).
    candidates = [step] if step is not None else sorted(steps, reverse=True)
    for k, step in enumerate(candidates):
      try:
        params = ckpt.restore_params(step, abstract)
        break
      except Exception as e:  # pylint: disable=broad-except
        if k == len(candidates) - 1:
          raise checkpoint_lib.CorruptCheckpointError(
              f"Checkpoint {step} in {ckpt.directory} is unreadable or corrupt "
              f"({type(e).__name__}: {str(e)[:300]}).") from e
        logging.warning("Checkpoint %d in %s is unreadable or corrupt (%s: %s); trying "
                        "checkpoint %d.", step, ckpt.directory, type(e).__name__,
                        str(e)[:300], candidates[k + 1])
  finally:
    ckpt.close()
  return params, step, mesh
