"""The synthetic_catalog TFDS builder: builds offline, follows the product schema, matches the
Python API, survives JPEG; the derived sets are read by the real-format builders."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fashion_jax.data import catalog
from fashion_jax.data import derived
from fashion_jax.data import render
from fashion_jax.data import schema
from fashion_jax.data.builders import synthetic_catalog
from launch import build_data


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return build_data.build("synthetic_catalog/tiny", data_dir=data_dir, num_workers=1)


def test_tiny_builds_with_the_product_schema(built):
  features = built.info.features
  assert set(features) == set(schema.TEXT_FIELDS) | {schema.IMAGES} | set(catalog.EXTRA_FIELDS)
  assert isinstance(features[schema.IMAGES], tfds.features.Sequence)
  cfg = built.builder_config
  assert {k: v.num_examples for k, v in built.info.splits.items()} == cfg.split_sizes()
  assert set(cfg.split_sizes()) == set(catalog.SPLITS)


def _decode_glyph(img, box_frac, primary):
  s = img.shape[0]
  y0, x0, y1, x1 = (int(round(float(v) * s)) for v in box_frac.split())
  c = (y1 - y0) // 5
  patch = img[y0:y1, x0:x1].astype(np.float32).reshape(5, c, 5, c, 3).mean((1, 3))
  on = np.array(render.logo_contrast(primary), np.float32)
  off = np.array(catalog.COLORS[primary], np.float32)
  return ((patch - on) ** 2).sum(-1) < ((patch - off) ** 2).sum(-1)


@pytest.mark.parametrize("split", catalog.SPLITS)
def test_examples_match_the_python_api_and_keep_the_logo(built, split):
  cfg = built.builder_config
  examples = {ex["product_id"].decode(): ex
              for ex in tfds.as_numpy(built.as_dataset(split=split))}
  expected = list(render.generate_products(split, cfg.split_sizes()[split], seed=cfg.seed,
                                            image_size=cfg.image_size))
  assert set(examples) == {p["product_id"] for p in expected}
  for p in expected:
    ex = examples[p["product_id"]]
    for k in schema.TEXT_FIELDS + catalog.EXTRA_FIELDS:
      assert ex[k].decode() == p[k], (k, p["product_id"])
    assert len(ex["images"]) == len(p["images"]) == len(p["views"].split(","))
    for got, want in zip(ex["images"], p["images"]):
      assert got.shape == want.shape == (cfg.image_size, cfg.image_size, 3)
      assert np.abs(got.astype(float) - want).mean() < 6.0  # JPEG q95 of fine textures
    cells = _decode_glyph(ex["images"][0], p["logo_box"], p["primary_color"])
    dist = (catalog.BRAND_GLYPHS != cells).reshape(len(catalog.BRANDS), -1).sum(-1)
    assert catalog.BRANDS[int(dist.argmin())] == p["brand"] and dist.min() <= 1


def test_parallel_generation_equals_serial(tmp_path):
  cfg = synthetic_catalog.SyntheticCatalogConfig(
      name="par", image_size=64, num_train=150, num_validation=2, num_test=2, num_probe=2)
  builder = synthetic_catalog.SyntheticCatalog(config=cfg, data_dir=str(tmp_path), num_workers=2)
  gens = builder._split_generators(None)
  got = list(gens["train"])
  for split in catalog.SPLITS[1:]:  # drain the rest: the last one closes the pool
    list(gens[split])
  want = synthetic_catalog._render_chunk(("train", 0, 150, 0, 64))
  assert [k for k, _ in got] == [k for k, _ in want]
  assert all(a["images"] == b["images"] and a["title"] == b["title"]
             for (_, a), (_, b) in zip(got, want))


def test_build_data_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'fashion_mnist'"):
    build_data.build("fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="--num_workers applies to synthetic_catalog only"):
    build_data.build("fashioniq/triplets", data_dir=str(tmp_path), num_workers=2)
  with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
    build_data.build("synthetic_catalog/tiny", data_dir=str(tmp_path), num_workers=0)


def test_derived_fashioniq_is_read_by_the_fashioniq_builder(tmp_path):
  derived.write_fashioniq(str(tmp_path / "fiq"), size="tiny", seed=0, image_size=64)
  b = build_data.build("fashioniq/triplets", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(tmp_path / "fiq"))
  sizes = {k: v.num_examples for k, v in b.info.splits.items()}
  n = derived.FIQ_SIZES["tiny"]
  assert sizes == {"train": 3 * n["train"], "validation": 3 * n["val"], "test": 3 * n["test"]}
  caps = json.load(open(tmp_path / "fiq/captions/cap.dress.val.json"))
  got = {(e["candidate_id"].decode(), e["target_id"].decode()): e["caption"].decode()
         for e in tfds.as_numpy(b.as_dataset(split="validation"))}
  for c in caps:
    assert got[(c["candidate"], c["target"])] == ", ".join(c["captions"])


def test_derived_polyvore_is_read_by_the_polyvore_builder(tmp_path):
  derived.write_polyvore(str(tmp_path / "pv"), size="tiny", seed=0, image_size=64)
  b = build_data.build("polyvore_outfits/nondisjoint_fitb", data_dir=str(tmp_path / "tfds"),
                       manual_dir=str(tmp_path / "pv"))
  for split, name in (("train", "train"), ("validation", "valid"), ("test", "test")):
    questions = json.load(open(tmp_path / "pv" / "nondisjoint" / f"fill_in_blank_{name}.json"))
    assert b.info.splits[split].num_examples == len(questions) > 0
    for ex in tfds.as_numpy(b.as_dataset(split=split)):
      cats = [c.decode() for c in ex["answer_categories"]]
      assert len(set(cats)) == 1 and 0 <= ex["answer_index"] < 4
