r"""A second synthetic catalog drawn independently of fashion_jax.data.catalog / render.

Written as a shop would hand it over: an image_text_folder (catalog.csv + PNG images), outside the
project tree. Nothing is shared with the built-in synthetic catalog: its own product kinds (drawn
as flat geometric silhouettes), colour names, surface finishes, two sizes, invented maker names
(from their own syllables) and the maker's mark: a SMALL 3x3 bit pattern (9 px cells of 3 px)
in the bottom-right corner, the only visual cue of the maker, which a random crop can remove.

  title        "<Maker> <colour> <finish> <kind>"
  description  one of several templates naming size, kind, finish, colour, sometimes the maker
  split        train / validation / test, sizes from the command line

  python -m experiments.other_catalog --out=/tmp/other_catalog
  python -m launch.build_data --dataset=image_text_folder/other --manual_dir=/tmp/other_catalog \
      --data_dir=/tmp/tfds
"""

import argparse
import csv
import pathlib

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("pendant", "bangle", "tote", "visor", "anklet", "mitten", "beret", "sash", "locket",
         "clog")
SHAPES = ("circle", "ring", "roundrect", "triangle", "trapezoid", "star", "hexagon", "cross",
          "crescent", "ellipse")
COLOURS = {"saffron": (244, 180, 26), "cobalt": (0, 71, 171), "jade": (0, 168, 107),
           "oxblood": (110, 18, 30), "slate": (90, 100, 112), "ochre": (204, 119, 34),
           "lilac": (190, 150, 220), "pitch": (20, 20, 20), "coral": (250, 110, 90),
           "moss": (100, 120, 40)}
FINISHES = ("matte", "ribbed", "speckled", "latticed")
SIZES = ("petite", "grand")
_SYLLABLES = ("qor", "va", "nex", "ul", "tri", "zan", "mo", "phel", "isk", "dra", "wen", "ob",
              "gly", "rhu", "tesk", "aum")
_TEMPLATES = (
    "A {size} {kind} with a {finish} {colour} surface.",
    "{Maker} makes this {size} {kind}; {finish} finish in {colour}.",
    "{colour} {kind}, {size} cut, {finish}.",
    "Handmade {kind} by {Maker}, {finish} {colour}, {size}.",
)


def makers(n=40, seed=7):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4))).capitalize()
    if name not in out:
      out.append(name)
  return out


def maker_mark(index):
  """3x3 bits of a maker (index + 1 in binary over 9 cells; never all-zero)."""
  bits = index + 1
  return np.array([(bits >> k) & 1 for k in range(9)], bool).reshape(3, 3)


def _shape(draw, shape, box, fill):
  x0, y0, x1, y1 = box
  cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "ring":
    draw.ellipse(box, outline=fill, width=max(3, int(r / 3)))
  elif shape == "roundrect":
    draw.rounded_rectangle(box, radius=r / 3, fill=fill)
  elif shape == "ellipse":
    draw.ellipse((x0, cy - r / 2, x1, cy + r / 2), fill=fill)
  elif shape == "crescent":
    draw.chord(box, 60, 300, fill=fill)
  elif shape == "cross":
    w = r / 3
    draw.rectangle((cx - w, y0, cx + w, y1), fill=fill)
    draw.rectangle((x0, cy - w, x1, cy + w), fill=fill)
  else:
    pts = {"triangle": [(cx, y0), (x1, y1), (x0, y1)],
           "trapezoid": [(x0 + r / 2, y0), (x1 - r / 2, y0), (x1, y1), (x0, y1)],
           "hexagon": [(cx + r * np.cos(a), cy + r * np.sin(a))
                       for a in np.linspace(0, 2 * np.pi, 7)[:-1]],
           "star": [(cx + (r if k % 2 == 0 else r / 2.3) * np.cos(np.pi * k / 5 - np.pi / 2),
                     cy + (r if k % 2 == 0 else r / 2.3) * np.sin(np.pi * k / 5 - np.pi / 2))
                    for k in range(10)]}[shape]
    draw.polygon(pts, fill=fill)


def draw_product(kind, colour, finish, size, maker_index, rng, px=96):
  """RGB image [px, px]: tinted background, the kind's silhouette in the colour with the finish
  drawn over it in a darker shade, the maker's mark in the bottom-right corner."""
  bg = tuple(int(v) for v in 225 + rng.integers(0, 30, 3))
  img = Image.new("RGB", (px, px), bg)
  d = ImageDraw.Draw(img)
  half = (0.36 if size == "grand" else 0.24) * px
  cx, cy = px / 2 + rng.uniform(-6, 6), px / 2 + rng.uniform(-6, 6)
  box = (cx - half, cy - half, cx + half, cy + half)
  rgb = COLOURS[colour]
  _shape(d, SHAPES[KINDS.index(kind)], box, rgb)
  mask = Image.new("L", (px, px), 0)
  _shape(ImageDraw.Draw(mask), SHAPES[KINDS.index(kind)], box, 255)
  over = Image.new("RGB", (px, px), bg)
  o = ImageDraw.Draw(over)
  dark = tuple(int(v * 0.55) for v in rgb)
  if finish == "ribbed":
    for y in range(0, px, 5):
      o.line((0, y, px, y), fill=dark, width=2)
  elif finish == "speckled":
    for x, y in rng.integers(0, px, (80, 2)):
      o.ellipse((x - 1, y - 1, x + 1, y + 1), fill=dark)
  elif finish == "latticed":
    for k in range(-px, px, 8):
      o.line((k, 0, k + px, px), fill=dark, width=1)
      o.line((k + px, 0, k, px), fill=dark, width=1)
  if finish != "matte":
    over_mask = Image.fromarray((np.asarray(over) != np.array(bg)).any(-1).astype(np.uint8) * 255)
    img.paste(over, (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(over_mask))))
  cell, x0 = 3, px - 3 * 3 - 3
  for (i, j), bit in np.ndenumerate(maker_mark(maker_index)):
    d.rectangle((x0 + j * cell, x0 + i * cell, x0 + (j + 1) * cell - 1,
                 x0 + (i + 1) * cell - 1), fill=(0, 0, 0) if bit else (255, 255, 255))
  return img


def write_catalog(out, sizes=(("train", 2000), ("validation", 300), ("test", 500)), seed=0,
                  px=96):
  """Writes out/catalog.csv and out/img/*.png; returns the number of products."""
  out = pathlib.Path(out)
  (out / "img").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names, rows = makers(), []
  for split, n in sizes:
    for k in range(n):
      kind, colour = rng.choice(KINDS), rng.choice(list(COLOURS))
      finish, size, m = rng.choice(FINISHES), rng.choice(SIZES), int(rng.integers(len(names)))
      pid = f"{split[:2]}{k:05d}"
      draw_product(kind, colour, finish, size, m, rng, px).save(out / "img" / f"{pid}.png")
      desc = rng.choice(_TEMPLATES).format(size=size, kind=kind, finish=finish, colour=colour,
                                           Maker=names[m])
      rows.append(dict(product_id=pid, image=f"img/{pid}.png",
                       title=f"{names[m]} {colour} {finish} {kind}", description=desc,
                       brand=names[m], split=split))
  with open(out / "catalog.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return len(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="a folder outside the project tree")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  print(write_catalog(a.out, seed=a.seed), "products in", a.out)


if __name__ == "__main__":
  main()
