"""Per-pair weights from graded relevance scores (GCL's score-to-weight) for contrastive losses.

A catalog may grade how well each product's text describes its image (a relevance score from
raters, search logs or a teacher model). Generalized Contrastive Learning (GCL; Zhu, Jung and
Clark 2024, "Generalized Contrastive Learning for Multi-Modal Retrieval and Ranking") turns
each pair's score s_i into a weight w_i with a monotone score-to-weight function and multiplies
that pair's POSITIVE term of the contrastive loss by w_i; the negatives are unchanged. GCL's
published description does not fix the function; ours is the clipped affine map

    w_i = w_lo + (w_hi - w_lo) * clip((s_i - s_lo) / (s_hi - s_lo), 0, 1)

with score_range = (s_lo, s_hi) and weight_range = (w_lo, w_hi) (defaults (0, 1) and (0, 1): a
score in [0, 1] is its own weight, scores outside it are clipped). Where w_i enters
(losses/contrastive.py, losses/multifield.py, losses/sigmoid.py), with N the number of valid
pairs of the term:

    InfoNCE: L = 1/2 [ -(1/N) sum_i w_i log softmax_j(S_i.)_i
                       - (1/N) sum_j w_j log softmax_i(S_.j)_j ]
    sigmoid: L = -(1/N) sum_ij m_i m_j c_ij log sigmoid(l_ij z_ij),  c_ii = w_i, c_ij = 1 (i != j)

and in a multi-field loss every field's term uses the same w_i (a property of the product).

Deliberate choices:
* Normalised by N, not by sum_i w_i: a batch of weakly relevant pairs pulls its positives
  together less, which is the point; dividing by sum w would scale that back up. Hence the
  weights also scale the loss, and the map bounds them (weight_range) rather than leaving raw
  scores (e.g. 0..100) to act as a learning-rate multiplier.
* Weights all 1 give the unweighted loss: the code multiplies by exactly 1.0.
* The map is applied on the device to the raw scores of the batch (`pair_weight`, one float
  per product), so changing it needs no rebuild of the data.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

DEFAULT_SCORE_RANGE = (0.0, 1.0)
DEFAULT_WEIGHT_RANGE = (0.0, 1.0)


def check_ranges(score_range: Sequence[float], weight_range: Sequence[float],
                 what: str = "config.loss.pair_weight") -> tuple[tuple[float, float],
                                                                tuple[float, float]]:
  """The validated (score_range, weight_range) as float pairs.

  Raises:
    ValueError naming the bad value: not two finite numbers, s_lo >= s_hi, w_lo < 0 or
    w_lo > w_hi.
  """
  out = []
  for name, r in (("score_range", score_range), ("weight_range", weight_range)):
    r = tuple(r)
    if (len(r) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in r)
        or any(not abs(v) < float("inf") for v in r)):
      raise ValueError(f"{what}.{name}={r!r} must be two finite numbers (lo, hi).")
    out.append((float(r[0]), float(r[1])))
  (s_lo, s_hi), (w_lo, w_hi) = out
  if not s_lo < s_hi:
    raise ValueError(f"{what}.score_range={tuple(score_range)!r}: lo must be < hi.")
  if not 0.0 <= w_lo <= w_hi:
    raise ValueError(f"{what}.weight_range={tuple(weight_range)!r}: need 0 <= lo <= hi (a "
                     "negative weight would push a matching pair apart).")
  return out[0], out[1]


def score_to_weight(score: jax.Array, score_range: Sequence[float] = DEFAULT_SCORE_RANGE,
                    weight_range: Sequence[float] = DEFAULT_WEIGHT_RANGE) -> jax.Array:
  """w = w_lo + (w_hi - w_lo) * clip((s - s_lo) / (s_hi - s_lo), 0, 1), float32 (docstring).

  Args:
    score: [B] raw scores (any float dtype).
    score_range: (s_lo, s_hi), s_lo < s_hi.
    weight_range: (w_lo, w_hi), 0 <= w_lo <= w_hi.

  Returns:
    [B] float32 weights in [w_lo, w_hi].
  """
  (s_lo, s_hi), (w_lo, w_hi) = check_ranges(score_range, weight_range, "score_to_weight")
  u = jnp.clip((jnp.asarray(score, jnp.float32) - s_lo) / (s_hi - s_lo), 0.0, 1.0)
  return w_lo + (w_hi - w_lo) * u
