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
"""

from collections.abc import Mapping
import glob
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

from fashion_jax.train import faults

FINGERPRINT_KEY = "fingerprint"
QUARANTINE_DIR = "checkpoints_corrupt"


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read or its arrays do not match their saved fingerprint."""


class CheckpointWriteError(OSError):
  """A checkpoint the run cannot do without (the final one) could not be written."""


# ------------------------------------------------------------------------------------------------
# Fingerprints.
# ------------------------------------------------------------------------------------------------
def _path(path) -> str:
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


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
  return {_path(p): [int(s[0]), int(s[1])] for (p, _), s in zip(flat, sums)}


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
class Checkpointer:
  """Save/restore of (TrainState, data position) with keep-last-N plus keep-best."""

  def __init__(self, workdir: str, *, keep: int, best_metric: str | None = None,
               best_mode: str = "max", use_async: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.best_metric = best_metric
    self.failed_saves: dict[int, str] = {}   # step -> error, of saves that did not complete.
    self._pending: int | None = None         # Step of the async save possibly still running.
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=use_async,
        cleanup_tmp_directories=True,
        create=True)
    self._state_handler = _StateHandler(self.workdir)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": self._state_handler, "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

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

  def wait(self) -> None:
    """Waits for the asynchronous save; a storage error of it is handled as in `save`."""
    self._wait_pending()

  def close(self) -> None:
    self._wait_pending()
    self.manager.close()
    self._remove_failed_tmp()

  # ---- Restoring. ------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state laid out as `abstract_state`'s shardings, data dict) of checkpoint `step`.

    Raises CorruptCheckpointError when the arrays do not match their saved fingerprint; orbax's
    own errors (unreadable files) pass through.
    """
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

  def restore_latest(self, abstract_state: Any, *, quarantine: bool = True
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data) of the newest checkpoint that restores and verifies; None if none.

    Each newer checkpoint that fails is named in a warning and, with `quarantine`, moved to
    `<workdir>/checkpoints_corrupt/`. Raises CorruptCheckpointError when checkpoints exist but
    none is usable.
    """
    bad = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        state, data = self.restore(step, abstract_state)
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
          + (f", moved to {os.path.join(self.workdir, QUARANTINE_DIR)}" if quarantine else "")
          + "). Rerunning starts from scratch.")
    return None

  def state_metadata(self, step: int) -> Any:
    """The saved state as a nested dict of array metadata (.shape, .dtype); reads no arrays."""
    meta = self.manager.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)
