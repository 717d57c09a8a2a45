"""Contact sheet of a product dataset: a grid of products (all their views) with their titles.

`products_from_dataset` reads a built TFDS dataset (None when it is not prepared);
`products_from_catalog` renders synthetic_catalog products straight from the generator (no
build). `sheet` draws [(views, title, subtitle)] as one RGB image: per product the front view at
`display` pixels (nearest-neighbour, so a person can see the 1-pixel cells of the brand marks),
up to three more views at half size, and two text lines.
"""

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow_datasets as tfds

from fashion_jax.data import registry
from fashion_jax.data import render
from fashion_jax.data.builders import synthetic_catalog

_FONT = ImageFont.load_default()
_BG = (255, 255, 255)


def products_from_dataset(dataset, split, num, data_dir=None):
  """[(images, title, subtitle)] from a prepared TFDS dataset, or None if it is not prepared."""
  try:
    builder = registry.prepared_builder(dataset, data_dir or "")
  except FileNotFoundError:
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
  name, _, config = dataset.partition("/")
  if name != "synthetic_catalog":
    raise ValueError(f"{dataset!r} is not prepared; only synthetic_catalog can be rendered "
                     "without a build")
  configs = {c.name: c for c in synthetic_catalog.SyntheticCatalog.BUILDER_CONFIGS}
  cfg = configs[config or synthetic_catalog.SyntheticCatalog.DEFAULT_CONFIG_NAME]
  return [(p["images"], p["title"], f"{p['brand']} | {p['season']} | {p['subcategory']}")
          for p in render.generate_products(split, num, seed=cfg.seed, image_size=cfg.image_size)]


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
