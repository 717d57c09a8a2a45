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

A dataset already built is reused (the command says "reused"). image_text_folder checks first
that its catalog, options and image files are those it was built from, and stops with what
changed if not. --overwrite rebuilds; the old build is moved aside and put back if the rebuild
fails, so a failed rebuild loses nothing. Wrong input (a missing file, no image column, a split
left without a usable record, too many bad records: images_lib.InputDataError) ends the command
with one line naming it and exit status 1; the skipped records are logged above it.

Write a synthetic set in the public release's format (then build it like the real thing):
    python -m launch.build_data --write_derived=fashioniq --out=/tmp/fiq
    python -m launch.build_data --dataset=fashioniq/triplets --manual_dir=/tmp/fiq
    python -m launch.build_data --write_derived=polyvore --out=/tmp/polyvore
    python -m launch.build_data --dataset=polyvore_outfits --manual_dir=/tmp/polyvore

The builder of --dataset=NAME[/CONFIG] is fashion_jax/data/builders/NAME.py, imported by name (it
registers itself with tfds on import).
"""

import importlib
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from fashion_jax.data import images as images_lib

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
    "this fraction of a split's records/images is bad (image_text_folder: of the whole "
    "catalog's) (default: the builder's, 0.05).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Rebuild the dataset even if it is already built (e.g. after editing "
    "an image_text_folder catalog); the old build is kept until the new one succeeds.")
_WRITE_DERIVED = flags.DEFINE_enum("write_derived", None, DERIVED,
                                   "Write a synthetic set in this real format to --out.")
_OUT = flags.DEFINE_string("out", None, "Output folder of --write_derived.")
_SIZE = flags.DEFINE_enum("derived_size", "smoke", ["tiny", "smoke", "base"],
                          "Size of the derived set (see fashion_jax/data/derived.py).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image size of the derived set, pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the derived set.")


def builder_for(dataset, data_dir=None, **kwargs):
  """Imports fashion_jax.data.builders.<NAME> and returns an instance of its builder class.

  Always the class, never tfds's read-only builder: tfds.builder("image_text_folder/CONFIG")
  returns a ReadOnlyBuilder once CONFIG (not a predefined config) is built, and that one's
  download_and_prepare neither checks the catalog nor rebuilds anything.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = dataset.split("/")[0].split(":")[0]
  if name not in BUILDER_MODULES:
    raise ValueError(f"unknown dataset {dataset!r}: NAME must be one of {BUILDER_MODULES}")
  importlib.import_module(f"fashion_jax.data.builders.{name}")
  parsed, builder_kwargs = tfds.core.naming.parse_builder_name_kwargs(
      dataset, data_dir=data_dir, **kwargs)
  return tfds.builder_cls(str(parsed))(**builder_kwargs)


def build(dataset, data_dir=None, manual_dir=None, num_workers=None, max_bad_fraction=None,
          overwrite=False):
  """Builds `dataset` (or reuses its build, see the module docstring) and returns its builder."""
  return build_with_status(dataset, data_dir, manual_dir, num_workers, max_bad_fraction,
                           overwrite)[0]


def build_with_status(dataset, data_dir=None, manual_dir=None, num_workers=None,
                      max_bad_fraction=None, overwrite=False):
  """Like `build`; returns (builder, "built" | "reused")."""
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
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=download_config)
    return builder, "built"
  if not overwrite:
    builder.download_and_prepare(download_config=download_config)  # Reuses (after its checks).
    return builder, "reused"
  # Rebuild: move the old build aside (same filesystem: a rename), build from scratch with a
  # fresh builder (its info must not come from the old build), then drop or restore the old one.
  old = os.fspath(builder.data_path)
  aside = tempfile.mkdtemp(prefix=f".overwritten_{os.path.basename(old)}_",
                           dir=os.path.dirname(old))
  kept = os.path.join(aside, os.path.basename(old))
  os.rename(old, kept)
  try:
    builder = builder_for(dataset, data_dir, **kwargs)
    builder.download_and_prepare(download_config=download_config)
  except BaseException:
    if os.path.exists(old):  # Whatever a failed build left (tfds normally leaves nothing).
      shutil.rmtree(old)
    os.rename(kept, old)
    os.rmdir(aside)
    logging.error("rebuilding %s failed; the previous build is back in %s", dataset, old)
    raise
  shutil.rmtree(aside)
  return builder, "built"


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
  try:
    builder, status = build_with_status(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value,
                                        _NUM_WORKERS.value, _MAX_BAD.value, _OVERWRITE.value)
  except images_lib.InputDataError as e:  # The input is wrong, not the code: one line, exit 1.
    # cli.one_line_exit's message, spelled out: importing fashion_jax.cli starts JAX (2 s),
    # which building a dataset does not need.
    raise SystemExit("launch.build_data: " + " ".join(str(e).split())) from e
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  logging.info("%s %s", status, builder.info.full_name)
  how = ""
  if status == "reused":
    note = getattr(builder, "up_to_date_note", None)  # image_text_folder's input check.
    how = f" ({note or 'already built'}; --overwrite rebuilds)"
  print(f"{status} {builder.info.full_name} in {builder.data_dir}{how} in "
        f"{time.perf_counter() - t0:.1f} s: {sizes}")


if __name__ == "__main__":
  app.run(main)
