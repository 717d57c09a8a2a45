"""TFDS builder of the built-in synthetic fashion catalog (offline, deterministic).

Build:
  python -m launch.build_data --dataset=synthetic_catalog/smoke [--data_dir=DIR]
  python -m launch.build_data --dataset=synthetic_catalog/base --num_workers=16

One example = one product in the schema of fashion_jax/data/schema.py (2-4 JPEG views, title,
description, tag fields) plus the catalog's ground truth as Text fields (catalog.EXTRA_FIELDS):
primary_color, secondary_color, pattern, material, sleeve, neckline, length, heel, strap ('' where
they do not apply), views ("front,back,..."), novelty (which probe promise the product tests) and
logo_box ("ymin xmin ymax xmax" of the brand mark in the front view, as fractions of the size).

Splits: train, validation, test, holdout_category, holdout_brand, improbable; what each promises is
in fashion_jax/data/catalog.py. Images are encoded with PIL at JPEG quality 95 without chroma
subsampling, so the 1-pixel cells of the logo at 64 px survive.

Rendering and JPEG encoding run in `num_workers` processes (builder kwarg, default: all CPUs);
products are seeded individually, so the dataset does not depend on the number of workers.
"""

import dataclasses
import io
import multiprocessing
import os

import tensorflow_datasets as tfds
from PIL import Image

from fashion_jax.data import catalog
from fashion_jax.data import schema

JPEG_QUALITY = 95
_CHUNK = 64


@dataclasses.dataclass
class SyntheticCatalogConfig(tfds.core.BuilderConfig):
  """Sizes of a build. num_probe is the size of each of the three probe splits."""
  image_size: int = 64
  num_train: int = 2000
  num_validation: int = 300
  num_test: int = 500
  num_probe: int = 250
  seed: int = 0

  def split_sizes(self):
    return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test,
            "holdout_category": self.num_probe, "holdout_brand": self.num_probe,
            "improbable": self.num_probe}


def encode_jpeg(image):
  """uint8 [H, W, 3] -> JPEG bytes (quality 95, 4:4:4)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
  return buf.getvalue()


def _render_chunk(args):
  """Worker: products [start, start + n) of a split -> [(key, example with JPEG bytes)]."""
  split, start, n, seed, image_size = args
  out = []
  for p in catalog.generate_products(split, n, seed=seed, image_size=image_size, start=start):
    p["images"] = [encode_jpeg(im) for im in p["images"]]
    out.append((p["product_id"], p))
  return out


class SyntheticCatalog(tfds.core.GeneratorBasedBuilder):
  """Synthetic fashion products with every attribute drawn and named (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 44 sub-categories, 48 brands, 6 splits."}
  BUILDER_CONFIGS = [
      SyntheticCatalogConfig(name="smoke", description="2k train products, 64 px (CPU smoke runs)",
                             image_size=64, num_train=2000, num_validation=300, num_test=500,
                             num_probe=250),
      SyntheticCatalogConfig(name="base", description="50k train products, 256 px",
                             image_size=256, num_train=50000, num_validation=2000, num_test=5000,
                             num_probe=1000),
      SyntheticCatalogConfig(name="large", description="100k train products, 64 px (search "
                             "benchmarks at catalog scale with the smoke models)",
                             image_size=64, num_train=100000, num_validation=300, num_test=500,
                             num_probe=250),
      SyntheticCatalogConfig(name="tiny", description="a few products per split, 64 px (tests)",
                             image_size=64, num_train=24, num_validation=8, num_test=8,
                             num_probe=6),
  ]
  DEFAULT_CONFIG_NAME = "smoke"

  def __init__(self, *, num_workers=None, **kwargs):
    super().__init__(**kwargs)
    if num_workers is not None and num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self._num_workers = num_workers or os.cpu_count() or 1

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=schema.product_features(extra_text_fields=catalog.EXTRA_FIELDS),
        homepage="https://github.com/fashion_jax (built-in, rendered locally)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = self.builder_config.split_sizes()
    # One pool serves every split (tfds consumes the generators one after the other); the last
    # generator to finish closes it. forkserver: workers start from a clean interpreter (no TF
    # threads forked) that has imported only the catalog and the renderer.
    pool = None
    if self._num_workers > 1 and sum(sizes.values()) > 2 * _CHUNK:
      ctx = multiprocessing.get_context("forkserver")
      ctx.set_forkserver_preload(["fashion_jax.data.render"])
      pool = ctx.Pool(self._num_workers)
    remaining = [len(sizes)]

    def done():
      remaining[0] -= 1
      if pool is not None and not remaining[0]:
        pool.close()
        pool.join()

    return {split: self._generate_examples(split, n, pool, done) for split, n in sizes.items()}

  def _generate_examples(self, split, n, pool, done):
    cfg = self.builder_config
    jobs = [(split, s, min(_CHUNK, n - s), cfg.seed, cfg.image_size) for s in range(0, n, _CHUNK)]
    chunks = pool.imap(_render_chunk, jobs) if pool is not None else map(_render_chunk, jobs)
    for chunk in chunks:
      yield from chunk
    done()
