"""Vector indexes over product embeddings: exact top-k and an inverted-file (IVF) index.

Both score a query q [D] against item x [D] by the inner product s(q, x) = <q, x> (the cosine
for the L2-normalised embeddings every fashion_jax two-tower model produces) and return the k
best items, best first; ties resolve to the lower item index (as `retrieval.topk_retrieve`).

ExactIndex: brute force, `fashion_jax.evaluate.retrieval.topk_retrieve` (a jitted running top-k
over gallery chunks: memory O(query_chunk x (gallery_chunk + k)), work 2 Q N D flops). This is
the same code the retrieval evaluator's lists come from, so exact search and the evaluator agree.

IVFIndex (inverted file, as in Jegou et al. 2011 / faiss' IndexIVFFlat, written here in JAX and
numpy):
  * build: spherical k-means (Lloyd) on a sample of the items gives `nlist` unit centroids
    C [nlist, D]; every item goes to the list of its best centroid argmax_c <x, C_c>;
    items are stored contiguously list by list (`offsets` [nlist + 1]).
  * search: the query's `nprobe` best centroids name the lists to scan; the items of those lists
    are scored exactly and the k best kept. Work per query: nlist D + (nprobe N / nlist) D,
    instead of N D. Lists are scanned list-major (every query probing list l is scored against
    it in one matmul), so the cost is a few BLAS calls per list whatever the number of queries.
  Recall against exact search (`recall_at_k`) rises with nprobe; nprobe = nlist is exact.
  k-means details, chosen deliberately: k-means++ seeding (Arthur & Vassilvitskii 2007) on the
  training sample, with weights ||x - c||^2 = 2 (1 - <x, c>) for unit vectors (one pass over
  the sample per centroid: the cost of one Lloyd iteration; uniform seeding leaves two
  centroids in one cluster and merges two others, which then never separate); a centroid that
  loses all its items keeps its previous position; training uses at most `train_size` items (default 64 per list), assignment then
  covers every item.

Persistence: `save(path)` writes one .npz (arrays only, no pickle); `load_index(path)` reads
either kind back.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from fashion_jax.evaluate import retrieval

KINDS = ("exact", "ivf")


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

  def __init__(self, vectors):
    self.vectors = _as_matrix(vectors, "vectors")

  def __len__(self) -> int:
    return self.vectors.shape[0]

  @property
  def dim(self) -> int:
    return self.vectors.shape[1]

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float [Q, D] queries -> (scores float32 [Q, k], item indices int64 [Q, k]), best first."""
    queries = _as_matrix(queries, "queries")
    if queries.shape[1] != self.dim:
      raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}.")
    _check_k(k, len(self))
    scores, ids = retrieval.topk_retrieve(queries, self.vectors, k)
    return scores, ids.astype(np.int64)

  def arrays(self) -> dict[str, np.ndarray]:
    return {"vectors": self.vectors}

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

  def search(self, queries, k: int, nprobe: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """float [Q, D] -> (scores float32 [Q, k], item indices int64 [Q, k]), best first.

    A query whose probed lists hold fewer than k items gets -inf / -1 in the missing slots.
    The matmuls are many and small ([m, D] x [D, ~N/nlist]): they run on one BLAS thread, since
    a multi-threaded BLAS spends up to 100x their work waking its threads.
    """
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

  def arrays(self) -> dict[str, np.ndarray]:
    return {"centroids": self.centroids, "vectors": self.vectors, "item_ids": self.item_ids,
            "offsets": self.offsets, "nprobe": np.asarray(self.nprobe)}

  def save(self, path: str) -> None:
    np.savez(path, kind=np.asarray(self.kind), **self.arrays())

  def list_sizes(self) -> np.ndarray:
    return np.diff(self.offsets)


def build_index(vectors, kind: str = "exact", **ivf_kwargs):
  """`kind` 'exact' -> ExactIndex(vectors); 'ivf' -> IVFIndex.build(vectors, **ivf_kwargs)."""
  if kind == "exact":
    if ivf_kwargs:
      raise ValueError(f"exact index takes no IVF options; got {sorted(ivf_kwargs)}.")
    return ExactIndex(vectors)
  if kind == "ivf":
    return IVFIndex.build(vectors, **ivf_kwargs)
  raise ValueError(f"Unknown index kind {kind!r}; choose from {KINDS}.")


def load_index(path: str):
  """An index saved by `save` (either kind)."""
  with np.load(path, allow_pickle=False) as z:
    kind = str(z["kind"])
    if kind == "exact":
      return ExactIndex(z["vectors"])
    if kind == "ivf":
      return IVFIndex(z["centroids"], z["vectors"], z["item_ids"], z["offsets"],
                      int(z["nprobe"]))
  raise ValueError(f"{path}: unknown index kind {kind!r}.")


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
