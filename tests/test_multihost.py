"""Multi-host training: 2 processes x 4 CPU devices == 1 process x 8 devices; failures are bounded.

Each multi-process run is two `python -m tests.test_multihost` subprocesses (launch/train.py's
main with a deterministic input, `--config.distributed=True`, jax.distributed on a free
localhost port, gloo collectives), each with 4 fake CPU devices. The reference is the same
config trained in this pytest process on its 8 devices. The input (`make_iterator`): global
batch k is a fixed function of k; process p feeds rows [p * B/2, (p + 1) * B/2), so the global
batch the trainer assembles from the two host batches equals the reference's batch.

Checked:
  * FashionCLIP and FashionViL (all six tasks summed, so every task runs each step): per-step
    train losses (process 0's TensorBoard events) and the final parameters (the final orbax
    checkpoint, written by both processes, restored here onto 8 devices) equal the reference
    within 1e-5.
  * kill -9 of process 1 after checkpoint 2: process 0 exits non-zero with the distributed
    runtime's message naming the dead task, within the heartbeat timeout plus a margin.
  * the same workdir restarted with two processes resumes from checkpoint 2 and ends with the
    reference's losses and parameters.
  * SIGTERM to process 1 only: both processes stop after the same step (JAX's preemption sync
    point), save that checkpoint together and exit 0.
  * process 1 hangs (alive, heartbeats flowing) in its input: the step watchdog stops the job
    with exit status 75 and its message.
"""

import functools
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), REPO)
TOTAL = 4            # Train steps of every run.
CKPT_EVERY = 2
HEARTBEAT_S = 20     # Heartbeat / shutdown timeouts of the failure tests.
# Other runs: long enough that a process starved of CPU on an overloaded machine (its heartbeat
# thread included) is not declared dead.
QUIET_HEARTBEAT_S = 600
RUN_TIMEOUT_S = 900  # Hard bound on any subprocess run (a hang fails the test, never the suite).
# CPU collectives (gloo) create a communicator at the first use of each collective with a FIXED
# 30 s rendezvous (gloo::rendezvous::Context's default; not configurable in jax 0.10.2): when one
# process reaches its first step more than 30 s after the other (compilation on a heavily shared
# machine), both fail with this error. Runs that hit it are rerun once. GPU (NCCL) and TPU do not
# have this window.
GLOO_RENDEZVOUS_ERROR = "Gloo context initialization failed"
_COMPILE_CACHE = {}  # 'dir': a persistent compilation cache shared by every subprocess run.

ATTRIBUTES = [("red", 9), ("blue", 8), ("cotton", 7), ("silk scarf", 5)]


# ---------------------------------------------------------------------------------------------
# Configs (`--config=tests/test_multihost.py:fashionclip` or `:fashionvil,<attributes file>`).
# ---------------------------------------------------------------------------------------------
def _load_config_file(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "fashionclip"):
  """Tiny FashionCLIP / FashionViL configs sized for 2 shared CPU cores."""
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  name, _, attributes_path = arg.partition(",")
  if name == "fashionclip":
    c = _load_config_file("fashionclip", "smoke")
    c.data.image_size = 32
    c.data.max_len = 16
    c.model.projection_dim = 16
    c.model.vision = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8)
    c.model.text = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64)
    c.batch_size = 16
  elif name == "fashionvil":
    c = _load_config_file("fashionvil", "smoke")
    c.data.image_size = 32
    c.data.max_len = 12
    c.data.patch_mask = dict(grid=2, count=1, min_block=1)
    c.data.attributes = attributes_path
    c.data.vq_codes = "unused-the-test-feeds-codes"
    c.model.bert = dict(variant="tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                        max_position=32, dropout_rate=0.1, attention_dropout_rate=0.1)
    c.model.num_codes = 16
    c.objective.mode = "sum"   # Every task contributes to every step.
    c.batch_size = 8
  else:
    raise ValueError(f"tests/test_multihost.py config: unknown {name!r}.")
  c.total_steps = TOTAL
  c.optimizer.schedule.warmup_steps = 1
  c.evals = {}
  c.checkpoint = dict(every_steps=CKPT_EVERY, keep=5, best_metric=None)
  c.log_every_steps = 1
  return config_check.with_defaults(c)


# ---------------------------------------------------------------------------------------------
# Input: global batch k is a function of k; each process feeds its contiguous slice of rows.
# ---------------------------------------------------------------------------------------------
def global_batch_at(system, config, step):
  """Global numpy batch number `step`: random images, token ids and task fields."""
  rng = np.random.default_rng([7, step])
  b = system.dummy_batch(config.batch_size)
  n, length = config.batch_size, config.data.max_len
  for key in ("image", "image2"):
    if key in b:
      b[key] = rng.integers(0, 256, b[key].shape, dtype=np.uint8)
  lengths = rng.integers(4, length + 1, n)
  mask = np.arange(length)[None] < lengths[:, None]
  if config.system == "fashionclip":
    from fashion_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    words = ["red", "navy", "striped", "linen", "shirt", "dress", "loafers", "wool", "bag"]
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(n)]
    b["text"] = np.asarray(tokenizers.get_tokenizer("clip", "", length)(texts), np.int32)
    return b
  text = np.where(mask, rng.integers(5, 200, (n, length)), 0).astype(np.int32)
  text[:, 0] = 2
  b["text"], b["text_mask"] = text, mask
  sel = mask & (rng.random((n, length)) < 0.3) & (np.arange(length) > 0)
  b["mlm_ids"] = np.where(sel, 4, text).astype(np.int32)
  b["mlm_labels"] = np.where(sel, text, -1).astype(np.int32)
  patches = b["patch_mask"].shape[1]
  b["patch_mask"] = np.zeros((n, patches), bool)
  b["patch_mask"][np.arange(n), rng.integers(0, patches, n)] = True
  b["vq_codes"] = rng.integers(0, config.model.num_codes, (n, patches)).astype(np.int32)
  b["attributes"] = rng.random(b["attributes"].shape) < 0.4
  return b


class HostIterator:
  """This process's rows of the global stream; `position` = batches consumed.

  Failure injection for the subprocess tests (environment, process MH_VICTIM only): at
  position MH_DIE_AT, once the directory MH_DIE_AFTER exists (a finalised checkpoint), write
  the time to MH_STAMP and SIGKILL this process; at position MH_TERM_AT, SIGTERM it; at
  position MH_HANG_AT, sleep forever.
  """

  def __init__(self, config, start_step, process_index, process_count):
    from fashion_jax import systems  # pylint: disable=g-import-not-at-top
    self.config, self.system = config, systems.get_system(config)
    self.position = self.start_step = start_step
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self):
    return self

  def _inject(self):
    env = os.environ
    if str(self.process_index) != env.get("MH_VICTIM"):
      return
    if str(self.position) == env.get("MH_DIE_AT"):
      t0 = time.time()
      while not os.path.isdir(env["MH_DIE_AFTER"]):
        if time.time() - t0 > 120:
          raise TimeoutError(f"{env['MH_DIE_AFTER']} never appeared.")
        time.sleep(0.05)
      with open(env["MH_STAMP"], "w") as f:
        f.write(repr(time.time()))
      os.kill(os.getpid(), signal.SIGKILL)
    if str(self.position) == env.get("MH_TERM_AT"):
      os.kill(os.getpid(), signal.SIGTERM)
    if str(self.position) == env.get("MH_HANG_AT"):
      while True:
        time.sleep(1000)

  def __next__(self):
    if self.position == self.start_step and self.process_count > 1:
      # Line the processes up before the first step (see GLOO_RENDEZVOUS_ERROR): a barrier of
      # the coordination service, which has no 30 s window. Test-only: the private client is
      # what orbax's own barriers use.
      from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
      jax_distributed.global_state.client.wait_at_barrier(f"mh_first_batch_{self.start_step}",
                                                          RUN_TIMEOUT_S * 1000)
    self._inject()
    batch = global_batch_at(self.system, self.config, self.position)
    self.position += 1
    rows = self.config.batch_size // self.process_count
    return {k: v[self.process_index * rows:(self.process_index + 1) * rows]
            for k, v in batch.items()}


def make_iterator(config, *, start_step=0, process_index=None, process_count=None):
  return HostIterator(config, start_step, process_index or 0, process_count or 1)


# ---------------------------------------------------------------------------------------------
# Helpers of the tests.
# ---------------------------------------------------------------------------------------------
def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_pair(config_arg, workdir, log_dir, *flags, env_extra=None):
  """Starts the two processes; returns [(Popen, log path)] for process 0 and 1."""
  port = _free_port()
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONUNBUFFERED="1", **(env_extra or {}))
  if "dir" in _COMPILE_CACHE:  # The pair runs compile the same programs: compile them once.
    env.update(JAX_COMPILATION_CACHE_DIR=_COMPILE_CACHE["dir"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  procs = []
  for pid in range(2):
    log = os.path.join(log_dir, f"process{pid}.log")
    cmd = [sys.executable, "-m", "tests.test_multihost", f"--config={THIS}:{config_arg}",
           f"--workdir={workdir}", "--config.distributed=True",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={pid}",
           "--initialization_timeout_s=300", *flags]
    with open(log, "w") as f:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT),
                    log))
  return procs


def _wait_all(procs, timeout=RUN_TIMEOUT_S):
  """Waits for every process; returns [(returncode, exit time, log text)].

  Processes still running at the timeout (or when the test is interrupted) are killed.
  """
  t0, out = time.time(), {}
  try:
    while len(out) < len(procs):
      for i, (p, log) in enumerate(procs):
        if i not in out and p.poll() is not None:
          out[i] = (p.returncode, time.time())
      if time.time() - t0 > timeout:
        logs = "\n".join(open(log).read()[-3000:] for _, log in procs)
        raise AssertionError(f"Processes still running after {timeout} s:\n{logs}")
      time.sleep(0.05)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(out[i][0], out[i][1], open(log).read()) for i, (_, log) in enumerate(procs)]


def _pair_with_rerun(config_arg, workdir, log_dir, *flags, env_extra=None, fresh=True):
  """Starts and waits for a pair; reruns it once after GLOO_RENDEZVOUS_ERROR (see above).

  `fresh`: the run starts from an empty workdir (emptied again before the rerun).
  """
  results = _wait_all(_start_pair(config_arg, workdir, log_dir, *flags, env_extra=env_extra))
  if any(GLOO_RENDEZVOUS_ERROR in text for _, _, text in results):
    print(f"{GLOO_RENDEZVOUS_ERROR} (processes more than 30 s apart): rerunning the pair once.")
    if fresh:
      shutil.rmtree(workdir, ignore_errors=True)
    results = _wait_all(_start_pair(config_arg, workdir, log_dir, *flags, env_extra=env_extra))
  return results


def _run_pair(config_arg, workdir, log_dir, *flags, env_extra=None, fresh=True):
  results = _pair_with_rerun(config_arg, workdir, log_dir,
                             f"--heartbeat_timeout_s={QUIET_HEARTBEAT_S}", *flags,
                             env_extra=env_extra, fresh=fresh)
  for pid, (rc, _, text) in enumerate(results):
    assert rc == 0, f"process {pid} exited {rc}:\n{text[-5000:]}"
  return results


def _losses(workdir):
  """{step: train/loss} from the TensorBoard events in `workdir` (newest file wins)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")),
                     key=os.path.getmtime):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/loss":
          out[int(event.step)] = float(tf.make_ndarray(value.tensor))
  return out


def _checkpoint_params(workdir, step, like):
  """Params of checkpoint `step` of `workdir`, laid out as the arrays of `like`."""
  from fashion_jax.checkpoint import manager as checkpoint_lib  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  try:
    assert step in ckpt.all_steps(), (step, ckpt.all_steps())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return jax.device_get(ckpt.restore_params(step, abstract))
  finally:
    ckpt.close()


def _assert_trees_close(got, want, atol=1e-5):
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for (path, g), w in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _config_arg(name, tmp_path_factory):
  if name == "fashionclip":
    return name
  from fashion_jax.data import attributes  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("attrs") / "attributes.txt")
  attributes.save_vocabulary(ATTRIBUTES, path)
  return f"{name},{path}"


@functools.lru_cache(maxsize=None)
def _reference_cache():
  return {}


def reference_run(name, tmp_path_factory):
  """The 1-process, 8-device run of `name`: (config arg, workdir, losses, host params, state)."""
  cache = _reference_cache()
  if name not in cache:
    from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
    arg = _config_arg(name, tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp(f"ref_{name}"))
    assert jax.device_count() == 8
    result = loop.train_and_evaluate(get_config(arg), workdir, iterator_factory=make_iterator)
    cache[name] = (arg, workdir, _losses(workdir), result.state.params)
  return cache[name]


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  _COMPILE_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _COMPILE_CACHE.clear()


@pytest.mark.slow  # Each pair: two processes' start-up, compiles and checkpoints (30-70 s).
@pytest.mark.parametrize("name", ["fashionclip", "fashionvil"])
def test_two_processes_equal_one_process_with_8_devices(name, tmp_path, tmp_path_factory):
  arg, _, want_losses, want_params = reference_run(name, tmp_path_factory)
  workdir = str(tmp_path / "run")
  results = _run_pair(arg, workdir, str(tmp_path))
  # Process 0 alone writes the run's files and prints the summary.
  assert "Finished at step 4" in results[0][2]
  assert "Finished at step" not in results[1][2]
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
  got_losses = _losses(workdir)
  assert sorted(got_losses) == sorted(want_losses) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([got_losses[s] for s in sorted(got_losses)],
                             [want_losses[s] for s in sorted(want_losses)], atol=1e-5, rtol=0)
  _assert_trees_close(_checkpoint_params(workdir, TOTAL, want_params), want_params)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
  """FashionCLIP pair; process 1 is SIGKILLed when it would start step 4 (after ckpt 2)."""
  tmp = tmp_path_factory.mktemp("killed")
  workdir = str(tmp / "run")
  stamp = str(tmp / "killed_at")
  results = _pair_with_rerun(
      "fashionclip", workdir, str(tmp), f"--heartbeat_timeout_s={HEARTBEAT_S}",
      f"--shutdown_timeout_s={HEARTBEAT_S}",
      env_extra=dict(MH_VICTIM="1", MH_DIE_AT="3", MH_STAMP=stamp,
                     MH_DIE_AFTER=os.path.join(workdir, "checkpoints", str(CKPT_EVERY))))
  with open(stamp) as f:
    killed_at = float(f.read())
  return workdir, killed_at, results


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_killing_one_process_stops_the_other_with_a_clear_error(killed_run):
  _, killed_at, results = killed_run
  assert results[1][0] == -signal.SIGKILL
  rc, exited_at, text = results[0]
  assert rc != 0, text[-3000:]
  assert re.search(r"Terminating process because the JAX distributed service detected fatal "
                   r"errors.*another task died", text), text[-3000:]
  assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1", text), text[-3000:]
  detection_s = exited_at - killed_at
  print(f"survivor exited {rc} {detection_s:.1f} s after the kill "
        f"(heartbeat timeout {HEARTBEAT_S} s)")
  assert detection_s < HEARTBEAT_S + 60  # Bounded: the heartbeat timeout plus start-up slack.


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_restart_after_a_death_resumes_from_the_last_checkpoint(killed_run, tmp_path,
                                                                tmp_path_factory):
  workdir = killed_run[0]
  from fashion_jax.checkpoint import manager as checkpoint_lib  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  assert ckpt.all_steps() == [CKPT_EVERY]
  ckpt.close()
  _, _, want_losses, want_params = reference_run("fashionclip", tmp_path_factory)
  results = _run_pair("fashionclip", workdir, str(tmp_path), fresh=False)
  assert "Resumed from checkpoint 2" in results[0][2]
  got = _losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(CKPT_EVERY + 1, TOTAL + 1)],
                             [want_losses[s] for s in range(CKPT_EVERY + 1, TOTAL + 1)],
                             atol=1e-5, rtol=0)
  _assert_trees_close(_checkpoint_params(workdir, TOTAL, want_params), want_params)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
  workdir = str(tmp_path / "run")
  results = _run_pair("fashionclip", workdir, str(tmp_path),
                      env_extra=dict(MH_VICTIM="1", MH_TERM_AT="1"))
  match = re.search(r"Finished at step (\d+) \(preempted\)", results[0][2])
  assert match, results[0][2][-3000:]
  step = int(match.group(1))
  assert 2 <= step < TOTAL
  from fashion_jax.checkpoint import manager as checkpoint_lib  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10)
  assert ckpt.latest_step() == step   # Saved by both processes (orbax finalises only then).
  ckpt.close()


@pytest.mark.slow
def test_a_hung_process_is_stopped_by_the_step_watchdog(tmp_path):
  from fashion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  step_timeout = 45
  results = _pair_with_rerun("fashionclip", str(tmp_path / "run"), str(tmp_path),
                             f"--step_timeout_s={step_timeout}",
                             f"--heartbeat_timeout_s={QUIET_HEARTBEAT_S}",
                             env_extra=dict(MH_VICTIM="1", MH_HANG_AT="3"))
  codes = [r[0] for r in results]
  assert all(c != 0 for c in codes), codes
  fired = [pid for pid, (rc, _, text) in enumerate(results)
           if rc == distributed.WATCHDOG_EXIT_CODE and re.search(
               rf"Watchdog: process {pid} of 2 made no progress for {step_timeout} s after "
               r"step 3 done", text)]
  assert fired, "\n".join(text[-3000:] for _, _, text in results)


def test_watchdog_reports_the_last_progress_and_stays_quiet_while_kicked():
  from fashion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  fired = []
  with distributed.Watchdog(0.3, on_timeout=fired.append) as dog:
    for step in range(5):          # Kicked more often than the timeout: silent.
      dog.kick(f"step {step} done")
      time.sleep(0.1)
    assert not fired
    time.sleep(1.0)                # Silent for longer than the timeout: fires once.
  assert len(fired) == 1 and "no progress for 0.3 s after step 4 done" in fired[0], fired
  with distributed.Watchdog(0, on_timeout=fired.append) as off:
    off.kick("step 1 done")
    time.sleep(0.1)
  assert len(fired) == 1


def test_incomplete_or_bad_distributed_settings_are_refused(monkeypatch):
  from fashion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  for env in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(env, raising=False)
  with pytest.raises(ValueError, match=r"incomplete.*'process_id': None"):
    distributed.initialize(True, coordinator_address="localhost:1234", num_processes=2)
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    distributed.initialize(True, coordinator_address="localhost:1234", num_processes=2)
  with pytest.raises(ValueError, match="heartbeat_timeout_s=0 must be a positive"):
    distributed.initialize(True, heartbeat_timeout_s=0)
  assert distributed.initialize(False) is False


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import train  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(train.main, iterator_factory=make_iterator))
