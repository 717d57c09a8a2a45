"""tests/numerics.py: its rounding bound passes reordered float32 sums and fails real errors.

The sums are explicit NumPy float32 accumulations (np.cumsum with a float32 accumulator is
sequential), so every case here is deterministic.
"""

import math

import numpy as np
import pytest

from tests import numerics


def _terms(n, seed, scale=5.0):
  """[n, 64, 64] float32 terms: 4096 sums of n outer-product terms, like a weight's gradient
  summed over n tokens (entries ~scale * sqrt(n), a few cancelling to near zero)."""
  rs = np.random.RandomState(seed)
  x = (scale * rs.randn(n, 64, 1)).astype(np.float32)
  y = rs.randn(n, 1, 64).astype(np.float32)
  return x * y


def _sequential(terms):
  return np.cumsum(terms, axis=0, dtype=np.float32)[-1]


def _chunked(terms, k):
  """k partial sums, then their sum: what gradient accumulation or chunked encoding does."""
  return _sequential(np.stack([_sequential(c) for c in np.split(terms, k)]))


def _pairwise(terms):
  while len(terms) > 1:  # n is a power of 2.
    terms = terms[0::2] + terms[1::2]
  return terms[0]


def _orders(terms, seed):
  n = len(terms)
  perm = np.random.RandomState(seed + 1000).permutation(n)
  return {"reversed": _sequential(terms[::-1]), "4 chunks": _chunked(terms, 4),
          "permuted": _sequential(terms[perm]), "pairwise": _pairwise(terms)}


@pytest.mark.parametrize("n", [16, 128, 1024])
def test_reordered_sums_meet_the_single_sum_bound(n):
  """The model's single-sum part: two orders of one sum (DEPTH = 1) stay within LAMBDA standard
  deviations, i.e. c = LAMBDA * sqrt(1 / 6), at every n (the sqrt(n) scaling)."""
  c_one_sum = numerics.LAMBDA * math.sqrt(1 / 6)
  for seed in range(3):
    terms = _terms(n, seed)
    want = {"w": _sequential(terms)}
    for name, got in _orders(terms, seed).items():
      worst = numerics.assert_rounding_close({"w": got}, want, n, c=c_one_sum, what=name)
      assert worst < 0.25, (name, worst)  # Observed ~0.13: the bound is not tight by accident.


def test_elementwise_atol_fails_a_reordering_that_the_bound_passes():
  """The defect of the old check (rtol=1e-4, atol=2e-6 per element): entries that cancel to near
  zero carry the rounding of their large partial sums, so a mere reordering fails it."""
  terms = _terms(128, 0)
  want, got = _sequential(terms), _chunked(terms, 4)
  with pytest.raises(AssertionError, match="Mismatched elements"):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  numerics.assert_rounding_close({"w": got}, {"w": want}, 128)


def test_the_bound_fails_a_scaled_leaf_a_dropped_term_and_nan():
  n = 128
  terms = _terms(n, 0)
  want = {"big": _sequential(terms), "small": _sequential(terms[:, :8, :8])}
  assert numerics.assert_rounding_close(want, want, n) == 0.0
  # 0.1% off in the small leaf alone: the check is per leaf, not diluted by the big one.
  scaled = {"big": want["big"], "small": want["small"] * 1.001}
  with pytest.raises(AssertionError, match=r"(?s)1 of 2 leaves.*\['small'\]"):
    numerics.assert_rounding_close(scaled, want, n)
  # One of the n terms dropped (a chunk or token lost from a gradient sum).
  dropped = {"big": _sequential(terms[1:]), "small": want["small"]}
  with pytest.raises(AssertionError, match=r"\['big'\]"):
    numerics.assert_rounding_close(dropped, want, n)
  with pytest.raises(AssertionError, match=r"ratio inf"):
    numerics.assert_rounding_close({"big": want["big"] * np.nan, "small": want["small"]}, want,
                                   n)
  with pytest.raises(AssertionError, match=r"only in got .*'extra'"):
    numerics.assert_rounding_close({**want, "extra": 1.0}, want, n)


def test_a_leaf_of_pure_rounding_noise_is_measured_against_the_floor():
  """A leaf whose exact value is zero (the attention key bias's gradient) holds only rounding
  noise of the tree's scale; the floor makes two noises compare equal, a real value does not."""
  n = 128
  terms = _terms(n, 0)
  big = _sequential(terms)
  noise = lambda seed: np.random.RandomState(seed).randn(32).astype(np.float32) * 1e-5
  want = {"big": big, "zero": noise(1)}
  assert numerics.assert_rounding_close({"big": big, "zero": noise(2)}, want, n) < 0.1
  with pytest.raises(AssertionError, match=r"\['zero'\]"):
    numerics.assert_rounding_close({"big": big, "zero": np.full(32, 0.1, np.float32)}, want, n)


def test_stored_values_add_their_own_rounding():
  """Updates p_after - p_before of values ~1 carry the float32 rounding of p_after: two updates
  1e-5 relative apart (within rounding of the update) land on different floats near 1."""
  rs = np.random.RandomState(0)
  before = np.ones(64, np.float32)
  update = (1e-3 * rs.randn(64)).astype(np.float32)
  after_a = before + update
  after_b = before + update * np.float32(1 + 1e-5)
  got, want = after_b - before, after_a - before
  assert 0 < np.sum(got != want) < 64
  with pytest.raises(AssertionError):
    numerics.assert_rounding_close(got, want, 1, c=1.0)
  numerics.assert_rounding_close(got, want, 1, c=1.0, stored=after_a)
