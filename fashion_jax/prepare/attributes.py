"""FashionViL's pseudo-attribute vocabulary (PAC) mined from a built dataset.

The mining and matching themselves are data/attributes.py (`mine`, `Matcher`, the vocabulary
file); this module reads the texts of a dataset split and writes the file.

As a prepared artefact (`make`, called by launch.prepare): the train split's texts joined as the
training pipeline joins them (data.text_fields), mined with data/attributes.py's defaults, to
<workdir>/prepared/attributes.txt; launch.train fills data.attributes with it.

Alone, next to the dataset (the TFDS builder's data_dir) or at --out:
  python -m fashion_jax.prepare.attributes --dataset=synthetic_catalog/smoke [--data_dir=DIR] \
      [--out=PATH] [--min_df=5 --max_df_frac=0.5 --max_n=3 --max_attributes=2232]
"""

import argparse
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fashion_jax.data import attributes as attributes_lib
from fashion_jax.data import pipeline
from fashion_jax.prepare import manifest

FILENAME = "pseudo_attributes.txt"  # `main`'s default file name, next to the dataset.


def dataset_texts(name: str, data_dir: str = "", split: str = "train",
                  text_fields: Sequence[str] = ("title", "description")) -> list[str]:
  """The joined text fields of every product of a built TFDS split (as the pipeline joins)."""
  data = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir))
  builder = pipeline._builder(data)  # pylint: disable=protected-access
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"images": tfds.decode.SkipDecoding()})
  join = pipeline._join_text  # pylint: disable=protected-access
  ds = ds.map(lambda ex: join(ex, tuple(text_fields)), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  return [t.decode("utf-8", "replace") for t in ds.as_numpy_iterator()]


def vocabulary_path(name: str, data_dir: str = "") -> str:
  """<the builder's data_dir>/pseudo_attributes.txt: where `main` writes by default."""
  data = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir))
  builder = pipeline._builder(data)  # pylint: disable=protected-access
  return os.path.join(os.fspath(builder.data_dir), FILENAME)


def mine_and_save(texts: Sequence[str], out: str, **mining) -> tuple[str, str]:
  """Mines `texts` (data/attributes.mine's keyword arguments) into `out`: (path, summary).

  Raises manifest.PrepareError when nothing passes the filters (an empty vocabulary trains no
  PAC head), naming the product count and the mining parameters.
  """
  vocab = attributes_lib.mine(texts, **mining)
  if not vocab:
    raise manifest.PrepareError(f"No pseudo-attribute passes the filters on {len(texts)} products "
                     f"({mining or 'the defaults of data/attributes.mine'}): lower min_df or "
                     "switch PAC off (objective.tasks.pac=0).")
  path = attributes_lib.save_vocabulary(vocab, out)
  counts = attributes_lib.Matcher([g for g, _ in vocab])(texts).sum(1)
  return path, (f"{len(vocab)} pseudo-attributes from {len(texts)} products; attributes per "
                f"product: mean {counts.mean():.2f}, none {np.mean(counts == 0):.1%}")


def make(config: ml_collections.ConfigDict, out: str) -> dict:
  """The prepared artefact: config.data's train split mined into `out` (module docstring).

  Returns the manifest's `summary` and `options` of the artefact.
  """
  data = config.data
  texts = dataset_texts(data.name, data.get("data_dir", ""), data.get("train_split", "train"),
                        tuple(data.text_fields))
  tmp = out + ".tmp"
  _, summary = mine_and_save(texts, tmp)
  os.replace(tmp, out)
  return dict(summary=summary, options={})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, help="TFDS name, e.g. synthetic_catalog/smoke")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--split", default="train")
  parser.add_argument("--text_fields", default="title,description")
  parser.add_argument("--max_n", type=int, default=3)
  parser.add_argument("--min_df", type=int, default=5)
  parser.add_argument("--max_df_frac", type=float, default=0.5)
  parser.add_argument("--max_attributes", type=int, default=2232)
  parser.add_argument("--out", default="", help="default: next to the dataset")
  args = parser.parse_args(argv)
  texts = dataset_texts(args.dataset, args.data_dir, args.split, args.text_fields.split(","))
  path, summary = mine_and_save(
      texts, args.out or vocabulary_path(args.dataset, args.data_dir), max_n=args.max_n,
      min_df=args.min_df, max_df_frac=args.max_df_frac, max_attributes=args.max_attributes)
  print(f"{summary} -> {path}")
  return path


if __name__ == "__main__":
  main()
