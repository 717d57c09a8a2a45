"""Cross-modal retrieval: full-candidate and sample-100 protocols, R@K, HITS@K, MRR, SumR.

Two protocols (docs/data.md, "Evaluation protocols"); every metric name says which one:

* `full`: every query is ranked against the WHOLE gallery of the split (FashionCLIP's HITS@5/MRR
  on held-out products; the "full-candidate" setting of FashionViL/E2).
* `sample<K>` (`sample100` by default; FashionBERT, Kaleido-BERT, FashionViL, E2 on FashionGen):
  1000 seeded random queries, each ranked against its positive plus 100 negatives drawn from the
  positive's SAME sub-category; R@1/5/10 in both directions, averaged over `repeats` draws
  (FashionViL uses 5).

Scores are dot products s(q, g) = <q, g> of the embeddings (cosines for the L2-normalised
embeddings of a TwoTowerSystem).

Rank and tie convention (chosen deliberately: PESSIMISTIC ties). The rank of a positive p of
query q is
    rank(q, p) = 1 + #{negatives n : s(q, n) >= s(q, p)}
                   + #{other positives p' : s(q, p') > s(q, p), or = and p' listed before p}.
A negative that ties with a positive is counted AGAINST the query. The optimistic convention
(count only strictly higher negatives) gives a collapsed model whose embeddings are all equal a
perfect R@1 = 1; the pessimistic one gives it the worst rank, so ties can never inflate a score.
Positives of the same query never push each other down by a tie more than once: they are ordered
among themselves by score, then by the order in which they are listed.

Multiple positives per query are supported (`positives[q]` lists every gallery item that counts,
e.g. all views of the product). From the per-positive ranks:
    HITS@K = mean_q [ min_p rank(q, p) <= K ]            (FashionCLIP's HITS@K)
    R@K    = mean_q  #{p : rank(q, p) <= K} / #positives(q)   (recall of the query's positives)
    MRR    = mean_q 1 / min_p rank(q, p)                  (rank of the first relevant item)
    SumR   = sum of R@{1,5,10} over both directions       (the FashionViL/E2 summary)
With ONE positive per query (our evaluators: one image, the first view, and one text per
product) R@K == HITS@K, which is the R@K every fashion VL paper reports.

Memory. The full protocol never materialises the [Nq, Ng] score matrix: queries are cut into
balanced chunks of at most `query_chunk` and the gallery into chunks of at most
`gallery_chunk` (`chunk_plan`); each block
S = Q_c G_c^T [query_chunk, gallery_chunk] is computed once and serves BOTH directions (rows
count negatives above each text's positive, columns above each image's positive). Working memory
is O(query_chunk x gallery_chunk + (Nq + Ng) x P), the matmul work 2 Nq Ng D flops: one pass.
The positives' own scores are taken from blocks of the SAME shape computed by the same XLA dot
(a first pass that visits only the blocks holding positives: one block per query chunk for the
usual identity pairing), because a dot of another shape may round differently in the last bit,
which would break exact ties (e.g. a duplicated image) against the pessimistic convention.
With a mesh, query chunks are sharded over the mesh's batch axes (shard_map); the gallery is
replicated and the per-image counts are summed over devices.
`topk_retrieve` (running top-k merge, `jax.lax.top_k`) returns the retrieved lists themselves,
e.g. to re-rank a two-tower top-k with a cross-encoder.

Matryoshka widths. A system whose embeddings are trained at several prefix widths (its
`matryoshka_dims`, e.g. (64, 128, 0); losses/matryoshka.py) is evaluated at each: the
embeddings are cut with `matryoshka.truncate_and_normalize(x, m)` (the first m coordinates,
re-L2-normalised) and every metric of the width m gets the suffix `@d{m}`
(`test/full/t2i_R@10@d64`); the full width keeps the plain names and is used as embedded.

Field queries (protocol `field`, `field_metrics`). Queries from ONE product field (colour,
brand, category) against the product images: many products share a value, so there is one
query per DISTINCT non-blank value (its text, through `query_template`), and its positives are
every product with that value (a per-product query would repeat the same text, weighting
frequent values by their frequency). Recall of all positives is meaningless here (R@10 of a
colour with 80 products is at most 1/8), so the protocol reports, over the distinct values:
    HITS@K = [ some matching product is in the top K ]
    P@K    = #{matching products in the top K} / K
    MRR    = 1 / rank of the first matching product
(Marqo's category-to-product protocol: P@1/P@10/MRR), with the same pessimistic ties: a
non-matching product that ties with a matching one is ranked ahead of it.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import functools
import math

from absl import logging
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.losses import matryoshka
from fashion_jax.parallel import axes

DEFAULT_KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------------
# Rank -> metrics (host, numpy).
# ------------------------------------------------------------------------------------------------
def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """R@K, HITS@K, MRR, MedR, MeanR from per-positive ranks.

  Args:
    ranks: int [N, P] (or [N] for one positive): 1-based rank of each positive of each query;
      -1 marks an absent positive slot (padding). Every query needs at least one positive.
    ks: the cut-offs K.

  Returns:
    {'R@K', 'HITS@K' for K in ks, 'MRR', 'MedR', 'MeanR'} (MedR/MeanR: median/mean of the best
    positive's rank), as python floats.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim == 1:
    ranks = ranks[:, None]
  present = ranks > 0
  num_pos = present.sum(1)
  if ranks.shape[0] == 0:
    raise ValueError("rank_metrics got 0 queries.")
  if (num_pos == 0).any():
    raise ValueError(f"{int((num_pos == 0).sum())} queries have no positive "
                     f"(first: query {int(np.argmax(num_pos == 0))}).")
  best = np.where(present, ranks, np.iinfo(np.int64).max).min(1).astype(np.float64)
  out = {}
  for k in ks:
    if k < 1:
      raise ValueError(f"Recall cut-off K={k} must be >= 1.")
    out[f"R@{k}"] = float(np.mean(((ranks <= k) & present).sum(1) / num_pos))
    out[f"HITS@{k}"] = float(np.mean(best <= k))
  out["MRR"] = float(np.mean(1.0 / best))
  out["MedR"] = float(np.median(best))
  out["MeanR"] = float(np.mean(best))
  return out


def _ranks_from_counts(neg_counts: np.ndarray, pos_scores: np.ndarray,
                       present: np.ndarray) -> np.ndarray:
  """Adds the positives ahead of each positive (score, then slot order) to the negative counts.

  Args:
    neg_counts: int [N, P] negatives scoring >= each positive.
    pos_scores: float [N, P] the positives' scores.
    present: bool [N, P] slot holds a positive.

  Returns:
    int64 [N, P] ranks, -1 in absent slots.
  """
  s = pos_scores
  slot = np.arange(s.shape[1])
  ahead = (s[:, None, :] > s[:, :, None]) | (
      (s[:, None, :] == s[:, :, None]) & (slot[None, None, :] < slot[None, :, None]))
  ahead &= present[:, None, :]
  ranks = 1 + neg_counts.astype(np.int64) + ahead.sum(-1)
  return np.where(present, ranks, -1)


# ------------------------------------------------------------------------------------------------
# Full-candidate ranks, chunked (device, jax).
# ------------------------------------------------------------------------------------------------
def _block_scores(a: jax.Array, b: jax.Array) -> jax.Array:
  """[ca, D] x [cb, D] -> [ca, cb]. The ONE dot every score of the full protocol comes from."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _pair_scores(a_chunks, a_pos, blocks, b_chunks):
  """Scores of the listed (query, positive) pairs, read off [ca, cb] blocks.

  Args:
    a_chunks: [na, ca, D] query chunks.
    a_pos: int32 [na, ca, P] gallery indices of the positives, -1 = absent.
    blocks: int32 [na, T] for each query chunk, the gallery chunks holding its positives
      (padded by repeating an entry).
    b_chunks: [nb, cb, D].

  Returns:
    float32 [na, ca, P]; +inf in absent slots.
  """
  cb = b_chunks.shape[1]

  def per_chunk(xs):
    a_c, pos_c, blocks_c = xs

    def body(acc, j):
      s = _block_scores(a_c, b_chunks[j])
      local = pos_c - j * cb
      inside = (pos_c >= 0) & (local >= 0) & (local < cb)
      vals = jnp.take_along_axis(s, jnp.clip(local, 0, cb - 1), axis=1)
      return jnp.where(inside, vals, acc), None

    acc, _ = lax.scan(body, jnp.full(pos_c.shape, jnp.inf, jnp.float32), blocks_c)
    return acc

  return lax.map(per_chunk, (a_chunks, a_pos, blocks))


def _negative_counts(a_chunks, a_pos, a_thr, a_valid, b_chunks, b_thr, b_valid, *, batch_axes):
  """Counts, in one pass over all blocks, negatives scoring >= each positive, both directions.

  Args:
    a_chunks: [na, ca, D] queries (texts for t2i); a_pos int32 [na, ca, P] their positives
      (gallery indices, -1 absent); a_thr float32 [na, ca, P] the positives' scores (+inf
      absent); a_valid bool [na, ca] real (non-padding) rows.
    b_chunks: [nb, cb, D] gallery (images); b_thr float32 [nb, cb, P'] scores of each gallery
      item's own positives (the same pairs, seen from the other side); b_valid bool [nb, cb].
    batch_axes: mesh axes the query chunks are sharded over inside shard_map (psum of the
      per-gallery counts), or () unsharded.

  Returns:
    (int32 [na, ca, P], int32 [nb, cb, P']) negative counts.
  """
  nb, cb = b_chunks.shape[:2]
  cols_in_chunk = jnp.arange(cb, dtype=jnp.int32)

  def per_query_chunk(b_counts, xs):
    a_c, pos_c, thr_c, valid_c = xs

    def body(carry, j):
      a_counts, b_counts = carry
      s = _block_scores(a_c, b_chunks[j])  # [ca, cb]
      cols = j * cb + cols_in_chunk
      is_pos = jnp.any(pos_c[:, None, :] == cols[None, :, None], axis=-1)  # [ca, cb]
      neg = ~is_pos & b_valid[j][None, :] & valid_c[:, None]
      a_counts += jnp.sum(neg[:, :, None] & (s[:, :, None] >= thr_c[:, None, :]), axis=1,
                          dtype=jnp.int32)
      b_counts = b_counts.at[j].add(
          jnp.sum(neg[:, :, None] & (s[:, :, None] >= b_thr[j][None, :, :]), axis=0,
                  dtype=jnp.int32))
      return (a_counts, b_counts), None

    a_counts0 = jnp.zeros(pos_c.shape, jnp.int32)
    (a_counts, b_counts), _ = lax.scan(body, (a_counts0, b_counts), jnp.arange(nb))
    return b_counts, a_counts

  b_counts0 = jnp.zeros(b_thr.shape, jnp.int32)
  b_counts, a_counts = lax.scan(per_query_chunk, b_counts0, (a_chunks, a_pos, a_thr, a_valid))
  if batch_axes:
    b_counts = lax.psum(b_counts, batch_axes)
  return a_counts, b_counts


def _pad_to(x: np.ndarray, n: int, value) -> np.ndarray:
  pad = n - x.shape[0]
  if pad == 0:
    return x
  return np.concatenate([x, np.full((pad,) + x.shape[1:], value, x.dtype)])


def _as_positive_lists(positives, num_queries: int, num_gallery: int) -> np.ndarray:
  """None -> identity [N, 1]; list of lists or int array [N, P] -> int32 [N, P], -1 padded."""
  if positives is None:
    if num_queries != num_gallery:
      raise ValueError(f"positives=None means query i <-> gallery i, but there are "
                       f"{num_queries} queries and {num_gallery} gallery items.")
    return np.arange(num_queries, dtype=np.int32)[:, None]
  if isinstance(positives, np.ndarray) and positives.dtype != object:
    pos = positives.astype(np.int64)
    if pos.ndim == 1:
      pos = pos[:, None]
  else:
    lists = [list(p) if isinstance(p, Iterable) else [p] for p in positives]
    width = max([len(p) for p in lists] + [1])
    pos = np.full((len(lists), width), -1, np.int64)
    for i, p in enumerate(lists):
      pos[i, :len(p)] = p
  if pos.ndim != 2 or pos.shape[0] != num_queries:
    raise ValueError(f"positives has shape {pos.shape}; expected [{num_queries}, P].")
  if (pos >= num_gallery).any() or (pos < -1).any():
    bad = pos[(pos >= num_gallery) | (pos < -1)][0]
    raise ValueError(f"positive index {bad} outside the gallery [0, {num_gallery}).")
  if ((pos >= 0).sum(1) == 0).any():
    q = int(np.argmax((pos >= 0).sum(1) == 0))
    raise ValueError(f"query {q} has no positive.")
  s = np.sort(pos, axis=1)
  if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
    raise ValueError("a query lists the same positive twice.")
  return pos.astype(np.int32)


def _invert_positives(pos: np.ndarray, num_gallery: int) -> tuple[np.ndarray, np.ndarray]:
  """[Nq, P] query -> gallery positives  =>  ([Ng, P'] gallery -> query, [Ng, P'] flat slot).

  The second array gives, for each (gallery item, slot), the flat index q * P + p of the same
  pair in `pos`, so pair scores computed once serve both directions; -1 where absent.
  """
  q_idx, p_idx = np.nonzero(pos >= 0)
  g_idx = pos[q_idx, p_idx]
  order = np.lexsort((q_idx, g_idx))
  g_idx, q_idx, p_idx = g_idx[order], q_idx[order], p_idx[order]
  counts = np.bincount(g_idx, minlength=num_gallery)
  width = max(int(counts.max(initial=0)), 1)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  slot = np.arange(len(g_idx)) - starts[g_idx]
  inv = np.full((num_gallery, width), -1, np.int32)
  flat = np.full((num_gallery, width), -1, np.int64)
  inv[g_idx, slot] = q_idx
  flat[g_idx, slot] = q_idx * pos.shape[1] + p_idx
  return inv, flat


@functools.partial(jax.jit, static_argnames=("batch_axes", "mesh"))
def _full_counts_jit(a_chunks, a_pos, blocks, a_valid, b_chunks, b_valid, inv_flat, *,
                     batch_axes, mesh):
  """Pass 1 (pair scores) and pass 2 (negative counts), sharded over query chunks if mesh."""

  def pass1(a_chunks, a_pos, blocks, b_chunks):
    return _pair_scores(a_chunks, a_pos, blocks, b_chunks)

  def pass2(a_chunks, a_pos, a_thr, a_valid, b_chunks, b_thr, b_valid):
    return _negative_counts(a_chunks, a_pos, a_thr, a_valid, b_chunks, b_thr, b_valid,
                            batch_axes=batch_axes)

  if mesh is not None:
    q, r = P(batch_axes), P()
    # check_vma=False: the scan carries start as constants and become device-varying.
    pass1 = jax.shard_map(pass1, mesh=mesh, in_specs=(q, q, q, r), out_specs=q,
                          check_vma=False)
    pass2 = jax.shard_map(pass2, mesh=mesh, in_specs=(q, q, q, q, r, r, r), out_specs=(q, r),
                          check_vma=False)
  a_thr = pass1(a_chunks, a_pos, blocks, b_chunks)
  flat = a_thr.reshape(-1)
  b_thr = jnp.where(inv_flat >= 0, flat[jnp.clip(inv_flat, 0)], jnp.inf)
  a_counts, b_counts = pass2(a_chunks, a_pos, a_thr, a_valid, b_chunks, b_thr, b_valid)
  return a_thr, a_counts, b_thr, b_counts


def chunk_plan(num_queries: int, num_gallery: int, query_chunk: int, gallery_chunk: int,
               shards: int = 1) -> tuple[int, int, int, int]:
  """Block shapes of the full protocol: (ca, na, cb, nb).

  Balanced chunks: each shard gets ceil(Nq / shards) query rows cut into the fewest chunks of at
  most `query_chunk` rows, and the chunk size is then the smallest that holds them, so the
  padding (dot work on zero rows) is under one row per chunk. Cutting at exactly `query_chunk`
  pads up to a whole chunk per shard: 100k queries on 8 shards at 1024 is 104 chunks x 1024 =
  6.5% padding, balanced (962 rows) 0.05%. The gallery is cut the same way (no shards).

  Returns:
    ca query rows per chunk, na query chunks (a multiple of `shards`), cb gallery rows per
    chunk, nb gallery chunks; na * ca >= Nq, nb * cb >= Ng.

  Raises:
    ValueError naming the value when a size or the shard count is < 1.
  """
  for name, v in (("num_queries", num_queries), ("num_gallery", num_gallery),
                  ("query_chunk", query_chunk), ("gallery_chunk", gallery_chunk),
                  ("shards", shards)):
    if v < 1:
      raise ValueError(f"chunk_plan: {name}={v} must be >= 1.")
  per_shard = -(-num_queries // shards)
  chunks = -(-per_shard // query_chunk)
  ca = -(-per_shard // chunks)
  nb = -(-num_gallery // gallery_chunk)
  cb = -(-num_gallery // nb)
  return ca, chunks * shards, cb, nb


def full_ranks(queries, gallery, positives=None, *, query_chunk: int = 1024,
               gallery_chunk: int = 1024, mesh: Mesh | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Per-positive ranks of every query against the whole gallery, in both directions.

  Args:
    queries: [Nq, D] embeddings (texts for t2i).
    gallery: [Ng, D] embeddings (images).
    positives: which gallery items are positives of each query: None (query i <-> item i),
      an int array [Nq] or [Nq, P] (-1 padded), or a list of index lists. The reverse direction
      (gallery item -> its queries) uses the same pairs.
    query_chunk, gallery_chunk: block sizes; memory O(query_chunk x gallery_chunk).
    mesh: if given, query chunks are sharded over its batch axes (axes.BATCH_AXES present).

  Returns:
    (ranks_q int64 [Nq, P], ranks_g int64 [Ng, P']): 1-based pessimistic ranks (module
    docstring) of each query's positives among the gallery, and of each gallery item's positives
    among the queries (the reverse direction, i2t when queries are texts); -1 in absent slots
    and, for ranks_g, rows of gallery items that are nobody's positive.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must be [N, D] with "
                     "the same D.")
  # A NaN score compares False with everything: its positive would count no negative and get
  # rank 1, so a diverged model would score a perfect R@1.
  for name, x in (("queries", queries), ("gallery", gallery)):
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
      raise ValueError(f"full_ranks: {name} has {int(bad.sum())} rows with NaN or inf (the "
                       f"first is row {int(np.argmax(bad))}); no rank is defined for them.")
  if query_chunk < 1 or gallery_chunk < 1:
    raise ValueError(f"chunk sizes must be >= 1, got {query_chunk}, {gallery_chunk}.")
  nq, ng = queries.shape[0], gallery.shape[0]
  pos = _as_positive_lists(positives, nq, ng)
  inv, inv_flat = _invert_positives(pos, ng)

  batch_axes = ()
  shards = 1
  if mesh is not None:
    batch_axes = tuple(a for a in axes.BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
  ca, na, cb, nb = chunk_plan(nq, ng, query_chunk, gallery_chunk, shards)
  d = queries.shape[1]

  a = _pad_to(queries, na * ca, 0.0).reshape(na, ca, d)
  a_pos = _pad_to(pos, na * ca, -1).reshape(na, ca, -1)
  a_valid = (np.arange(na * ca) < nq).reshape(na, ca)
  b = _pad_to(gallery, nb * cb, 0.0).reshape(nb, cb, d)
  b_valid = (np.arange(nb * cb) < ng).reshape(nb, cb)
  # inv_flat indexes the flat [na * ca * P] pair scores of pass 1 (row q, slot p -> q * P + p).
  inv_flat = _pad_to(inv_flat, nb * cb, -1).reshape(nb, cb, -1).astype(np.int32)

  # Gallery chunks holding each query chunk's positives (one, for the identity pairing).
  chunk_of = np.where(a_pos >= 0, a_pos // cb, -1).reshape(na, -1)
  block_lists = [np.unique(row[row >= 0]) for row in chunk_of]
  width = max(1, max(len(x) for x in block_lists))
  blocks = np.zeros((na, width), np.int32)
  for i, x in enumerate(block_lists):
    if len(x):
      blocks[i] = np.concatenate([x, np.full(width - len(x), x[0])])
  if width > 1:
    logging.info("full_ranks: positives span up to %d gallery chunks per query chunk; the "
                 "pair-score pass costs %d/%d of the main pass.", width, width, nb)

  args = (a, a_pos, blocks, a_valid, b, b_valid, inv_flat)
  if mesh is not None:
    q_sharding = jax.sharding.NamedSharding(mesh, P(batch_axes))
    rep = jax.sharding.NamedSharding(mesh, P())
    args = tuple(jax.device_put(x, s) for x, s in zip(
        args, (q_sharding, q_sharding, q_sharding, q_sharding, rep, rep, rep)))
  outs = _full_counts_jit(*args, batch_axes=batch_axes, mesh=mesh)
  if jax.process_count() > 1:  # Query chunks live on several hosts: gather them everywhere.
    outs = multihost_utils.process_allgather(outs, tiled=True)
  a_thr, a_counts, b_thr, b_counts = (np.asarray(x) for x in jax.device_get(outs))

  a_thr = a_thr.reshape(na * ca, -1)[:nq]
  a_counts = a_counts.reshape(na * ca, -1)[:nq]
  b_thr = b_thr.reshape(nb * cb, -1)[:ng]
  b_counts = b_counts.reshape(nb * cb, -1)[:ng]
  ranks_q = _ranks_from_counts(a_counts, a_thr, pos >= 0)
  ranks_g = _ranks_from_counts(b_counts, b_thr, inv >= 0)
  return ranks_q, ranks_g


def full_candidate_metrics(text_emb, image_emb, positives=None, *,
                           ks: Sequence[int] = DEFAULT_KS, query_chunk: int = 1024,
                           gallery_chunk: int = 1024, mesh: Mesh | None = None
                           ) -> dict[str, float]:
  """Full-candidate retrieval metrics in both directions.

  Args:
    text_emb: [Nt, D]; image_emb: [Ni, D]; positives: images of each text (see `full_ranks`),
      None = text i <-> image i. Image -> text uses the same pairs; images that are no text's
      positive are left out of the i2t queries.
    ks, query_chunk, gallery_chunk, mesh: see `rank_metrics` and `full_ranks`.

  Returns:
    {'t2i_R@K', 't2i_HITS@K', 't2i_MRR', 't2i_MedR', 't2i_MeanR', the same with i2t_, 'SumR'}.
    SumR sums R@1/5/10 of both directions (only the cut-offs among ks).
  """
  r_t2i, r_i2t = full_ranks(text_emb, image_emb, positives, query_chunk=query_chunk,
                            gallery_chunk=gallery_chunk, mesh=mesh)
  r_i2t = r_i2t[(r_i2t > 0).any(1)]
  return _both_directions(rank_metrics(r_t2i, ks), rank_metrics(r_i2t, ks))


def both_directions(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> dict[str, float]:
  """Merges the two directions' `rank_metrics` into one flat dict with their SumR.

  Returns {'t2i_<m>': t2i[m]} | {'i2t_<m>': i2t[m]} | {'SumR': sum of R@1, R@5, R@10 of both
  directions (those present)}: the key layout every retrieval evaluator reports.
  """
  out = {f"t2i_{k}": v for k, v in t2i.items()}
  out.update({f"i2t_{k}": v for k, v in i2t.items()})
  out["SumR"] = sum(d[f"R@{k}"] for d in (t2i, i2t) for k in (1, 5, 10) if f"R@{k}" in d)
  return out


_both_directions = both_directions  # The earlier private name, kept for existing callers.


# ------------------------------------------------------------------------------------------------
# Running top-k (the retrieved lists).
# ------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("gallery_chunk",))
def _topk_jit(queries, block, vals, idx, offset, *, gallery_chunk):
  """Merges one gallery block into the running top-k (vals, idx) [Q, k] of `queries`.

  The block's items are gallery rows offset .. offset + len(block) - 1; the block is padded to a
  multiple of gallery_chunk here (a block-sized copy, never the whole gallery)."""
  nb_items = block.shape[0]
  nb = -(-nb_items // gallery_chunk)
  g = jnp.pad(block, ((0, nb * gallery_chunk - nb_items), (0, 0))).reshape(nb, gallery_chunk, -1)
  local = jnp.arange(nb * gallery_chunk, dtype=jnp.int32).reshape(nb, gallery_chunk)
  k = vals.shape[1]

  def body(carry, j):
    vals, idx = carry
    s = _block_scores(queries, g[j])
    s = jnp.where(local[j][None, :] < nb_items, s, -jnp.inf)
    # Carried entries come first, and blocks and chunks are visited in gallery order:
    # lax.top_k keeps the lower position on ties, so equal scores resolve to the lower gallery
    # index, as a stable sort would.
    all_vals = jnp.concatenate([vals, s], axis=1)
    all_idx = jnp.concatenate([idx, jnp.broadcast_to(local[j] + offset, s.shape)], axis=1)
    vals, pos = lax.top_k(all_vals, k)
    return (vals, jnp.take_along_axis(all_idx, pos, axis=1)), None

  (vals, idx), _ = lax.scan(body, (vals, idx), jnp.arange(nb))
  return vals, idx


def topk_retrieve(queries, gallery, k: int, *, query_chunk: int = 1024,
                  gallery_chunk: int = 1024, gallery_block: int = 131072
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The k best gallery items of every query, via a running top-k over gallery chunks.

  The gallery is walked in host-side blocks of `gallery_block` rows (rounded up to a multiple of
  gallery_chunk), each put on the device once and merged into every query chunk's running top-k;
  inside a block, a jitted scan over chunks of `gallery_chunk` rows. The gallery is never copied
  or padded as a whole: device memory is O(gallery_block x D + query_chunk x (gallery_chunk +
  k)) whatever the gallery size (one block of 131,072 x 512 float32 is 256 MiB; a 1M-item
  gallery stays on the host). Ties resolve to the lower gallery index.

  Args:
    queries: [Nq, D]; gallery: [Ng, D]; k: 1 <= k <= Ng.

  Returns:
    (scores float32 [Nq, k], indices int32 [Nq, k]), best first.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if not 1 <= k <= gallery.shape[0]:
    raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (the gallery size).")
  if gallery_block < 1:
    raise ValueError(f"gallery_block={gallery_block} must be >= 1.")
  nq = queries.shape[0]
  gallery_chunk = min(gallery_chunk, gallery.shape[0])
  gallery_block = -(-gallery_block // gallery_chunk) * gallery_chunk
  qc = min(query_chunk, nq)
  starts = range(0, nq, query_chunk)
  q_dev = [jax.device_put(_pad_to(queries[a:a + query_chunk], qc, 0.0)) for a in starts]
  carry = [(jnp.full((qc, k), -jnp.inf, jnp.float32), jnp.full((qc, k), -1, jnp.int32))
           for _ in starts]
  for offset in range(0, gallery.shape[0], gallery_block):
    block = jax.device_put(gallery[offset:offset + gallery_block])
    carry = [_topk_jit(q, block, v, i, jnp.int32(offset), gallery_chunk=gallery_chunk)
             for q, (v, i) in zip(q_dev, carry)]
    del block
  out = jax.device_get(carry)
  scores = np.concatenate([v for v, _ in out])[:nq]
  ids = np.concatenate([i for _, i in out])[:nq]
  return scores, ids


# ------------------------------------------------------------------------------------------------
# Sample-100.
# ------------------------------------------------------------------------------------------------
def sample_candidates(groups: Sequence[str], fallback_groups: Sequence[str] | None = None, *,
                      num_queries: int = 1000, num_negatives: int = 100,
                      rng: np.random.Generator | int = 0
                      ) -> tuple[np.ndarray, dict[str, float]]:
  """Draws the sample-100 candidate lists: each query's positive and same-group negatives.

  Items are products: item i's text and image are each other's positive. The queries are
  `min(num_queries, N)` distinct items drawn without replacement (all items, shuffled, when
  the split has fewer than `num_queries`: the count is returned as `num_queries`). For each
  query q, `num_negatives` distinct items other than q are drawn without replacement:
    1. from q's group (sub-category);
    2. if the group has fewer than `num_negatives` other items, all of them plus the rest from q's
       fallback group (category) outside the group;
    3. if still short, the rest from anywhere else in the split.
  An empty group name ('' = unknown in the product schema) has no members: such a query goes
  straight to the fallback. How often steps 2 and 3 were needed is returned, so a number computed
  on a split with thin sub-categories says so.

  Args:
    groups: [N] sub-category of each item.
    fallback_groups: [N] category of each item, or None (skip step 2).
    num_queries: queries to draw (1000 in FashionBERT/FashionViL).
    num_negatives: negatives per query (100); needs N >= num_negatives + 1.
    rng: a numpy Generator or a seed.

  Returns:
    (candidates int64 [Q, 1 + num_negatives], stats): candidates[:, 0] is the query item (its own
    positive), the rest its negatives. stats: num_queries, fill_fallback_frac (queries that
    needed step 2), fill_any_frac (needed step 3).
  """
  groups = np.asarray(groups, dtype=object)
  n = groups.shape[0]
  if fallback_groups is not None:
    fallback_groups = np.asarray(fallback_groups, dtype=object)
    if fallback_groups.shape != groups.shape:
      raise ValueError(f"fallback_groups has shape {fallback_groups.shape}, groups "
                       f"{groups.shape}.")
  if num_negatives < 1 or n < num_negatives + 1:
    raise ValueError(f"num_negatives={num_negatives} needs a split of at least "
                     f"{num_negatives + 1} items; this one has {n}.")
  if num_queries < 1:
    raise ValueError(f"num_queries={num_queries} must be >= 1.")
  rng = np.random.default_rng(rng)

  def members(labels):
    out = {}
    for i, g in enumerate(labels):
      if g != "":
        out.setdefault(g, []).append(i)
    return {g: np.asarray(v) for g, v in out.items()}

  by_group = members(groups)
  by_fallback = members(fallback_groups) if fallback_groups is not None else {}
  empty = np.zeros(0, np.int64)

  queries = rng.choice(n, size=min(num_queries, n), replace=False)
  cands = np.empty((len(queries), 1 + num_negatives), np.int64)
  n_fallback = n_any = 0
  for row, q in enumerate(queries):
    chosen = []
    need = num_negatives
    pool = by_group.get(groups[q], empty)
    pool = pool[pool != q]
    if len(pool) >= need:
      chosen.append(rng.choice(pool, need, replace=False))
      need = 0
    else:
      chosen.append(pool)
      need -= len(pool)
    taken = {q, *pool.tolist()}
    if need and fallback_groups is not None:
      n_fallback += 1
      pool = by_fallback.get(fallback_groups[q], empty)
      pool = pool[[i not in taken for i in pool.tolist()]] if len(pool) else pool
      take = min(need, len(pool))
      chosen.append(rng.choice(pool, take, replace=False) if take else empty)
      taken.update(chosen[-1].tolist())
      need -= take
    if need:
      n_any += 1
      mask = np.ones(n, bool)
      mask[list(taken)] = False
      chosen.append(rng.choice(np.flatnonzero(mask), need, replace=False))
    cands[row, 0] = q
    cands[row, 1:] = np.concatenate(chosen)
  stats = {"num_queries": float(len(queries)),
           "fill_fallback_frac": n_fallback / len(queries),
           "fill_any_frac": n_any / len(queries)}
  return cands, stats


def candidate_ranks(scores) -> np.ndarray:
  """Pessimistic rank of column 0 (the positive) among the columns of `scores` [Q, C] -> [Q].

  Works for any scorer, e.g. a cross-encoder's alignment logits over the sampled candidates.
  """
  scores = np.asarray(scores)
  return 1 + (scores[:, 1:] >= scores[:, :1]).sum(1)


@jax.jit
def _candidate_scores(queries, gallery, candidates):
  """[Q, D] x [N, D] x int [Q, C] -> [Q, C] scores <q, gallery[candidates[q, c]]>."""
  return jnp.einsum("qd,qcd->qc", queries, gallery[candidates],
                    preferred_element_type=jnp.float32)


def sample_metrics(text_emb, image_emb, candidates, *, ks: Sequence[int] = DEFAULT_KS
                   ) -> dict[str, float]:
  """Both directions on one candidate draw: text q ranks images[candidates[q]], image q ranks
  texts[candidates[q]] (the same products). Returns the keys of `full_candidate_metrics`."""
  text_emb = jnp.asarray(text_emb, jnp.float32)
  image_emb = jnp.asarray(image_emb, jnp.float32)
  candidates = np.asarray(candidates)
  q = candidates[:, 0]
  t2i = candidate_ranks(jax.device_get(_candidate_scores(text_emb[q], image_emb, candidates)))
  i2t = candidate_ranks(jax.device_get(_candidate_scores(image_emb[q], text_emb, candidates)))
  return _both_directions(rank_metrics(t2i, ks), rank_metrics(i2t, ks))


def sample100_metrics(text_emb, image_emb, groups, fallback_groups=None, *,
                      num_queries: int = 1000, num_negatives: int = 100, repeats: int = 5,
                      seed: int = 0, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """The sample-100 protocol: `sample_metrics` averaged over `repeats` seeded draws.

  Draw r uses numpy's Generator seeded with (seed, r), so results are reproducible and the
  repeats independent. Returns the metric keys of `full_candidate_metrics` (means over the
  repeats) plus the sampler stats (averaged) of `sample_candidates`.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1.")
  runs = []
  for r in range(repeats):
    cands, stats = sample_candidates(groups, fallback_groups, num_queries=num_queries,
                                     num_negatives=num_negatives,
                                     rng=np.random.default_rng([seed, r]))
    runs.append({**sample_metrics(text_emb, image_emb, cands, ks=ks), **stats})
  return {k: float(np.mean([m[k] for m in runs])) for k in runs[0]}


# ------------------------------------------------------------------------------------------------
# Field queries.
# ------------------------------------------------------------------------------------------------
def field_queries(values: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
  """(distinct non-blank values sorted, gallery indices of the products with each value).

  Values are compared after stripping surrounding whitespace; blank values have no query.
  """
  groups: dict[str, list[int]] = {}
  for i, v in enumerate(values):
    v = str(v).strip()
    if v:
      groups.setdefault(v, []).append(i)
  names = sorted(groups)
  return names, [np.asarray(groups[n], np.int64) for n in names]


def field_metrics(query_emb, image_emb, positives: Sequence[np.ndarray], *,
                  ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """HITS@K, P@K and MRR of field queries (module docstring, "Field queries").

  Args:
    query_emb: [Q, D] one embedding per distinct value.
    image_emb: [N, D] the gallery.
    positives: Q arrays of gallery indices (each non-empty).
    ks: cut-offs K (P@K over min(K, N) items when the gallery is smaller).

  Returns:
    {'HITS@K', 'P@K' for K in ks, 'MRR', 'num_queries'} as python floats. Scores come from one
    float32 matmul; the ranking is pessimistic in ties.
  """
  q = np.asarray(query_emb, np.float32)
  g = np.asarray(image_emb, np.float32)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"query_emb {q.shape} and image_emb {g.shape} must be [N, D] with the "
                     "same D.")
  if len(positives) != q.shape[0] or q.shape[0] == 0:
    raise ValueError(f"{len(positives)} positive lists for {q.shape[0]} queries (need the "
                     "same number, > 0).")
  for k in ks:
    if k < 1:
      raise ValueError(f"Cut-off K={k} must be >= 1.")
  n = g.shape[0]
  scores = np.asarray(jax.device_get(_block_scores(jnp.asarray(q), jnp.asarray(g))))
  hits = {k: [] for k in ks}
  prec = {k: [] for k in ks}
  rr = []
  for row, pos in zip(scores, positives):
    if len(pos) == 0:
      raise ValueError("a field query has no matching product.")
    match = np.zeros(n, bool)
    match[pos] = True
    best = row[match].max()
    rank = 1 + int(np.sum(~match & (row >= best)))
    # Sort by score, non-matching first among equal scores (pessimistic ties).
    order = np.lexsort((match, -row))
    rr.append(1.0 / rank)
    for k in ks:
      hits[k].append(rank <= k)
      prec[k].append(match[order[:min(k, n)]].sum() / k)
  out = {}
  for k in ks:
    out[f"HITS@{k}"] = float(np.mean(hits[k]))
    out[f"P@{k}"] = float(np.mean(prec[k]))
  out["MRR"] = float(np.mean(rr))
  out["num_queries"] = float(len(positives))
  return out


_COUNTS = ("num_items", "num_queries", "fill_fallback_frac", "fill_any_frac")


def _dim_suffix(dim: int, width: int) -> str:
  """'' for the full width (dim 0 or the width), '@d{dim}' for a Matryoshka prefix."""
  return "" if dim in (0, width) else f"@d{dim}"


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------
class Evaluator:
  """Retrieval on one split with the full and/or sample protocol, both directions.

  Built by the trainer as `Evaluator(system=..., config=..., mesh=..., **config.evals[name])`
  minus `type`/`every`. Each product contributes one image (the pipeline's first view) and one
  text: text i <-> image i is the only positive pair.

  Metric names: `{split}/full/{t2i,i2t}_{R@K,HITS@K,MRR,MedR,MeanR}`, `{split}/full/SumR`,
  `{split}/sample{num_negatives}/...` the same keys plus `num_queries`, `fill_fallback_frac`,
  `fill_any_frac` (how often the sub-category had too few negatives); each protocol also gives
  `num_items` (products in the split). With `num_negatives` other than 100 the protocol is named
  `sample<num_negatives>`, so a number never claims a gallery it did not have.
  Protocol 'field' (needs `query_field`): `{split}/field_{query_field}/{HITS@K,P@K,MRR,
  num_queries}` (module docstring, "Field queries"); queries are `query_template` filled with
  each distinct value, tokenized with config.data's tokenizer.
  Matryoshka: `dims` (None = the system's `matryoshka_dims`, if any) are the prefix widths
  evaluated; each metric of a width m below the full one carries the suffix `@d{m}`.
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split, with at least 2 products (full: R@K on a gallery of N <= K products is 1 by
    construction, warned) and num_negatives + 1 for the sample protocol, plus its group fields."""
    a = base.arguments(cls, kwargs)
    needs = []
    if "full" in a["protocols"]:
      k = max(a["ks"])
      needs.append(base.DataNeed(
          a["split"], min_examples=2, warn_below=k + 1,
          why=f"full-gallery retrieval (R@K is 1 by construction when the gallery has <= K "
              f"products; K up to {k})"))
    if "field" in a["protocols"] and a["query_field"]:
      needs.append(base.DataNeed(
          a["split"], fields=(a["query_field"],), labelled=(a["query_field"],), min_examples=2,
          why=f"queries from the field {a['query_field']!r} against the product images"))
    if "sample100" in a["protocols"]:
      fields = tuple(f for f in (a["group_field"], a["fallback_field"]) if f)
      needs.append(base.DataNeed(
          a["split"], fields=fields, min_examples=a["num_negatives"] + 1,
          why=f"the sample{a['num_negatives']} protocol (a query and {a['num_negatives']} "
              "negatives)"))
    return needs

  def __init__(self, system, config, mesh: Mesh | None = None, *, split: str = "test",
               protocols: Sequence[str] = ("full", "sample100"), ks: Sequence[int] = DEFAULT_KS,
               batch_size: int = 64, chunk: int = 1024, num_queries: int = 1000,
               num_negatives: int = 100, repeats: int = 5, seed: int = 0,
               group_field: str = "subcategory", fallback_field: str | None = "category",
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None,
               query_field: str | None = None, query_template: str = "{}",
               dims: Sequence[int] | None = None,
               tokenizer: Callable[[list[str]], np.ndarray] | None = None):
    unknown = sorted(set(protocols) - {"full", "sample100", "field"})
    if unknown or not protocols:
      raise ValueError(f"Unknown retrieval protocol(s) {unknown or list(protocols)}; choose from "
                       "'full', 'sample100', 'field'.")
    if ("field" in protocols) != bool(query_field):
      raise ValueError(f"protocols={tuple(protocols)} and query_field={query_field!r}: the "
                       "'field' protocol and query_field go together (e.g. protocols=('field',),"
                       " query_field='primary_color').")
    if "{}" not in query_template:
      raise ValueError(f"query_template={query_template!r} has no '{{}}' for the value.")
    self.query_field, self.query_template = query_field, query_template
    if dims is None:
      dims = tuple(getattr(system, "matryoshka_dims", ()) or ())
    self.dims = matryoshka.check_dims(tuple(dims) or (0,), what="dims")
    self._tokenizer = tokenizer
    self.system, self.config, self.mesh = system, config, mesh
    self.split, self.protocols, self.ks = split, tuple(protocols), tuple(ks)
    self.batch_size, self.chunk = batch_size, chunk
    self.num_queries, self.num_negatives = num_queries, num_negatives
    self.repeats, self.seed = repeats, seed
    self.group_field, self.fallback_field = group_field, fallback_field
    self.embedder = common.Embedder(system, mesh)
    self.dataset_fn = dataset_fn

  def run(self, params) -> dict[str, float]:
    fields = ()
    if "sample100" in self.protocols:
      fields = tuple(f for f in (self.group_field, self.fallback_field) if f)
    if "field" in self.protocols:
      fields = tuple(dict.fromkeys(fields + (self.query_field,)))
    data = self.embedder.embed_split(
        params, common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                    fields=fields, dataset_fn=self.dataset_fn),
        texts=bool(set(self.protocols) & {"full", "sample100"}), fields=fields)
    width = data["image"].shape[1]
    matryoshka.check_dims(self.dims, width, "dims")
    queries = None
    if "field" in self.protocols:
      values, positives = field_queries(data[self.query_field])
      if not values:
        raise ValueError(f"split {self.split!r} has no product with a non-blank "
                         f"{self.query_field!r}.")
      tokenize = self._tokenizer or common.tokenizer_from_config(self.config)
      queries = self.embedder.embed_tokens(
          params, np.asarray(tokenize([self.query_template.format(v) for v in values])))
    out = {}
    for dim in self.dims:
      suffix = _dim_suffix(dim, width)
      # Counts do not depend on the width: reported once, without a suffix.
      emit = lambda prefix, m, sfx=suffix: out.update(
          {f"{prefix}/{k}{sfx}": v for k, v in m.items() if not (sfx and k in _COUNTS)})
      # The full width as embedded (already unit vectors); a prefix cut and re-normalised.
      cut = lambda x, d=dim: (x if not suffix
                              else matryoshka.truncate_and_normalize(np.asarray(x, np.float32), d))
      image = cut(data["image"])
      if "full" in self.protocols:
        m = full_candidate_metrics(cut(data["text"]), image, ks=self.ks,
                                   query_chunk=self.chunk, gallery_chunk=self.chunk,
                                   mesh=self.mesh)
        m["num_items"] = float(image.shape[0])
        emit(f"{self.split}/full", m)
      if "sample100" in self.protocols:
        m = sample100_metrics(
            cut(data["text"]), image, data[self.group_field],
            data[self.fallback_field] if self.fallback_field else None,
            num_queries=self.num_queries, num_negatives=self.num_negatives,
            repeats=self.repeats, seed=self.seed, ks=self.ks)
        m["num_items"] = float(image.shape[0])
        emit(f"{self.split}/sample{self.num_negatives}", m)
      if queries is not None:
        m = field_metrics(cut(queries), image, positives, ks=self.ks)
        m["num_items"] = float(image.shape[0])
        emit(f"{self.split}/field_{self.query_field}", m)
    return out
