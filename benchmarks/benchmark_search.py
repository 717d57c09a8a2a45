r"""Approximate (IVF) vs exact product search: recall@k against exact, and timings.

    python -m benchmarks.benchmark_search --num_items=100000 --num_queries=1000 --dim=128 \
        --nprobe=1,2,4,8,16,32 --out=/tmp/bench_search.json

Items (--source):
  mixture: unit vectors around `num_clusters` random unit centres, x = normalize(c + sigma g)
           with g ~ N(0, I/dim) (a catalog of many near-duplicates per style, like product
           embeddings grouped by sub-category/colour); queries are fresh draws of the same
           mixture, so their exact neighbours are items of their own cluster and its neighbours.
  npy:     --embeddings=FILE.npy, float [N, D] (e.g. a catalog's image embeddings saved from
           `fashion_jax.search.products.build_product_index(...).index.vectors`); queries are
           --queries=FILE.npy or, by default, held-out rows of the file.
Reported: exact search time (fashion_jax.evaluate.retrieval.topk_retrieve, jitted), IVF build
time (k-means + assignment), and per nprobe the IVF search time and recall@k = mean
|IVF top-k ∩ exact top-k| / k. Times are wall seconds after one warm-up call of the same shape.
"""

import json
import os
import platform
import time

from absl import app
from absl import flags
import numpy as np

_SOURCE = flags.DEFINE_enum("source", "mixture", ["mixture", "npy"], "Where the items come from.")
_N = flags.DEFINE_integer("num_items", 100000, "Items to index (mixture).")
_Q = flags.DEFINE_integer("num_queries", 1000, "Queries.")
_DIM = flags.DEFINE_integer("dim", 128, "Embedding dimension (mixture).")
_CLUSTERS = flags.DEFINE_integer("num_clusters", 1000, "Mixture components.")
_SIGMA = flags.DEFINE_float("sigma", 1.0, "Mixture noise scale (relative to the unit centre).")
_EMB = flags.DEFINE_string("embeddings", None, "npy source: item embeddings [N, D].")
_QUERIES = flags.DEFINE_string("queries", None, "npy source: query embeddings [Q, D].")
_K = flags.DEFINE_integer("k", 10, "Top-k.")
_NUM_LISTS = flags.DEFINE_integer("num_lists", None, "IVF lists (default 2 sqrt(N)).")
_NPROBE = flags.DEFINE_list("nprobe", ["1", "2", "4", "8", "16", "32"], "nprobe values.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _normalize(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n, q, dim, clusters, sigma, seed):
  """(items [n, dim], queries [q, dim]) from the mixture of the module docstring."""
  rng = np.random.default_rng(seed)
  centres = _normalize(rng.normal(size=(clusters, dim)))

  def draw(m):
    c = centres[rng.integers(0, clusters, m)]
    return _normalize(c + sigma * rng.normal(size=(m, dim)) / np.sqrt(dim))
  return draw(n), draw(q)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fashion_jax.search import index as index_lib  # pylint: disable=g-import-not-at-top
  if _SOURCE.value == "mixture":
    items, queries = mixture(_N.value, _Q.value, _DIM.value, _CLUSTERS.value, _SIGMA.value,
                             _SEED.value)
    source = (f"mixture: {_CLUSTERS.value} clusters, sigma {_SIGMA.value}, dim {_DIM.value}, "
              f"seed {_SEED.value}")
  else:
    if not _EMB.value:
      raise app.UsageError("--source=npy needs --embeddings=FILE.npy")
    items = _normalize(np.load(_EMB.value))
    if _QUERIES.value:
      queries = _normalize(np.load(_QUERIES.value))
    else:
      rng = np.random.default_rng(_SEED.value)
      held = rng.choice(len(items), _Q.value, replace=False)
      queries = items[held]
      items = np.delete(items, held, axis=0)
    source = f"npy: {_EMB.value}"
  k = _K.value
  print(f"{len(items)} items, {len(queries)} queries, dim {items.shape[1]}, k={k} ({source})")

  exact = index_lib.ExactIndex(items)
  _, exact_ids, t_exact = index_lib.timed_search(exact, queries, k)
  print(f"exact: {t_exact:.3f} s ({len(queries) / t_exact:.0f} queries/s)")

  t0 = time.perf_counter()
  ivf = index_lib.IVFIndex.build(items, num_lists=_NUM_LISTS.value, seed=_SEED.value)
  t_build = time.perf_counter() - t0
  sizes = ivf.list_sizes()
  print(f"ivf build: {t_build:.1f} s, {ivf.num_lists} lists (sizes mean {sizes.mean():.0f}, "
        f"max {sizes.max()})")
  rows = []
  for nprobe in [int(p) for p in _NPROBE.value]:
    if nprobe > ivf.num_lists:
      continue
    _, ids, t = index_lib.timed_search(ivf, queries, k, nprobe=nprobe)
    r = index_lib.recall_at_k(ids, exact_ids)
    rows.append({"nprobe": nprobe, f"recall@{k}": r, "seconds": t,
                 "queries_per_s": len(queries) / t, "speedup_vs_exact": t_exact / t})
    print(f"ivf nprobe={nprobe:3d}: recall@{k} {r:.4f}, {t:.3f} s "
          f"({len(queries) / t:.0f} queries/s, {t_exact / t:.1f}x exact)")
  result = {"source": source, "num_items": len(items), "num_queries": len(queries),
            "dim": int(items.shape[1]), "k": k, "exact_seconds": t_exact,
            "ivf_build_seconds": t_build, "num_lists": ivf.num_lists, "ivf": rows,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
    print("wrote", _OUT.value)


if __name__ == "__main__":
  app.run(main)
