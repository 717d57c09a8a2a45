"""Can an evaluation run on config.data's dataset? Answered before training, from the TFDS files.

`problem(data, need)` -> None, or why the evaluation described by `need` (base.DataNeed) cannot
run on the dataset `data.name` in `data.data_dir` (the dataset the input pipeline reads):
  * the split does not exist              -> names the split and the splits that exist;
  * the split has fewer than min_examples -> names its size and what needs more;
  * a field is not a feature              -> names the field and the dataset's fields;
  * a labelled field is '' in every example of the split -> names the field, the split and the
    fields that do have values there.
`warning(data, need)` -> None, or a note for a split smaller than `need.warn_below`.

Cost: the split list, sizes and fields come from the dataset's metadata (no record is read). A
labelled field is read (text only, no image decoded) up to its FIRST non-empty value, so a
labelled dataset answers after one record; only a field that is empty everywhere is read to the
end of the split. Answers are cached per process.

TensorFlow Datasets is imported when a question is first asked, not when this module is
imported: the config check (train/config_check.py) and the evaluator modules import this module,
and search/api users of those must not pay for TensorFlow.
"""

import functools
from typing import Any, NamedTuple

from fashion_jax.data import registry
from fashion_jax.evaluate import base


class DatasetInfo(NamedTuple):
  name: str
  splits: dict[str, int]     # split -> number of examples
  fields: tuple[str, ...]    # scalar text features, sorted


@functools.lru_cache(maxsize=64)
def dataset_info(name: str, data_dir: str = "") -> DatasetInfo:
  """Splits (with sizes) and scalar text fields of a built dataset, from its metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = registry.prepared_builder(name, data_dir)
  fields = tuple(sorted(k for k, f in b.info.features.items()
                        if isinstance(f, tfds.features.Text)))
  splits = {s: int(info.num_examples) for s, info in b.info.splits.items()}
  return DatasetInfo(b.info.full_name, splits, fields)


def _split_size(name: str, data_dir: str, split: str) -> int | None:
  """Examples in `split` (a tfds slice such as 'test[:50%]' too); None if it does not exist."""
  info = dataset_info(name, data_dir)
  if split in info.splits:
    return info.splits[split]
  if split.split("[")[0] not in info.splits:
    return None
  try:
    return int(registry.prepared_builder(name, data_dir).info.splits[split].num_examples)
  except (ValueError, KeyError):
    return None


def _texts(name: str, data_dir: str, split: str, fields: tuple[str, ...]):
  """Iterator of {field: str} over the split, in file order, images never decoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = registry.prepared_builder(name, data_dir)
  skip = {k: tfds.decode.SkipDecoding() for k in b.info.features.keys() if k not in fields}
  ds = b.as_dataset(split=split, shuffle_files=False, decoders=skip or None)
  ds = ds.map(lambda ex: {f: ex[f] for f in fields})
  for ex in ds.as_numpy_iterator():
    yield {f: ex[f].decode("utf-8", "replace") for f in fields}


@functools.lru_cache(maxsize=256)
def has_value(name: str, data_dir: str, split: str, field: str) -> bool:
  """Whether some example of the split has a non-empty `field` (reads up to the first one)."""
  return any(ex[field] for ex in _texts(name, data_dir, split, (field,)))


def fields_with_values(name: str, data_dir: str, split: str) -> list[str]:
  """The text fields that are non-empty in at least one example of the split (a full read)."""
  fields = dataset_info(name, data_dir).fields
  seen = set()
  for ex in _texts(name, data_dir, split, fields):
    seen.update(f for f in fields if ex[f])
    if len(seen) == len(fields):
      break
  return sorted(seen)


def _data(data: Any) -> tuple[str, str]:
  return str(data.name), str(data.get("data_dir", "") or "")


def split_exists(data: Any, split: str) -> bool:
  """Whether the dataset of `data` (config.data) has `split` (a tfds slice counts)."""
  return _split_size(*_data(data), split) is not None


def problem(data: Any, need: base.DataNeed) -> str | None:
  """Why the evaluation `need` cannot run on the dataset of `data` (config.data), or None."""
  name, data_dir = _data(data)
  info = dataset_info(name, data_dir)
  size = _split_size(name, data_dir, need.split)
  if size is None:
    return (f"dataset {info.name} has no split {need.split!r}; its splits are "
            f"{sorted(info.splits)}")
  if size < need.min_examples:
    return (f"split {need.split!r} of {info.name} has {size} example(s); "
            f"{need.why or 'this evaluation'} needs at least {need.min_examples}")
  missing = [f for f in need.fields + need.labelled if f not in info.fields]
  if missing:
    return (f"dataset {info.name} has no field {missing[0]!r} (split {need.split!r}); its "
            f"fields are {list(info.fields)}")
  for field in need.labelled:
    if not has_value(name, data_dir, need.split, field):
      return (f"field {field!r} is empty in all {size} examples of split {need.split!r} of "
              f"{info.name}, so there is no label to evaluate; the fields with values there "
              f"are {fields_with_values(name, data_dir, need.split)}")
  return None


def warning(data: Any, need: base.DataNeed) -> str | None:
  """A note when the split of `need` has fewer than `need.warn_below` examples, else None."""
  name, data_dir = _data(data)
  size = _split_size(name, data_dir, need.split)
  if size is not None and size < need.warn_below:
    return (f"split {need.split!r} of {dataset_info(name, data_dir).name} has only {size} "
            f"example(s): {need.why or 'its metrics are unreliable'}")
  return None
