"""Checkpoint reliability: an incompatible config is not corruption, readers never delete.

  * A resume whose config gives the train state another tree (e.g. optimizer.clip_norm=0 drops
    the clipping transform from the optimizer state) raises IncompatibleCheckpointError naming
    the differing state paths and config keys; no checkpoint is moved, and the original config
    still resumes. Real corruption still quarantines (tests/test_faults.py).
  * Readers (launch.evaluate, restore.load_params / load_trained, Checkpointer(read_only=True))
    never delete another process's in-flight `<step>.orbax-checkpoint-tmp-*`, never quarantine,
    never create directories.
  * launch.evaluate on a workdir without checkpoints ends with one line naming the workdir.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import loop
from tests import toy_system
from fashion_jax.train import restore
from fashion_jax.checkpoint import restore as checkpoint_restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(total=2, clip_norm=1.0):
  config = toy_system.get_config()
  config.total_steps = total
  config.optimizer.clip_norm = clip_norm
  config.checkpoint.update({"every_steps": 1, "keep": 10, "async": False})
  return config


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _train(config, workdir):
  return loop.train_and_evaluate(config, workdir, iterator_factory=toy_system.make_iterator)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy workdir with checkpoints 1 and 2 (optimizer.clip_norm=1.0)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  _train(_config(), workdir)
  assert _steps(workdir) == [1, 2]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A private copy of `trained`."""
  path = str(tmp_path / "run")
  shutil.copytree(trained, path)
  return path


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
  return env


# ------------------------------------------------------------------------------------------------
# Item 2: a changed optimizer state tree is an incompatible config, not corruption.
# ------------------------------------------------------------------------------------------------
def test_changed_optimizer_tree_is_incompatible_not_corrupt_and_moves_nothing(workdir):
  saved_config = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as info:
    _train(_config(total=3, clip_norm=0.0), workdir)
  error = info.value
  assert isinstance(error, ValueError)
  assert not isinstance(error, checkpoint_lib.CorruptCheckpointError)
  message = str(error)
  # The state paths: clip_by_global_norm's (empty) state is gone, so the chain's entries moved.
  assert "Checkpoint 2 in" in message and workdir in message
  differences = re.search(r"State differences: (.*?)\. Config keys", message).group(1)
  assert re.search(r"in the checkpoint but not in this config's state: [^;]*opt_state/\S+ "
                   r"\(\d+ arrays\)", differences), message
  assert re.search(r"in this config's state but not in the checkpoint: [^;]*opt_state/\S+ "
                   r"\(\d+ arrays\)", differences), message
  assert "params" not in differences, message
  # The config keys, against the saved run's config.json.
  assert "optimizer.clip_norm: 1.0 -> 0.0" in message, message
  assert "total_steps: 2 -> 3" in message, message
  assert "--config.optimizer.clip_norm=1.0" in message, message
  # Nothing moved, nothing rewritten.
  assert _steps(workdir) == [1, 2]
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.QUARANTINE_DIR))
  assert open(os.path.join(workdir, "config.json")).read() == saved_config
  # A second try with the same changed config names the same keys (config.json was kept).
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"optimizer\.clip_norm: 1\.0 -> 0\.0"):
    _train(_config(total=3, clip_norm=0.0), workdir)
  # The original config still resumes from the newest checkpoint.
  result = _train(_config(total=3), workdir)
  assert int(result.state.step) == 3
  assert _steps(workdir) == [1, 2, 3]


def test_structure_differences_name_missing_extra_and_changed_arrays(tmp_path):
  state = {"w": jax.numpy.zeros((4, 4)), "opt": [{"mu": jax.numpy.zeros(3)}, None],
           "s": jax.numpy.int32(0)}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5, use_async=False)
  ckpt.save(1, state, {"step": 1})
  ckpt.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"w": jax.numpy.zeros((4, 8)), "opt": [{"nu": jax.numpy.zeros(3)}],
            "s": jax.numpy.int32(0), "extra": jax.numpy.zeros(2, jax.numpy.bfloat16)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          target)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as info:
    ckpt.restore_latest(abstract)
  message = str(info.value)
  assert "opt/0/mu (1 array)" in message and "opt/1 (an empty node)" in message, message
  assert "opt/0/nu (1 array)" in message and "extra (1 array)" in message, message
  assert "w: (4, 4) float32 in the checkpoint, (4, 8) float32 here" in message, message
  assert ckpt.all_steps() == [1]
  assert not os.path.exists(tmp_path / checkpoint_lib.QUARANTINE_DIR)
  # The matching target restores (the check did not damage anything).
  same = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      {**state, "opt": [state["opt"][0], None]})
  assert ckpt.restore_latest(same)[0] == 1
  ckpt.close()


# ------------------------------------------------------------------------------------------------
# Item 4: readers never delete another process's in-flight save.
# ------------------------------------------------------------------------------------------------
def _fake_tmp(workdir, step):
  """A fake interrupted/in-flight save `<step>.orbax-checkpoint-tmp-<ts>` with one file."""
  tmp = os.path.join(workdir, "checkpoints", f"{step}.orbax-checkpoint-tmp-1733400000000000")
  os.makedirs(os.path.join(tmp, "state"))
  with open(os.path.join(tmp, "state", "data"), "wb") as f:
    f.write(b"x" * 1000)
  return tmp


def test_readers_leave_an_in_flight_save_of_the_owner_alone(workdir, monkeypatch):
  """A real asynchronous save held at the 'write' point (arrays in the tmp directory, not yet
  renamed) while readers open the workdir: it survives and finalises."""
  release, writing = threading.Event(), threading.Event()
  real_inject, real_armed = checkpoint_lib.faults.inject, checkpoint_lib.faults.armed

  def hold(point, step, **kwargs):
    if (point, step) == ("write", 3):
      writing.set()
      assert release.wait(60)
      return
    real_inject(point, step, **kwargs)

  monkeypatch.setattr(checkpoint_lib.faults, "inject", hold)
  monkeypatch.setattr(checkpoint_lib.faults, "armed",
                      lambda point, step: (point, step) == ("write", 3) or real_armed(point, step))
  config = checkpoint_restore.load_workdir_config(workdir)
  # The owner: checkpoint 2's state saved again as step 3, asynchronously.
  owner = checkpoint_lib.Checkpointer(workdir, keep=10, use_async=True)
  try:
    params, step, _ = restore.load_params(config, workdir)
    state = {"params": params}
    owner.save(3, state, {"step": 3})
    assert writing.wait(60)
    fake = _fake_tmp(workdir, 7)  # After the owner opened: the owner may sweep its own.
    (tmp,) = glob.glob(os.path.join(workdir, "checkpoints", "3.orbax-checkpoint-tmp*"))
    files = sorted(glob.glob(os.path.join(tmp, "**"), recursive=True))
    assert len(files) > 3
    # Readers open the workdir while the save is in flight.
    _, step, _ = restore.load_params(config, workdir)
    assert step == 2
    _, _, step = restore.load_trained(workdir)
    assert step == 2
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    assert reader.all_steps() == [1, 2]
    reader.close()
    assert sorted(glob.glob(os.path.join(tmp, "**"), recursive=True)) == files
    assert os.path.isfile(os.path.join(fake, "state", "data"))
  finally:
    release.set()
    owner.close()
  assert _steps(workdir) == [1, 2, 3]
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            {"params": reader.state_metadata(3)["params"]})
    restored, data = reader.restore(3, abstract)  # Verified against its fingerprint.
    assert data == {"step": 3}
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):
      np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
  finally:
    reader.close()


def test_readers_do_not_warn_about_a_resume_the_trainer_does(workdir, caplog):
  """A reader loads onto its own one-device mesh: no "Resuming ... changed config sections"
  and no orbax "directory is read only" line. The trainer resuming with another total_steps
  still warns, naming the section."""
  with caplog.at_level("WARNING"):
    _, _, step = restore.load_trained(workdir)
  assert step == 2
  reader_lines = [r.getMessage() for r in caplog.records]
  assert not [m for m in reader_lines if "Resuming" in m or "read only" in m], reader_lines
  caplog.clear()
  with caplog.at_level("WARNING"):
    _train(_config(total=3), workdir)
  assert _steps(workdir)[-1] == 3
  assert any(re.search(r"Resuming .* changed config sections: \['total_steps'\]",
                       r.getMessage()) for r in caplog.records), caplog.text[-2000:]


def test_read_only_checkpointer_never_quarantines_saves_or_creates(workdir, tmp_path):
  for f in glob.glob(os.path.join(workdir, "checkpoints", "2", "state", "**", "d", "*"),
                     recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          reader.state_metadata(1))
  step, _, data = reader.restore_latest(abstract)
  assert step == 1 and data["step"] == 1
  assert _steps(workdir) == [1, 2]  # Checkpoint 2 skipped, not moved.
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.QUARANTINE_DIR))
  with pytest.raises(ValueError, match=r"read-only"):
    reader.save(5, {"w": jax.numpy.zeros(2)}, {"step": 5})
  reader.close()
  empty = tmp_path / "empty"
  empty.mkdir()
  reader = checkpoint_lib.Checkpointer(str(empty), read_only=True)
  assert reader.all_steps() == [] and reader.latest_step() is None
  reader.close()
  assert os.listdir(empty) == []


@pytest.mark.slow
def test_evaluate_subprocess_keeps_a_foreign_tmp_directory(workdir):
  fake = _fake_tmp(workdir, 7)
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["evals"] = {"toy": {"type": "tests.toy_system", "every": 0}}
  json.dump(config, open(os.path.join(workdir, "config.json"), "w"))
  proc = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(os.path.join(workdir, "eval_2.json"))
  assert os.path.isfile(os.path.join(fake, "state", "data"))


# ------------------------------------------------------------------------------------------------
# Item 13a: launch.evaluate without checkpoints: one clear line, non-zero exit.
# ------------------------------------------------------------------------------------------------
def test_evaluate_without_checkpoints_ends_with_one_clear_line(tmp_path):
  """Two workdirs without checkpoints, one with a config.json (training started, nothing saved
  yet), one empty; both evaluations run at the same time (two subprocesses)."""
  started, empty = tmp_path / "started", tmp_path / "empty"
  started.mkdir()
  empty.mkdir()
  config = _config()
  config.evals = {"toy": {"type": "tests.toy_system", "every": 0}}
  (started / "config.json").write_text(config.to_json_best_effort())
  procs = {w: subprocess.Popen([sys.executable, "-m", "launch.evaluate", f"--workdir={w}"],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for w in (started, empty)}
  for workdir, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"launch.evaluate: No checkpoints in workdir {workdir} ("), last
    assert f"launch.train --config=<config file> --workdir={workdir}" in last, last
    if workdir == started:
      assert "config.json exists" in last, last
    else:
      assert "no config.json" in last, last
  # Nothing created (a reader makes no checkpoints/ directory).
  assert os.listdir(started) == ["config.json"] and os.listdir(empty) == []
