"""Cross-encoder evaluation (evaluate/cross_encoder.py): AUC, re-ranking, sharded pair scoring,
and the Evaluator's sample-100 metrics against a brute-force numpy evaluation."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import pytest
import sklearn.metrics

from fashion_jax.evaluate import cross_encoder
from fashion_jax.evaluate import retrieval


class _StubTokenizer:
  pad_token_id = 0


class _StubSystem:
  """A cross-encoder whose score is a known function of (text id, image id).

  Item i's text holds i + 1 at position 1, its image holds i in pixel (0, 0); features are
  [B, 1, 2] = (image id, 1). score = -|t - f| * w + bonus(f) with a param w, so the positive is
  usually but not always first (bonus favours images with id % 7 == 0).
  """
  tokenizer = _StubTokenizer()

  def patch_features(self, params, images):
    f = images[:, 0, 0, 0].astype(jnp.float32) + 256.0 * images[:, 0, 0, 1].astype(jnp.float32)
    return jnp.stack([f, jnp.ones_like(f)], -1)[:, None, :]

  def score_pairs(self, params, ids, text_mask, features):
    t = (ids[:, 1] - 1).astype(jnp.float32)
    f = features[:, 0, 0]
    # Padding of the mask is honoured: text_mask[:, 1] is True for real rows.
    assert text_mask.shape == ids.shape
    return -jnp.abs(t - f) * params["w"] + 2.5 * (jnp.mod(f, 7) == 0)


def _numpy_score(w, t, f):
  return -np.abs(t - f) * w + 2.5 * (np.mod(f, 7) == 0)


def _dataset(n, batch_size, groups, cats):
  def fn(config, split, *, batch_size=batch_size, fields=(), **kwargs):
    del config, split, kwargs
    out = []
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      valid = idx < n
      image = np.zeros((batch_size, 2, 2, 3), np.uint8)
      image[:, 0, 0, 0] = idx % 256
      image[:, 0, 0, 1] = idx // 256
      text = np.zeros((batch_size, 4), np.int32)
      text[:, 0] = 101
      text[:, 1] = idx + 1
      b = dict(image=image, text=text, text_mask=text > 0, valid=valid,
               index=np.where(valid, idx, -1).astype(np.int32))
      for f, vals in (("subcategory", groups), ("category", cats)):
        if f in fields:
          b[f] = np.asarray([vals[i] if i < n else "" for i in idx], dtype=object)
      out.append(b)
    return out
  return fn


def test_roc_auc_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=500), 1)        # many ties
  labels = rng.random(500) < 0.3
  np.testing.assert_allclose(cross_encoder.roc_auc(scores, labels),
                             sklearn.metrics.roc_auc_score(labels, scores), rtol=1e-12)
  with pytest.raises(ValueError, match="needs positives and negatives"):
    cross_encoder.roc_auc(scores, np.zeros(500, bool))


def test_rerank_ranks_brute_force():
  rng = np.random.default_rng(1)
  q, n, k = 50, 30, 5
  tt = rng.normal(size=(q, n))
  xenc = rng.normal(size=(q, n))
  positive = rng.integers(0, n, q)
  tt_rank = 1 + (tt >= tt[np.arange(q), positive][:, None]).sum(1) - 1
  top = np.argsort(-tt, axis=1)[:, :k]
  got = cross_encoder.rerank_ranks(tt_rank, top, np.take_along_axis(xenc, top, 1), positive)
  for i in range(q):
    if positive[i] in top[i]:
      s = xenc[i, top[i]]
      want = 1 + (s >= xenc[i, positive[i]]).sum() - 1
      assert got[i] == want and got[i] <= k
    else:
      assert got[i] == tt_rank[i] > k


@pytest.mark.parametrize("num_devices", [1, 8])
def test_pair_scorer_sharded_equals_direct(num_devices):
  mesh = Mesh(np.array(jax.devices()[:num_devices]).reshape(num_devices, 1, 1),
              ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  system = _StubSystem()
  scorer = cross_encoder.PairScorer(system, mesh, pair_batch=12)
  assert scorer.pair_batch % num_devices == 0
  n = 40
  tokens = np.zeros((n, 4), np.int32)
  tokens[:, 1] = np.arange(n) + 1
  feats = np.stack([np.arange(n, dtype=np.float32), np.ones(n, np.float32)], -1)[:, None]
  rng = np.random.default_rng(2)
  ti, ii = rng.integers(0, n, 101), rng.integers(0, n, 101)   # not a multiple of the batch
  params = {"w": jnp.float32(0.7)}
  scores, seconds = scorer.score(params, scorer.tables(tokens, feats), ti, ii)
  np.testing.assert_allclose(scores, _numpy_score(0.7, ti.astype(np.float64), ii), rtol=1e-6)
  assert scores.shape == (101,) and seconds > 0


def test_evaluator_sample100_matches_brute_force():
  n = 230
  rng = np.random.default_rng(3)
  groups = [f"g{i}" for i in rng.integers(0, 2, n)]
  cats = ["c"] * n
  config = ml_collections.ConfigDict({"data": {"data_dir": "", "name": "stub"}})
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ev = cross_encoder.Evaluator(_StubSystem(), config, mesh, split="test", num_queries=40,
                               num_negatives=100, pair_batch=256, batch_size=32,
                               dataset_fn=_dataset(n, 32, groups, cats))
  params = {"w": jnp.float32(0.037)}  # |d * w - 2.5| >= 0.016: no float32 near-ties.
  out = ev.run(params)
  cands, stats = retrieval.sample_candidates(groups, cats, num_queries=40, num_negatives=100,
                                             rng=np.random.default_rng([0, 0]))
  q = cands[:, :1].astype(np.float64)
  s_t2i = _numpy_score(0.037, q, cands.astype(np.float64))
  s_i2t = _numpy_score(0.037, cands.astype(np.float64), q)
  r_t2i = 1 + (s_t2i[:, 1:] >= s_t2i[:, :1]).sum(1)
  r_i2t = 1 + (s_i2t[:, 1:] >= s_i2t[:, :1]).sum(1)
  for k in (1, 5, 10):
    np.testing.assert_allclose(out[f"test/sample100/t2i_R@{k}"], np.mean(r_t2i <= k))
    np.testing.assert_allclose(out[f"test/sample100/i2t_R@{k}"], np.mean(r_i2t <= k))
  # The stub is neither perfect nor chance: the test would catch swapped directions/indices.
  assert 0.0 < out["test/sample100/t2i_R@1"] < out["test/sample100/t2i_R@10"] < 1.0
  assert out["test/sample100/t2i_R@1"] != out["test/sample100/i2t_R@1"]
  labels = np.zeros_like(s_t2i, bool)
  labels[:, 0] = True
  np.testing.assert_allclose(out["test/sample100/align_auc"], sklearn.metrics.roc_auc_score(
      np.concatenate([labels, labels]).ravel(), np.concatenate([s_t2i, s_i2t]).ravel()),
                             rtol=1e-6)
  np.testing.assert_allclose(out["test/sample100/align_acc"], np.mean(np.concatenate(
      [s_t2i[:, 0] > 0, s_t2i[:, 1] <= 0])))
  assert out["test/sample100/num_items"] == n and out["test/sample100/num_queries"] == 40
  np.testing.assert_allclose(out["test/sample100/fill_fallback_frac"],
                             stats["fill_fallback_frac"])
  assert out["test/sample100/pairs_per_s"] > 0


class _StubTwoTower:
  """Two-tower stand-in: text i and image i embed near each other, with noise."""

  def __init__(self, n, config):
    rng = np.random.default_rng(4)
    self.base = rng.normal(size=(n, 8)).astype(np.float32)
    self.noise = rng.normal(size=(n, 8)).astype(np.float32) * 0.9
    self.config = config

  def embed_images(self, params, images):
    idx = images[:, 0, 0, 0].astype(jnp.int32) + 256 * images[:, 0, 0, 1].astype(jnp.int32)
    return jnp.asarray(self.base)[idx]

  def embed_texts(self, params, tokens):
    idx = tokens[:, 1] - 1
    return jnp.asarray(self.base)[idx] + jnp.asarray(self.noise)[idx]


def test_rerank_with_a_two_tower(monkeypatch):
  n = 64
  config = ml_collections.ConfigDict({"data": {"data_dir": "", "name": "stub"}})
  two_tower = _StubTwoTower(n, config)
  monkeypatch.setattr(cross_encoder, "load_two_tower", lambda *a, **k: (two_tower, {}))
  ds = _dataset(n, 16, ["g"] * n, ["c"] * n)
  ev = cross_encoder.Evaluator(_StubSystem(), config, None, split="test", num_queries=10,
                               num_negatives=20, pair_batch=64, batch_size=16, dataset_fn=ds,
                               rerank=dict(config="unused", workdir="unused", k=5))
  out = ev.run({"w": jnp.float32(1.0)})
  t = two_tower.base + two_tower.noise
  full = retrieval.full_candidate_metrics(t, two_tower.base)
  np.testing.assert_allclose(out["test/full/t2i_R@1"], full["t2i_R@1"])
  # Expected re-ranked ranks by brute force over the stub's scores of the two-tower top-5.
  sims = t @ two_tower.base.T
  top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
  pos = np.arange(n)
  s = _numpy_score(1.0, pos[:, None].astype(np.float64), top.astype(np.float64))
  inside = (top == pos[:, None]).any(1)
  ps = np.where(top == pos[:, None], s, np.inf).min(1)
  rank = np.where(inside, 1 + ((s >= ps[:, None]) & (top != pos[:, None])).sum(1), 99)
  np.testing.assert_allclose(out["test/full_rerank5/t2i_R@1"], np.mean(rank <= 1))
  np.testing.assert_allclose(out["test/full_rerank5/t2i_R@5"], out["test/full/t2i_R@5"])


def test_bad_rerank_spec():
  with pytest.raises(ValueError, match="needs 'config' and 'workdir'"):
    cross_encoder.Evaluator(_StubSystem(), ml_collections.ConfigDict(), None,
                            rerank=dict(config="x"))
