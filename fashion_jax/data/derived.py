"""Derived synthetic sets written in the REAL on-disk formats of FashionIQ and Polyvore Outfits.

The files are what the public releases contain (docs/data.md, "Data formats"), so the
real-format builders (fashion_jax/data/builders/fashioniq.py, polyvore_outfits.py) read them
unchanged: a user can run the whole TGIR / outfit pipeline before obtaining the real data.

  python -m launch.build_data --write_derived=fashioniq --out=/tmp/fiq [--derived_size=smoke]
  python -m launch.build_data --write_derived=polyvore --out=/tmp/polyvore

FashionIQ-style triplets (write_fashioniq): categories dress (<- dresses), shirt (<- shirts),
toptee (<- tops). A reference product is sampled from the catalog; the target is ANOTHER product
(new silhouette jitter, pattern phase, often another brand) equal to the reference except for one
or two of: primary colour, secondary colour, pattern, sleeve, neckline, length, material. Two
relative captions describe the change from different angles, as FashionIQ's two annotators do:
one change -> two paraphrases ("is navy instead of red" / "is navy"); two changes -> one caption
per change, sometimes both in one ("is navy and has long sleeves" / "has long sleeves").

  captions/cap.{cat}.{train,val,test}.json     [{"candidate", "target", "captions": [2 str]}]
  image_splits/split.{cat}.{train,val,test}.json   every asin of the split (refs, targets and
                                                   as many distractors as triplets / 2)
  images/<asin>.jpg                            front view, JPEG q95

Polyvore-style outfits (write_polyvore): an outfit has a style (formal, casual, sporty) and a
palette (two neutrals and one accent colour). Items: [outerwear], top + bottom or a dress, shoes,
bag, accessory (hat, scarf, belt or gloves), each of a sub-category of the style, with primary and
secondary colours from the palette and at most two items in the accent. FITB: the blank's
candidates are the right item plus 3 items of the SAME semantic category from outfits of another
style and palette; compatibility negatives mix same-category items from random other outfits.

  polyvore_item_metadata.json   {item_id: {url_name, title, description, catgeories (sic),
                                 related, category_id, semantic_category}}
  polyvore_outfit_titles.json   {set_id: {"title", "url_name"}}
  categories.csv                category_id,fine category,semantic category
  {nondisjoint,disjoint}/{train,valid,test}.json   [{"set_id", "items": [{"item_id", "index"}]}]
  {nondisjoint,disjoint}/fill_in_blank_{split}.json [{"question", "answers", "blank_position"}]
  {nondisjoint,disjoint}/compatibility_{split}.txt "label set_index set_index ..."
  images/<item_id>.jpg
Every item belongs to exactly one outfit, so the splits are item-disjoint: the `disjoint` and
`nondisjoint` folders hold the same outfits (both are written so either builder config works).
"""

import json
import os

import numpy as np
from PIL import Image

from fashion_jax.data import catalog
from fashion_jax.data import render

# Seed offsets so derived products are not the catalog builder's products.
_FIQ_STREAM, _PV_STREAM = 1_000_003, 2_000_003

FIQ_CATEGORIES = {"dress": "dresses", "shirt": "shirts", "toptee": "tops"}
FIQ_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # file name -> catalog split
FIQ_SIZES = {"tiny": {"train": 6, "val": 4, "test": 4},
             "smoke": {"train": 300, "val": 100, "test": 100},
             "base": {"train": 3000, "val": 600, "test": 600}}  # triplets per category
PV_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
PV_SIZES = {"tiny": {"train": 8, "valid": 6, "test": 6},
            "smoke": {"train": 300, "valid": 60, "test": 100},
            "base": {"train": 5000, "valid": 500, "test": 1000}}  # outfits

NEUTRALS = ("black", "white", "grey", "navy", "beige", "brown")
ACCENTS = tuple(c for c in catalog.COLORS if c not in NEUTRALS)
SEMANTIC = {"tops": "tops", "shirts": "tops", "trousers": "bottoms", "skirts": "bottoms",
            "dresses": "all-body", "outerwear": "outerwear", "shoes": "shoes", "bags": "bags",
            "hats": "hats", "scarves": "scarves", "belts": "accessories", "gloves": "accessories"}
STYLES = {
    "formal": {"top": ("dress shirts", "blouses", "cardigans"),
               "bottom": ("chinos", "wide-leg trousers", "pencil skirts", "pleated skirts"),
               "dress": ("shift dresses", "wrap dresses", "slip dresses"),
               "outerwear": ("blazers", "trench coats"), "shoes": ("pumps", "loafers", "boots"),
               "bag": ("clutches", "tote bags"), "accessory": ("belts", "scarves", "fedoras")},
    "casual": {"top": ("t-shirts", "casual shirts", "polo shirts", "sweaters"),
               "bottom": ("jeans", "a-line skirts", "shorts", "tiered skirts"),
               "dress": ("a-line dresses", "shirt dresses"),
               "outerwear": ("bomber jackets", "parkas"), "shoes": ("sneakers", "sandals", "boots"),
               "bag": ("tote bags", "crossbody bags"),
               "accessory": ("bucket hats", "caps", "scarves", "belts")},
    "sporty": {"top": ("hoodies", "tank tops", "t-shirts"), "bottom": ("joggers", "shorts"),
               "dress": (), "outerwear": ("puffer jackets", "parkas"), "shoes": ("sneakers",),
               "bag": ("backpacks", "crossbody bags"), "accessory": ("caps", "beanies", "gloves")},
}


def semantic_of(subcategory):
  """Polyvore's semantic category of a catalog sub-category."""
  category = catalog.SUBCATEGORIES[subcategory].category
  return SEMANTIC[subcategory if category == "accessories" else category]


def semantic_category(spec):
  """Polyvore's semantic category of a catalog product."""
  return semantic_of(spec.subcategory)


def _write_jpeg(path, image):
  Image.fromarray(image).save(path, format="JPEG", quality=95, subsampling=0)


def _front(spec, image_size):
  return render.render_view(spec, "front", image_size)


# ------------------------------------------------------------------------------------------------
# FashionIQ.
# ------------------------------------------------------------------------------------------------

def _phr(attr, value, rng):
  if attr in ("primary_color", "secondary_color"):
    return value
  table = {"pattern": catalog.PATTERNS, "material": catalog.MATERIALS}.get(attr)
  table = table or catalog.SHAPE_ATTRS[attr]
  return catalog._choice(rng, table[value])  # pylint: disable=protected-access


_ORDER = {"sleeve": ("sleeveless", "short sleeves", "long sleeves"),
          "length": ("mini", "knee length", "maxi")}


def relative_phrases(attr, old, new, rng):
  """Phrases saying how the target differs from the reference in `attr` (all true)."""
  p = lambda v: _phr(attr, v, rng)
  if attr == "primary_color":
    return [f"is {new} instead of {old}", f"is {new}", f"is {new} colored",
            f"is {new} and not {old}", f"has a {new} color"]
  if attr == "secondary_color":
    return [f"has {new} trim", f"has {new} accents instead of {old}", f"with {new} details"]
  if attr == "pattern":
    if new == "solid":
      return ["is solid", "has no pattern", f"is solid instead of {p(old)}"]
    return [f"is {p(new)}", f"has a {p(new)} pattern", f"is {p(new)} instead of {p(old)}"]
  if attr == "material":
    return [f"is made of {p(new)}", f"is {p(new)} instead of {p(old)}", f"looks like {p(new)}"]
  out = {"sleeve": [f"is {p(new)}" if new == "sleeveless" else f"has {p(new)}"],
         "neckline": [f"has a {p(new)}", f"has a {p(new)} instead of a {p(old)}"],
         "length": [f"is {p(new)}", f"is {p(new)} length"]}[attr]
  if attr in _ORDER:
    longer = _ORDER[attr].index(new) > _ORDER[attr].index(old)
    word = {"sleeve": ("has longer sleeves", "has shorter sleeves"),
            "length": ("is longer", "is shorter")}[attr]
    out.append(word[0] if longer else word[1])
  if attr == "sleeve" and new == "sleeveless":
    out.append("has no sleeves")
  return out


def _changeable(spec):
  sub = catalog.SUBCATEGORIES[spec.subcategory]
  out = ["primary_color", "secondary_color"]
  if len(set(sub.patterns)) > 1:
    out.append("pattern")
  if len(sub.materials) > 1:
    out.append("material")
  out += [a for a, vals in sub.attrs if len(vals) > 1]
  return out


def _new_value(spec, attr, rng):
  sub = catalog.SUBCATEGORIES[spec.subcategory]
  old = getattr(spec, attr)
  if attr in ("primary_color", "secondary_color"):
    other = spec.secondary_color if attr == "primary_color" else spec.primary_color
    pairs = catalog.IMPROBABLE_COLOR_PAIRS
    vals = [c for c in catalog.COLORS if c not in (old, other) and (
        (c, other) if attr == "primary_color" else (other, c)) not in pairs]
  elif attr == "pattern":
    vals = [v for v in dict.fromkeys(sub.patterns) if v != old]
  elif attr == "material":
    vals = [v for v in sub.materials if v != old]
  else:
    vals = [v for v in sub.attr_values()[attr] if v != old]
  return catalog._choice(rng, vals)  # pylint: disable=protected-access


def fashioniq_triplet(category, split, index, seed=0):
  """(reference spec, target spec, [caption, caption], changed attrs) of one FashionIQ triplet."""
  cat_split = FIQ_SPLITS[split]
  want = FIQ_CATEGORIES[category]
  rng = np.random.default_rng((seed, _FIQ_STREAM, list(FIQ_CATEGORIES).index(category),
                               list(FIQ_SPLITS).index(split), index))
  j = 0
  while True:  # rejection: catalog products of this category, deterministic in (index, j)
    ref = catalog.sample_spec(cat_split, (index * 64 + j) % 10**7, seed + _FIQ_STREAM)
    if ref.category == want:
      break
    j += 1
  ref = ref.replace(views=("front",))
  n_changes = 1 if rng.random() < 0.6 else 2
  attrs = list(rng.choice(_changeable(ref), size=n_changes, replace=False))
  target = ref
  for a in attrs:
    target = catalog.respec(target, rng, **{a: _new_value(target, a, rng)})
  tj = catalog.sample_spec(cat_split, (index * 64 + j + 1) % 10**7, seed + _FIQ_STREAM)
  keep_brand = rng.random() < 0.5
  target = target.replace(jitter=tj.jitter, pattern_phase=tj.pattern_phase, season=tj.season,
                          brand=target.brand if keep_brand else catalog._sample_brand(  # pylint: disable=protected-access
                              rng, target.category, catalog._TRAIN_BRANDS))  # pylint: disable=protected-access
  phrases = [relative_phrases(a, getattr(ref, a), getattr(target, a), rng) for a in attrs]
  if n_changes == 1:
    i, k = rng.choice(len(phrases[0]), size=2, replace=False)
    captions = [phrases[0][i], phrases[0][k]]
  else:
    a = catalog._choice(rng, phrases[0])  # pylint: disable=protected-access
    b = catalog._choice(rng, phrases[1])  # pylint: disable=protected-access
    captions = [f"{a} and {b}" if rng.random() < 0.3 else a, b]
    if rng.random() < 0.5:
      captions = captions[::-1]
  return ref, target, captions, attrs


def _asin(rng, used):
  alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
  while True:
    a = "B0" + "".join(rng.choice(alphabet, size=8))
    if a not in used:
      used.add(a)
      return a


def write_fashioniq(out_dir, size="smoke", seed=0, image_size=128, num_triplets=None):
  """Writes a FashionIQ-format folder; returns {file: number of triplets or images}.

  num_triplets: {'train'|'val'|'test': triplets per category}, default FIQ_SIZES[size].
  """
  if num_triplets is None:
    if size not in FIQ_SIZES:
      raise ValueError(f"unknown size {size!r}; expected one of {tuple(FIQ_SIZES)}")
    num_triplets = FIQ_SIZES[size]
  bad = set(num_triplets) - set(FIQ_SPLITS)
  if bad:
    raise ValueError(f"unknown FashionIQ splits {sorted(bad)}; expected {tuple(FIQ_SPLITS)}")
  for sub in ("captions", "image_splits", "images"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  rng = np.random.default_rng((seed, _FIQ_STREAM))
  used = set()
  counts = {}
  for cat in FIQ_CATEGORIES:
    for split, n in num_triplets.items():
      entries, asins = [], []
      for i in range(n):
        ref, target, captions, _ = fashioniq_triplet(cat, split, i, seed)
        ids = []
        for spec in (ref, target):
          a = _asin(rng, used)
          _write_jpeg(os.path.join(out_dir, "images", a + ".jpg"), _front(spec, image_size))
          ids.append(a)
        asins += ids
        entries.append({"candidate": ids[0], "target": ids[1], "captions": captions})
      for k in range(n // 2):  # distractors: more products of the category in the gallery
        spec, _, _, _ = fashioniq_triplet(cat, split, n + k, seed)
        a = _asin(rng, used)
        _write_jpeg(os.path.join(out_dir, "images", a + ".jpg"), _front(spec, image_size))
        asins.append(a)
      for rel, data in ((f"captions/cap.{cat}.{split}.json", entries),
                        (f"image_splits/split.{cat}.{split}.json", asins)):
        with open(os.path.join(out_dir, rel), "w") as f:
          json.dump(data, f, indent=1)
      counts[f"cap.{cat}.{split}"] = len(entries)
      counts[f"split.{cat}.{split}"] = len(asins)
  return counts


# ------------------------------------------------------------------------------------------------
# Polyvore Outfits.
# ------------------------------------------------------------------------------------------------

def _category_ids():
  return {name: 100 + i for i, name in enumerate(catalog.SUBCATEGORIES)}


def polyvore_outfit(split, index, seed=0):
  """(style, palette, [ProductSpec per item]) of one outfit; see the module docstring for rules."""
  rng = np.random.default_rng((seed, _PV_STREAM, list(PV_SPLITS).index(split), index))
  style = catalog._choice(rng, tuple(STYLES))  # pylint: disable=protected-access
  rules = STYLES[style]
  neutrals = list(rng.choice(NEUTRALS, size=2, replace=False))
  accent = str(rng.choice(ACCENTS))
  palette = tuple(neutrals) + (accent,)
  slots = []
  if rng.random() < 0.4:
    slots.append("outerwear")
  slots += ["dress"] if rules["dress"] and rng.random() < 0.3 else ["top", "bottom"]
  slots += ["shoes", "bag", "accessory"]
  accent_slots = set(rng.choice(len(slots), size=int(rng.integers(1, 3)), replace=False).tolist())
  gender = "women" if "dress" in slots or rng.random() < 0.5 else "men"
  items = []
  for k, slot in enumerate(slots):
    subs = [s for s in rules[slot] if gender in catalog.SUBCATEGORIES[s].genders
            or catalog.SUBCATEGORIES[s].genders == ("unisex",)] or list(rules[slot])
    sub = catalog._choice(rng, subs)  # pylint: disable=protected-access
    base = catalog.sample_spec(PV_SPLITS[split], (index * 8 + k) % 10**7, seed + _PV_STREAM)
    primary = accent if k in accent_slots else str(rng.choice(neutrals))
    secondary = str(rng.choice([c for c in palette if c != primary]))
    if (primary, secondary) in catalog.IMPROBABLE_COLOR_PAIRS:
      secondary = [c for c in palette if c not in (primary, secondary)][0]
    spec = catalog.respec(base, rng, subcategory=sub)
    genders = catalog.SUBCATEGORIES[sub].genders
    spec = catalog.respec(spec, rng, primary_color=primary, secondary_color=secondary,
                          gender=gender if gender in genders else genders[0],
                          views=("front",), novelty="")
    items.append(spec)
  return style, palette, items


def write_polyvore(out_dir, size="smoke", seed=0, image_size=128, num_outfits=None):
  """Writes a Polyvore-Outfits-format folder; returns {file: count}.

  num_outfits: {'train'|'valid'|'test': outfits}, default PV_SIZES[size].
  """
  if num_outfits is None:
    if size not in PV_SIZES:
      raise ValueError(f"unknown size {size!r}; expected one of {tuple(PV_SIZES)}")
    num_outfits = PV_SIZES[size]
  bad = set(num_outfits) - set(PV_SPLITS)
  if bad:
    raise ValueError(f"unknown Polyvore splits {sorted(bad)}; expected {tuple(PV_SPLITS)}")
  for sub in ("images", "nondisjoint", "disjoint"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  cat_ids = _category_ids()
  metadata, titles, counts = {}, {}, {}
  next_item = [100000000 + 1000 * seed % 10**8]
  next_set = [200000000 + 1000 * seed % 10**8]
  for split, n in num_outfits.items():
    outfits = []  # (set_id, style, palette, [(item_id, spec)])
    for i in range(n):
      style, palette, specs = polyvore_outfit(split, i, seed)
      next_set[0] += 1
      set_id = str(next_set[0])
      items = []
      for spec in specs:
        next_item[0] += 1
        item_id = str(next_item[0])
        title, description = catalog.describe(spec, seed)
        metadata[item_id] = {
            "url_name": title.lower().replace(" ", "-"), "title": title,
            "description": description,
            "catgeories": [semantic_category(spec).title(), spec.subcategory.title()],
            "related": [], "category_id": str(cat_ids[spec.subcategory]),
            "semantic_category": semantic_category(spec)}
        _write_jpeg(os.path.join(out_dir, "images", item_id + ".jpg"), _front(spec, image_size))
        items.append((item_id, spec))
      titles[set_id] = {"title": f"{style} look in {' and '.join(palette)}",
                        "url_name": f"{style}-look"}
      outfits.append((set_id, style, palette, items))
    outfit_json = [{"set_id": s, "items": [{"item_id": it, "index": k + 1}
                                           for k, (it, _) in enumerate(items)]}
                   for s, _, _, items in outfits]
    fitb, compat = _questions(outfits, np.random.default_rng((seed, _PV_STREAM, 7, len(counts))))
    for version in ("nondisjoint", "disjoint"):
      d = os.path.join(out_dir, version)
      with open(os.path.join(d, f"{split}.json"), "w") as f:
        json.dump(outfit_json, f)
      with open(os.path.join(d, f"fill_in_blank_{split}.json"), "w") as f:
        json.dump(fitb, f)
      with open(os.path.join(d, f"compatibility_{split}.txt"), "w") as f:
        f.write("".join(f"{label} {' '.join(keys)}\n" for label, keys in compat))
    counts[f"{split}.json"] = len(outfit_json)
    counts[f"fill_in_blank_{split}"] = len(fitb)
    counts[f"compatibility_{split}"] = len(compat)
  with open(os.path.join(out_dir, "polyvore_item_metadata.json"), "w") as f:
    json.dump(metadata, f)
  with open(os.path.join(out_dir, "polyvore_outfit_titles.json"), "w") as f:
    json.dump(titles, f)
  with open(os.path.join(out_dir, "categories.csv"), "w") as f:
    for name, cid in cat_ids.items():
      f.write(f"{cid},{name},{semantic_of(name)}\n")
  counts["items"] = len(metadata)
  return counts


def _questions(outfits, rng):
  """FITB questions and compatibility lines ("label", [set_index keys]) of one split."""
  by_cat = {}  # semantic category -> [(outfit number, key)]
  for o, (set_id, _, _, items) in enumerate(outfits):
    for k, (_, spec) in enumerate(items):
      by_cat.setdefault(semantic_category(spec), []).append((o, f"{set_id}_{k + 1}"))
  fitb, compat = [], []
  for o, (set_id, style, palette, items) in enumerate(outfits):
    keys = [f"{set_id}_{k + 1}" for k in range(len(items))]
    blank = int(rng.integers(len(items)))
    cat = semantic_category(items[blank][1])
    # Wrong answers: same category, from an outfit of another style AND palette where possible.
    pool = [(p, key) for p, key in by_cat[cat]
            if p != o and (outfits[p][1] != style and outfits[p][2] != palette)]
    pool = pool or [(p, key) for p, key in by_cat[cat] if p != o]
    if len(pool) >= 3:
      wrong = [pool[i][1] for i in rng.choice(len(pool), size=3, replace=False)]
      answers = [keys[blank]] + wrong
      order = rng.permutation(4)
      fitb.append({"question": keys[:blank] + keys[blank + 1:],
                   "answers": [answers[i] for i in order], "blank_position": blank + 1})
    compat.append(("1", keys))
    neg = []
    for _, spec in items:
      cands = [key for p, key in by_cat[semantic_category(spec)] if p != o]
      neg.append(cands[int(rng.integers(len(cands)))] if cands else None)
    if all(neg) and len(outfits) > 1:
      compat.append(("0", neg))
  return fitb, compat
