"""E2's regional contrastive loss: per-entity InfoNCE between image regions and tag texts.

    L_regional = mean over entities e of InfoNCE(entity image embedding_e, text embedding of
                 entity e's tag string)            (E2, NeurIPS 2024; over the GLOBAL batch)
    L_E2       = (1 - w) L_global + w L_regional,  w = 0.5 in the paper

In-batch false negatives. Tag values repeat a lot (a batch of 64 holds many products of the same
season or sub-category), so for entity e the texts of OTHER products with the same tag value are
identical to the positive text. Two treatments, both available (`false_negatives`):
  'negatives' (the reference code): every other row is a negative, even with the same tag. The
      loss cannot go below the log of the number of duplicates and pushes apart images whose
      entity is the same.
  'mask': pairs (i, j != i) with the same tag value are removed from both softmax denominators
      (logit -> -inf); only the diagonal pair is the positive. This is the unbiased choice for
      repeated labels, so it is the default of configs/e2.py.
Rows whose tag is unknown (an empty string) are dropped from that entity's loss, as anchors and
as candidates. This file adds `masked_info_nce` next to losses/contrastive.info_nce (which it
equals when nothing is masked; tests/test_e2_system.py checks that).
"""

from typing import Optional

import jax
import jax.numpy as jnp

FALSE_NEGATIVES = ("negatives", "mask")


def masked_info_nce(a: jax.Array, b: jax.Array, scale: jax.Array,
                    same: Optional[jax.Array] = None, valid: Optional[jax.Array] = None
                    ) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE with optional exclusion of false negatives and of invalid rows.

  Args:
    a: [B, D] embeddings, row i paired with row i of `b`.
    b: [B, D] embeddings.
    scale: scalar multiplier of the similarities (the clamped logit scale).
    same: bool [B, B] or None; True at (i, j), j != i, removes b_j from a_i's candidates and
      a_i from b_j's candidates (a false negative). The diagonal is always kept.
    valid: bool [B] or None; False rows are neither anchors nor candidates.

  Returns:
    loss = 1/2 [ mean_{i valid} -log p_a2b(i, i) + mean_{j valid} -log p_b2a(j, j) ],
      p_a2b(i, .) = softmax over the allowed j of scale <a_i, b_j> (p_b2a likewise per column),
    and metrics a2b_acc, b2a_acc (top-1 among allowed candidates, over valid rows), valid_frac.
    With no valid row the loss is 0.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n = a.shape[0]
  logits = scale * (a @ b.T)  # [B, B]
  eye = jnp.eye(n, dtype=bool)
  allowed = jnp.ones((n, n), bool)
  if same is not None:
    allowed = allowed & (~same | eye)
  if valid is None:
    valid = jnp.ones((n,), bool)
  allowed = allowed & valid[:, None] & valid[None, :]
  allowed = allowed | eye  # Keeps every softmax defined; invalid rows are weighted out below.
  neg = jnp.finfo(jnp.float32).min
  masked = jnp.where(allowed, logits, neg)
  diag = jnp.diagonal(logits)
  loss_a2b = jax.nn.logsumexp(masked, axis=1) - diag
  loss_b2a = jax.nn.logsumexp(masked, axis=0) - diag
  w = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w), 1.0)
  loss = 0.5 * (jnp.sum(w * loss_a2b) + jnp.sum(w * loss_b2a)) / count
  labels = jnp.arange(n)
  metrics = {
      "a2b_acc": jnp.sum(w * (jnp.argmax(masked, axis=1) == labels)) / count,
      "b2a_acc": jnp.sum(w * (jnp.argmax(masked, axis=0) == labels)) / count,
      "valid_frac": jnp.mean(w),
  }
  return loss, metrics


def same_tag_matrix(tag_ids: jax.Array) -> jax.Array:
  """int [B, L] token ids of one entity's tag strings -> bool [B, B], True where equal.

  Tokenisation is deterministic, so equal ids <=> equal strings (up to truncation at L).
  """
  return jnp.all(tag_ids[:, None, :] == tag_ids[None, :, :], axis=-1)


def regional_loss(image_embeds: jax.Array, text_embeds: jax.Array, scale: jax.Array,
                  tag_ids: jax.Array, entities: tuple[str, ...], *,
                  false_negatives: str = "mask", empty_tag_ids: Optional[jax.Array] = None
                  ) -> tuple[jax.Array, dict]:
  """Mean over entities of `masked_info_nce(image_embeds[:, e], text_embeds[:, e])`.

  Args:
    image_embeds, text_embeds: [B, E, P] L2-normalised entity embeddings.
    scale: scalar logit scale.
    tag_ids: int [B, E, L] each entity's tokenised tag string (for false negatives and for
      unknown tags).
    entities: the E entity names (metric names).
    false_negatives: 'negatives' or 'mask' (module docstring).
    empty_tag_ids: int [L], the tokenisation of '' (rows equal to it are unknown tags); None
      keeps every row.

  Returns:
    (loss, metrics {'<entity>_loss', '<entity>_acc' (image -> tag text top-1)}).
  """
  if false_negatives not in FALSE_NEGATIVES:
    raise ValueError(f"false_negatives={false_negatives!r} not in {FALSE_NEGATIVES}.")
  num = image_embeds.shape[1]
  if text_embeds.shape[1] != num or tag_ids.shape[1] != num or len(entities) != num:
    raise ValueError(f"{len(entities)} entities {entities} but image {image_embeds.shape}, "
                     f"text {text_embeds.shape} and tag ids {tag_ids.shape} embeddings.")
  losses, metrics = [], {}
  for e, name in enumerate(entities):
    ids = tag_ids[:, e]
    same = same_tag_matrix(ids) if false_negatives == "mask" else None
    valid = None
    if empty_tag_ids is not None:
      valid = ~jnp.all(ids == empty_tag_ids[None, :], axis=-1)
    loss, m = masked_info_nce(image_embeds[:, e], text_embeds[:, e], scale, same, valid)
    losses.append(loss)
    metrics[f"{name}_loss"] = loss
    metrics[f"{name}_acc"] = m["a2b_acc"]
  return jnp.mean(jnp.stack(losses)), metrics
