r"""Approximate nearest-neighbour backends side by side: recall@k against exact search and speed.

    # Synthetic clustered embeddings (100k x 512), every backend, each over its search knob:
    python -m benchmarks.benchmark_search --num_items=100000 --out=/tmp/ann_100k.json
    # Real product embeddings: the 100k train products of synthetic_catalog/large embedded by a
    # model (here a random-init tiny CLIP with 512-d outputs), queries = held-out products:
    python -m benchmarks.benchmark_search --make_random_clip=/tmp/clip512
    python -m benchmarks.benchmark_search --write_embeddings=/tmp/emb --model=/tmp/clip512 \
        --data_dir=/tmp/tfds
    python -m benchmarks.benchmark_search --source=npy --items=/tmp/emb/items.npy \
        --queries=/tmp/emb/queries.npy --out=/tmp/ann_real.json
    # The figure, from any number of runs:
    python -m benchmarks.benchmark_search --plot=docs/ann_recall_qps.png \
        --plot_from=/tmp/ann_100k.json,/tmp/ann_real.json

Items (--source):
  mixture: unit vectors x = normalize(c + sigma g / sqrt(dim)), c one of `num_clusters` random
           unit centres, g ~ N(0, I) (a mixture of Gaussians on the sphere: many near-duplicates
           per style, like product embeddings grouped by sub-category and colour); queries are
           fresh draws of the same mixture.
  npy:     --items=FILE.npy [N, D] and --queries=FILE.npy [Q, D] (rows L2-normalised here).

Backends (--backends): exact (ours: fashion_jax.search.index.ExactIndex, the evaluator's jitted
top-k), ivf (ours: IVFIndex, JAX k-means + numpy list scans), and the FAISS kinds ivf_flat,
ivf_pq, ivf_pq_refine (ivf_pq keeping the full vectors: the nprobe PQ candidates' best
refine * k re-ranked exactly) and hnsw, built with index.PARAM_DEFAULTS overridden by
--params=kind:name=value,...; each searched over its search-time knobs: nprobe (IVF kinds),
nprobe x --refine (ivf_pq_refine: refine is a search-time parameter, so one index built with
refine = max(--refine) serves every value), efSearch (hnsw).

--index_cache=DIR saves each FAISS index built (DIR/<backend>.faiss, with its build time,
parameters and data description in DIR/<backend>.json) and reuses it when a later run asks for
the same backend, parameters and data: a long run (HNSW at 1M builds for tens of minutes) can be
resumed, or its build made by a separate process; the reported build time is the recorded one.

Measured, per number of cores in --cores (every thread of the process pinned to the first n
CPUs, faiss' OpenMP and the BLAS pools limited to n threads; builds use --build_cores):
  recall@k = mean |approx top-k ∩ exact top-k| / k over the queries;
  batched QPS: all queries in one call: the fastest of --repeats calls after a warm-up call;
  single QPS: 1 / the median time of one-query calls over the first --single_queries queries
    (fastest and median: the machine is shared, and a loaded core only ever slows a call);
  build seconds; index bytes: the saved file (exact: the vectors).
"""

import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import threadpoolctl

from fashion_jax.search import index as index_lib

_SOURCE = flags.DEFINE_enum("source", "mixture", ["mixture", "npy"], "Where the items come from.")
_N = flags.DEFINE_integer("num_items", 100000, "Items to index (mixture).")
_Q = flags.DEFINE_integer("num_queries", 1000, "Queries (mixture).")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension (mixture).")
_CLUSTERS = flags.DEFINE_integer("num_clusters", 1000, "Mixture components.")
_SIGMA = flags.DEFINE_float("sigma", 1.0, "Mixture noise scale (relative to the unit centre).")
_ITEMS = flags.DEFINE_string("items", None, "npy source: item embeddings [N, D].")
_QUERIES = flags.DEFINE_string("queries", None, "npy source: query embeddings [Q, D].")
_K = flags.DEFINE_integer("k", 10, "Top-k.")
_BACKENDS = flags.DEFINE_list("backends", ["exact", "ivf", "ivf_flat", "ivf_pq", "ivf_pq_refine",
                                           "hnsw"], "Backends to run.")
_PARAMS = flags.DEFINE_list("params", [], "Build parameters, kind:name=value (e.g. hnsw:M=16).")
_REFINE = flags.DEFINE_list("refine", ["1", "4", "16", "64"], "ivf_pq_refine: refine sweep "
                            "(re-rank refine * k PQ candidates exactly; search time).")
_NPROBE = flags.DEFINE_list("nprobe", ["1", "4", "16", "64", "256"],
                            "nprobe sweep (IVF kinds).")
_EF = flags.DEFINE_list("ef_search", ["10", "32", "64", "128", "256"],
                        "efSearch sweep (hnsw).")
_CORES = flags.DEFINE_list("cores", ["1", "2"], "Core counts to search with.")
_BUILD_CORES = flags.DEFINE_integer("build_cores", 1, "Cores to build with (on a loaded machine "
                                    "one thread builds faster than two: OpenMP barriers wait "
                                    "for descheduled threads).")
_BUILD_CORES_FOR = flags.DEFINE_list("build_cores_for", [], "Per-backend --build_cores, "
                                     "backend:n (e.g. hnsw:2: HNSW inserts in parallel with "
                                     "few barriers, unlike k-means).")
_SINGLE = flags.DEFINE_integer("single_queries", 50, "Queries timed one at a time.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed batched calls (the fastest counts).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_CACHE = flags.DEFINE_string("index_cache", None, "Save built FAISS indexes here and reuse them "
                             "(same backend, parameters and data; module docstring).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Draw recall vs batched QPS of --plot_from to this PNG.")
_PLOT_FROM = flags.DEFINE_list("plot_from", [], "JSON results to plot (one panel per file and "
                               "core count).")
_TABLE_FROM = flags.DEFINE_string("table_from", None, "Print a JSON result as markdown tables.")
_MAKE_CLIP = flags.DEFINE_string("make_random_clip", None, "Export a random-init tiny CLIP "
                                 "(64 px, 512-d embeddings) to this directory and stop.")
_WRITE_EMB = flags.DEFINE_string(
    "write_embeddings", None, "Embed synthetic_catalog/large with --model into this directory "
    "and stop: items.npy = the train split's images; queries.npy = the test split's images, "
    "then the test split's titles (held-out products).")
_MODEL = flags.DEFINE_string("model", None, "write_embeddings: model directory or workdir.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "write_embeddings: TFDS data dir.")
_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/large", "write_embeddings: dataset.")


def _normalize(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n, q, dim, clusters, sigma, seed, chunk=100000):
  """(items [n, dim], queries [q, dim]) from the mixture of the module docstring (float32,
  drawn in chunks so that 1M x 512 needs no float64 copy)."""
  rng = np.random.default_rng(seed)
  centres = _normalize(rng.normal(size=(clusters, dim)))

  def draw(m):
    out = np.empty((m, dim), np.float32)
    for a in range(0, m, chunk):
      b = min(m, a + chunk)
      g = rng.standard_normal((b - a, dim), dtype=np.float32)
      out[a:b] = _normalize(centres[rng.integers(0, clusters, b - a)] + sigma * g / np.sqrt(dim))
    return out
  return draw(n), draw(q)


def parse_params(specs) -> dict[str, dict[str, int]]:
  """['hnsw:M=16', ...] -> {'hnsw': {'M': 16}}; names are checked by index.resolve_params."""
  out = {}
  for spec in specs:
    try:
      kind, rest = spec.split(":", 1)
      name, value = rest.split("=", 1)
      out.setdefault(kind, {})[name] = int(value)
    except ValueError as e:
      raise app.UsageError(f"--params entry {spec!r} is not kind:name=integer.") from e
  return out


class Pinning:
  """Runs the whole process (every thread: XLA's pool, faiss' OpenMP, BLAS) on n CPUs."""

  def __init__(self):
    self.cpus = sorted(os.sched_getaffinity(0))
    self._limits = None

  def set(self, n: int) -> None:
    import faiss  # pylint: disable=g-import-not-at-top
    if n > len(self.cpus):
      raise app.UsageError(f"--cores {n} exceeds the {len(self.cpus)} CPUs available.")
    for tid in os.listdir("/proc/self/task"):
      try:
        os.sched_setaffinity(int(tid), self.cpus[:n])
      except OSError:  # A thread that just ended.
        pass
    faiss.omp_set_num_threads(n)
    if self._limits is not None:
      self._limits.restore_original_limits()
    self._limits = threadpoolctl.threadpool_limits(n)


def _index_bytes(index) -> int:
  if isinstance(index, index_lib.ExactIndex):
    return int(index.vectors.nbytes)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "index" + (".npz" if isinstance(index, index_lib.IVFIndex) else ""))
    index.save(path)
    return os.path.getsize(path)


def _batched_qps(index, queries, k, repeats, **kw):
  """(ids of the batched search, queries/s of the fastest of `repeats` timed calls)."""
  _, ids = index.search(queries, k, **kw)
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    index.search(queries, k, **kw)
    best = min(best, time.perf_counter() - t0)
  return ids, len(queries) / best


def _single_qps(index, queries, k, n, **kw) -> float:
  """1 / the median time of n one-query calls (the median: robust to a loaded machine)."""
  index.search(queries[:1], k, **kw)
  times = []
  for i in range(n):
    t0 = time.perf_counter()
    index.search(queries[i:i + 1], k, **kw)
    times.append(time.perf_counter() - t0)
  return 1.0 / float(np.median(times))


def _build(backend, items, params, seed):
  if backend == "exact":
    return index_lib.ExactIndex(items)  # Any size: its top-k walks the gallery in blocks.
  if backend == "ivf":
    p = params.get("ivf", {})
    return index_lib.IVFIndex.build(items, num_lists=p.get("nlist") or index_lib.default_nlist(
        len(items)), seed=seed)
  if backend == "ivf_pq_refine":
    return index_lib.build_index(items, "ivf_pq", seed=seed,
                                 **{**params.get("ivf_pq", {}),
                                    "refine": max(int(r) for r in _REFINE.value)})
  return index_lib.build_index(items, backend, seed=seed, **params.get(backend, {}))


def _build_or_load(backend, items, params, seed, source):
  """(index, build seconds): built, or read from --index_cache when a run with the same backend,
  resolved parameters and data (source, shape) saved one there."""
  kind = "ivf_pq" if backend == "ivf_pq_refine" else backend
  if not _CACHE.value or kind not in index_lib.FAISS_KINDS:
    t0 = time.perf_counter()
    index = _build(backend, items, params, seed)
    return index, time.perf_counter() - t0
  p = dict(params.get(kind, {}))
  if backend == "ivf_pq_refine":
    p["refine"] = max(int(r) for r in _REFINE.value)
  key = {"backend": backend, "source": source, "shape": list(items.shape), "seed": seed,
         "params": index_lib.resolve_params(kind, p, *items.shape)}
  path = os.path.join(_CACHE.value, backend)
  if os.path.exists(path + ".json"):
    with open(path + ".json") as f:
      saved = json.load(f)
    if saved["key"] == key:
      print(f"{backend}: read from {path}.faiss (built in {saved['build_s']:.1f} s by "
            f"{saved.get('by', 'an earlier run')})", flush=True)
      return index_lib.load_index(path + ".faiss", kind, key["params"]), saved["build_s"]
    print(f"{backend}: {path}.json is for other data or parameters; rebuilding", flush=True)
  t0 = time.perf_counter()
  index = _build(backend, items, params, seed)
  build_s = time.perf_counter() - t0
  os.makedirs(_CACHE.value, exist_ok=True)
  index.save(path + ".faiss")
  with open(path + ".json", "w") as f:
    json.dump({"key": key, "build_s": build_s, "by": " ".join(sys.argv)}, f, indent=1)
  return index, build_s


def _settings(backend, index) -> list[dict[str, int]]:
  """The search-time settings swept for `backend` (within the index's range), as keyword
  dicts for index.search: {} (exact), nprobe, nprobe x refine (ivf_pq_refine), efSearch."""
  if backend == "exact":
    return [{}]
  if backend == "hnsw":
    return [{"efSearch": int(v)} for v in _EF.value]
  nlist = index.num_lists if backend == "ivf" else index.params["nlist"]
  probes = [int(v) for v in _NPROBE.value if int(v) <= nlist]
  if backend == "ivf_pq_refine":
    return [{"nprobe": p, "refine": int(r)} for p in probes for r in _REFINE.value]
  return [{"nprobe": p} for p in probes]


def setting_label(row) -> str:
  """'nprobe=16, refine=4' (rows of older runs: knob=value), '-' for exact."""
  search = row.get("search")
  if search is None:
    search = {row["knob"]: row["value"]} if row.get("knob") else {}
  return ", ".join(f"{k}={v}" for k, v in search.items()) or "-"


def run(items, queries, source):
  k = _K.value
  params = parse_params(_PARAMS.value)
  pin = Pinning()
  cores = [int(c) for c in _CORES.value]
  build_cores = {}
  for spec in _BUILD_CORES_FOR.value:
    name, _, n = spec.partition(":")
    if not n.isdigit() or int(n) < 1:
      raise app.UsageError(f"--build_cores_for entry {spec!r} is not backend:n (n >= 1).")
    build_cores[name] = int(n)
  load = [os.getloadavg()]
  print(f"{len(items)} items, {len(queries)} queries, dim {items.shape[1]}, k={k} ({source}); "
        f"load average {load[0]}", flush=True)
  _, exact_ids = index_lib.ExactIndex(items).search(queries, k)
  rows = []
  for backend in _BACKENDS.value:
    pin.set(build_cores.get(backend, _BUILD_CORES.value))
    index, build_s = _build_or_load(backend, items, params, _SEED.value, source)
    nbytes = _index_bytes(index)
    desc = index.description()
    print(f"{backend}: built in {build_s:.1f} s, {nbytes / 2**20:.1f} MiB, {desc['params']}",
          flush=True)
    settings = _settings(backend, index)
    for n in cores:
      pin.set(n)
      for kw in settings:
        ids, batched = _batched_qps(index, queries, k, _REPEATS.value, **kw)
        single = _single_qps(index, queries, k, min(_SINGLE.value, len(queries)), **kw)
        # knob/value: the last (innermost) setting, kept for older readers of the JSON.
        knob, value = list(kw.items())[-1] if kw else (None, None)
        row = {"backend": backend, "cores": n, "knob": knob, "value": value, "search": kw,
               f"recall@{k}": index_lib.recall_at_k(ids, exact_ids),
               "batched_qps": batched, "single_qps": single, "build_s": build_s,
               "index_bytes": nbytes, "params": desc["params"]}
        rows.append(row)
        print(f"  cores {n} {setting_label(row)}: recall@{k} {row[f'recall@{k}']:.4f}, "
              f"batched {row['batched_qps']:.0f} q/s, single {single:.2f} q/s", flush=True)
    del index
    load.append(os.getloadavg())
    result = {"source": source, "num_items": len(items), "num_queries": len(queries),
              "dim": int(items.shape[1]), "k": k, "rows": rows, "load_before": load[0],
              "load_after": load[-1], "single_queries": min(_SINGLE.value, len(queries)),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "command": " ".join(sys.argv)}
    if _OUT.value:  # After every backend: a long run stopped early keeps what it measured.
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
  print(f"load average after: {load[-1]}")
  return result


COLORS = {"exact": "black", "ivf": "tab:orange", "ivf_flat": "tab:green", "ivf_pq": "tab:red",
          "ivf_pq_refine": "tab:purple", "hnsw": "tab:brown"}


def plot(out: str, files) -> None:
  """recall@k vs batched QPS (log) per backend; one row of panels per file, one column per
  core count; a backend keeps its colour in every panel."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  results = []
  for path in files:
    with open(path) as f:
      results.append(json.load(f))
  cores = sorted({row["cores"] for r in results for row in r["rows"]})
  fig, axes = plt.subplots(len(results), len(cores), figsize=(5.5 * len(cores),
                                                               3.8 * len(results)),
                           squeeze=False)
  for axrow, r in zip(axes, results):
    key = f"recall@{r['k']}"
    data = "real products" if r["source"].startswith("npy") else "synthetic mixture"
    for ax, c in zip(axrow, cores):
      for backend in dict.fromkeys(row["backend"] for row in r["rows"]):
        rows = [row for row in r["rows"] if row["backend"] == backend and row["cores"] == c]
        exact = backend == "exact"
        # A 2-D sweep (ivf_pq_refine: nprobe x refine) draws one curve over its first knob per
        # value of the others, each its own marker.
        groups = {}
        for row in rows:
          rest = tuple(list((row.get("search") or {}).items())[1:])
          groups.setdefault(rest, []).append(row)
        for g, (rest, grows) in enumerate(groups.items()):
          label = backend + "".join(f" {k}={v}" for k, v in rest)
          ax.plot([row["batched_qps"] for row in grows], [row[key] for row in grows],
                  "*" if exact else "osD^vp"[g % 6] + "-", color=COLORS.get(backend),
                  label=label, markersize=10 if exact else 4, alpha=1.0 - 0.12 * g)
      ax.axhline(0.95, color="grey", lw=0.7, ls="--")
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.set_xlabel(f"queries/s (batches of {r['num_queries']})")
      ax.set_ylabel(key)
      ax.set_title(f"{data}, {r['num_items']:,} x {r['dim']}, {c} core{'s' if c > 1 else ''}",
                   fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  print("wrote", out)


def markdown(result) -> str:
  """The run as markdown: every row, then per backend and core count the operating point (the
  fastest batched setting with recall@k >= 0.95) against exact search."""
  key = f"recall@{result['k']}"
  lines = [f"| backend | cores | knob | {key} | batched q/s | single q/s | build s | index MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['backend']} | {r['cores']} | {setting_label(r)} | {r[key]:.3f} | "
                 f"{r['batched_qps']:,.0f} | {r['single_qps']:,.1f} | {r['build_s']:.1f} | "
                 f"{r['index_bytes'] / 2**20:,.0f} |")
  lines += ["", f"| backend | cores | operating point ({key} >= 0.95) | {key} | batched vs exact "
            "| single vs exact |", "|---|---|---|---|---|---|"]
  exact = {r["cores"]: r for r in result["rows"] if r["backend"] == "exact"}
  for backend in dict.fromkeys(r["backend"] for r in result["rows"]):
    if backend == "exact":
      continue
    for cores in sorted(exact):
      rows = [r for r in result["rows"] if r["backend"] == backend and r["cores"] == cores]
      ok = [r for r in rows if r[key] >= 0.95]
      if not rows:
        continue
      if not ok:
        best = max(rows, key=lambda r: r[key])
        lines.append(f"| {backend} | {cores} | not reached (best {setting_label(best)})"
                     f" | {best[key]:.3f} | - | - |")
        continue
      r = max(ok, key=lambda r: r["batched_qps"])
      e = exact[cores]
      lines.append(f"| {backend} | {cores} | {setting_label(r)} | {r[key]:.3f} | "
                   f"{r['batched_qps'] / e['batched_qps']:.1f}x | "
                   f"{r['single_qps'] / e['single_qps']:.0f}x |")
  return "\n".join(lines)


def make_random_clip(directory: str) -> None:
  """A random-init tiny FashionCLIP (64 px, 2-layer towers, 512-d projection), exported as a
  transformers CLIPModel directory."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("fc", os.path.join(root, "configs",
                                                                    "fashionclip.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.data.image_size = 64
  c.model.projection_dim = 512
  c.model.vision = dict(width=64, num_layers=2, num_heads=2, mlp_dim=128, patch_size=8)
  c.model.text = dict(width=64, num_layers=2, num_heads=2, mlp_dim=128)
  system = systems.get_system(c)
  params = jax.device_get(nn.unbox(jax.jit(system.init)(jax.random.key(0),
                                                        system.dummy_batch(2))))
  print("wrote", system.export(params, directory, overwrite=True))


def write_embeddings(directory: str) -> None:
  from fashion_jax.search import encoders  # pylint: disable=g-import-not-at-top
  from fashion_jax.search import products  # pylint: disable=g-import-not-at-top
  enc = encoders.load_encoder(_MODEL.value)
  os.makedirs(directory, exist_ok=True)
  t0 = time.perf_counter()
  train = products.build_product_index(enc, _DATASET.value, "train", data_dir=_DATA_DIR.value,
                                       thumb_size=0)
  test = products.build_product_index(enc, _DATASET.value, "test", data_dir=_DATA_DIR.value,
                                      thumb_size=0)
  titles = enc.embed_texts(test.query_texts(fields=["title"]))
  np.save(os.path.join(directory, "items.npy"), train.index.vectors)
  np.save(os.path.join(directory, "queries.npy"), np.concatenate([test.index.vectors, titles]))
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump({"model": enc.name, "identity": enc.identity, "dataset": _DATASET.value,
               "items": "train images", "queries": "test images, then test titles",
               "seconds": time.perf_counter() - t0}, f, indent=1)
  print(f"wrote {directory}: {len(train)} items, {2 * len(test)} queries "
        f"({time.perf_counter() - t0:.0f} s)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MAKE_CLIP.value:
    return make_random_clip(_MAKE_CLIP.value)
  if _WRITE_EMB.value:
    if not _MODEL.value:
      raise app.UsageError("--write_embeddings needs --model.")
    return write_embeddings(_WRITE_EMB.value)
  if _PLOT.value:
    return plot(_PLOT.value, _PLOT_FROM.value)
  if _TABLE_FROM.value:
    with open(_TABLE_FROM.value) as f:
      result = json.load(f)
    print(markdown(result))
    return
  if _SOURCE.value == "mixture":
    items, queries = mixture(_N.value, _Q.value, _DIM.value, _CLUSTERS.value, _SIGMA.value,
                             _SEED.value)
    source = (f"mixture: {_CLUSTERS.value} clusters, sigma {_SIGMA.value}, seed {_SEED.value}")
  else:
    if not (_ITEMS.value and _QUERIES.value):
      raise app.UsageError("--source=npy needs --items=FILE.npy and --queries=FILE.npy")
    items, queries = _normalize(np.load(_ITEMS.value)), _normalize(np.load(_QUERIES.value))
    source = f"npy: {_ITEMS.value}"
  run(items, queries, source)
  if _OUT.value:
    print("wrote", _OUT.value)


if __name__ == "__main__":
  app.run(main)
