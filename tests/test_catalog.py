"""The synthetic catalog keeps its promises: splits, text that names what is drawn, determinism.

Pixel checks analyse the rendered images with rules written here (colour nearest to the named
one, glyph decoding, season bits, line purity of the pattern, texture correlation), so a renderer
that drew something other than what the text names would fail them.
"""

import collections
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from fashion_jax.data import catalog
from fashion_jax.data import derived
from fashion_jax.data import render

IN_DIST = ("train", "validation", "test")


@pytest.fixture(scope="module")
def specs():
  n = {"train": 3000, "validation": 300, "test": 300, "holdout_category": 300,
       "holdout_brand": 300, "improbable": 600}
  return {s: [catalog.sample_spec(s, i, seed=0) for i in range(k)] for s, k in n.items()}


# ------------------------------------------------------------------------------------------------
# Vocabulary and splits.
# ------------------------------------------------------------------------------------------------

def test_vocabulary_sizes():
  assert len(catalog.CATEGORIES) >= 8
  assert len(catalog.SUBCATEGORIES) >= 30
  assert len(catalog.COLORS) >= 12
  assert len(catalog.PATTERNS) >= 6
  assert len(set(catalog.BRANDS)) == len(catalog.BRANDS) >= 40
  assert set(catalog.SEASONS) == {f"{h}{y}" for h in ("SS", "FW") for y in range(2014, 2021)}
  g = catalog.BRAND_GLYPHS.reshape(len(catalog.BRANDS), -1)
  dist = (g[:, None] != g[None]).sum(-1) + 25 * np.eye(len(g), dtype=int)
  assert dist.min() >= 5  # glyphs stay tellable apart after a few flipped cells


def test_in_distribution_splits_exclude_holdouts_and_improbable(specs):
  for split in IN_DIST:
    for s in specs[split]:
      assert s.subcategory not in catalog.HOLDOUT_SUBCATEGORIES, s
      assert s.brand not in catalog.HOLDOUT_BRANDS, s
      assert s.category in catalog.brand_categories(s.brand), s
      assert (s.primary_color, s.secondary_color) not in catalog.IMPROBABLE_COLOR_PAIRS, s
      assert s.novelty == ""


def test_probe_splits_keep_their_promises(specs):
  train = specs["train"]
  train_subcats = {s.subcategory for s in train}
  train_brands = {s.brand for s in train}
  train_brand_cats = {(s.brand, s.category) for s in train}
  train_pairs = {(s.primary_color, s.secondary_color) for s in train}

  hc = specs["holdout_category"]
  assert {s.subcategory for s in hc} == set(catalog.HOLDOUT_SUBCATEGORIES)
  assert not {s.subcategory for s in hc} & train_subcats
  assert all(s.brand in train_brands and s.novelty == "subcategory" for s in hc)

  hb = specs["holdout_brand"]
  assert {s.brand for s in hb} == set(catalog.HOLDOUT_BRANDS)
  assert not {s.brand for s in hb} & train_brands
  assert all(s.subcategory in train_subcats and s.novelty == "brand" for s in hb)

  kinds = collections.Counter()
  for s in specs["improbable"]:
    kinds[s.novelty] += 1
    assert s.subcategory in train_subcats and s.brand in train_brands
    if s.novelty == "brand_category":
      assert (s.brand, s.category) not in train_brand_cats
      assert s.category not in catalog.brand_categories(s.brand)
    else:
      assert s.novelty == "color_order"
      pair = (s.primary_color, s.secondary_color)
      assert pair in catalog.IMPROBABLE_COLOR_PAIRS and pair not in train_pairs
      # The compositional contrast exists: the reverse order is an ordinary train pair.
      assert pair[::-1] in train_pairs
  assert kinds["brand_category"] > 100 and kinds["color_order"] > 100


def test_product_ids_unique_across_splits(specs):
  ids = [s.product_id for ss in specs.values() for s in ss]
  assert len(ids) == len(set(ids))


def test_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    catalog.sample_spec("dev", 0)
  with pytest.raises(ValueError, match="unknown brand 'Prada'"):
    catalog.brand_glyph("Prada")


# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------

def _mentions(text, phrase):
  return re.search(r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])", text) is not None


def test_text_names_only_true_attributes(specs):
  phrases = catalog.text_phrases()
  named = collections.Counter()
  for s in specs["train"][:800]:
    title, desc = catalog.describe(s, seed=0)
    text = f"{title} {desc}".lower()
    # Colours: only the two drawn colours are ever named; the primary always is.
    colors = {c for c in catalog.COLORS if _mentions(text, c)}
    assert colors <= {s.primary_color, s.secondary_color}, (s, text)
    assert s.primary_color in colors, (s, text)
    for attr in ("pattern", "material", "brand") + catalog.SHAPE_ATTR_NAMES:
      truth = getattr(s, attr)
      for value, value_phrases in phrases[attr].items():
        hit = any(_mentions(text, p) for p in value_phrases)
        if value != truth:
          assert not hit, (attr, value, s, text)
        elif hit:
          named[attr] += 1
    nouns = catalog.SUBCATEGORIES[s.subcategory].nouns
    assert any(title.lower().endswith(n) for n in nouns), (title, s.subcategory)
    other_gender = {"men": ("women's",), "women": ("men's",), "unisex": ("men's", "women's")}
    assert not any(_mentions(text, w) for w in other_gender[s.gender])
  # Attributes are named often but not always (some are left unsaid).
  for attr in ("pattern", "material", "sleeve", "brand"):
    assert 0 < named[attr] < 800, (attr, named)


def test_descriptions_vary_and_contain_irrelevant_phrases(specs):
  descs = [catalog.describe(s, 0)[1] for s in specs["train"][:300]]
  assert len(set(descs)) == len(descs)
  irrelevant = sum(any(p in d for p in catalog.IRRELEVANT_PHRASES) for d in descs)
  assert 0.4 * len(descs) < irrelevant < len(descs)
  # Sentence order varies: the material sentence is not always in the same position.
  first_words = collections.Counter(d.split(". ")[1].split()[0] for d in descs if ". " in d)
  assert len(first_words) > 5


# ------------------------------------------------------------------------------------------------
# Determinism.
# ------------------------------------------------------------------------------------------------

def _products_equal(a, b):
  return (all(a[k] == b[k] for k in a if k != "images") and len(a["images"]) == len(b["images"])
          and all(np.array_equal(x, y) for x, y in zip(a["images"], b["images"])))


def test_products_are_deterministic_and_independent_of_position():
  a = list(render.generate_products("train", 4, seed=5, image_size=64))
  b = list(render.generate_products("train", 4, seed=5, image_size=64))
  assert all(_products_equal(x, y) for x, y in zip(a, b))
  c = next(render.generate_products("train", 1, seed=5, image_size=64, start=3))
  assert _products_equal(a[3], c)
  d = list(render.generate_products("train", 4, seed=6, image_size=64))
  assert not any(_products_equal(x, y) for x, y in zip(a, d))


def test_product_schema_and_views():
  for p in render.generate_products("validation", 20, seed=0, image_size=64):
    assert set(p) >= {"product_id", "images", "title", "description", "category", "subcategory",
                      "brand", "season", "composition", "gender"} | set(catalog.EXTRA_FIELDS)
    views = p["views"].split(",")
    assert views[0] == "front" and 2 <= len(views) <= 4 and len(set(views)) == len(views)
    assert len(p["images"]) == len(views)
    for im in p["images"]:
      assert im.shape == (64, 64, 3) and im.dtype == np.uint8
    for i in range(len(views)):
      for k in range(i):
        assert not np.array_equal(p["images"][i], p["images"][k])
    assert p["composition"].startswith(tuple(f"{q}% {p['material']}" for q in range(50, 101)))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="image size 16 is too small"):
    next(render.generate_products("train", 1, image_size=16))
  with pytest.raises(ValueError, match="n and start must be >= 0"):
    next(render.generate_products("train", -1))
  spec = catalog.sample_spec("train", 0)
  with pytest.raises(ValueError, match="sleeve='sleeveless' is not allowed for 'hoodies'"):
    catalog.respec(spec, np.random.default_rng(0), subcategory="hoodies", sleeve="sleeveless")


# ------------------------------------------------------------------------------------------------
# Pixels agree with the text.
# ------------------------------------------------------------------------------------------------

def _mark_boxes(spec, size):
  """Pixel boxes of the logo plate and the season tag (painted over the body)."""
  c = render.cell_size(size)
  y0, x0, y1, x1 = render.logo_box(spec, size)
  return [(y0 - c, x0 - c, y1 + c, x1 + c), render.tag_box(spec, size)]


def _body(spec, size):
  img, lab = render.render_front(spec, size)
  body = lab == render.BODY
  for y0, x0, y1, x1 in _mark_boxes(spec, size):
    body[y0:y1, x0:x1] = False
  return img, lab, body


def test_named_colours_are_the_drawn_colours(specs):
  for s in specs["train"][:250]:
    img, lab, body = _body(s, 64)
    names = catalog.nearest_color(img)
    body_counts = collections.Counter(names[body].tolist())
    assert body_counts.most_common(1)[0][0] == s.primary_color, (s, body_counts)
    trim = names[lab == render.TRIM]
    assert trim.size >= 3, s  # the secondary colour is visible on every product
    assert collections.Counter(trim.tolist()).most_common(1)[0][0] == s.secondary_color, s
    share = body_counts[s.secondary_color] / body.sum()
    if s.pattern == "solid":
      assert share < 0.02, (s, share)
    else:
      assert share > 0.04, (s, share)


def _decode_glyph(img, box, primary):
  """5x5 bool cells read from the glyph box: True where nearer the contrast colour."""
  y0, x0, y1, x1 = box
  c = (y1 - y0) // 5
  patch = img[y0:y1, x0:x1].astype(np.float32).reshape(5, c, 5, c, 3).mean((1, 3))
  on = np.array(render.logo_contrast(primary), np.float32)
  off = np.array(catalog.COLORS[primary], np.float32)
  return ((patch - on) ** 2).sum(-1) < ((patch - off) ** 2).sum(-1)


def _nearest_brand(cells):
  d = (catalog.BRAND_GLYPHS != cells).reshape(len(catalog.BRANDS), -1).sum(-1)
  return catalog.BRANDS[int(d.argmin())], int(d.min())


def _jpeg(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95, subsampling=0)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_logo_mark_identifies_the_named_brand_and_is_small():
  for p in render.generate_products("holdout_brand", 60, seed=1, image_size=64):
    front = p["images"][0]
    box = tuple(int(round(float(v) * 64)) for v in p["logo_box"].split())
    assert (box[2] - box[0]) * (box[3] - box[1]) / 64**2 < 0.01  # a fine detail
    assert _nearest_brand(_decode_glyph(front, box, p["primary_color"])) == (p["brand"], 0)
    brand, dist = _nearest_brand(_decode_glyph(_jpeg(front), box, p["primary_color"]))
    assert brand == p["brand"] and dist <= 1
    if "detail" in p["views"]:  # the detail view shows the same glyph at 2 px per cell
      detail = p["images"][p["views"].split(",").index("detail")]
      full = render._compose(catalog.sample_spec("holdout_brand", int(p["product_id"][2:]), 1),
                             "front", 128)[2]
      cy, cx = (full[0] + full[2]) // 2, (full[1] + full[3]) // 2
      oy, ox = min(max(cy - 32, 0), 64), min(max(cx - 32, 0), 64)
      dbox = (full[0] - oy, full[1] - ox, full[2] - oy, full[3] - ox)
      assert _nearest_brand(_decode_glyph(detail, dbox, p["primary_color"])) == (p["brand"], 0)


def test_season_tag_encodes_the_named_season(specs):
  for s in specs["test"][:150]:
    img, _ = render.render_front(s, 64)
    y0, x0, y1, x1 = render.tag_box(s, 64)
    cells = img[y0:y1, x0:x1].astype(float).mean(-1) < 128  # [2, 4] at 1 px per cell
    assert cells[1].tolist() == [True, False, True, False]
    year = 2014 + 4 * cells[0, 1] + 2 * cells[0, 2] + cells[0, 3]
    assert f"{'FW' if cells[0, 0] else 'SS'}{year}" == s.season


def _purity(binary, mask, line_ids):
  ids, vals = line_ids[mask], binary[mask].astype(float)
  n = np.bincount(ids)
  m = np.bincount(ids, vals) / np.maximum(n, 1)
  keep = n >= 6
  return float((np.maximum(m, 1 - m)[keep] * n[keep]).sum() / n[keep].sum())


def classify_pattern(img, body, primary, secondary, size):
  """Pattern read from pixels: line purity along rows / columns / diagonals, then components."""
  px = img.astype(np.float32)
  d1 = ((px - np.array(catalog.COLORS[primary], np.float32)) ** 2).sum(-1)
  d2 = ((px - np.array(catalog.COLORS[secondary], np.float32)) ** 2).sum(-1)
  b = (d2 < d1) & body
  frac = b[body].mean()
  if frac < 0.02:
    return "solid"
  y, x = np.mgrid[0:size, 0:size]
  rows, cols = _purity(b, body, y), _purity(b, body, x)
  diag = _purity(b, body, x + y)
  if rows > 0.97 and cols < 0.95:
    return "stripes"
  if cols > 0.97 and rows < 0.95:
    return "pinstripes"
  if diag > 0.97 and rows < 0.95 and cols < 0.95:
    return "diagonal"
  full_rows = np.array([b[r][body[r]].mean() > 0.9 if body[r].sum() >= 6 else False
                        for r in range(size)])
  full_cols = np.array([b[:, k][body[:, k]].mean() > 0.9 if body[:, k].sum() >= 6 else False
                        for k in range(size)])
  covered = (full_rows[:, None] | full_cols[None, :]) & b
  if full_rows.any() and full_cols.any() and covered.sum() > 0.8 * b.sum():
    return "checks"
  labels, _ = ndimage.label(b)
  spans = np.array([0] + [max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
                          for sl in ndimage.find_objects(labels)])
  in_long = (spans[labels] > 0.085 * size) & b  # pixels of components longer than a dot
  return "chevron" if in_long.sum() > 0.5 * b.sum() else "dots"


def test_pattern_signature_matches_the_named_pattern(specs):
  seen = collections.Counter()
  big = [s for s in specs["train"] if catalog.SUBCATEGORIES[s.subcategory].family in
         ("upper", "dress", "skirt", "trousers", "scarf")]
  for s in big[:400]:
    img, _, body = _body(s, 128)
    if body.sum() < 1500:
      continue
    got = classify_pattern(img, body, s.primary_color, s.secondary_color, 128)
    assert got == s.pattern, (s.product_id, s.subcategory, s.pattern, got)
    seen[s.pattern] += 1
  assert set(seen) == set(catalog.PATTERNS), seen


def test_texture_matches_the_named_material(specs):
  mats = list(catalog.MATERIALS)
  seen = collections.Counter()
  for s in specs["validation"]:
    lum = np.dot(catalog.COLORS[s.primary_color], (0.299, 0.587, 0.114))
    if s.pattern != "solid" or lum < 80:
      continue  # the residual of near-black cloth is mostly 8-bit rounding
    img, _, body = _body(s, 96)
    ratio = (img.astype(np.float32) / np.array(catalog.COLORS[s.primary_color], np.float32)).mean(-1)
    corr = [np.corrcoef(ratio[body], render.texture(m, 96)[body])[0, 1] for m in mats]
    assert mats[int(np.argmax(corr))] == s.material, (s.product_id, s.material, corr)
    seen[s.material] += 1
  assert len(seen) >= 6, seen


def _area(spec, size=64):
  return int((render.render_front(spec, size)[1] != 0).sum())


def _canonical(sub, **kw):
  base = catalog.sample_spec("train", 0).replace(jitter=(1.0, 1.0, 1.0, 1.0), pattern="solid")
  spec = catalog.respec(base, np.random.default_rng(0), subcategory=sub)
  return spec.replace(**kw)


@pytest.mark.parametrize("sub,attr,order", [
    ("blouses", "sleeve", ("sleeveless", "short sleeves", "long sleeves")),
    ("a-line dresses", "length", ("mini", "knee length", "maxi")),
    ("a-line skirts", "length", ("mini", "knee length", "maxi")),
    ("jeans", "length", ("cropped", "full length")),
    ("puffer jackets", "length", ("cropped", "hip length")),
    ("boots", "heel", ("flat", "low heel", "high heel")),
    ("clutches", "strap", ("no strap", "chain strap")),
])
def test_shape_attributes_are_drawn_in_order(sub, attr, order):
  areas = [_area(_canonical(sub, **{attr: v})) for v in order]
  assert all(a < b for a, b in zip(areas, areas[1:])), (sub, attr, areas)


def test_neckline_and_gender_are_visible():
  def opening_depth(neck):  # lowest row of the neck opening in the centre column
    lab = render.render_front(_canonical("t-shirts", neckline=neck), 128)[1]
    return np.nonzero(lab[:, 64] == render.INSIDE)[0].max()
  assert opening_depth("crew neck") < opening_depth("scoop neck") < opening_depth("v-neck")

  def shoulder_width(gender):
    lab = render.render_front(_canonical("sweaters", gender=gender), 128)[1]
    row = lab[int(0.21 * 128)] != 0
    return np.ptp(np.nonzero(row)[0])
  assert shoulder_width("women") < shoulder_width("men")


def test_subcategories_have_distinct_silhouettes():
  masks = {}
  for sub in catalog.SUBCATEGORIES:
    spec = _canonical(sub, primary_color="grey", secondary_color="red")
    masks[sub] = render.render_front(spec, 64)[1]
  subs = list(masks)
  for i, a in enumerate(subs):
    for b in subs[:i]:
      diff = (masks[a] != masks[b]).mean()
      assert diff > 0.01, (a, b, diff)


# ------------------------------------------------------------------------------------------------
# Derived sets (the formats; the real-format builders read them in test_synthetic_builder.py).
# ------------------------------------------------------------------------------------------------

_GT = ("primary_color", "secondary_color", "pattern", "material") + catalog.SHAPE_ATTR_NAMES


def test_fashioniq_triplets_differ_in_what_the_captions_say(tmp_path):
  counts = derived.write_fashioniq(str(tmp_path), size="tiny", seed=0, image_size=64)
  assert counts["cap.dress.train"] == derived.FIQ_SIZES["tiny"]["train"]
  for cat, sub_cat in derived.FIQ_CATEGORIES.items():
    for split, n in derived.FIQ_SIZES["tiny"].items():
      caps = json.load(open(tmp_path / f"captions/cap.{cat}.{split}.json"))
      asins = set(json.load(open(tmp_path / f"image_splits/split.{cat}.{split}.json")))
      assert len(caps) == n
      for i, entry in enumerate(caps):
        assert {entry["candidate"], entry["target"]} <= asins
        for a in (entry["candidate"], entry["target"]):
          assert Image.open(tmp_path / "images" / f"{a}.jpg").size == (64, 64)
        ref, target, captions, changed = derived.fashioniq_triplet(cat, split, i, seed=0)
        assert entry["captions"] == captions and len(captions) == 2 and all(captions)
        assert ref.category == target.category == sub_cat
        assert {a for a in _GT if getattr(ref, a) != getattr(target, a)} == set(changed)
        joined = " | ".join(captions)
        for a in changed:  # every change is described by at least one caption
          rng = np.random.default_rng(0)
          options = set()
          for _ in range(30):
            options |= set(derived.relative_phrases(a, getattr(ref, a), getattr(target, a), rng))
          assert any(o in joined for o in options), (a, captions)


def test_polyvore_outfits_follow_rules_and_fitb_has_one_right_answer(tmp_path):
  derived.write_polyvore(str(tmp_path), size="tiny", seed=0, image_size=64)
  meta = json.load(open(tmp_path / "polyvore_item_metadata.json"))
  for split, n in derived.PV_SIZES["tiny"].items():
    outfits = json.load(open(tmp_path / "nondisjoint" / f"{split}.json"))
    assert outfits == json.load(open(tmp_path / "disjoint" / f"{split}.json"))
    assert len(outfits) == n
    key_set = {}
    for i, o in enumerate(outfits):
      style, palette, specs_ = derived.polyvore_outfit(split, i, seed=0)
      assert [it["index"] for it in o["items"]] == list(range(1, len(specs_) + 1))
      cats = [meta[it["item_id"]]["semantic_category"] for it in o["items"]]
      assert cats[-3:] == ["shoes", "bags", cats[-1]] and cats[-1] in (
          "hats", "scarves", "accessories")
      assert ("all-body" in cats) != ("tops" in cats and "bottoms" in cats)
      for s in specs_:
        assert s.primary_color in palette and s.secondary_color in palette
        assert s.subcategory in sum(derived.STYLES[style].values(), ())
      assert sum(s.primary_color == palette[2] for s in specs_) in (1, 2)
      for it in o["items"]:
        key_set[f"{o['set_id']}_{it['index']}"] = (o["set_id"], it["item_id"])
        assert os.path.isfile(tmp_path / "images" / f"{it['item_id']}.jpg")
    for q in json.load(open(tmp_path / "nondisjoint" / f"fill_in_blank_{split}.json")):
      set_id = key_set[q["question"][0]][0]
      right = [a for a in q["answers"] if key_set[a][0] == set_id]
      assert len(right) == 1 and len(q["answers"]) == 4
      cats = {meta[key_set[a][1]]["semantic_category"] for a in q["answers"]}
      assert len(cats) == 1
    lines = open(tmp_path / "nondisjoint" / f"compatibility_{split}.txt").read().split("\n")
    for line in filter(None, lines):
      label, *keys = line.split()
      assert label in ("0", "1") and all(k in key_set for k in keys)
      assert (label == "1") == (len({key_set[k][0] for k in keys}) == 1)
