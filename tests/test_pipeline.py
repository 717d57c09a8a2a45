"""tf.data pipelines: batch contents, determinism, exact resume, host shards, eval padding."""

import gc
import importlib
import os
import pathlib
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fashion_jax import configs
from fashion_jax.data import features
from fashion_jax.data import pipeline
from fashion_jax.data import schema
from fashion_jax.data import tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 50, 13
COLOURS = ["red", "navy", "green", "black", "white"]
SUBCATS = ["shirts", "skirts", "boots", "totes"]


def product(i):
  """Product i: 1-3 views (i % 3 + 1) that differ visibly (band height, one channel)."""
  rng = np.random.default_rng(i)
  views = []
  for v in range(1 + i % 3):
    img = np.zeros((40, 48, 3), np.uint8) + rng.integers(0, 200, 3, dtype=np.uint8)
    img[:, :, v % 3] = 60 * v + 40
    img[:8 + 10 * v] = 255
    views.append(img)
  c, s = COLOURS[i % 5], SUBCATS[i % 4]
  return dict(product_id=f"p{i:05d}", images=views, title=f"{c} {s} number {i}.",
              description=f"a {c} item. made of cotton" if i % 2 else "",
              category="tops", subcategory=s, brand=f"brand{i % 7}", season="SS2016",
              composition="100% cotton", gender="women")


class PipelineTestProducts(tfds.core.GeneratorBasedBuilder):
  """NUM_TRAIN train and NUM_TEST test products of `product`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=schema.product_features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(1000, 1000 + NUM_TEST)}

  def _generate_examples(self, lo, hi):
    for i in range(lo, hi):
      yield f"p{i}", product(i)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  PipelineTestProducts(data_dir=path).download_and_prepare()
  return path


def make_config(data_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      seed=3, batch_size=8,
      data=dict(name="pipeline_test_products", data_dir=data_dir, train_split="train",
                image_size=24, text_fields=("title", "description"),
                tokenizer=dict(kind="bert", path=""), max_len=16, views=2,
                augment=dict(crop_scale=(0.3, 1.0), flip=True), mlm_prob=0.15,
                patch_mask=dict(grid=7, count=8), shuffle_buffer=16, prefetch=2,
                tag_fields=("brand", "season"))))
  for key, value in overrides.items():  # "seed", "batch_size" or a path under config.data.
    node = c if key in ("seed", "batch_size") else c.data
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def keys_of(ids):
  """product_key (the pipeline's int32 hash of product_id) -> product number."""
  hashes = tf.strings.to_hash_bucket_fast([f"p{i:05d}" for i in ids], 2**31 - 1).numpy()
  return {int(h): i for h, i in zip(hashes.astype(np.int32), ids)}


def joined_text(i):
  p = product(i)
  return ". ".join(t.rstrip(". ") for t in (p["title"], p["description"]) if t)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------


def test_train_batch_fields(data_dir):
  config = make_config(data_dir)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  tok = tokenizers.get_tokenizer("bert", "", 16)
  owner = keys_of(range(NUM_TRAIN))
  batch = next(it)
  b, s, length = 8, 24, 16
  shapes = dict(image=(b, s, s, 3), image2=(b, s, s, 3), text=(b, length),
                text_mask=(b, length), mlm_ids=(b, length), mlm_labels=(b, length),
                patch_mask=(b, 49), tags=(b, 2, length), product_key=(b,),
                subcategory_key=(b,))
  assert {k: v.shape for k, v in batch.items()} == shapes
  assert batch["image"].dtype == np.uint8 and batch["text"].dtype == np.int32
  assert batch["patch_mask"].dtype == bool
  np.testing.assert_array_equal(batch["patch_mask"].sum(1), 8)
  products = [owner[k] for k in batch["product_key"]]
  np.testing.assert_array_equal(batch["text"], tok([joined_text(i) for i in products]))
  np.testing.assert_array_equal(
      batch["tags"], tok([t for i in products for t in (product(i)["brand"], "SS2016")]
                         ).reshape(b, 2, length))
  np.testing.assert_array_equal(batch["text_mask"], batch["text"] != tok.pad_token_id)
  targets = batch["mlm_labels"] != -1
  np.testing.assert_array_equal(batch["mlm_ids"][~targets], batch["text"][~targets])
  np.testing.assert_array_equal(batch["mlm_labels"][targets], batch["text"][targets])
  same = batch["subcategory_key"][:, None] == batch["subcategory_key"][None]
  np.testing.assert_array_equal(
      same, [[product(i)["subcategory"] == product(j)["subcategory"] for j in products]
             for i in products])
  assert it.position == 1 and it.num_examples == NUM_TRAIN and it.batch_size == 8


def test_deterministic_for_a_seed(data_dir):
  a = take(pipeline.make_train_iterator(make_config(data_dir), process_index=0,
                                        process_count=1), 3)
  b = take(pipeline.make_train_iterator(make_config(data_dir), process_index=0,
                                        process_count=1), 3)
  c = take(pipeline.make_train_iterator(make_config(data_dir, seed=4), process_index=0,
                                        process_count=1), 3)
  for x, y in zip(a, b):
    assert_batches_equal(x, y)
  assert not np.array_equal(a[0]["product_key"], c[0]["product_key"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_equals_uninterrupted_run(data_dir):
  config = make_config(data_dir)
  full = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 11)
  # 50 examples / 8 per batch: step 6 straddles the epoch boundary, 7+ lie in epoch 1.
  for start in (3, 6, 9):
    it = pipeline.make_train_iterator(config, start_step=start, process_index=0, process_count=1)
    assert it.position == start
    for step in range(start, 11):
      assert_batches_equal(next(it), full[step])
    assert it.position == 11


def test_epochs_cover_the_data_once_and_reshuffle(data_dir):
  config = make_config(data_dir, batch_size=10, views=1, mlm_prob=0.0,
                       **{"patch_mask.grid": 0})
  batches = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 10)
  assert "image2" not in batches[0] and "mlm_ids" not in batches[0]
  assert "patch_mask" not in batches[0]
  epochs = [np.concatenate([b["product_key"] for b in batches[e * 5:e * 5 + 5]])
            for e in range(2)]
  all_keys = sorted(keys_of(range(NUM_TRAIN)))
  for keys in epochs:
    assert sorted(keys) == all_keys
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("process_count,batch_size", [(2, 10), (3, 6)])
def test_host_shards_are_disjoint_and_cover(data_dir, process_count, batch_size):
  config = make_config(data_dir, batch_size=batch_size, views=1, mlm_prob=0.0,
                       **{"patch_mask.grid": 0})
  per_host = NUM_TRAIN // process_count
  shards = []
  for host in range(process_count):
    it = pipeline.make_train_iterator(config, process_index=host, process_count=process_count)
    assert it.batch_size == batch_size // process_count
    assert it.num_examples == per_host * process_count
    keys = np.concatenate([b["product_key"] for b in take(it, 2 * per_host // it.batch_size)])
    # Two epochs of the host's shard: each key exactly twice.
    values, counts = np.unique(keys, return_counts=True)
    assert len(values) == per_host and (counts == 2).all()
    shards.append(set(values.tolist()))
  union = set().union(*shards)
  assert len(union) == per_host * process_count  # Disjoint...
  assert union <= set(keys_of(range(NUM_TRAIN)))  # ...and only remainder rows left out.
  assert NUM_TRAIN - len(union) < process_count


@pytest.mark.parametrize("view", ["random", "first"])
def test_second_view_is_another_view_of_the_product(data_dir, view):
  # Whole-image crops, no flip: each image is a resized view and can be matched to it.
  size = 20
  config = make_config(data_dir, batch_size=25, image_size=size, mlm_prob=0.0, view=view,
                       **{"patch_mask.grid": 0, "augment.crop_scale": (1.0, 1.0),
                          "augment.flip": False})
  owner = keys_of(range(NUM_TRAIN))
  first = multi = 0
  for batch in take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 2):
    for key, im1, im2 in zip(batch["product_key"], batch["image"], batch["image2"]):
      views = [tf.image.resize(v, [size, size]).numpy() for v in product(owner[key])["images"]]
      d1 = [np.abs(im1 - v).mean() for v in views]
      d2 = [np.abs(im2 - v).mean() for v in views]
      assert min(d1) < 4 and min(d2) < 4
      if len(views) > 1:
        assert np.argmin(d1) != np.argmin(d2)
        multi, first = multi + 1, first + (np.argmin(d1) == 0)
  if view == "first":  # Always the first stored view (the evaluated one).
    assert first == multi > 20
  else:  # 2-3 views each: about 40% on the first view.
    assert 0.15 * multi < first < 0.75 * multi


def test_crop_is_the_same_for_jpeg_and_other_formats():
  rng = np.random.default_rng(0)
  smooth = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
      (96, 72), Image.BILINEAR)
  jpeg, png = tf.io.encode_jpeg(np.asarray(smooth), quality=98), tf.io.encode_png(
      np.asarray(smooth))
  for i in range(10):
    key = tf.constant([7, i], tf.int64)
    a = pipeline.random_resized_crop(jpeg, key, 32, (0.1, 1.0), True).numpy()
    b = pipeline.random_resized_crop(png, key, 32, (0.1, 1.0), True).numpy()
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(float) - b).mean() < 3  # Same window, JPEG noise only.



def test_per_batch_text_join_equals_the_per_example_join():
  """The train pipeline joins texts per batch on the host (join_text_columns); each row must be
  TF's one-example join (_join_text, which evaluation uses) and TF's per-batch join, byte for
  byte, on every ASCII whitespace byte and non-ASCII text (python's reference: strip, drop
  trailing spaces/periods, skip empty fields, join with '. ')."""
  rows = [("red shirt. ", "made of cotton..", ""), ("", "", ""), (" é tote", "", "brand 1 . "),
          ("...", "x", " ."), ("a.b", " c ", "d\t"), ("\x0bv\x0b", "f.\x0c", "\r\n.\x0b. "),
          ("x .\x0b", "y\x0b.", "\u00a0z\u00a0"), ("日本 。", "ok\x0c\x0b", "\t")]
  batch = {f: tf.constant([r[i] for r in rows]) for i, f in enumerate(("t", "d", "b"))}
  joined = pipeline._join_text(batch, ("t", "d", "b")).numpy()
  host = pipeline.join_text_columns([batch[f].numpy() for f in ("t", "d", "b")])
  assert host.dtype == object and host.tolist() == joined.tolist()
  for r, got in zip(rows[:5], joined[:5]):  # Python str's strip knows more whitespace.
    parts = [v.strip().rstrip(" .\t") for v in r]
    assert got.decode() == ". ".join(p for p in parts if p)
  for r, got in zip(rows, joined):
    one = {f: tf.constant(v) for f, v in zip(("t", "d", "b"), r)}
    assert pipeline._join_text(one, ("t", "d", "b")).numpy() == got
  with pytest.raises(configs.ConfigError, match="config.data.text_fields: field 'colour'"):
    pipeline._join_text(batch, ("t", "colour"))


def test_example_keys_equal_fold_in_then_split():
  """The per-example keys: one RNG op per example, bitwise TF's fold_in + split of the seed."""
  for seed, host in [(0, 0), (17, 3), (2**31 + 5, 1)]:
    keys = pipeline._example_keys(seed, host)
    for p in [0, 1, 12345, 2**40 + 7]:
      p = tf.constant(p, tf.int64)
      want = tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(tf.constant([seed, host], tf.int64), p), 4)
      np.testing.assert_array_equal(keys(p).numpy(), want.numpy())

@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_token_cache_equals_the_tokenizer(kind):
  tok = tokenizers.get_tokenizer(kind, "", 12)
  cache = features.TokenCache(tok, max_entries=5)
  texts = [b"red shirt", b"a navy skirt with a very long description indeed", b"red shirt", b"",
           "boots".encode(), b"totes", b"red shirt", b"green coat", b"black hat"]
  for _ in range(2):  # Second pass: hits, and misses beyond max_entries.
    for batch in (texts, texts[::-1], texts[2:5]):
      ids, mask = cache(batch, with_mask=True)
      want_ids, want_mask = tok(batch, with_mask=True)
      np.testing.assert_array_equal(ids, want_ids)
      np.testing.assert_array_equal(mask, want_mask)
      assert ids.dtype == want_ids.dtype and mask.dtype == want_mask.dtype
      np.testing.assert_array_equal(cache(batch), want_ids)
  assert len(cache) == 5
  assert cache.mask_token_id == tok.mask_token_id and cache.max_len == tok.max_len
  assert cache([]).shape == (0, 12)
  with pytest.raises(ValueError, match="max_entries=-1"):
    features.TokenCache(tok, max_entries=-1)


def test_token_cache_keeps_batches_bytewise(data_dir):
  # Two epochs (the second one served from the cache) equal the batches of the uncached run.
  on = make_config(data_dir, fields=("title", "brand"))
  off = make_config(data_dir, fields=("title", "brand"), token_cache=0)
  a = take(pipeline.make_train_iterator(on, process_index=0, process_count=1), 13)
  b = take(pipeline.make_train_iterator(off, process_index=0, process_count=1), 13)
  for x, y in zip(a, b):
    assert_batches_equal(x, y)


def test_tf_data_stage_calls_no_python(data_dir):
  # The host step runs in TrainIterator's thread, not as a tf.numpy_function in tf.data: deleting
  # an iterator with a Python call in flight deadlocked on the GIL.
  for config in (make_config(data_dir), make_config(data_dir, resize_on="device")):
    with pipeline.make_train_iterator(config, process_index=0, process_count=1) as it:
      graph = it.dataset._as_serialized_graph().numpy()  # pylint: disable=protected-access
      assert b"PyFunc" not in graph and b"EagerPyFunc" not in graph
      assert {"text", "mlm_ids", "patch_mask", "tags"} <= set(next(it))


def _old_stream(builder, split, fields, decoders, seed, process_index, buffer, start):
  """The stream as it was made before example_stream: TFDS's parsed examples, shuffled parsed."""
  n = builder.info.splits[split].num_examples
  records = pipeline._read(builder, split, decoders)  # pylint: disable=protected-access

  def epoch(e):
    if buffer <= 1:
      return records
    return records.shuffle(buffer, seed=(seed * 1_000_003 + process_index) * 1_000_033 + e,
                           reshuffle_each_iteration=False)

  epoch0, skip = divmod(start, n)
  ds = tf.data.Dataset.range(epoch0, 10).flat_map(epoch).skip(skip).enumerate(start=start)
  return ds.map(lambda p, ex: (p, {f: ex[f] for f in fields}))


@pytest.fixture(scope="module")
def sharded_builder(tmp_path_factory):
  """The test products written as 4 TFRecord files: TFDS interleaves them when reading."""
  path = str(tmp_path_factory.mktemp("tfds_sharded"))
  builder = PipelineTestProducts(data_dir=path)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  assert len(builder.info.splits["train"].file_instructions) == 4
  return builder


@pytest.mark.parametrize("process_count", [1, 3])
def test_example_stream_equals_shuffling_tfds_parsed_examples(sharded_builder, process_count):
  # Shuffled and skipped serialized, parsed in batches: the same examples in the same order as
  # TFDS's per-example parse shuffled, over several files (TFDS's interleave order) and uneven
  # host slices that start and end inside files.
  b = sharded_builder
  fields = ("images", "product_id", "title", "description", "brand")
  skip_images = {"images": tfds.decode.SkipDecoding()}
  seen = set()
  for host in range(process_count):
    sub = tfds.even_splits("train", n=process_count, drop_remainder=True)[host]
    n = b.info.splits[sub].num_examples
    for buffer, start in ((1, 0), (7, 5), (32, n + 3)):
      args = dict(seed=11, process_index=host, shuffle_buffer=buffer, start=start)
      new = pipeline.example_stream(b, sub, fields, decoders=skip_images, **args)
      old = _old_stream(b, sub, fields, skip_images, 11, host, buffer, start)
      rows = 0
      for (p, x), (q, y) in zip(new.take(2 * n).as_numpy_iterator(),
                                old.take(2 * n).as_numpy_iterator()):
        assert p == q and sorted(x) == sorted(fields)
        for f in fields:
          np.testing.assert_array_equal(x[f], y[f], err_msg=f)
        seen.add(x["product_id"])
        rows += 1
      assert rows == 2 * n
  assert len(seen) == NUM_TRAIN - NUM_TRAIN % process_count
  # Evaluation's reads: each host's slice (remainder kept) in TFDS's order, unshuffled.
  for sub in tfds.even_splits("train", n=process_count, drop_remainder=False):
    new = pipeline.read_examples(b, sub, fields, skip_images)
    old = pipeline._read(b, sub, skip_images)  # pylint: disable=protected-access
    pairs = list(zip(new.as_numpy_iterator(), old.as_numpy_iterator(), strict=True))
    assert len(pairs) == b.info.splits[sub].num_examples
    for x, y in pairs:
      for f in fields:
        np.testing.assert_array_equal(x[f], y[f], err_msg=f)
  # A field TFDS must decode itself (images decoded here) takes TFDS's per-example path, in the
  # same order.
  new = pipeline.example_stream(b, "train", ("images", "product_id"), seed=2, process_index=0,
                                shuffle_buffer=9, start=4, decoders=None)
  old = _old_stream(b, "train", ("images", "product_id"), None, 2, 0, 9, 4)
  for (p, x), (q, y) in zip(new.take(NUM_TRAIN).as_numpy_iterator(),
                            old.take(NUM_TRAIN).as_numpy_iterator()):
    assert p == q and x["product_id"] == y["product_id"] and x["images"].ndim == 4
    np.testing.assert_array_equal(x["images"], y["images"])


def test_example_stream_batched_is_the_stream_in_batches(sharded_builder):
  # The train pipeline's form: one element per batch, parsed in one call, or for a field TFDS
  # decodes itself (images decoded here) ragged-batched after TFDS's per-example path.
  b = sharded_builder
  for fields, decoders in ((("images", "product_id", "title"),
                            {"images": tfds.decode.SkipDecoding()}),
                           (("images", "product_id"), None)):
    args = dict(seed=5, process_index=0, shuffle_buffer=9, start=3, decoders=decoders)
    rows = pipeline.example_stream(b, "train", fields, **args).take(12).as_numpy_iterator()
    batches = pipeline.example_stream(b, "train", fields, batch=4, **args).take(3)
    for p, x in batches.as_numpy_iterator():
      assert p.shape == (4,) and sorted(x) == sorted(fields)
      for i in range(4):
        q, y = next(rows)
        assert p[i] == q
        for f in fields:
          got = x[f].to_list()[i] if hasattr(x[f], "to_list") else x[f][i]  # Ragged: [n_views].
          want = np.asarray(y[f])
          np.testing.assert_array_equal(np.array(got, dtype=want.dtype), want, err_msg=f)


def test_map_rows_stacks_rows_and_concatenates_varying_ones():
  counts = tf.constant([2, 0, 3], tf.int32)
  ragged = tf.ragged.constant([[1, 2], [3], [4, 5, 6]], dtype=tf.int32)

  def fn(k, row):
    return {"sum": tf.reduce_sum(row) * k, "pair": (k, tf.size(row)), "run": tf.fill([k], row[0])}

  out = tf.function(lambda: pipeline.map_rows(fn, 3, counts, ragged, concat=("run",)))()
  np.testing.assert_array_equal(out["sum"], [3 * 2, 3 * 0, 15 * 3])
  np.testing.assert_array_equal(out["pair"][0], [2, 0, 3])
  np.testing.assert_array_equal(out["pair"][1], [2, 1, 3])
  np.testing.assert_array_equal(out["run"], [1, 1, 4, 4, 4])


def test_train_pipeline_runs_one_tf_data_call_per_batch(data_dir):
  # Records are batched, parsed in one call per batch (TFDS's per-example parse costs 100-140 us
  # of a core per product) and each row made inside that call (pipeline.map_rows): no stage
  # runs per example after the parse (each tf.data call costs two thread wake-ups), so nothing
  # unbatches or re-batches. One file is read without an interleave stage.
  for config in (make_config(data_dir), make_config(data_dir, resize_on="device")):
    with pipeline.make_train_iterator(config, process_index=0, process_count=1) as it:
      graph = it.dataset._as_serialized_graph().numpy()  # pylint: disable=protected-access
    assert b"ParseExampleV2" in graph and b"TensorListReserve" in graph
    for stage in (b"UnbatchDataset", b"PaddedBatchDataset", b"InterleaveDataset"):
      assert stage not in graph, stage
    # resize_on='device': tf.data pads no crop; the host step lays them out (crop_slots).
    assert b"RaggedTensorToTensor" not in graph


def test_crop_slots_lays_each_crop_top_left_in_zeros():
  rng = np.random.default_rng(0)
  shapes = [(3, 5), (1, 1), (6, 6), (0, 0), (2, 6)]
  crops = [rng.integers(1, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
  flat = np.concatenate([c.reshape(-1) for c in crops])
  got = pipeline.crop_slots(flat, np.array(shapes, np.int32), 6)
  want = np.stack([np.pad(c, [(0, 6 - c.shape[0]), (0, 6 - c.shape[1]), (0, 0)]) for c in crops])
  assert got.dtype == np.uint8 and got.flags.writeable
  np.testing.assert_array_equal(got, want)
  # Leading columns to drop (crop_window_aligned's dx): a crop wider than the pad still fits.
  wide = rng.integers(1, 256, (2, 9, 3), dtype=np.uint8)
  got = pipeline.crop_slots(np.concatenate([flat, wide.reshape(-1)]),
                            np.array(shapes + [(2, 9)]), 6, [0, 1, 2, 0, 3, 4])
  want[1:3] = [np.pad(c[:, d:], [(0, 6 - c.shape[0]), (0, 6 - c.shape[1] + d), (0, 0)])
               for c, d in ((crops[1], 1), (crops[2], 2))]
  want[4] = np.pad(crops[4][:, 3:], [(0, 4), (0, 3), (0, 0)])
  np.testing.assert_array_equal(got, np.concatenate([want, np.pad(
      wide[:, 4:], [(0, 4), (0, 1), (0, 0)])[None]]))
  with pytest.raises(ValueError, match=r"shapes \[\[3, 5\]\] .* pad=6 .* 44 bytes"):
    pipeline.crop_slots(flat[:44], [(3, 5)], 6)
  with pytest.raises(ValueError, match=r"shapes \[\[7, 1\]\] less columns \[0\] do not fit "
                     r"pad=6"):
    pipeline.crop_slots(np.zeros(21, np.uint8), [(7, 1)], 6)
  with pytest.raises(ValueError, match=r"shapes \[\[2, 9\]\] less columns \[2\] do not fit"):
    pipeline.crop_slots(wide.reshape(-1), [(2, 9)], 6, [2])


def _input_threads():
  """Threads still making batches (not those only releasing a closed iterator's tf.data one)."""
  gc.collect()  # Iterators of earlier tests, freed by now.
  return sum(t.name == pipeline.PRODUCER_THREAD for t in threading.enumerate())


def _join_release_threads(timeout=180):
  """Waits for every closed iterator's thread to release its tf.data iterator and end; returns
  those still alive after `timeout` s (TF's release waits out tf.data's autotuning period)."""
  for t in threading.enumerate():
    if t.name == pipeline.RELEASE_THREAD:
      t.join(timeout)
  return [t for t in threading.enumerate() if t.name == pipeline.RELEASE_THREAD]


def test_close_stops_the_host_thread_and_names_the_resume_step(data_dir):
  before = _input_threads()
  it = pipeline.make_train_iterator(make_config(data_dir), start_step=1, process_index=0,
                                    process_count=1)
  assert _input_threads() == before + 1
  take(it, 2)
  it.close()
  assert _input_threads() == before
  with pytest.raises(RuntimeError, match=r"closed.*start_step=3"):
    next(it)
  it.close()  # Idempotent.
  it = pipeline.make_train_iterator(make_config(data_dir), process_index=0, process_count=1)
  next(it)
  del it  # Dropped without close(): the finalizer stops the thread.
  assert _input_threads() == before
  # close() returned once production stopped; each thread then frees its tf.data iterator and
  # ends by itself.
  assert not _join_release_threads()


def test_iterator_errors_reach_the_consumer_with_their_type():
  def host_step(step, batch):
    if step == 12:
      raise ValueError(f"bad batch at step {step}")
    return {**batch, "step": np.int64(step)}

  batches = tf.data.Dataset.range(5).batch(1).map(lambda x: {"x": x})
  it = pipeline.TrainIterator(batches, 10, 5, 1, host_step)
  assert [int(next(it)["step"]) for _ in range(2)] == [10, 11]
  for _ in range(2):  # And again on the next call.
    with pytest.raises(ValueError, match="bad batch at step 12"):
      next(it)
  assert it.position == 12
  def checked(x):
    with tf.control_dependencies([tf.debugging.assert_less(x, tf.constant(1, tf.int64),
                                                           message="x too big")]):
      return tf.identity(x)

  it = pipeline.TrainIterator(tf.data.Dataset.range(3).map(checked), 0, 3, 1)
  assert next(it) == 0
  with pytest.raises(tf.errors.InvalidArgumentError, match="x too big"):
    next(it)
  it = pipeline.TrainIterator(tf.data.Dataset.range(2), 0, 2, 1)
  assert list(it) == [0, 1] and it.position == 2


_DROP_MID_PREFETCH = """
import gc, sys, threading
from tests import test_pipeline as tp
from fashion_jax.data import pipeline
gc.set_threshold(50, 1, 1)  # Cycles are collected often, in whichever thread allocates.
for i in range(12):
  config = tp.make_config(sys.argv[1], resize_on=("host", "device")[i % 2])
  it = pipeline.make_train_iterator(config, start_step=i, process_index=0, process_count=1)
  other = pipeline.make_train_iterator(config, start_step=i + 1, process_index=0, process_count=1)
  next(it), next(other)
  if i % 3 == 0:
    it.cycle = it  # Freed by the garbage collector, at any point in any thread.
  del it, other  # Prefetching and host steps are in flight.
gc.collect()
left = tp._join_release_threads()  # Closed iterators' threads release their tf.data iterators.
print("threads", tp._input_threads() + len(left))
"""


def test_dropping_iterators_mid_prefetch_does_not_hang(data_dir):
  out = subprocess.run([sys.executable, "-c", _DROP_MID_PREFETCH, data_dir], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-2:] == ["threads", "0"], out.stdout


def test_bad_train_configs(data_dir):
  with pytest.raises(ValueError, match="batch_size=10 .*process_count=3"):
    pipeline.make_train_iterator(make_config(data_dir, batch_size=10), process_index=0,
                                 process_count=3)
  with pytest.raises(ValueError, match="mask token"):
    pipeline.make_train_iterator(make_config(data_dir, **{"tokenizer.kind": "clip"}),
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match="views=3"):
    pipeline.make_train_iterator(make_config(data_dir, views=3), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match="view='front'.*'random', 'first'"):
    pipeline.make_train_iterator(make_config(data_dir, view="front"), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match="crop_scale"):
    pipeline.make_train_iterator(make_config(data_dir, **{"augment.crop_scale": (0.0, 1.0)}),
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match="token_cache=-2"):
    pipeline.make_train_iterator(make_config(data_dir, token_cache=-2), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match="no split 'nope'"):
    pipeline.make_train_iterator(make_config(data_dir, train_split="nope"), process_index=0,
                                 process_count=1)
  with pytest.raises(FileNotFoundError, match="launch.build_data"):
    pipeline.make_train_iterator(make_config(data_dir + "/empty"), process_index=0,
                                 process_count=1)


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def test_eval_batches_padded_and_aligned_across_hosts(data_dir):
  config = make_config(data_dir)
  tok = tokenizers.get_tokenizer("bert", "", 16)
  order = [ex["product_id"].decode() for ex in tfds.as_numpy(tfds.builder(
      "pipeline_test_products", data_dir=data_dir).as_dataset(split="test", shuffle_files=False))]
  seen, per_host = {}, []
  for host in range(2):
    ds = pipeline.make_eval_dataset(config, "test", batch_size=5, fields=("product_id",),
                                    process_index=host, process_count=2)
    assert ds.num_examples == NUM_TEST and len(ds) == ds.num_batches == 2
    batches = list(ds)
    assert len(batches) == 2
    per_host.append(sum(int(b["valid"].sum()) for b in batches))
    for b in batches:
      assert b["image"].shape == (5, 24, 24, 3) and b["text"].shape == (5, 16)
      valid = b["valid"]
      assert (b["index"][~valid] == -1).all() and (b["image"][~valid] == 0).all()
      assert (b["product_id"][~valid] == "").all() and not b["text_mask"][~valid].any()
      for idx, pid, text in zip(b["index"][valid], b["product_id"][valid], b["text"][valid]):
        assert order[idx] == pid
        np.testing.assert_array_equal(text, tok([joined_text(int(pid[1:]))])[0])
        seen[int(idx)] = pid
  assert per_host == [7, 6]
  assert sorted(seen) == list(range(NUM_TEST))


def test_eval_image_matches_clip_processor_geometry(data_dir):
  config = make_config(data_dir, image_size=32)
  batch = next(iter(pipeline.make_eval_dataset(config, "test", batch_size=4,
                                               fields=("product_id",), process_index=0,
                                               process_count=1)))
  first_views = [product(int(pid[1:]))["images"][0] for pid in batch["product_id"]]
  # JPEG-decoded view vs the original pixels, and TF bicubic vs PIL bicubic: a few levels.
  expected = pipeline.clip_image_preprocess(first_views, 32)
  assert np.abs(batch["image"].astype(float) - expected).mean() < 4


def test_clip_image_preprocess_equals_hf_clip_image_processor():
  import transformers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for h, w, size in [(40, 48, 32), (300, 200, 224), (50, 77, 33)]:
    image = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 4, w // 4, 3), np.uint8))
                       .resize((w, h), Image.BILINEAR))
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_rescale=False, do_normalize=False)
    hf = np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0])
    ours = pipeline.clip_image_preprocess([image], size)[0]
    np.testing.assert_array_equal(hf.transpose(1, 2, 0) if hf.shape[0] == 3 else hf, ours)


def test_eval_unknown_field(data_dir):
  with pytest.raises(KeyError, match="colour_name"):
    pipeline.make_eval_dataset(make_config(data_dir), "test", batch_size=4,
                               fields=("colour_name",), process_index=0, process_count=1)


def test_normalize_on_device_matches_numpy():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  expected = (images / 255.0 - np.array(pipeline.CLIP_MEAN)) / np.array(pipeline.CLIP_STD)
  np.testing.assert_allclose(np.asarray(pipeline.normalize_on_device(images)), expected,
                             atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The built-in synthetic catalog.
# ------------------------------------------------------------------------------------------------


def test_synthetic_catalog_tiny(tmp_path):
  importlib.import_module("fashion_jax.data.builders.synthetic_catalog")
  tfds.builder("synthetic_catalog/tiny", data_dir=str(tmp_path)).download_and_prepare()
  config = make_config(str(tmp_path), name="synthetic_catalog/tiny", image_size=32,
                       batch_size=8, mlm_prob=0.0, max_len=77,
                       tokenizer=dict(kind="clip", path=""),
                       tag_fields=("brand", "season", "subcategory", "composition"))
  it = pipeline.make_train_iterator(config, start_step=4, process_index=1, process_count=2)
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image2"].shape == (4, 32, 32, 3)
  assert batch["tags"].shape == (4, 4, 77) and it.num_examples == 24
  tok = tokenizers.get_tokenizer("clip", "", 77)
  assert (batch["text"][:, 0] == tok.bos_token_id).all()
  assert ((batch["text"] == tok.eos_token_id).any(1)).all()
  ds = pipeline.make_eval_dataset(config, "test", batch_size=3, fields=("title", "brand"),
                                  process_index=0, process_count=1)
  rows = [t for b in ds for t, v in zip(b["title"], b["valid"]) if v]
  assert ds.num_examples == 8 and len(rows) == 8 and all(rows)


def test_eval_resize_mode_squash_matches_pil(data_dir):
  size = 32
  config = make_config(data_dir, image_size=size, resize_mode="squash")
  batch = next(iter(pipeline.make_eval_dataset(config, "test", batch_size=4,
                                               fields=("product_id",), process_index=0,
                                               process_count=1)))
  first_views = [product(int(pid[1:]))["images"][0] for pid in batch["product_id"]]
  expected = np.stack([np.asarray(Image.fromarray(v).resize((size, size), Image.BICUBIC))
                       for v in first_views])
  assert batch["image"].shape == (4, size, size, 3)
  # JPEG-decoded view vs the original pixels, and TF bicubic vs PIL bicubic: a few levels.
  assert np.abs(batch["image"].astype(float) - expected).mean() < 4
  cropped = pipeline.clip_image_preprocess(first_views, size)
  crop_config = make_config(data_dir, image_size=size, resize_mode="crop")
  crop_batch = next(iter(pipeline.make_eval_dataset(crop_config, "test", batch_size=4,
                                                    process_index=0, process_count=1)))
  assert np.abs(crop_batch["image"].astype(float) - cropped).mean() < 4


def test_squash_resize_equals_pil_on_smooth_images():
  rng = np.random.default_rng(1)
  for h, w, size in [(40, 48, 32), (90, 60, 48), (20, 30, 64)]:
    image = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 4, w // 4, 3), np.uint8))
                       .resize((w, h), Image.BILINEAR))
    ours = pipeline.resize_squash(tf.io.encode_png(image), size).numpy()
    pil = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(float) - pil).max() <= 3, (h, w, size)
    # The whole image, not CLIP's centre crop (which differs by far more).
    cropped = pipeline.resize_center_crop(tf.io.encode_png(image), size).numpy()
    assert np.abs(cropped.astype(float) - pil).mean() > 4 * np.abs(ours.astype(float) - pil).mean()


def test_eval_resize_mode_unknown(data_dir):
  with pytest.raises(ValueError, match="resize_mode='shortest'"):
    pipeline.make_eval_dataset(make_config(data_dir, resize_mode="shortest"), "test",
                               batch_size=4, process_index=0, process_count=1)


def test_resize_mode_of_open_clip_preprocess():
  assert pipeline.resize_mode_of("squash") == "squash"
  assert pipeline.resize_mode_of("shortest") == "crop"
  with pytest.raises(ValueError, match="'longest'"):
    pipeline.resize_mode_of("longest")
