"""Assertions that two float32 computations of one quantity differ by rounding only.

A lever (scan, remat, chunked encoding, blockwise InfoNCE, another attention kernel, sharding,
gradient accumulation) changes the order and grouping of float32 sums, never the mathematics; so
do another XLA version, CPU or fusion decision. Element-wise `assert_allclose(rtol, atol)` is the
wrong check for that: an element whose terms cancel (a gradient entry of 0.012 in a leaf of
entries ~5) carries the rounding error of the large partial sums it came from, not of its own
size, so a fixed atol sits one rounding step from a failure on one leaf (which another XLA or CPU
then trips) and is far too loose on another. The check here is per leaf of a pytree, in the
2-norm:

  ||got - want|| <= C * EPS32 * sqrt(n) * scale (+ EPS32 * ||stored||),
  scale = max(||want||, sqrt(leaf size / tree size) * ||want tree||).

The model behind it (the standard probabilistic one: Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019):
  * A float32 sum of n terms in some order is S + sum_k d_k S_k, with S_k its partial sums and
    the relative roundings d_k independent, mean zero, |d_k| <= EPS32 / 2. With partial sums no
    larger than the result, the error's standard deviation is at most EPS32 * |S| * sqrt(n / 12),
    so two orders of one sum differ by a standard deviation of at most EPS32 * |S| * sqrt(n / 6).
    Over a leaf of many sums the same holds for the 2-norm, which is set by the leaf's large
    entries, whose partial sums do not cancel down. `n` is the longest sum the compared values
    accumulate (for a parameter gradient: the batch's tokens or pixels it sums over; for a
    forward output: the widest contraction).
  * A loss or gradient is a chain of DEPTH sequential sums (LayerNorm statistics, projections,
    attention scores and weights, MLP, pooling, the loss's reductions, and each again backwards).
    Their errors are independent and pass through the well-conditioned Jacobians of the tests'
    tiny initialised networks, so their variances add: a factor sqrt(DEPTH). Cancellation beyond
    that multiplies the error by |terms| / |result|: the softmax cross-entropy's lse - logit
    cancels from |logit| <= the temperature scale to the loss, which is why tests/test_plan.py's
    InfoNCE at scale 20 sits closest to the bound (a third of it).
  * C = LAMBDA * sqrt(DEPTH / 6): LAMBDA = 4 standard deviations (a scalar leaf, the worst case,
    then passes except with probability ~6e-5), DEPTH = 64 (the tests' models have at most three
    transformer blocks, ~10 sequential sums each way per block, plus embeddings, pooling and
    loss). tests/test_numerics.py checks the single-sum part on explicit float32 sums (two
    orders differ by ~0.22 * EPS32 * sqrt(n) * ||S|| at n = 16 ... 1024, under the model's 0.41)
    and that a 0.1% error, a dropped term or a NaN fails.
  * The floor sqrt(leaf size / tree size) * ||want tree|| is the norm the leaf would have if the
    tree's norm were spread evenly over its entries. Without it a leaf whose value cancels to
    rounding noise fails every time: the attention key bias's gradient is exactly zero (softmax
    is invariant to adding q.b to every logit of a row), so float32 gives ~1e-9 of noise that
    differs between any two programs.
  * `stored`: when the compared values are differences of stored float32 values (the update
    p_after - p_before of a train step), each run rounded its stored value once (|error| <=
    EPS32 / 2 * |value|), which adds EPS32 * ||stored|| to the leaf's tolerance.
"""

import math
from typing import Any, Optional

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23; the unit roundoff is EPS32 / 2.
LAMBDA = 4.0  # Standard deviations of the rounding error allowed.
DEPTH = 64  # Sequential float32 sums along a compared value's dependency chain.
C = LAMBDA * math.sqrt(DEPTH / 6)  # ~13.1


def rounding_tolerance(n: int, c: float = C) -> float:
  """The relative bound c * EPS32 * sqrt(n) for chains of float32 sums of (at most) n terms."""
  if n < 1:
    raise ValueError(f"n={n}: the reduction length must be >= 1.")
  return c * EPS32 * math.sqrt(n)


def _flat64(x) -> np.ndarray:
  return np.ravel(np.asarray(x, np.float64))


def rounding_ratios(got: Any, want: Any, n: int, *, c: float = C,
                    stored: Optional[Any] = None) -> dict[str, tuple[float, float, float]]:
  """Per leaf of `want`: (error / tolerance, error, tolerance), the bound of the module docstring.

  Args:
    got: a pytree with `want`'s structure and shapes (arrays or Python/NumPy scalars, any float
      dtype; norms are taken in float64).
    want: the reference pytree.
    n: the longest float32 sum the compared values accumulate.
    c: the constant of the bound.
    stored: optional pytree like `want` (see the module docstring).

  Returns:
    {keystr(path): (ratio, error, tolerance)}; a non-finite error has ratio inf.
  """
  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
  got_paths = [jax.tree_util.keystr(p) for p, _ in got_leaves]
  paths = [jax.tree_util.keystr(p) for p, _ in want_leaves]
  if got_paths != paths:
    raise AssertionError(f"Different trees: only in got {sorted(set(got_paths) - set(paths))}, "
                         f"only in want {sorted(set(paths) - set(got_paths))}.")
  stored_leaves = [None] * len(paths) if stored is None else jax.tree.leaves(stored)
  if len(stored_leaves) != len(paths):
    raise AssertionError(f"stored has {len(stored_leaves)} leaves, want {len(paths)}.")
  want_flat = [_flat64(w) for _, w in want_leaves]
  total_size = sum(w.size for w in want_flat)
  total_norm = float(np.linalg.norm(np.concatenate(want_flat))) if want_flat else 0.0
  rel = rounding_tolerance(n, c)
  out = {}
  for path, (_, g), (_, w_in), w, s in zip(paths, got_leaves, want_leaves, want_flat,
                                           stored_leaves):
    if np.shape(g) != np.shape(w_in):
      raise AssertionError(f"{path}: shape {np.shape(g)} != {np.shape(w_in)}.")
    err = float(np.linalg.norm(_flat64(g) - w))
    scale = max(float(np.linalg.norm(w)), math.sqrt(w.size / total_size) * total_norm)
    tol = rel * scale + (0.0 if s is None else EPS32 * float(np.linalg.norm(_flat64(s))))
    if not math.isfinite(err):
      ratio = math.inf
    elif tol > 0:
      ratio = err / tol
    else:
      ratio = 0.0 if err == 0 else math.inf
    out[path] = (ratio, err, tol)
  return out


def assert_rounding_close(got: Any, want: Any, n: int, *, c: float = C,
                          stored: Optional[Any] = None, what: str = "") -> float:
  """Asserts every leaf meets the bound of the module docstring; returns the worst ratio.

  Args: as `rounding_ratios`; `what` prefixes the failure message, which names each failing leaf
  with its error, tolerance and ratio.
  """
  ratios = rounding_ratios(got, want, n, c=c, stored=stored)
  bad = sorted(((k, v) for k, v in ratios.items() if not v[0] <= 1.0), key=lambda kv: -kv[1][0])
  if bad:
    lines = [f"  {k or '<root>'}: |got - want| = {e:.3g} > tolerance {t:.3g} (ratio {r:.3g})"
             for k, (r, e, t) in bad]
    raise AssertionError(
        f"{what + ': ' if what else ''}{len(bad)} of {len(ratios)} leaves differ by more than "
        f"float32 rounding (c={c:.3g} * EPS32 * sqrt(n={n}) * leaf scale):\n" + "\n".join(lines))
  return max((r for r, _, _ in ratios.values()), default=0.0)
