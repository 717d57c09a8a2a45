"""Training features as declared ops (data/features.py).

The pipeline composed of HostFeature ops makes, bit for bit, the batches of the two hand-ordered
closures it replaced (reproduced below as `old_host_features`); `feature_spec(config)` describes
a real batch without TensorFlow; a system whose required feature the config does not enable is
refused by config_check before anything is built or compiled, naming the key; and a new feature
is one HostFeature declaration.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import e2 as e2_configs
from configs import fashionvil as fashionvil_configs
from configs import fashionvil_downstream as downstream_configs
from fashion_jax import systems
from fashion_jax.data import attributes
from fashion_jax.data import features
from fashion_jax.data import masking
from fashion_jax.data import pipeline
from fashion_jax.data import schema
from fashion_jax.data import tokenizers
from fashion_jax.systems import base as system_base
from fashion_jax.train import config_check
from fashion_jax.train import loop
from tests import test_e2_system
from tests import test_fashionbert
from tests import test_fashionclip_system
from tests import test_fashionvil
from tests import test_pipeline as tp
from tests import test_vqvae
from tests import toy_system

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tp.PipelineTestProducts(data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Files of the three prepared keys for the test products: a pseudo-attribute vocabulary,
  VQ codes [50, 3, 16] and patch features [50, 3, 9, 5] (float16) at 24 px."""
  d = tmp_path_factory.mktemp("prepared")
  vocab = attributes.save_vocabulary(
      [("number", 50), ("cotton", 25), ("red", 10), ("navy", 10), ("shirts", 13), ("made", 25)],
      str(d / "attributes.txt"))
  ids = np.array([f"p{i:05d}" for i in range(tp.NUM_TRAIN)])
  rng = np.random.default_rng(0)
  np.savez(d / "codes.npz", product_id=ids, image_size=24,
           codes=rng.integers(0, 16, (tp.NUM_TRAIN, 3, 16)).astype(np.int32))
  np.savez(d / "patches.npz", product_id=ids, image_size=24,
           features=rng.normal(size=(tp.NUM_TRAIN, 3, 9, 5)).astype(np.float16))
  return dict(attributes=vocab, vq_codes=str(d / "codes.npz"),
              patch_features=str(d / "patches.npz"))


def all_host_features_config(data_dir, prepared):
  """Every host feature on: MLM, BEiT block masks, two tag fields, pseudo-attributes."""
  return tp.make_config(data_dir, attributes=prepared["attributes"])


def fashionbert_style_config(data_dir, prepared):
  """CLIP tokenizer without MLM, FashionBERT's 3 single-patch masks of 4 x 4, attributes."""
  return tp.make_config(data_dir, **{"tokenizer.kind": "clip", "mlm_prob": 0.0,
                                     "patch_mask": dict(grid=4, count=3, min_block=1,
                                                        max_block=1),
                                     "tag_fields": (), "views": 1,
                                     "attributes": prepared["attributes"]})


# ------------------------------------------------------------------------------------------------
# Bitwise equality with the closures features.py replaced.
# ------------------------------------------------------------------------------------------------


def old_host_features(config, step, texts, tags, process_index=0):
  """make_train_iterator's host side before data/features.py (commit 0d9eb14, pipeline.py
  `host_fn` and `finish`), with the closure's variables computed from `config` the way the old
  function did: (names, arrays) in the hand-kept order."""
  data = config.data
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  mlm_prob = float(data.mlm_prob)
  grid, count = int(data.patch_mask.grid), int(data.patch_mask.count)
  block_kwargs = dict(min_block=int(data.patch_mask.get("min_block", 4)),
                      max_block=data.patch_mask.get("max_block", None))
  tag_fields = tuple(data.get("tag_fields", ()))
  matcher = None
  if data.get("attributes"):
    matcher = attributes.Matcher(attributes.load_vocabulary(data.attributes))
  keys = (int(config.seed), process_index, step, 0x6D61736B)
  rng = np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])
  # --- host_fn, verbatim.
  ids, mask = tok(texts.tolist(), with_mask=True)
  out = [ids, mask]
  if mlm_prob > 0:
    out += list(masking.whole_word_mask(
        rng, ids, is_special=tok.is_special, is_continuation=tok.is_continuation,
        mask_id=tok.mask_token_id, prob=mlm_prob))
  if grid:
    out.append(masking.block_masks(rng, len(ids), grid, count, **block_kwargs))
  if tag_fields:
    out.append(tok(tags.reshape(-1).tolist()).reshape(len(ids), len(tag_fields), -1))
  if matcher is not None:
    out.append(matcher(texts.tolist()))
  # --- finish's names, verbatim order.
  names = ["text", "text_mask"]
  if mlm_prob > 0:
    names += ["mlm_ids", "mlm_labels"]
  if grid:
    names.append("patch_mask")
  if tag_fields:
    names.append("tags")
  if matcher is not None:
    names.append("attributes")
  return names, out


def raw_rows(data_dir, config):
  """product_key -> (joined text bytes, tag strings [T]) exactly as the pipeline's per-example
  stage hands them to the host (pipeline._join_text, the raw tag fields)."""
  builder = tfds.builder("pipeline_test_products", data_dir=data_dir)
  ds = builder.as_dataset(split="train", shuffle_files=False,
                          decoders={schema.IMAGES: tfds.decode.SkipDecoding()})
  tag_fields = tuple(config.data.get("tag_fields", ()))
  rows = {}
  for ex in ds:
    key = int(pipeline._hash32(ex["product_id"]).numpy())
    rows[key] = (pipeline._join_text(ex, config.data.text_fields).numpy(),
                 np.array([ex[f].numpy() for f in tag_fields], object))
  assert len(rows) == tp.NUM_TRAIN  # product_key identifies the product.
  return rows


@pytest.mark.parametrize("make", [all_host_features_config, fashionbert_style_config])
def test_batches_are_bitwise_those_of_the_old_closures(data_dir, prepared, make):
  config = make(data_dir, prepared)
  rows = raw_rows(data_dir, config)
  tag_fields = tuple(config.data.tag_fields)
  example_keys = {"image", "product_key", "subcategory_key"} | (
      {"image2"} if config.data.views == 2 else set())
  runs = [(0, 1, 0, 3), (0, 1, 7, 2), (1, 2, 3, 1)]  # (host, hosts, start_step, batches)
  checked = 0
  for host, hosts, start, n in runs:
    it = pipeline.make_train_iterator(config, start_step=start, process_index=host,
                                      process_count=hosts)
    for step in range(start, start + n):
      batch = next(it)
      texts = np.array([rows[int(k)][0] for k in batch["product_key"]], object)
      tags = (np.stack([rows[int(k)][1] for k in batch["product_key"]]) if tag_fields
              else np.zeros((len(texts), 0), object))
      names, want = old_host_features(config, step, texts, tags, process_index=host)
      assert set(batch) == set(names) | example_keys
      for name, value in zip(names, want):
        assert batch[name].dtype == value.dtype, name
        np.testing.assert_array_equal(batch[name], value, err_msg=f"{name} at step {step}")
      checked += 1
  assert checked == 6
  if make is all_host_features_config:
    assert names == ["text", "text_mask", "mlm_ids", "mlm_labels", "patch_mask", "tags",
                     "attributes"]


# ------------------------------------------------------------------------------------------------
# feature_spec: every key, dtype and per-example shape of a real batch, without TensorFlow.
# ------------------------------------------------------------------------------------------------


def cached_config(data_dir, prepared):
  """The three prepared files on (whole unflipped views, as the cached values require)."""
  return tp.make_config(data_dir, **{"augment.crop_scale": (1.0, 1.0), "augment.flip": False,
                                     **prepared})


def minimal_config(data_dir, prepared):
  del prepared
  return tp.make_config(data_dir, **{"tokenizer.kind": "clip", "mlm_prob": 0.0,
                                     "patch_mask.grid": 0, "tag_fields": (), "views": 1})


def assert_spec_describes(spec, batch, b):
  assert set(spec) == set(batch)
  for name, s in spec.items():
    assert batch[name].dtype == s.dtype, (name, batch[name].dtype, s.dtype)
    want = (b,) + tuple(s.shape)
    got = batch[name].shape
    assert len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got)), (
        name, got, want)


@pytest.mark.parametrize("make", [all_host_features_config, fashionbert_style_config,
                                  cached_config, minimal_config])
def test_feature_spec_describes_real_batches(data_dir, prepared, make):
  config = make(data_dir, prepared)
  spec = features.feature_spec(config)
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  assert_spec_describes(spec, batch, config.batch_size)
  # Only sizes that live in a prepared file are left open.
  open_dims = {n for n, s in spec.items() if None in s.shape}
  assert open_dims == {"attributes", "vq_codes", "patch_features"} & set(spec)
  assert spec["image"] == features.Spec(np.dtype(np.uint8), (24, 24, 3))
  assert spec["text"] == features.Spec(np.dtype(np.int32), (16,))


def test_feature_spec_needs_no_tensorflow():
  code = (
      "import sys\n"
      "from configs import fashionvil\n"
      "from fashion_jax.data import features\n"
      "c = fashionvil.get_config('smoke')\n"
      "c.data.vq_codes, c.data.attributes = '/nowhere/codes.npz', '/nowhere/a.txt'\n"
      "spec = features.feature_spec(c)\n"
      "assert 'tensorflow' not in sys.modules, 'feature_spec imported TensorFlow'\n"
      "print(' '.join(sorted(spec)))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == sorted(
      ["image", "image2", "text", "text_mask", "product_key", "subcategory_key", "mlm_ids",
       "mlm_labels", "patch_mask", "attributes", "vq_codes"])


# ------------------------------------------------------------------------------------------------
# Systems declare the features they read; config_check compares them with feature_spec.
# ------------------------------------------------------------------------------------------------


def fashionvil_config(tmp_path, **tasks):
  c = fashionvil_configs.get_config("smoke")
  c.data.attributes = attributes.save_vocabulary([("red", 3), ("blue", 2)],
                                                 str(tmp_path / "attrs.txt"))
  c.data.vq_codes = str(tmp_path / "codes.npz")  # Only its presence matters to the check.
  if tasks:
    c.objective.tasks = tasks
  return c


@pytest.mark.parametrize("system,change,feature,key,why", [
    ("fashionvil", dict(vq_codes=""), "vq_codes", "config.data.vq_codes", "MPFC"),
    ("fashionvil", dict(attributes=""), "attributes", "config.data.attributes", "PAC"),
    ("fashionvil", dict(views=1), "image2", "config.data.views=2", "MVC"),
    ("fashionvil", dict(mlm_prob=0.0), "mlm_ids", "config.data.mlm_prob", "MLM"),
    ("fashionvil", dict(patch_mask=dict(grid=0, count=0)), "patch_mask",
     "config.data.patch_mask.grid", "MPFC"),
    ("e2", dict(tag_fields=()), "tags", "config.data.tag_fields", "regional"),
])
def test_config_check_names_the_key_of_a_missing_feature(tmp_path, system, change, feature, key,
                                                         why):
  c = fashionvil_config(tmp_path) if system == "fashionvil" else e2_configs.get_config("smoke")
  config_check.check_train_features(c)  # The stock config has what the system reads.
  c.data.update(change)
  with pytest.raises(config_check.ConfigError) as e:
    config_check.check_train_features(c)
  message = str(e.value)
  assert f"'{feature}'" in message and key in message and why in message, message
  if feature in ("vq_codes", "attributes"):
    assert "python -m launch.prepare" in message


def test_a_missing_feature_stops_training_before_the_system_is_built(tmp_path, monkeypatch):
  c = fashionvil_config(tmp_path)
  c.data.vq_codes = ""
  c.evals, c.checkpoint.best_metric = {}, None

  def built(config):
    raise AssertionError("the system was built before the feature check")
  monkeypatch.setattr(systems, "get_system", built)
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError, match=r"'vq_codes'.*config\.data\.vq_codes"):
    loop.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()  # Refused before the workdir, the system or any compile.
  # Switching MPFC off is the other way out: nothing else is missing.
  c.objective.tasks.mpfc = 0.0
  config_check.check_train_features(c)


def test_other_inputs_and_systems_without_a_declaration_are_not_checked(tmp_path):
  c = fashionvil_config(tmp_path)
  c.data.vq_codes = ""
  c.input = "fashion_jax.data.downstream"  # An input without feature_spec: its own business.
  config_check.check_train_features(c)
  toy = config_check.with_defaults(toy_system.get_config())
  config_check.check_train_features(toy)


def _configs(tmp_path):
  """(name, config) of each system in several task settings, small enough to build quickly."""
  fb_off = test_fashionbert._config()
  fb_off.data.mlm_prob, fb_off.data.patch_mask.grid = 0.0, 0
  tgir = downstream_configs.get_config("tgir_smoke")
  retrieval = downstream_configs.get_config("tgir_smoke")
  retrieval.objective.task = "retrieval"
  return [
      ("fashionclip", test_fashionclip_system.tiny_config()),
      ("e2 regional", test_e2_system._config()),
      ("e2 clip", test_e2_system._config("smoke,ablation=clip")),
      ("fashionbert all", test_fashionbert._config()),
      ("fashionbert tia", fb_off),
      ("fashionvil all", test_fashionvil.tiny_config(tmp_path)),
      ("fashionvil itc+mlm", test_fashionvil.tiny_config(tmp_path, itc=1.0, mlm=1.0)),
      ("fashionvil itm+mvc", test_fashionvil.tiny_config(tmp_path, itm=1.0, mvc=1.0)),
      ("vqvae", test_vqvae.system_config()),
      ("downstream tgir", tgir),
      ("downstream retrieval", retrieval),
  ]


def test_required_features_are_the_keys_of_the_dummy_batch(tmp_path):
  """dummy_batch is what the compiled step reads; the declaration must name exactly those."""
  for name, config in _configs(tmp_path):
    system = systems.get_system(config)
    need = system_base.required_features(type(system), config)
    assert need is not None, name
    assert set(need) == set(system.dummy_batch(2)), name


# ------------------------------------------------------------------------------------------------
# A new feature is one declaration.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def registered():
  names = []
  yield lambda op: names.append(features.register(op)) or names[-1]
  for name in names:
    features.unregister(name)


def test_a_new_host_feature_is_one_declaration(data_dir, registered):
  config = tp.make_config(data_dir)
  before = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))

  def lengths_and_noise(ctx):
    ids, mask = ctx.tokens()
    noise = ctx.rng.random(len(ids))  # Draws after every built-in op: they are unchanged.
    return np.stack([mask.sum(1), noise], axis=1).astype(np.float32)
  registered(features.HostFeature("lengths_and_noise", np.float32, (None, 2), lengths_and_noise))

  spec = features.feature_spec(config)
  assert spec["lengths_and_noise"] == features.Spec(np.dtype(np.float32), (2,))
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  batch = next(it)
  assert_spec_describes(spec, batch, config.batch_size)
  got = batch.pop("lengths_and_noise")
  assert got.shape == (config.batch_size, 2) and got.dtype == np.float32
  np.testing.assert_array_equal(got[:, 0], before["text_mask"].sum(1))
  assert ((got[:, 1] >= 0) & (got[:, 1] < 1)).all() and len(set(got[:, 1])) == len(got)
  tp.assert_batches_equal(batch, before)


def test_a_host_feature_that_breaks_its_declaration_is_named(data_dir, registered):
  config = tp.make_config(data_dir)
  registered(features.HostFeature("row_sums", np.int32, lambda b: (b,),
                                  lambda ctx: ctx.tokens()[0].sum(1).astype(np.float64)))
  with pytest.raises((tf.errors.OpError, ValueError), match="row_sums.*float64.*int32"):
    next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  with pytest.raises(ValueError, match="already registered"):
    features.register(features.HostFeature("text", np.int32, (None, 4), lambda ctx: None))
