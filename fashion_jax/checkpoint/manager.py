"""Checkpoints: orbax CheckpointManager over `<workdir>/checkpoints`, verified and fault-tolerant.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items:
  state: the TrainState arrays (orbax's sharded array format; any mesh can restore it);
  data:  JSON {"step": step, "position": <the train iterator's `.position`>,
         "fingerprint": {<array path>: [s1, s2]}} so the input pipeline resumes where the saved
         state stopped consuming, and the restored arrays can be checked bit for bit.

Retention: the newest `keep` checkpoints, plus (when `best_metric` is set) the single best one
by `best_metric` among the checkpoints saved with evaluation metrics (`best_mode` 'max'/'min').
Saves are asynchronous when `async` is set: `save` returns once the arrays are copied off the
devices; the write and the atomic rename of the temporary directory happen in the background.
A checkpoint whose write was interrupted (kill -9) stays a temporary directory
`<step>.orbax-checkpoint-tmp`, is never listed as a step, and is deleted at the next start
(`cleanup_tmp_directories`).

Integrity. orbax verifies structure, not contents: we checked (orbax-checkpoint 0.12.8) that a
truncated, emptied or deleted array/metadata file makes the restore raise, but a flipped byte
inside the array data file (OCDBT, uncompressed) is restored silently as a wrong value. So each
save also stores a fingerprint of every array: with w the array's bits as uint32 words (8- and
16-bit types widened, 64-bit split in two) and i the word's flat index,
    s1 = sum_i w_i mod 2^32,    s2 = sum_i w_i * (2 i + 1) mod 2^32,
computed by one jitted reduction on the devices. Integer sums mod 2^32 are exact in any order,
so the fingerprint does not depend on the mesh (restoring onto another mesh verifies too). Any
single corrupted word changes s1 (by +-2^k, k < 32); swapped values change s2. It is a check
against storage faults, not a cryptographic hash. `restore` recomputes and compares it and raises
`CorruptCheckpointError` naming the step and the first mismatching array.

Fallback (`restore_latest`): the newest checkpoint that restores and verifies is used. Each one
that does not is named in a warning and moved out of the way to `<workdir>/checkpoints_corrupt/`
(never deleted: the files stay for inspection), so a restart never trips on it again (no crash
loop) and training can save that step number again. If every checkpoint is bad the error says
so; the next start then trains from scratch.

Write failures (disk full, quota, I/O error, orbax/tensorstore 'RESOURCE_EXHAUSTED' and other
errors carrying an OS error code): the failed checkpoint's temporary directory is removed, the
checkpoints already on disk are left intact (orbax does not get to its retention deletions when
the write fails; the manager's step list is re-read from disk), a warning names the step, the
error and the intact steps, and training continues: the next periodic save tries again (e.g.
after space was freed). `failed_saves` records them; the trainer makes the final save's failure
an error. Errors that are not storage errors are raised as they are.

Restore onto any mesh: `restore` takes abstract arrays carrying the target shardings, and orbax
reads each shard where it belongs.

Incompatible config (not corruption). Before reading any array, `restore`/`restore_latest`
compare the saved state's tree (orbax's metadata: every array's path, shape and dtype, and
every empty node such as optax's EmptyState) with the target's. Any difference (e.g.
`optimizer.clip_norm=0` drops the clipping transform, so the optimizer state's entries move)
raises `IncompatibleCheckpointError` naming the differing paths (in the checkpoint only, in the
target only, shape/dtype changed) and, given the new config, the keys that differ from
`<workdir>/config.json` (the config the checkpoints were written with). Nothing is moved: the
checkpoints are healthy and the saved config restores them. Only a failed read or fingerprint
check makes a checkpoint corrupt (fallback and quarantine above). dtype changes count too: a
restore would cast the arrays and then fail the fingerprint check.

Readers: `Checkpointer(workdir, read_only=True)` is for every process that does not own the
workdir (evaluation, export, search, init from another run). It lists, reads and verifies
only: it never deletes temporary directories (another process's save may be in flight there),
never quarantines, never creates directories, and refuses to save. Only the training process
that owns the workdir opens it writable (and sweeps the temporary directories of interrupted
saves at its start).
"""

from collections.abc import Mapping
import glob
import json
import os
import shutil
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args
from orbax.checkpoint import checkpoint_managers

from fashion_jax import faults
from fashion_jax.parallel import sharding as sharding_lib

# Suffix of a finalised checkpoint renamed aside while it is saved again with its metrics
# (Checkpointer.save_again_with_metrics); orbax lists only integer names, so it is never a step.
MOVED_ASIDE = ".before-metrics"

FINGERPRINT_KEY = "fingerprint"
QUARANTINE_DIR = "checkpoints_corrupt"


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read or its arrays do not match their saved fingerprint."""


class CheckpointWriteError(OSError):
  """A checkpoint the run cannot do without (the final one) could not be written."""


class IncompatibleCheckpointError(ValueError):
  """A healthy checkpoint whose state tree differs from the target's (another config).

  Deliberately not a CorruptCheckpointError: nothing is quarantined, the saved config restores
  the checkpoint. The message names the differing state paths and config keys.
  """


class NoCheckpointError(FileNotFoundError):
  """A workdir holds no finalised checkpoint (or not the requested step)."""


# ------------------------------------------------------------------------------------------------
# Fingerprints.
# ------------------------------------------------------------------------------------------------
def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words, same leading shape (64-bit types get a trailing 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  bits = x.dtype.itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}.get(bits)
  if unsigned is None:
    raise TypeError(f"No fingerprint for dtype {x.dtype}.")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
  """[s1, s2] uint32 of one array (module docstring), without reshaping the sharded array."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):  # Flat row-major index, by broadcasted iotas.
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride = (stride * w.shape[axis]) % (1 << 32)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                    jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _all_sums(leaves):
  return [_leaf_sums(x) for x in leaves]


def fingerprint(tree: Any) -> dict[str, list[int]]:
  """{array path ('params/tower_a/dense_in/kernel'): [s1, s2]} of every array leaf of `tree`."""
  flat = jax.tree_util.tree_leaves_with_path(tree)
  sums = jax.device_get(_all_sums([jnp.asarray(x) for _, x in flat]))
  return {sharding_lib.path_str(p): [int(s[0]), int(s[1])] for (p, _), s in zip(flat, sums)}


def verify(step: int, tree: Any, saved: Mapping[str, Any] | None) -> None:
  """Raises CorruptCheckpointError unless every array of `tree` has its `saved` fingerprint.

  `tree` may be a part of the saved state (e.g. only {'params': ...}); its paths are looked up
  in `saved`. A checkpoint without fingerprints (written before they existed) is only warned
  about.
  """
  if saved is None:
    logging.warning("Checkpoint %d has no array fingerprints; its contents are not verified.",
                    step)
    return
  for path, got in fingerprint(tree).items():
    want = saved.get(path)
    if want is None:
      raise CorruptCheckpointError(f"Checkpoint {step}: array {path} has no saved fingerprint.")
    if list(want) != got:
      raise CorruptCheckpointError(
          f"Checkpoint {step}: array {path} does not match the fingerprint saved with it "
          f"(saved {list(want)}, read {got}): the files were altered or damaged after writing.")


# ------------------------------------------------------------------------------------------------
# State structure and config differences (incompatible, not corrupt).
# ------------------------------------------------------------------------------------------------
_EMPTY = "empty"


def _layout(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """{path: (shape, dtype) or 'empty'} of a state tree in orbax's saved form.

  Dicts and lists/tuples are containers (orbax saves namedtuples with fields as dicts; the
  target is serialised that way first); None, an empty container and a field-less namedtuple
  (optax's EmptyState) are empty nodes; anything else is an array (ShapeDtypeStruct, orbax's
  ArrayMetadata, an array).
  """
  if isinstance(tree, Mapping):
    items = [(str(k), v) for k, v in tree.items()]
  elif isinstance(tree, (list, tuple)):
    items = [(str(k), v) for k, v in enumerate(tree)]
  elif tree is None:
    items = []
  else:
    return {prefix: (tuple(getattr(tree, "shape", ())), getattr(tree, "dtype", None))}
  if not items:
    return {prefix: _EMPTY}
  out = {}
  for key, value in items:
    out.update(_layout(value, prefix + (key,)))
  return out


def _same(saved, target) -> bool:
  if saved == _EMPTY or target == _EMPTY:
    return saved == target
  if any(d is not None and jax.dtypes.issubdtype(d, jax.dtypes.prng_key)
         for d in (saved[1], target[1])):
    return True  # orbax stores typed PRNG keys as their data; not compared.
  return saved[0] == target[0] and (saved[1] is None or target[1] is None
                                    or saved[1] == target[1])


def _describe(leaf) -> str:
  return "an empty node" if leaf == _EMPTY else f"{leaf[0]} {leaf[1]}"


def _only_in(paths, layout, other) -> list[str]:
  """`paths` (in `layout`, not in `other`) grouped under their shortest prefix that `other`
  does not have at all: ['opt_state/2 (28 arrays)', 'opt_state/1 (an empty node)']."""
  other_prefixes = {p[:k] for p in other for k in range(1, len(p) + 1)}
  groups = {}
  for path in sorted(paths):
    k = next((k for k in range(1, len(path) + 1) if path[:k] not in other_prefixes),
             len(path))  # An empty node where `other` has a subtree: the node itself.
    groups.setdefault(path[:k], []).append(path)
  out = []
  for prefix, members in groups.items():
    arrays = sum(layout[p] != _EMPTY for p in members)
    what = (f"{arrays} array{'s' if arrays != 1 else ''}" if arrays
            else "an empty node" if len(members) == 1 else f"{len(members)} empty nodes")
    out.append(f"{'/'.join(prefix) or '<root>'} ({what})")
  return out


def structure_differences(saved: Any, target: Any, limit: int = 8) -> list[str]:
  """Lines describing how the saved state tree differs from `target`; [] when they match.

  `saved`: the checkpoint's state metadata (`Checkpointer.state_metadata`); `target`: the
  abstract state to restore into (any pytree of ShapeDtypeStructs).
  """
  have = _layout(saved)
  want = _layout(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
  lines = []

  def add(title, entries):
    if entries:
      more = f", and {len(entries) - limit} more" if len(entries) > limit else ""
      lines.append(f"{title}: {', '.join(entries[:limit])}{more}")

  add("in the checkpoint but not in this config's state",
      _only_in(set(have) - set(want), have, want))
  add("in this config's state but not in the checkpoint",
      _only_in(set(want) - set(have), want, have))
  add("changed", [f"{'/'.join(p)}: {_describe(have[p])} in the checkpoint, "
                  f"{_describe(want[p])} here"
                  for p in sorted(set(have) & set(want)) if not _same(have[p], want[p])])
  return lines


def _plain(config: Any) -> Any:
  """A config (ConfigDict or mapping) as plain JSON values, as config.json holds them."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict) and value:
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: value}


_ABSENT = object()


def config_changes(old: Mapping[str, Any], new: Any) -> list[tuple[str, Any, Any]]:
  """[(dotted key, old value, new value)] of every leaf key whose value differs, sorted.

  `old`: a config as JSON (config.json); `new`: a ConfigDict or mapping. A key present on one
  side only has the value `_ABSENT` on the other.
  """
  a, b = _flatten(_plain(dict(old))), _flatten(_plain(new))
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "(absent)"
  return json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


# ------------------------------------------------------------------------------------------------
# Storage errors and multi-process agreement.
# ------------------------------------------------------------------------------------------------
_STORAGE_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "PERMISSION_DENIED", "DATA_LOSS",
                   "DEADLINE_EXCEEDED", "os_error_code")


def is_storage_error(error: BaseException) -> bool:
  """An OSError, or a tensorstore/orbax error carrying a storage status, anywhere in the chain."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return True
    if any(s in str(error) for s in _STORAGE_STATUS):
      return True
    error = error.__cause__ or error.__context__
  return False


def _everyone(ok: bool) -> bool:
  """True iff `ok` on every process (one all-gather; a plain bool on one process)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


# ------------------------------------------------------------------------------------------------
# The state item's handler: the 'write' fault point inside orbax's background commit.
# ------------------------------------------------------------------------------------------------
class _ThenInject:
  """A commit future that waits for `futures`, then injects the 'write' fault of `step`."""

  def __init__(self, futures, step: int, workdir: str):
    self.futures, self.step, self.workdir = futures, step, workdir

  def result(self, timeout: float | None = None):
    for f in self.futures:
      f.result(timeout=timeout)
    faults.inject("write", self.step, workdir=self.workdir)


class _StateHandler(ocp.PyTreeCheckpointHandler):
  """orbax's PyTree handler; when a 'write' fault is armed for the step being saved, one more
  commit future runs after the array writes (faults.py)."""

  def __init__(self, workdir: str):
    super().__init__()
    self.workdir = workdir
    self.saving_step = None

  async def async_save(self, directory, *args, **kwargs):
    futures = await super().async_save(directory, *args, **kwargs)
    step = self.saving_step
    if step is None or not faults.armed("write", step):
      return futures
    futures = list(futures or [])
    return futures + [_ThenInject(futures, step, self.workdir)]


@checkpoint_args.register_with_handler(_StateHandler, for_save=True)
class _StateSave(ocp.args.PyTreeSave):
  """ocp.args.PyTreeSave for _StateHandler (orbax finds a handler by its args class)."""


@checkpoint_args.register_with_handler(_StateHandler, for_restore=True)
class _StateRestore(ocp.args.PyTreeRestore):
  """ocp.args.PyTreeRestore for _StateHandler."""


# ------------------------------------------------------------------------------------------------
# The checkpointer.
# ------------------------------------------------------------------------------------------------
def _not_orbax_read_only_note(record) -> bool:
  """Log filter: False for orbax's note on opening a directory read-only."""
  return not record.getMessage().startswith("Given directory is read only")


class Checkpointer:
  """Save/restore of (TrainState, data position) with keep-last-N plus keep-best.

  Writable (the default) only in the training process that owns `workdir`: opening it creates
  `<workdir>/checkpoints` and deletes the temporary directories of interrupted saves. Every
  other process opens it with `read_only=True` (module docstring: readers); `keep`,
  `best_metric`, `best_mode` and `use_async` are then unused.
  """

  def __init__(self, workdir: str, *, keep: int | None = None, best_metric: str | None = None,
               best_mode: str = "max", use_async: bool = True, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only = read_only
    self.best_metric = None if read_only else best_metric
    self.failed_saves: dict[int, str] = {}   # step -> error, of saves that did not complete.
    self._pending: int | None = None         # Step of the async save possibly still running.
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0,
          enable_async_checkpointing=False)
    else:
      if keep is None:
        raise ValueError(f"Checkpointer({workdir!r}): a writable checkpointer needs `keep` "
                         "(checkpoints kept); readers pass read_only=True.")
      policies = [checkpoint_managers.LatestN(n=keep)]
      if best_metric:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
            n=1, keep_checkpoints_without_metrics=False))
      options = ocp.CheckpointManagerOptions(
          preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
          enable_async_checkpointing=use_async,
          cleanup_tmp_directories=True,
          create=True)
    if not read_only:
      self._recover_moved_aside()
    self._state_handler = _StateHandler(self.workdir)
    # orbax warns "Given directory is read only" on every read-only open; for a reader (api,
    # evaluate, export, search) that is the intended mode, not news, so that one line is dropped.
    logger = logging.get_absl_logger()
    if read_only:
      logger.addFilter(_not_orbax_read_only_note)
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": self._state_handler, "data": ocp.JsonCheckpointHandler()})
    finally:
      logger.removeFilter(_not_orbax_read_only_note)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def require(self, step: int | None = None) -> int:
    """`step` if it is a finalised checkpoint here (None: the newest one), else raises
    NoCheckpointError: one line naming the workdir, the steps there, any unfinished save, whether
    a config.json exists and how to train."""
    steps = self.all_steps()
    if steps and (step is None or step in steps):
      return steps[-1] if step is None else step
    if steps:
      raise NoCheckpointError(f"No checkpoint {step} in workdir {self.workdir} (steps there: "
                              f"{steps}); pass one of those steps.")
    if not os.path.isdir(self.workdir):
      state = "it does not exist"
    elif os.path.exists(os.path.join(self.workdir, "config.json")):
      state = "config.json exists, so a run started there but saved no checkpoint yet"
    else:
      state = "no config.json either, so it is not a training workdir"
    unfinished = sorted(os.path.basename(p) for p in glob.glob(
        os.path.join(self.directory, "*.orbax-checkpoint-tmp*")))
    if unfinished:
      state += f"; unfinished saves in {self.directory}: {unfinished}"
    raise NoCheckpointError(
        f"No checkpoints in workdir {self.workdir} ({state}); train first: python -m "
        f"launch.train --config=<config file> --workdir={self.workdir}, and wait for its first "
        "checkpoint (checkpoint.every_steps).")

  # ---- Saving. ---------------------------------------------------------------------------------
  def _write_failed(self, step: int | None, error: BaseException) -> None:
    """Records a failed save, removes its temporary directory, re-reads the steps on disk."""
    step_name = "?" if step is None else str(step)
    self.failed_saves[-1 if step is None else step] = f"{type(error).__name__}: {error}"
    self._remove_failed_tmp()
    self.manager.reload()
    logging.warning(
        "Checkpoint %s could not be written to %s (%s: %s). The checkpoints already there are "
        "intact (steps %s); training continues and the next save tries again.", step_name,
        self.directory, type(error).__name__, str(error)[:500], self.all_steps())

  def _remove_failed_tmp(self) -> None:
    """Deletes the temporary directories of EVERY failed save so far, not only the newest: an
    asynchronous writer of a failed save can still be creating files in its directory while it
    is first removed (seen under heavy load: rmtree then leaves it behind), so each later
    failure and `close` sweep again."""
    if jax.process_index() != 0:
      return
    for step in self.failed_saves:
      if step >= 0:
        for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
          shutil.rmtree(tmp, ignore_errors=True)

  def _wait_pending(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not is_storage_error(e):
        raise
      self._write_failed(self._pending, e)
    self._pending = None

  def save(self, step: int, state: Any, data: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts saving `state` and the JSON-able `data` as checkpoint `step`.

    `metrics` (evaluation results) rank the checkpoint for keep-best. A storage error (this
    save's, or the previous asynchronous save's, which surfaces here) is logged and recorded in
    `failed_saves` (module docstring); other errors are raised.
    """
    if self.read_only:
      raise ValueError(f"Checkpointer({self.workdir}) is read-only: it cannot save step {step} "
                       "(only the training process that owns the workdir saves).")
    self._wait_pending()
    self._state_handler.saving_step = step
    try:
      faults.inject("save", step, workdir=self.workdir)
      payload = {**dict(data), FINGERPRINT_KEY: fingerprint(state)}
      self.manager.save(
          step,
          args=ocp.args.Composite(state=_StateSave(state),
                                  data=ocp.args.JsonSave(payload)),
          metrics=dict(metrics) if metrics else None, force=True)
      self._pending = step
    except Exception as e:  # pylint: disable=broad-except
      if not is_storage_error(e):
        raise
      self._write_failed(step, e)

  def save_again_with_metrics(self, step: int, state: Any, data: Mapping[str, Any],
                              metrics: Mapping[str, float]) -> None:
    """Checkpoint `step`, already on disk (saved before its evaluations), saved again with the
    evaluations' `metrics` so that keep-best ranks it (orbax attaches metrics only when saving).

    The copy on disk is never deleted before the new one is finalised: it is renamed (one atomic
    rename) to `<step>` + MOVED_ASIDE, orbax saves `<step>` again, and the moved copy is removed
    only after that save is finalised. A process killed in between leaves the moved copy, which
    the next writable Checkpointer of the workdir renames back (`_recover_moved_aside`); a save
    that fails with a storage error renames it back at once. So the state of `step` is on disk,
    under one name or the other, at every moment.
    """
    self.wait()
    path = os.path.join(self.directory, str(step))
    aside = path + MOVED_ASIDE
    if jax.process_index() == 0 and os.path.isdir(path):
      shutil.rmtree(aside, ignore_errors=True)
      os.rename(path, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"fashion_jax_moved_aside_{step}")
    self.manager.reload()
    faults.inject("resave", step, workdir=self.workdir)
    self.save(step, state, data, metrics)
    self.wait()
    if jax.process_index() == 0 and os.path.isdir(aside):
      if os.path.isdir(path):
        shutil.rmtree(aside, ignore_errors=True)
      else:  # The save failed (a storage error, recorded in failed_saves): put the copy back.
        os.rename(aside, path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"fashion_jax_resaved_{step}")
    self.manager.reload()

  def _recover_moved_aside(self) -> None:
    """Puts back each `<step>` + MOVED_ASIDE left by a process killed inside
    `save_again_with_metrics`: renamed to `<step>` when that is missing, else (the new save was
    finalised before the kill) deleted."""
    if jax.process_index() != 0:
      return
    for aside in sorted(glob.glob(os.path.join(self.directory, "*" + MOVED_ASIDE))):
      path = aside[:-len(MOVED_ASIDE)]
      if os.path.isdir(path):
        shutil.rmtree(aside, ignore_errors=True)
      else:
        os.rename(aside, path)
        logging.warning("Checkpoint %s: the copy moved aside while it was saved again with its "
                        "metrics (the process stopped in between) is back as %s.",
                        os.path.basename(path), path)

  def wait(self) -> None:
    """Waits for the asynchronous save; a storage error of it is handled as in `save`."""
    self._wait_pending()

  def close(self) -> None:
    if self.read_only:
      self.manager.close()
      return
    self._wait_pending()
    self.manager.close()
    self._remove_failed_tmp()

  # ---- Restoring. ------------------------------------------------------------------------------
  def _incompatible(self, step: int, differences: list[str] | None,
                    config: Any | None) -> IncompatibleCheckpointError:
    """The error for checkpoint `step` whose state tree differs from the target's."""
    parts = [f"Checkpoint {step} in {self.directory} holds a train state with another tree "
             "than this config's, so it cannot be restored (an incompatible config, not a "
             "corrupt checkpoint: nothing was moved). State differences: "
             + ("; ".join(differences) if differences
                else "found by another process (its metadata differs)") + "."]
    path = os.path.join(self.workdir, "config.json")
    if config is not None:
      try:
        with open(path) as f:
          changes = config_changes(json.load(f), config)
      except (OSError, ValueError) as e:
        parts.append(f"Cannot compare the config with {path} ({type(e).__name__}: {e}).")
      else:
        if changes:
          parts.append(f"Config keys that differ from {path} (the config the checkpoints were "
                       "written with): " + ", ".join(f"{k}: {_show(a)} -> {_show(b)}"
                                                     for k, a, b in changes) + ".")
          flags = " ".join(f"--config.{k}={a}" for k, a, _ in changes
                           if a is not _ABSENT and not isinstance(a, (list, dict)))
          if flags:
            parts.append(f"To resume, set back the key that changes the state (saved values: "
                         f"{flags}); to train the new config, use another --workdir.")
        else:
          parts.append(f"No config key differs from {path}: the code that builds the state "
                       "changed; use another --workdir.")
    return IncompatibleCheckpointError(" ".join(parts))

  def check_compatible(self, step: int, abstract_state: Any, *, config: Any | None = None
                       ) -> None:
    """Raises IncompatibleCheckpointError when checkpoint `step`'s saved state tree (metadata
    only, no array is read) differs from `abstract_state`'s; `config` (the config the target
    was built from) adds the keys that differ from `<workdir>/config.json`. A checkpoint whose
    metadata cannot be read raises orbax's error (a corrupt checkpoint)."""
    differences = structure_differences(self.state_metadata(step), abstract_state)
    if differences:
      raise self._incompatible(step, differences, config)

  def restore(self, step: int, abstract_state: Any, *, config: Any | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """(state laid out as `abstract_state`'s shardings, data dict) of checkpoint `step`.

    Raises IncompatibleCheckpointError (`check_compatible`) before reading any array when the
    saved tree differs from `abstract_state`'s; CorruptCheckpointError when the arrays do not
    match their saved fingerprint; orbax's own errors (unreadable files) pass through.
    """
    self.check_compatible(step, abstract_state, config=config)
    return self._restore(step, abstract_state)

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=_StateRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=ocp.args.JsonRestore()))
    data = dict(out["data"])
    verify(step, out["state"], data.pop(FINGERPRINT_KEY, None))
    return out["state"], data

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the params of checkpoint `step` (no optimizer state is read), with the shardings
    of `abstract_params` (ShapeDtypeStructs carrying `.sharding`), verified like `restore`."""
    item = {"params": abstract_params}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=_StateRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True),
        data=ocp.args.JsonRestore()))
    verify(step, {"params": out["state"]["params"]}, out["data"].get(FINGERPRINT_KEY))
    return out["state"]["params"]

  def _quarantine(self, step: int) -> str:
    """Moves checkpoint `step` to `<workdir>/checkpoints_corrupt/<step>[.k]`; returns where."""
    if self.read_only:
      raise ValueError(f"Checkpointer({self.workdir}) is read-only: it does not move checkpoint "
                       f"{step}.")
    target = os.path.join(self.workdir, QUARANTINE_DIR, str(step))
    k = 0
    while os.path.exists(target if k == 0 else f"{target}.{k}"):
      k += 1
    target = target if k == 0 else f"{target}.{k}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"fashion_jax_quarantine_{step}")
    self.manager.reload()
    return target

  def restore_latest(self, abstract_state: Any, *, quarantine: bool = True,
                     config: Any | None = None) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data) of the newest checkpoint that restores and verifies; None if none.

    Each newer checkpoint that cannot be read or fails its fingerprint is named in a warning
    and, with `quarantine` (never when read-only), moved to `<workdir>/checkpoints_corrupt/`.
    Raises CorruptCheckpointError when checkpoints exist but none is usable, and
    IncompatibleCheckpointError (`check_compatible`; `config` names the changed keys), moving
    nothing, at the newest readable checkpoint whose state tree differs from
    `abstract_state`'s: an older one is not used in its place, the config is what is wrong.
    """
    quarantine = quarantine and not self.read_only
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      error, differences = None, None
      try:  # Metadata only: decides incompatible vs readable before any array is read.
        saved = self.state_metadata(step)
      except MemoryError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
      else:  # Outside the try: a failure to compare is no evidence of corruption.
        differences = structure_differences(saved, abstract_state)
      if not _everyone(not differences):
        raise self._incompatible(step, differences, config)
      if error is None:
        try:
          state, data = self._restore(step, abstract_state)
        except MemoryError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          error = e
      if _everyone(error is None):
        if bad:
          logging.warning("Restored checkpoint %d instead of the newer unusable checkpoint(s) "
                          "%s.", step, bad)
        return step, state, data
      bad.append(step)
      reason = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None
                else "another process could not read it")
      where = f"; moved to {self._quarantine(step)}" if quarantine else ""
      logging.warning("Checkpoint %d in %s is unreadable or corrupt (%s)%s. Falling back to the "
                      "previous checkpoint.", step, self.directory, reason, where)
    if bad:
      raise CorruptCheckpointError(
          f"Every checkpoint in {self.directory} is unreadable or corrupt (steps {bad}"
          + (f", moved to {os.path.join(self.workdir, QUARANTINE_DIR)}). Rerunning starts "
             "from scratch." if quarantine else ")."))
    return None

  def state_metadata(self, step: int) -> Any:
    """The saved state as a nested dict of array metadata (.shape, .dtype); reads no arrays."""
    meta = self.manager.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)
