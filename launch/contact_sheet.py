r"""Contact sheet of a product dataset: a grid of products (all their views) with their titles.

    python -m launch.contact_sheet --dataset=synthetic_catalog/smoke --split=train \
        --out=docs/catalog.png

Reads the built dataset when it is prepared in --data_dir (tfds's default when unset); for
synthetic_catalog it otherwise renders the same products straight from the catalog generator
(no build needed). Views are upscaled with nearest-neighbour to --display_size so a person can
see the 1-pixel cells of the brand marks; the PNG is palette-quantised to stay small.
"""

import importlib
import textwrap

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/smoke", "NAME[/CONFIG].")
_SPLIT = flags.DEFINE_string("split", "train", "Split to show.")
_OUT = flags.DEFINE_string("out", "docs/catalog.png", "Output PNG.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: tfds's default).")
_NUM = flags.DEFINE_integer("num", 24, "Number of products.")
_COLUMNS = flags.DEFINE_integer("columns", 4, "Products per row.")
_DISPLAY = flags.DEFINE_integer("display_size", 128, "Pixel size of the front view on the sheet.")

_FONT = ImageFont.load_default()
_BG = (255, 255, 255)


def products_from_dataset(dataset, split, num, data_dir=None):
  """[(images, title, subtitle)] from a prepared TFDS dataset, or None if it is not prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Builders register with tfds when their module is imported (as in launch/build_data.py).
  importlib.import_module(f"fashion_jax.data.builders.{dataset.split('/')[0]}")
  builder = tfds.builder(dataset, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  ds = builder.as_dataset(split=split, shuffle_files=False).take(num)
  out = []
  for ex in tfds.as_numpy(ds):
    t = lambda k: ex[k].decode("utf-8") if k in ex else ""
    out.append((list(ex["images"]), t("title"),
                " | ".join(v for v in (t("brand"), t("season"), t("subcategory")) if v)))
  return out


def products_from_catalog(dataset, split, num):
  """[(images, title, subtitle)] rendered by the catalog generator for synthetic_catalog/CONFIG."""
  from fashion_jax.data import catalog  # pylint: disable=g-import-not-at-top
  from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=g-import-not-at-top
  name, _, config = dataset.partition("/")
  if name != "synthetic_catalog":
    raise ValueError(f"{dataset!r} is not prepared; only synthetic_catalog can be rendered "
                     "without a build")
  configs = {c.name: c for c in synthetic_catalog.SyntheticCatalog.BUILDER_CONFIGS}
  cfg = configs[config or synthetic_catalog.SyntheticCatalog.DEFAULT_CONFIG_NAME]
  return [(p["images"], p["title"], f"{p['brand']} | {p['season']} | {p['subcategory']}")
          for p in catalog.generate_products(split, num, seed=cfg.seed, image_size=cfg.image_size)]


def sheet(products, columns, display):
  """One RGB image: per product its views (front large, others half size) and two text lines."""
  small = display // 2
  cell_w = display + 2 * small + 12
  line_h = 12
  cell_h = display + 3 * line_h + 10
  rows = -(-len(products) // columns)
  img = Image.new("RGB", (columns * cell_w, rows * cell_h), _BG)
  d = ImageDraw.Draw(img)
  for k, (views, title, subtitle) in enumerate(products):
    x0, y0 = (k % columns) * cell_w + 4, (k // columns) * cell_h + 4
    img.paste(Image.fromarray(np.asarray(views[0])).resize((display, display), Image.NEAREST),
              (x0, y0))
    for v, view in enumerate(views[1:4]):
      pos = (x0 + display + 2 + (v % 2) * small, y0 + (v // 2) * small)
      img.paste(Image.fromarray(np.asarray(view)).resize((small, small), Image.NEAREST), pos)
    lines = textwrap.wrap(title, width=cell_w // 6)[:2] + [subtitle]
    for i, line in enumerate(lines):
      d.text((x0, y0 + display + 2 + i * line_h), line, fill=(0, 0, 0) if i < len(lines) - 1
             else (110, 110, 110), font=_FONT)
  return img


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  products = products_from_dataset(_DATASET.value, _SPLIT.value, _NUM.value, _DATA_DIR.value)
  source = "built dataset"
  if products is None:
    products = products_from_catalog(_DATASET.value, _SPLIT.value, _NUM.value)
    source = "catalog generator (dataset not built)"
  img = sheet(products, _COLUMNS.value, _DISPLAY.value)
  img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(_OUT.value, optimize=True)
  print(f"wrote {_OUT.value}: {len(products)} products of {_DATASET.value}:{_SPLIT.value} from "
        f"the {source}")


if __name__ == "__main__":
  app.run(main)
