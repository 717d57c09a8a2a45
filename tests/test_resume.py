"""Checkpoint/resume behaviour of the trainer: kill -9, SIGTERM, the NaN guard, keep-best.

The subprocess runs are `python -m tests.toy_system` (launch.train's main with the toy input),
on the same 8 fake CPU devices and the same mesh as the in-process reference run.
"""

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

from fashion_jax.train import checkpoint as checkpoint_lib
from fashion_jax.train import loop
from tests import toy_system

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


@pytest.mark.slow
def test_kill9_resume_is_bitwise_equal(tmp_path, reference):
  ref_host, ref_state = reference
  workdir = str(tmp_path / "run")
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  slow = "--config.data.sleep_s=0.15"
  log = open(tmp_path / "log.txt", "w")

  # Kill 1: the moment a checkpoint directory (temporary or final) appears: mid-write or just
  # after it.
  proc = _start(workdir, slow, log=log)
  _wait(lambda: _any_ckpt_dir(workdir, 0))
  time.sleep(rng.uniform(0.0, 0.05))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = _steps(workdir)

  # Kill 2: at a random moment after the rerun has finalized a newer checkpoint.
  proc = _start(workdir, slow, log=log)
  newest = first[-1] if first else 0
  _wait(lambda: _steps(workdir) and _steps(workdir)[-1] > newest)
  time.sleep(rng.uniform(0.0, 0.5))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  second = _steps(workdir)
  assert second[-1] < TOTAL, f"seed={seed}: run 2 finished before the kill"

  # Final rerun, same command: resumes from the newest complete checkpoint and finishes.
  with open(tmp_path / "log3.txt", "w") as log3:
    proc = _start(workdir, slow, log=log3)
    out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, f"seed={seed}: {out}"
  assert f"Finished at step {TOTAL}" in out
  assert f"Resumed from checkpoint {second[-1]} " in (tmp_path / "log3.txt").read_text()
  step, state, data = _restore_params(workdir, ref_state)
  assert step == TOTAL and data == {"step": TOTAL, "position": TOTAL}
  got = jax.device_get(state)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_host),
                          jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"seed={seed} kills at {first}/{second}: "
                                  f"{jax.tree_util.keystr(path)}")


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
  params, step, _ = loop.load_params(toy_config, str(tmp_path))
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
