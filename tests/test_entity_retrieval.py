"""Per-entity retrieval (evaluate/entity_retrieval.py) vs an independent float64 numpy reference."""

import itertools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import pytest

from fashion_jax.data import tokenizers
from fashion_jax.evaluate import entity_retrieval


# ------------------------------------------------------------------------------------------------
# Reference: sort every query's whole candidate list in float64 and read the metrics off it.
# ------------------------------------------------------------------------------------------------
def _sorted_relevance(scores, relevant):
  """Relevance in ranked order: score descending, on ties NEGATIVES first (pessimistic)."""
  order = np.lexsort((relevant.astype(int), -scores))
  return relevant[order]


def reference(value_emb, image_emb, labels, ks=(1, 5)):
  t = np.asarray(value_emb, np.float64)
  g = np.asarray(image_emb, np.float64)
  s = t @ g.T  # [V, N]
  aps, hits1, rr = [], [], []
  for v in range(t.shape[0]):
    rel = _sorted_relevance(s[v], labels == v)
    pos = np.flatnonzero(rel) + 1  # ranks of the positives
    aps.append(np.mean(np.arange(1, len(pos) + 1) / pos))
    hits1.append(float(pos[0] == 1))
    rr.append(1.0 / pos[0])
  ranks = []
  for i in range(g.shape[0]):
    rel = _sorted_relevance(s[:, i], np.arange(t.shape[0]) == labels[i])
    ranks.append(int(np.flatnonzero(rel)[0]) + 1)
  ranks = np.asarray(ranks)
  out = {"t2i_mAP": np.mean(aps), "t2i_mAP_se": np.std(aps, ddof=1) / np.sqrt(len(aps)),
         "t2i_HITS@1": np.mean(hits1), "t2i_MRR": np.mean(rr), "i2t_MRR": np.mean(1 / ranks)}
  for k in ks:
    out[f"i2t_R@{k}"] = np.mean(ranks <= k)
  p = np.mean(ranks == 1)
  out["i2t_R@1_se"] = np.sqrt(p * (1 - p) / len(ranks))
  return out


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("chunk", [1024, 7])
def test_entity_metrics_match_float64_reference_with_exact_ties(chunk):
  rng = np.random.default_rng(0)
  v, n, d = 6, 70, 8
  labels = np.concatenate([np.arange(v), rng.integers(0, v, n - v)])
  centres = _unit(rng.standard_normal((v, d)))
  images = _unit(centres[labels] + 0.9 * rng.standard_normal((n, d)))
  images[10] = images[3]  # An exact tie between items of different values (3 and 10).
  labels[10] = (labels[3] + 1) % v
  values = _unit(centres + 0.3 * rng.standard_normal((v, d)))
  m = entity_retrieval.entity_metrics(values.astype(np.float32), images.astype(np.float32),
                                      labels, chunk=chunk)
  ref = reference(values.astype(np.float32), images.astype(np.float32), labels)
  assert set(m) == set(ref)
  for k in ref:
    assert m[k] == pytest.approx(ref[k], abs=1e-9), k
  # The planted structure is found: far above chance, short of perfect.
  chance = entity_retrieval.chance_average_precision(np.bincount(labels), n).mean()
  assert chance + 0.1 < m["t2i_mAP"] < 1.0


def test_average_precision_of_known_rankings():
  # Positives at ranks 1, 3: AP = (1/1 + 2/3) / 2; at rank 4 only: 1/4; padding ignored.
  ap = entity_retrieval.average_precision(np.array([[3, 1], [4, -1]]))
  np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0.25])
  with pytest.raises(ValueError, match="query 1 has no positive"):
    entity_retrieval.average_precision(np.array([[1], [-1]]))


@pytest.mark.parametrize("n,p", [(5, 1), (6, 2), (6, 3), (7, 7)])
def test_chance_average_precision_equals_enumeration(n, p):
  aps = []
  for perm in itertools.permutations(range(n)):
    ranks = np.sort(np.asarray(perm[:p]) + 1)  # positions of the p positives
    aps.append(np.mean(np.arange(1, p + 1) / ranks))
  assert entity_retrieval.chance_average_precision(p, n) == pytest.approx(np.mean(aps), 1e-12)
  with pytest.raises(ValueError, match="need 1 <= P <= N"):
    entity_retrieval.chance_average_precision(n + 1, n)


# ------------------------------------------------------------------------------------------------
# The evaluator on a stub E2-like system and an injected dataset.
# ------------------------------------------------------------------------------------------------
class StubE2:
  """Image -> 3 views (global, brand head, season head) from pixel projections; text -> mean
  of token vectors. `entities` = ('brand', 'season')."""
  entities = ("brand", "season")

  def embed_image_views(self, params, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0 @ params["proj"]
    x = x.reshape(x.shape[0], 3, -1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_images(self, params, images):
    return self.embed_image_views(params, images)[:, 0]

  def embed_texts(self, params, tokens):
    x = params["table"][tokens].mean(1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class StubCLIP:
  """The same global tower, no entity heads (like CLIP-FT)."""

  def __init__(self):
    self._e2 = StubE2()
    self.embed_texts = self._e2.embed_texts

  def embed_images(self, params, images):
    return self._e2.embed_images(params, images)


def _dataset_fn(data):
  def fn(config, split, *, batch_size, fields=()):
    del config
    assert split == "test"
    n = len(data["index"])
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, batch_size):
      rows = order[start:start + batch_size]
      rows_p = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
      batch = {k: data[k][rows_p] for k in ("image", "index") + tuple(fields)}
      batch["valid"] = np.arange(batch_size) < len(rows)
      yield batch
  return fn


def _fixture(n=90):
  rng = np.random.default_rng(3)
  brands = np.array(["acme", "zenith studio", "north", "", "lumen"], dtype=object)
  seasons = np.array(["SS2016", "FW2017", ""], dtype=object)
  data = {"image": rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
          "index": np.arange(n, dtype=np.int32),
          "brand": brands[np.arange(n) % 5], "season": seasons[rng.integers(0, 3, n)]}
  params = {"proj": jnp.asarray(rng.standard_normal((48, 24)), jnp.float32),
            "table": jnp.asarray(rng.standard_normal((50000, 8)), jnp.float32)}
  config = ml_collections.ConfigDict(dict(data=dict(tokenizer=dict(kind="clip", path=""),
                                                    max_len=12)))
  return data, params, config


def _expected(system, params, config, data, field, view):
  """Reference path: tokenise the distinct known values, embed, score in float64."""
  known = data[field] != ""
  values, labels = np.unique(data[field][known].astype(str), return_inverse=True)
  tok = tokenizers.get_tokenizer("clip", "", 12)
  value_emb = np.asarray(system.embed_texts(params, jnp.asarray(tok(values.tolist()))))
  views = np.asarray(StubE2().embed_image_views(params, jnp.asarray(data["image"])))
  return reference(value_emb, views[known, view], labels), len(values), labels


def test_evaluator_heads_global_unknowns_and_names():
  data, params, config = _fixture()
  ev = entity_retrieval.Evaluator(StubE2(), config, split="test",
                                  fields=("brand", "season"), batch_size=16, chunk=8,
                                  dataset_fn=_dataset_fn(data))
  m = ev.run(params)
  for field, head in (("brand", 1), ("season", 2)):
    for kind, view in (("global", 0), ("head", head)):
      ref, num_values, labels = _expected(StubE2(), params, config, data, field, view)
      for k, v in ref.items():
        assert m[f"test/entity_{field}/{kind}_{k}"] == pytest.approx(v, abs=1e-6), (field, k)
    assert m[f"test/entity_{field}/num_values"] == num_values
    assert m[f"test/entity_{field}/num_items"] == len(labels)  # '' rows left out
    assert m[f"test/entity_{field}/chance_i2t_R@1"] == pytest.approx(1 / num_values)
  assert m["test/entity_brand/num_values"] == 4 and m["test/entity_brand/num_items"] == 72

  # A system without entity heads reports the global numbers only, identical to the above.
  m_clip = entity_retrieval.Evaluator(StubCLIP(), config, split="test", fields=("brand",),
                                      batch_size=16, dataset_fn=_dataset_fn(data)).run(params)
  assert not any("head_" in k for k in m_clip)
  assert m_clip["test/entity_brand/global_t2i_mAP"] == pytest.approx(
      m["test/entity_brand/global_t2i_mAP"], abs=1e-7)


def test_evaluator_on_mesh_equals_one_device_and_errors():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  data, params, config = _fixture(64)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  kw = dict(split="test", fields=("brand",), batch_size=16, chunk=8,
            dataset_fn=_dataset_fn(data))
  m1 = entity_retrieval.Evaluator(StubE2(), config, None, **kw).run(params)
  with jax.set_mesh(mesh):
    m8 = entity_retrieval.Evaluator(StubE2(), config, mesh, **kw).run(params)
  assert m1 == pytest.approx(m8, abs=1e-6)
  data["brand"][:] = ""
  with pytest.raises(ValueError, match="no item with a known 'brand'"):
    entity_retrieval.Evaluator(StubE2(), config, None, **kw).run(params)
  with pytest.raises(ValueError, match="must be a non-empty sequence"):
    entity_retrieval.Evaluator(StubE2(), config, fields="brand")
