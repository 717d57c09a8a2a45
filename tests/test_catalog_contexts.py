"""The synthetic catalog builds from every calling context and its worker pool never hangs.

`tfds.builder("synthetic_catalog", ...).download_and_prepare()` runs with rendering processes
from a plain script without an `if __name__ == "__main__"` guard, `python -c`, code on standard
input and a notebook kernel (nbclient): each in a subprocess that must exit within TIMEOUT_S,
print the split sizes and leave no fallback warning (the pool itself works there). The unguarded
script and standard input hung with multiprocessing's forkserver (workers re-imported the
caller's main: recursive pools, or the file '<stdin>') and run by default; `python -c`, the
notebook and the literal smoke idiom are slow (~8 s each idle, mostly importing TensorFlow).
The worker pool's failures (cannot start, a worker killed mid-build, a worker that hangs, a job
that raises) end in in-process rendering with a warning or in the job's own error, with the
same products.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import nbformat
import pytest
from nbclient import NotebookClient

from fashion_jax.data import catalog
from fashion_jax.data.builders import synthetic_catalog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # The machine is shared: generous, but a hang still fails the test.
# 130 + 2 + 2 + 3 * 2 = 140 products > 2 chunks: the size at which the builder uses its pool.
SIZES = dict(num_train=130, num_validation=2, num_test=2, num_probe=2)

_BUILD = """\
import json
import tensorflow_datasets as tfds
from fashion_jax.data.builders import synthetic_catalog
cfg = synthetic_catalog.SyntheticCatalogConfig(name="ctx", {sizes})
builder = tfds.builder("synthetic_catalog", config=cfg, data_dir={data_dir!r}, num_workers=2)
builder.download_and_prepare()
print("SPLITS", json.dumps({{k: v.num_examples for k, v in builder.info.splits.items()}}))
"""


def _code(data_dir):
  sizes = ", ".join(f"{k}={v}" for k, v in SIZES.items())
  return _BUILD.format(sizes=sizes, data_dir=str(data_dir))


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
  return env


def _run(cmd, cwd, stdin=None):
  """Runs cmd in its own session; kills the whole group (workers included) past TIMEOUT_S."""
  proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(stdin, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail(f"{cmd} did not exit within {TIMEOUT_S} s; output tail:\n{out[-3000:]}")
  return proc.returncode, out


def _check_built(out, data_dir):
  assert "bootstrapping phase" not in out, out[-3000:]
  assert "in-process" not in out, out[-3000:]  # No fallback: the pool works in this context.
  lines = [l for l in out.splitlines() if l.startswith("SPLITS ")]
  assert lines, out[-3000:]
  cfg = synthetic_catalog.SyntheticCatalogConfig(name="ctx", **SIZES)
  assert json.loads(lines[-1][len("SPLITS "):]) == cfg.split_sizes()
  info = os.path.join(data_dir, "synthetic_catalog", "ctx", "1.0.0", "dataset_info.json")
  assert os.path.exists(info)


def test_builds_from_a_plain_script_without_a_main_guard(tmp_path):
  script = tmp_path / "build.py"
  script.write_text(_code(tmp_path / "tfds"))
  rc, out = _run([sys.executable, str(script)], cwd=tmp_path)
  assert rc == 0, out[-3000:]
  _check_built(out, tmp_path / "tfds")


@pytest.mark.slow  # Worked before the WorkerPool too; ~8 s idle, ~25 s loaded.
def test_builds_from_python_c(tmp_path):
  rc, out = _run([sys.executable, "-c", _code(tmp_path / "tfds")], cwd=tmp_path)
  assert rc == 0, out[-3000:]
  _check_built(out, tmp_path / "tfds")


def test_builds_from_code_on_standard_input(tmp_path):
  rc, out = _run([sys.executable, "-"], cwd=tmp_path, stdin=_code(tmp_path / "tfds"))
  assert rc == 0, out[-3000:]
  _check_built(out, tmp_path / "tfds")


@pytest.mark.slow  # Worked before the WorkerPool too; ~8 s idle, ~25 s loaded.
def test_builds_from_a_notebook_kernel(tmp_path, monkeypatch):
  for k, v in _env().items():
    monkeypatch.setenv(k, v)
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_code(tmp_path / "tfds"))])
  t0 = time.monotonic()
  NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert time.monotonic() - t0 < TIMEOUT_S
  outputs = nb.cells[0].outputs
  out = "".join(o.get("text", "") for o in outputs)
  assert not [o for o in outputs if o.output_type == "error"], outputs
  _check_built(out, tmp_path / "tfds")


@pytest.mark.slow
def test_smoke_idiom_from_a_plain_script(tmp_path):
  """The README idiom verbatim (smoke config, default workers) from an unguarded script."""
  script = tmp_path / "build.py"
  script.write_text(textwrap.dedent(f"""\
      import tensorflow_datasets as tfds
      from fashion_jax.data.builders import synthetic_catalog
      builder = tfds.builder("synthetic_catalog/smoke", data_dir={str(tmp_path / "tfds")!r})
      builder.download_and_prepare()
      print("NUM_TRAIN", builder.info.splits["train"].num_examples)
      """))
  rc, out = _run([sys.executable, str(script)], cwd=tmp_path)
  assert rc == 0, out[-3000:]
  assert "bootstrapping phase" not in out and "in-process" not in out, out[-3000:]
  assert "NUM_TRAIN 2000" in out, out[-3000:]


# Worker-pool failures, in process. Targets below run in the pool's workers (imported there by
# module path); `pid` is the test process, so they misbehave only inside a worker.


def _hang_in_worker(args):
  pid, x = args
  if os.getpid() != pid:
    time.sleep(3600)
  return x * 2


def _exit_in_worker(args):
  pid, x = args
  if os.getpid() != pid:
    os._exit(3)
  return x * 2


def _raise(args):
  raise ValueError(f"bad job {args}")


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # A zombie is dead.
    return f.read().split(")")[-1].split()[0] != "Z"


def _serial(split, n, seed=0, image_size=64):
  return [kv for s in range(0, n, synthetic_catalog._CHUNK)
          for kv in synthetic_catalog._render_chunk(
              (split, s, min(synthetic_catalog._CHUNK, n - s), seed, image_size))]


def _same_products(got, want):
  assert [k for k, _ in got] == [k for k, _ in want]
  for (_, a), (_, b) in zip(got, want):
    assert a["images"] == b["images"] and a["title"] == b["title"], a["product_id"]


def _build_train(tmp_path, n=130):
  cfg = synthetic_catalog.SyntheticCatalogConfig(name="fb", num_train=n, num_validation=2,
                                                 num_test=2, num_probe=2)
  builder = synthetic_catalog.SyntheticCatalog(config=cfg, data_dir=str(tmp_path), num_workers=2)
  gens = builder._split_generators(None)
  got = list(gens["train"])
  for split in catalog.SPLITS[1:]:
    list(gens[split])
  return got


def test_pool_that_cannot_start_renders_in_process(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
  with caplog.at_level(logging.WARNING):
    got = _build_train(tmp_path)
  _same_products(got, _serial("train", 130))
  assert "no-such-python" in caplog.text and "in-process" in caplog.text, caplog.text


def test_worker_killed_mid_build_renders_the_rest_in_process(caplog):
  pool = synthetic_catalog.WorkerPool(synthetic_catalog._render_chunk, num_workers=2)
  jobs = [("train", s, 16, 0, 64) for s in range(0, 96, 16)]
  try:
    it = pool.imap(jobs)
    got = [next(it)]
    os.kill(pool.pids[1], signal.SIGKILL)
    with caplog.at_level(logging.WARNING):
      got += list(it)
  finally:
    pool.close()
  _same_products([kv for chunk in got for kv in chunk], _serial("train", 96))
  assert "exit" in caplog.text and "in-process" in caplog.text, caplog.text


def test_hung_worker_is_timed_out(caplog):
  pool = synthetic_catalog.WorkerPool(_hang_in_worker, num_workers=2, timeout_s=3)
  t0 = time.monotonic()
  try:
    with caplog.at_level(logging.WARNING):
      got = list(pool.imap([(os.getpid(), x) for x in range(5)]))
  finally:
    pool.close()
  assert got == [0, 2, 4, 6, 8]
  assert time.monotonic() - t0 < 60
  assert "3 s" in caplog.text and "in-process" in caplog.text, caplog.text
  assert all(not _alive(pid) for pid in pool.pids)


def test_dead_worker_is_noticed_at_once(caplog):
  pool = synthetic_catalog.WorkerPool(_exit_in_worker, num_workers=2, timeout_s=TIMEOUT_S)
  t0 = time.monotonic()
  with caplog.at_level(logging.WARNING):
    got = list(pool.imap([(os.getpid(), x) for x in range(5)]))
  pool.close()
  assert got == [0, 2, 4, 6, 8]
  assert time.monotonic() - t0 < TIMEOUT_S / 2
  assert "exit code 3" in caplog.text, caplog.text


def test_a_job_error_is_raised_as_itself():
  pool = synthetic_catalog.WorkerPool(_raise, num_workers=2)
  try:
    with pytest.raises(ValueError, match="bad job 0"):
      list(pool.imap(range(3)))
  finally:
    pool.close()


def test_pool_rejects_a_target_that_workers_cannot_import():
  with pytest.raises(ValueError, match="module-level function of an importable module"):
    synthetic_catalog.WorkerPool(lambda x: x, num_workers=2)

