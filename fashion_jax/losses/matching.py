"""Image-text matching (FashionBERT's text-image alignment, TIA; ITM): negatives and the 2-way CE.

Negatives over the GLOBAL batch. `group_negatives` picks, for every example i, another example j
of the batch with the same group (sub-category) and a different item (product), uniformly at
random among those; when i has no such partner it falls back to any example of another product;
when even that is impossible (the whole batch is one product) i gets no negative. It works on the
[B, B] relation of the keys: under jit with a batch sharded over the mesh (and over hosts) the
arrays are global, so the partner may live on any device or host, and XLA moves the gathered rows
(`x[partner]`) between them. This is the "negatives sampled across hosts" of the issue, obtained
by construction rather than by an explicit all-gather; the memory is O(B^2) booleans/floats
(64 MiB of float32 for a global batch of 4096), negligible next to a BERT step.

The draw is a Gumbel-max over the candidates: partner = argmax_j (u_ij if j is a candidate else
-inf), u ~ U(0, 1) from the step's key, i.e. uniform over candidates. Random values come from
`jax.random.uniform(key, [B, B])`, which (threefry, partitionable) does not depend on the mesh,
so one device and eight give the same partners.
"""

import jax
import jax.numpy as jnp


def group_negatives(rng: jax.Array, group_key: jax.Array, item_key: jax.Array
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """A same-group, different-item partner for every example of the batch.

  Args:
    rng: PRNG key of this step.
    group_key: int [B] group id (sub-category hash); equal ids = same group.
    item_key: int [B] item id (product hash); equal ids = same product (never a negative).

  Returns:
    (partner int32 [B], has_negative bool [B], stats) where partner[i] is the chosen example
    (i itself when has_negative[i] is False) and stats = {'neg_same_group_frac': fraction of
    examples whose partner shares the group, 'neg_fallback_frac': partner from another group,
    'neg_none_frac': no partner at all}.
  """
  if group_key.shape != item_key.shape or group_key.ndim != 1:
    raise ValueError(f"group_key {group_key.shape} and item_key {item_key.shape} must both be "
                     "[B].")
  b = group_key.shape[0]
  other_item = item_key[:, None] != item_key[None, :]                 # [B, B]
  same_group = (group_key[:, None] == group_key[None, :]) & other_item
  has_same = jnp.any(same_group, axis=1)
  has_any = jnp.any(other_item, axis=1)
  candidates = jnp.where(has_same[:, None], same_group, other_item)
  u = jax.random.uniform(rng, (b, b))
  partner = jnp.argmax(jnp.where(candidates, u, -1.0), axis=1).astype(jnp.int32)
  partner = jnp.where(has_any, partner, jnp.arange(b, dtype=jnp.int32))
  stats = {"neg_same_group_frac": jnp.mean(has_same.astype(jnp.float32)),
           "neg_fallback_frac": jnp.mean((has_any & ~has_same).astype(jnp.float32)),
           "neg_none_frac": jnp.mean((~has_any).astype(jnp.float32))}
  return partner, has_any, stats


def matching_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """2-way cross entropy of the alignment head, mean over the batch.

  Args:
    logits: float [B, 2]; column 1 = "the text describes the image", column 0 = "it does not".
    labels: int/bool [B], 1 for aligned pairs, 0 for negatives.

  Returns:
    (loss, {'tia_acc': accuracy of argmax, 'tia_pos_frac': fraction of aligned pairs}).
  """
  if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"logits must be [B, 2] and labels [B]; got {logits.shape}, "
                     f"{labels.shape}.")
  labels = labels.astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"tia_acc": acc, "tia_pos_frac": jnp.mean(labels.astype(jnp.float32))}


def alignment_score(logits: jax.Array) -> jax.Array:
  """[..., 2] alignment logits -> [...] score logit_1 - logit_0 = log p(aligned) / p(not).

  The ranking score of the cross-encoder: monotone in p(aligned), and unlike the softmax
  probability it does not saturate to a tie at 1.0 in float32 for confident pairs.
  """
  return (logits[..., 1] - logits[..., 0]).astype(jnp.float32)
