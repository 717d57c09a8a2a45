"""Combining several task losses into one: FashionBERT's adaptive weights, or fixed weights.

Adaptive weights (FashionBERT, as its reference code computes them once per batch). With the
K task losses of the batch stacked as G = [L_1, ..., L_K] (FashionBERT: [L_mlm, L_tia, L_mpm],
K = 3):

    n   = softmax(G) ** 2                                   [K], each n_j in (0, 1)
    w_i = prod_{j != i} (K - n_j) / sum_k prod_{j != k} (K - n_j)
    L   = sum_i w_i L_i

The weights are positive and sum to 1. A task whose loss is large relative to the others has a
large n_j, which shrinks every OTHER task's weight, so the weight moves towards the task that is
currently lagging (the paper: "FashionBERT shifts its attention on different tasks during the
training procedure"). Equal losses give equal weights 1/K.

How far the weights can move: w_i / w_k = (K - n_k) / (K - n_i) and every n_j lies in (0, 1),
so w_i / w_k is within ((K-1)/K, K/(K-1)); for K = 3 each weight lies in [6/21, 9/21] =
[0.286, 0.429] (reached when one loss dominates the softmax). The scheme is 1/K +- a bounded
tilt towards the task with the largest RAW loss, so it follows loss scale (an MLM cross entropy
over a 30k vocabulary is larger than a 2-way CE) as much as "lagging".

Gradient through the weights (the choice is `weight_grad`):
  * 'through' (the reference: its TF graph computes w from the loss tensors without a
    stop_gradient): dL/dtheta = sum_i w_i dL_i/dtheta + sum_i L_i dw_i/dtheta. The second term
    moves parameters so as to change the WEIGHTS, i.e. it rewards making the loss vector look
    "balanced" to the formula, which is not what the method intends.
  * 'stop' (our default): w is treated as a constant of the step, dL/dtheta = sum_i w_i
    dL_i/dtheta: the weights only rescale each task's gradient, the adaptive-weighting reading
    of the paper.
Both are exposed; tests check each against finite differences of a float64 numpy evaluation.

Fixed weights ('equal' in configs): w_i = 1 / K, the baseline for the adaptive scheme.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

WEIGHT_GRADS = ("through", "stop")
SCHEMES = ("adaptive", "equal")


def adaptive_weights(losses: jax.Array, weight_grad: str = "stop") -> jax.Array:
  """FashionBERT's adaptive weights of a loss vector (see the module docstring).

  Args:
    losses: float [K], K >= 1, the task losses G in a fixed order.
    weight_grad: 'stop' (w is a constant for autodiff) or 'through' (the reference's behaviour).

  Returns:
    float [K] weights w (positive, summing to 1).
  """
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"weight_grad={weight_grad!r}; expected one of {WEIGHT_GRADS}.")
  losses = jnp.asarray(losses)
  if losses.ndim != 1 or losses.shape[0] < 1:
    raise ValueError(f"losses must be a non-empty vector [K], got shape {losses.shape}.")
  g = jax.lax.stop_gradient(losses) if weight_grad == "stop" else losses
  k = losses.shape[0]
  n = jax.nn.softmax(g.astype(jnp.promote_types(g.dtype, jnp.float32))) ** 2
  m = k - n                                                           # [K], each in (K-1, K)
  # prod_{j != i} m_j for every i, without dividing by m_i: the K x K matrix with ones on the
  # diagonal, multiplied along rows.
  others = jnp.where(jnp.eye(k, dtype=bool), jnp.ones_like(m)[None, :], m[None, :])
  numer = jnp.prod(others, axis=1)                                    # [K]
  return numer / jnp.sum(numer)


def combine(losses: Mapping[str, jax.Array], order: Sequence[str], scheme: str = "adaptive",
            weight_grad: str = "stop") -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_i w_i L_i over the tasks in `order` with adaptive or equal weights.

  Args:
    losses: task name -> scalar loss.
    order: the task names in G's order (FashionBERT: ('mlm', 'tia', 'mpm')); every name must be
      in `losses`.
    scheme: 'adaptive' (FashionBERT) or 'equal' (w_i = 1/K).
    weight_grad: see `adaptive_weights` (ignored by 'equal', whose weights are constants).

  Returns:
    (total loss, {'weight_<name>': w_i}) with the weights as metrics.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"loss weighting scheme={scheme!r}; expected one of {SCHEMES}.")
  missing = [name for name in order if name not in losses]
  if missing or not order:
    raise ValueError(f"combine: tasks {missing or list(order)} have no loss; got "
                     f"{sorted(losses)}.")
  g = jnp.stack([jnp.asarray(losses[name], jnp.float32) for name in order])
  if scheme == "adaptive":
    w = adaptive_weights(g, weight_grad)
  else:
    w = jnp.full_like(g, 1.0 / len(order))
  total = jnp.sum(w * g)
  return total, {f"weight_{name}": jax.lax.stop_gradient(w[i]) for i, name in enumerate(order)}
