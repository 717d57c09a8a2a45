"""InfoNCE against a float64 numpy formula, and global-batch semantics under a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fashion_jax.losses import contrastive


def _numpy_info_nce(a, b, scale):
  a, b = a.astype(np.float64), b.astype(np.float64)
  s = scale * a @ b.T
  def ce_rows(m):
    m = m - m.max(axis=1, keepdims=True)
    logp = m - np.log(np.exp(m).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  return 0.5 * (ce_rows(s) + ce_rows(s.T))


def _pairs(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d)).astype(np.float32)
  b = (a + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  return a, b


def test_info_nce_matches_float64_formula():
  a, b = _pairs()
  for scale in (1.0, 14.3, 100.0):
    loss, metrics = contrastive.info_nce(jnp.asarray(a), jnp.asarray(b), scale)
    np.testing.assert_allclose(float(loss), _numpy_info_nce(a, b, scale), rtol=1e-5, atol=1e-6)
  acc = np.mean(np.argmax(a @ b.T, axis=1) == np.arange(len(a)))
  np.testing.assert_allclose(float(metrics["a2b_acc"]), acc)


def test_info_nce_is_symmetric_in_its_arguments():
  # A hub text close to every image makes the two directions' terms differ; their sum does not.
  a, b = _pairs(n=8)
  b[0] = a.mean(0) / np.linalg.norm(a.mean(0))
  loss_ab, _ = contrastive.info_nce(a, b, 10.0)
  loss_ba, _ = contrastive.info_nce(b, a, 10.0)
  np.testing.assert_allclose(float(loss_ab), float(loss_ba), rtol=1e-6)
  np.testing.assert_allclose(float(loss_ab), _numpy_info_nce(a, b, 10.0), rtol=1e-5)


def test_info_nce_sharded_batch_equals_single_device():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  a, b = _pairs(n=32)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  a_s, b_s = jax.device_put(a, sharding), jax.device_put(b, sharding)
  fn = jax.jit(lambda x, y: contrastive.info_nce(x, y, 20.0)[0])
  sharded = float(fn(a_s, b_s))
  single = float(jax.jit(lambda x, y: contrastive.info_nce(x, y, 20.0)[0])(
      jax.device_put(a, jax.devices()[0]), jax.device_put(b, jax.devices()[0])))
  np.testing.assert_allclose(sharded, single, rtol=1e-6)
  np.testing.assert_allclose(sharded, _numpy_info_nce(a, b, 20.0), rtol=1e-5)
