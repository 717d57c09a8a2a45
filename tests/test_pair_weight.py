"""GCL per-pair weights in the two-tower system: config, loss, and a catalog's score column.

- the system's loss with `data.pair_weight_field` equals the composed float64 numpy formula
  (score -> weight map, weighted positive terms in the text and every field term, each
  Matryoshka width), InfoNCE and sigmoid; weights all 1 equal the unweighted loss;
- bad settings are refused naming the key;
- an image_text_folder catalog's `score` column reaches the batch as `pair_weight`, and a
  missing column is an error naming config.data.pair_weight_field and the column.
"""

import copy
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fashion_jax import configs
from fashion_jax.data import pipeline
from fashion_jax.data.builders import image_text_folder as itf
from fashion_jax.systems import fashionclip
from tests import fixtures_real as F
from tests import test_fashionsiglip as tfs
from tests.test_multifield import np_multi_field_loss

SCORE_RANGE, WEIGHT_RANGE = (0.0, 4.0), (0.25, 1.5)


def _weighted_config(kind):
  config = tfs._sigmoid_config("dense")  # pylint: disable=protected-access
  config.loss.kind = kind
  config.data.pair_weight_field = "score"
  config.loss.pair_weight = dict(score_range=SCORE_RANGE, weight_range=WEIGHT_RANGE)
  return config


def _np_score_to_weight(s):
  u = np.clip((np.float64(s) - SCORE_RANGE[0]) / (SCORE_RANGE[1] - SCORE_RANGE[0]), 0.0, 1.0)
  return WEIGHT_RANGE[0] + (WEIGHT_RANGE[1] - WEIGHT_RANGE[0]) * u


# Both slow (default run time, ~15-30 s each): the weighted losses are checked against float64
# numpy in test_sigmoid_loss.py and test_multifield.py by default.
@pytest.mark.parametrize("kind", [pytest.param("infonce", marks=pytest.mark.slow),
                                  pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_system_loss_with_pair_weights_is_the_composed_formula(kind):
  config = _weighted_config(kind)
  system = fashionclip.System(config)
  assert fashionclip.System.required_features(config)[-1] == "pair_weight"
  assert "pair_weight" in system.dummy_batch(2)
  batch = tfs._field_batch_fn(config)(0)  # pylint: disable=protected-access
  scores = np.random.default_rng(1).uniform(-1.0, 5.0, config.batch_size).astype(np.float32)
  batch = jax.tree.map(jnp.asarray, dict(batch, pair_weight=scores))
  params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))
  loss_fn = jax.jit(lambda p, b: system.loss(p, b, None)[0])
  loss = loss_fn(params, batch)
  img = np.asarray(system.embed_images(params, batch["image"]), np.float64)
  txt = np.asarray(system.embed_texts(params, batch["text"]), np.float64)
  ft = batch["field_text"]
  fields = [np.asarray(system.embed_texts(params, ft[:, k]), np.float64)
            for k in range(ft.shape[1])]
  masks = [np.ones(len(img), bool)] + [np.asarray(batch["field_mask"][:, k])
                                       for k in range(ft.shape[1])]
  weights = (1.0,) + tuple(config.loss.field_weights)
  scale = float(system.logit_scale(params))
  lt, bias = float(np.log(scale)), float(params.get("logit_bias", 0.0))
  v = _np_score_to_weight(scores)

  def tn(x, m):
    x = x[:, :m or x.shape[1]]
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  def composed(pair_weight):
    return sum(c * np_multi_field_loss(kind, tn(img, m), [tn(t, m) for t in [txt] + fields],
                                       masks, weights, scale=scale, lt=lt, bias=bias,
                                       pair_weight=pair_weight)
               for m, c in zip(config.model.matryoshka_dims, config.loss.matryoshka_weights))
  np.testing.assert_allclose(float(loss), composed(v), rtol=2e-5)
  assert not np.isclose(float(loss), composed(None), rtol=1e-3)  # The weights matter.

  # Scores that map to weight 1 everywhere: the unweighted system's loss.
  ones = dict(batch, pair_weight=jnp.full((config.batch_size,), 100.0))  # Clipped to w_hi.
  config_one = copy.deepcopy(config)
  config_one.loss.pair_weight = dict(score_range=SCORE_RANGE, weight_range=(1.0, 1.0))
  plain_config = copy.deepcopy(config)
  plain_config.data.pair_weight_field = ""
  del plain_config.loss["pair_weight"]
  plain = fashionclip.System(plain_config)
  one = fashionclip.System(config_one)
  got = jax.jit(lambda p, b: one.loss(p, b, None)[0])(params, ones)
  want = jax.jit(lambda p, b: plain.loss(p, b, None)[0])(params, batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.loss.update(pair_weight=dict(score_range=(1.0, 0.0))),
     r"config.loss.pair_weight.score_range=\(1.0, 0.0\): lo must be < hi"),
    (lambda c: c.loss.update(pair_weight=dict(weight_range=(-1.0, 1.0))),
     r"config.loss.pair_weight.weight_range=\(-1.0, 1.0\)"),
    (lambda c: c.loss.update(pair_weight=dict(scores=(0.0, 1.0))),
     r"config.loss.pair_weight.scores"),
    (lambda c: c.loss.update(pair_weight=dict(score_range=(0.0, float("inf")))),
     r"config.loss.pair_weight.score_range=\(0.0, inf\) must be two finite numbers"),
])
def test_bad_pair_weight_settings_are_named(change, match):
  config = _weighted_config("sigmoid")
  change(config)
  with pytest.raises(ValueError, match=match):
    fashionclip.objective(config)


def _catalog(root, with_score=True):
  lines = ["sku,image,title,description,brand" + (",score" if with_score else "")]
  for i in range(12):
    F.write_jpeg(os.path.join(root, "img", f"p{i}.jpg"), i)
    lines.append(f"sku{i},img/p{i}.jpg,Shirt {i},Linen shirt {i},Acme"
                 + (f",{0.25 * i:g}" if with_score else ""))
  with open(os.path.join(root, "catalog.csv"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def _shop_config(data_dir):
  config = _weighted_config("sigmoid")
  config.data.update(name="image_text_folder/scored", data_dir=data_dir, train_split="train",
                     fields=("brand",), shuffle_buffer=1, prefetch=1)
  config.batch_size = 4
  return config


def test_a_catalog_score_column_is_the_pair_weight_feature(tmp_path):
  manual = tmp_path / "shop"
  _catalog(str(manual))
  data_dir = os.fspath(tmp_path / "data")
  builder = tfds.builder("image_text_folder/scored", data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
  assert itf.feature_name("score") in builder.info.features  # Any other column is a tag.
  config = _shop_config(data_dir)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  seen = {}
  for _ in range(3):
    b = next(it)
    assert b["pair_weight"].dtype == np.float32 and b["pair_weight"].shape == (4,)
    seen.update(zip(b["product_key"].tolist(), b["pair_weight"].tolist()))
  # Every score read is one of the catalog's, parsed exactly (quarters are exact in float32).
  assert set(seen.values()) <= {0.25 * i for i in range(12)} and len(seen) >= 2
  missing = copy.deepcopy(config)
  missing.data.pair_weight_field = "relevance"
  with pytest.raises(configs.ConfigError,
                     match=r"config.data.pair_weight_field: field 'relevance' is not "
                           r"in the dataset"):
    next(pipeline.make_train_iterator(missing, process_index=0, process_count=1))
