"""Training input of FashionViL's downstream tasks, and the label vocabularies they share.

`make_train_iterator(config, *, start_step, process_index, process_count)` follows the
trainer's iterator contract (train/loop.py) and dispatches on `config.objective.task`:

  retrieval  the product pipeline unchanged (data/pipeline.py): image, text, text_mask.
  cls        the product pipeline plus `label_<field>` int32 [b] for each of
             `objective.label_fields` (index into `label_vocabulary`; -1 when the example's
             value is '' or absent from the train split). The pipeline's `subcategory_key` (a
             hash of the sub-category string) is mapped to the sub-category's index, and a
             category label to the category of that sub-category (each sub-category of the train
             split must lie in exactly one category: checked).
  tgir       FashionIQ triplets (data/builders/fashioniq.py `triplets`, split data.train_split):
             image uint8 [b, S, S, 3] the reference (candidate) image, target_image uint8
             [b, S, S, 3], text / text_mask [b, L] the relative captions joined with ", ".
  ocir       Polyvore outfits (data.outfits, e.g. 'polyvore_outfits/nondisjoint_outfits'; item
             images and categories from data.name, the `_items` config of the same version). Per
             outfit one item, drawn uniformly, is the blank: target_image [b, S, S, 3],
             target_cat int32 [b]; the others (first objective.max_items - 1 in outfit order)
             are the query: items uint8 [b, M, S, S, 3], item_cats int32 [b, M], item_mask
             bool [b, M]. The train items' encoded images are held in host memory (~15 KB per
             Polyvore item).

Images are resized (short side) and centre-cropped to data.image_size (pipeline.
resize_center_crop); no augmentation in tgir / ocir (FashionIQ captions speak of left/right,
and the outfit task is about the whole item). Order and resumption follow the pipeline's rule:
host i reads the contiguous shard i of the split (remainder dropped), epochs shuffled with a
seeded buffer shuffle per (seed, host, epoch), every random choice a stateless function of the
global stream position p = step * b + row, so start_step=n yields exactly batches n, n+1, ...
"""

import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fashion_jax.data import pipeline
from fashion_jax.data import registry
from fashion_jax.data import tokenizers

UNKNOWN = "<unknown>"


def builder(name: str, data_dir: str = ""):
  """The prepared TFDS builder `name` ('fashioniq/triplets', ...); a clear error if not built."""
  return registry.prepared_builder(name, data_dir, build_flags="--data_dir=DIR --manual_dir=...")


@functools.lru_cache(maxsize=32)
def field_values(name: str, data_dir: str, split: str, fields: tuple[str, ...]
                 ) -> dict[str, np.ndarray]:
  """{field: object [N] of str} of scalar text fields of a split, in file order, no image
  decoded (cached per process)."""
  b = builder(name, data_dir)
  feats = b.info.features
  missing = [f for f in fields if f not in feats]
  if missing:
    raise KeyError(f"Fields {missing} are not in {name}; it has {sorted(feats.keys())}.")
  skip = {k: tfds.decode.SkipDecoding() for k in feats.keys() if k not in fields}
  ds = b.as_dataset(split=split, shuffle_files=False, decoders=skip or None)
  ds = ds.map(lambda ex: {f: ex[f] for f in fields})
  out = {f: [] for f in fields}
  for ex in ds.as_numpy_iterator():
    for f in fields:
      out[f].append(ex[f].decode("utf-8"))
  return {f: np.asarray(v, dtype=object) for f, v in out.items()}


def label_vocabulary(config, field: str) -> tuple[str, ...]:
  """Sorted distinct non-empty values of `field` in config.data.name's train split."""
  values = field_values(config.data.name, config.data.data_dir, config.data.train_split,
                        (field,))[field]
  vocab = tuple(sorted({str(v) for v in values if v}))
  if len(vocab) < 2:
    raise ValueError(f"{config.data.name}:{config.data.train_split} has {len(vocab)} distinct "
                     f"non-empty {field!r} values; classification needs >= 2.")
  return vocab


def labels_of(values, vocab) -> np.ndarray:
  """str values [N] -> int32 indices into vocab, -1 for '' and values not in vocab."""
  index = {v: i for i, v in enumerate(vocab)}
  return np.asarray([index.get(str(v), -1) for v in values], np.int32)


def category_vocabulary(config) -> tuple[str, ...]:
  """OCIR categories: sorted semantic categories of the train items, then UNKNOWN (last)."""
  values = field_values(config.data.name, config.data.data_dir, config.data.train_split,
                        ("category",))["category"]
  return tuple(sorted({str(v) for v in values if v})) + (UNKNOWN,)


def category_index(values, vocab) -> np.ndarray:
  """Categories [N] -> int32 indices; '' and unseen categories -> the UNKNOWN slot."""
  index = {v: i for i, v in enumerate(vocab[:-1])}
  return np.asarray([index.get(str(v), len(vocab) - 1) for v in values], np.int32)


def _hash32(strings) -> np.ndarray:
  """The pipeline's string key (tf.strings.to_hash_bucket_fast(s, 2^31 - 1)) of each string."""
  return tf.strings.to_hash_bucket_fast(tf.constant(list(strings), tf.string),
                                        2**31 - 1).numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Iterators.
# ------------------------------------------------------------------------------------------------
class _Mapped:
  """An iterator whose batches are `finish(batch)`, keeping `position` / `num_examples`."""

  def __init__(self, inner, finish):
    self._inner, self._finish = inner, finish
    self.num_examples, self.batch_size = inner.num_examples, inner.batch_size

  @property
  def position(self):
    return self._inner.position

  def __iter__(self):
    return self

  def __next__(self):
    return self._finish(next(self._inner))

  def close(self):
    self._inner.close()


def _host(config, process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if config.batch_size % process_count:
    raise ValueError(f"Global batch_size={config.batch_size} is not divisible by "
                     f"process_count={process_count}.")
  return process_index, process_count, config.batch_size // process_count


def _stream(config, b, split, fields, decoders, example, start_step, process_index,
            process_count):
  """(tf.data batches of `example(key, ex)`, host shard size, per-host batch): `fields` of this
  host's slice of `split` in pipeline.example_stream's order (module docstring)."""
  process_index, process_count, batch = _host(config, process_index, process_count)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if split not in b.info.splits:
    raise ValueError(f"Dataset {b.info.full_name} has no split {split!r}; it has "
                     f"{sorted(b.info.splits)}.")
  sub = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
  n = b.info.splits[sub].num_examples
  if n == 0:
    raise ValueError(f"Host {process_index}/{process_count} has no examples of "
                     f"{b.info.full_name}:{split}.")
  seed = int(config.seed)
  ds = pipeline.example_stream(b, sub, fields, seed=seed, process_index=process_index,
                               shuffle_buffer=int(config.data.shuffle_buffer),
                               start=start_step * batch, decoders=decoders)
  base = tf.constant([seed, process_index], tf.int64)
  ds = ds.map(lambda p, ex: example(tf.random.experimental.stateless_fold_in(base, p), ex),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(int(config.data.prefetch) or 2)
  return ds, n * process_count, batch


def _tgir_iterator(config, start_step, process_index, process_count):
  data = config.data
  size = int(data.image_size)
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  b = builder(data.name, data.data_dir)
  if "caption" not in b.info.features:
    raise ValueError(f"task 'tgir' reads FashionIQ triplets; data.name={data.name!r} has no "
                     "'caption' (use 'fashioniq/triplets').")
  skip = tfds.decode.SkipDecoding()

  def example(_, ex):
    return {"image": pipeline.resize_center_crop(ex["candidate_image"], size),
            "target_image": pipeline.resize_center_crop(ex["target_image"], size),
            "caption": ex["caption"]}

  def finish(batch):
    ids, mask = tok(batch.pop("caption").tolist(), with_mask=True)
    return {**batch, "text": ids, "text_mask": mask}

  ds, n, per_host = _stream(config, b, data.train_split,
                            ("candidate_image", "target_image", "caption"),
                            {"candidate_image": skip, "target_image": skip}, example,
                            start_step, process_index, process_count)
  return pipeline.TrainIterator(ds, start_step, n, per_host, lambda _, b: finish(b))


def _ocir_iterator(config, start_step, process_index, process_count):
  data = config.data
  size, max_items = int(data.image_size), int(config.objective.max_items)
  if max_items < 2:
    raise ValueError(f"objective.max_items={max_items} must be >= 2 (query items + blank).")
  vocab = category_vocabulary(config)
  items = builder(data.name, data.data_dir)
  if "product_id" not in items.info.features:
    raise ValueError(f"task 'ocir': data.name={data.name!r} must be a Polyvore `_items` config.")
  ids, jpegs, cats = [], [], []
  ds = items.as_dataset(split=data.train_split, shuffle_files=False,
                        decoders={"images": tfds.decode.SkipDecoding()})
  for ex in ds.map(lambda e: {"id": e["product_id"], "jpeg": e["images"][0],
                              "category": e["category"]}).as_numpy_iterator():
    ids.append(ex["id"].decode())
    jpegs.append(ex["jpeg"])
    cats.append(ex["category"].decode())
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.range(len(ids), dtype=tf.int64)),
      default_value=-1)
  jpeg_t = tf.constant(jpegs)
  cat_t = tf.constant(category_index(cats, vocab))
  outfits = builder(data.outfits, data.data_dir)

  def example(key, ex):
    rows = table.lookup(ex["item_ids"])
    tf.debugging.assert_non_negative(
        rows, message="an outfit item is not among data.name's train items")
    n = tf.shape(rows, out_type=tf.int32)[0]
    blank = tf.random.stateless_uniform([], key, 0, n, dtype=tf.int32)
    others = tf.concat([rows[:blank], rows[blank + 1:]], 0)[:max_items]
    k = tf.shape(others)[0]
    load = lambda r: pipeline.resize_center_crop(jpeg_t[r], size)
    images = tf.map_fn(load, others, fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    images = tf.pad(images, [[0, max_items - k], [0, 0], [0, 0], [0, 0]])
    images.set_shape([max_items, size, size, 3])
    item_cats = tf.pad(tf.gather(cat_t, others), [[0, max_items - k]])
    item_cats.set_shape([max_items])
    return {"items": images, "item_cats": item_cats, "item_mask": tf.range(max_items) < k,
            "target_image": load(rows[blank]), "target_cat": tf.gather(cat_t, rows[blank])}

  ds, n, per_host = _stream(config, outfits, data.train_split, ("item_ids",), None, example,
                            start_step, process_index, process_count)
  return pipeline.TrainIterator(ds, start_step, n, per_host)


def _cls_iterator(config, start_step, process_index, process_count):
  fields = tuple(config.objective.label_fields)
  inner = pipeline.make_train_iterator(config, start_step=start_step,
                                       process_index=process_index, process_count=process_count)
  vocab = {f: label_vocabulary(config, f) for f in fields}
  subs = label_vocabulary(config, "subcategory")
  values = field_values(config.data.name, config.data.data_dir, config.data.train_split,
                        ("subcategory", "category"))
  parent = {}
  for sub, cat in zip(values["subcategory"], values["category"]):
    if sub and parent.setdefault(sub, cat) != cat:
      raise ValueError(f"Sub-category {sub!r} lies in two categories ({parent[sub]!r}, {cat!r}); "
                       "labels cannot be derived from the pipeline's subcategory_key.")
  keys = _hash32(subs)
  if len(set(keys.tolist())) != len(keys):
    raise ValueError("Two sub-category strings share a 31-bit hash; cannot map labels.")
  tables = {}
  for f in fields:
    if f == "subcategory":
      targets = labels_of(subs, vocab[f])
    elif f == "category":
      targets = labels_of([parent[s] for s in subs], vocab[f])
    else:
      raise ValueError(f"objective.label_fields has {f!r}; the train pipeline labels only "
                       "'subcategory' and 'category'.")
    tables[f] = dict(zip(keys.tolist(), targets.tolist()))

  def finish(batch):
    k = np.asarray(batch["subcategory_key"]).astype(np.int64).tolist()
    for f in fields:
      batch[f"label_{f}"] = np.asarray([tables[f].get(x, -1) for x in k], np.int32)
    return batch

  return _Mapped(inner, finish)


def make_train_iterator(config, *, start_step: int = 0, process_index=None, process_count=None):
  """The training batches of config.objective.task (see the module docstring)."""
  task = config.objective.task
  kwargs = dict(start_step=start_step, process_index=process_index, process_count=process_count)
  if task == "retrieval":
    return pipeline.make_train_iterator(config, **kwargs)
  fn = {"tgir": _tgir_iterator, "ocir": _ocir_iterator, "cls": _cls_iterator}.get(task)
  if fn is None:
    raise ValueError(f"objective.task={task!r}; use retrieval, tgir, cls or ocir.")
  return fn(config, start_step, process_index, process_count)
