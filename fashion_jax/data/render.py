"""Procedural renderer of synthetic fashion products (numpy + PIL, no downloads, deterministic).

A product is drawn in two passes:
  1. Geometry -> label map [S, S] uint8 with PIL.ImageDraw (polygons, ellipses, lines) in
     normalised coordinates (x right, y down, both in [0, 1]) scaled to S pixels. Labels:
       0 background, 1 body (primary colour + pattern + texture), 2 trim (secondary colour),
       3 inside/opening (primary x 0.45), 4 hardware (metal), 5 seams and outlines (primary x 0.68).
  2. Colour: image = palette[label] with the pattern's second colour on body pixels, times the
     material's cached texture map [S, S] (cloth labels only; quantised to 64 levels so that the
     whole product is one uint8 table look-up), then two small marks pasted on top:
       logo  5x5 cells of the brand glyph (catalog.brand_glyph) on a 7x7-cell plate of the primary
             colour, glyph cells in black or white, whichever contrasts with the primary. Cell size
             c = max(1, S // 64) px, so the mark covers ~0.6% of the image: a fine detail.
       tag   2x4 cells: top row [season half, year bit 2, bit 1, bit 0] (dark = 1, FW = dark,
             year - 2014 in binary), bottom row the fixed marker [dark, light, dark, light].

Views (ProductSpec.views): 'front' (canonical, carries logo and tag), 'back' (back geometry: no
logo, no front closures; shoes show the other side), 'detail' (the front drawn at 2S and cropped to
S x S around the logo: more real pixels of logo, pattern and texture), 'shifted' (the front image
rotated by +-15 degrees, scaled 0.8-1.05 and shifted up to 8%).

Pattern periods and texture scales are fractions of S, so a product looks the same at every size;
patterns, textures and glyph plates are cached per (kind, size).

A whole product (catalog fields, text and rendered views): make_product(spec, seed, image_size) ->
dict in the product schema (images: list of uint8 [S, S, 3]); generate_products(split, n, seed=0,
image_size=64, start=0) -> iterator of those dicts.
"""

import functools
import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from fashion_jax.data import catalog

VIEWS = ("front", "back", "detail", "shifted")
BACKGROUND = (238, 238, 236)
METAL = (196, 190, 170)
TAG_ON = (30, 30, 30)
TAG_OFF = (236, 232, 222)
BODY, TRIM, INSIDE, METAL_LABEL, SEAM = 1, 2, 3, 4, 5
_PATTERN_LABEL = 6


def cell_size(size):
  """Pixel size of one logo/tag cell at image size `size`."""
  return max(1, size // 64)


# ------------------------------------------------------------------------------------------------
# Geometry. Each family returns (shapes, logo_center, tag_topleft) in normalised coordinates.
# Shapes: ('poly', label, points, outline) | ('ellipse', label, box, outline) |
#         ('line', label, points, width) | ('pie', label, box, start, end, outline) |
#         ('arc', label, box, start, end, width)
# ------------------------------------------------------------------------------------------------

def _mirror(points):
  return [(1.0 - x, y) for x, y in points]


def _sym(label, half, outline=None):
  """A polygon symmetric about x = 0.5 from its right half (listed top to bottom)."""
  return ("poly", label, _mirror(half[::-1]) + list(half), outline)


def _sleeve(top, sw, cw, length, end_hw, cuff_label, side):
  """Sleeve polygon (+ cuff) hanging from shoulder (sw, top) and armpit (cw, top + .17)."""
  s = np.array([0.5 + side * sw, top + 0.005])
  a = np.array([0.5 + side * cw, top + 0.17])
  d = np.array([0.24 * side, 1.0])
  d /= np.linalg.norm(d)
  n = np.array([d[1], -d[0]]) * side
  e = (s + a) / 2 + d * length
  eo, ei = e + n * end_hw, e - n * end_hw
  shapes = [("poly", BODY, [tuple(s), tuple(eo), tuple(ei), tuple(a)], SEAM)]
  if cuff_label:
    c = e - d * min(0.05, length * 0.3)
    shapes.append(("poly", cuff_label, [tuple(c + n * end_hw * 1.03), tuple(eo), tuple(ei),
                                        tuple(c - n * end_hw * 1.03)], SEAM))
  return shapes


def _buttons(x, y0, y1, n, r=0.011):
  ys = np.linspace(y0, y1, n)
  return [("ellipse", METAL_LABEL, (x - r, y - r, x + r, y + r), None) for y in ys]


def _neckline(kind, nw, neck_y, top, view):
  """Neckline shapes drawn over the torso."""
  if view == "back":
    if kind in ("hood",):
      return []
    return [("ellipse", INSIDE, (0.5 - nw, neck_y - 0.03, 0.5 + nw, neck_y + 0.012), None)]
  if kind in ("crew neck", ""):
    return [("ellipse", TRIM, (0.5 - nw, neck_y - 0.03, 0.5 + nw, neck_y + 0.05), None),
            ("ellipse", INSIDE, (0.5 - nw + 0.014, neck_y - 0.02, 0.5 + nw - 0.014, neck_y + 0.034),
             None)]
  if kind == "scoop neck":
    return [("ellipse", TRIM, (0.5 - nw - 0.025, neck_y - 0.03, 0.5 + nw + 0.025, neck_y + 0.1),
             None),
            ("ellipse", INSIDE, (0.5 - nw - 0.01, neck_y - 0.02, 0.5 + nw + 0.01, neck_y + 0.083),
             None)]
  if kind == "v-neck":
    return [("poly", TRIM, [(0.5 - nw - 0.005, neck_y - 0.01), (0.5 + nw + 0.005, neck_y - 0.01),
                            (0.5, neck_y + 0.17)], None),
            ("poly", INSIDE, [(0.5 - nw + 0.012, neck_y - 0.01), (0.5 + nw - 0.012, neck_y - 0.01),
                              (0.5, neck_y + 0.135)], None)]
  if kind == "turtleneck":
    return [("poly", BODY, [(0.5 - nw, neck_y - 0.075), (0.5 + nw, neck_y - 0.075),
                            (0.5 + nw + 0.01, neck_y + 0.03), (0.5 - nw - 0.01, neck_y + 0.03)],
             SEAM),
            ("line", SEAM, [(0.5 - nw, neck_y - 0.02), (0.5 + nw, neck_y - 0.02)], 0.008),
            ("ellipse", INSIDE, (0.5 - nw + 0.01, neck_y - 0.09, 0.5 + nw - 0.01, neck_y - 0.062),
             None)]
  if kind == "point collar":
    flap = [(0.5 - 0.004, neck_y + 0.075), (0.5 + nw + 0.012, neck_y - 0.02),
            (0.5 + nw + 0.024, neck_y + 0.085)]
    return [("ellipse", TRIM, (0.5 - nw, neck_y - 0.035, 0.5 + nw, neck_y + 0.03), None),
            ("ellipse", INSIDE, (0.5 - nw + 0.012, neck_y - 0.025, 0.5 + nw - 0.012, neck_y + 0.02),
             None),
            ("poly", TRIM, flap, SEAM), ("poly", TRIM, _mirror(flap), SEAM)]
  if kind == "band collar":
    return [("ellipse", TRIM, (0.5 - nw - 0.005, neck_y - 0.04, 0.5 + nw + 0.005, neck_y + 0.045),
             None),
            ("ellipse", INSIDE, (0.5 - nw + 0.012, neck_y - 0.03, 0.5 + nw - 0.012, neck_y + 0.02),
             None)]
  if kind == "hood":  # the face opening of a hood drawn behind the torso
    return [("ellipse", TRIM, (0.5 - nw - 0.02, neck_y - 0.11, 0.5 + nw + 0.02, neck_y + 0.07),
             None),
            ("ellipse", INSIDE, (0.5 - nw, neck_y - 0.09, 0.5 + nw, neck_y + 0.05), None)]
  raise ValueError(f"unknown neckline {kind!r}")


def _upper(spec, view, j):
  """Tops, shirts and outerwear, front or back, facing the viewer."""
  sub, g = spec.subcategory, spec.gender
  outer = spec.category == "outerwear"
  top = 0.2
  sw = {"men": 0.245, "women": 0.205, "unisex": 0.225}[g] * j[0] + (0.02 if outer else 0.0)
  cw = sw - 0.02
  ww = cw - (0.045 if g == "women" else 0.004)
  nw = 0.058 * j[2]
  neck_y = top - 0.032
  hem0 = {"cropped": 0.7, "hip length": 0.8, "knee length": 0.95, "long": 0.95}.get(spec.length, 0.78)
  hem = top + (hem0 - top) * j[1]
  hw = ww + (0.03 if g == "women" else 0.0) + (0.04 if spec.length in ("knee length", "long") else 0)
  if sub in ("bomber jackets", "puffer jackets"):
    hw = ww - 0.01
  cuffs = TRIM if sub in ("sweaters", "hoodies", "cardigans", "dress shirts", "bomber jackets",
                          "puffer jackets", "parkas", "polo shirts", "t-shirts") else None
  shapes = []
  hooded = spec.neckline == "hood"
  if hooded:
    hood_box = (0.5 - nw - 0.07, neck_y - 0.15, 0.5 + nw + 0.07, neck_y + 0.1)
    shapes.append(("ellipse", BODY, hood_box, SEAM))
  if spec.sleeve != "sleeveless":
    long = spec.sleeve == "long sleeves"
    length = min(0.6, (hem - top) * 0.85) if long else 0.15
    end_hw = 0.052 if long else 0.078
    if sub == "puffer jackets":
      end_hw += 0.012
    for side in (1.0, -1.0):
      shapes += _sleeve(top, sw, cw, length * j[3] if long else length, end_hw, cuffs, side)
    shoulder = sw
  else:
    shoulder = nw + 0.045
  half = [(0.5 + nw, neck_y), (0.5 + shoulder, top), (0.5 + cw, top + 0.17),
          (0.5 + ww, top + 0.33), (0.5 + hw, hem)]
  shapes.append(_sym(BODY, half, SEAM))
  if spec.sleeve == "sleeveless":  # armhole binding
    for side in (1.0, -1.0):
      shapes.append(("line", TRIM, [(0.5 + side * shoulder, top), (0.5 + side * cw, top + 0.17)],
                     0.014))
  band = sub in ("sweaters", "hoodies", "bomber jackets", "cardigans")
  if band:
    shapes.append(("poly", TRIM, [(0.5 - hw, hem - 0.045), (0.5 + hw, hem - 0.045),
                                  (0.5 + hw, hem), (0.5 - hw, hem)], SEAM))
  front = view == "front"
  cx = 0.5
  # Closures and construction details.
  if sub == "puffer jackets":
    y = top + 0.07
    while y < hem - 0.03:
      shapes.append(("line", SEAM, [(cx - hw - 0.01, y), (cx + hw + 0.01, y)], 0.008))
      y += 0.08
  if front:
    if sub == "hoodies":
      shapes.append(("poly", BODY, [(cx - 0.11, hem - 0.22), (cx + 0.11, hem - 0.22),
                                    (cx + 0.15, hem - 0.06), (cx - 0.15, hem - 0.06)], SEAM))
    if sub == "cardigans":
      shapes.append(("line", TRIM, [(cx, neck_y + 0.16), (cx, hem)], 0.02))
      shapes += _buttons(cx, neck_y + 0.2, hem - 0.07, 5)
    if sub in ("dress shirts", "casual shirts"):
      shapes.append(("line", SEAM, [(cx, neck_y + 0.06), (cx, hem)], 0.008))
      shapes += _buttons(cx + 0.012, neck_y + 0.1, hem - 0.05, 5, 0.009)
    if sub == "casual shirts":
      shapes.append(("poly", BODY, [(cx - sw * 0.62, top + 0.08), (cx - sw * 0.2, top + 0.08),
                                    (cx - sw * 0.2, top + 0.2), (cx - sw * 0.62, top + 0.2)], SEAM))
    if sub == "polo shirts":
      shapes.append(("line", SEAM, [(cx, neck_y + 0.04), (cx, neck_y + 0.16)], 0.012))
      shapes += _buttons(cx, neck_y + 0.07, neck_y + 0.14, 2, 0.01)
    if sub == "blouses":
      bow = [(cx, neck_y + 0.06), (cx + 0.07, neck_y + 0.02), (cx + 0.07, neck_y + 0.11)]
      shapes += [("poly", TRIM, bow, SEAM), ("poly", TRIM, _mirror(bow), SEAM),
                 ("ellipse", TRIM, (cx - 0.018, neck_y + 0.045, cx + 0.018, neck_y + 0.08), SEAM),
                 ("line", TRIM, [(cx - 0.01, neck_y + 0.075), (cx - 0.03, neck_y + 0.2)], 0.014),
                 ("line", TRIM, [(cx + 0.01, neck_y + 0.075), (cx + 0.03, neck_y + 0.19)], 0.014)]
    if sub in ("blazers", "trench coats"):
      deep = 0.3 if sub == "blazers" else 0.2
      shapes.append(("poly", INSIDE, [(cx - nw, neck_y), (cx + nw, neck_y), (cx, top + deep)], None))
      lapel = [(cx + nw, neck_y), (cx + nw + 0.05, top + 0.06), (cx + nw + 0.02, top + 0.09),
               (cx + 0.006, top + deep)]
      shapes += [("poly", TRIM, lapel, SEAM), ("poly", TRIM, _mirror(lapel), SEAM)]
      shapes.append(("line", SEAM, [(cx, top + deep), (cx, hem)], 0.008))
      if sub == "blazers":
        shapes += _buttons(cx + 0.018, top + deep + 0.05, top + deep + 0.13, 2, 0.012)
        for side in (1, -1):
          shapes.append(("line", SEAM, [(cx + side * 0.07, hem - 0.14),
                                        (cx + side * (hw - 0.03), hem - 0.14)], 0.012))
      else:
        for xx in (cx - 0.06, cx + 0.06):
          shapes += _buttons(xx, top + deep + 0.03, top + 0.31, 3, 0.011)
    if sub in ("bomber jackets", "parkas", "puffer jackets"):
      shapes.append(("line", METAL_LABEL, [(cx, neck_y + 0.04), (cx, hem)], 0.012))
    if sub == "parkas":
      for yy in (top + 0.3, hem - 0.14):
        for side in (1, -1):
          x0, x1 = sorted((cx + side * 0.04, cx + side * (hw - 0.03)))
          shapes.append(("poly", BODY, [(x0, yy), (x1, yy), (x1, yy + 0.06), (x0, yy + 0.06)], SEAM))
    if sub == "puffer jackets":
      shapes.append(("poly", BODY, [(cx - nw - 0.01, neck_y - 0.06), (cx + nw + 0.01, neck_y - 0.06),
                                    (cx + nw + 0.02, neck_y + 0.04), (cx - nw - 0.02, neck_y + 0.04)],
                     SEAM))
    elif spec.neckline or sub not in ("blazers", "trench coats"):
      shapes += _neckline(spec.neckline or ("band collar" if outer else "crew neck"), nw, neck_y,
                          top, view)
  else:
    if sub in ("dress shirts", "casual shirts", "polo shirts"):
      shapes.append(("line", SEAM, [(cx - sw + 0.02, top + 0.07), (cx + sw - 0.02, top + 0.07)],
                     0.008))
    if sub == "trench coats":
      shapes.append(("line", SEAM, [(cx, top + 0.4), (cx, hem)], 0.008))
    if not hooded:
      shapes += _neckline(spec.neckline, nw, neck_y, top, view)
  if sub == "trench coats":  # belt, both sides
    shapes.append(("poly", TRIM, [(cx - ww - 0.01, top + 0.31), (cx + ww + 0.01, top + 0.31),
                                  (cx + ww + 0.01, top + 0.36), (cx - ww - 0.01, top + 0.36)], SEAM))
  if hooded and view == "back":
    shapes.append(("ellipse", BODY, (0.5 - nw - 0.07, neck_y - 0.15, 0.5 + nw + 0.07, neck_y + 0.12),
                   SEAM))
    shapes.append(("line", SEAM, [(0.5, neck_y - 0.14), (0.5, neck_y + 0.1)], 0.008))
  logo = (cx + sw * 0.5, top + 0.11)
  tag = (cx - ww + 0.02, top + 0.36)
  return shapes, logo, tag


def _dress(spec, view, j):
  """Dresses: bodice, waist and skirt; hem set by `length`."""
  sub = spec.subcategory
  top = 0.14
  sw = 0.19 * j[0]
  cw = sw - 0.025
  ww = cw - 0.05
  nw = 0.055 * j[2]
  neck_y = top - 0.03
  waist = top + 0.25
  hem0 = {"mini": 0.62, "knee length": 0.78, "maxi": 0.96}[spec.length]
  hem = waist + (hem0 - waist) * j[1]
  flare = {"shift dresses": 0.03, "a-line dresses": 0.2, "slip dresses": 0.09,
           "shirt dresses": 0.06, "wrap dresses": 0.15}[sub]
  hw = ww + flare * (hem - waist) / 0.5 + 0.02
  shapes = []
  if spec.sleeve != "sleeveless":
    long = spec.sleeve == "long sleeves"
    for side in (1.0, -1.0):
      shapes += _sleeve(top, sw, cw, 0.44 * j[3] if long else 0.13, 0.045 if long else 0.07,
                        TRIM, side)
    shoulder = sw
  else:
    shoulder = nw + 0.04
  if sub == "slip dresses":
    dip = 0.13 if spec.neckline == "v-neck" else 0.1
    bodice_top = top + 0.05
    half = [(0.5, bodice_top + dip), (0.5 + 0.06, bodice_top + dip * 0.8) if dip == 0.1 else
            (0.5 + 0.03, bodice_top + dip * 0.6), (0.5 + cw, bodice_top), (0.5 + ww, waist),
            (0.5 + hw, hem)]
    shapes.append(_sym(BODY, half, SEAM))
    for side in (1, -1):
      shapes.append(("line", TRIM, [(0.5 + side * (cw - 0.03), bodice_top + 0.01),
                                    (0.5 + side * (nw + 0.01), top - 0.05)], 0.01))
    shapes.append(("poly", TRIM, [(0.5 - hw, hem - 0.035), (0.5 + hw, hem - 0.035),
                                  (0.5 + hw, hem), (0.5 - hw, hem)], None))
  else:
    half = [(0.5 + nw, neck_y), (0.5 + shoulder, top), (0.5 + cw, top + 0.13), (0.5 + ww, waist),
            (0.5 + hw, hem)]
    shapes.append(_sym(BODY, half, SEAM))
    if spec.sleeve == "sleeveless":
      for side in (1.0, -1.0):
        shapes.append(("line", TRIM, [(0.5 + side * shoulder, top), (0.5 + side * cw, top + 0.13)],
                       0.013))
    if view == "front":
      shapes += _neckline(spec.neckline, nw, neck_y, top, view)
    else:
      shapes += _neckline("", nw, neck_y, top, view)
  if view == "front":
    if sub == "a-line dresses":
      shapes.append(("line", SEAM, [(0.5 - ww, waist), (0.5 + ww, waist)], 0.01))
    if sub == "shirt dresses":
      shapes.append(("line", SEAM, [(0.5, neck_y + 0.07), (0.5, hem)], 0.008))
      shapes += _buttons(0.512, neck_y + 0.1, waist - 0.04, 3, 0.009)
    if sub == "wrap dresses":
      shapes.append(("line", SEAM, [(0.5 - nw, neck_y + 0.01), (0.5 + ww * 0.9, waist)], 0.01))
      shapes.append(("line", SEAM, [(0.5 + ww * 0.9, waist), (0.5 + hw * 0.55, hem)], 0.008))
      shapes.append(("ellipse", TRIM, (0.5 + ww - 0.03, waist - 0.025, 0.5 + ww + 0.02, waist + 0.025),
                     SEAM))
      shapes.append(("line", TRIM, [(0.5 + ww, waist), (0.5 + ww + 0.02, waist + 0.14)], 0.014))
  if sub in ("shirt dresses", "wrap dresses") and view == "back" or sub == "shirt dresses":
    shapes.append(("poly", TRIM, [(0.5 - ww - 0.005, waist - 0.02), (0.5 + ww + 0.005, waist - 0.02),
                                  (0.5 + ww + 0.005, waist + 0.025), (0.5 - ww - 0.005, waist + 0.025)],
                   SEAM))
  logo = (0.5 + cw * 0.5, top + 0.11)
  tag = (0.5 - ww - 0.01, waist + 0.05)
  return shapes, logo, tag


def _skirt(spec, view, j):
  sub = spec.subcategory
  top = 0.12
  ww = 0.165 * j[0]
  hip_y, hp = 0.3, ww + 0.04
  hem0 = {"mini": 0.52, "knee length": 0.74, "maxi": 0.94}[spec.length]
  hem = top + (hem0 - top) * j[1]
  flare = {"pencil skirts": -0.02, "a-line skirts": 0.16, "pleated skirts": 0.2,
           "tiered skirts": 0.22}[sub]
  hw = hp + flare * (hem - hip_y) / 0.5
  shapes = []
  if sub == "tiered skirts":
    ys = np.linspace(top + 0.04, hem, 4)
    for k in range(3):
      w0 = ww + (hw - ww) * k / 3
      w1 = ww + (hw - ww) * (k + 1) / 3 + 0.02
      shapes.append(("poly", BODY, [(0.5 - w0, ys[k]), (0.5 + w0, ys[k]), (0.5 + w1, ys[k + 1]),
                                    (0.5 - w1, ys[k + 1])], SEAM))
  else:
    shapes.append(_sym(BODY, [(0.5 + ww, top), (0.5 + hp, hip_y), (0.5 + hw, hem)], SEAM))
  shapes.append(("poly", TRIM, [(0.5 - ww, top), (0.5 + ww, top), (0.5 + ww, top + 0.05),
                                (0.5 - ww, top + 0.05)], SEAM))
  if sub == "pleated skirts":
    for t in np.linspace(-0.8, 0.8, 7):
      shapes.append(("line", SEAM, [(0.5 + t * ww, top + 0.05), (0.5 + t * hw, hem)], 0.008))
  if sub == "pencil skirts":
    if view == "back":
      shapes.append(("line", INSIDE, [(0.5, hem - 0.12), (0.5, hem)], 0.016))
    else:
      for side in (1, -1):
        shapes.append(("line", SEAM, [(0.5 + side * ww * 0.5, top + 0.05),
                                      (0.5 + side * ww * 0.5, top + 0.14)], 0.008))
  if sub == "a-line skirts" and view == "front":
    shapes += _buttons(0.5, top + 0.025, top + 0.025, 1, 0.014)
  logo = (0.5 + ww * 0.55, top + 0.12)
  tag = (0.5 - ww + 0.02, top + 0.006)
  return shapes, logo, tag


def _trousers(spec, view, j):
  sub, g = spec.subcategory, spec.gender
  top = 0.08
  ww = (0.16 if g == "men" else 0.148) * j[0]
  hp = ww + (0.045 if g == "women" else 0.025)
  hip_y, crotch = 0.26, 0.37
  hem0 = 0.45 if sub == "shorts" else {"full length": 0.94, "cropped": 0.8}[spec.length]
  hem = top + (hem0 - top) * j[1]
  leg = {"jeans": 0.1, "chinos": 0.105, "joggers": 0.085, "shorts": 0.15,
         "wide-leg trousers": 0.17}[sub] * j[2]
  out = hp + (0.04 if sub == "wide-leg trousers" else 0.0) - (0.03 if sub == "joggers" else 0.0)
  inner = max(0.012, out - leg)
  pts = [(0.5 + ww, top), (0.5 + hp, hip_y), (0.5 + out, hem), (0.5 + inner, hem), (0.5, crotch)]
  shapes = [("poly", BODY, [(0.5 - ww, top)] + pts + _mirror(pts[::-1])[:-1], SEAM)]
  band = 0.07 if sub == "wide-leg trousers" else 0.045
  shapes.append(("poly", TRIM, [(0.5 - ww, top), (0.5 + ww, top), (0.5 + ww, top + band),
                                (0.5 - ww, top + band)], SEAM))
  if sub in ("joggers", "shorts"):
    for side in (1, -1):
      hem_pts = [(0.5 + side * out, hem - 0.045), (0.5 + side * inner, hem - 0.045),
                 (0.5 + side * inner, hem), (0.5 + side * out, hem)]
      shapes.append(("poly", TRIM, hem_pts, SEAM))
  if view == "front":
    shapes.append(("line", SEAM, [(0.5, top + band), (0.5, crotch - 0.02)], 0.008))
    if sub == "jeans":
      for side in (1, -1):
        shapes.append(("arc", SEAM, (0.5 + side * ww - 0.07, top + band - 0.09,
                                     0.5 + side * ww + 0.07, top + band + 0.07),
                       0 if side < 0 else 90, 90 if side < 0 else 180, 0.008))
        shapes += _buttons(0.5 + side * (ww - 0.07), top + band + 0.01, top + band + 0.01, 1, 0.008)
    elif sub == "joggers":
      for dx in (-0.025, 0.025):
        shapes.append(("line", TRIM, [(0.5 + dx, top + band), (0.5 + dx * 1.3, top + band + 0.1)],
                       0.01))
    else:
      for side in (1, -1):
        shapes.append(("line", SEAM, [(0.5 + side * (ww - 0.04), top + band),
                                      (0.5 + side * (hp - 0.005), hip_y - 0.04)], 0.008))
    if sub in ("chinos", "wide-leg trousers"):
      for side in (1, -1):
        xc = 0.5 + side * (inner + out) / 2
        shapes.append(("line", SEAM, [(0.5 + side * (hp * 0.55), hip_y), (xc, hem - 0.01)], 0.006))
    shapes += _buttons(0.5, top + band / 2, top + band / 2, 1, 0.011)
  else:
    for side in (1, -1):
      x0, x1 = sorted((0.5 + side * 0.03, 0.5 + side * (ww - 0.01)))
      shapes.append(("poly", BODY, [(x0, top + band + 0.04), (x1, top + band + 0.04),
                                    (x1, top + band + 0.13), (x0, top + band + 0.13)], SEAM))
  logo = (0.5 + ww * 0.55, top + band + 0.1)
  tag = (0.5 - ww + 0.02, top + (band - 0.03) / 2)
  return shapes, logo, tag


def _shoe(spec, view, j):
  """Side profile facing right (front view); the back view shows the other (mirrored) side.

  The sole's top line drops from the heel seat (height h above the ball) to the ball, then runs
  flat to the toe; the upper sits on it. Heel and sole wear the secondary colour.
  """
  sub, g = spec.subcategory, spec.gender
  length = (0.8 if g == "men" else 0.7) * j[0]
  x0, x1 = 0.5 - length / 2, 0.5 + length / 2
  xb = x1 - 0.3 * length
  ground = 0.86 if sub == "boots" else 0.72
  h = {"flat": 0.0, "low heel": 0.06, "high heel": 0.16}[spec.heel]
  st = {"sneakers": 0.055, "boots": 0.035, "sandals": 0.035}.get(sub, 0.022)

  def base(x):  # top of the sole at x
    return ground - st - h * min(1.0, max(0.0, (xb - x) / (xb - x0)))

  xs = list(np.linspace(x0, xb, 5)) + [x1]
  sole = ([(x, base(x)) for x in xs] + [(x1 + 0.012, ground - st / 2)]
          + [(x, base(x) + st) for x in xs[::-1]])
  shapes = []
  if h:
    ys = base(x0) + st
    if spec.heel == "low heel":
      heel = [(x0, ys), (x0 + 0.13 * length, base(x0 + 0.13 * length) + st),
              (x0 + 0.11 * length, ground), (x0 + 0.01, ground)]
    else:
      heel = [(x0, ys), (x0 + 0.1 * length, base(x0 + 0.1 * length) + st),
              (x0 + 0.06 * length, ground), (x0 + 0.04 * length, ground)]
    shapes.append(("poly", TRIM, heel, SEAM))
  ch = {"sneakers": 0.17, "boots": 0.46, "pumps": 0.12, "loafers": 0.12, "sandals": 0.16}[sub]
  ch *= j[1]
  at = lambda f: x0 + f * length
  if sub == "sandals":
    shapes.append(("poly", TRIM, sole, SEAM))
    for fa, fb, top_h in ((0.78, 0.93, 0.06), (0.5, 0.64, 0.09), (0.06, 0.2, ch)):
      xa, xb2 = at(fa), at(fb)
      shapes.append(("poly", BODY, [(xa, base(xa)), (xa + 0.015, base(xa) - top_h),
                                    (xb2, base(xb2) - top_h), (xb2 + 0.015, base(xb2))], SEAM))
    shapes += _buttons(at(0.2), base(at(0.2)) - ch + 0.03, base(at(0.2)) - ch + 0.03, 1, 0.014)
    logo = (at(0.13), base(at(0.13)) - ch * 0.55)
  else:
    if sub == "sneakers":
      top = [(x0 - 0.015, base(x0) - ch), (at(0.17), base(at(0.17)) - ch * 0.75),
             (at(0.42), base(at(0.42)) - ch * 1.2), (at(0.62), base(at(0.62)) - ch * 0.7),
             (at(0.9), base(x1) - 0.075), (x1 + 0.012, base(x1) - 0.03)]
    elif sub == "boots":
      top = [(x0 - 0.012, base(x0) - ch), (at(0.36), base(at(0.36)) - ch),
             (at(0.44), base(at(0.44)) - 0.16), (at(0.88), base(x1) - 0.085),
             (x1 + 0.012, base(x1) - 0.035)]
    elif sub == "pumps":
      top = [(x0 - 0.008, base(x0) - ch), (at(0.3), base(at(0.3)) - ch * 0.55),
             (at(0.55), base(at(0.55)) - 0.04), (at(0.86), base(x1) - 0.065),
             (x1 + 0.035, base(x1) - 0.012)]
    else:  # loafers
      top = [(x0 - 0.01, base(x0) - ch), (at(0.4), base(at(0.4)) - ch * 0.85),
             (at(0.56), base(at(0.56)) - ch * 1.05), (at(0.88), base(x1) - 0.07),
             (x1 + 0.012, base(x1) - 0.03)]
    upper = top + [(x, base(x)) for x in xs[::-1]]
    shapes.append(("poly", BODY, upper, SEAM))
    shapes.append(("poly", TRIM, sole, SEAM))
    if sub == "sneakers":
      for k in range(4):
        t = at(0.44 + 0.06 * k)
        yy = base(t) - ch * (1.1 - 0.13 * k)
        shapes.append(("line", SEAM, [(t - 0.012, yy), (t + 0.025, yy + 0.03)], 0.01))
      shapes.append(("line", SEAM, [(at(0.02), base(x0) - 0.012), (at(0.93), base(x1) - 0.012)],
                     0.008))
    if sub == "loafers":
      ya = base(at(0.5)) - ch * 0.8
      shapes.append(("poly", SEAM, [(at(0.46), ya), (at(0.62), ya + 0.012), (at(0.62), ya + 0.04),
                                    (at(0.46), ya + 0.028)], None))
      shapes.append(("line", INSIDE, [(at(0.51), ya + 0.02), (at(0.57), ya + 0.024)], 0.01))
    if sub == "boots":
      yt = base(x0) - ch
      shapes.append(("poly", TRIM, [(x0 - 0.012, yt), (x0 + 0.02, yt), (x0 + 0.02, yt + 0.07),
                                    (x0 - 0.012, yt + 0.07)], SEAM))
      shapes.append(("line", SEAM, [(at(0.3), yt + 0.02), (at(0.3), base(at(0.3)))], 0.008))
    if sub == "pumps":
      shapes.append(("poly", INSIDE, [(x0 + 0.01, base(x0) - ch + 0.012),
                                      (at(0.3), base(at(0.3)) - ch * 0.55 + 0.01),
                                      (at(0.53), base(at(0.53)) - 0.035),
                                      (at(0.3), base(at(0.3)) - ch * 0.4)], None))
    logo = (at(0.2 if sub != "boots" else 0.17),
            base(at(0.2)) - min(0.065, ch * 0.45) - (0.12 if sub == "boots" else 0.0))
  tag = (max(0.02, x0 - 0.08), base(x0) - ch * 0.8)
  if view == "back":  # the other side of the shoe
    shapes = [_mirror_shape(s) for s in shapes]
  return shapes, logo, tag


def _mirror_shape(s):
  kind = s[0]
  if kind in ("poly", "line"):
    return (kind, s[1], _mirror(s[2])) + s[3:]
  x0, y0, x1, y1 = s[2]
  box = (1 - x1, y0, 1 - x0, y1)
  if kind in ("pie", "arc"):
    return (kind, s[1], box, (180 - s[4]) % 360, (180 - s[3]) % 360) + s[5:]
  return (kind, s[1], box) + s[3:]


def _bag(spec, view, j):
  sub = spec.subcategory
  w = j[0]
  shapes = []
  front = view == "front"
  if sub == "tote bags":
    for x0 in (0.3, 0.54):
      shapes.append(("arc", TRIM, (x0, 0.16, x0 + 0.16, 0.56), 180, 360, 0.022))
    body = [(0.5 - 0.27 * w, 0.38), (0.5 + 0.27 * w, 0.38), (0.5 + 0.31 * w, 0.86 * j[1]),
            (0.5 - 0.31 * w, 0.86 * j[1])]
    shapes.append(("poly", BODY, body, SEAM))
    shapes.append(("poly", TRIM, [(0.5 - 0.27 * w, 0.38), (0.5 + 0.27 * w, 0.38),
                                  (0.5 + 0.272 * w, 0.415), (0.5 - 0.272 * w, 0.415)], SEAM))
    logo, tag = (0.5, 0.62), (0.5 - 0.25 * w, 0.45)
  elif sub == "backpacks":
    shapes.append(("arc", TRIM, (0.42, 0.12, 0.58, 0.3), 180, 360, 0.02))
    for side in (1, -1):
      shapes.append(("poly", TRIM, [(0.5 + side * 0.2 * w, 0.28), (0.5 + side * 0.27 * w, 0.3),
                                    (0.5 + side * 0.28 * w, 0.8), (0.5 + side * 0.23 * w, 0.8)], SEAM))
    body = [(0.5 - 0.18 * w, 0.2), (0.5 + 0.18 * w, 0.2), (0.5 + 0.25 * w, 0.3),
            (0.5 + 0.25 * w, 0.88 * j[1]), (0.5 - 0.25 * w, 0.88 * j[1]), (0.5 - 0.25 * w, 0.3)]
    shapes.append(("poly", BODY, body, SEAM))
    if front:
      shapes.append(("poly", BODY, [(0.5 - 0.17 * w, 0.56), (0.5 + 0.17 * w, 0.56),
                                    (0.5 + 0.17 * w, 0.82), (0.5 - 0.17 * w, 0.82)], SEAM))
      shapes.append(("line", METAL_LABEL, [(0.5 - 0.15 * w, 0.585), (0.5 + 0.15 * w, 0.585)], 0.01))
      shapes.append(("line", METAL_LABEL, [(0.5 - 0.2 * w, 0.27), (0.5 + 0.2 * w, 0.27)], 0.01))
    else:
      for side in (1, -1):
        shapes.append(("poly", TRIM, [(0.5 + side * 0.06, 0.24), (0.5 + side * 0.14, 0.24),
                                      (0.5 + side * 0.2, 0.8), (0.5 + side * 0.12, 0.8)], SEAM))
    logo, tag = (0.5, 0.45), (0.5 - 0.2 * w, 0.33)
  elif sub == "crossbody bags":
    strap = [(0.29, 0.52), (0.36, 0.18), (0.5, 0.1), (0.64, 0.18), (0.71, 0.52)]
    if spec.strap == "chain strap":
      shapes += _chain(strap)
    else:
      shapes.append(("line", TRIM, strap, 0.02))
    body = [(0.5 - 0.24 * w, 0.5), (0.5 + 0.24 * w, 0.5), (0.5 + 0.24 * w, 0.82 * j[1]),
            (0.5 - 0.24 * w, 0.82 * j[1])]
    shapes.append(("poly", BODY, body, SEAM))
    if front:
      shapes.append(("poly", BODY, [(0.5 - 0.24 * w, 0.5), (0.5 + 0.24 * w, 0.5),
                                    (0.5 + 0.24 * w, 0.66), (0.5, 0.7), (0.5 - 0.24 * w, 0.66)], SEAM))
      shapes.append(("line", TRIM, [(0.5 - 0.24 * w, 0.66), (0.5, 0.7), (0.5 + 0.24 * w, 0.66)],
                     0.014))
      shapes += _buttons(0.5, 0.69, 0.69, 1, 0.016)
    logo, tag = (0.5 + 0.13 * w, 0.58), (0.5 - 0.21 * w, 0.53)
  elif sub == "clutches":
    if spec.strap == "chain strap":
      shapes += _chain([(0.2, 0.44), (0.12, 0.3), (0.2, 0.18), (0.32, 0.24), (0.3, 0.42)])
    body = [(0.5 - 0.32 * w, 0.42), (0.5 + 0.32 * w, 0.42), (0.5 + 0.32 * w, 0.72 * j[1]),
            (0.5 - 0.32 * w, 0.72 * j[1])]
    shapes.append(("poly", BODY, body, SEAM))
    shapes.append(("line", TRIM, [(0.5 - 0.32 * w, 0.425), (0.5 + 0.32 * w, 0.425)], 0.02))
    if front:
      shapes.append(("poly", BODY, [(0.5 - 0.32 * w, 0.43), (0.5 + 0.32 * w, 0.43), (0.5, 0.62)],
                     SEAM))
      shapes.append(("line", TRIM, [(0.5 - 0.31 * w, 0.44), (0.5, 0.615), (0.5 + 0.31 * w, 0.44)],
                     0.016))
      shapes += _buttons(0.5, 0.61, 0.61, 1, 0.016)
    logo, tag = (0.5 + 0.2 * w, 0.64), (0.5 - 0.29 * w, 0.62)
  else:
    raise ValueError(f"no bag geometry for {sub!r}")
  return shapes, logo, tag


def _chain(points):
  pts = np.array(points)
  seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
  t = np.concatenate([[0], np.cumsum(seg)])
  out = []
  for s in np.arange(0, t[-1], 0.03):
    x = np.interp(s, t, pts[:, 0])
    y = np.interp(s, t, pts[:, 1])
    out.append(("ellipse", METAL_LABEL, (x - 0.012, y - 0.012, x + 0.012, y + 0.012), SEAM))
  return out


def _hat(spec, view, j):
  sub = spec.subcategory
  w = j[0]
  shapes = []
  if sub == "caps":
    peak = (0.44, 0.56, 0.96, 0.68) if view == "front" else (0.04, 0.56, 0.56, 0.68)
    shapes.append(("ellipse", TRIM, peak, SEAM))
    shapes.append(("pie", BODY, (0.5 - 0.3 * w, 0.3, 0.5 + 0.3 * w, 0.92), 180, 360, SEAM))
    for dx in (-0.12, 0.0, 0.12):
      shapes.append(("line", SEAM, [(0.5, 0.31), (0.5 + dx * 1.8 * w, 0.61)], 0.008))
    shapes.append(("ellipse", TRIM, (0.48, 0.28, 0.52, 0.32), None))
    if view == "back":
      shapes.append(("pie", INSIDE, (0.43, 0.52, 0.57, 0.68), 180, 360, None))
    logo, tag = (0.5 - 0.1 * w, 0.47), (0.5 + 0.33 * w, 0.3)
  elif sub == "beanies":
    shapes.append(("pie", BODY, (0.5 - 0.26 * w, 0.22, 0.5 + 0.26 * w, 0.96), 180, 360, SEAM))
    shapes.append(("ellipse", TRIM, (0.44, 0.15, 0.56, 0.27), SEAM))
    shapes.append(("poly", TRIM, [(0.5 - 0.27 * w, 0.5), (0.5 + 0.27 * w, 0.5),
                                  (0.5 + 0.27 * w, 0.68), (0.5 - 0.27 * w, 0.68)], SEAM))
    for t in np.linspace(-0.22, 0.22, 8):
      shapes.append(("line", SEAM, [(0.5 + t * w, 0.52), (0.5 + t * w, 0.66)], 0.006))
    logo, tag = (0.5 + 0.12 * w, 0.4), (0.5 - 0.24 * w, 0.56)
  elif sub in ("fedoras", "bucket hats"):
    if sub == "fedoras":
      shapes.append(("ellipse", BODY, (0.5 - 0.38 * w, 0.52, 0.5 + 0.38 * w, 0.68), SEAM))
      crown = [(0.5 - 0.19 * w, 0.6), (0.5 - 0.16 * w, 0.3), (0.5, 0.34), (0.5 + 0.16 * w, 0.3),
               (0.5 + 0.19 * w, 0.6)]
    else:
      shapes.append(("poly", BODY, [(0.5 - 0.22 * w, 0.52), (0.5 + 0.22 * w, 0.52),
                                    (0.5 + 0.34 * w, 0.72), (0.5 - 0.34 * w, 0.72)], SEAM))
      shapes.append(("line", TRIM, [(0.5 - 0.34 * w, 0.715), (0.5 + 0.34 * w, 0.715)], 0.016))
      for k in (0.58, 0.64):
        shapes.append(("line", SEAM, [(0.5 - (0.22 + (k - 0.52) * 0.6) * w, k),
                                      (0.5 + (0.22 + (k - 0.52) * 0.6) * w, k)], 0.006))
      crown = [(0.5 - 0.2 * w, 0.56), (0.5 - 0.17 * w, 0.3), (0.5 + 0.17 * w, 0.3),
               (0.5 + 0.2 * w, 0.56)]
    shapes.append(("poly", BODY, crown, SEAM))
    shapes.append(("poly", TRIM, [(0.5 - 0.187 * w, 0.5), (0.5 + 0.187 * w, 0.5),
                                  (0.5 + 0.19 * w, 0.56), (0.5 - 0.19 * w, 0.56)], SEAM))
    logo, tag = (0.5, 0.41), (0.5 - 0.16 * w, 0.33)
  else:
    raise ValueError(f"no hat geometry for {sub!r}")
  return shapes, logo, tag


def _scarf(spec, view, j):
  w = j[0]
  shapes = [("ellipse", BODY, (0.5 - 0.2 * w, 0.08, 0.5 + 0.2 * w, 0.36), SEAM),
            ("ellipse", INSIDE, (0.5 - 0.12 * w, 0.13, 0.5 + 0.12 * w, 0.28), None)]
  ends = [[(0.32, 0.24), (0.46, 0.24), (0.47, 0.86 * j[1]), (0.33, 0.86 * j[1])],
          [(0.5, 0.26), (0.66, 0.22), (0.67, 0.8 * j[1]), (0.53, 0.8 * j[1])]]
  if view == "back":
    ends = [_mirror(e) for e in ends]
  for e in ends:
    shapes.append(("poly", BODY, e, SEAM))
    y = e[2][1]
    for x in np.linspace(e[3][0] + 0.01, e[2][0] - 0.01, 6):
      shapes.append(("line", TRIM, [(x, y), (x, y + 0.06)], 0.01))
  logo = (0.6, 0.7 * j[1]) if view == "front" else (0.4, 0.7)
  return shapes, logo, (0.35, 0.7 * j[1])


def _belt(spec, view, j):
  t = 0.08 * j[0]
  shapes = [("poly", BODY, [(0.06, 0.5 - t), (0.88, 0.5 - t), (0.95, 0.5), (0.88, 0.5 + t),
                            (0.06, 0.5 + t)], SEAM)]
  shapes.append(("poly", METAL_LABEL, [(0.12, 0.5 - t - 0.04), (0.24, 0.5 - t - 0.04),
                                       (0.24, 0.5 + t + 0.04), (0.12, 0.5 + t + 0.04)], SEAM))
  shapes.append(("poly", BODY if view == "back" else INSIDE,
                 [(0.145, 0.5 - t - 0.01), (0.215, 0.5 - t - 0.01), (0.215, 0.5 + t + 0.01),
                  (0.145, 0.5 + t + 0.01)], None))
  shapes.append(("line", METAL_LABEL, [(0.14, 0.5), (0.26, 0.5)], 0.012))
  shapes.append(("poly", TRIM, [(0.28, 0.5 - t - 0.012), (0.32, 0.5 - t - 0.012),
                                (0.32, 0.5 + t + 0.012), (0.28, 0.5 + t + 0.012)], SEAM))
  for x in (0.7, 0.76, 0.82):
    shapes.append(("ellipse", INSIDE, (x - 0.012, 0.488, x + 0.012, 0.512), None))
  if view == "back":
    shapes = [_mirror_shape(s) for s in shapes]
  return shapes, (0.5, 0.5), (0.82, 0.5 + t + 0.04)


def _glove(spec, view, j):
  w = j[0]
  shapes = []
  for k, (dx, h) in enumerate(((-0.1, 0.2), (-0.033, 0.25), (0.033, 0.24), (0.1, 0.19))):
    x = 0.5 + dx * w
    shapes.append(("poly", BODY, [(x - 0.032, 0.42), (x - 0.03, 0.42 - h), (x, 0.4 - h - 0.02),
                                  (x + 0.03, 0.42 - h), (x + 0.032, 0.42)], SEAM))
  thumb_side = -1 if view == "front" else 1
  shapes.append(("poly", BODY, [(0.5 + thumb_side * 0.12 * w, 0.5), (0.5 + thumb_side * 0.24 * w, 0.36),
                                (0.5 + thumb_side * 0.27 * w, 0.4), (0.5 + thumb_side * 0.15 * w, 0.62)],
                 SEAM))
  shapes.append(("poly", BODY, [(0.5 - 0.14 * w, 0.4), (0.5 + 0.14 * w, 0.4), (0.5 + 0.13 * w, 0.7),
                                (0.5 - 0.13 * w, 0.7)], SEAM))
  shapes.append(("poly", TRIM, [(0.5 - 0.14 * w, 0.68), (0.5 + 0.14 * w, 0.68),
                                (0.5 + 0.16 * w, 0.86 * j[1]), (0.5 - 0.16 * w, 0.86 * j[1])], SEAM))
  for dx in (-0.05, 0.0, 0.05):
    shapes.append(("line", SEAM, [(0.5 + dx * w, 0.44), (0.5 + dx * w, 0.52)], 0.006))
  return shapes, (0.5 + 0.05 * w, 0.6), (0.5 - 0.12 * w, 0.7)


_FAMILIES = {"upper": _upper, "dress": _dress, "skirt": _skirt, "trousers": _trousers,
             "shoe": _shoe, "bag": _bag, "hat": _hat, "scarf": _scarf, "belt": _belt,
             "glove": _glove}


def geometry(spec, view):
  """(shapes, logo centre (x, y), tag top-left (x, y)) in normalised coordinates."""
  family = catalog.SUBCATEGORIES[spec.subcategory].family
  return _FAMILIES[family](spec, view, spec.jitter)


def rasterize(shapes, size):
  """Label map uint8 [size, size] of the shapes, drawn in order."""
  img = Image.new("L", (size, size), 0)
  d = ImageDraw.Draw(img)
  s = size
  for sh in shapes:
    kind, label = sh[0], sh[1]
    if kind == "poly":
      d.polygon([(x * s, y * s) for x, y in sh[2]], fill=label, outline=sh[3])
    elif kind == "ellipse":
      x0, y0, x1, y1 = sh[2]
      d.ellipse((x0 * s, y0 * s, max(x0 * s, x1 * s - 1), max(y0 * s, y1 * s - 1)), fill=label,
                outline=sh[3])
    elif kind == "line":
      d.line([(x * s, y * s) for x, y in sh[2]], fill=label, width=max(1, int(round(sh[3] * s))))
    elif kind == "pie":
      x0, y0, x1, y1 = sh[2]
      d.pieslice((x0 * s, y0 * s, x1 * s, y1 * s), sh[3], sh[4], fill=label, outline=sh[5])
    elif kind == "arc":
      x0, y0, x1, y1 = sh[2]
      d.arc((x0 * s, y0 * s, x1 * s, y1 * s), sh[3], sh[4], fill=label,
            width=max(1, int(round(sh[5] * s))))
    else:
      raise ValueError(f"unknown shape kind {kind!r}")
  return np.asarray(img)


# ------------------------------------------------------------------------------------------------
# Patterns and textures (cached).
# ------------------------------------------------------------------------------------------------

def pattern_period(pattern, size):
  """Period in pixels of `pattern` at image size `size` (0 for solid)."""
  frac = {"solid": 0.0, "stripes": 0.094, "pinstripes": 0.07, "checks": 0.125, "dots": 0.11,
          "diagonal": 0.094, "chevron": 0.1}[pattern]
  return 0 if not frac else max(4, int(round(frac * size)))


@functools.lru_cache(maxsize=128)
def _pattern_tile(pattern, size):
  """bool [2 * size, 2 * size] pattern mask (True = secondary colour); cropped at a phase."""
  p = pattern_period(pattern, size)
  n = 2 * size
  y, x = np.mgrid[0:n, 0:n]
  if pattern == "stripes":
    m = (y % p) < max(1, p // 3)
  elif pattern == "pinstripes":
    m = (x % p) < max(1, p // 5)
  elif pattern == "checks":
    w = max(1, p // 5)
    m = ((x % p) < w) | ((y % p) < w)
  elif pattern == "dots":
    r = 0.28 * p
    yy = y % p - (p - 1) / 2
    xx = (x + (y // p % 2) * (p // 2)) % p - (p - 1) / 2
    m = yy * yy + xx * xx <= r * r
  elif pattern == "diagonal":
    m = ((x + y) % p) < max(1, p // 3)
  elif pattern == "chevron":
    tri = np.abs((x % (2 * p)) - p)
    m = ((y + tri) % p) < max(1, p // 3)
  else:
    raise ValueError(f"unknown pattern {pattern!r}")
  m.flags.writeable = False
  return m


def pattern_mask(pattern, size, phase=(0.0, 0.0)):
  """bool [size, size]: where the pattern puts the secondary colour (all False for solid)."""
  if pattern == "solid":
    return np.zeros((size, size), bool)
  p = pattern_period(pattern, size)
  oy, ox = int(phase[0] * 2 * p), int(phase[1] * 2 * p)
  return _pattern_tile(pattern, size)[oy:oy + size, ox:ox + size]


def _smooth_noise(rng, size, cells):
  small = rng.standard_normal((cells, cells)).astype(np.float32)
  img = Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC)
  a = np.asarray(img)
  return a / (a.std() + 1e-6)


@functools.lru_cache(maxsize=64)
def texture(material, size):
  """float32 [size, size] multiplicative texture of `material` (mean ~1), with soft top light."""
  rng = np.random.default_rng((sum(map(ord, material)), size))
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  fine = rng.standard_normal((size, size)).astype(np.float32)
  t = max(3.0, size / 21)
  if material == "cotton":
    m = 1 + 0.035 * fine
  elif material == "denim":
    m = 1 + 0.08 * np.sin(2 * np.pi * (x + y) / t) + 0.03 * fine
  elif material == "wool":
    m = 1 + 0.08 * np.cos(2 * np.pi * x / t) + 0.02 * fine
  elif material == "leather":
    m = 1 + 0.07 * _smooth_noise(rng, size, 5) + 0.02 * fine
  elif material == "silk":
    m = 1 + 0.11 * np.sin(2 * np.pi * (0.7 * x + y) / (0.45 * size))
  elif material == "linen":
    m = (1 + 0.05 * rng.standard_normal((size, 1)) + 0.05 * rng.standard_normal((1, size))
         + 0.015 * fine)
  elif material == "polyester":
    m = 1 + 0.008 * fine
  elif material == "cashmere":
    m = 1 + 0.05 * _smooth_noise(rng, size, max(4, size // 6))
  else:
    raise ValueError(f"unknown material {material!r}")
  shade = 1.04 - 0.08 * y / size
  out = (m * shade).astype(np.float32)
  out.flags.writeable = False
  return out


TEX_LEVELS = 64
TEX_RANGE = (0.7, 1.3)


@functools.lru_cache(maxsize=64)
def _texture_levels(material, size):
  """texture(material, size) quantised to TEX_LEVELS levels over TEX_RANGE: uint16 [S, S]."""
  lo, hi = TEX_RANGE
  q = np.round((texture(material, size) - lo) / (hi - lo) * (TEX_LEVELS - 1))
  out = np.clip(q, 0, TEX_LEVELS - 1).astype(np.uint16)
  out.flags.writeable = False
  return out


# ------------------------------------------------------------------------------------------------
# Composition.
# ------------------------------------------------------------------------------------------------

def _palette(spec):
  """float32 [8, 3]: the flat colour of every label (and of pattern pixels, label 6)."""
  prim = np.array(catalog.COLORS[spec.primary_color], np.float32)
  sec = np.array(catalog.COLORS[spec.secondary_color], np.float32)
  pal = np.zeros((8, 3), np.float32)
  pal[0] = BACKGROUND
  pal[BODY] = prim
  pal[TRIM] = sec
  pal[INSIDE] = prim * 0.45
  pal[METAL_LABEL] = METAL
  pal[SEAM] = prim * 0.68 + 8
  pal[_PATTERN_LABEL] = sec
  return pal


def _color_lut(pal):
  """uint8 [8 * TEX_LEVELS, 3]: colour of (label, texture level); bg and metal are untextured."""
  lo, hi = TEX_RANGE
  levels = lo + (hi - lo) * np.arange(TEX_LEVELS, dtype=np.float32) / (TEX_LEVELS - 1)
  lut = pal[:, None, :] * levels[None, :, None]
  lut[0] = pal[0]
  lut[METAL_LABEL] = pal[METAL_LABEL]
  return np.clip(np.round(lut), 0, 255).astype(np.uint8).reshape(-1, 3)


def logo_contrast(primary_color):
  """RGB of the glyph cells: black on light primaries, white on dark ones."""
  r, g, b = catalog.COLORS[primary_color]
  return (20, 20, 20) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (245, 245, 245)


def _box(center, size, cells):
  """Top-left pixel and extent of a `cells` x `cells` block of cell_size(size) centred at center."""
  c = cell_size(size)
  n = cells * c
  x0 = int(round(center[0] * size - n / 2))
  y0 = int(round(center[1] * size - n / 2))
  x0 = min(max(x0, 0), size - n)
  y0 = min(max(y0, 0), size - n)
  return y0, x0, n


def logo_box(spec, size):
  """(y0, x0, y1, x1) pixels of the 5x5-cell glyph in the front view at `size`."""
  _, logo, _ = geometry(spec, "front")
  y0, x0, n = _box(logo, size, 7)
  c = cell_size(size)
  return y0 + c, x0 + c, y0 + 6 * c, x0 + 6 * c


def tag_box(spec, size):
  """(y0, x0, y1, x1) pixels of the 2x4-cell season tag in the front view at `size`."""
  _, _, tag = geometry(spec, "front")
  c = cell_size(size)
  x0 = min(max(int(round(tag[0] * size)), 0), size - 4 * c)
  y0 = min(max(int(round(tag[1] * size)), 0), size - 2 * c)
  return y0, x0, y0 + 2 * c, x0 + 4 * c


def season_bits(season):
  """bool [2, 4] cells of the season tag (True = dark)."""
  if season not in catalog.SEASONS:
    raise ValueError(f"unknown season {season!r}")
  fw = season.startswith("FW")
  y = int(season[2:]) - 2014
  return np.array([[fw, y & 4, y & 2, y & 1], [1, 0, 1, 0]], bool)


@functools.lru_cache(maxsize=4096)
def _glyph_pixels(brand, c):
  g = catalog.brand_glyph(brand)
  return np.kron(g, np.ones((c, c), bool))


def _compose(spec, view, size):
  """(image uint8 [size, size, 3], labels uint8 [size, size], logo box or None) of one view.

  image[y, x] = round(palette[label'] * texture[y, x]) with label' = 6 on patterned body pixels,
  the texture quantised to TEX_LEVELS levels so the product is one table look-up.
  """
  shapes, logo, tag = geometry(spec, "back" if view == "back" else "front")
  lab = rasterize(shapes, size)
  idx = lab.astype(np.uint16)
  if spec.pattern != "solid":
    idx[(lab == BODY) & pattern_mask(spec.pattern, size, spec.pattern_phase)] = _PATTERN_LABEL
  pal = _palette(spec)
  idx *= TEX_LEVELS
  idx += _texture_levels(spec.material, size)
  img = _color_lut(pal)[idx]
  box = None
  if view != "back":
    c = cell_size(size)
    y0, x0, n = _box(logo, size, 7)
    img[y0:y0 + n, x0:x0 + n] = np.round(pal[BODY]).astype(np.uint8)
    gy, gx = y0 + c, x0 + c
    img[gy:gy + 5 * c, gx:gx + 5 * c][_glyph_pixels(spec.brand, c)] = logo_contrast(
        spec.primary_color)
    box = (gy, gx, gy + 5 * c, gx + 5 * c)
    ty0, tx0, _, _ = tag_box(spec, size)
    img[ty0:ty0 + 2 * c, tx0:tx0 + 4 * c] = np.where(
        _tag_pixels(spec.season, c)[..., None], np.uint8(TAG_ON), np.uint8(TAG_OFF))
  return img, lab, box


@functools.lru_cache(maxsize=256)
def _tag_pixels(season, c):
  return np.kron(season_bits(season), np.ones((c, c), bool))


def render_view(spec, view, size):
  """One view, uint8 [size, size, 3]."""
  if view == "front" or view == "back":
    return _compose(spec, view, size)[0]
  if view == "detail":
    big, _, box = _compose(spec, "front", 2 * size)
    cy, cx = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    y0 = min(max(cy - size // 2, 0), size)
    x0 = min(max(cx - size // 2, 0), size)
    return np.ascontiguousarray(big[y0:y0 + size, x0:x0 + size])
  if view == "shifted":
    return _shifted(_compose(spec, "front", size)[0], spec.view_params)
  raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def _shifted(img, params):
  """Rotate by `angle` degrees, scale, shift (fractions of the size) about the centre."""
  angle, scale, sx, sy = params
  size = img.shape[0]
  a = math.radians(angle)
  cos, sin = math.cos(a) / scale, math.sin(a) / scale
  c = (size - 1) / 2
  # Inverse map output (u, v) -> input (x, y): x = cos*(u-c-tx) + sin*(v-c-ty) + c, ...
  tx, ty = sx * size, sy * size
  coeffs = (cos, sin, c - cos * (c + tx) - sin * (c + ty),
            -sin, cos, c + sin * (c + tx) - cos * (c + ty))
  out = Image.fromarray(img).transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                       fillcolor=BACKGROUND)
  return np.asarray(out)


def render_views(spec, size):
  """(list of uint8 [size, size, 3], one per spec.views; logo box (ymin, xmin, ymax, xmax) / size)."""
  if size < 32:
    raise ValueError(f"image size {size} is too small; use >= 32 so the logo keeps its cells")
  front, _, box = _compose(spec, "front", size)
  out = []
  for v in spec.views:
    if v == "front":
      out.append(front)
    elif v == "shifted":
      out.append(_shifted(front, spec.view_params))
    else:
      out.append(render_view(spec, v, size))
  return out, tuple(b / size for b in box)


def render_front(spec, size):
  """(front image uint8 [S, S, 3], label map uint8 [S, S]) for analysis and tests."""
  img, lab, _ = _compose(spec, "front", size)
  return img, lab


def make_product(spec, seed=0, image_size=64):
  """The product dict of `spec`: schema fields, EXTRA_FIELDS and images (list of uint8 [S,S,3]).

  `logo_box` is "ymin xmin ymax xmax" of the brand mark in the front view, as fractions of the
  image size (ground truth for localization probes).
  """
  title, description = catalog.describe(spec, seed)
  images, logo_box = render_views(spec, image_size)
  out = catalog.spec_fields(spec)
  out.update(title=title, description=description, images=images,
             logo_box=" ".join(f"{v:.4f}" for v in logo_box))
  return out


def generate_products(split, n, seed=0, image_size=64, start=0) -> Iterator[dict]:
  """Yields products start..start+n-1 of `split` (see make_product)."""
  catalog.check_split(split)
  if n < 0 or start < 0:
    raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
  for i in range(start, start + n):
    yield make_product(catalog.sample_spec(split, i, seed), seed, image_size)
