"""Contrastive losses over the GLOBAL batch.

Under jit with a batch sharded over the mesh's batch axes, `a @ b.T` below is a global
computation: XLA all-gathers what it needs, so every example sees every other example of the
global batch as a negative (the "gather negatives across devices" of CLIP/FashionViL) without any
explicit collective in the loss. tests/test_contrastive.py checks this against one device.
"""

import jax
import jax.numpy as jnp


def info_nce(a: jax.Array, b: jax.Array, scale: jax.Array) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE (CLIP's loss) of paired embeddings.

  Args:
    a: [B, D] embeddings (e.g. images), row i paired with row i of `b`.
    b: [B, D] embeddings (e.g. texts).
    scale: scalar multiplier of the similarities (CLIP's exp(logit_scale), already clamped).

  Returns:
    loss = 1/2 [ CE(S, I) + CE(S^T, I) ] with S = scale * a b^T (mean over rows), and metrics
    `a2b_acc`, `b2a_acc` (in-batch top-1 accuracy of the paired row). Computed in float32
    whatever the embedding dtype: a bf16 softmax over a 32k batch loses the positive.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  logits = scale * (a @ b.T)  # [B, B]
  labels = jnp.arange(logits.shape[0])
  log_p_a2b = jax.nn.log_softmax(logits, axis=1)
  log_p_b2a = jax.nn.log_softmax(logits, axis=0)
  loss_a2b = -jnp.mean(log_p_a2b[labels, labels])
  loss_b2a = -jnp.mean(log_p_b2a[labels, labels])
  loss = 0.5 * (loss_a2b + loss_b2a)
  metrics = {
      "a2b_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "b2a_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
  }
  return loss, metrics
