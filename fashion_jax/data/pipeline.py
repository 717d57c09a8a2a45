"""tf.data input pipelines over product-schema TFDS datasets (see data/schema.py).

Training: `make_train_iterator(config, start_step=..)` -> iterator of per-host numpy batches.
Evaluation: `make_eval_dataset(config, split, batch_size=..)` -> padded, host-aligned batches.

Config keys read (config.data.*; config.seed, config.batch_size is the GLOBAL batch):
  name ('synthetic_catalog/smoke'), data_dir ('' = TFDS default), train_split ('train'),
  image_size (S), text_fields (schema fields joined with '. ', empty fields skipped),
  tokenizer.kind ('clip' | 'bert'), tokenizer.path ('' = shipped vocab), max_len (L),
  views (1 | 2), augment.crop_scale ((lo, hi) area fraction), augment.flip (bool),
  view ('random' (default): each example one of the product's stored views at random; 'first':
  always the first stored view, the one the evaluation encodes, see EvalDataset),
  mlm_prob (0 = off), patch_mask.grid (0 = off), patch_mask.count, shuffle_buffer, prefetch.
  Optional: resize_mode ('crop' | 'squash': the eval image resize, see EvalDataset; SigLIP and
  open_clip 'squash' checkpoints want 'squash', resize_mode_of maps open_clip's value),
  patch_mask.min_block (4), patch_mask.max_block (None = count), tag_fields (() = off),
  fields (() = off; the multi-field texts, data/features.py),
  attributes ('' = off; a pseudo-attribute vocabulary, data/attributes.py), vq_codes ('' = off;
  an npz of cached VQ codes, prepare/vq_codes.py cache_codes), token_cache (distinct texts whose
  token rows are kept, features.TokenCache; default features.DEFAULT_TOKEN_CACHE, 0 = off;
  batches are bitwise the same either way), patch_features ('' = off; an npz
  of cached patch features, prepare/patches.py). `python -m launch.prepare` makes these three
  into <workdir>/prepared/ and launch.train fills the keys (fashion_jax/prepare/manifest.py);
  a path that does not exist is a FileNotFoundError naming the key and that command.
  resize_on ('host' (default) | 'device': ship each decoded crop window, zero-padded to
  crop_pad x crop_pad (crop_pad 0 = features.default_crop_pad(S)), and let the train step resize
  it: the host skips the resize, about half its work per image; data/device_crop.py).

Training batch (b = batch_size // process_count):
  image        uint8 [b, S, S, 3]  random resized crop (area crop_scale, aspect 3/4..4/3) of a
                                   random view (or the first: data.view) + random flip; NOT
                                   normalised (systems do it on the device, see
                                   normalize_on_device).
  image2       uint8 [b, S, S, 3]  views=2: a different view of the same product when it has one
                                   (else the same view), augmented independently.
  image_window int32 [b, 3]        resize_on='device' only (and image2_window with views=2):
                                   image (and image2) is then uint8 [b, C, C, 3], C = crop_pad,
                                   the UNresized crop at the top-left, and this its (h, w,
                                   flip); train/step.py resizes on the device before the loss
                                   (data/device_crop.py finish_images).
  text         int32 [b, L]        tokenized text (see tokenizers.Tokenizer).
  text_mask    bool  [b, L]        True on real tokens (incl. BOS/EOS), False on padding.
  mlm_ids      int32 [b, L]        mlm_prob > 0: text after whole-word masking (masking.py).
  mlm_labels   int32 [b, L]        original id at masked positions, -1 elsewhere.
  patch_mask   bool  [b, g*g]      patch_mask.grid > 0: BEiT block mask, row-major.
  tags         int32 [b, T, L]     tag_fields non-empty: each tag field tokenized on its own
                                   (E2's entity texts).
  field_text   int32 [b, F, L]     fields non-empty (multi-field contrastive training): each of
                                   the F fields tokenized on its own.
  field_mask   bool  [b, F]        True where the product has the field (non-blank text).
  attributes   bool  [b, A]        attributes set: which of the A vocabulary n-grams the
                                   example's text contains (FashionViL's PAC labels).
  vq_codes     int32 [b, g*g]      vq_codes set: the cached codes of the view in `image`. Codes
                                   describe the whole view, so augment must be crop_scale (1, 1)
                                   without flip (checked); a product missing from the file is an
                                   error.
  patch_features float32 [b, P, F]  patch_features set: the cached patch features of the view in
                                   `image` (FashionBERT's frozen CNN, read in place of running
                                   it); like vq_codes they describe the whole unflipped view
                                   (checked), and a missing product is an error. The table is
                                   held in host memory: N x V x P x F x 2 bytes (float16 file).
  product_key, subcategory_key  int32 [b]  hashes of product_id / subcategory: equal iff the
                                   strings are equal (for same-product / same-subcategory logic).
Each field is declared once in data/features.py (`feature_spec(config)` lists them without TF):
image, image2, vq_codes and patch_features are made per example in tf.data, the two keys per
batch (elementwise hashes), and all are checked against their declarations; text ... attributes
are HostFeature ops, run per batch as numpy in TrainIterator's host-step thread, after tf.data
(not inside it: see TrainIterator), each output checked against the dtype and shape its op
declares.

Order and resumption. Host i reads the contiguous shard i of `train_split` (tfds.even_splits,
remainder dropped so all hosts have equal shards). The example stream is epoch 0, 1, 2, ... of
that shard, each epoch shuffled by a buffer shuffle seeded by (seed, host, epoch); batches may
span an epoch boundary. Global stream position p = step * b + row. Every random choice of an
example (view, crop, flip) is a stateless function of (seed, host, p); the per-batch numpy
masking uses np.random.default_rng((seed, host, step)). Hence `start_step=n` rebuilds the stream
at epoch n*b // N, skips (n*b) % N still-encoded records (nothing is decoded before the skip)
and yields exactly the batches n, n+1, ... of the uninterrupted run. The shuffle is a buffer
shuffle over the records in TFDS's read order; its quality depends on shuffle_buffer. Records
are shuffled and skipped serialized, then batched and parsed one batch per call
(`example_stream`, `read_examples`): the examples and order that shuffling TFDS's parsed
examples gives, without its per-example parse. The same call makes the batch's rows
(`map_rows`): no tf.data stage runs per example after the parse.
"""

import functools
import io
import math
import os
import queue
import threading
import weakref

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from fashion_jax import configs
from fashion_jax.data import attributes as attributes_lib
from fashion_jax.data import features
from fashion_jax.data import registry
from fashion_jax.data import schema
from fashion_jax.data import tokenizers

# CLIP's pixel statistics (OpenAI CLIP / HF CLIPImageProcessor), in [0, 1] units.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ASPECT = (3 / 4, 4 / 3)
_MAX_EPOCHS = 2**40
VIEW_CHOICES = ("random", "first")  # config.data.view.
# TrainIterator's thread: its name while it makes batches, and once it only releases its tf.data
# iterator (after close(); see TrainIterator).
PRODUCER_THREAD = "fashion_jax-train-input"
RELEASE_THREAD = "fashion_jax-train-input-release"
_UNFIT = "unfit/"  # resize_on='device': (fits, bytes, key) per image field, for replace_unfit.
_HOST = "host/"  # Batch key prefix of the host step's inputs (text fields, tags, fields).
# resize_on='device', per image field: the crop's bytes (flat, concatenated over the batch by
# `batched`), its (h, w) and its columns decoded left of the window (crop_window_aligned); the
# host step lays them into [pad, pad, 3] slots (crop_slots).
_CROP = "crop/"
_CROP_HW = "crop_hw/"
_CROP_DX = "crop_dx/"
_VIEW = "view"  # vq_codes or patch_features: the row's first view, for their per-batch gather.
_DECODE_ALIGN = 16  # libjpeg's iMCU width of 4:2:0 and 4:2:2 JPEGs, a multiple of 4:4:4's (8).


def _encode_one_pixel_jpeg() -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (1, 1)).save(out, format="JPEG")
  return out.getvalue()


# A valid JPEG header for tf.image.extract_jpeg_shape when the example is not a JPEG.
_ONE_PIXEL_JPEG = _encode_one_pixel_jpeg()


def normalize_on_device(images, mean=CLIP_MEAN, std=CLIP_STD):
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std; jnp, meant to run inside the jitted step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Dataset access.
# ------------------------------------------------------------------------------------------------


def _builder(data):
  """The TFDS builder of config.data.name ('NAME[/CONFIG]'), built in config.data.data_dir.

  registry.prepared_builder finds it (FileNotFoundError naming the build command when it is not
  built); the builder module's `check_built(builder)`, if it has one, is then called on it
  (image_text_folder warns when its catalog changed since the build).
  """
  builder = registry.prepared_builder(data.name, data.data_dir)
  module = registry.builder_module(data.name)
  if hasattr(module, "check_built"):
    module.check_built(builder)
  return builder


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  return process_index, process_count


def _host_shard(builder, split, process_index, process_count, drop_remainder):
  """(split of this host, its size, its offset in `split`, sizes of all hosts' shards)."""
  if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
    raise ValueError(f"Dataset {builder.info.full_name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  subs = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)
  sizes = [builder.info.splits[s].num_examples for s in subs]
  return subs[process_index], sizes[process_index], sum(sizes[:process_index]), sizes


_SKIP_IMAGES = {schema.IMAGES: tfds.decode.SkipDecoding()}
_PARSE_BATCH = 64  # Records per batched parse (one ParseExampleV2 call).
_ROW_PARALLELISM = 16  # map_rows: rows of one batch in flight at once.


def _read(builder, split, decoders=_SKIP_IMAGES):
  """Examples of `split` in TFDS's read order (see `_records`), decoded as `as_dataset` does
  with `decoders` (default: images left as encoded bytes, [n_views] tf.string)."""
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(add_tfds_id=False))


def _batch_parse_spec(builder, fields, decoders):
  """tf.io parse specs giving `fields` exactly as `_read(builder, split, decoders)` decodes them,
  or None when one of them needs TFDS's own decoding.

  Batch-parsable: Text (a scalar string) and Sequence(Text) (a [n] string), and Image or
  Sequence(Image) left encoded by a SkipDecoding decoder. TFDS decodes these as the identity on
  what tf.io parses (a scalar FixedLenFeature, a RaggedFeature row).
  """
  features, serialized = builder.info.features, builder.info.features.get_serialized_info()
  decoders = decoders or {}
  spec = {}
  for f in fields:
    feature = features[f]
    inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
    skipped = isinstance(decoders.get(f), tfds.decode.SkipDecoding)
    if not (isinstance(inner, tfds.features.Text) or
            (skipped and isinstance(inner, tfds.features.Image))):
      return None
    info = serialized[f]
    if info.tf_dtype != tf.string or info.shape not in ((), (None,)):
      return None
    spec[f] = (tf.io.FixedLenFeature([], tf.string) if info.shape == () else
               tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int64))
  return spec


# The reader's tf.data functions hold no Python control flow on tensors: not converted by
# autograph (which cannot find a lambda's or a nested closure's source and warns).
@tf.autograph.experimental.do_not_convert
def _file_records(path, skip, take):
  return tf.data.TFRecordDataset(path).skip(skip).take(take)


def _records(builder, split):
  """Serialized records of `split` in `_read`'s order (None for a format other than TFRecord).

  The order is TFDS's reader's with shuffle_files=False (tensorflow_datasets/core/reader.py,
  `_read_files`): each of the split's file instructions is the file's records .skip(skip)
  .take(take), interleaved deterministically with ReadConfig's defaults, cycle 16 and block 16
  (cycle 1 when the dataset sets disable_shuffling). tests/test_pipeline.py checks it against
  `_read` on a dataset of several files and uneven host slices.
  """
  info = builder.info
  if file_adapters.FileFormat.from_value(info.file_format or "tfrecord") != (
      file_adapters.FileFormat.TFRECORD):
    return None
  instructions = info.splits[split].file_instructions
  if len(instructions) == 1:  # One file: the interleave would only add a stage.
    f = instructions[0]
    return _file_records(os.fspath(f.filename), f.skip, f.take)
  files = tf.data.Dataset.from_tensor_slices((
      [os.fspath(f.filename) for f in instructions],
      np.array([f.skip for f in instructions], np.int64),
      np.array([f.take for f in instructions], np.int64)))
  return files.interleave(
      _file_records, cycle_length=1 if info.disable_shuffling else 16,
      block_length=tfds.ReadConfig().interleave_block_length,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read_examples(builder, split, fields, decoders=_SKIP_IMAGES, before_parse=None, *,
                  start=None, batch=None) -> tf.data.Dataset:
  """`fields` of each example of `split` in `_read`'s order, as `_read(builder, split, decoders)`
  gives them (`decoders` as `as_dataset`'s: None decodes every feature).

  `before_parse(ds) -> ds` (shuffle, skip, repeat: anything that moves examples, not reads them)
  runs on the serialized records, which are then parsed _PARSE_BATCH per call. A buffer shuffle
  permutes by its seed and position alone, so this yields exactly the examples that applying
  `before_parse` to `_read`'s parsed examples gives, at a fraction of the cost: TFDS parses one
  example per ParseExampleV2 call, 100-140 us of a CPU core per product example here with the
  read (hidden for datasets under 250 MiB, which TFDS caches parsed in memory), against ~25 us
  batched (benchmarks/benchmark_pipeline.py, rows parse_tfds and parse_batched). Fields that need
  TFDS's own decoding (`_batch_parse_spec`), or files other than TFRecord, take TFDS's
  per-example path, `before_parse` applied to the parsed examples.

  `start`: each example comes as (p, example), p = start, start + 1, ... counted after
  `before_parse`. `batch`: batches of `batch` examples (remainder dropped), parsed one batch per
  call and not split again: p int64 [batch], a scalar field [batch], a sequence field (say the
  [n_views] images) a RaggedTensor [batch, None].
  """
  fields = tuple(dict.fromkeys(fields))
  before_parse = before_parse or (lambda ds: ds)
  spec = _batch_parse_spec(builder, fields, decoders)
  records = None if spec is None else _records(builder, split)

  def numbered(ds):
    ds = before_parse(ds)
    return ds if start is None else ds.enumerate(start=start)

  @tf.autograph.experimental.do_not_convert
  def select(*x):  # (ex) or (p, ex): the fields of ex.
    *p, ex = x
    ex = {f: ex[f] for f in fields}
    return (*p, ex) if p else ex

  @tf.autograph.experimental.do_not_convert
  def parse(*x):  # (serialized) or (p, serialized): the fields parsed.
    *p, serialized = x
    ex = tf.io.parse_example(serialized, spec)
    return (*p, ex) if p else ex

  if records is None:
    ds = numbered(_read(builder, split, decoders).map(select))
    return ds if batch is None else ds.ragged_batch(batch, drop_remainder=True)
  if batch is not None:
    return numbered(records).batch(batch, drop_remainder=True).map(parse)
  return numbered(records).batch(_PARSE_BATCH).map(parse).unbatch()


def example_stream(builder, split, fields, *, seed, process_index, shuffle_buffer, start,
                   decoders=_SKIP_IMAGES, batch=None) -> tf.data.Dataset:
  """(p, example) for stream positions p = start, start + 1, ... of one host's training stream.

  The stream is epoch 0, 1, 2, ... of `split` (this host's slice), epoch e shuffled by a buffer
  of `shuffle_buffer` records seeded by (seed, process_index, e) (no shuffle when <= 1); it
  starts at position `start` without parsing the records before it. Examples: `fields` as
  `read_examples` gives them; the records are shuffled and skipped before they are parsed.
  `batch`: the same stream in batches of `batch` examples, as `read_examples` batches them.
  """
  n = builder.info.splits[split].num_examples
  epoch0, skip = divmod(start, n)

  def stream(records):
    @tf.autograph.experimental.do_not_convert
    def epoch(e):
      if shuffle_buffer <= 1:
        return records
      return records.shuffle(shuffle_buffer,
                             seed=(seed * 1_000_003 + process_index) * 1_000_033 + e,
                             reshuffle_each_iteration=False)
    return tf.data.Dataset.range(epoch0, _MAX_EPOCHS).flat_map(epoch).skip(skip)

  return read_examples(builder, split, fields, decoders, stream, start=start, batch=batch)


def map_rows(fn, n, *rows, concat=()):
  """{key: [fn(*row i of `rows`)[key] for i < n]} as one batch, in one graph call.

  `rows`: nests of tensors (or RaggedTensors) with n rows each. fn returns a dict of tensors (or
  nests of them), the same keys and dtypes for every row. Values under a key in `concat` have a
  varying first dimension ([None, ...]) and are concatenated along it ([sum of the rows' sizes,
  ...]: tf.RaggedTensor.from_row_lengths splits them again); the others are stacked ([n, ...]).

  Why not tf.data's per-example map: each tf.data function call hands its element to a pool
  thread and waits for it, two thread wake-ups per example (15x the context switches of this
  form); the train pipeline runs 1.14x faster per core this way (docs/benchmarks.md). Here the
  rows run in a while loop inside one call, up to _ROW_PARALLELISM of them at once where the
  pool has the threads, each result written at its row's index: bitwise what the per-example
  map gives.
  """
  def row(i):
    return tf.nest.map_structure(lambda x: x[i], rows)

  first = fn(*row(0))
  flat = tf.nest.flatten(first)
  joined = tf.nest.flatten({k: tf.nest.map_structure(lambda _, k=k: k in concat, v)
                            for k, v in first.items()})
  arrays = [tf.TensorArray(x.dtype, size=n, infer_shape=not j, element_shape=(
      tf.TensorShape([None]).concatenate(x.shape[1:]) if j else x.shape)).write(0, x)
            for x, j in zip(flat, joined)]

  def body(i, arrays):
    return i + 1, [a.write(i, x) for a, x in zip(arrays, tf.nest.flatten(fn(*row(i))))]

  _, arrays = tf.while_loop(lambda i, _: i < n, body, (tf.constant(1), arrays),
                            parallel_iterations=_ROW_PARALLELISM)
  return tf.nest.pack_sequence_as(first, [a.concat() if j else a.stack()
                                          for a, j in zip(arrays, joined)])


def _check_fields(example, fields, key="config.data.text_fields"):
  """configs.ConfigError naming `key`, the missing field and the dataset's fields."""
  for f in fields:
    if f not in example:
      raise configs.ConfigError(
          f"{key}: field {f!r} is not in the dataset; it has {sorted(example)}.")


def _join_text(example, fields):
  """Joins the non-empty `fields` with '. ' (each stripped of trailing spaces and periods).

  Elementwise over any leading shape: scalar fields (one example) give a scalar, [B] fields (a
  batch, where the train pipeline does it: one op per batch, not per example) give [B].
  """
  _check_fields(example, fields)
  parts = tf.stack([tf.strings.regex_replace(tf.strings.strip(example[f]), r"[\s.]+$", "")
                    for f in fields], axis=-1)
  kept = tf.ragged.boolean_mask(parts, tf.strings.length(parts) > 0)
  return tf.strings.reduce_join(kept, axis=-1, separator=". ")


# _join_text's trailing class r"[\s.]+$": RE2's \s is [\t\n\f\r ] (no \v), plus '.'.
_TRAILING = b" \t\n\f\r."


def join_text_columns(columns) -> np.ndarray:
  """_join_text on the host, byte for byte: one sequence of utf-8 bytes per field (the batch's
  rows) -> object [B] of the joined bytes.

  bytes.strip() removes the same six ASCII whitespace bytes as tf.strings.strip, and rstrip of
  _TRAILING is the regex's trailing run (tests/test_pipeline.py compares them on edge cases).
  The train pipeline joins here, in its host step: ~1 us per example in Python, against ~9 us
  per example for the TF string ops in a per-batch tf.data function.
  """
  out = np.empty(len(columns[0]) if columns else 0, object)
  for i, parts in enumerate(zip(*columns)):
    out[i] = b". ".join(p for p in (x.strip().rstrip(_TRAILING) for x in parts) if p)
  return out


def _hash32(s):
  return tf.cast(tf.strings.to_hash_bucket_fast(s, 2**31 - 1), tf.int32)


# ------------------------------------------------------------------------------------------------
# Image ops.
# ------------------------------------------------------------------------------------------------


def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _decode_crop(encoded, key, crop_scale, flip):
  """Encoded image -> (uint8 [h, w, 3] crop window, bool: mirror it), unflipped.

  Crop: area fraction in crop_scale, aspect 3/4..4/3 (Inception / torchvision
  RandomResizedCrop; the whole image if 10 draws fail). JPEGs decode ONLY the crop window
  (tf.image.decode_and_crop_jpeg, integer DCT), which is most of this pipeline's speed; other
  formats decode fully, then crop. `key` is a [2] int64 stateless seed; crop and flip are pure
  functions of it. The mirror bit is False when `flip` is off.
  """
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))

  def jpeg():
    begin, extent = _crop_window(tf.image.extract_jpeg_shape(encoded), crop_key, crop_scale)
    return _decode_jpeg_window(encoded, begin, extent)

  def other():
    image = tf.image.decode_image(encoded, channels=3, expand_animations=False,
                                  dtype=tf.uint8)
    begin, extent = _crop_window(tf.shape(image), crop_key, crop_scale)
    return tf.slice(image, begin, extent)

  crop = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  return crop, _mirror(flip_key, flip)


def _crop_window(shape, crop_key, crop_scale):
  """(begin, extent) of the random crop of an image of `shape` (RandomResizedCrop's draw)."""
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=crop_key,
      min_object_covered=0.0, aspect_ratio_range=_ASPECT, area_range=tuple(crop_scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin, extent


_STAND_IN_WINDOW = (0, 0, 1, 1)  # decode_and_crop_jpeg's [y, x, h, w] of the 1-pixel stand-in.


def _decode_jpeg_window(encoded, begin, extent):
  return tf.image.decode_and_crop_jpeg(
      encoded, tf.stack([begin[0], begin[1], extent[0], extent[1]]), channels=3,
      dct_method="INTEGER_FAST")


def _mirror(flip_key, flip):
  return (tf.random.stateless_uniform([], flip_key) < 0.5) if flip else tf.constant(False)


def _flip_resize(crop, mirror, size, flip):
  """uint8 crop -> float32 [size, size, 3] in [0, 255]: mirrored if `mirror`, then resized.

  The flip is applied to the uint8 crop (before the resize, where it is cheapest). Resize is
  bilinear without antialias (crops are near or below the output size for 224/256 px sources),
  so values stay within [0, 255].
  """
  if flip:
    crop = tf.cond(mirror, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
  # TF's bilinear kernel runs ~20% faster on float32 input than on uint8.
  return tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear",
                         antialias=False)


def crop_resize_float(encoded, key, size, crop_scale, flip):
  """Encoded image -> float32 [size, size, 3] in [0, 255]: random crop, flip, bilinear resize
  (_decode_crop, then _flip_resize)."""
  crop, mirror = _decode_crop(encoded, key, crop_scale, flip)
  return _flip_resize(crop, mirror, size, flip)


def whole_views(data, split: str):
  """(product_id, uint8 [V, S, S, 3]) per product of `split`, numpy, in the split's order.

  Every stored view decoded whole and resized to data.image_size exactly as the training
  pipeline does with crop_scale (1, 1) and no flip, so a derived artefact (cached VQ codes, patch
  features) describes bit for bit the image the pipeline feeds. ValueError names a missing split.
  """
  size = int(data.image_size)
  builder = _builder(data)
  if split not in builder.info.splits:
    raise ValueError(f"{data.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={schema.IMAGES: tfds.decode.SkipDecoding()})

  def views(ex):
    whole = tf.map_fn(
        lambda e: random_resized_crop(e, tf.constant([0, 0], tf.int64), size, (1.0, 1.0), False),
        ex[schema.IMAGES], fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    return ex["product_id"], whole

  return ds.map(views, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).as_numpy_iterator()


def _round_bilinear(x):
  # Bilinear values lie in [0, 255]: +0.5 and truncation round without a clip.
  return tf.cast(x + 0.5, tf.uint8)


def random_resized_crop(encoded, key, size, crop_scale, flip):
  """crop_resize_float rounded to uint8 [size, size, 3] (the training 'image' field)."""
  return _round_bilinear(crop_resize_float(encoded, key, size, crop_scale, flip))


def crop_window_fitting(encoded, key, crop_scale, flip, pad):
  """random_crop_window's usual case, without control flow (the per-example half of the device
  resize path; the host step finishes each batch with replace_unfit).

  Returns (uint8 [h, w, 3], int32 [3], bool). When the bool (`fits`) is True, the image is a JPEG
  whose crop window fits in pad x pad, and the pair is random_crop_window's: the crop, decoded
  alone and unflipped, and its (h, w, flip). Otherwise the pair is a 1-pixel stand-in for
  replace_unfit to overwrite. The window is drawn from the JPEG header (a non-JPEG reads a
  1-pixel stand-in's header here; its real draw, from its decoded shape, is replace_unfit's).

  Speed: tf.cond costs ~35 us per example in tf.data (measured: a sixth of a 256 px decode),
  so the per-example work takes none, and the rare rows that need the general path are redone
  on the host (replace_unfit, in numpy, per batch).
  """
  crop, window, fits, _ = crop_window_aligned(encoded, key, crop_scale, flip, pad, 1)
  return crop, window, fits


def crop_window_aligned(encoded, key, crop_scale, flip, pad, align):
  """crop_window_fitting, decoded from the column `dx` left of the crop window, where x - dx is
  the multiple of `align` at or below the window's x.

  Returns (uint8 [h, dx + w, 3], int32 [3], bool, int32 dx): crop_window_fitting's triple with
  the dx decoded columns left of its crop (crop[:, dx:] is its crop, bitwise; dx = 0 for the
  stand-in and for align=1, which runs no extra op).

  Why: libjpeg decodes whole iMCU columns (16 pixels for 4:2:0 and 4:2:2 JPEGs, 8 for 4:4:4),
  and TF's decode_and_crop_jpeg copies every scanline once more to drop the columns before x
  when x is not on that boundary. With align=16 there is nothing to drop; the train pipeline's
  host step drops the dx columns in the copy it makes anyway (crop_slots).
  """
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  is_jpeg = tf.io.is_jpeg(encoded)
  begin, extent = _crop_window(
      tf.image.extract_jpeg_shape(tf.where(is_jpeg, encoded, _ONE_PIXEL_JPEG)), crop_key,
      crop_scale)
  hw = extent[:2]
  fits = is_jpeg & tf.reduce_all(hw <= pad)
  # Few ops on purpose (each costs ~1-2 us per example in tf.data): one [y, x, h, w] select.
  crop_window = tf.where(fits, tf.concat([begin[:2], hw], 0), _STAND_IN_WINDOW)
  dx = tf.constant(0, tf.int32)
  if align > 1:  # The stand-in's x is 0: its dx is 0.
    dx = crop_window[1] % align
    crop_window -= dx * tf.constant([0, 1, 0, -1], tf.int32)
  crop = tf.image.decode_and_crop_jpeg(tf.where(fits, encoded, _ONE_PIXEL_JPEG), crop_window,
                                       channels=3, dct_method="INTEGER_FAST")
  window = tf.concat([hw, tf.cast(_mirror(flip_key, flip), tf.int32)[None]], 0)
  return crop, window, fits, dx


def _general_crop_window(encoded, key, size, crop_scale, flip, pad):
  """random_crop_window for any image: the decoded crop and its window when it fits in the pad,
  else random_resized_crop's finished image and (size, size, 0)."""
  crop, mirror = _decode_crop(encoded, key, crop_scale, flip)  # The same draws as above.
  h, w = tf.shape(crop)[0], tf.shape(crop)[1]
  return tf.cond(
      (h <= pad) & (w <= pad), lambda: (crop, tf.stack([h, w, tf.cast(mirror, tf.int32)])),
      lambda: (_round_bilinear(_flip_resize(crop, mirror, size, flip)),
               tf.constant([size, size, 0], tf.int32)))


def replace_unfit(images, windows, fits, encoded, keys, size, crop_scale, flip, pad):
  """The per-batch half of crop_window_fitting, in numpy on the host: rows whose `fits` is False
  get the general path.

  images uint8 [B, pad, pad, 3] (crop_window_fitting's crops in crop_slots' layout) and windows
  int32 [B, 3] (its windows, batched); fits bool [B]; encoded bytes [B] and keys int64 [B, 2]
  the examples' image bytes (only the unfit rows' are read: the pipeline ships b'' for the
  others) and keys. Returns numpy (images, windows), every row then random_crop_window's,
  zero-padded: the inputs themselves when every row fits, else copies with the unfit rows
  replaced.

  It runs in TrainIterator's host step, not in tf.data: there, a per-batch function holding the
  general path (a loop over the unfit rows, even under a cond that skips it) cost ~100 us per
  image of a 64-row batch whose rows all fit (benchmarks/benchmark_pipeline.py's ours_window
  row): a third of the decode. Here a batch that fits costs one numpy test, and each unfit row
  one call of the compiled general path (_general_row).
  """
  rows = np.flatnonzero(~np.asarray(fits, bool))
  if rows.size == 0:
    return images, windows
  # Copies: the caller's arrays stay as given (windows come read-only from tf.data).
  images, windows = np.array(images), np.array(windows)
  general = _general_row(size, tuple(float(c) for c in crop_scale), bool(flip), pad)
  for i in rows:
    image, window = general(tf.constant(encoded[i], tf.string), tf.constant(keys[i], tf.int64))
    h, w = image.shape[:2]
    images[i] = 0
    images[i, :h, :w] = image.numpy()
    windows[i] = window.numpy()
  return images, windows


def crop_slots(flat, hw, pad, dx=None):
  """The train pipeline's device-resize crops, laid out for the device: numpy uint8
  [B, pad, pad, 3], crop i's columns from dx[i] on at the top left of slot i, zeros around them.

  flat uint8 [n] holds the crops' bytes one after the other, crop i's (h, w) = hw[i] (int [B, 2])
  taking the next h * w * 3 of them, row-major [h, w, 3]; dx int [B] (None: zeros) are the
  leading columns that crop_window_aligned decoded beyond each crop.

  Deliberate: the padding happens here, in one numpy copy per crop, and not in tf.data, where
  padding each crop (tf.concat with zeros or tf.pad) and stacking the padded rows copied the
  padded bytes three times per batch (benchmarks/ab_pipeline.py measures the difference). The
  same copy drops the dx columns, which TF's decode would have dropped in a copy of its own.
  """
  hw = np.asarray(hw, np.int64).reshape(-1, 2)
  dx = np.zeros(len(hw), np.int64) if dx is None else np.asarray(dx, np.int64).reshape(-1)
  ends = np.cumsum(hw[:, 0] * hw[:, 1] * 3)
  width = hw[:, 1] - dx
  if (len(dx) != len(hw) or (ends[-1] if len(ends) else 0) != len(flat) or
      len(hw) and (hw.min() < 0 or dx.min() < 0 or width.min() < 0 or hw[:, 0].max() > pad
                   or width.max() > pad)):
    raise ValueError(f"crop_slots: shapes {hw.tolist()} less columns {dx.tolist()} do not fit "
                     f"pad={pad} or do not add up to the {len(flat)} bytes given.")
  images = np.zeros((len(hw), pad, pad, 3), np.uint8)
  start = 0
  for i, ((h, w), d, end) in enumerate(zip(hw.tolist(), dx.tolist(), ends.tolist())):
    images[i, :h, :w - d] = flat[start:end].reshape(h, w, 3)[:, d:]
    start = end
  return images


@functools.lru_cache(maxsize=None)
def _general_row(size, crop_scale, flip, pad):
  """_general_crop_window compiled once per setting, for one example (bytes, int64 [2] key)."""
  return tf.function(
      lambda encoded, key: _general_crop_window(encoded, key, size, crop_scale, flip, pad),
      input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)])


def random_crop_window(encoded, key, size, crop_scale, flip, pad):
  """random_resized_crop with the resize left to the device (data.resize_on='device'), for one
  example: crop_window_fitting, or the general path where it does not fit.

  Returns (uint8 [h, w, 3], int32 [3]): the same crop window, unflipped, and its (h, w, flip);
  the pipeline pads it to [pad, pad, 3] in each batch (crop_slots), and data/device_crop.py's
  resize_crop turns the pair into random_resized_crop's image (within 1 level at float-rounding
  ties).
  A crop larger than pad on either side, or of an image that is not a JPEG and does not fit, is
  flipped and resized here, and shipped with (size, size, 0). The train pipeline does the same
  in two halves (crop_window_fitting per example in tf.data, replace_unfit per batch on the
  host) to avoid a cond per example.
  """
  crop, window, fits = crop_window_fitting(encoded, key, crop_scale, flip, pad)
  image, window = tf.cond(fits, lambda: (crop, window),
                          lambda: _general_crop_window(encoded, key, size, crop_scale, flip, pad))
  image.set_shape([None, None, 3])
  window.set_shape([3])
  return image, window


def resize_center_crop(encoded, size):
  """Encoded image -> uint8 [size, size, 3]: short side to `size` (bicubic), centre crop.

  Same geometry as CLIPImageProcessor (long side = floor(size * long / short), crop offset
  (dim - size) // 2); bicubic with antialias approximates PIL's bicubic within a few levels
  (clip_image_preprocess is the exact PIL version).
  """
  image = tf.image.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.minimum(h, w)
  scale = size / tf.cast(short, tf.float64)
  new_h = tf.where(h == short, size, tf.cast(tf.cast(h, tf.float64) * scale, tf.int32))
  new_w = tf.where(h == short, tf.cast(tf.cast(w, tf.float64) * scale, tf.int32), size)
  image = tf.image.resize(image, [new_h, new_w], method="bicubic", antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return _to_uint8(image[top:top + size, left:left + size])


def resize_squash(encoded, size):
  """Encoded image -> uint8 [size, size, 3]: the whole image resized to the square (bicubic).

  No crop and the aspect ratio is not kept: SiglipImageProcessor's geometry and open_clip's
  resize_mode 'squash'. Bicubic with antialias approximates PIL's bicubic within a few levels.
  """
  image = tf.image.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  return _to_uint8(tf.image.resize(image, [size, size], method="bicubic", antialias=True))


# config.data.resize_mode -> the eval pipeline's resize (see EvalDataset).
RESIZE_MODES = {"crop": resize_center_crop, "squash": resize_squash}
# open_clip's preprocess_cfg resize_mode -> config.data.resize_mode.
_OPEN_CLIP_RESIZE = {"shortest": "crop", "squash": "squash"}


def resize_mode_of(open_clip_resize_mode: str) -> str:
  """config.data.resize_mode for an open_clip preprocess_cfg resize_mode.

  'shortest' (short side to S, centre crop) -> 'crop'; 'squash' -> 'squash'. ValueError names
  any other value ('longest', i.e. letterboxing, has no eval resize here).
  """
  if open_clip_resize_mode not in _OPEN_CLIP_RESIZE:
    raise ValueError(f"open_clip resize_mode={open_clip_resize_mode!r} has no "
                     f"config.data.resize_mode; supported: {sorted(_OPEN_CLIP_RESIZE)}.")
  return _OPEN_CLIP_RESIZE[open_clip_resize_mode]


def _resize_mode(data) -> str:
  """config.data.resize_mode ('crop' when absent); ValueError naming any other value."""
  mode = data.get("resize_mode", "crop") or "crop"
  if mode not in RESIZE_MODES:
    raise ValueError(f"config.data.resize_mode={mode!r} must be one of {sorted(RESIZE_MODES)}: "
                     "'crop' (short side to image_size, centre crop; CLIP) or 'squash' (the "
                     "whole image to image_size x image_size; SigLIP).")
  return mode


def clip_image_preprocess(images, size: int) -> np.ndarray:
  """CLIPProcessor's geometry in PIL: bicubic resize of the short side to `size`, centre crop.

  images: iterable of uint8 [H, W, 3] (or [H, W] / [H, W, 4], converted to RGB).
  Returns uint8 [N, size, size, 3] (unnormalised; equals CLIPImageProcessor with
  do_rescale=do_normalize=False).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for array in images:
    image = Image.fromarray(np.asarray(array)).convert("RGB")
    w, h = image.size
    if w <= h:
      new_w, new_h = size, int(size * h / w)
    else:
      new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out.append(np.asarray(image.crop((left, top, left + size, top + size)), np.uint8))
  return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


# ------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------


def _check_data_config(data):
  if data.views not in (1, 2):
    raise configs.ConfigError(f"config.data.views={data.views} must be 1 or 2.")
  if data.get("view", "random") not in VIEW_CHOICES:
    raise configs.ConfigError(
        f"config.data.view={data.view!r} must be one of {VIEW_CHOICES}: 'random' draws one of "
        "the product's views per example, 'first' always takes the first stored view.")
  lo, hi = data.augment.crop_scale
  if not 0 < lo <= hi <= 1:
    raise configs.ConfigError(f"config.data.augment.crop_scale={tuple(data.augment.crop_scale)} "
                              "must satisfy 0 < lo <= hi <= 1.")
  if not 0 <= data.mlm_prob <= 1:
    raise configs.ConfigError(f"config.data.mlm_prob={data.mlm_prob} must be in [0, 1].")
  if data.image_size < 1:
    raise configs.ConfigError(f"config.data.image_size={data.image_size} must be positive.")
  if not data.text_fields:
    raise configs.ConfigError("config.data.text_fields is empty.")
  if features.resize_on(data) == "device":
    features.crop_pad(data)
  cache = data.get("token_cache", features.DEFAULT_TOKEN_CACHE)
  if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
    raise configs.ConfigError(
        f"config.data.token_cache={cache!r} must be an integer >= 0: the distinct texts whose "
        "token rows are kept (features.TokenCache); 0 = off.")
  for key in ("vq_codes", "patch_features"):
    if data.get(key) and (tuple(data.augment.crop_scale) != (1.0, 1.0) or data.augment.flip):
      raise configs.ConfigError(
          f"config.data.{key}={data[key]!r} holds values of whole, unflipped views, but "
          f"augment is crop_scale={tuple(data.augment.crop_scale)}, flip={data.augment.flip}: "
          "use crop_scale=(1.0, 1.0) and flip=False.")


def _require_file(key, path):
  """FileNotFoundError naming config.data.<key> and the command that makes the file."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.data.{key}={path!r} does not exist. `python -m launch.prepare --config=CONFIG "
        f"--workdir=WORKDIR` makes it into WORKDIR/prepared/, and launch.train / launch.evaluate "
        f"with the same flags fill data.{key} from WORKDIR/prepared/manifest.json (leave the key "
        "empty, or 'prepared', for that); or point the key at an existing file.")


def _load_vq_codes(path, image_size):
  """(product_id -> row table, codes int32 [P, V, g*g]) from a prepare/vq_codes.py cache."""
  _require_file("vq_codes", path)
  with np.load(path) as f:
    ids, codes = f["product_id"], f["codes"].astype(np.int32)
    size = int(f["image_size"])
  if size != image_size:
    raise ValueError(f"config.data.vq_codes={path!r} was cached at {size} px but "
                     f"data.image_size={image_size}.")
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant([str(i) for i in ids]),
                                          tf.range(len(ids), dtype=tf.int64)), default_value=-1)
  return table, tf.constant(codes)


def _load_patch_features(path, image_size):
  """(product_id -> row table, features [N, V, P, F]) from prepare/patches.py."""
  _require_file("patch_features", path)
  with np.load(path) as f:
    ids, features = f["product_id"], f["features"]
    size = int(f["image_size"])
  if size != image_size:
    raise ValueError(f"config.data.patch_features={path!r} was cached at {size} px but "
                     f"data.image_size={image_size}.")
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant([str(i) for i in ids]),
                                          tf.range(len(ids), dtype=tf.int64)), default_value=-1)
  return table, tf.constant(features)


class TrainIterator:
  """Iterator of per-host training batches: a tf.data stage, then a host step in one thread.

  `dataset` makes every per-example feature (images, keys, tf.data's own threads);
  `host_step(step, batch) -> batch` is numpy on the host (tokenizer, masks), run for batch
  `step` = start_step, start_step + 1, ... in one background thread that keeps up to `depth`
  finished batches ready, so it overlaps the consumer (the trainer's step, the first batch the
  step's compilation). The thread starts when the iterator is made.

  The host step runs outside tf.data on purpose: as a tf.numpy_function inside a parallel map,
  deleting the iterator while one was starting deadlocked (the deleting thread holds the GIL and
  waits for the map's in-flight calls, which need the GIL). close(), which also runs when the
  iterator is garbage-collected and at interpreter exit, stops the thread's production and
  returns once it has stopped (within ~50 ms, or after the batch in flight); the thread then
  releases the tf.data iterator itself, renamed "fashion_jax-train-input-release", and ends.
  close() does not wait for that release: TF's iterator destructor waits out the autotuning
  thread's current optimisation period (it doubles up to a minute; 7-11 s after a 200-step
  smoke run), time in which nothing needs to wait. tests/test_pipeline.py re-creates iterators
  in a subprocess.

  An error in either stage is raised by the `next` call that would have returned its batch,
  with its own type, and again by every later call.

  Attributes:
    position: number of batches consumed so far (start_step + batches yielded); save it with
      the checkpoint and pass it back as start_step.
    num_examples: examples in one epoch over all hosts (host shard size * process_count).
    batch_size: per-host batch size.
    dataset, host_step: the two stages (host_step None: batches as tf.data makes them).
  """

  def __init__(self, dataset: tf.data.Dataset, start_step: int, num_examples: int,
               batch_size: int, host_step=None, depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1.")
    self.dataset, self.host_step = dataset, host_step
    self.position = start_step
    self.num_examples = num_examples
    self.batch_size = batch_size
    self._error = None
    self._results = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    stopped = threading.Event()
    # The thread owns the tf.data iterator and holds no reference to self: dropping the last
    # reference to self runs the finalizer (stop, wait for `stopped`), and the thread's exit
    # frees the tf.data iterator, which then has no Python call in flight to wait for.
    thread = threading.Thread(
        target=_produce, args=(dataset.as_numpy_iterator(), host_step, start_step,
                               self._results, self._stop, stopped),
        name=PRODUCER_THREAD, daemon=True)
    thread.start()
    self._stopped = stopped
    self._finalizer = weakref.finalize(self, _stop_producer, thread, self._stop, stopped,
                                       self._results)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._error is not None:
      raise self._error
    if not self._finalizer.alive:
      raise RuntimeError("This TrainIterator is closed; make a new one with "
                         f"make_train_iterator(config, start_step={self.position}).")
    while True:
      try:
        kind, value = self._results.get(timeout=1.0)
        break
      except queue.Empty:
        if self._stopped.is_set() and self._results.empty():
          kind, value = "error", RuntimeError("The train input thread ended without a batch, "
                                              "an error or the end of the data.")
          break
    if kind == "batch":
      self.position += 1
      return value
    self._error = StopIteration() if kind == "end" else value
    self.close()
    raise self._error

  def close(self) -> None:
    """Stops the host-step thread's batches; the thread then releases the tf.data iterator
    and ends on its own (see the class docstring). Idempotent."""
    self._finalizer()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _produce(it, host_step, step, results, stop, stopped):
  """TrainIterator's thread: ('batch', b) / ('end', None) / ('error', e) onto `results`.

  Sets `stopped` when it puts nothing more; the thread is then renamed RELEASE_THREAD and its
  exit releases `it`, the tf.data iterator, which only this thread's arguments hold.
  """
  def put(item):
    while not stop.is_set():
      try:
        results.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  try:
    while not stop.is_set():
      try:
        batch = next(it)
      except StopIteration:
        put(("end", None))
        return
      if not put(("batch", host_step(step, batch) if host_step is not None else batch)):
        return
      step += 1
  except Exception as e:  # pylint: disable=broad-except; re-raised by __next__ in the consumer.
    put(("error", e))
  finally:
    threading.current_thread().name = RELEASE_THREAD
    stopped.set()


def _stop_producer(thread, stop, stopped, results):
  stop.set()
  if thread is threading.current_thread():  # Collected by a gc pass in its own thread: it exits
    return  # at its next check of `stop`.
  stopped.wait()  # Its puts time out and see `stop` within 50 ms.
  while not results.empty():  # Free the batches it had ready.
    results.get_nowait()


def _check_example_spec(batch_spec, data, host_names) -> None:
  """The tf.data stage's per-example features against their declarations in data/features.py.

  `batch_spec` is the tf.data stage's batch spec; every key but the host step's inputs
  (`host_names`) is a per-example feature, made per example or, elementwise, per batch (the
  keys), and is compared without its batch axis. A mismatch is a bug in this module
  (RuntimeError when the dataset is built): feature_spec, and the config check built on it,
  describe batches by those declarations.
  """
  declared = {f.name: f for f in features.example_features(data) if f.enabled}
  made = {k: tf.TensorSpec(v.shape[1:], v.dtype) for k, v in batch_spec.items()
          if k not in host_names}
  wrong = sorted(set(made) ^ set(declared)) + sorted(
      k for k in set(made) & set(declared)
      if np.dtype(made[k].dtype.as_numpy_dtype) != declared[k].dtype
      or not made[k].shape.is_compatible_with(declared[k].shape))
  if wrong:
    raise RuntimeError(f"The per-example features {wrong} differ from their declarations in "
                       f"data/features.py: made {made}, declared "
                       f"{ {k: f.spec() for k, f in declared.items()} }.")


def _example_keys(seed, process_index):
  """p -> int64 [4, 2]: example p's stateless keys, stateless_split(stateless_fold_in([seed,
  process_index], p), 4).

  fold_in's first word depends on the seed alone, so it is drawn once here, and each example
  runs one RNG op instead of two (bitwise the same keys; tests/test_pipeline.py).
  """
  fold_word = tf.random.stateless_uniform([], tf.constant([seed, process_index], tf.int64),
                                          minval=None, maxval=None, dtype=tf.int64)
  return lambda p: tf.random.stateless_uniform([4, 2], tf.stack([fold_word, p]), minval=None,
                                               maxval=None, dtype=tf.int64)


def _numpy_rng(*keys) -> np.random.Generator:
  return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def make_train_iterator(config, *, start_step: int = 0, process_index=None, process_count=None
                        ) -> TrainIterator:
  """Per-host training batches from step `start_step` on (see the module docstring)."""
  data = config.data
  _check_data_config(data)
  process_index, process_count = _processes(process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f"Global batch_size={config.batch_size} is not divisible by "
                     f"process_count={process_count}.")
  batch = config.batch_size // process_count
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  # Per iterator: texts recur every epoch, so from the second epoch on the host step reads rows.
  cached_tok = features.TokenCache(tok, data.get("token_cache", features.DEFAULT_TOKEN_CACHE))
  tag_fields = tuple(data.get("tag_fields", ()))
  multi_fields = features.multi_fields(data)
  size, views, seed = int(data.image_size), int(data.views), int(config.seed)
  matcher = None
  if data.get("attributes"):
    matcher = attributes_lib.Matcher(attributes_lib.load_vocabulary(data.attributes))
  # The host ops (data/features.py), validated now, not inside tf.data.
  host_ops = features.host_features(data, tok, matcher=matcher)
  vq = _load_vq_codes(data.vq_codes, size) if data.get("vq_codes") else None
  cached = (_load_patch_features(data.patch_features, size) if data.get("patch_features")
            else None)
  crop_scale, flip = tuple(data.augment.crop_scale), bool(data.augment.flip)
  first_view = data.get("view", "random") == "first"

  builder = _builder(data)
  split, n, _, _ = _host_shard(builder, data.train_split, process_index, process_count, True)
  if n == 0:
    raise ValueError(f"Host {process_index}/{process_count} has no examples of "
                     f"{data.name}:{data.train_split}.")
  # Every field but the images is taken per batch in `batched`, outside the per-row loop: the
  # key fields are hashed (elementwise: the same values, one op per batch instead of one per
  # example), and the text fields go on to the host step, which joins them.
  key_fields = ("product_id", "subcategory")
  dataset_fields = builder.info.features
  _check_fields(dataset_fields, (*data.text_fields, *key_fields))
  if multi_fields:
    _check_fields(dataset_fields, multi_fields, "config.data.fields")
  weight_fields = (data.pair_weight_field,) if data.get("pair_weight_field") else ()
  _check_fields(dataset_fields, weight_fields, "config.data.pair_weight_field")
  _check_fields(dataset_fields, tag_fields, "config.data.tag_fields")
  example_keys = _example_keys(seed, process_index)
  pad = features.crop_pad(data) if features.resize_on(data) == "device" else 0
  # The fields that replace_unfit finishes, padded per batch into [pad, pad, 3] slots.
  unfit_names = ("image", "image2")[:views] if pad else ()

  def image_field(out, name, encoded, key):
    if pad:  # The unfit rows' bytes and keys ride along for replace_unfit in the host step.
      crop, out[name + features.WINDOW_SUFFIX], fits, out[_CROP_DX + name] = (
          crop_window_aligned(encoded, key, crop_scale, flip, pad, _DECODE_ALIGN))
      # Flat: tf.data copies only the crop's bytes (no padding), once, when `batched`
      # concatenates the batch's; the host step copies them into zeroed slots (crop_slots).
      out[_CROP + name] = tf.reshape(crop, [-1])
      out[_CROP_HW + name] = tf.shape(crop)[:2]
      out[_UNFIT + name] = (fits, tf.where(fits, "", encoded), key)
    else:
      out[name] = random_resized_crop(encoded, key, size, crop_scale, flip)

  def example(stored, p, start, count):
    # Per row, only what differs per image: the view draws and the crops. `stored` holds the
    # batch's stored views one product after another: this row's `count` start at `start`.
    keys = tf.unstack(example_keys(p))
    v1 = (tf.constant(0, tf.int64) if first_view else
          tf.random.stateless_uniform([], keys[0], 0, count, dtype=tf.int64))
    out = {}
    image_field(out, "image", tf.gather(stored, start + v1), keys[1])
    if views == 2:
      other = tf.random.stateless_uniform([], keys[2], 0, tf.maximum(count - 1, 1),
                                          dtype=tf.int64)
      v2 = tf.where(count > 1, (v1 + 1 + other) % count, v1)
      image_field(out, "image2", tf.gather(stored, start + v2), keys[3])
    if vq is not None or cached is not None:
      out[_VIEW] = v1
    return out

  def view_rows(table, message, ex, v1):
    # The cached per-view rows of `table` (product id -> row, [rows, views, ...]) for the views
    # drawn: one lookup and one gather per batch.
    row = table[0].lookup(ex["product_id"])
    tf.debugging.assert_non_negative(row, message=message)
    return tf.gather_nd(table[1], tf.stack([tf.maximum(row, 0), v1], 1))

  def host_step(step, b):
    for name in unfit_names:
      window = name + features.WINDOW_SUFFIX
      images = crop_slots(b.pop(_CROP + name), b.pop(_CROP_HW + name), pad,
                          b.pop(_CROP_DX + name))
      b[name], b[window] = replace_unfit(images, b[window], *b.pop(_UNFIT + name), size,
                                         crop_scale, flip, pad)
    columns = [b[_HOST + "text/" + f] for f in data.text_fields]
    for f in set(data.text_fields):
      del b[_HOST + "text/" + f]
    texts = join_text_columns(columns)
    none = np.zeros((len(texts), 0), object)
    ctx = features.Context(rng=_numpy_rng(seed, process_index, step, 0x6D61736B), texts=texts,
                           tags=b.pop(_HOST + "tags", none), tokenizer=cached_tok, step=step,
                           fields=b.pop(_HOST + "fields", none))
    b.update(zip((op.name for op in host_ops), features.compute(host_ops, ctx)))
    return b

  def batched(p, ex):
    # One call per batch: `example` for each row (map_rows), and the per-batch work, which
    # takes each field whole.
    images = ex[schema.IMAGES]  # Ragged [batch, None]: each product's stored views.
    b = map_rows(functools.partial(example, images.values), batch, p, images.row_splits[:-1],
                 images.row_lengths(), concat=[_CROP + name for name in unfit_names])
    b["product_key"] = _hash32(ex["product_id"])
    b["subcategory_key"] = _hash32(ex["subcategory"])
    b.update({_HOST + "text/" + f: ex[f] for f in data.text_fields})
    if tag_fields:
      b[_HOST + "tags"] = tf.stack([ex[f] for f in tag_fields], 1)
    if multi_fields:
      b[_HOST + "fields"] = tf.stack([ex[f] for f in multi_fields], 1)
    if weight_fields:  # Per-pair relevance score (losses/pair_weights.py).
      b["pair_weight"] = tf.strings.to_number(ex[data.pair_weight_field], tf.float32)
    if vq is not None:
      b["vq_codes"] = view_rows(
          vq, "config.data.vq_codes has no codes for a product of the train split", ex,
          b[_VIEW])
    if cached is not None:
      b["patch_features"] = tf.cast(view_rows(
          cached, "config.data.patch_features has no features for a product of the train "
          "split", ex, b[_VIEW]), tf.float32)
    b.pop(_VIEW, None)
    return b

  ds = example_stream(builder, split,
                      (schema.IMAGES, *key_fields, *data.text_fields, *tag_fields, *multi_fields,
                       *weight_fields),
                      seed=seed, process_index=process_index,
                      shuffle_buffer=int(data.shuffle_buffer), start=start_step * batch,
                      batch=batch)
  ds = ds.map(batched, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # The host step's slots (crop_slots) stand in for the crops it lays out.
  spec = {**ds.element_spec,
          **{name: tf.TensorSpec([batch, pad, pad, 3], tf.uint8) for name in unfit_names}}
  _check_example_spec(spec, data,
                      {k for k in spec if k.startswith((_HOST, _UNFIT, _CROP, _CROP_HW, _CROP_DX))})
  ds = ds.prefetch(int(data.prefetch) if data.prefetch else tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return TrainIterator(ds, start_step, n * process_count, batch, host_step)


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


class EvalDataset:
  """Padded evaluation batches of one split; every host yields `num_batches` batches.

  Batch: image uint8 [B, S, S, 3] (first view; config.data.resize_mode 'crop' (default):
  resize_center_crop, CLIP's geometry; 'squash': resize_squash, SigLIP's), text int32 [B, L],
  text_mask bool [B, L], valid bool [B] (False on padding rows), index int32 [B] (position
  within the split; -1 on padding rows), and each requested raw field as a numpy object array
  of python str ('' on padding rows).
  Attributes: num_examples (whole split), host_num_examples, host_offset, num_batches.
  """

  def __init__(self, config, split, *, batch_size, fields=(), process_index=None,
               process_count=None):
    data = config.data
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    self.process_index, self.process_count = _processes(process_index, process_count)
    self.batch_size, self.fields, self.split = int(batch_size), tuple(fields), split
    self.size = int(data.image_size)
    self.resize_mode = _resize_mode(data)
    self._text_fields = tuple(data.text_fields)
    self._tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
    self._builder = _builder(data)
    available = set(self._builder.info.features.keys())
    missing = [f for f in self.fields + self._text_fields if f not in available]
    if missing:
      raise KeyError(f"Fields {missing} are not in {data.name}; it has {sorted(available)}.")
    self._split, self.host_num_examples, self.host_offset, sizes = _host_shard(
        self._builder, split, self.process_index, self.process_count, False)
    self.num_examples = sum(sizes)
    self.num_batches = math.ceil(max(sizes) / self.batch_size) if sizes else 0

  def __len__(self):
    return self.num_batches

  def _dataset(self):
    # Plain locals, not `self`: autograph cannot convert a closure over `self` and says so.
    size, text_fields, fields = self.size, self._text_fields, self.fields
    resize = RESIZE_MODES[self.resize_mode]

    def example(ex):
      out = dict(image=resize(ex[schema.IMAGES][0], size),
                 text=_join_text(ex, text_fields))
      out.update({f"raw/{f}": ex[f] for f in fields})
      return out
    ds = read_examples(self._builder, self._split, (schema.IMAGES, *text_fields, *fields)).map(
        example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(self.batch_size).prefetch(2)

  def __iter__(self):
    b, seen = self.batch_size, 0
    it = self._dataset().as_numpy_iterator()
    for _ in range(self.num_batches):
      chunk = next(it, None)
      n = 0 if chunk is None else len(chunk["text"])
      texts = [] if chunk is None else chunk["text"].tolist()
      ids, mask = self._tok(texts + [""] * (b - n), with_mask=True)
      image = np.zeros((b, self.size, self.size, 3), np.uint8)
      if n:
        image[:n] = chunk["image"]
      out = dict(image=image, text=ids, text_mask=mask & (np.arange(b) < n)[:, None],
                 valid=np.arange(b) < n,
                 index=np.where(np.arange(b) < n,
                                self.host_offset + seen + np.arange(b), -1).astype(np.int32))
      for f in self.fields:
        raw = np.full(b, "", dtype=object)
        if n:
          raw[:n] = [s.decode("utf-8", "replace") for s in chunk[f"raw/{f}"]]
        out[f] = raw
      seen += n
      yield out


def make_eval_dataset(config, split, *, batch_size, fields=(), process_index=None,
                      process_count=None) -> EvalDataset:
  """Padded per-host evaluation batches of `split` (see EvalDataset)."""
  return EvalDataset(config, split, batch_size=batch_size, fields=fields,
                     process_index=process_index, process_count=process_count)
