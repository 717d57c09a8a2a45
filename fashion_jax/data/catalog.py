"""The built-in synthetic fashion catalog: vocabularies, product sampling, text and splits.

A product is sampled as a `ProductSpec` (all ground-truth attributes), described as FashionGen-style
text (title, description, tag fields) and drawn by `fashion_jax.data.render` as 2-4 views. Every
attribute is both drawn and (usually) named:

  attribute           drawn as                                          named in
  category/subcat     silhouette and construction details               title noun, tags
  gender              cut: shoulder width, waist taper, shoe last       tags, sometimes description
  primary colour      the body of the item                              title/description
  secondary colour    trims (collar, cuffs, heel + sole, straps, ...)   description ("contrast ...")
                      and the pattern's second colour
  pattern             one of PATTERNS over the body                     title/description
  sleeve/neckline/... shape attributes where the subcategory has them   title/description
  brand               a SMALL 5x5-cell logo mark (`brand_glyph`)        brand tag, sometimes text
  season              a 2x4-cell hang tag (SS/FW bit + 3-bit year),     season tag
                      plus a palette cue (FW darker, SS lighter)
  composition         the main fibre's texture                          composition tag, text

Splits (see `SPLITS`) and the promises they keep (tests/test_catalog.py checks them):
  train / validation / test  in-distribution: no holdout sub-category, no holdout brand, every brand
                             only on the categories of its line, no reserved colour order.
  holdout_category           only HOLDOUT_SUBCATEGORIES (never in train); everything else in-dist.
  holdout_brand              only HOLDOUT_BRANDS (never in train); everything else in-dist.
  improbable                 exactly one improbable combination per product, recorded in `novelty`:
                             'brand_category' (a train brand on a category outside its line) or
                             'color_order' (primary/secondary in an order in IMPROBABLE_COLOR_PAIRS,
                             e.g. red shoes with a black heel; the reverse order IS in train).

Determinism: product `index` of `split` under `seed` uses its own generators seeded with
(seed, split id, index, stream), so a product does not depend on how many products precede it nor
on how work is divided between processes.

Python API (no TFDS needed; the rendered products with their images are render.make_product and
render.generate_products):
  sample_spec(split, index, seed) -> ProductSpec
  describe(spec, seed) -> (title, description)
  respec(spec, rng, **fields) -> a consistent variant (used by the derived FashionIQ/Polyvore sets)
  text_phrases() -> attribute -> value -> phrases; nearest_color(rgb) -> colour names
  brand_glyph(brand), brand_categories(brand); vocabularies COLORS, PATTERNS, MATERIALS,
  SHAPE_ATTRS, SUBCATEGORIES, CATEGORIES, BRANDS, SEASONS, HOLDOUT_*, IMPROBABLE_COLOR_PAIRS.
"""

import dataclasses
import re

import numpy as np

# ------------------------------------------------------------------------------------------------
# Vocabularies.
# ------------------------------------------------------------------------------------------------

# Named colours -> sRGB. Chosen far apart so that the nearest named colour of a textured, shaded
# pixel is still the colour that was drawn (tests rely on that).
COLORS = {
    "black": (24, 24, 27),
    "white": (250, 250, 248),
    "grey": (128, 128, 132),
    "navy": (28, 38, 96),
    "blue": (40, 105, 205),
    "red": (205, 32, 38),
    "burgundy": (112, 18, 48),
    "pink": (242, 150, 182),
    "orange": (240, 122, 28),
    "yellow": (246, 210, 42),
    "green": (36, 142, 64),
    "olive": (112, 112, 36),
    "beige": (214, 192, 150),
    "brown": (112, 70, 38),
    "purple": (112, 52, 152),
}
DARK_COLORS = ("black", "grey", "navy", "burgundy", "olive", "brown", "purple")
LIGHT_COLORS = ("white", "pink", "yellow", "beige", "orange", "blue", "red", "green")

# Pattern -> phrases naming it. Phrases of different patterns never match each other as whole words.
PATTERNS = {
    "solid": ("solid", "solid-colour"),
    "stripes": ("striped", "stripes"),
    "pinstripes": ("pinstriped", "pinstripes"),
    "checks": ("checked", "windowpane check"),
    "dots": ("polka-dot", "dotted"),
    "diagonal": ("diagonal-stripe", "bias-stripe"),
    "chevron": ("chevron", "zigzag"),
}

# Main fibres (rendered as texture) and their phrases; minor fibres are named in the composition
# only (invisible, like a few percent of elastane in real clothes).
MATERIALS = {
    "cotton": ("cotton",),
    "denim": ("denim",),
    "wool": ("wool", "wool-blend"),
    "leather": ("leather", "grained leather"),
    "silk": ("silk", "silk satin"),
    "linen": ("linen",),
    "polyester": ("polyester", "technical polyester"),
    "cashmere": ("cashmere",),
}
MINOR_FIBRES = ("elastane", "polyamide", "viscose", "modal", "acrylic")
WARM_MATERIALS = ("wool", "cashmere", "leather", "denim")

# Shape attributes: value -> phrases.
SHAPE_ATTRS = {
    "sleeve": {
        "sleeveless": ("sleeveless",),
        "short sleeves": ("short sleeves", "short-sleeved"),
        "long sleeves": ("long sleeves", "long-sleeved"),
    },
    "neckline": {
        "crew neck": ("crewneck", "crew neck", "round neck"),
        "v-neck": ("v-neck", "v-neckline"),
        "scoop neck": ("scoop neck", "scoop neckline"),
        "turtleneck": ("turtleneck", "rollneck"),
        "point collar": ("point collar", "classic collar"),
        "band collar": ("band collar", "mandarin collar"),
        "hood": ("hood", "drawstring hood"),
    },
    "length": {
        "mini": ("mini", "above-the-knee"),
        "knee length": ("knee-length", "midi"),
        "maxi": ("maxi", "floor-length"),
        "full length": ("full-length",),
        "cropped": ("cropped",),
        "hip length": ("hip-length",),
        "long": ("longline", "long-line"),
    },
    "heel": {
        "flat": ("flat", "flat-soled"),
        "low heel": ("low heel", "block heel"),
        "high heel": ("high heel", "stiletto heel"),
    },
    "strap": {
        "top handles": ("top handles", "twin handles"),
        "backpack straps": ("backpack straps", "adjustable shoulder straps"),
        "shoulder strap": ("shoulder strap", "crossbody strap"),
        "chain strap": ("chain strap", "chain-link strap"),
        "no strap": ("handheld", "strapless"),
    },
}
SHAPE_ATTR_NAMES = tuple(SHAPE_ATTRS)


@dataclasses.dataclass(frozen=True)
class Subcategory:
  """One sub-category: its category, drawing family, nouns and allowed attribute values."""
  name: str
  category: str
  family: str  # render family: upper, dress, skirt, trousers, shoe, bag, hat, scarf, belt, glove
  nouns: tuple  # singular nouns for titles, first is canonical
  genders: tuple
  materials: tuple
  patterns: tuple
  attrs: tuple = ()  # ((attr name, (values...)), ...)

  def attr_values(self):
    return dict(self.attrs)


_APPAREL_PATTERNS = tuple(PATTERNS)
_PLAIN_PATTERNS = ("solid", "solid", "solid", "stripes", "checks", "dots")
_SLEEVES3 = ("sleeve", ("sleeveless", "short sleeves", "long sleeves"))
_SLEEVES2 = ("sleeve", ("short sleeves", "long sleeves"))
_LONG = ("sleeve", ("long sleeves",))
_MF = ("men", "women")
_W = ("women",)
_U = ("unisex",)


def _S(name, category, family, nouns, genders, materials, patterns, *attrs):
  return Subcategory(name, category, family, tuple(nouns), genders, tuple(materials),
                     tuple(patterns), tuple(attrs))


SUBCATEGORY_LIST = (
    # tops
    _S("t-shirts", "tops", "upper", ("t-shirt", "tee"), _MF, ("cotton", "linen", "polyester"),
       _APPAREL_PATTERNS, _SLEEVES2, ("neckline", ("crew neck", "v-neck", "scoop neck"))),
    _S("tank tops", "tops", "upper", ("tank top", "vest top"), _MF, ("cotton", "linen", "silk"),
       _APPAREL_PATTERNS, ("sleeve", ("sleeveless",)), ("neckline", ("scoop neck", "v-neck"))),
    _S("sweaters", "tops", "upper", ("sweater", "jumper"), _MF, ("wool", "cashmere", "cotton"),
       _APPAREL_PATTERNS, _LONG, ("neckline", ("crew neck", "v-neck", "turtleneck"))),
    _S("hoodies", "tops", "upper", ("hoodie", "hooded sweatshirt"), _MF, ("cotton", "polyester"),
       ("solid", "solid", "stripes", "checks", "chevron"), _LONG, ("neckline", ("hood",))),
    _S("cardigans", "tops", "upper", ("cardigan",), _MF, ("wool", "cashmere", "cotton"),
       _APPAREL_PATTERNS, _LONG, ("neckline", ("v-neck",))),
    # shirts
    _S("dress shirts", "shirts", "upper", ("dress shirt", "formal shirt"), _MF,
       ("cotton", "linen", "silk"), ("solid", "stripes", "pinstripes", "checks"), _LONG,
       ("neckline", ("point collar",))),
    _S("casual shirts", "shirts", "upper", ("casual shirt", "button-up shirt"), _MF,
       ("cotton", "linen", "denim"), _APPAREL_PATTERNS, _SLEEVES2,
       ("neckline", ("point collar", "band collar"))),
    _S("polo shirts", "shirts", "upper", ("polo shirt", "polo"), _MF, ("cotton", "polyester"),
       ("solid", "stripes", "dots", "chevron"), ("sleeve", ("short sleeves",)),
       ("neckline", ("point collar",))),
    _S("blouses", "shirts", "upper", ("blouse",), _W, ("silk", "polyester", "linen"),
       _APPAREL_PATTERNS, _SLEEVES3, ("neckline", ("v-neck", "scoop neck"))),
    # dresses
    _S("shift dresses", "dresses", "dress", ("shift dress",), _W, ("cotton", "wool", "linen"),
       _APPAREL_PATTERNS, _SLEEVES3, ("neckline", ("crew neck", "scoop neck")),
       ("length", ("mini", "knee length"))),
    _S("a-line dresses", "dresses", "dress", ("a-line dress", "fit-and-flare dress"), _W,
       ("cotton", "linen", "polyester", "silk"), _APPAREL_PATTERNS, _SLEEVES3,
       ("neckline", ("crew neck", "v-neck", "scoop neck")), ("length", ("mini", "knee length", "maxi"))),
    _S("slip dresses", "dresses", "dress", ("slip dress",), _W, ("silk", "polyester"),
       ("solid", "solid", "dots", "stripes"), ("sleeve", ("sleeveless",)),
       ("neckline", ("v-neck", "scoop neck")), ("length", ("mini", "knee length", "maxi"))),
    _S("shirt dresses", "dresses", "dress", ("shirt dress", "shirtdress"), _W,
       ("cotton", "linen", "denim"), ("solid", "stripes", "checks", "pinstripes"), _SLEEVES2,
       ("neckline", ("point collar",)), ("length", ("knee length", "maxi"))),
    _S("wrap dresses", "dresses", "dress", ("wrap dress",), _W, ("silk", "polyester", "cotton"),
       _APPAREL_PATTERNS, _SLEEVES3, ("neckline", ("v-neck",)), ("length", ("knee length", "maxi"))),
    # skirts
    _S("pencil skirts", "skirts", "skirt", ("pencil skirt",), _W, ("wool", "leather", "cotton"),
       ("solid", "solid", "pinstripes", "checks"), ("length", ("mini", "knee length"))),
    _S("a-line skirts", "skirts", "skirt", ("a-line skirt", "flared skirt"), _W,
       ("cotton", "denim", "linen", "leather"), _APPAREL_PATTERNS,
       ("length", ("mini", "knee length", "maxi"))),
    _S("pleated skirts", "skirts", "skirt", ("pleated skirt",), _W, ("polyester", "silk", "wool"),
       ("solid", "solid", "checks", "dots"), ("length", ("mini", "knee length", "maxi"))),
    _S("tiered skirts", "skirts", "skirt", ("tiered skirt", "ruffled skirt"), _W,
       ("cotton", "linen", "silk"), _APPAREL_PATTERNS, ("length", ("knee length", "maxi"))),
    # trousers
    _S("jeans", "trousers", "trousers", ("jeans",), _MF, ("denim",),
       ("solid", "solid", "solid", "stripes"), ("length", ("full length", "cropped"))),
    _S("chinos", "trousers", "trousers", ("chinos", "chino trousers"), _MF, ("cotton", "linen"),
       ("solid", "solid", "checks", "pinstripes"), ("length", ("full length", "cropped"))),
    _S("joggers", "trousers", "trousers", ("joggers", "track pants"), _MF, ("cotton", "polyester"),
       ("solid", "solid", "stripes", "chevron"), ("length", ("full length",))),
    _S("shorts", "trousers", "trousers", ("shorts",), _MF, ("cotton", "denim", "linen"),
       _APPAREL_PATTERNS),
    _S("wide-leg trousers", "trousers", "trousers", ("wide-leg trousers", "palazzo trousers"), _MF,
       ("wool", "linen", "silk"), ("solid", "pinstripes", "checks", "stripes"),
       ("length", ("full length", "cropped"))),
    # outerwear
    _S("blazers", "outerwear", "upper", ("blazer", "tailored jacket"), _MF, ("wool", "linen", "cotton"),
       ("solid", "solid", "pinstripes", "checks"), _LONG, ("length", ("hip length",))),
    _S("bomber jackets", "outerwear", "upper", ("bomber jacket", "bomber"), _MF,
       ("polyester", "leather", "silk"), ("solid", "solid", "chevron", "stripes"), _LONG,
       ("length", ("cropped",))),
    _S("trench coats", "outerwear", "upper", ("trench coat", "trench"), _MF, ("cotton", "polyester"),
       ("solid", "solid", "checks"), _LONG, ("length", ("knee length",))),
    _S("parkas", "outerwear", "upper", ("parka",), _MF, ("polyester", "cotton"),
       ("solid", "solid", "chevron"), _LONG, ("neckline", ("hood",)),
       ("length", ("hip length", "long"))),
    _S("puffer jackets", "outerwear", "upper", ("puffer jacket", "down jacket"), _MF, ("polyester",),
       ("solid", "solid", "stripes"), _LONG, ("length", ("cropped", "hip length"))),
    # shoes
    _S("sneakers", "shoes", "shoe", ("sneakers", "trainers"), _MF, ("leather", "polyester", "cotton"),
       _PLAIN_PATTERNS, ("heel", ("flat",))),
    _S("boots", "shoes", "shoe", ("boots", "ankle boots"), _MF, ("leather", "wool"),
       ("solid", "solid", "solid", "checks"), ("heel", ("flat", "low heel", "high heel"))),
    _S("pumps", "shoes", "shoe", ("pumps", "court shoes"), _W, ("leather", "silk"),
       ("solid", "solid", "dots", "stripes"), ("heel", ("low heel", "high heel"))),
    _S("loafers", "shoes", "shoe", ("loafers",), _MF, ("leather",), ("solid",),
       ("heel", ("flat", "low heel"))),
    _S("sandals", "shoes", "shoe", ("sandals",), _MF, ("leather", "polyester"),
       ("solid", "solid", "stripes"), ("heel", ("flat", "low heel", "high heel"))),
    # bags
    _S("tote bags", "bags", "bag", ("tote bag", "tote"), _U, ("leather", "cotton", "linen"),
       _PLAIN_PATTERNS, ("strap", ("top handles",))),
    _S("backpacks", "bags", "bag", ("backpack", "rucksack"), _U, ("polyester", "leather"),
       _PLAIN_PATTERNS, ("strap", ("backpack straps",))),
    _S("crossbody bags", "bags", "bag", ("crossbody bag", "messenger bag"), _U, ("leather",),
       _PLAIN_PATTERNS, ("strap", ("shoulder strap", "chain strap"))),
    _S("clutches", "bags", "bag", ("clutch", "pouch"), _U, ("leather", "silk"),
       ("solid", "solid", "dots", "chevron"), ("strap", ("no strap", "chain strap"))),
    # hats
    _S("caps", "hats", "hat", ("cap", "baseball cap"), _U, ("cotton", "wool", "polyester"),
       _PLAIN_PATTERNS),
    _S("beanies", "hats", "hat", ("beanie",), _U, ("wool", "cashmere"), ("solid", "stripes", "chevron")),
    _S("fedoras", "hats", "hat", ("fedora",), _U, ("wool",), ("solid",)),
    _S("bucket hats", "hats", "hat", ("bucket hat",), _U, ("cotton", "denim", "polyester"),
       _PLAIN_PATTERNS),
    # accessories
    _S("scarves", "accessories", "scarf", ("scarf", "muffler"), _U, ("wool", "cashmere", "silk"),
       _APPAREL_PATTERNS),
    _S("belts", "accessories", "belt", ("belt",), _U, ("leather",), ("solid",)),
    _S("gloves", "accessories", "glove", ("gloves",), _U, ("leather", "wool", "cashmere"),
       ("solid", "solid", "checks")),
)
SUBCATEGORIES = {s.name: s for s in SUBCATEGORY_LIST}
CATEGORIES = tuple(dict.fromkeys(s.category for s in SUBCATEGORY_LIST))

# Invented brand names (any resemblance to a real label is unintended).
BRANDS = (
    "Aurelle", "Bexley & Co", "Castor Lane", "Dunmore", "Elvaan", "Fenwick Row", "Galloway Tide",
    "Hartwell", "Isola Nera", "Juniper Hale", "Kestrelle", "Lumen & Thread", "Marlowe Quay",
    "Norcross", "Ondine Atelier", "Pellan", "Quill & Fable", "Rowan Vale", "Sable Street", "Tavish",
    "Umbrata", "Vantoria", "Wexford Mills", "Xanthe Ly", "Yarrowby", "Zephyrine", "Alder North",
    "Brisa Marin", "Corvo Nero", "Delphine Roux", "Embry", "Fable Loom", "Greer & Sons", "Halden",
    "Ivo Marchetti", "Jolie Nord", "Kaori Studio", "Lindqvist", "Maison Orrel", "Nyx Tailoring",
    "Oakhurst", "Primrose Yard", "Quorra", "Ravelle", "Solenne", "Thorne & Birch", "Ulla Brandt",
    "Verdant Row",
)
HOLDOUT_BRANDS = BRANDS[-6:]
HOLDOUT_SUBCATEGORIES = ("trench coats", "loafers", "bucket hats")
SEASONS = tuple(f"{h}{y}" for y in range(2014, 2021) for h in ("SS", "FW"))
GENDERS = ("men", "women", "unisex")
# Ordered (primary, secondary) pairs never in train; their reverses are ordinary train pairs.
IMPROBABLE_COLOR_PAIRS = (
    ("red", "black"), ("yellow", "navy"), ("pink", "green"), ("white", "burgundy"),
    ("orange", "purple"), ("beige", "blue"),
)

SPLITS = ("train", "validation", "test", "holdout_category", "holdout_brand", "improbable")
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
_SPLIT_PREFIX = {"train": "tr", "validation": "va", "test": "te", "holdout_category": "hc",
                 "holdout_brand": "hb", "improbable": "im"}
# Extra ground-truth fields the TFDS builder stores next to the product schema (all text).
EXTRA_FIELDS = ("primary_color", "secondary_color", "pattern", "material") + SHAPE_ATTR_NAMES + (
    "views", "novelty", "logo_box")

_VOCAB_SEED = 20140101  # fixes brand glyphs, lines and palettes; independent of the data seed.


def _brand_glyphs(n, seed=_VOCAB_SEED, min_distance=5):
  """n left-right symmetric 5x5 binary marks, pairwise Hamming distance >= min_distance.

  Returns bool [n, 5, 5]. Each mark has 9-16 cells on and touches all four borders, so its
  extent is always the full 5x5 cell box.
  """
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    half = rng.random((5, 3)) < 0.5
    g = np.concatenate([half, half[:, 1::-1]], axis=1)  # columns 0 1 2 1 0
    if not (9 <= g.sum() <= 16 and g[0].any() and g[-1].any() and g[:, 0].any()):
      continue
    if all((g != o).sum() >= min_distance for o in out):
      out.append(g)
  return np.stack(out)


BRAND_GLYPHS = _brand_glyphs(len(BRANDS))


def brand_glyph(brand):
  """The brand's logo mark, bool [5, 5]."""
  return BRAND_GLYPHS[_brand_index(brand)]


def _brand_index(brand):
  try:
    return BRANDS.index(brand)
  except ValueError:
    raise ValueError(f"unknown brand {brand!r}; expected one of BRANDS") from None


def _brand_lines(seed=_VOCAB_SEED):
  """brand -> (categories it sells, its favourite colours). Every category gets >= 4 train brands."""
  rng = np.random.default_rng(seed + 1)
  for _ in range(1000):
    lines = {b: tuple(sorted(rng.choice(len(CATEGORIES), size=4, replace=False))) for b in BRANDS}
    count = np.zeros(len(CATEGORIES), int)
    for b in BRANDS:
      if b not in HOLDOUT_BRANDS:
        count[list(lines[b])] += 1
    if count.min() >= 4:
      break
  colors = list(COLORS)
  return {b: (tuple(CATEGORIES[i] for i in lines[b]),
              tuple(colors[i] for i in rng.choice(len(colors), size=4, replace=False)))
          for b in BRANDS}


BRAND_LINES = _brand_lines()


def brand_categories(brand):
  """Categories in the brand's line: outside them the brand appears only in the improbable split."""
  return BRAND_LINES[brand][0]


# ------------------------------------------------------------------------------------------------
# Product specs.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProductSpec:
  """All ground truth of one product. Shape attributes are '' where they do not apply.

  jitter: 4 factors in [0.93, 1.07] that perturb the silhouette (width, length, detail, placement).
  pattern_phase: (dy, dx) pixel offsets of the pattern in units of its period, in [0, 1).
  views: which renderings the product has, first always 'front' (see render.VIEWS).
  view_params: (angle in degrees, scale, shift_x, shift_y) of the 'shifted' view.
  """
  product_id: str
  split: str
  category: str
  subcategory: str
  gender: str
  primary_color: str
  secondary_color: str
  pattern: str
  material: str
  composition: str
  brand: str
  season: str
  sleeve: str = ""
  neckline: str = ""
  length: str = ""
  heel: str = ""
  strap: str = ""
  novelty: str = ""
  jitter: tuple = (1.0, 1.0, 1.0, 1.0)
  pattern_phase: tuple = (0.0, 0.0)
  views: tuple = ("front", "back")
  view_params: tuple = (0.0, 1.0, 0.0, 0.0)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  @property
  def shape_attrs(self):
    return {a: getattr(self, a) for a in SHAPE_ATTR_NAMES if getattr(self, a)}


def _rng(seed, split, index, stream):
  return np.random.default_rng((int(seed), _SPLIT_ID[split], int(index), stream))


def _choice(rng, seq, p=None):
  """One element of seq, uniformly or with probabilities p (faster than rng.choice)."""
  if p is None:
    return seq[int(rng.integers(len(seq)))]
  return seq[min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), len(seq) - 1)]


def check_split(split):
  if split not in _SPLIT_ID:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


_TRAIN_SUBCATS = tuple(s for s in SUBCATEGORIES if s not in HOLDOUT_SUBCATEGORIES)
_TRAIN_BRANDS = tuple(b for b in BRANDS if b not in HOLDOUT_BRANDS)


def _sample_colors(rng, season, brand, forbid_pairs=IMPROBABLE_COLOR_PAIRS):
  """(primary, secondary): FW favours dark primaries, SS light ones; half from the brand palette."""
  names = list(COLORS)
  fav = BRAND_LINES[brand][1]
  if rng.random() < 0.4:
    primary = _choice(rng, fav)
  else:
    w = np.array([2.0 if (c in DARK_COLORS) == season.startswith("FW") else 1.0 for c in names])
    primary = _choice(rng, names, w / w.sum())
  while True:
    secondary = _choice(rng, names)
    if secondary != primary and (primary, secondary) not in forbid_pairs:
      return primary, secondary


def _sample_brand(rng, category, pool):
  sellers = [b for b in pool if category in BRAND_LINES[b][0]]
  return _choice(rng, sellers)


def sample_spec(split, index, seed=0):
  """Samples product `index` of `split` (see the module docstring for what each split promises)."""
  check_split(split)
  rng = _rng(seed, split, index, 0)
  novelty = ""
  if split == "holdout_category":
    sub = SUBCATEGORIES[_choice(rng, HOLDOUT_SUBCATEGORIES)]
    brand = _sample_brand(rng, sub.category, _TRAIN_BRANDS)
    novelty = "subcategory"
  elif split == "holdout_brand":
    sub = SUBCATEGORIES[_choice(rng, _TRAIN_SUBCATS)]
    brand = _sample_brand(rng, sub.category, HOLDOUT_BRANDS)
    novelty = "brand"
  elif split == "improbable" and rng.random() < 0.5:
    sub = SUBCATEGORIES[_choice(rng, _TRAIN_SUBCATS)]
    brand = _choice(rng, [b for b in _TRAIN_BRANDS if sub.category not in BRAND_LINES[b][0]])
    novelty = "brand_category"
  else:
    sub = SUBCATEGORIES[_choice(rng, _TRAIN_SUBCATS)]
    brand = _sample_brand(rng, sub.category, _TRAIN_BRANDS)
    if split == "improbable":
      novelty = "color_order"
  season = _choice(rng, SEASONS)
  if novelty == "color_order":
    primary, secondary = _choice(rng, IMPROBABLE_COLOR_PAIRS)
  else:
    primary, secondary = _sample_colors(rng, season, brand)
  gender = _choice(rng, sub.genders)
  materials = sub.materials
  if len(materials) > 1:  # season cue: FW favours warm fibres
    w = np.array([2.0 if (m in WARM_MATERIALS) == season.startswith("FW") else 1.0 for m in materials])
    material = _choice(rng, materials, w / w.sum())
  else:
    material = materials[0]
  pct = int(_choice(rng, (100, 100, 98, 95, 90, 80, 70, 60)))
  composition = f"{pct}% {material}"
  if pct < 100:
    composition += f", {100 - pct}% {_choice(rng, MINOR_FIBRES)}"
  attrs = {name: _choice(rng, values) for name, values in sub.attrs}
  n_views = int(rng.choice((2, 3, 4), p=(0.3, 0.4, 0.3)))
  extra = sorted(rng.choice(3, size=n_views - 1, replace=False))
  views = ("front",) + tuple(("back", "detail", "shifted")[i] for i in extra)
  return ProductSpec(
      product_id=f"{_SPLIT_PREFIX[split]}{index:07d}", split=split, category=sub.category,
      subcategory=sub.name, gender=gender, primary_color=primary, secondary_color=secondary,
      pattern=_choice(rng, sub.patterns), material=material, composition=composition,
      brand=brand, season=season, novelty=novelty,
      jitter=tuple(float(x) for x in rng.uniform(0.93, 1.07, size=4)),
      pattern_phase=tuple(float(x) for x in rng.random(2)), views=views,
      view_params=(float(rng.uniform(-15, 15)), float(rng.uniform(0.8, 1.05)),
                   float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
      **attrs)


def respec(spec, rng, **fixed):
  """`spec` with the fields in `fixed` set and every field that depends on them made consistent.

  Changing `subcategory` resamples category, gender, pattern, material/composition, shape
  attributes and (if the brand does not sell the new category) the brand; changing `material`
  rewrites the composition. Fields given in `fixed` win. Raises ValueError on a value the
  sub-category does not allow (e.g. sleeve='sleeveless' on a hoodie).
  """
  unknown = set(fixed) - {f.name for f in dataclasses.fields(ProductSpec)}
  if unknown:
    raise ValueError(f"unknown ProductSpec fields {sorted(unknown)}")
  d = dataclasses.asdict(spec)
  sub = SUBCATEGORIES[fixed.get("subcategory", spec.subcategory)]
  if sub.name != spec.subcategory:
    d.update(subcategory=sub.name, category=sub.category, gender=_choice(rng, sub.genders),
             pattern=_choice(rng, sub.patterns), material=_choice(rng, sub.materials))
    d.update({a: "" for a in SHAPE_ATTR_NAMES})
    d.update({name: _choice(rng, values) for name, values in sub.attrs})
    if sub.category not in BRAND_LINES[d["brand"]][0]:
      d["brand"] = _sample_brand(rng, sub.category, _TRAIN_BRANDS)
  d.update(fixed)
  if d["material"] != spec.material or sub.name != spec.subcategory:
    rest = spec.composition.split(", ")[1:]
    pct = 100 - sum(int(r.split("%")[0]) for r in rest)
    d["composition"] = ", ".join([f"{pct}% {d['material']}"] + rest)
  allowed = sub.attr_values()
  for a in SHAPE_ATTR_NAMES:
    if d[a] and d[a] not in allowed.get(a, ()):
      raise ValueError(f"{a}={d[a]!r} is not allowed for {sub.name!r}: {allowed.get(a, ())}")
  checks = {"pattern": sub.patterns, "material": sub.materials, "gender": sub.genders,
            "primary_color": tuple(COLORS), "secondary_color": tuple(COLORS), "brand": BRANDS,
            "season": SEASONS}
  for field, values in checks.items():
    if d[field] not in values:
      raise ValueError(f"{field}={d[field]!r} is not allowed for {sub.name!r}: {values}")
  return ProductSpec(**d)


# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------

# Phrases that name no attribute (FashionGen descriptions are full of them).
IRRELEVANT_PHRASES = (
    "Tonal stitching.", "Made in Portugal.", "Made in Italy.", "Unlined.", "Machine wash cold.",
    "Dry clean only.", "Relaxed fit.", "Regular fit.", "True to size.", "Imported.",
    "Fully lined.", "Signature care label at interior.", "Model is wearing a size M.",
    "Slightly oversized.", "Designed in Copenhagen.",
)
_PLACES = {  # where the logo sits, by render family
    "upper": "at chest", "dress": "at chest", "skirt": "at hip", "trousers": "at hip",
    "shoe": "at side", "bag": "at face", "hat": "at front", "scarf": "at end", "belt": "at strap",
    "glove": "at cuff",
}
_TRIM = {  # which parts wear the secondary colour, by render family
    "upper": "trim", "dress": "trim", "skirt": "waistband", "trousers": "waistband",
    "shoe": "sole and heel", "bag": "handles and edges", "hat": "band", "scarf": "fringe",
    "belt": "keeper", "glove": "cuffs",
}


def _cap(s):
  return s[:1].upper() + s[1:]


def describe(spec, seed=0):
  """FashionGen-like (title, description) for `spec`.

  Title: "[colour] [pattern] [shape] [material] noun", each optional part present with some
  probability (the colour almost always). Description: an opening sentence, then attribute
  sentences in random order (each attribute left unsaid with probability ~0.25), mixed with 0-2
  irrelevant phrases. Only true attributes are ever named.
  """
  rng = np.random.default_rng((int(seed), _SPLIT_ID[spec.split], _id_number(spec.product_id), 1))
  sub = SUBCATEGORIES[spec.subcategory]
  noun = _choice(rng, sub.nouns)
  mat = _choice(rng, MATERIALS[spec.material])
  pat = _choice(rng, PATTERNS[spec.pattern])
  shape_phr = {a: _choice(rng, SHAPE_ATTRS[a][v]) for a, v in spec.shape_attrs.items()}

  # Title.
  parts = []
  title_color = rng.random() < 0.9
  if title_color:
    parts.append(spec.primary_color)
  if spec.pattern != "solid" and rng.random() < 0.6:
    parts.append(PATTERNS[spec.pattern][0])
  for a in ("sleeve", "length", "heel"):
    if a in shape_phr and rng.random() < 0.3:
      parts.append(_choice(rng, SHAPE_ATTRS[a][getattr(spec, a)]).replace(" sleeves", "-sleeve"))
  if rng.random() < 0.5:
    parts.append(MATERIALS[spec.material][0])
  parts.append(noun)
  title = " ".join(_cap(w) for w in " ".join(parts).split(" "))

  # Description.
  opener = _choice(rng, (
      f"{_cap(mat)} {noun} in {spec.primary_color}.",
      f"{_cap(spec.primary_color)} {mat} {noun}.",
      f"{_cap(noun)} crafted in {spec.primary_color} {mat}.",
  ))
  if not title_color:
    opener = f"{_cap(spec.primary_color)} {noun}."
  sentences = []
  maybe = lambda p=0.75: rng.random() < p
  if spec.pattern != "solid" and maybe():
    sentences.append(_choice(rng, (
        f"{_cap(pat)} pattern in {spec.secondary_color} throughout.",
        f"Allover {pat} print in {spec.secondary_color}.",
        f"{_cap(pat)} motif.",
    )))
  if maybe(0.7):
    trim = _TRIM[sub.family]
    sentences.append(_choice(rng, (
        f"Contrast {trim} in {spec.secondary_color}.",
        f"{_cap(spec.secondary_color)} {trim}.",
    )))
  for a, phr in shape_phr.items():
    if maybe():
      sentences.append(_choice(rng, (f"{_cap(phr)}.", f"Features {phr}.")))
  if maybe(0.5):
    brand_part = spec.brand if rng.random() < 0.5 else "Logo"
    if brand_part != "Logo":
      brand_part += " logo"
    sentences.append(f"{brand_part} {_choice(rng, ('embroidered', 'printed', 'stamped'))} "
                     f"{_PLACES[sub.family]}.")
  if maybe(0.3):
    sentences.append(_choice(rng, {"men": ("Men's cut.", "Cut for men."),
                                   "women": ("Women's cut.", "Cut for women."),
                                   "unisex": ("Unisex design.", "Unisex.")}[spec.gender]))
  n_irr = int(rng.choice(3, p=(0.3, 0.45, 0.25)))
  sentences += [_choice(rng, IRRELEVANT_PHRASES) for _ in range(n_irr)]
  order = rng.permutation(len(sentences))
  description = " ".join([opener] + [sentences[i] for i in order])
  return title, description


def _id_number(product_id):
  m = re.search(r"(\d+)$", product_id)
  if not m:
    raise ValueError(f"product_id {product_id!r} must end in digits")
  return int(m.group(1))


def text_phrases():
  """attribute -> {value -> phrases} for every attribute the text can name (used by tests/evals)."""
  out = {"primary_color": {c: (c,) for c in COLORS}, "pattern": dict(PATTERNS),
         "material": dict(MATERIALS), "brand": {b: (b,) for b in BRANDS}}
  out.update(SHAPE_ATTRS)
  return out


# ------------------------------------------------------------------------------------------------
# Products.
# ------------------------------------------------------------------------------------------------

def spec_fields(spec):
  """The text fields of the product schema plus EXTRA_FIELDS, except title/description/logo_box."""
  d = {name: getattr(spec, name) for name in (
      "product_id", "category", "subcategory", "brand", "season", "composition", "gender",
      "primary_color", "secondary_color", "pattern", "material", "novelty") + SHAPE_ATTR_NAMES}
  d["views"] = ",".join(spec.views)
  return d


def nearest_color(rgb):
  """Names of the nearest COLORS entries for an [..., 3] array of RGB values."""
  pal = np.array(list(COLORS.values()), np.float32)
  d = ((np.asarray(rgb, np.float32)[..., None, :] - pal) ** 2).sum(-1)
  return np.array(list(COLORS))[d.argmin(-1)]
