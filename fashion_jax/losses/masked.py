"""Masked-modelling losses: masked language modelling (CE) and masked patch modelling (KL).

Both normalise by the number of targets in the WHOLE (global) batch, not per row: a row may have
no target (short text, a row excluded by a weight), and a per-row mean would over-weight rows
with few targets. Under jit with a sharded batch the sums are global reductions.

MLM (BERT):
    L_mlm = - sum_{(b, t): labels[b, t] >= 0} log softmax(logits[b, t])[labels[b, t]] / #targets

MPM (FashionBERT's masked patch modelling): the masked patches' input features are zeroed and
the model predicts the original feature vector f in R^F of each; the loss compares the two as
distributions over the F feature channels:
    L_mpm = sum_{(b, p) masked} KL( softmax(f_bp) || softmax(pred_bp) ) / #masked
          = sum_{(b, p) masked} sum_c q_c (log q_c - log softmax(pred_bp)_c) / #masked,
    q = softmax(f_bp).
The target is a constant (stop_gradient): it comes from the frozen patch CNN, and a target that
received gradients could be moved towards the prediction instead of the other way round.
"""

import jax
import jax.numpy as jnp

IGNORE = -1


def mlm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-LM cross entropy over the labelled positions.

  Args:
    logits: float [..., V] vocabulary logits.
    labels: int [...] target ids, IGNORE (-1, or any negative id) where there is no target.

  Returns:
    (loss, {'mlm_acc': top-1 accuracy on the targets, 'mlm_targets': their count}). With no
    target in the batch the loss is 0 (and its gradient 0), not NaN.
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree on [...].")
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  loss = -jnp.sum(jnp.where(valid, target_logp, 0.0)) / denom
  acc = jnp.sum(valid & (jnp.argmax(logits, axis=-1) == labels)) / denom
  return loss, {"mlm_acc": acc, "mlm_targets": count.astype(jnp.float32)}


def mpm_kl_loss(pred: jax.Array, target: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked patch modelling: mean KL(softmax(target) || softmax(pred)) over masked patches.

  Args:
    pred: float [B, P, F] predicted features (MPM head output) at every patch.
    target: float [B, P, F] the patches' original features (treated as constants).
    mask: bool [B, P] True where the patch was masked (a target).

  Returns:
    (loss, {'mpm_targets': number of masked patches}); 0 when nothing is masked.
  """
  if pred.shape != target.shape or pred.shape[:2] != mask.shape:
    raise ValueError(f"pred {pred.shape}, target {target.shape} must be [B, P, F] and mask "
                     f"{mask.shape} [B, P].")
  logq = jax.nn.log_softmax(jax.lax.stop_gradient(target).astype(jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)              # [B, P]
  count = jnp.sum(mask)
  loss = jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)
  return loss, {"mpm_targets": count.astype(jnp.float32)}
