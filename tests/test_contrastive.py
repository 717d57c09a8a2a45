"""InfoNCE against a float64 numpy formula, and global-batch semantics under a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def _toy_text_encoder(w):
  """A row encoder [n, L] int -> [n, D]: embedding, tanh, mean over the row (no batch
  statistics), with a second output, so pytrees are covered."""
  def encode(ids):
    h = jnp.tanh(w["emb"][ids] @ w["dense"])               # [n, L, D]
    return {"pooled": h.mean(axis=1), "last": h[:, -1]}
  return encode


def _repeated_rows(n=64, length=6, distinct=20, seed=0):
  rng = np.random.default_rng(seed)
  vocab = rng.integers(0, 50, (distinct, length))
  return vocab[rng.integers(0, distinct, n)].astype(np.int32)


@pytest.mark.parametrize("max_distinct, falls_back", [(24, False), (8, True), (64, True),
                                                      (0, True)])
def test_encode_distinct_equals_encoding_every_row(max_distinct, falls_back):
  # 64 rows with at most 20 distinct ones, sharded over 8 devices as a batch is. U = 24 encodes
  # the distinct rows once; U = 8 is too few and falls back to the full encode; U = 64 >= N and
  # U = 0 (off) encode every row directly. Values and gradients equal encoding every row.
  ids = _repeated_rows()
  distinct = len(np.unique(ids, axis=0))
  rng = np.random.default_rng(1)
  w = {"emb": jnp.asarray(rng.normal(size=(50, 8)), jnp.float32),
       "dense": jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32)}
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  ids_s = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
  probe = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)

  def loss(w, ids, fn):
    out = fn(_toy_text_encoder(w), ids)
    return jnp.sum(out["pooled"] * probe) + jnp.sum(out["last"] ** 2)

  once = lambda enc, ids: contrastive.encode_distinct(enc, ids, max_distinct)[0]
  got, got_grad = jax.jit(jax.value_and_grad(lambda w, i: loss(w, i, once)))(w, ids_s)
  want, want_grad = jax.jit(jax.value_and_grad(
      lambda w, i: loss(w, i, lambda enc, x: enc(x))))(w, ids)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in w:  # Summation order differs (copies summed in the gather's transpose): rounding.
    scale = float(np.abs(want_grad[k]).max())
    np.testing.assert_allclose(got_grad[k], want_grad[k], rtol=1e-5, atol=1e-6 * scale)
  out, count, fell_back = jax.jit(
      lambda w, i: contrastive.encode_distinct(_toy_text_encoder(w), i, max_distinct))(w, ids_s)
  assert bool(fell_back) == falls_back
  assert int(count) == (distinct if 0 < max_distinct < len(ids) else len(ids))
  np.testing.assert_allclose(out["last"], _toy_text_encoder(w)(ids)["last"], rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 2.5, "64"])
def test_encode_distinct_names_a_bad_row_count(bad):
  with pytest.raises(ValueError, match=f"max_distinct={bad!r} must be an int >= 0"):
    contrastive.encode_distinct(lambda x: x, jnp.zeros((4, 2), jnp.int32), bad)
