"""Multi-field contrastive losses: one image against several text fields, missing ones masked.

A product has an image and several text fields (title, description, colour, material, ...;
data/features.py's `field_text` / `field_mask`). The loss pairs the image with each field:

    L = sum_f w_f * L_pair(img, txt_f; mask_f)

L_pair is InfoNCE (`masked_info_nce`) or SigLIP's sigmoid loss (losses/sigmoid.py, which
takes the same [B] mask as `pair_mask`). mask_f[i] False (product i has no field f) removes
row i from the term of field f ENTIRELY: image i and text i are neither positives nor negatives
there, i.e. the term equals the unmasked loss of the sub-batch of products that have the
field. (Embedding an empty string instead would teach every product without a colour to match
the same "empty" text.) A term with no valid row is 0. The weights are summed, not averaged
(Marqo's GCL-style "7-part loss"; their weights are unpublished: the config sets them).

InfoNCE with a mask is losses/regional.py's `masked_info_nce` (E2's, `valid=` the mask):
with N valid rows and S = scale * a b^T,

    L = 1/2 [ -(1/N) sum_{i: m_i} log( e^{S_ii} / sum_{j: m_j} e^{S_ij} )
              -(1/N) sum_{j: m_j} log( e^{S_jj} / sum_{i: m_i} e^{S_ij} ) ]

(masked logits are replaced by float32's lowest value, so they drop out exactly, with zero
gradient, and a term with no valid row is 0, not NaN). With GCL's per-pair weights v
(losses/pair_weights.py) each sum over i (resp. j) weighs its term by v_i (v_j), still divided
by N. With `keys` (a field's values, sigmoid.token_keys), every pair (i, j) of equal keys is a
positive, and each row's target is uniform over its positives P(i) (i in P(i); UniCL's
multi-positive InfoNCE):

    row_i = logsumexp_j S_ij - (1/|P(i)|) sum_{j in P(i)} S_ij      (column terms alike)

which is the plain row term when P(i) = {i}. `masked_info_nce` here only checks the
shapes and calls it. With every row valid it equals contrastive.info_nce up to float32 rounding;
the FashionCLIP system calls info_nce itself when there is no mask, so its default objective is
unchanged bit for bit.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fashion_jax.losses import regional
from fashion_jax.losses import sigmoid

# (img, txt, mask or None, keys or None) -> (loss, metrics).
PairLoss = Callable[[jax.Array, jax.Array, jax.Array | None, jax.Array | None],
                    tuple[jax.Array, dict]]


def masked_info_nce(a: jax.Array, b: jax.Array, scale: jax.Array,
                    mask: jax.Array | None = None, keys: jax.Array | None = None, *,
                    weight: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE of the valid rows of (a, b) (module docstring), dense [B, B] logits.

  Args:
    a: [B, D] embeddings (images), row i paired with row i of `b`.
    b: [B, D] embeddings (texts).
    scale: scalar multiplier of the similarities (exp of CLIP's logit_scale).
    mask: [B] bool, False = leave the pair i out; None = all valid.
    keys: optional int [B] or [B, H]: rows with equal keys are each other's positives
      (module docstring); None = only i <-> i.
    weight: optional [B] float v, GCL's per-pair weights (losses/pair_weights.py): the row and
      column terms of pair i are multiplied by v_i, still divided by N (module docstring).

  Returns:
    Without `weight`: regional.masked_info_nce(a, b, scale, valid=mask); with it,
    `_weighted_masked_info_nce` (the same formula with v; all-ones v equals the former within
    float32 rounding). The float32 loss (0 when no row is valid) and metrics a2b_acc, b2a_acc
    (over the valid rows, unweighted), valid_frac.
  """
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"masked_info_nce: a {a.shape} and b {b.shape} must both be [B, D].")
  n = a.shape[0]
  if mask is not None and jnp.shape(mask) != (n,):
    raise ValueError(f"masked_info_nce: mask {jnp.shape(mask)} must be [B] = ({n},).")
  if weight is not None and jnp.shape(weight) != (n,):
    raise ValueError(f"masked_info_nce: weight {jnp.shape(weight)} must be [B] = ({n},).")
  valid = None if mask is None else jnp.asarray(mask).astype(bool)
  if weight is None and keys is None:
    loss, metrics = regional.masked_info_nce(a, b, scale, valid=valid)
  else:
    valid = jnp.ones((n,), bool) if valid is None else valid
    v = jnp.ones((n,), jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
    positive = jnp.eye(n, dtype=bool)
    if keys is not None:
      keys = sigmoid.as_pair_keys(keys, n, "masked_info_nce")
      positive = sigmoid.same_key(keys, keys)
    loss, metrics = _weighted_masked_info_nce(a, b, scale, valid, v, positive)
  return loss, jax.lax.stop_gradient(metrics)


def _weighted_masked_info_nce(a, b, scale, valid, v, positive):
  """1/2 [ (1/N) sum_{i valid} v_i row_i + (1/N) sum_{j valid} v_j col_j ] with
  row_i = logsumexp_{j valid} S_ij - mean_{j in P(i)} S_ij (P(i): the valid j with
  positive[i, j]; col_j alike over i), S = scale a b^T in float32; an invalid row/column is
  replaced by float32's lowest value (it drops out exactly, zero gradient); 0 when N = 0.
  With positive = I this is -log softmax(S_i.)_i."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  s = scale * (a @ b.T)
  both = valid[:, None] & valid[None, :]
  pos = (positive & both).astype(jnp.float32)
  s = jnp.where(both, s, jnp.finfo(jnp.float32).min)
  s_pos = jnp.where(both, s, 0.0) * pos
  row = jax.nn.logsumexp(s, axis=1) - jnp.sum(s_pos, 1) / jnp.maximum(jnp.sum(pos, 1), 1.0)
  col = jax.nn.logsumexp(s, axis=0) - jnp.sum(s_pos, 0) / jnp.maximum(jnp.sum(pos, 0), 1.0)
  w = jnp.where(valid, v, 0.0)
  count = jnp.sum(valid.astype(jnp.float32))
  loss = 0.5 * (jnp.sum(w * row) + jnp.sum(w * col)) / jnp.maximum(count, 1.0)
  idx = jnp.arange(a.shape[0])
  hits_a2b = positive[idx, jnp.argmax(s, axis=1)] & valid
  hits_b2a = positive[jnp.argmax(s, axis=0), idx] & valid
  metrics = {"a2b_acc": jnp.sum(hits_a2b) / jnp.maximum(count, 1.0),
             "b2a_acc": jnp.sum(hits_b2a) / jnp.maximum(count, 1.0),
             "valid_frac": count / a.shape[0]}
  return loss, metrics


def check_weights(weights: Sequence[float], names: Sequence[str], what: str) -> tuple[float, ...]:
  """One finite, non-negative float weight per name; ValueError naming `what` otherwise."""
  weights = tuple(weights)
  if len(weights) != len(names):
    raise ValueError(f"{what}={weights!r} must have one weight per entry of {tuple(names)!r}.")
  for w in weights:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
      raise ValueError(f"{what}={weights!r}: {w!r} is not a finite weight >= 0.")
  return tuple(float(w) for w in weights)


def multi_field_loss(pair_loss: PairLoss, img: jax.Array, texts: Sequence[jax.Array],
                     masks: Sequence[jax.Array | None], weights: Sequence[float],
                     names: Sequence[str], keys: Sequence[jax.Array | None] | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_f w_f * pair_loss(img, texts[f], masks[f], keys[f]) (module docstring).

  Args:
    pair_loss: (img [B, D], txt [B, D], mask [B] bool or None, keys int [B, H] or None) ->
      (loss, metrics).
    img: [B, D] image embeddings.
    texts: one [B, D] text embedding per field.
    masks: one [B] bool mask (or None = all valid) per field.
    weights: w_f, one per field (terms of weight 0 are still computed: pass only the fields
      you train on).
    names: one metric name per field.
    keys: optional, one entry per field: None, or the [B, H] keys whose equal rows are
      positives of each other in that term (e.g. sigmoid.token_keys of the field's tokens).

  Returns:
    (loss, metrics): metrics `loss/{name}` (each unweighted term) and every metric of each
    term as `{metric}/{name}`, all scalars, not differentiated.
  """
  if not (len(texts) == len(masks) == len(weights) == len(names)) or not texts:
    raise ValueError(f"multi_field_loss: {len(texts)} texts, {len(masks)} masks, "
                     f"{len(weights)} weights and {len(names)} names must match (and be > 0).")
  keys = [None] * len(texts) if keys is None else list(keys)
  if len(keys) != len(texts):
    raise ValueError(f"multi_field_loss: {len(keys)} keys for {len(texts)} texts.")
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for txt, mask, key, w, name in zip(texts, masks, keys, weights, names):
    loss, m = pair_loss(img, txt, mask, key)
    total = total + float(w) * loss
    metrics[f"loss/{name}"] = loss
    metrics.update({f"{k}/{name}": v for k, v in m.items()})
  return total, jax.lax.stop_gradient(metrics)
