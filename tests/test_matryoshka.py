"""Matryoshka loss and truncation: float64 numpy formula, re-normalisation, bad dims."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.evaluate import retrieval
from fashion_jax.losses import matryoshka
from fashion_jax.losses import multifield


def _np_info_nce(a, b, scale):
  s = scale * (np.float64(a) @ np.float64(b).T)
  d = np.diag(s)
  return 0.5 * ((np.log(np.exp(s).sum(1)) - d).mean() + (np.log(np.exp(s).sum(0)) - d).mean())


def _np_tn(x, m):
  x = np.float64(x)[:, :m or x.shape[1]]
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_truncate_and_normalize_renormalises_numpy_and_jax():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  for m in (4, 8, 0):
    got_np = matryoshka.truncate_and_normalize(x, m)
    got_jax = matryoshka.truncate_and_normalize(jnp.asarray(x), m)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    assert isinstance(got_jax, jax.Array)
    assert got_np.shape == (5, m or 16)
    np.testing.assert_allclose(got_np, _np_tn(x, m), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_jax), _np_tn(x, m), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got_np, axis=1), 1.0, rtol=1e-6)
  # A prefix is not unit length before re-normalisation.
  assert np.all(np.linalg.norm(x[:, :4], axis=1) < 1.0 - 1e-3)
  # An all-zero prefix stays zero (no NaN).
  z = np.zeros((2, 8), np.float32)
  assert np.all(matryoshka.truncate_and_normalize(z, 4) == 0.0)


def test_matryoshka_loss_equals_numpy():
  rng = np.random.default_rng(1)
  img = rng.normal(size=(10, 16)).astype(np.float32)
  txt = (img + rng.normal(size=(10, 16))).astype(np.float32)
  dims, weights, scale = (4, 8, 0), (0.5, 1.0, 2.0), 6.0

  def fn(a, b):
    pair = lambda x, ts: multifield.masked_info_nce(x, ts[0], scale)
    return matryoshka.matryoshka_loss(pair, a, [b], dims, weights)

  (loss, metrics), grads = jax.value_and_grad(lambda a, b: fn(a, b), argnums=(0, 1),
                                              has_aux=True)(img, txt)

  def ref(a, b):
    return sum(c * _np_info_nce(_np_tn(a, m), _np_tn(b, m), scale) for m, c in zip(dims, weights))

  np.testing.assert_allclose(float(loss), ref(img, txt), rtol=2e-6)
  for m in dims:
    np.testing.assert_allclose(float(metrics[f"loss@d{m or 16}"]),
                               _np_info_nce(_np_tn(img, m), _np_tn(txt, m), scale), rtol=2e-6)
  h = 1e-6
  for which, x in enumerate((img, txt)):
    want = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
      e = np.zeros(x.shape)
      e[idx] = h
      args_p = [np.float64(img), np.float64(txt)]
      args_m = [np.float64(img), np.float64(txt)]
      args_p[which] = args_p[which] + e
      args_m[which] = args_m[which] - e
      want[idx] = (ref(*args_p) - ref(*args_m)) / (2 * h)
    np.testing.assert_allclose(np.asarray(grads[which]), want, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("dims, match", [
    ((8, 8), "repeats a dimension"),
    ((16, 0), "repeats a dimension"),
    ((8, -1), "-1 is not a non-negative int"),
    ((8, 32), "32 exceeds the embedding width 16"),
])
def test_bad_dims_are_named(dims, match):
  with pytest.raises(ValueError, match=match):
    matryoshka.check_dims(dims, 16)


def test_truncate_out_of_range_is_named():
  with pytest.raises(ValueError, match=r"dim=20 must be an int in \[0, 16\]"):
    matryoshka.truncate_and_normalize(np.ones((2, 16), np.float32), 20)


class _StubSystem:
  """Two linear towers: image = normalize(flat pixels @ W), text = normalize(mean of rows of T)."""
  matryoshka_dims = (4, 0)

  def embed_images(self, params, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) @ params["w"]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_texts(self, params, tokens):
    x = params["t"][tokens].mean(1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def stub_data(n=24, batch=8, seed=0, fields=()):
  """(params, dataset_fn, raw field values) of `_StubSystem` for n products in batches."""
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(12, 16)), jnp.float32),
            "t": jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)}
  images = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
  texts = rng.integers(0, 50, (n, 5), dtype=np.int32)
  raw = {f: np.asarray([["red", "navy", "", "green "][i % 4] if f == "colour" else f"v{i % 3}"
                        for i in range(n)], dtype=object) for f in fields}

  def dataset_fn(config, split, *, batch_size, fields=(), **kwargs):
    del config, split, kwargs
    for s in range(0, n, batch_size):
      k = min(batch_size, n - s)
      pad = batch_size - k
      out = {"image": np.concatenate([images[s:s + k], np.zeros((pad, 2, 2, 3), np.uint8)]),
             "text": np.concatenate([texts[s:s + k], np.zeros((pad, 5), np.int32)]),
             "valid": np.arange(batch_size) < k,
             "index": np.where(np.arange(batch_size) < k, s + np.arange(batch_size), -1)}
      for f in fields:
        out[f] = np.concatenate([raw[f][s:s + k], np.full(pad, "", object)])
      yield out
  return params, dataset_fn, dict(images=images, texts=texts, **raw)


def test_retrieval_reports_each_matryoshka_width():
  system = _StubSystem()
  params, dataset_fn, raw = stub_data()
  ev = retrieval.Evaluator(system, config=None, split="test", protocols=("full",),
                           batch_size=8, dataset_fn=dataset_fn)
  out = ev.run(params)
  img = np.asarray(system.embed_images(params, jnp.asarray(raw["images"])))
  txt = np.asarray(system.embed_texts(params, jnp.asarray(raw["texts"])))
  full = retrieval.full_candidate_metrics(txt, img)
  d4 = retrieval.full_candidate_metrics(matryoshka.truncate_and_normalize(txt, 4),
                                        matryoshka.truncate_and_normalize(img, 4))
  assert out["test/full/t2i_R@10"] == full["t2i_R@10"]
  assert out["test/full/t2i_R@10@d4"] == d4["t2i_R@10"]
  assert out["test/full/i2t_MRR@d4"] == d4["i2t_MRR"]
  assert "test/full/t2i_R@10@d16" not in out  # The full width keeps the plain names.
  with pytest.raises(ValueError, match=r"dims=\(4, 32\): 32 exceeds the embedding width 16"):
    retrieval.Evaluator(system, config=None, protocols=("full",), dims=(4, 32),
                        dataset_fn=dataset_fn).run(params)
