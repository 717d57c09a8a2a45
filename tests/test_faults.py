"""Fault injection in-process: corrupt checkpoints, failed writes, non-finite steps, pickles.

The kill -9 / SIGTERM / real disk-full cases need a separate process: tests/test_resume.py.
Injection points and actions: fashion_jax/faults.py (`FASHION_JAX_FAULT`).

This module doubles as the system `tests.test_faults`: the toy system whose loss and gradients
can be poisoned per step, to inject NaN/inf exactly where a test wants it.
"""

import glob
import logging
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.interop import hf_io
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import loop
from tests import toy_system

CONFIG_KEYS = toy_system.CONFIG_KEYS


# ------------------------------------------------------------------------------------------------
# A toy system with injectable NaN/inf: batch['loss_scale'] multiplies the loss, and
# batch['grad_scale'] multiplies the gradient flowing into the params (the loss stays finite).
# ------------------------------------------------------------------------------------------------
@jax.custom_vjp
def _scale_grad(params, scale):
  return params


def _scale_grad_fwd(params, scale):
  return params, scale


def _scale_grad_bwd(scale, ct):
  return jax.tree.map(lambda g: g * scale, ct), jnp.zeros_like(scale)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


class System(toy_system.System):
  """toy_system.System with `loss_scale` / `grad_scale` batch fields ([B], row 0 is used)."""

  def dummy_batch(self, batch_size):
    ones = np.ones((batch_size,), np.float32)
    return {**super().dummy_batch(batch_size), "loss_scale": ones, "grad_scale": ones}

  def loss(self, params, batch, rng, train=True):
    params = _scale_grad(params, batch["grad_scale"][0])
    loss, aux = super().loss(params, {"a": batch["a"], "b": batch["b"]}, rng, train)
    return loss * batch["loss_scale"][0], aux


def poisoned_iterator(poison):
  """Iterator factory: the toy stream, with {step: (loss_scale, grad_scale)} at those steps."""

  def factory(config, **kwargs):
    inner = toy_system.make_iterator(config, **kwargs)

    class It:
      position = property(lambda self: inner.position)
      num_examples = inner.num_examples

      def __iter__(self):
        return self

      def __next__(self):
        step = inner.position + 1  # The train step that consumes this batch.
        batch = next(inner)
        rows = len(batch["a"])
        scales = poison.get(step, (1.0, 1.0))
        return {**batch, "loss_scale": np.full((rows,), scales[0], np.float32),
                "grad_scale": np.full((rows,), scales[1], np.float32)}
    return It()
  return factory


def _config(total, **checkpoint):
  config = toy_system.get_config()
  config.system = "tests.test_faults"
  config.total_steps = total
  config.log_every_steps = 2
  config.checkpoint.update({"every_steps": 2, "keep": 10, **checkpoint})
  return config


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _restore(workdir, step):
  """(state as host numpy, data) of checkpoint `step`, onto one device, verified."""
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            ckpt.state_metadata(step))
    state, data = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return jax.device_get(state), data


def _assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def absl_warnings(caplog):
  """The trainer's absl warnings, as one string."""
  caplog.set_level(logging.WARNING, logger="absl")
  return lambda: "\n".join(r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# Fingerprints and corrupted checkpoints.
# ------------------------------------------------------------------------------------------------
def test_fingerprint_detects_one_flipped_bit_and_swaps_and_ignores_the_mesh():
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  tree = {"w": x, "n": np.arange(5, dtype=np.int32), "h": x[:2].astype(jnp.bfloat16)}
  base = checkpoint_lib.fingerprint(tree)
  flipped = x.copy()
  flipped.view(np.uint32)[3, 4] ^= 1 << 17
  assert checkpoint_lib.fingerprint({**tree, "w": flipped})["w"][0] != base["w"][0]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  fp = checkpoint_lib.fingerprint({**tree, "w": swapped})["w"]
  assert fp[0] == base["w"][0] and fp[1] != base["w"][1]  # Same sum, other positions.
  # Sharded over 8 devices (2 x 4 mesh): the same numbers (exact integer sums in any order).
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  spec = jax.sharding.PartitionSpec("b", "a")
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  assert checkpoint_lib.fingerprint({"w": sharded})["w"] == base["w"]
  # Independent reference: float32 bits as uint32, flat index i, sums mod 2^32.
  w = x.view(np.uint32).ravel().astype(np.uint64)
  i = np.arange(w.size, dtype=np.uint64)
  assert base["w"] == [int(w.sum() % 2**32), int((w * (2 * i + 1)).sum() % 2**32)]
  with pytest.raises(checkpoint_lib.CorruptCheckpointError, match=r"Checkpoint 7: array w does "
                     r"not match the fingerprint"):
    checkpoint_lib.verify(7, {"w": flipped}, base)


def _data_files(workdir, step):
  """The OCDBT data files of checkpoint `step`'s state, largest first.

  (orbax 0.12.8 writes the arrays into `state/ocdbt.process_0/d/` and, when merging, may copy
  them into `state/d/`; which copy a restore reads depends on the tree.)
  """
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                    recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def _flip_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(path, "wb").write(bytes(data))


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def test_checkpointer_falls_back_past_corrupt_checkpoints_and_quarantines_them(tmp_path,
                                                                               absl_warnings):
  state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "s": jnp.int32(0)}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), {"step": step})
  ckpt.close()
  _flip_byte(_data_files(str(tmp_path), 2)[0])
  _truncate(_data_files(str(tmp_path), 3)[0])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  # Orbax alone restores the flipped byte as a wrong value, silently ...
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  raw = ckpt.manager.restore(2, args=ocp.args.Composite(state=checkpoint_lib._StateRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
  assert not np.array_equal(raw["state"]["w"], np.arange(4096).reshape(64, 64) + 2)
  # ... with the fingerprint it is an error naming the step and the array.
  with pytest.raises(checkpoint_lib.CorruptCheckpointError, match=r"Checkpoint 2: array w"):
    ckpt.restore(2, abstract)
  step, got, data = ckpt.restore_latest(abstract)
  assert step == 1 and data == {"step": 1}
  np.testing.assert_array_equal(got["w"], np.arange(4096).reshape(64, 64) + 1)
  log = absl_warnings()
  assert "Checkpoint 3 in" in log and "Checkpoint 2 in" in log and "does not match" in log
  assert ckpt.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / "checkpoints_corrupt")) == ["2", "3"]
  # Saving step 2 again works (the bad one is out of the way); a restart sees only good ones.
  ckpt.save(2, jax.tree.map(lambda x: x + 2, state), {"step": 2})
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  assert ckpt.restore_latest(abstract)[0] == 2
  # Every checkpoint bad: an error saying so, never a silent start from scratch.
  _flip_byte(_data_files(str(tmp_path), 1)[0])
  _flip_byte(_data_files(str(tmp_path), 2)[0])
  with pytest.raises(checkpoint_lib.CorruptCheckpointError,
                     match=r"Every checkpoint in .* is unreadable or corrupt \(steps \[2, 1\]"):
    ckpt.restore_latest(abstract)
  ckpt.close()


@pytest.fixture(scope="module")
def reference_6(tmp_path_factory):
  """An uninterrupted 6-step run (host state)."""
  result = loop.train_and_evaluate(_config(6), str(tmp_path_factory.mktemp("ref6")),
                                   iterator_factory=poisoned_iterator({}))
  return jax.device_get(result.state)


def test_training_resumes_past_a_corrupt_newest_checkpoint_and_equals_a_clean_run(
    tmp_path, absl_warnings, reference_6):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(_config(4), workdir, iterator_factory=poisoned_iterator({}))
  assert _steps(workdir) == [2, 4]
  for f in _data_files(workdir, 4):  # Truncated array files (both copies, whichever is read).
    _truncate(f)
  result = loop.train_and_evaluate(_config(6), workdir, iterator_factory=poisoned_iterator({}))
  log = absl_warnings()
  assert "Checkpoint 4 in" in log and "is unreadable or corrupt" in log
  assert os.listdir(os.path.join(workdir, "checkpoints_corrupt")) == ["4"]
  assert _steps(workdir) == [2, 4, 6]  # 4 was trained again from 2 (no crash loop on it).
  _assert_trees_equal(reference_6, jax.device_get(result.state))


# ------------------------------------------------------------------------------------------------
# Failed checkpoint writes (disk full): injected OSError in the background write and the save.
# The real ENOSPC on a full tmpfs: tests/test_resume.py::test_disk_full_...
# ------------------------------------------------------------------------------------------------
def test_failed_writes_warn_keep_older_checkpoints_and_a_failed_final_save_stops(
    tmp_path, monkeypatch, absl_warnings):
  workdir = str(tmp_path)
  # Checkpoint 4 fails inside orbax's background write, 6 is written, 8 (the last) fails.
  monkeypatch.setenv("FASHION_JAX_FAULT", "oserror:write@4,oserror:save@8")
  with pytest.raises(checkpoint_lib.CheckpointWriteError,
                     match=r"final checkpoint \(step 8\) could not be written .*No space left on "
                           r"device.*The newest checkpoint there is step 6"):
    loop.train_and_evaluate(_config(8, keep=2), workdir, iterator_factory=poisoned_iterator({}))
  log = absl_warnings()
  assert "Checkpoint 4 could not be written" in log and "intact (steps [2])" in log
  assert "Checkpoint 8 could not be written" in log
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "6"]  # No tmp left.
  for step in (2, 6):
    _, data = _restore(workdir, step)  # Verified against its fingerprint.
    assert data["step"] == step
  # Rerun without the fault: resumes from 6 and finishes.
  monkeypatch.delenv("FASHION_JAX_FAULT")
  result = loop.train_and_evaluate(_config(8, keep=2), workdir,
                                   iterator_factory=poisoned_iterator({}))
  assert int(result.state.step) == 8 and _steps(workdir) == [6, 8]


# ------------------------------------------------------------------------------------------------
# Non-finite loss and gradients.
# ------------------------------------------------------------------------------------------------
def test_inf_gradient_with_finite_loss_stops_naming_grad_norm(tmp_path):
  config = _config(6, every_steps=1)
  with pytest.raises(loop.NonFiniteError,
                     match=r"Non-finite train/grad_norm=(inf|nan) at step 3; stopping "
                           r"\(nan_policy='stop'\)\. The newest checkpoint \(step 2\)"):
    loop.train_and_evaluate(config, str(tmp_path),
                            iterator_factory=poisoned_iterator({3: (1.0, np.inf)}))
  assert _steps(str(tmp_path)) == [1, 2]
  state, _ = _restore(str(tmp_path), 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_skip_policy_leaves_state_unchanged_on_nan_and_inf_steps(tmp_path, absl_warnings):
  config = _config(8, every_steps=1)
  config.nan_policy = "skip"
  config.log_every_steps = 4
  poison = {2: (np.nan, 1.0), 3: (np.inf, 1.0), 6: (1.0, np.inf)}
  result = loop.train_and_evaluate(config, str(tmp_path),
                                   iterator_factory=poisoned_iterator(poison))
  log = absl_warnings()
  assert "Step 2 skipped (nan_policy='skip'): non-finite train/loss=nan" in log
  assert "Step 3 skipped (nan_policy='skip'): non-finite train/loss=inf" in log
  assert "Step 6 skipped (nan_policy='skip'): non-finite train/grad_norm=" in log
  assert result.metrics["train/skipped"] == 0.25 and result.metrics["train/skipped_total"] == 3
  assert np.isfinite(result.metrics["train/loss"])  # Averaged over the applied steps only.
  states = {s: _restore(str(tmp_path), s)[0] for s in range(1, 9)}
  for skipped, before in ((2, 1), (3, 1), (6, 5)):
    assert int(states[skipped]["step"]) == skipped  # The counter (schedule, rng) moves on,
    _assert_trees_equal(states[before]["params"], states[skipped]["params"])  # nothing else.
    _assert_trees_equal(states[before]["opt_state"], states[skipped]["opt_state"])
  for applied in (4, 5, 7, 8):
    assert not np.array_equal(states[applied]["params"]["params"]["logit_scale"],
                              states[applied - 1]["params"]["params"]["logit_scale"])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(states[8]))


# ------------------------------------------------------------------------------------------------
# Interop: an untrusted .bin never runs pickled code.
# ------------------------------------------------------------------------------------------------
class _Payload:
  """Unpickling this calls os.mkdir(marker): code execution, observable on disk."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_untrusted_bin_checkpoint_is_refused_without_running_its_code(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text('{"model_type": "bert"}')
  marker = tmp_path / "pwned"
  torch.save({"weight": torch.zeros(2), "extra": _Payload(str(marker))},
             model / "pytorch_model.bin")
  with pytest.raises(pickle.UnpicklingError, match=r"Weights only load failed"):
    hf_io.load_hf_checkpoint(str(model))
  assert not marker.exists()
  # Control: the file really is hostile (a plain unpickle runs the payload).
  torch.load(model / "pytorch_model.bin", weights_only=False)
  assert marker.is_dir()


def test_no_code_path_unpickles_without_weights_only():
  """Every torch.load / pickle.load / np.load(allow_pickle=True) in the package is safe."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fashion_jax")
  unsafe = []
  for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
      code = line.split("#")[0]
      if (("torch.load(" in code and "weights_only=True" not in code)
          or "pickle.load" in code or "allow_pickle=True" in code):
        unsafe.append(f"{os.path.relpath(path, root)}:{n}: {line.strip()}")
  assert not unsafe, unsafe
