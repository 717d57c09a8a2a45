"""Adaptive loss weights (losses/weighting.py) vs an independent float64 numpy evaluation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.losses import weighting


def _weights_np(g):
  """The adaptive-weights formula of losses/weighting.py in float64, written literally."""
  g = np.asarray(g, np.float64)
  k = len(g)
  e = np.exp(g - g.max())
  n = (e / e.sum()) ** 2
  prods = [np.prod([k - n[j] for j in range(k) if j != i]) for i in range(k)]
  return np.asarray(prods) / sum(prods)


def _total_np(g):
  return float(np.dot(_weights_np(g), g))


def _fd_grad(f, g, eps=1e-6):
  g = np.asarray(g, np.float64)
  out = np.zeros_like(g)
  for i in range(len(g)):
    d = np.zeros_like(g)
    d[i] = eps
    out[i] = (f(g + d) - f(g - d)) / (2 * eps)
  return out


CASES = [[8.2, 0.69, 0.15], [0.3, 0.3, 0.3], [1.0, 2.0, 3.0], [5.0, -1.0, 0.5], [2.0, 0.1]]


@pytest.mark.parametrize("g", CASES)
def test_weights_match_float64_formula(g):
  w = np.asarray(weighting.adaptive_weights(jnp.asarray(g, jnp.float32)))
  np.testing.assert_allclose(w, _weights_np(g), rtol=1e-6, atol=1e-7)
  assert abs(w.sum() - 1) < 1e-6 and (w > 0).all()


def test_weights_favour_the_lagging_task():
  # The largest loss gets the largest weight; equal losses give 1/K.
  w = np.asarray(weighting.adaptive_weights(jnp.array([4.0, 1.0, 0.5])))
  assert w[0] > w[1] >= w[2]
  np.testing.assert_allclose(weighting.adaptive_weights(jnp.full(3, 0.7)), np.full(3, 1 / 3),
                             rtol=1e-6)


@pytest.mark.parametrize("g", CASES)
def test_gradient_through_weights_matches_finite_differences(g):
  with jax.enable_x64(True):
    def total(x):
      return jnp.sum(weighting.adaptive_weights(x, "through") * x)
    grad = np.asarray(jax.grad(total)(jnp.asarray(g, jnp.float64)))
  np.testing.assert_allclose(grad, _fd_grad(_total_np, g), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("g", CASES)
def test_stop_gradient_weights_are_constants(g):
  # With 'stop', d(sum w_i L_i)/dL = w (the weights frozen at their value): finite differences of
  # sum_i w_i(g0) L_i with w fixed.
  w0 = _weights_np(g)
  with jax.enable_x64(True):
    def total(x):
      return jnp.sum(weighting.adaptive_weights(x, "stop") * x)
    grad = np.asarray(jax.grad(total)(jnp.asarray(g, jnp.float64)))
  np.testing.assert_allclose(grad, _fd_grad(lambda x: float(np.dot(w0, x)), g), rtol=1e-7)
  # ... and the two choices really differ where the weights depend on G.
  if len(set(g)) > 1:
    with jax.enable_x64(True):
      through = np.asarray(jax.grad(
          lambda x: jnp.sum(weighting.adaptive_weights(x, "through") * x))(jnp.asarray(g)))
    assert np.abs(through - grad).max() > 1e-4


def test_gradient_into_parameters_through_combine():
  # Chain rule through the weights into model parameters: L_i = f_i(theta).
  def losses_of(theta):
    return {"mlm": jnp.sum(theta ** 2), "tia": jnp.sin(theta[0]) + 2.0,
            "mpm": jnp.exp(0.3 * theta[1])}

  def np_total(theta, frozen_w=None):
    g = np.array([np.sum(theta ** 2), np.sin(theta[0]) + 2.0, np.exp(0.3 * theta[1])])
    w = _weights_np(g) if frozen_w is None else frozen_w
    return float(np.dot(w, g))

  theta0 = np.array([0.7, -1.2])
  with jax.enable_x64(True):
    for mode in weighting.WEIGHT_GRADS:
      grad = np.asarray(jax.grad(lambda t: weighting.combine(
          losses_of(t), ("mlm", "tia", "mpm"), "adaptive", mode)[0])(jnp.asarray(theta0)))
      if mode == "through":
        expected = _fd_grad(np_total, theta0)
      else:
        g0 = np.array([np.sum(theta0 ** 2), np.sin(theta0[0]) + 2.0, np.exp(0.3 * theta0[1])])
        expected = _fd_grad(lambda t: np_total(t, _weights_np(g0)), theta0)
      np.testing.assert_allclose(grad, expected, rtol=1e-6, err_msg=mode)


def test_equal_weights_and_metrics():
  losses = {"mlm": jnp.float32(3.0), "tia": jnp.float32(0.6), "mpm": jnp.float32(0.1)}
  total, m = weighting.combine(losses, ("mlm", "tia", "mpm"), "equal")
  np.testing.assert_allclose(total, (3.0 + 0.6 + 0.1) / 3, rtol=1e-6)
  assert set(m) == {"weight_mlm", "weight_tia", "weight_mpm"}
  total, m = weighting.combine(losses, ("mlm", "tia", "mpm"), "adaptive")
  w = _weights_np([3.0, 0.6, 0.1])
  np.testing.assert_allclose([m["weight_mlm"], m["weight_tia"], m["weight_mpm"]], w, rtol=1e-6)
  np.testing.assert_allclose(total, np.dot(w, [3.0, 0.6, 0.1]), rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="softmax"), "scheme='softmax'"),
    (dict(weight_grad="partial"), "weight_grad='partial'"),
    (dict(order=("mlm", "itc")), r"tasks \['itc'\] have no loss"),
])
def test_bad_arguments(kwargs, match):
  args = dict(losses={"mlm": 1.0, "tia": 2.0}, order=("mlm", "tia"), scheme="adaptive",
              weight_grad="stop")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    weighting.combine(**args)


def test_weights_are_permutation_equivariant():
  g = np.array([2.5, 0.4, 1.1])
  w = np.asarray(weighting.adaptive_weights(jnp.asarray(g)))
  for perm in itertools.permutations(range(3)):
    wp = np.asarray(weighting.adaptive_weights(jnp.asarray(g[list(perm)])))
    np.testing.assert_allclose(wp, w[list(perm)], rtol=1e-6)
