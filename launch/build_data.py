r"""Build a fashion_jax TFDS dataset offline, or write a derived set in a real on-disk format.

Build a dataset (data dir: --data_dir, else tfds's default: $TFDS_DATA_DIR or ~/tensorflow_datasets):
    python -m launch.build_data --dataset=synthetic_catalog/smoke          # < 60 s on 2 cores
    python -m launch.build_data --dataset=synthetic_catalog/base --num_workers=16
    python -m launch.build_data --dataset=fashiongen --manual_dir=/data/fashiongen
    python -m launch.build_data --dataset=fashioniq/triplets --manual_dir=/data/fashioniq
    python -m launch.build_data --dataset=polyvore_outfits/nondisjoint_items --manual_dir=/data/polyvore_outfits
      (configs {nondisjoint,disjoint}_{items,outfits,fitb,compatibility})
    python -m launch.build_data --dataset=image_text_folder/my_shop --manual_dir=/data/my_shop
    FashionIQ's public release misses many images: add --max_bad_fraction=0.3 if the build stops.

Write a synthetic set in the public release's format (then build it like the real thing):
    python -m launch.build_data --write_derived=fashioniq --out=/tmp/fiq
    python -m launch.build_data --dataset=fashioniq/triplets --manual_dir=/tmp/fiq
    python -m launch.build_data --write_derived=polyvore --out=/tmp/polyvore
    python -m launch.build_data --dataset=polyvore_outfits --manual_dir=/tmp/polyvore

The builder of --dataset=NAME[/CONFIG] is fashion_jax/data/builders/NAME.py, imported by name (it
registers itself with tfds on import).
"""

import importlib
import time

from absl import app
from absl import flags
from absl import logging

BUILDER_MODULES = ("synthetic_catalog", "fashiongen", "fashioniq", "polyvore_outfits",
                   "image_text_folder")
DERIVED = ("fashioniq", "polyvore")

_DATASET = flags.DEFINE_string("dataset", None, "NAME[/CONFIG], NAME one of " + ", ".join(
    BUILDER_MODULES))
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: tfds's default).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None,
                                  "Folder with the user-supplied files of a real-format dataset.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "synthetic_catalog only: rendering processes (default: all CPUs).")
_MAX_BAD = flags.DEFINE_float(
    "max_bad_fraction", None, "Real-format builders: the build stops with an error when more than "
    "this fraction of a split's records/images is bad (default: the builder's, 0.05).")
_WRITE_DERIVED = flags.DEFINE_enum("write_derived", None, DERIVED,
                                   "Write a synthetic set in this real format to --out.")
_OUT = flags.DEFINE_string("out", None, "Output folder of --write_derived.")
_SIZE = flags.DEFINE_enum("derived_size", "smoke", ["tiny", "smoke", "base"],
                          "Size of the derived set (see fashion_jax/data/derived.py).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image size of the derived set, pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the derived set.")


def builder_for(dataset, data_dir=None, **kwargs):
  """Imports fashion_jax.data.builders.<NAME> and returns tfds.builder('NAME[/CONFIG]')."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = dataset.split("/")[0].split(":")[0]
  if name not in BUILDER_MODULES:
    raise ValueError(f"unknown dataset {dataset!r}: NAME must be one of {BUILDER_MODULES}")
  importlib.import_module(f"fashion_jax.data.builders.{name}")
  return tfds.builder(dataset, data_dir=data_dir, **kwargs)


def build(dataset, data_dir=None, manual_dir=None, num_workers=None, max_bad_fraction=None):
  """Builds `dataset` and returns its builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if num_workers is not None:
    if not dataset.startswith("synthetic_catalog"):
      raise ValueError(f"--num_workers applies to synthetic_catalog only, not {dataset!r}")
    kwargs["num_workers"] = num_workers
  if max_bad_fraction is not None:
    if dataset.startswith("synthetic_catalog"):
      raise ValueError("--max_bad_fraction applies to the real-format builders, not "
                       f"{dataset!r} (rendered products are never bad)")
    kwargs["max_bad_fraction"] = max_bad_fraction
  builder = builder_for(dataset, data_dir, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t0 = time.perf_counter()
  if _WRITE_DERIVED.value:
    if not _OUT.value:
      raise app.UsageError("--write_derived needs --out=DIR")
    from fashion_jax.data import derived  # pylint: disable=g-import-not-at-top
    write = {"fashioniq": derived.write_fashioniq, "polyvore": derived.write_polyvore}
    counts = write[_WRITE_DERIVED.value](_OUT.value, size=_SIZE.value, seed=_SEED.value,
                                         image_size=_IMAGE_SIZE.value)
    print(f"wrote {_WRITE_DERIVED.value} to {_OUT.value} in {time.perf_counter() - t0:.1f} s: "
          f"{counts}")
    return
  if not _DATASET.value:
    raise app.UsageError("give --dataset=NAME[/CONFIG] or --write_derived=...")
  builder = build(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value, _NUM_WORKERS.value,
                  _MAX_BAD.value)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  logging.info("built %s", builder.info.full_name)
  print(f"built {builder.info.full_name} in {builder.data_dir} in "
        f"{time.perf_counter() - t0:.1f} s: {sizes}")


if __name__ == "__main__":
  app.run(main)
