"""SigLIP's pairwise sigmoid loss over the GLOBAL batch: dense, ring (shard_map) and blockwise.

Formula (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"; big_vision's siglip
trainer; open_clip's SigLipLoss):

  x, y  [B, D]        L2-normalised image / text embeddings; row i of x is paired with row i of y
  t = exp(t')         learnable temperature; t' initialised to log 10 (`INIT_LOG_TEMPERATURE`)
  b                   learnable bias, initialised to -10 (`INIT_BIAS`)
  z_ij = t <x_i, y_j> + b                       [B, B] logits
  l_ij = +1 if i == j (a matching pair) else -1
  loss = -(1/B) sum_i sum_j log sigmoid(l_ij z_ij)

Deliberate choices:

* Normalised by B (the number of pairs), not B^2, as in the paper and big_vision: the loss of
  one image is a SUM over all B texts, so the gradient each positive receives does not shrink
  as the batch grows. (t', b) are the caller's parameters (it owns their init and optimizer);
  this module only defines the two init constants.
* `jax.nn.log_sigmoid` throughout; logits, sums and gradients in float32 whatever the
  embedding dtype (a bf16 sum of 32k log-sigmoids loses the positives).
* `pair_mask` [B] bool (optional): row i False removes the pair i (image i AND text i, e.g. a
  product without a text field) from the loss: it is neither a positive nor a negative of
  anything. With w_ij = m_i m_j and N = sum_i m_i:
      loss = -(1/N) sum_ij w_ij log sigmoid(l_ij z_ij)      (0 when N = 0)
  i.e. exactly the unmasked loss of the sub-batch of valid rows.
* `pair_weight` [B] float (optional, GCL's per-pair weights, losses/pair_weights.py): the
  POSITIVE term of pair i is multiplied by v_i, the negatives are not:
      loss = -(1/N) sum_ij w_ij c_ij log sigmoid(l_ij z_ij),  c_ii = v_i, c_ij = 1 (i != j)
  still divided by N (not by sum v). With every v_i = 1 the loss and gradients are bitwise
  the unweighted ones (the code multiplies by exactly 1.0).
* `pair_keys` [B] or [B, H] int (optional): the pair (i, j) is a positive, l_ij = +1, when
  row i and row j have equal keys (all H of them), not only when i == j. For a product field
  with few distinct values (colour, brand), the keys identify the value
  (`token_keys` of the field's tokens): every image whose colour text is "navy" is then a
  positive of every "navy" text in the batch, instead of a negative of all but its own copy
  of the same text (which asks the model to tell identical texts apart: at batch 64 and 12
  colours, ~5 of a row's 63 negatives are its own text). Without keys, l_ij = +1 iff i == j.
  Pair weights c_ij = v_i apply to every positive of row i.
* Metrics (never differentiated: wrapped in stop_gradient): `pos_logit` (mean z_ij over the
  valid positive pairs: the diagonal without keys), `neg_logit` (mean z_ij over the valid
  negative pairs), `temperature` t, `bias` b, `num_valid` N.

Three computations of the same number (tests/test_sigmoid_loss.py checks values and
gradients of each against the others and against a float64 numpy formula):

* `sigmoid_loss`: dense [B, B] logits; the reference.
* `ring_sigmoid_loss`: under `jax.shard_map` over the mesh's batch axes ('data', 'fsdp';
  n = data * fsdp shards, b = B/n rows each), each device keeps its image shard x_r [b, D]
  and passes its text shard around the ring (device r -> r + 1) with `lax.ppermute`, n - 1
  times; at step s device r holds the text chunk of device r - s and adds the [b, b] block
  loss of x_r against it. Without keys only step 0 (the chunk that started on the same device)
  holds positives, on its diagonal; with `pair_keys` the chunk's keys [b, H] travel with it and
  any step may hold positives. The per-device sums are `psum`med at the end. The backward is a
  `custom_vjp` that runs the same ring again, carrying each text chunk together with the
  accumulator of ITS gradient; after the n - 1 moves one more `ppermute` brings every text
  gradient home. (Plain autodiff through the forward ring would also be exact, but it keeps
  the n received chunks as residuals, B D per device, i.e. an all-gather of the texts.)
* `blockwise_sigmoid_loss` (no shard_map): a `lax.scan` over K text blocks of B/K rows (block
  k = rows k, K+k, 2K+k, ... as `contrastive.info_nce` does, so under a batch-sharded jit
  every device holds the same share of every block), each step computing the [B, B/K] logits
  of all images against one block; the body is `jax.checkpoint`ed, so the backward recomputes
  one block's logits at a time instead of storing [B, B]. Plain autodiff, exact.

Memory of the pairwise buffers, per device, s = bytes per element, counting one logits block
and its cotangent (the loss is differentiated; `sigmoid_loss_memory_bytes` returns these):
  dense:      2 B^2 s                     (+ the texts all-gathered, B D s)
  ring:       2 (B/n)^2 s + 4 (B/n) D s   (the held text chunk and the one in flight, and in
                                           the backward the same two for their gradients)
  blockwise:  2 B (B/K) s                 (on one device; a batch-sharded jit splits the rows)
E.g. SigLIP B/16 (D = 768), B = 32k on 64 chips, f32: dense 8.6 GB, ring 8.4 MB (2.1 MB of
logits, 6.3 MB of chunks), blockwise with K = 64: 134 MB.
These are lower bounds of what XLA allocates. Measured `temp_size_in_bytes` of the compiled
value_and_grad (CPU, jax 0.10.2, B = 512, D = 16, tests/test_sigmoid_loss.py): dense on one
device 4.2 MB = 4 B^2 s (formula 2.1 MB); under a jit whose batch is sharded 8 ways, dense
557 kB per device (GSPMD splits the rows: ~[B/8, B] buffers), blockwise K = 8 122 kB, ring
67 kB (formula 49 kB), and the ring's program holds no [B, B] or [B/n, B] buffer.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from fashion_jax.losses import contrastive
from fashion_jax.parallel import axes
from fashion_jax.parallel import mesh as mesh_lib

INIT_LOG_TEMPERATURE = math.log(10.0)  # t' (t = exp(t') = 10), the paper's init.
INIT_BIAS = -10.0                       # b, the paper's init.

# Sums every computation returns before normalising: (loss, positive logits, negative logits,
# number of positive pairs).
_Sums = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def token_keys(ids: jax.Array) -> jax.Array:
  """int32 [..., 2] keys of token rows ids [..., L]: two polynomial hashes (mod 2^32, bases
  1000003 and 998244353) of the row, so rows with equal tokens have equal keys, and two
  different rows share both keys with probability ~2^-64 (the `pair_keys` of a field term)."""
  ids = jnp.asarray(ids).astype(jnp.uint32)

  def poly(base):
    powers = jnp.cumprod(jnp.full((ids.shape[-1],), base, jnp.uint32))  # Wraps mod 2^32.
    return jnp.sum(ids * powers, axis=-1, dtype=jnp.uint32)

  return lax.bitcast_convert_type(jnp.stack([poly(1000003), poly(998244353)], -1), jnp.int32)


def same_key(kx, ky):
  """[r, c] bool: row i of kx [r, H] equals row j of ky [c, H]."""
  return jnp.all(kx[:, None, :] == ky[None, :, :], axis=-1)


def as_pair_keys(pair_keys, n: int, who: str) -> jax.Array:
  """int [B] or [B, H] pair keys -> int32 [B, H]; ValueError naming `who` for another shape."""
  keys = jnp.asarray(pair_keys)
  keys = keys[:, None] if keys.ndim == 1 else keys
  if keys.ndim != 2 or keys.shape[0] != n or not jnp.issubdtype(keys.dtype, jnp.integer):
    raise ValueError(f"{who}: pair_keys {jnp.shape(pair_keys)} ({keys.dtype}) must be int [B] "
                     f"or [B, H] with B = {n}.")
  return keys.astype(jnp.int32)


def _prepare(img, txt, log_temperature, bias, pair_mask, pair_weight=None, pair_keys=None):
  """float32 copies of the inputs, the [B] float mask, the [B] float32 pair weights and the
  [B, H] int32 pair keys (each None when not given); checks the shapes."""
  if img.ndim != 2 or img.shape != txt.shape:
    raise ValueError(f"sigmoid loss: img {img.shape} and txt {txt.shape} must both be [B, D].")
  n = img.shape[0]
  if pair_mask is None:
    mask = jnp.ones((n,), jnp.float32)
  else:
    if jnp.shape(pair_mask) != (n,):
      raise ValueError(f"sigmoid loss: pair_mask {jnp.shape(pair_mask)} must be [B] = ({n},).")
    mask = jnp.asarray(pair_mask).astype(jnp.float32)
  weight = None
  if pair_weight is not None:
    if jnp.shape(pair_weight) != (n,):
      raise ValueError(f"sigmoid loss: pair_weight {jnp.shape(pair_weight)} must be [B] = "
                       f"({n},).")
    weight = jnp.asarray(pair_weight, jnp.float32)
  keys = None if pair_keys is None else as_pair_keys(pair_keys, n, "sigmoid loss")
  return (img.astype(jnp.float32), txt.astype(jnp.float32),
          jnp.asarray(log_temperature, jnp.float32), jnp.asarray(bias, jnp.float32), mask,
          weight, keys)


def _positive_weights(w, positive, vx):
  """w [r, c] with the positive entries also multiplied by the row's pair weight vx [r]."""
  if vx is None:
    return w
  return w * jnp.where(positive, vx[:, None], 1.0)


def _block_sums(x, y, mx, my, log_t, bias, positive, vx=None) -> _Sums:
  """(loss sum, positive-logit sum, negative-logit sum, positive count) of the block x [r, D]
  vs y [c, D].

  `positive`: [r, c] bool marking the matching pairs of the block, or None (none in it).
  `vx`: [r] pair weights of the rows (their positive terms), or None.
  """
  z = jnp.exp(log_t) * (x @ y.T) + bias                    # [r, c]
  w = mx[:, None] * my[None, :]
  if positive is None:
    loss = -jnp.sum(w * jax.nn.log_sigmoid(-z))
    zero = jnp.zeros((), jnp.float32)
    return loss, zero, jnp.sum(w * z), zero
  sign = jnp.where(positive, 1.0, -1.0)
  loss = -jnp.sum(_positive_weights(w, positive, vx) * jax.nn.log_sigmoid(sign * z))
  wz = w * z
  return (loss, jnp.sum(jnp.where(positive, wz, 0.0)), jnp.sum(jnp.where(positive, 0.0, wz)),
          jnp.sum(jnp.where(positive, w, 0.0)))


def _finish(sums: _Sums, count, log_t, bias) -> tuple[jax.Array, dict]:
  """Normalised loss and metrics from the global sums and the number of valid rows."""
  loss_sum, pos_sum, neg_sum, pos_count = sums
  loss = loss_sum / jnp.maximum(count, 1.0)
  metrics = {
      "pos_logit": pos_sum / jnp.maximum(pos_count, 1.0),
      "neg_logit": neg_sum / jnp.maximum(count * count - pos_count, 1.0),
      "temperature": jnp.exp(log_t),
      "bias": bias,
      "num_valid": count,
  }
  return loss, jax.lax.stop_gradient(metrics)


def sigmoid_loss(img: jax.Array, txt: jax.Array, log_temperature: jax.Array, bias: jax.Array,
                 *, pair_mask: jax.Array | None = None, pair_weight: jax.Array | None = None,
                 pair_keys: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """SigLIP's sigmoid loss with dense [B, B] logits (the reference computation).

  Args:
    img: [B, D] L2-normalised image embeddings, row i paired with row i of `txt`.
    txt: [B, D] L2-normalised text embeddings.
    log_temperature: scalar t' (t = exp(t')); init `INIT_LOG_TEMPERATURE`.
    bias: scalar b; init `INIT_BIAS`.
    pair_mask: optional [B] bool; False rows are left out entirely (module docstring).
    pair_weight: optional [B] float; v_i multiplies the positive term of pair i (module
      docstring; the metrics are unweighted).
    pair_keys: optional int [B] or [B, H]; rows with equal keys are each other's positives
      (module docstring), e.g. `token_keys` of a field's tokens.

  Returns:
    (loss, metrics): the loss of the module docstring (a float32 scalar) and the metrics
    pos_logit, neg_logit, temperature, bias, num_valid (not differentiated).
  """
  x, y, log_t, b, m, v, keys = _prepare(img, txt, log_temperature, bias, pair_mask, pair_weight,
                                        pair_keys)
  positive = jnp.eye(x.shape[0], dtype=bool) if keys is None else same_key(keys, keys)
  return _finish(_block_sums(x, y, m, m, log_t, b, positive, v), jnp.sum(m), log_t, b)


def blockwise_sigmoid_loss(img: jax.Array, txt: jax.Array, log_temperature: jax.Array,
                           bias: jax.Array, *, num_blocks: int,
                           pair_mask: jax.Array | None = None,
                           pair_weight: jax.Array | None = None,
                           pair_keys: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """`sigmoid_loss` as a rematerialised scan over `num_blocks` text blocks (no [B, B] buffer).

  Args:
    img, txt, log_temperature, bias, pair_mask, pair_weight, pair_keys: as `sigmoid_loss`.
    num_blocks: K, must divide B; 1 is one block of B texts (the dense logits in a scan).

  Returns:
    What `sigmoid_loss` returns, up to float32 summation order.
  """
  x, y, log_t, b, m, v, keys = _prepare(img, txt, log_temperature, bias, pair_mask, pair_weight,
                                        pair_keys)
  n = x.shape[0]
  # Same row-block layout and checks as the blockwise InfoNCE.
  contrastive._check_blocks(n, num_blocks, "num_blocks")  # pylint: disable=protected-access
  row_blocks = contrastive._row_blocks  # pylint: disable=protected-access
  y_blocks, m_blocks = row_blocks(y, num_blocks), row_blocks(m, num_blocks)
  if keys is None:  # The row index as the key: the positives are i == j.
    keys = jnp.arange(n, dtype=jnp.int32)[:, None]
  key_blocks = row_blocks(keys, num_blocks)                # [K, B/K, H]

  @functools.partial(jax.checkpoint, prevent_cse=False)   # Backward recomputes the block.
  def body(carry, xs):
    y_k, m_k, keys_k = xs
    sums = _block_sums(x, y_k, m, m_k, log_t, b, same_key(keys, keys_k), v)
    return jax.tree.map(jnp.add, carry, sums), None

  init = (jnp.zeros((), jnp.float32),) * 4
  sums, _ = lax.scan(body, init, (y_blocks, m_blocks, key_blocks))
  return _finish(sums, jnp.sum(m), log_t, b)


def _ring_permutation(n: int) -> list[tuple[int, int]]:
  """ppermute pairs: the shard at linear batch index r moves to r + 1 (mod n)."""
  return [(r, (r + 1) % n) for r in range(n)]


def _block_grads(x, y, mx, my, log_t, bias, positive, scale, vx=None):
  """Cotangents (dx, dy, dlog_t, dbias) of scale * (block loss sum of `_block_sums`)."""
  t = jnp.exp(log_t)
  s = x @ y.T
  z = t * s + bias
  sign = -1.0 if positive is None else jnp.where(positive, 1.0, -1.0)
  w = mx[:, None] * my[None, :]
  if positive is not None:
    w = _positive_weights(w, positive, vx)
  # d/dz of -w log sigmoid(l z) = -w l sigmoid(-l z).
  gz = -scale * w * sign * jax.nn.sigmoid(-sign * z)                               # [r, c]
  return t * (gz @ y), t * (gz.T @ x), t * jnp.sum(gz * s), jnp.sum(gz)


def _ring_positive(k, k_c):
  """The positives of the local rows against a received chunk: by key, or None (no keys: the
  chunks of other devices hold none)."""
  return None if k is None else same_key(k, k_c)


def _ring_forward(x, y, m, v, k, log_t, bias, *, axis, n):
  """Per-device body of the ring: global sums and the number of valid rows. v: the local pair
  weights, or None; k: the local pair keys, or None, in which case only step 0 (the device's
  own texts) holds positives, on its diagonal; with keys, any step may hold some."""
  perm = _ring_permutation(n)
  own = jnp.eye(x.shape[0], dtype=bool) if k is None else same_key(k, k)
  sums = _block_sums(x, y, m, m, log_t, bias, own, v)

  def step(_, carry):
    y_c, m_c, k_c, sums = carry
    # Now the chunk of device r - s (its keys with it; k_c is None without keys).
    y_c, m_c, k_c = lax.ppermute((y_c, m_c, k_c), axis, perm)
    new = _block_sums(x, y_c, m, m_c, log_t, bias, _ring_positive(k, k_c), v)
    return y_c, m_c, k_c, jax.tree.map(jnp.add, sums, new)

  _, _, _, sums = lax.fori_loop(1, n, step, (y, m, k, sums))  # n - 1 ppermutes.
  return lax.psum(sums, axis), lax.psum(jnp.sum(m), axis)


def _ring_backward(x, y, m, v, k, log_t, bias, g, *, axis, n):
  """Per-device backward ring: (dx, dy, dlog_t, dbias) for the loss cotangent g."""
  perm = _ring_permutation(n)
  scale = g / jnp.maximum(lax.psum(jnp.sum(m), axis), 1.0)
  own = jnp.eye(x.shape[0], dtype=bool) if k is None else same_key(k, k)
  dx, dy_c, dlog_t, dbias = _block_grads(x, y, m, m, log_t, bias, own, scale, v)

  def step(_, carry):
    y_c, m_c, k_c, dy_c, dx, dlog_t, dbias = carry
    # Each text chunk travels with the running sum of its gradient.
    y_c, m_c, k_c, dy_c = lax.ppermute((y_c, m_c, k_c, dy_c), axis, perm)
    ddx, ddy, ddlog_t, ddbias = _block_grads(x, y_c, m, m_c, log_t, bias,
                                             _ring_positive(k, k_c), scale, v)
    return y_c, m_c, k_c, dy_c + ddy, dx + ddx, dlog_t + ddlog_t, dbias + ddbias

  _, _, _, dy_c, dx, dlog_t, dbias = lax.fori_loop(1, n, step,
                                                   (y, m, k, dy_c, dx, dlog_t, dbias))
  # Device r now holds the complete gradient of the chunk of r + 1: one more move sends it home.
  dy = lax.ppermute(dy_c, axis, perm)
  return dx, dy, lax.psum(dlog_t, axis), lax.psum(dbias, axis)


def ring_sigmoid_loss(img: jax.Array, txt: jax.Array, log_temperature: jax.Array,
                      bias: jax.Array, *, mesh: jax.sharding.Mesh,
                      pair_mask: jax.Array | None = None,
                      pair_weight: jax.Array | None = None,
                      pair_keys: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """`sigmoid_loss` with the texts passed around a ring of the mesh's batch shards.

  Args:
    img, txt, log_temperature, bias, pair_mask, pair_weight, pair_keys: as `sigmoid_loss`
      (global arrays; they are sharded over the batch axes inside, whatever their sharding is
      outside). The keys travel with their text chunk.
    mesh: a mesh with the axes of `axes.BATCH_AXES` ('data', 'fsdp'); n = data * fsdp must
      divide B. Other axes (tensor) hold replicas.

  Returns:
    What `sigmoid_loss` returns, up to float32 summation order. Differentiable in reverse mode
    only (a custom_vjp: the backward ring of the module docstring).
  """
  missing = [a for a in axes.BATCH_AXES if a not in mesh.shape]
  if missing:
    raise ValueError(f"ring_sigmoid_loss: the mesh {dict(mesh.shape)} lacks the batch axes "
                     f"{missing}; expected {axes.BATCH_AXES}.")
  n = mesh_lib.batch_axes_size(mesh)
  x, y, log_t, b, m, v, k = _prepare(img, txt, log_temperature, bias, pair_mask, pair_weight,
                                     pair_keys)
  if x.shape[0] % n:
    raise ValueError(f"ring_sigmoid_loss: B={x.shape[0]} is not divisible by the {n} batch "
                     f"shards of the mesh {dict(mesh.shape)}.")
  axis = tuple(axes.BATCH_AXES)
  rows, vec, rep = P(axis, None), P(axis), P()
  weighted, keyed = v is not None, k is not None
  # Placeholders that the bodies ignore (None there) keep one signature for every case.
  if not weighted:
    v = m
  if not keyed:
    k = jnp.zeros((x.shape[0], 1), jnp.int32)

  def fwd_body(x, y, m, v, k, log_t, b):
    return _ring_forward(x, y, m, v if weighted else None, k if keyed else None, log_t, b,
                         axis=axis, n=n)

  def bwd_body(x, y, m, v, k, log_t, b, g):
    return _ring_backward(x, y, m, v if weighted else None, k if keyed else None, log_t, b, g,
                          axis=axis, n=n)

  forward = jax.shard_map(fwd_body, mesh=mesh, in_specs=(rows, rows, vec, vec, rows, rep, rep),
                          out_specs=((rep,) * 4, rep))
  backward = jax.shard_map(bwd_body, mesh=mesh,
                           in_specs=(rows, rows, vec, vec, rows, rep, rep, rep),
                           out_specs=(rows, rows, rep, rep))

  @jax.custom_vjp
  def loss_fn(x, y, m, v, log_t, b):
    sums, count = forward(x, y, m, v, k, log_t, b)
    return _finish(sums, count, log_t, b)

  def loss_fwd(x, y, m, v, log_t, b):
    return loss_fn(x, y, m, v, log_t, b), (x, y, m, v, log_t, b)

  def loss_bwd(res, cotangents):
    g, _ = cotangents  # The metrics are stop_gradient'ed: their cotangent is ignored.
    x, y, m, v, log_t, b = res
    dx, dy, dlog_t, dbias = backward(x, y, m, v, k, log_t, b, g)
    # The pair weights are data (scores), not trained: no cotangent.
    return dx, dy, jnp.zeros_like(m), jnp.zeros_like(v), dlog_t, dbias

  loss_fn.defvjp(loss_fwd, loss_bwd)
  loss, metrics = loss_fn(x, y, m, v, log_t, b)
  return loss, jax.lax.stop_gradient(metrics)


def sigmoid_loss_memory_bytes(batch_size: int, num_devices: int = 1, num_blocks: int = 1,
                              dtype=jnp.float32, embed_dim: int = 0) -> dict[str, int]:
  """Per-device bytes of the pairwise buffers of each computation (module docstring).

  Args:
    batch_size: B, the global batch.
    num_devices: n, the number of batch shards of the ring (data * fsdp); must divide B.
    num_blocks: K, the text blocks of the blockwise scan; must divide B.
    dtype: the element type of the logits and chunks (this module computes in float32).
    embed_dim: D; 0 leaves out the ring's text-chunk term 4 (B/n) D.

  Returns:
    {"dense": 2 B^2 s, "ring": 2 (B/n)^2 s + 4 (B/n) D s, "blockwise": 2 B (B/K) s} with s the
    itemsize of `dtype`: one logits block and its cotangent in the backward (+ the ring's
    moving chunks). Activations, embeddings and parameters are not included.
  """
  for name, v in (("num_devices", num_devices), ("num_blocks", num_blocks)):
    if v < 1 or batch_size % v:
      raise ValueError(f"{name}={v} must be a positive divisor of batch_size={batch_size}.")
  s = np.dtype(dtype).itemsize
  b = batch_size // num_devices
  return {
      "dense": 2 * batch_size * batch_size * s,
      "ring": (2 * b * b + 4 * b * embed_dim) * s,
      "blockwise": 2 * batch_size * (batch_size // num_blocks) * s,
  }
