"""TFDS builder of the built-in synthetic fashion catalog (offline, deterministic).

Build:
  python -m launch.build_data --dataset=synthetic_catalog/smoke [--data_dir=DIR]
  python -m launch.build_data --dataset=synthetic_catalog/base --num_workers=16

One example = one product in the schema of fashion_jax/data/schema.py (2-4 JPEG views, title,
description, tag fields) plus the catalog's ground truth as Text fields (catalog.EXTRA_FIELDS):
primary_color, secondary_color, pattern, material, sleeve, neckline, length, heel, strap ('' where
they do not apply), views ("front,back,..."), novelty (which probe promise the product tests) and
logo_box ("ymin xmin ymax xmax" of the brand mark in the front view, as fractions of the size).

Splits: train, validation, test, holdout_category, holdout_brand, improbable; what each promises is
in fashion_jax/data/catalog.py. Images are encoded with PIL at JPEG quality 95 without chroma
subsampling, so the 1-pixel cells of the logo at 64 px survive.

Rendering and JPEG encoding run in `num_workers` processes (builder kwarg, default: all CPUs;
in-process for builds of at most 128 products); products are seeded individually, so the dataset
does not depend on the number of workers or on the in-process fallback. The workers are a
WorkerPool: fresh interpreters started as `python -c` that import this module and never the
caller's `__main__`, so `tfds.builder("synthetic_catalog/smoke").download_and_prepare()` works
the same from a script without an `if __name__ == "__main__"` guard, `python -c`, standard input
or a notebook kernel.
"""

import dataclasses
import importlib
import io
import logging
import marshal
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref

import tensorflow_datasets as tfds
from PIL import Image

from fashion_jax.data import catalog
from fashion_jax.data import render
from fashion_jax.data import schema

JPEG_QUALITY = 95
_CHUNK = 64
# Longest wait for one result of a WorkerPool (a worker's start-up included): far above a 64-product
# chunk at 256 px (~2 s on one idle core), so only a hung or wedged worker reaches it.
WORKER_TIMEOUT_S = 600.0


@dataclasses.dataclass
class SyntheticCatalogConfig(tfds.core.BuilderConfig):
  """Sizes of a build. num_probe is the size of each of the three probe splits."""
  image_size: int = 64
  num_train: int = 2000
  num_validation: int = 300
  num_test: int = 500
  num_probe: int = 250
  seed: int = 0

  def split_sizes(self):
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test,
            "holdout_category": self.num_probe, "holdout_brand": self.num_probe,
            "improbable": self.num_probe}


def encode_jpeg(image):
  """uint8 [H, W, 3] -> JPEG bytes (quality 95, 4:4:4)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
  return buf.getvalue()


def _render_chunk(args):
  """Worker: products [start, start + n) of a split -> [(key, example with JPEG bytes)]."""
  split, start, n, seed, image_size = args
  out = []
  for p in render.generate_products(split, n, seed=seed, image_size=image_size, start=start):
    p["images"] = [encode_jpeg(im) for im in p["images"]]
    out.append((p["product_id"], p))
  return out


# Frame: 8-byte big-endian length, then a marshal dump. Jobs and rendered products are plain data
# (str, bytes, int, list, tuple, dict), so marshal carries them and no code runs on load.
_HEADER = struct.Struct(">Q")
_WORKER_MAIN = ("from fashion_jax.data.builders import synthetic_catalog; "
                "synthetic_catalog._serve_worker()")


class _WorkerFailed(Exception):
  """A WorkerPool worker could not start, died, hung or could not be talked to."""


def _write_frame(f, obj):
  data = marshal.dumps(obj)
  f.write(_HEADER.pack(len(data)))
  f.write(data)
  f.flush()


def _read_frame(f):
  """The next object on binary stream `f`; EOFError at (or cut by) the end of the stream."""
  header = f.read(_HEADER.size)
  if len(header) < _HEADER.size:
    raise EOFError
  (n,) = _HEADER.unpack(header)
  data = f.read(n)
  if len(data) < n:
    raise EOFError
  return marshal.loads(data)


def _import_path(fn):
  """'module:name' of a module-level function, which a fresh interpreter can import."""
  module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
  if not module or module == "__main__" or not name or "." in name or "<" in name:
    raise ValueError(
        f"WorkerPool target {fn!r} (module {module!r}, name {name!r}) must be a module-level "
        "function of an importable module: the workers import it by name and never import the "
        "caller's __main__")
  return f"{module}:{name}"


def _resolve(path):
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


def _serve_worker():
  """A WorkerPool worker's loop (`python -c _WORKER_MAIN 'module:function'`).

  Reads marshalled jobs on stdin until EOF and writes (True, function(job)) or (False, traceback)
  for each, in order, on the original stdout; whatever the job or an import prints goes to
  stderr instead. SIGINT is ignored: Ctrl-C stops the parent, whose exit closes stdin.
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  fn = _resolve(sys.argv[1])
  inp = sys.stdin.buffer
  while True:
    try:
      job = _read_frame(inp)
    except EOFError:
      return
    try:
      reply = (True, fn(job))
    except Exception:  # pylint: disable=broad-except  # Sent to the parent, which reruns the job.
      reply = (False, traceback.format_exc())
    _write_frame(out, reply)


def _read_replies(stream, replies):
  """Reader thread of one worker: its replies, then None at EOF, onto the `replies` queue."""
  try:
    while True:
      replies.put(_read_frame(stream))
  except Exception:  # pylint: disable=broad-except  # EOF, a cut or garbled frame: worker gone.
    replies.put(None)
  finally:
    stream.close()


def _shutdown(procs, grace_s):
  """Closes the workers' stdin (they exit at EOF); kills any still running after grace_s."""
  for p in procs:
    try:
      p.stdin.close()
    except OSError:
      pass
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


class WorkerPool:
  """Processes that compute `target(job)` for a stream of jobs; never hangs, never re-imports main.

  Each worker is a fresh interpreter (`sys.executable -c ...`, the caller's sys.path as PYTHONPATH)
  that imports `target` by module path, so it works the same whatever started the caller: a script
  without an `if __name__ == "__main__"` guard, `python -c`, standard input, a notebook kernel.
  multiprocessing's spawn and forkserver re-import the caller's main module in every worker
  (an unguarded script then starts pools recursively, code on stdin is looked up as the file
  '<stdin>'), and fork is unsafe once JAX or TF threads run; a subprocess pool has neither problem.

  imap gives target(job) in job order. Worker i takes jobs i, i + n, ... with at most two in
  flight each, so results in memory stay bounded. Every wait is bounded by timeout_s. If the
  pool cannot start, a worker dies, hangs past timeout_s or a job raises there, the workers are
  stopped, a warning says why, and this and later imap calls run the remaining jobs in-process:
  the same results for a deterministic target (a job's own error is then raised as itself).
  Workers start at the first imap; close() (or garbage collection, or interpreter exit) stops
  them. One imap at a time.
  """

  def __init__(self, target, num_workers, timeout_s=WORKER_TIMEOUT_S):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    self._path = _import_path(target)
    self._target = target
    self.num_workers = num_workers
    self.timeout_s = timeout_s
    self.pids = []  # Of the workers last started (kept after they stop).
    self._procs = []
    self._replies = []
    self._finalizer = None
    self._broken = None  # Why the pool failed; from then on every job runs in-process.
    self._busy = False

  def _start(self):
    path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    cmd = [sys.executable, "-c", _WORKER_MAIN, self._path]
    procs, replies = [], []
    try:
      for _ in range(self.num_workers):
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env))
    except OSError as e:
      _shutdown(procs, 0.0)
      raise _WorkerFailed(f"cannot start {sys.executable!r}: {e}") from e
    for p in procs:
      replies.append(queue.Queue())
      threading.Thread(target=_read_replies, args=(p.stdout, replies[-1]), daemon=True,
                       name=f"WorkerPool-{p.pid}").start()
    self._procs, self._replies, self.pids = procs, replies, [p.pid for p in procs]
    self._finalizer = weakref.finalize(self, _shutdown, procs, 5.0)

  def _stop(self, grace_s):
    if self._finalizer is not None:
      self._finalizer.detach()
      _shutdown(self._procs, grace_s)
    self._procs, self._replies, self._finalizer = [], [], None

  def _gone(self, i):
    """The failure of worker i, whose pipes are closed or garbled."""
    p = self._procs[i]
    try:
      return _WorkerFailed(f"worker pid {p.pid} exited (exit code {p.wait(5.0)})")
    except subprocess.TimeoutExpired:
      return _WorkerFailed(f"worker pid {p.pid} closed its pipes or sent a garbled reply")

  def _send(self, i, job):
    try:
      _write_frame(self._procs[i].stdin, job)
    except OSError as e:
      raise self._gone(i) from e

  def _recv(self, i):
    try:
      reply = self._replies[i].get(timeout=self.timeout_s)
    except queue.Empty:
      raise _WorkerFailed(f"worker pid {self._procs[i].pid} sent no result in "
                          f"{self.timeout_s:g} s (timeout_s)") from None
    if reply is None:
      raise self._gone(i)
    return reply

  def _fail(self, reason, left):
    logging.warning("WorkerPool(%s, %d workers): %s; running the %d remaining jobs in-process "
                    "(same results).", self._path, self.num_workers, reason, left)
    self._broken = reason
    self._stop(0.0)

  def imap(self, jobs):
    """Yields target(job) for each of `jobs`, in order (see the class docstring)."""
    if self._busy:
      raise RuntimeError("WorkerPool.imap is already running: one imap at a time")
    self._busy = True
    jobs = list(jobs)
    n, sent, done = self.num_workers, 0, 0
    try:
      if self._broken is None and not self._procs:
        try:
          self._start()
        except _WorkerFailed as e:
          self._fail(str(e), len(jobs))
      while self._broken is None and done < len(jobs):
        try:
          while sent < len(jobs) and sent < done + 2 * n:
            self._send(sent % n, jobs[sent])
            sent += 1
          ok, value = self._recv(done % n)
        except _WorkerFailed as e:
          self._fail(str(e), len(jobs) - done)
          break
        if not ok:
          self._fail(f"job {done} raised in worker pid {self.pids[done % n]}:\n{value}",
                     len(jobs) - done)
          break
        yield value
        done += 1
      while done < len(jobs):
        yield self._target(jobs[done])
        done += 1
    finally:
      self._busy = False
      if done < len(jobs):  # Abandoned or raised: replies still in flight would be misread.
        self._stop(0.0)

  def close(self):
    """Stops the workers (each finishes its job, sees EOF and exits; killed after 30 s)."""
    self._stop(30.0)


class SyntheticCatalog(tfds.core.GeneratorBasedBuilder):
  """Synthetic fashion products with every attribute drawn and named (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 44 sub-categories, 48 brands, 6 splits."}
  BUILDER_CONFIGS = [
      SyntheticCatalogConfig(name="smoke", description="2k train products, 64 px (CPU smoke runs)",
                             image_size=64, num_train=2000, num_validation=300, num_test=500,
                             num_probe=250),
      SyntheticCatalogConfig(name="base", description="50k train products, 256 px",
                             image_size=256, num_train=50000, num_validation=2000, num_test=5000,
                             num_probe=1000),
      SyntheticCatalogConfig(name="large", description="100k train products, 64 px (search "
                             "benchmarks at catalog scale with the smoke models)",
                             image_size=64, num_train=100000, num_validation=300, num_test=500,
                             num_probe=250),
      SyntheticCatalogConfig(name="tiny", description="a few products per split, 64 px (tests)",
                             image_size=64, num_train=24, num_validation=8, num_test=8,
                             num_probe=6),
  ]
  DEFAULT_CONFIG_NAME = "smoke"

  def __init__(self, *, num_workers=None, **kwargs):
    super().__init__(**kwargs)
    if num_workers is not None and num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self._num_workers = num_workers or os.cpu_count() or 1

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=schema.product_features(extra_text_fields=catalog.EXTRA_FIELDS),
        homepage="https://github.com/fashion_jax (built-in, rendered locally)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    sizes = cfg.split_sizes()
    jobs = {split: [(split, s, min(_CHUNK, n - s), cfg.seed, cfg.image_size)
                    for s in range(0, n, _CHUNK)] for split, n in sizes.items()}
    # One pool serves every split (tfds consumes the generators one after the other); the last
    # generator to finish closes it.
    pool = None
    workers = min(self._num_workers, sum(map(len, jobs.values())))
    if workers > 1 and sum(sizes.values()) > 2 * _CHUNK:
      pool = WorkerPool(_render_chunk, workers)
    remaining = [len(sizes)]

    def done():
      remaining[0] -= 1
      if pool is not None and not remaining[0]:
        pool.close()

    return {split: self._generate_examples(split_jobs, pool, done)
            for split, split_jobs in jobs.items()}

  def _generate_examples(self, jobs, pool, done):
    chunks = pool.imap(jobs) if pool is not None else map(_render_chunk, jobs)
    for chunk in chunks:
      yield from chunk
    done()
