"""FashionViL's data: pseudo-attribute mining and matching, cached VQ codes in the pipeline."""

import jax
import flax.linen as nn
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fashion_jax.data import attributes
from fashion_jax.data import pipeline
from fashion_jax.prepare import vq_codes
from fashion_jax.systems import vqvae as vqvae_system
from tests import test_pipeline as tp
from tests import test_vqvae as tv


def test_mining_filters_by_frequency_and_stop_words_and_merges_subsumed_ngrams():
  texts = (["Red silk scarf with a logo"] * 6 + ["blue silk scarf"] * 2 + ["the red boots"] * 3
           + ["a plain tee"] * 2)
  vocab = dict(attributes.mine(texts, max_n=3, min_df=3, max_df_frac=0.7))
  # "red" (df 9 of 13) and "silk scarf" (8) pass; "silk" and "scarf" only ever occur inside
  # "silk scarf" with the same df, so they merge into it.
  assert vocab["red"] == 9 and vocab["silk scarf"] == 8
  assert "silk" not in vocab and "scarf" not in vocab
  assert "logo" in vocab and "red silk scarf" in vocab      # df 6 >= 3.
  assert "tee" not in vocab and "blue" not in vocab          # df 2 < min_df.
  assert not any(g.split()[0] in attributes.STOP_WORDS or g.split()[-1] in attributes.STOP_WORDS
                 for g in vocab)                              # "a logo", "with a" are gone.
  # "red silk" (6) only occurs inside "red silk scarf" (6), "boots" (3) inside "red boots" (3).
  assert "red silk" not in vocab and "boots" not in vocab and vocab["red boots"] == 3
  assert vocab == {"red": 9, "silk scarf": 8, "logo": 6, "red silk scarf": 6, "red boots": 3}
  # Deterministic order: by df descending, then alphabetically.
  ranked = attributes.mine(texts, max_n=3, min_df=3, max_df_frac=0.7)
  assert [c for _, c in ranked] == sorted([c for _, c in ranked], reverse=True)
  assert ranked == attributes.mine(list(reversed(texts)), max_n=3, min_df=3, max_df_frac=0.7)
  with pytest.raises(ValueError, match="min_df=0"):
    attributes.mine(texts, min_df=0)


def test_matcher_marks_contained_ngrams(tmp_path):
  path = attributes.save_vocabulary([("red", 5), ("silk scarf", 4), ("boots", 3)],
                                    str(tmp_path / "v.txt"))
  m = attributes.Matcher(attributes.load_vocabulary(path))
  got = m(["Red silk-scarf. SILK SCARF in red!", b"boots", "scarf silk", ""])
  np.testing.assert_array_equal(got, [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
  with pytest.raises(FileNotFoundError, match="python -m launch.prepare"):
    attributes.load_vocabulary(str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tp.PipelineTestProducts(data_dir=path).download_and_prepare()
  return path


def test_cached_codes_and_attributes_arrive_in_train_batches(data_dir, tmp_path):
  # A random VQ tokenizer at 16 px with a 4 x 4 code grid; codes of every view, then batches.
  c = tv.system_config(image_size=16)
  c.data.name, c.data.data_dir = "pipeline_test_products", data_dir
  system = vqvae_system.System(c)
  params = nn.unbox(system.init(jax.random.key(0), system.dummy_batch(2)))
  out = vq_codes.cache_codes(system, params, c, str(tmp_path / "codes.npz"), batch_size=8)
  assert out["codes"].shape == (tp.NUM_TRAIN, 3, 16)
  number = [int(p[1:]) for p in out["product_id"]]  # Rows follow the file order.
  assert sorted(number) == list(range(tp.NUM_TRAIN))
  np.testing.assert_array_equal(out["num_views"], [1 + i % 3 for i in number])
  for r, i in enumerate(number):
    assert (out["codes"][r, :1 + i % 3] >= 0).all() and (out["codes"][r, 1 + i % 3:] == -1).all()

  # The cached codes are the tokenizer's codes of exactly the pipeline's whole-view images.
  key = tf.constant([0, 0], tf.int64)
  stored = tfds.as_numpy(tfds.builder("pipeline_test_products", data_dir=data_dir).as_dataset(
      split="train", shuffle_files=False, decoders={"images": tfds.decode.SkipDecoding()}))
  stored_images = {}
  for ex in stored:
    i = int(ex["product_id"].decode()[1:])
    stored_images[i] = np.stack([
        pipeline.random_resized_crop(tf.constant(e), key, 16, (1.0, 1.0), False).numpy()
        for e in ex["images"]])
  row = {p: r for r, p in enumerate(out["product_id"])}
  for i in (0, 4, 5):
    codes = np.asarray(system.encode(params, stored_images[i]))
    np.testing.assert_array_equal(out["codes"][row[f"p{i:05d}"], :len(codes)], codes)

  vocab_path = attributes.save_vocabulary([("red", 1), ("cotton", 1), ("boots", 1)],
                                          str(tmp_path / "attrs.txt"))
  config = tp.make_config(data_dir, **{"image_size": 16, "augment.crop_scale": (1.0, 1.0),
                                       "augment.flip": False, "patch_mask.grid": 4,
                                       "patch_mask.count": 3})
  config.data.vq_codes = str(tmp_path / "codes.npz")
  config.data.attributes = vocab_path
  batch = next(pipeline.make_train_iterator(config))
  keys = tp.keys_of(range(tp.NUM_TRAIN))
  matcher = attributes.Matcher(["red", "cotton", "boots"])
  for r in range(config.batch_size):
    i = keys[int(batch["product_key"][r])]
    view = [v for v in range(len(stored_images[i]))
            if np.array_equal(stored_images[i][v], batch["image"][r])]
    assert view, "the batch image is a whole view of its product"
    np.testing.assert_array_equal(batch["vq_codes"][r], out["codes"][row[f"p{i:05d}"], view[0]])
    np.testing.assert_array_equal(batch["attributes"][r], matcher([tp.joined_text(i)])[0])
  assert batch["vq_codes"].dtype == np.int32 and batch["attributes"].dtype == bool

  # A product missing from the file: the batch that holds it raises, naming the key.
  with np.load(config.data.vq_codes) as f:
    np.savez(tmp_path / "missing.npz", **{k: f[k][1:] if f[k].ndim else f[k] for k in f.files})
  config.data.vq_codes = str(tmp_path / "missing.npz")
  with pipeline.make_train_iterator(config) as it, pytest.raises(
      tf.errors.InvalidArgumentError, match="config.data.vq_codes has no codes for a product"):
    for _ in range(tp.NUM_TRAIN // config.batch_size + 1):
      next(it)

  config.data.augment.crop_scale = (0.5, 1.0)
  with pytest.raises(ValueError, match=r"use crop_scale=\(1.0, 1.0\) and flip=False"):
    pipeline.make_train_iterator(config)
