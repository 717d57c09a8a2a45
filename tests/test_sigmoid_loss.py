"""SigLIP sigmoid loss: dense vs a float64 numpy formula, ring and blockwise vs dense, memory."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from fashion_jax.losses import sigmoid
from fashion_jax.parallel import mesh as mesh_lib

# (t', b): the paper's init, a mild setting where positives and negatives both matter, a sharp one.
_PARAMS = ((math.log(10.0), -10.0), (math.log(3.0), 0.5), (math.log(30.0), -4.0))


def _pairs(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d))
  b = a + 0.7 * rng.normal(size=(n, d))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  return a.astype(np.float32), b.astype(np.float32)


def _mask(n, seed=1):
  m = np.random.default_rng(seed).random(n) > 0.3
  m[0], m[-1] = False, True
  return m


def _np_positive(n, keys):
  """[n, n] bool: i == j, or (with keys, a list of hashable values) keys_i == keys_j."""
  if keys is None:
    return np.eye(n, dtype=bool)
  return np.array([[ki == kj for kj in keys] for ki in keys])


def _np_pair_weights(n, weight, keys=None):
  """c_ij: row i's pair weight w_i on its positives, 1 elsewhere; float64."""
  c = np.ones((n, n))
  if weight is not None:
    pos = _np_positive(n, keys)
    c[pos] = np.broadcast_to(np.float64(weight)[:, None], (n, n))[pos]
  return c


def _np_loss(x, y, lt, b, mask=None, weight=None, keys=None):
  """float64 numpy: -(1/N) sum_ij m_i m_j c_ij log sigmoid(l_ij (e^t' <x_i, y_j> + b)), with
  l_ij = +1 on the positives (i == j, or equal keys) and -1 elsewhere, c_ij = weight_i on row
  i's positives and 1 elsewhere (all 1 without weights)."""
  x, y = np.float64(x), np.float64(y)
  m = np.ones(len(x)) if mask is None else np.float64(mask)
  z = np.exp(lt) * (x @ y.T) + b
  labels = 2.0 * _np_positive(len(x), keys) - 1.0
  c = _np_pair_weights(len(x), weight, keys)
  # -log sigmoid(u) = log(1 + e^-u).
  return np.sum(np.outer(m, m) * c * np.logaddexp(0.0, -labels * z)) / max(m.sum(), 1.0)


def _np_grads(x, y, lt, b, mask=None, weight=None, keys=None):
  """Analytic gradients of `_np_loss` w.r.t. (x, y, t', b), float64."""
  x, y = np.float64(x), np.float64(y)
  m = np.ones(len(x)) if mask is None else np.float64(mask)
  t = np.exp(lt)
  s = x @ y.T
  labels = 2.0 * _np_positive(len(x), keys) - 1.0
  c = _np_pair_weights(len(x), weight, keys)
  # d/dz log(1 + e^(-l z)) = -l / (1 + e^(l z)).
  gz = -np.outer(m, m) * c * labels / (1.0 + np.exp(labels * (t * s + b))) / max(m.sum(), 1.0)
  return t * gz @ y, t * gz.T @ x, t * np.sum(gz * s), np.sum(gz)


def _weights(n, seed=2):
  """Graded pair weights in [0, 2), one exactly 0 and one exactly 1."""
  w = 2.0 * np.random.default_rng(seed).random(n)
  w[1], w[2] = 0.0, 1.0
  return w.astype(np.float32)


def _value_and_grads(fn):
  """jit(value_and_grad) of fn(img, txt, t', b) -> (loss, metrics) w.r.t. all four."""
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))


def _assert_same(got, want, rtol, atol):
  """got, want: ((loss, metrics), grads) of `_value_and_grads`; every array compared."""
  (loss, metrics), grads = got
  (loss_w, metrics_w), grads_w = want
  np.testing.assert_allclose(loss, loss_w, rtol=rtol, atol=atol)
  for g, g_w in zip(grads, grads_w):
    np.testing.assert_allclose(g, g_w, rtol=rtol, atol=atol)
  for k in metrics_w:
    np.testing.assert_allclose(metrics[k], metrics_w[k], rtol=rtol, atol=atol, err_msg=k)


def _dense_single_device(x, y, lt, b, mask=None, weight=None, keys=None):
  dev = jax.devices()[0]
  args = [jax.device_put(v, dev) for v in (x, y, np.float32(lt), np.float32(b))]
  return _value_and_grads(lambda *a: sigmoid.sigmoid_loss(
      *a, pair_mask=mask, pair_weight=weight, pair_keys=keys))(*args)


def _keys(n, seed=3):
  """[n, 2] int32 keys with 4 distinct values (many duplicates, as a colour field has)."""
  values = np.random.default_rng(seed).integers(0, 4, n)
  return np.stack([values, 7 * values + 1], -1).astype(np.int32)


@pytest.mark.parametrize("masked,weighted", [(False, False), (True, False), (True, True)])
def test_numpy_reference_gradients_match_finite_differences(masked, weighted):
  # The analytic numpy gradients used below are themselves checked in float64.
  x, y = _pairs(n=6, d=4)
  mask = _mask(6) if masked else None
  weight = _weights(6) if weighted else None
  lt, b = math.log(3.0), 0.5
  h = 1e-5
  grads = _np_grads(x, y, lt, b, mask, weight)
  for k, (v, g) in enumerate(zip((x, y, lt, b), grads)):
    v = np.array(v, np.float64)
    fd = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
      args = [np.float64(a) for a in (x, y, lt, b)]
      for sgn in (1.0, -1.0):
        w = v.copy()
        w[idx] += sgn * h
        args[k] = w
        fd[idx] += sgn * _np_loss(*args, mask, weight) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("lt,b", _PARAMS)
@pytest.mark.parametrize("masked", [False, True])
def test_dense_matches_float64_formula(lt, b, masked):
  x, y = _pairs()
  mask = _mask(len(x)) if masked else None
  (loss, metrics), grads = _dense_single_device(x, y, lt, b, mask)
  np.testing.assert_allclose(loss, _np_loss(x, y, lt, b, mask), rtol=1e-6)
  for g, g_np in zip(grads, _np_grads(x, y, lt, b, mask)):
    np.testing.assert_allclose(g, g_np, rtol=1e-6, atol=1e-6)
  m = np.ones(len(x), bool) if mask is None else mask
  z = np.exp(lt) * (np.float64(x) @ np.float64(y).T) + b
  valid = np.outer(m, m)
  np.testing.assert_allclose(metrics["pos_logit"], np.diag(z)[m].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], z[valid & ~np.eye(len(x), dtype=bool)].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["temperature"], np.exp(lt), rtol=1e-6)
  np.testing.assert_allclose(metrics["bias"], b)
  assert float(metrics["num_valid"]) == m.sum()


@pytest.mark.parametrize("lt,b", _PARAMS)
@pytest.mark.parametrize("masked", [False, True])
def test_pair_weights_match_float64_formula(lt, b, masked):
  x, y = _pairs()
  mask = _mask(len(x)) if masked else None
  weight = _weights(len(x))
  (loss, metrics), grads = _dense_single_device(x, y, lt, b, mask, weight)
  np.testing.assert_allclose(loss, _np_loss(x, y, lt, b, mask, weight), rtol=1e-6)
  for g, g_np in zip(grads, _np_grads(x, y, lt, b, mask, weight)):
    np.testing.assert_allclose(g, g_np, rtol=1e-6, atol=1e-6)
  # The weights move the loss well beyond the tolerance above (a negative control; in the sharp
  # setting the positives are already near log sigmoid = 0, so weighting them moves it less
  # than float32 rounding) but not the metrics.
  if (lt, b) != _PARAMS[2]:
    assert abs(float(loss) - _np_loss(x, y, lt, b, mask)) > 1e-3
  (_, plain_metrics), _ = _dense_single_device(x, y, lt, b, mask)
  for k, v in plain_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-6, err_msg=k)


def test_pair_weights_of_one_equal_the_unweighted_loss_bitwise():
  x, y = _pairs(n=32)
  mask = _mask(32)
  ones = np.ones(32, np.float32)
  lt, b = _PARAMS[1]
  for fn in (lambda *a, **k: sigmoid.sigmoid_loss(*a, **k),
             lambda *a, **k: sigmoid.blockwise_sigmoid_loss(*a, num_blocks=4, **k)):
    for m in (None, mask):
      want = _value_and_grads(lambda *a, m=m, fn=fn: fn(*a, pair_mask=m))(
          x, y, np.float32(lt), np.float32(b))
      got = _value_and_grads(lambda *a, m=m, fn=fn: fn(*a, pair_mask=m, pair_weight=ones))(
          x, y, np.float32(lt), np.float32(b))
      _assert_same(got, want, rtol=0, atol=0)
  mesh_config = {"data": 4, "fsdp": 2}
  _assert_same(_ring(mesh_config, x, y, lt, b, mask, ones), _ring(mesh_config, x, y, lt, b, mask),
               rtol=0, atol=0)


def test_pair_mask_is_the_loss_of_the_valid_sub_batch():
  x, y = _pairs()
  mask = _mask(len(x))
  lt, b = _PARAMS[1]
  (loss, _), grads = _dense_single_device(x, y, lt, b, mask)
  (loss_sub, _), grads_sub = _dense_single_device(x[mask], y[mask], lt, b)
  np.testing.assert_allclose(loss, loss_sub, rtol=1e-6)
  for g, g_sub in zip(grads[:2], grads_sub[:2]):
    np.testing.assert_array_equal(g[~mask], 0.0)
    np.testing.assert_allclose(g[mask], g_sub, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[2:], grads_sub[2:], rtol=1e-5)
  # No valid row: a zero loss with zero gradients, not a NaN.
  (loss0, _), grads0 = _dense_single_device(x, y, lt, b, np.zeros(len(x), bool))
  assert float(loss0) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads0)


def test_init_constants():
  assert math.isclose(math.exp(sigmoid.INIT_LOG_TEMPERATURE), 10.0)
  assert sigmoid.INIT_BIAS == -10.0


def _ring(mesh_config, x, y, lt, b, mask=None, weight=None, keys=None):
  mesh = mesh_lib.create_mesh(mesh_config)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.device_put(x, rows), jax.device_put(y, rows), np.float32(lt), np.float32(b))

  def fn(*a):
    return sigmoid.ring_sigmoid_loss(*a, mesh=mesh, pair_mask=mask, pair_weight=weight,
                                     pair_keys=keys)

  return _value_and_grads(fn)(*args)


@pytest.mark.parametrize("mesh_config,masked,params", [
    ({"data": 4, "fsdp": 2}, True, _PARAMS[0]),
    ({"data": 4, "fsdp": 2}, False, _PARAMS[1]),
    ({"data": 8}, False, _PARAMS[0]),
    ({"data": 8}, True, _PARAMS[2]),
    # Replicas over tensor must not double count.
    ({"data": 2, "fsdp": 2, "tensor": 2}, True, _PARAMS[1]),
])
def test_ring_matches_single_device_dense(mesh_config, masked, params):
  x, y = _pairs(n=32)
  mask = _mask(32) if masked else None
  want = _dense_single_device(x, y, *params, mask)
  _assert_same(_ring(mesh_config, x, y, *params, mask), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_config", [{"data": 4, "fsdp": 2}, {"data": 8}])
def test_weighted_ring_and_blockwise_match_weighted_dense(mesh_config):
  x, y = _pairs(n=32)
  mask, weight = _mask(32), _weights(32)
  params = _PARAMS[2]
  want = _dense_single_device(x, y, *params, mask, weight)
  _assert_same(_ring(mesh_config, x, y, *params, mask, weight), want, rtol=1e-5, atol=1e-6)

  def fn(*a):
    return sigmoid.blockwise_sigmoid_loss(*a, num_blocks=8, pair_mask=mask, pair_weight=weight)

  _assert_same(_value_and_grads(fn)(x, y, *map(np.float32, params)), want, rtol=1e-5,
               atol=1e-6)


@pytest.mark.parametrize("masked,weighted", [(False, False), (True, True)])
def test_keyed_positives_match_float64_formula(masked, weighted):
  # Rows with equal keys are each other's positives: values, gradients and the metrics (the
  # positive-logit mean over the keyed positives) against float64 numpy.
  x, y = _pairs()
  n = len(x)
  mask = _mask(n) if masked else None
  weight = _weights(n) if weighted else None
  keys = _keys(n)
  key_list = [tuple(k) for k in keys]
  lt, b = _PARAMS[1]
  (loss, metrics), grads = _dense_single_device(x, y, lt, b, mask, weight, keys)
  np.testing.assert_allclose(loss, _np_loss(x, y, lt, b, mask, weight, key_list), rtol=1e-6)
  assert not np.isclose(float(loss), _np_loss(x, y, lt, b, mask, weight), rtol=1e-3)
  for g, g_np in zip(grads, _np_grads(x, y, lt, b, mask, weight, key_list)):
    np.testing.assert_allclose(g, g_np, rtol=1e-6, atol=1e-6)
  m = np.ones(n, bool) if mask is None else mask
  z = np.exp(lt) * (np.float64(x) @ np.float64(y).T) + b
  pos = _np_positive(n, key_list) & np.outer(m, m)
  np.testing.assert_allclose(metrics["pos_logit"], z[pos].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_logit"], z[np.outer(m, m) & ~pos].mean(), rtol=1e-6)


def test_distinct_keys_equal_no_keys_bitwise():
  x, y = _pairs()
  mask, weight = _mask(len(x)), _weights(len(x))
  got = _dense_single_device(x, y, *_PARAMS[2], mask, weight, np.arange(len(x)))
  want = _dense_single_device(x, y, *_PARAMS[2], mask, weight)
  _assert_same(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mesh_config", [{"data": 4, "fsdp": 2}, {"data": 8}])
def test_keyed_ring_and_blockwise_match_keyed_dense(mesh_config):
  # Keyed positives sit in every ring step (not only the device's own chunk): the keys travel.
  x, y = _pairs(n=32)
  mask, weight, keys = _mask(32), _weights(32), _keys(32)
  params = _PARAMS[1]
  want = _dense_single_device(x, y, *params, mask, weight, keys)
  _assert_same(_ring(mesh_config, x, y, *params, mask, weight, keys), want, rtol=1e-5,
               atol=1e-6)

  def fn(*a):
    return sigmoid.blockwise_sigmoid_loss(*a, num_blocks=8, pair_mask=mask, pair_weight=weight,
                                          pair_keys=keys)

  _assert_same(_value_and_grads(fn)(x, y, *map(np.float32, params)), want, rtol=1e-5,
               atol=1e-6)


def test_token_keys_are_equal_exactly_for_equal_rows():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50000, (200, 16)).astype(np.int32)
  ids[10] = ids[3]
  ids[11, :15] = ids[3, :15]  # Differs in the last token only.
  keys = np.asarray(sigmoid.token_keys(ids))
  assert keys.shape == (200, 2) and keys.dtype == np.int32
  same = (keys[:, None] == keys[None]).all(-1)
  want = (ids[:, None] == ids[None]).all(-1)
  np.testing.assert_array_equal(same, want)
  # [B, F, L] -> [B, F, 2], row by row.
  np.testing.assert_array_equal(np.asarray(sigmoid.token_keys(ids.reshape(50, 4, 16))),
                                keys.reshape(50, 4, 2))


@pytest.mark.parametrize("wrong_perm", [
    lambda n: [(r, (r + 2) % n) for r in range(n)],   # Every other chunk never visits.
    lambda n: [(r, r) for r in range(n)],             # The chunks never move.
])
def test_ring_negative_control_is_detected(monkeypatch, wrong_perm):
  x, y = _pairs(n=32)
  lt, b = _PARAMS[1]
  want = _dense_single_device(x, y, lt, b)
  monkeypatch.setattr(sigmoid, "_ring_permutation", wrong_perm)
  got = _ring({"data": 8}, x, y, lt, b)
  with pytest.raises(AssertionError):
    _assert_same(got, want, rtol=1e-5, atol=1e-6)
  # Both halves of the custom_vjp are wrong on their own: the loss and the text gradients.
  (loss, _), grads = got
  assert not np.allclose(loss, want[0][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(grads[1], want[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_blocks,masked,params", [
    (4, True, _PARAMS[0]), (4, False, _PARAMS[1]), (16, False, _PARAMS[2]), (1, True, _PARAMS[1]),
])
def test_blockwise_matches_single_device_dense(num_blocks, masked, params):
  x, y = _pairs(n=32)
  mask = _mask(32) if masked else None
  want = _dense_single_device(x, y, *params, mask)

  def fn(*a):
    return sigmoid.blockwise_sigmoid_loss(*a, num_blocks=num_blocks, pair_mask=mask)

  got = _value_and_grads(fn)(x, y, *map(np.float32, params))
  _assert_same(got, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise():
  x, y = _pairs(n=12)
  mesh = mesh_lib.create_mesh({"data": 8})
  with pytest.raises(ValueError, match="not divisible"):
    sigmoid.ring_sigmoid_loss(x, y, 0.0, 0.0, mesh=mesh)
  with pytest.raises(ValueError, match="does not divide"):
    sigmoid.blockwise_sigmoid_loss(x, y, 0.0, 0.0, num_blocks=5)
  with pytest.raises(ValueError, match="pair_mask"):
    sigmoid.sigmoid_loss(x, y, 0.0, 0.0, pair_mask=np.ones(11, bool))
  with pytest.raises(ValueError, match=r"pair_weight \(12, 1\) must be \[B\] = \(12,\)"):
    sigmoid.sigmoid_loss(x, y, 0.0, 0.0, pair_weight=np.ones((12, 1), np.float32))


def _compiled(fn, mesh, n, d):
  """The compiled value_and_grad of fn on batch-sharded [n, d] inputs (abstract: no data)."""
  rows = jax.ShapeDtypeStruct((n, d), jnp.float32,
                              sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  return _value_and_grads(fn).lower(rows, rows, scalar, scalar).compile()


def test_ring_and_blockwise_never_hold_the_batch_squared_logits():
  n, d = 512, 16
  mesh = mesh_lib.create_mesh({"data": 8})
  ring = _compiled(lambda *a: sigmoid.ring_sigmoid_loss(*a, mesh=mesh), mesh, n, d)
  dense = _compiled(sigmoid.sigmoid_loss, mesh, n, d)      # GSPMD splits the rows over 8.
  blockwise = _compiled(lambda *a: sigmoid.blockwise_sigmoid_loss(*a, num_blocks=8),
                        mesh, n, d)
  one = mesh_lib.create_mesh({"data": 1}, devices=jax.devices()[:1])
  dense_one = _compiled(sigmoid.sigmoid_loss, one, n, d)
  temp = {name: c.memory_analysis().temp_size_in_bytes
          for name, c in (("ring", ring), ("dense", dense), ("blockwise", blockwise),
                          ("dense_one", dense_one))}
  # Measured per-device temp (CPU, jax 0.10.2, B=512, D=16, 8 devices): ring 67 kB, dense
  # 8-way 557 kB, blockwise (K=8) 8-way 122 kB, dense on one device 4.2 MB (4 B^2 floats).
  assert temp["ring"] < temp["dense"] / 4, temp
  assert temp["ring"] < temp["dense_one"] / 32, temp
  assert temp["blockwise"] < temp["dense"] / 4, temp
  assert temp["dense_one"] >= 4 * n * n, temp                # The [B, B] logits are really there.
  # No [B, B] or [B/n, B] buffer anywhere in the ring's per-device program.
  hlo = ring.as_text()
  for shape in (f"[{n},{n}]", f"[{n // 8},{n}]", f"[{n},{n // 8}]"):
    assert shape not in hlo, shape
  assert f"[{n // 8},{n // 8}]" in hlo
  # The formula of the module docstring predicts the measurement.
  predicted = sigmoid.sigmoid_loss_memory_bytes(n, 8, 8, embed_dim=d)
  assert 0.5 * predicted["ring"] <= temp["ring"] <= 2 * predicted["ring"], (temp, predicted)


def test_memory_bytes_formula():
  got = sigmoid.sigmoid_loss_memory_bytes(32768, 64, 64, jnp.float32, embed_dim=768)
  b = 32768 // 64
  assert got == {"dense": 2 * 32768**2 * 4, "ring": (2 * b * b + 4 * b * 768) * 4,
                 "blockwise": 2 * 32768 * 512 * 4}
  assert sigmoid.sigmoid_loss_memory_bytes(1024, 8, 4, jnp.bfloat16)["ring"] == 2 * 128**2 * 2
  with pytest.raises(ValueError, match="num_devices"):
    sigmoid.sigmoid_loss_memory_bytes(1000, 64)
