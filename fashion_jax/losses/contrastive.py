"""Contrastive losses over the GLOBAL batch, dense or blockwise, and chunked encoding.

Under jit with a batch sharded over the mesh's batch axes, `a @ b.T` below is a global
computation: XLA all-gathers what it needs, so every example sees every other example of the
global batch as a negative (the "gather negatives across devices" of CLIP/FashionViL) without any
explicit collective in the loss. tests/test_contrastive.py checks this against one device.

Two memory levers live here; neither changes the loss or its gradients beyond rounding
(tests/test_plan.py and tests/test_levers.py check both against the dense computation):

* `info_nce(..., num_blocks=K)`: the [B, B] logits are never materialised. The rows of `a` are
  split into K blocks of B/K rows (block k = rows k, K+k, 2K+k, ..., so every device holds the
  same share of every block and no row moves between devices), a `lax.scan` computes each
  block's [B/K, B] logits, their row log-sum-exps, and folds them into a running column
  log-sum-exp (online softmax: m <- max(m, max_r S_rc), s <- s e^(m_old - m) + sum_r e^(S_rc - m)).
  The scan body is rematerialised, so the backward pass recomputes each block's logits instead
  of storing them: memory O(B^2 / K) instead of O(B^2), gradients exact (plain autodiff of the
  same formula).

* `map_in_chunks(fn, xs, num_chunks)`: `fn` (an encoder) applied to K row-chunks of the batch
  inside a rematerialised `lax.scan`, results reassembled in the original row order. Autodiff
  of this is the "gradient cache" trick (Gao et al. 2021) for free: the forward keeps only each
  chunk's output, the backward recomputes one chunk's activations at a time and back-propagates
  the full-batch loss's gradient into it. Unlike gradient accumulation (train/step.py), the
  contrastive loss still sees every example of the global batch as a negative, so the objective
  is unchanged; activation memory is that of B/K examples, at the cost of one extra forward.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_blocks(n: int, num_blocks: int, what: str) -> None:
  if not isinstance(num_blocks, int) or num_blocks < 1:
    raise ValueError(f"{what}={num_blocks!r} must be a positive int.")
  if n % num_blocks:
    raise ValueError(f"{what}={num_blocks} does not divide the batch of {n} rows.")


def _row_blocks(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [K, B/K, ...] with block i = rows i, K+i, 2K+i, ...; axis 1 keeps the batch
  sharding (logical 'act_batch')."""
  blocks = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(blocks, (None, "act_batch") + (None,) * (x.ndim - 1))


def _unblock(x: jax.Array) -> jax.Array:
  """Inverse of `_row_blocks`: [K, B/K, ...] -> [B, ...]."""
  k, n = x.shape[:2]
  out = x.swapaxes(0, 1).reshape((k * n,) + x.shape[2:])
  return nn.with_logical_constraint(out, ("act_batch",) + (None,) * (out.ndim - 1))


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array, num_blocks: int = 1,
             pair_weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE (CLIP's loss) of paired embeddings.

  Args:
    a: [B, D] embeddings (e.g. images), row i paired with row i of `b`.
    b: [B, D] embeddings (e.g. texts).
    scale: scalar multiplier of the similarities (CLIP's exp(logit_scale); the optimizer keeps
      logit_scale <= log 100, train/optimizer.py).
    num_blocks: 1 = dense [B, B] logits; K > 1 = the blockwise computation of the module
      docstring (K must divide B). Same loss and gradients up to float32 rounding.
    pair_weight: optional [B] float v (GCL's per-pair weights, losses/pair_weights.py): row i's
      and column i's cross-entropy terms are multiplied by v_i, still averaged over the B rows:
      loss = 1/2 [ (1/B) sum_i v_i CE_row(i) + (1/B) sum_i v_i CE_col(i) ]. v all 1 gives the
      unweighted loss bitwise (a product with exactly 1.0).

  Returns:
    loss = 1/2 [ CE(S, I) + CE(S^T, I) ] with S = scale * a b^T (mean over rows), and metrics
    `a2b_acc`, `b2a_acc` (in-batch top-1 accuracy of the paired row). Computed in float32
    whatever the embedding dtype: a bf16 softmax over a 32k batch loses the positive.
    Accuracy ties: dense takes the first argmax; blockwise counts a row as a hit when its
    positive is >= every logit of the row (the same unless two logits are bitwise equal).
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n = a.shape[0]
  _check_blocks(n, num_blocks, "num_blocks")
  v = None
  if pair_weight is not None:
    if jnp.shape(pair_weight) != (n,):
      raise ValueError(f"info_nce: pair_weight {jnp.shape(pair_weight)} must be [B] = ({n},).")
    v = jnp.asarray(pair_weight, jnp.float32)
  weigh = (lambda x: x) if v is None else (lambda x: v * x)
  if num_blocks > 1:
    return _blockwise_info_nce(a, b, scale, num_blocks, weigh)
  logits = scale * (a @ b.T)  # [B, B]
  labels = jnp.arange(logits.shape[0])
  log_p_a2b = jax.nn.log_softmax(logits, axis=1)
  log_p_b2a = jax.nn.log_softmax(logits, axis=0)
  loss_a2b = -jnp.mean(weigh(log_p_a2b[labels, labels]))
  loss_b2a = -jnp.mean(weigh(log_p_b2a[labels, labels]))
  loss = 0.5 * (loss_a2b + loss_b2a)
  metrics = {
      "a2b_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "b2a_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
  }
  return loss, metrics


def _blockwise_info_nce(a, b, scale, k, weigh):
  """`info_nce` with K row blocks (see the module docstring). a, b: float32 [B, D]; weigh:
  [B] -> [B], the per-pair weighting of the row / column terms (identity when unweighted)."""
  n = a.shape[0]
  rows = _row_blocks(a, k)                                  # [K, B/K, D]
  # Column of row j of block i is j K + i: its positive.
  pos_cols = _row_blocks(jnp.arange(n), k)                  # [K, B/K]

  @jax.checkpoint  # Backward recomputes the block's logits: only the carry is stored.
  def body(carry, xs):
    col_max, col_sum = carry                                # [B], [B]
    x, cols = xs                                            # [B/K, D], [B/K]
    logits = scale * (x @ b.T)                              # [B/K, B]
    pos = jnp.take_along_axis(logits, cols[:, None], axis=1)[:, 0]
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    row_lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1))
    new_max = jnp.maximum(col_max, jax.lax.stop_gradient(jnp.max(logits, axis=0)))
    col_sum = (col_sum * jnp.exp(col_max - new_max)
               + jnp.sum(jnp.exp(logits - new_max[None, :]), axis=0))
    return (new_max, col_sum), (pos, row_lse, pos >= row_max)

  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
  (col_max, col_sum), (pos, row_lse, row_hit) = jax.lax.scan(body, init, (rows, pos_cols))
  pos, row_lse, row_hit = _unblock(pos), _unblock(row_lse), _unblock(row_hit)  # [B] each
  col_lse = col_max + jnp.log(col_sum)
  loss = 0.5 * (jnp.mean(weigh(row_lse - pos)) + jnp.mean(weigh(col_lse - pos)))
  metrics = {"a2b_acc": jnp.mean(row_hit), "b2a_acc": jnp.mean(pos >= col_max)}
  return loss, metrics


def map_in_chunks(fn: Callable[..., Any], *xs: jax.Array, num_chunks: int = 1) -> Any:
  """`fn(*xs)` computed on `num_chunks` row-chunks at a time, rematerialised (gradient cache).

  Args:
    fn: maps arrays [b, ...] (leading batch axis) to a pytree of arrays [b, ...]; must treat
      rows independently (an encoder in inference-style mode: no batch statistics).
    *xs: arrays with the same leading batch size B.
    num_chunks: K; must divide B. 1 calls `fn(*xs)` directly.

  Returns:
    The pytree `fn(*xs)` would return, rows in the original order. Chunk i holds rows
    i, K+i, 2K+i, ..., so each device encodes the same number of rows per chunk.
  """
  n = xs[0].shape[0]
  _check_blocks(n, num_chunks, "num_chunks")
  if any(x.shape[0] != n for x in xs):
    raise ValueError(f"map_in_chunks: leading sizes differ: {[x.shape[0] for x in xs]}.")
  if num_chunks == 1:
    return fn(*xs)
  chunks = tuple(_row_blocks(x, num_chunks) for x in xs)
  # prevent_cse=False: inside scan the remat cannot be CSE'd away (JAX's advice for scan bodies).
  step = jax.checkpoint(lambda _, c: (None, fn(*c)), prevent_cse=False)
  _, out = jax.lax.scan(step, None, chunks)
  return jax.tree.map(_unblock, out)


def encode_distinct(encode: Callable[[jax.Array], Any], ids: jax.Array, max_distinct: int
                    ) -> tuple[Any, jax.Array, jax.Array]:
  """`encode(ids)` with each distinct row of `ids` encoded once (the field texts of a batch).

  A multi-field batch's B * F field texts repeat: a batch of 64 synthetic products has 86-103
  distinct texts among its 320 colour, pattern, material, sub-category and brand texts. The
  distinct rows (`jnp.unique` over axis 0: one sort of the rows, gathered to every device) are
  encoded in a static [U, ...] array, U = max_distinct, and gathered back to the N rows. Exact:
  equal rows give equal outputs, and the gradient of a row's copies is summed by the gather's
  transpose instead of in the weight gradients (float rounding only). A batch with more than U
  distinct rows runs `encode(ids)` instead (`lax.cond`: the same result at full cost; both
  branches are compiled and the untaken one does not run). That fallback is rematerialised:
  under autodiff, `lax.cond` passes every branch's residuals out of the forward, zero-filled for
  the branch not taken, so the full encode's activations would be written as zeros on every
  step (most of the saving lost, docs/benchmarks.md). Rematerialised, its residuals are its
  inputs, and a step that falls back runs that forward twice.

  Args:
    encode: maps int rows [n, ...] to a pytree of arrays [n, ...]; rows must be encoded
      independently and deterministically (no dropout, no batch statistics).
    ids: [N, ...] integer rows.
    max_distinct: U (static). U >= N (or 0) calls `encode(ids)` directly.

  Returns:
    (outputs, distinct, fell_back): `encode(ids)`'s pytree [N, ...]; the number of distinct rows
    (int32; N when not counted); whether the full encode ran (bool).
  """
  n = ids.shape[0]
  if not isinstance(max_distinct, int) or max_distinct < 0:
    raise ValueError(f"max_distinct={max_distinct!r} must be an int >= 0 (0 = off).")
  if max_distinct == 0 or max_distinct >= n:
    return encode(ids), jnp.int32(n), jnp.bool_(True)
  # size=n: nothing is cut, so the count is exact; padding rows have count 0.
  rows, inverse, counts = jnp.unique(ids, axis=0, size=n, return_inverse=True,
                                     return_counts=True)
  distinct = jnp.sum(counts > 0).astype(jnp.int32)
  fits = distinct <= max_distinct
  inverse = inverse.reshape(n)

  def once():
    return jax.tree.map(lambda e: e[inverse], encode(rows[:max_distinct]))

  full = jax.checkpoint(encode)
  return jax.lax.cond(fits, once, lambda: full(ids)), distinct, jnp.logical_not(fits)
