"""Vector indexes over product embeddings: exact top-k, and FAISS approximate indexes.

All score a query q [D] against item x [D] by the inner product s(q, x) = <q, x> (the cosine
for the L2-normalised embeddings every fashion_jax two-tower model produces) and return the k
best items, best first, as (scores float32 [Q, k], item indices int64 [Q, k]).

ExactIndex: brute force, `fashion_jax.evaluate.retrieval.topk_retrieve` (a jitted running top-k
over gallery chunks: memory O(query_chunk x (gallery_chunk + k)), work 2 Q N D flops); ties
resolve to the lower item index. This is the same code the retrieval evaluator's lists come
from, so exact search and the evaluator agree, and it is the ground truth the approximate
indexes' recall is measured against (`recall_at_k`).

FaissIndex (the `search` extra, faiss-cpu; imported only when one is built or loaded, and its
absence is an ImportError naming the extra): kinds
  ivf_flat  inverted file (Jegou et al. 2011): spherical k-means lists (`nlist`), the `nprobe`
            lists nearest the query scanned exactly;
  ivf_pq    the same lists holding product-quantised codes (`m` sub-vectors of `nbits` bits),
            optionally re-ranked exactly (`refine` x k candidates, keeping the full vectors);
  hnsw      a hierarchical navigable small-world graph (Malkov & Yashunin 2018) over the full
            vectors: degree `M`, candidate lists `efConstruction` (build) / `efSearch` (query).
Every parameter and its default is in PARAM_DEFAULTS (the one place: the CLI and the benchmark
read names from it); SEARCH_PARAMS are those a single query may override (faiss
SearchParameters per call, so the index is not mutated and concurrent queries may differ). The
metric is inner product and the items must be unit-norm (checked at build). Deliberate choices:
k-means trains on at most TRAIN_POINTS_PER_LIST * nlist rows (a seeded sample; faiss' own cap is
256 per list); IVF-PQ's polysemous training (Hamming pre-filter codes, unused here) is off; HNSW
searches with max(efSearch, k), since a shorter candidate list returns fewer than k items.
IVFIndex (kind 'ivf'): our own inverted file, the same algorithm as ivf_flat written in JAX and
numpy, kept for one regime where it measurably beats faiss (docs/search.md): large query batches
at high nprobe, since it scans list-major (all the queries probing list l scored against it in
one matmul, so each list is read once per batch; faiss scans query by query). faiss is far
faster one query at a time and builds faster.
  * build: spherical k-means (Lloyd) on a sample of the items gives `nlist` unit centroids
    C [nlist, D]; every item goes to the list of its best centroid argmax_c <x, C_c>;
    items are stored contiguously list by list (`offsets` [nlist + 1]).
  * search: the query's `nprobe` best centroids name the lists to scan; the items of those lists
    are scored exactly and the k best kept (ties: lower item index); nprobe = nlist is exact.
  k-means details, chosen deliberately: k-means++ seeding (Arthur & Vassilvitskii 2007) on the
  training sample, with weights ||x - c||^2 = 2 (1 - <x, c>) for unit vectors (uniform seeding
  leaves two centroids in one cluster and merges two others, which then never separate); a
  centroid that loses all its items keeps its previous position; training uses at most
  `train_size` items (default 64 per list), assignment then covers every item.

Persistence: ExactIndex and IVFIndex `save` one .npz (arrays only, no pickle); FaissIndex.save
writes faiss' own format (faiss.write_index), its kind and parameters going in the caller's
meta.json (`description()`); `load_index(path, kind, params)` reads any of them back.
"""

from collections.abc import Sequence
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from fashion_jax.evaluate import retrieval

FAISS_KINDS = ("ivf_flat", "ivf_pq", "hnsw")
KINDS = ("exact", "ivf") + FAISS_KINDS

# Every tunable of every kind, with its default: the one place they are defined (launch/search.py
# and the benchmark take their names from here). None = derived from the data (resolve_params).
#   nlist: inverted lists (k-means centroids); nprobe: lists scanned per query (search time).
#   m, nbits: IVF-PQ codes of m sub-vectors of nbits each (m * nbits / 8 bytes per item);
#   refine: re-rank refine * k PQ candidates by their exact inner product (0 = off; keeps the
#     full vectors, so the index is as large as IVF-Flat's plus the codes; search time).
#   M: HNSW graph degree (2M links on the bottom layer); efConstruction / efSearch: the
#     candidate-list lengths while building / searching (efSearch: search time).
PARAM_DEFAULTS: dict[str, dict[str, int | None]] = {
    "exact": {},
    "ivf": {"num_lists": None, "nprobe": None},
    "ivf_flat": {"nlist": None, "nprobe": 16},
    "ivf_pq": {"nlist": None, "nprobe": 16, "m": None, "nbits": 8, "refine": 0},
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 64},
}
# The parameters a query may override (the rest are fixed when the index is built).
SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "exact": (), "ivf": ("nprobe",), "ivf_flat": ("nprobe",), "ivf_pq": ("nprobe", "refine"),
    "hnsw": ("efSearch",)}
TRAIN_POINTS_PER_LIST = 64  # IVF k-means trains on at most this many rows per list.
UNIT_NORM_TOLERANCE = 1e-3  # |1 - ||x||| allowed for the items of a FAISS index.


def _as_matrix(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty [N, D] array; got shape {x.shape}.")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} holds non-finite values (first at row "
                     f"{int(np.argwhere(~np.isfinite(x))[0, 0])}).")
  return x


def _check_k_positive(k: int) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k={k} must be >= 1 (the number of results per query).")


def resolve_k(k: int, n: int, what: str = "indexed items") -> tuple[int, str | None]:
  """(k to search with, note or None) for a user's k over n items.

  k < 1 is an error (the same as the raw indexes'); k > n is capped to n, with a note saying so,
  since asking for more results than exist is not a mistake worth failing a query for.
  """
  _check_k_positive(k)
  if k > n:
    return n, f"k={k} exceeds the {n} {what}; returning all {n}."
  return int(k), None


def _check_k(k: int, n: int):
  """The raw indexes' range: their outputs are [Q, k] arrays, so k > n is an error here (callers
  that want capping use `resolve_k`, as ProductIndex does)."""
  _check_k_positive(k)
  if k > n:
    raise ValueError(f"k={k} must be in [1, {n}] (the number of indexed items); "
                     "resolve_k caps it.")


class ExactIndex:
  """Brute-force inner-product top-k (module docstring).

  Args:
    vectors: float [N, D] item embeddings.
  """

  kind = "exact"
  filename = "index.npz"

  def __init__(self, vectors):
    self.vectors = _as_matrix(vectors, "vectors")

  def __len__(self) -> int:
    return self.vectors.shape[0]

  @property
  def dim(self) -> int:
    return self.vectors.shape[1]

  def search(self, queries, k: int, **search_params) -> tuple[np.ndarray, np.ndarray]:
    """float [Q, D] queries -> (scores float32 [Q, k], item indices int64 [Q, k]), best first.

    Exact search has no search parameters: any (nprobe=...) is a ValueError naming it."""
    _check_names(self.kind, search_params, (), "search")
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}.")
    _check_k(k, len(self))
    scores, ids = retrieval.topk_retrieve(queries, self.vectors, k)
    return scores, ids.astype(np.int64)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"vectors": self.vectors}

  def description(self) -> dict[str, Any]:
    return {"kind": self.kind, "params": {}}

  def reconstruct(self) -> np.ndarray:
    """float32 [N, D] the indexed vectors, row i = item i."""
    return self.vectors

  def save(self, path: str) -> None:
    np.savez(path, kind=np.asarray(self.kind), **self.arrays())


# ------------------------------------------------------------------------------------------------
# Spherical k-means (JAX).
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("chunk",))
def _assign(x, centroids, *, chunk: int):
  """[N, D] x [C, D] -> (int32 [N] best centroid, float32 [N] its score), N a multiple of chunk."""
  def one(xc):
    s = xc @ centroids.T
    return jnp.argmax(s, axis=1).astype(jnp.int32), jnp.max(s, axis=1)
  a, s = jax.lax.map(one, x.reshape(-1, chunk, x.shape[1]))
  return a.reshape(-1), s.reshape(-1)


def _assign_all(x: np.ndarray, centroids, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  n = x.shape[0]
  chunk = min(chunk, n)
  padded = np.concatenate([x, np.zeros((-n % chunk, x.shape[1]), x.dtype)])
  a, s = jax.device_get(_assign(padded, jnp.asarray(centroids), chunk=chunk))
  return np.asarray(a[:n]), np.asarray(s[:n])


@functools.partial(jax.jit, static_argnames=("num_lists",))
def _update(x, assign, old, *, num_lists: int):
  """New unit centroids = normalize(sum of members); empty lists keep `old`."""
  sums = jax.ops.segment_sum(x, assign, num_segments=num_lists)
  counts = jax.ops.segment_sum(jnp.ones(x.shape[0], jnp.int32), assign, num_segments=num_lists)
  norm = jnp.linalg.norm(sums, axis=1, keepdims=True)
  new = sums / jnp.maximum(norm, 1e-12)
  return jnp.where((counts > 0)[:, None] & (norm > 0), new, old), counts


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(x, key, *, k: int):
  """k-means++ seeds [k, D] among the unit rows of x [N, D]: the first uniform, each next one
  drawn with probability proportional to min_c (1 - <x, c>) over the seeds so far."""
  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, x.shape[0])
  seeds = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  dist = jnp.maximum(1.0 - x @ x[first], 0.0)

  def body(i, carry):
    seeds, dist, key = carry
    key, sub = jax.random.split(key)
    pick = jax.random.categorical(sub, jnp.log(dist + 1e-30))
    seeds = seeds.at[i].set(x[pick])
    return seeds, jnp.minimum(dist, jnp.maximum(1.0 - x @ x[pick], 0.0)), key

  seeds, _, _ = jax.lax.fori_loop(1, k, body, (seeds, dist, key))
  return seeds


def spherical_kmeans(x, num_lists: int, *, iterations: int = 10, seed: int = 0,
                     train_size: int | None = None) -> np.ndarray:
  """Unit centroids [num_lists, D] of `x` [N, D] by Lloyd iterations on the cosine.

  Each iteration: a_i = argmax_c <x_i, C_c>; C_c = normalize(sum_{a_i = c} x_i). Starts from
  k-means++ seeds (`_kmeans_pp`, jax.random.PRNGKey(seed)) of the normalised training rows,
  trains on at most `train_size` rows (default 64 * num_lists, drawn with numpy's
  Generator(seed)), stops early when no assignment changes.
  """
  x = _as_matrix(x, "x")
  n = x.shape[0]
  if not 1 <= num_lists <= n:
    raise ValueError(f"num_lists={num_lists} must be in [1, {n}] (the number of items).")
  if iterations < 1:
    raise ValueError(f"iterations={iterations} must be >= 1.")
  rng = np.random.default_rng(seed)
  train_size = train_size or 64 * num_lists
  sample = x[rng.choice(n, train_size, replace=False)] if n > train_size else x
  sample = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
  xs = jnp.asarray(sample)
  c = _kmeans_pp(xs, jax.random.PRNGKey(seed), k=num_lists)
  prev = None
  for _ in range(iterations):
    a, _ = _assign_all(sample, c)
    if prev is not None and np.array_equal(a, prev):
      break
    c, _ = _update(xs, jnp.asarray(a), c, num_lists=num_lists)
    prev = a
  return np.asarray(c, np.float32)


# ------------------------------------------------------------------------------------------------
# IVF.
# ------------------------------------------------------------------------------------------------
class IVFIndex:
  """Inverted-file index (module docstring).

  Build with `IVFIndex.build(vectors, num_lists=..., nprobe=...)`.

  Attributes:
    centroids: float32 [nlist, D] unit centroids.
    vectors: float32 [N, D] the items, reordered list by list.
    item_ids: int64 [N] original index of each stored row.
    offsets: int64 [nlist + 1] list l holds rows offsets[l]:offsets[l + 1].
    nprobe: default number of lists scanned per query.
  """

  kind = "ivf"
  filename = "index.npz"

  def __init__(self, centroids, vectors, item_ids, offsets, nprobe: int):
    self.centroids = _as_matrix(centroids, "centroids")
    self.vectors = _as_matrix(vectors, "vectors")
    self.item_ids = np.asarray(item_ids, np.int64)
    self.offsets = np.asarray(offsets, np.int64)
    nlist = self.centroids.shape[0]
    if self.offsets.shape != (nlist + 1,) or self.offsets[-1] != self.vectors.shape[0]:
      raise ValueError(f"offsets {self.offsets.shape} do not describe {nlist} lists over "
                       f"{self.vectors.shape[0]} items.")
    self.nprobe = self._check_nprobe(nprobe)

  @classmethod
  def build(cls, vectors, *, num_lists: int | None = None, nprobe: int | None = None,
            iterations: int = 10, seed: int = 0, train_size: int | None = None) -> "IVFIndex":
    """Trains the centroids and fills the lists.

    Args:
      vectors: float [N, D] item embeddings.
      num_lists: nlist; default round(2 sqrt(N)), at most N.
      nprobe: default lists per query; default max(1, nlist // 16).
      iterations, seed, train_size: see `spherical_kmeans`.
    """
    vectors = _as_matrix(vectors, "vectors")
    n = vectors.shape[0]
    num_lists = num_lists or max(1, min(n, int(round(2 * np.sqrt(n)))))
    centroids = spherical_kmeans(vectors, num_lists, iterations=iterations, seed=seed,
                                 train_size=train_size)
    assign, _ = _assign_all(vectors, centroids)
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=num_lists)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return cls(centroids, vectors[order], order, offsets,
               nprobe if nprobe is not None else max(1, num_lists // 16))

  def __len__(self) -> int:
    return self.vectors.shape[0]

  @property
  def dim(self) -> int:
    return self.vectors.shape[1]

  @property
  def num_lists(self) -> int:
    return self.centroids.shape[0]

  def _check_nprobe(self, nprobe: int) -> int:
    if not 1 <= nprobe <= self.num_lists:
      raise ValueError(f"nprobe={nprobe} must be in [1, {self.num_lists}] (the number of lists).")
    return int(nprobe)

  def search(self, queries, k: int, nprobe: int | None = None, **search_params
             ) -> tuple[np.ndarray, np.ndarray]:
    """float [Q, D] -> (scores float32 [Q, k], item indices int64 [Q, k]), best first.

    A query whose probed lists hold fewer than k items gets -inf / -1 in the missing slots.
    The matmuls are many and small ([m, D] x [D, ~N/nlist]): they run on one BLAS thread, since
    a multi-threaded BLAS spends up to 100x their work waking its threads.
    """
    _check_names(self.kind, search_params, ("nprobe",), "search")
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}.")
    _check_k(k, len(self))
    nprobe = self._check_nprobe(self.nprobe if nprobe is None else nprobe)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      return self._search(queries, k, nprobe)

  def _search(self, queries, k, nprobe):
    nq = queries.shape[0]
    cs = queries @ self.centroids.T  # [Q, nlist]
    if nprobe < self.num_lists:
      probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe]
    else:
      probe = np.broadcast_to(np.arange(self.num_lists), (nq, nprobe))
    cand_s = np.full((nq, nprobe, k), -np.inf, np.float32)
    cand_i = np.full((nq, nprobe, k), -1, np.int64)
    flat = probe.ravel()
    order = np.argsort(flat, kind="stable")
    lists, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    self._scan(queries, k, nprobe, order, lists, starts, ends, cand_s, cand_i)
    cand_s = cand_s.reshape(nq, -1)
    cand_i = cand_i.reshape(nq, -1)
    # Best first; ties -> lower item index (absent slots, -1, sort last through -inf).
    key_i = np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i)
    best = np.lexsort((key_i, -cand_s), axis=1)[:, :k]
    return np.take_along_axis(cand_s, best, 1), np.take_along_axis(cand_i, best, 1)

  def _scan(self, queries, k, nprobe, order, lists, starts, ends, cand_s, cand_i):
    """Scores every probed list against the queries probing it; fills cand_* [Q, nprobe, k]."""
    for l, a, b in zip(lists, starts, ends):
      lo, hi = self.offsets[l], self.offsets[l + 1]
      if hi == lo:
        continue
      rows = order[a:b]
      qi, slot = rows // nprobe, rows % nprobe
      s = queries[qi] @ self.vectors[lo:hi].T  # [m, len]
      kk = min(k, hi - lo)
      top = (np.argpartition(-s, kk - 1, axis=1)[:, :kk] if hi - lo > kk
             else np.broadcast_to(np.arange(kk), (len(rows), kk)))
      cand_s[qi, slot, :kk] = np.take_along_axis(s, top, axis=1)
      cand_i[qi, slot, :kk] = self.item_ids[lo + top]

  def description(self) -> dict[str, Any]:
    return {"kind": self.kind, "params": {"num_lists": self.num_lists, "nprobe": self.nprobe}}

  def reconstruct(self) -> np.ndarray:
    """float32 [N, D] the indexed vectors, row i = item i."""
    out = np.empty_like(self.vectors)
    out[self.item_ids] = self.vectors
    return out

  def arrays(self) -> dict[str, np.ndarray]:
    return {"centroids": self.centroids, "vectors": self.vectors, "item_ids": self.item_ids,
            "offsets": self.offsets, "nprobe": np.asarray(self.nprobe)}

  def save(self, path: str) -> None:
    np.savez(path, kind=np.asarray(self.kind), **self.arrays())

  def list_sizes(self) -> np.ndarray:
    return np.diff(self.offsets)


# ------------------------------------------------------------------------------------------------
# FAISS backends.
# ------------------------------------------------------------------------------------------------
def _faiss():
  """The faiss module, or an ImportError naming the extra that installs it."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"The approximate index kinds {FAISS_KINDS} use faiss, which is not installed here: "
        "pip install -e .[search] (faiss-cpu); or use kind='exact'.") from e
  return faiss


def _check_unit_norm(x: np.ndarray, name: str) -> None:
  norms = np.linalg.norm(x, axis=1)
  bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
  if bad.size:
    raise ValueError(f"{name} row {bad[0]} has norm {norms[bad[0]]:.6f}: the FAISS indexes rank "
                     "by inner product on L2-normalised vectors (the cosine); normalise the "
                     "embeddings first (fashion_jax models already do).")


def _check_names(kind: str, given: dict[str, Any], allowed: Sequence[str], what: str) -> None:
  bad = sorted(set(given) - set(allowed))
  if bad:
    raise ValueError(f"{kind} index has no {what} parameter(s) {bad}; its {what} parameters are "
                     f"{list(allowed)}.")


def _check_int(kind: str, name: str, value: Any, lo: int, hi: int | None = None,
               why: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{kind} parameter {name}={value!r} must be an integer.")
  if value < lo or (hi is not None and value > hi):
    span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{kind} parameter {name}={value} must be in {span}{why}.")
  return int(value)


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"Unknown index kind {kind!r}; choose from {KINDS}.")
  return kind


def default_nlist(n: int) -> int:
  """round(4 sqrt(N)), at most N // 39 (faiss' minimum of 39 training points per list), >= 1."""
  return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def default_pq_m(dim: int) -> int:
  """The largest divisor of D with at least 8 dimensions per sub-quantizer (D = 512 -> 64:
  64 bytes per vector at nbits 8)."""
  return max(m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= 8 or m == 1)


def resolve_params(kind: str, params: dict[str, Any], num_items: int, dim: int
                   ) -> dict[str, int]:
  """The full parameter set of a `kind` index over num_items x dim: `params` over
  PARAM_DEFAULTS[kind], None defaults resolved (default_nlist, default_pq_m); ValueError naming
  an unknown kind, an unknown parameter name or an out-of-range value."""
  check_kind(kind)
  _check_names(kind, params, tuple(PARAM_DEFAULTS[kind]), "index")
  p = {**PARAM_DEFAULTS[kind], **{k: v for k, v in params.items() if v is not None}}
  if "nlist" in p:
    p["nlist"] = _check_int(kind, "nlist", default_nlist(num_items) if p["nlist"] is None
                            else p["nlist"], 1, num_items, " (the number of items)")
    if params.get("nprobe") is None:  # The default, on an index of fewer lists: all of them.
      p["nprobe"] = min(p["nprobe"], p["nlist"])
    p["nprobe"] = _check_int(kind, "nprobe", p["nprobe"], 1, p["nlist"], " (nlist)")
  if kind == "ivf_pq":
    p["m"] = _check_int(kind, "m", default_pq_m(dim) if p["m"] is None else p["m"], 1, dim)
    if dim % p["m"]:
      raise ValueError(f"ivf_pq parameter m={p['m']} must divide the dimension {dim}.")
    p["nbits"] = _check_int(kind, "nbits", p["nbits"], 1, 16)
    if 2 ** p["nbits"] > num_items:
      raise ValueError(f"ivf_pq parameter nbits={p['nbits']} needs at least 2**nbits = "
                       f"{2 ** p['nbits']} items to train its codebooks; there are {num_items}.")
    p["refine"] = _check_int(kind, "refine", p["refine"], 0)
  if kind == "hnsw":
    for name in ("M", "efConstruction", "efSearch"):
      p[name] = _check_int(kind, name, p[name], 2 if name == "M" else 1)
  return p


class FaissIndex:
  """A FAISS index (IVF-Flat, IVF-PQ or HNSW) behind the ExactIndex interface (module docstring).

  Build with `FaissIndex.build(vectors, kind, **params)` or `build_index`.

  Attributes:
    kind: 'ivf_flat', 'ivf_pq' or 'hnsw'.
    params: the full parameter set (resolve_params), including the search defaults.
    faiss_index: the faiss.Index.
  """

  filename = "index.faiss"

  def __init__(self, faiss_index, kind: str, params: dict[str, int]):
    if kind not in FAISS_KINDS:
      raise ValueError(f"Unknown FAISS index kind {kind!r}; choose from {FAISS_KINDS}.")
    self.faiss_index = faiss_index
    self.kind = kind
    self.params = dict(params)

  @classmethod
  def build(cls, vectors, kind: str, *, seed: int = 0, **params) -> "FaissIndex":
    """Trains (IVF: spherical k-means on at most TRAIN_POINTS_PER_LIST * nlist rows drawn with
    `seed`; IVF-PQ: its codebooks on the same rows) and adds every row of `vectors` [N, D]
    (unit norm), row i getting id i."""
    faiss = _faiss()
    vectors = _as_matrix(vectors, "vectors")
    _check_unit_norm(vectors, "vectors")
    n, dim = vectors.shape
    if kind not in FAISS_KINDS:
      check_kind(kind)
      raise ValueError(f"kind {kind!r} is not a FAISS index kind {FAISS_KINDS}.")
    p = resolve_params(kind, params, n, dim)
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
      index = faiss.index_factory(dim, f"HNSW{p['M']},Flat", metric)
      index.hnsw.efConstruction = p["efConstruction"]
      index.hnsw.efSearch = p["efSearch"]
    else:
      codes = "Flat" if kind == "ivf_flat" else f"PQ{p['m']}x{p['nbits']}"
      refine = ",RFlat" if kind == "ivf_pq" and p["refine"] else ""
      index = faiss.index_factory(dim, f"IVF{p['nlist']},{codes}{refine}", metric)
      ivf = faiss.extract_index_ivf(index)
      ivf.cp.spherical = True
      ivf.cp.seed = seed
      ivf.nprobe = p["nprobe"]
      if kind == "ivf_pq":
        pq_ivf = faiss.downcast_index(ivf)
        pq_ivf.pq.cp.seed = seed
        # Polysemous training (codes ordered for Hamming pre-filtering, which we never use)
        # is on by default and costs seconds even on a few thousand items.
        pq_ivf.do_polysemous_training = False
        if p["refine"]:
          index.k_factor = float(p["refine"])
      train = min(n, max(TRAIN_POINTS_PER_LIST * p["nlist"], 2 ** p.get("nbits", 0) * 39))
      rows = np.random.default_rng(seed).choice(n, train, replace=False) if train < n else None
      index.train(vectors if rows is None else vectors[np.sort(rows)])
    index.add(vectors)
    return cls(index, kind, p)

  def __len__(self) -> int:
    return int(self.faiss_index.ntotal)

  @property
  def dim(self) -> int:
    return int(self.faiss_index.d)

  def search_parameters(self, k: int, **overrides):
    """faiss SearchParameters for a top-k search: this index's search defaults updated by
    `overrides` (a plain SearchParametersIVF, for the base index alone, for ivf_pq with
    refine=0 on a refined index). ValueError for a name that is not a search parameter of this
    kind or an out-of-range value. HNSW searches with max(efSearch, k): a shorter candidate
    list returns fewer than k items (faiss pads with -1), which a caller asking for k results
    never wants."""
    faiss = _faiss()
    _check_names(self.kind, overrides, SEARCH_PARAMS[self.kind], "search")
    p = {**{name: self.params[name] for name in SEARCH_PARAMS[self.kind]},
         **{name: v for name, v in overrides.items() if v is not None}}
    if self.kind == "hnsw":
      ef = _check_int(self.kind, "efSearch", p["efSearch"], 1)
      return faiss.SearchParametersHNSW(efSearch=max(ef, k))
    ivf = faiss.SearchParametersIVF(nprobe=_check_int(
        self.kind, "nprobe", p["nprobe"], 1, self.params["nlist"], " (nlist)"))
    if self.kind == "ivf_pq" and self.params["refine"]:
      refine = _check_int(self.kind, "refine", p["refine"], 0)
      if refine:
        return faiss.IndexRefineSearchParameters(k_factor=float(refine), base_index_params=ivf)
      return ivf
    if self.kind == "ivf_pq" and p["refine"]:
      raise ValueError(f"refine={p['refine']} needs an ivf_pq index built with refine >= 1 (it "
                       "keeps the full vectors to re-rank); this one was built with refine=0.")
    return ivf

  def search(self, queries, k: int, **search_params) -> tuple[np.ndarray, np.ndarray]:
    """float [Q, D] -> (scores float32 [Q, k], item indices int64 [Q, k]), best first.

    search_params: SEARCH_PARAMS[kind] overrides for this call only (nprobe, efSearch, refine);
    the index itself is not changed, so concurrent searches with different settings are safe.
    Missing results (fewer than k items reached) are id -1 with score -inf.
    """
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}.")
    _check_k(k, len(self))
    params = self.search_parameters(k, **search_params)
    index = self.faiss_index
    if self.kind == "ivf_pq" and self.params["refine"] and not isinstance(
        params, _faiss().IndexRefineSearchParameters):
      index = _faiss().downcast_index(index.base_index)
    scores, ids = index.search(np.ascontiguousarray(queries), k, params=params)
    ids = ids.astype(np.int64)
    return np.where(ids < 0, -np.inf, scores).astype(np.float32), ids

  def description(self) -> dict[str, Any]:
    return {"kind": self.kind, "params": dict(self.params)}

  def reconstruct(self) -> np.ndarray:
    """float32 [N, D] the indexed vectors, row i = item i (exact reference searches); kinds that
    keep them exactly only: IVF-PQ without refine stores lossy codes, a ValueError."""
    faiss = _faiss()
    index = self.faiss_index
    if self.kind == "ivf_pq":
      if not self.params["refine"]:
        raise ValueError("an ivf_pq index built with refine=0 keeps only lossy PQ codes, not the "
                         "vectors; rebuild with refine >= 1 or use the exact index's vectors.")
      index = faiss.downcast_index(index.refine_index)
    elif self.kind == "ivf_flat":
      faiss.extract_index_ivf(index).make_direct_map()
    return index.reconstruct_n(0, len(self))

  def save(self, path: str) -> None:
    """faiss.write_index (the kind and params go in the caller's meta.json: `description`)."""
    _faiss().write_index(self.faiss_index, path)


def build_index(vectors, kind: str = "exact", **params):
  """An index of `kind` (KINDS) over `vectors` [N, D]; `params` are PARAM_DEFAULTS[kind]'s names
  (plus `seed` for the trained kinds); ValueError naming an unknown kind or parameter.
  kind 'ivf' is our IVFIndex.build; the FAISS kinds are FaissIndex.build."""
  check_kind(kind)
  if kind == "exact":
    _check_names(kind, params, (), "index")
    return ExactIndex(vectors)
  if kind == "ivf":
    _check_names(kind, params, (*PARAM_DEFAULTS["ivf"], "seed"), "index")
    return IVFIndex.build(vectors, **params)
  return FaissIndex.build(vectors, kind, **params)


def load_index(path: str, kind: str | None = None, params: dict[str, Any] | None = None):
  """An index written by `save`: an .npz (ExactIndex, or our IVF) reads its kind from the file;
  a FAISS file needs the `kind` and `params` its writer recorded (`description()`, kept in the
  product index's meta.json). Reading a FAISS file without faiss is an ImportError naming the
  extra that installs it."""
  if kind in FAISS_KINDS:
    if params is None:
      raise ValueError(f"{path}: a {kind} index needs the params recorded with it.")
    faiss = _faiss()
    return FaissIndex(faiss.read_index(path), kind, params)
  if kind is not None:
    check_kind(kind)
  with np.load(path, allow_pickle=False) as z:
    stored = str(z["kind"])
    if kind is not None and stored != kind:
      raise ValueError(f"{path} holds a {stored!r} index, not {kind!r}.")
    if stored == "exact":
      return ExactIndex(z["vectors"])
    if stored == "ivf":
      return IVFIndex(z["centroids"], z["vectors"], z["item_ids"], z["offsets"],
                      int(z["nprobe"]))
  raise ValueError(f"{path}: unknown index kind {stored!r}.")


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean over queries of |approx top-k ∩ exact top-k| / k (k = exact_ids.shape[1])."""
  approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
  if approx_ids.shape != exact_ids.shape:
    raise ValueError(f"approx {approx_ids.shape} and exact {exact_ids.shape} lists differ in "
                     "shape.")
  hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids)]
  return float(np.mean(hits) / exact_ids.shape[1])


def timed_search(index, queries, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray, float]:
  """`index.search` after one identical warm-up call (compilation) -> (scores, ids, seconds)."""
  index.search(queries, k, **kwargs)
  t0 = time.perf_counter()
  scores, ids = index.search(queries, k, **kwargs)
  return scores, ids, time.perf_counter() - t0
