"""Losses and scores of FashionViL's downstream fine-tunings, as pure functions.

Notation: B batch, M items per outfit query, D width, C categories, K subspace masks.
x^ = x / |x|; CE(z, y) = -log softmax(z)_y; all computed in float32 over the GLOBAL batch.

  TGIR  q [B, D] fused query (modification text ; reference image), t [B, D] target image
        vectors, s the learnable scale (FashionViL's NormalizationLayer on both sides, init 4):
        S = s^2 q^ t^T,  L = mean_i CE(S_i., i)   (ONE direction, query -> target, in-batch
        negatives; the reference's batch-based classification loss).
  CLS   z [B, K_f] logits per label field f, y [B] labels (-1 = unknown, left out):
        L = sum_f mean_{i: y_i >= 0} CE(z_i, y_i).
  OCIR  (CSA-Net's category-conditioned subspaces, as FashionViL uses for Polyvore.)
        Category pair (a, b) -> subspace mask w(a, b) = sum_k softmax(U_a + V_b + c)_k relu(M_k)
        [D] (pair_masks builds the [C, C, D] table). An outfit query of items x_m with
        categories a_m against a candidate y of category b scores
          score(Q, y) = mean_{m valid} cos(x_m * w(a_m, b), y * w(a_m, b)),
        and training is in-batch InfoNCE over the batch's blanks:
          S_ij = s^2 score(Q_i, y_j),  L = mean_i CE(S_i., i).
        Candidates of another category than the blank are kept as (easy) negatives in training;
        the evaluation ranks only the blank's category (evaluate/ocir.py).
"""

import jax
import jax.numpy as jnp

from fashion_jax.losses import fashionvil as fvl


def tgir_loss(query: jax.Array, target: jax.Array, s: jax.Array) -> tuple[jax.Array, dict]:
  """One-directional in-batch CE, logits s^2 cos(q_i, t_j) [B, B] -> (loss, {'acc', 'scale'})."""
  logits = fvl.scaled_cosine_logits(query, target, s)
  labels = jnp.arange(logits.shape[0])
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"acc": acc, "scale": s}


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """logits [B, K], int labels [B] (-1 = unknown) -> (mean CE over known rows, {'acc', 'known'}).

  0 when no row is known (a batch of unknown labels must not give NaN).
  """
  labels = labels.astype(jnp.int32)
  known = labels >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
  n = jnp.sum(known.astype(jnp.float32))
  loss = jnp.sum(jnp.where(known, nll, 0.0)) / jnp.maximum(n, 1.0)
  correct = (jnp.argmax(logits, axis=-1) == labels) & known
  acc = jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(n, 1.0)
  return loss, {"acc": acc, "known": n}


def pair_masks(u: jax.Array, v: jax.Array, c: jax.Array, masks: jax.Array) -> jax.Array:
  """Subspace mask of every category pair: U [C, K], V [C, K], c [K], masks [K, D] -> [C, C, D].

  w(a, b) = sum_k softmax_k(U_ak + V_bk + c_k) relu(M_k).
  """
  attn = jax.nn.softmax(u[:, None, :] + v[None, :, :] + c, axis=-1)
  return jnp.einsum("abk,kd->abd", attn, jax.nn.relu(masks))


def _cos_under_mask(x, y, w2, eps=1e-12):
  """sum_d x y w2 / (|x sqrt(w2)| |y sqrt(w2)|) with broadcasting over leading axes."""
  num = jnp.sum(x * y * w2, axis=-1)
  nx = jnp.sqrt(jnp.maximum(jnp.sum(x * x * w2, axis=-1), eps))
  ny = jnp.sqrt(jnp.maximum(jnp.sum(y * y * w2, axis=-1), eps))
  return num / (nx * ny)


def ocir_scores(items: jax.Array, item_cats: jax.Array, item_mask: jax.Array,
                cands: jax.Array, cand_cats: jax.Array, table: jax.Array) -> jax.Array:
  """score(Q_i, y_j) for every query i and candidate j (each candidate its own category).

  Args:
    items: [Q, M, D] outfit items; item_cats: int [Q, M]; item_mask: bool [Q, M] (valid items).
    cands: [G, D] candidates; cand_cats: int [G].
    table: [C, C, D] pair_masks.
  Returns:
    float32 [Q, G]. Memory O(Q M G D): for the in-batch training loss; evaluation with one
    candidate category uses ocir_scores_one_category.
  """
  items = items.astype(jnp.float32)
  cands = cands.astype(jnp.float32)
  w = table[item_cats[:, :, None], cand_cats[None, None, :]]          # [Q, M, G, D]
  cos = _cos_under_mask(items[:, :, None, :], cands[None, None, :, :], w * w)  # [Q, M, G]
  m = item_mask.astype(jnp.float32)[:, :, None]
  return jnp.sum(cos * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def ocir_scores_one_category(items: jax.Array, item_cats: jax.Array, item_mask: jax.Array,
                             cands: jax.Array, cand_cat: int | jax.Array,
                             table: jax.Array) -> jax.Array:
  """ocir_scores for candidates that all have category `cand_cat`, in O((Q M + C G) D) memory.

  With b fixed, cos(x w, y w) = <(x w)^, (y w)^>, so
    score(Q, y) = sum_a <P_a(Q), (y w(a, b))^> / n(Q),  P_a(Q) = sum_{m: a_m = a} (x_m w(a, b))^.
  """
  items = items.astype(jnp.float32)
  cands = cands.astype(jnp.float32)
  wb = table[:, cand_cat]                                             # [C, D]
  xw = fvl.l2_normalize(items * wb[item_cats])                        # [Q, M, D]
  onehot = jax.nn.one_hot(item_cats, table.shape[0]) * item_mask.astype(jnp.float32)[..., None]
  p = jnp.einsum("qmd,qma->qad", xw, onehot)                           # [Q, C, D]
  yw = fvl.l2_normalize(cands[None, :, :] * wb[:, None, :])           # [C, G, D]
  n = jnp.maximum(jnp.sum(item_mask.astype(jnp.float32), axis=1), 1.0)
  return jnp.einsum("qad,agd->qg", p, yw) / n[:, None]


def ocir_loss(scores: jax.Array, s: jax.Array) -> tuple[jax.Array, dict]:
  """In-batch InfoNCE over scores [B, B] (row i's positive is column i), logits s^2 scores."""
  logits = jnp.square(s) * scores
  labels = jnp.arange(logits.shape[0])
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"acc": acc, "scale": s}
