"""Checkpoint/resume behaviour of the trainer: kill -9 at six injected points, SIGTERM, a real
disk-full, the NaN guard, keep-best.

The subprocess runs are `python -m tests.toy_system` (launch.train's main with the toy input),
on the same 8 fake CPU devices and the same mesh as the in-process reference run.
"""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fashion_jax import faults
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import loop
from tests import toy_system
from fashion_jax.train import restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _cmd(workdir, *overrides):
  return [sys.executable, "-m", "tests.toy_system", "--config=tests/toy_system.py",
          f"--workdir={workdir}", f"--config.total_steps={TOTAL}", "--config.mesh.fsdp=2",
          *overrides]


def _start(workdir, *overrides, log=None):
  return subprocess.Popen(_cmd(workdir, *overrides), cwd=REPO, env=_env(), text=True,
                          stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL)


def _steps(workdir):
  """Finalized checkpoint steps (orbax names them by step; tmp dirs carry a suffix)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _any_ckpt_dir(workdir, after):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return False
  return any(int(n.split(".")[0]) > after for n in os.listdir(d) if n.split(".")[0].isdigit())


def _wait(pred, timeout=120.0):
  t0 = time.time()
  while not pred():
    if time.time() - t0 > timeout:
      raise TimeoutError("condition not reached")
    time.sleep(0.01)


def _restore_params(workdir, like_state):
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  try:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
    step = ckpt.latest_step()
    state, data = ckpt.restore(step, abstract)
    return step, state, data
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Uninterrupted in-process run: the final state (mesh data=4, fsdp=2, as the subprocesses)."""
  config = toy_system.get_config()
  config.total_steps = TOTAL
  config.mesh.fsdp = 2
  result = loop.train_and_evaluate(config, str(tmp_path_factory.mktemp("ref")),
                                   iterator_factory=toy_system.make_iterator)
  return jax.device_get(result.state), result.state


def _run(workdir, tmp_path, name, fault=None, *overrides, timeout=300):
  """Runs the toy trainer to completion or to its injected fault; (returncode, stdout, log)."""
  env = _env()
  env.pop("FASHION_JAX_FAULT", None)
  if fault:
    env["FASHION_JAX_FAULT"] = fault
  env["PYTHONFAULTHANDLER"] = "1"  # A hung run is aborted with every thread's stack in its log.
  log_path = tmp_path / f"{name}.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_cmd(workdir, *overrides), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log)
    try:
      out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)
      proc.communicate()
      raise AssertionError(f"{name} ({fault}) did not finish in {timeout}s:\n"
                           f"{log_path.read_text()[-6000:]}") from None
  return proc.returncode, out, log_path.read_text()


def _tmp_dirs(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if "tmp" in n) if os.path.isdir(d) else []


@pytest.mark.slow
def test_kill9_at_six_points_resumes_from_newest_complete_checkpoint_bitwise(tmp_path,
                                                                            reference):
  """kill -9 (FASHION_JAX_FAULT, faults.py) at six points of a 12-step run saved every
  2 steps (keep 2, async); each rerun of the same command resumes from the newest finalised
  checkpoint on disk, never from a temporary one, and the last run equals the uninterrupted
  reference bit for bit."""
  ref_host, ref_state = reference
  workdir = str(tmp_path / "run")
  chain = [
      # (fault, checkpoints on disk after the kill: exact list or the allowed lists)
      ("kill:write@4", [[2]]),        # Arrays of 4 written into 4.orbax-checkpoint-tmp, no rename.
      ("kill:restore@2", [[2]]),      # Right after restoring 2 at start-up.
      ("kill:batch@5", [[2], [2, 4]]),  # Batch of step 5 taken; 4 may still be writing.
      ("kill:save@8", [[4, 6]]),      # Save of 8 called (6 is finalised first), nothing written.
      ("kill:step@9", [[4, 6], [6, 8]]),  # Step 9 computed; 8 may be unfinalised (4 kept then).
      ("kill:saved@10", [[8, 10]]),   # 10 finalised, step 11 not started.
  ]
  newest = None
  for k, (fault, allowed) in enumerate(chain):
    rc, out, log = _run(workdir, tmp_path, f"run{k}", fault)
    assert rc == -signal.SIGKILL, f"{fault}: exit {rc}\n{out}\n{log[-3000:]}"
    assert f"Fault injection (FASHION_JAX_FAULT={fault}): kill" in log
    if newest is not None:
      assert f"Resumed from checkpoint {newest} " in log, (fault, log[-3000:])
    assert _steps(workdir) in allowed, (fault, _steps(workdir))
    if fault == "kill:write@4":  # A complete-looking but unfinalised checkpoint is left behind.
      tmp = _tmp_dirs(workdir)
      assert len(tmp) == 1 and tmp[0].startswith("4.orbax-checkpoint-tmp"), tmp
      written = glob.glob(os.path.join(workdir, "checkpoints", tmp[0], "state*", "ocdbt.*",
                                       "d", "*"))
      assert written, os.listdir(os.path.join(workdir, "checkpoints", tmp[0]))
    newest = _steps(workdir)[-1]

  rc, out, log = _run(workdir, tmp_path, "final")
  assert rc == 0, log[-3000:]
  assert f"Finished at step {TOTAL}" in out
  assert f"Resumed from checkpoint {newest} " in log
  assert not _tmp_dirs(workdir)
  step, state, data = _restore_params(workdir, ref_state)
  assert step == TOTAL and data == {"step": TOTAL, "position": TOTAL}
  got = jax.device_get(state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_host),
                          jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _can_mount_tmpfs(tmp_path):
  """Whether this user may mount a tmpfs in a private user+mount namespace (unshare -rm)."""
  target = tmp_path / "probe"
  target.mkdir()
  try:
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                           f"{target}"], capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(tmp_path):
  """checkpoints/ on an 8 MiB tmpfs, filled once checkpoint 2 is final (fill_disk, faults.py):
  every later save fails with a real ENOSPC; training goes on with a warning per failed save, the
  final save's failure stops the run (exit != 0, the step named), and checkpoint 2 stays
  intact and restorable."""
  if not _can_mount_tmpfs(tmp_path):
    pytest.skip("unprivileged user/mount namespaces (unshare -rm) are not available here")
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  env = _env()
  env["FASHION_JAX_FAULT"] = "fill_disk:saved@2"
  cmd = " ".join(_cmd(str(workdir), "--config.total_steps=6"))
  script = (f"mount -t tmpfs -o size=8m tmpfs {workdir}/checkpoints || exit 99; {cmd}; rc=$?; "
            f"mkdir {tmp_path}/after; cp -r {workdir}/checkpoints {tmp_path}/after/; "
            f"rm -f {tmp_path}/after/checkpoints/disk_filler; "
            "exit $rc")
  with open(tmp_path / "log.txt", "w") as log:
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=log, timeout=300)
  log = (tmp_path / "log.txt").read_text()
  assert proc.returncode not in (0, 99), log[-3000:]
  assert "Checkpoint 4 could not be written" in log and "intact (steps [2])" in log
  assert "No space left on device" in log or "RESOURCE_EXHAUSTED" in log
  assert "CheckpointWriteError: The final checkpoint (step 6) could not be written" in log
  assert sorted(os.listdir(tmp_path / "after" / "checkpoints")) == ["2"]
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "after"), keep=10)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            ckpt.state_metadata(2))
    _, data = ckpt.restore(2, abstract)  # Verified against its fingerprint.
  finally:
    ckpt.close()
  assert data == {"step": 2, "position": 2}


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(workdir, "--config.data.sleep_s=0.1", "--config.checkpoint.every_steps=1000",
                "--config.total_steps=1000")
  _wait(lambda: os.path.exists(os.path.join(workdir, "config.json")))
  time.sleep(random.uniform(0.0, 2.0))
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  assert "(preempted)" in out
  steps = _steps(workdir)
  assert len(steps) == 1 and 1 <= steps[0] < 1000  # Saved by the SIGTERM, not periodically.
  assert f"Finished at step {steps[0]} (preempted)" in out


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, toy_config):
  toy_config.data.nan_at_step = 5
  toy_config.total_steps = 8
  toy_config.checkpoint.every_steps = 1
  toy_config.checkpoint.keep = 10
  toy_config.log_every_steps = 4
  with pytest.raises(loop.NonFiniteError, match=r"Non-finite train/loss=nan at step 5"):
    loop.train_and_evaluate(toy_config, str(tmp_path), iterator_factory=toy_system.make_iterator)
  assert _steps(str(tmp_path)) == [1, 2, 3, 4]
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=10)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            ckpt.state_metadata(4))
    saved, data = ckpt.restore(4, abstract)
  finally:
    ckpt.close()
  assert data == {"step": 4, "position": 4}
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(saved))


def test_keep_best_and_last(tmp_path, toy_config, monkeypatch):
  """keep=1 plus best by val/toy/loss (min): exactly the last step and the argmin survive."""
  original_run = toy_system.Evaluator.run
  seen = {}

  def run(self, params):
    out = original_run(self, params)
    seen[len(seen) + 1] = out["val/toy/loss"]
    return out

  monkeypatch.setattr(toy_system.Evaluator, "run", run)
  toy_config.total_steps = 8
  toy_config.optimizer.lr = 0.3  # Large: the validation loss goes up and down.
  toy_config.checkpoint.keep = 1
  toy_config.checkpoint.every_steps = 1000
  toy_config.checkpoint.best_metric = "val/toy/loss"
  toy_config.checkpoint.best_mode = "min"
  toy_config.evals = {"toy": {"type": "tests.toy_system", "every": 1}}
  result = loop.train_and_evaluate(toy_config, str(tmp_path),
                                   iterator_factory=toy_system.make_iterator)
  assert sorted(seen) == list(range(1, 9))
  best = min(seen, key=seen.get)
  assert _steps(str(tmp_path)) == sorted({best, 8})
  assert result.metrics["val/toy/loss"] == pytest.approx(seen[8])


def test_restore_onto_another_mesh_and_evaluate_cli(tmp_path, toy_config):
  toy_config.total_steps = 4
  toy_config.evals = {"toy": {"type": "tests.toy_system", "every": 0}}
  result = loop.train_and_evaluate(toy_config, str(tmp_path),
                                   iterator_factory=toy_system.make_iterator)
  # Trained on data=8; restored onto data=2 x fsdp=2 x tensor=2 with the same values.
  toy_config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
  params, step, _ = restore.load_params(toy_config, str(tmp_path))
  assert step == 4
  kernel = params["params"]["tower_a"]["dense_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                  jax.tree.leaves(jax.device_get(result.state.params))):
    np.testing.assert_array_equal(a, b)
  # Standalone evaluation from the workdir's config.json (the training mesh).
  proc = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--workdir={tmp_path}", "--evals=toy"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[1].split() == ["split", "protocol", "acc", "loss"]
  assert lines[3].split()[:2] == ["val", "toy"]
  saved = json.loads((tmp_path / "eval_4.json").read_text())
  assert saved["step"] == 4
  assert saved["results"]["val/toy/loss"] == pytest.approx(result.metrics["val/toy/loss"],
                                                            rel=1e-5)


def test_final_resave_never_leaves_the_final_state_off_disk(tmp_path, toy_config, monkeypatch):
  """With best_metric the final checkpoint is saved again with its metrics. A failure at that
  moment (injected right after the copy on disk was moved aside, before the new save) must not
  lose the final state: the copy stays on disk, and the next writable Checkpointer of the
  workdir puts it back as the newest step, restorable to the trained parameters."""
  toy_config.total_steps = 4
  toy_config.checkpoint.keep = 2
  toy_config.checkpoint.every_steps = 2
  toy_config.checkpoint.best_metric = "val/toy/loss"
  toy_config.checkpoint.best_mode = "min"
  toy_config.evals = {"toy": {"type": "tests.toy_system", "every": 2}}
  monkeypatch.setenv("FASHION_JAX_FAULT", "oserror:resave@4")
  monkeypatch.setattr(faults, "_done", set())
  with pytest.raises(OSError, match="resave"):
    loop.train_and_evaluate(toy_config, str(tmp_path), iterator_factory=toy_system.make_iterator)
  names = sorted(os.listdir(tmp_path / "checkpoints"))
  assert "4" + checkpoint_lib.MOVED_ASIDE in names and "4" not in names, names
  monkeypatch.delenv("FASHION_JAX_FAULT")
  # The reference: the same run without the fault, in another workdir.
  ref = loop.train_and_evaluate(toy_config, str(tmp_path / "ref"),
                                iterator_factory=toy_system.make_iterator)
  assert not glob.glob(str(tmp_path / "ref" / "checkpoints" / ("*" + checkpoint_lib.MOVED_ASIDE)))
  step, state, _ = _restore_params(str(tmp_path), ref.state)
  assert step == 4 and sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  for a, b in zip(jax.tree.leaves(jax.device_get(ref.state.params)),
                  jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
