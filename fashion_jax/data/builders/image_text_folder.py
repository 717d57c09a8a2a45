"""A shop's own catalog (a folder of images + a CSV/JSONL file) as a TFDS product dataset.

This is how you train fashion_jax on your products. Put the images and ONE catalog file in a
folder:

  /data/myshop/
    catalog.csv            (or catalog.tsv, or catalog.jsonl)
    img/sku1_front.jpg
    img/sku1_back.jpg
    ...

catalog.csv, one row per product (header names are matched case-insensitively):

  product_id,image,title,description,brand,category,color,material,split
  sku1,img/sku1_front.jpg|img/sku1_back.jpg,Navy linen shirt,Relaxed fit...,Acme,shirts,navy,linen,
  sku2,"[""img/sku2.png""]",Red wool coat,Double-breasted...,Acme,outerwear,red,wool,test

or catalog.jsonl, one JSON object per line:

  {"product_id": "sku1", "image": ["img/sku1_front.jpg", "img/sku1_back.jpg"],
   "title": "Navy linen shirt", "brand": "Acme", "color": "navy"}

and build it (`myshop` is any config name you choose; it names the output directory):

  python -m launch.build_data --dataset=image_text_folder/myshop --manual_dir=/data/myshop

then read it like any product dataset:
  tfds.builder("image_text_folder/myshop", data_dir=...).as_dataset(split="train")

Columns (first alias present wins; override any of them with an ImageTextFolderConfig):
  image        image | images | image_path | image_paths | path | file | filename   REQUIRED.
               One path, several separated by '|', or a JSON list: several views of the product.
               Paths are relative to the catalog's folder (or absolute). URLs are not fetched.
  product_id   product_id | id | sku        else the first image path is the id. Rows sharing an
               id are MERGED into one product (their images appended in row order, text and
               tags from the first row; later rows may leave them blank), so a one-row-per-image
               export works as is.
  title        title | name | product_name
  description  description | text | caption     title or description must be non-empty.
  split        split: train | validation (also val, valid, dev) | test | any other identifier
               (becomes its own split). Without a split column (or for an empty cell) a product
               goes to train/validation/test by a hash of its product_id with `split_fractions`
               (default 0.8/0.1/0.1): deterministic, stable when rows are added or reordered.
  category, subcategory, brand, season, composition, gender: the product-schema fields.
  ANY OTHER COLUMN becomes a tag: a Text feature named after the column (lower-cased,
               non-alphanumerics -> '_', e.g. "Colour Name" -> colour_name).

Why the features are known at `_info` time: TFDS fixes an example's features before the data
is read. Three sources, in order:
  1. `ImageTextFolderConfig(tag_columns=(...))`: explicit, for Python users (other extra columns
     are then ignored);
  2. a dataset already built under data_dir: its features.json (so reading back needs neither
     the catalog nor a config object: `tfds.builder("image_text_folder/myshop", data_dir=...)`);
  3. otherwise the builder reads the catalog's header (CSV) or keys (JSONL) from the manual_dir
     passed to `download_and_prepare(download_config=DownloadConfig(manual_dir=...))`, just
     before building. A config name that is not predefined (here "myshop") is accepted and
     means "all defaults, discover the columns".

Python use with explicit options:
  from fashion_jax.data.builders import image_text_folder
  cfg = image_text_folder.ImageTextFolderConfig(
      name="myshop", catalog="export.csv", image_column="Picture", description_column="Copy",
      tag_columns=("Colour", "Fit"), split_fractions=(0.9, 0.05, 0.05))
  builder = image_text_folder.ImageTextFolder(config=cfg, data_dir="/data/tfds")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/myshop"))

Bad input (policy in fashion_jax/data/images.py; report in bad_records.json next to the data):
  a CSV row with more or fewer fields than the header, an unparsable JSONL line, a row without an
  image path or without any text: skipped and counted with its row number (under the pseudo-split
  "catalog", checked against max_bad_fraction before any image is decoded); a field that is not
  UTF-8: decoded as cp1252 and counted; an image that is missing or unreadable: that view is
  dropped and counted; a product with no usable view left: skipped and counted. Views of one
  product with different sizes are centred on white to a common size (the schema's
  Sequence(Image) decodes to one [V, H, W, 3] tensor), counted as a conversion.
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re

import tensorflow_datasets as tfds

from fashion_jax.data import images as images_lib
from fashion_jax.data import schema

CATALOG_NAMES = ("catalog.csv", "catalog.tsv", "catalog.jsonl")
IMAGE_ALIASES = ("image", "images", "image_path", "image_paths", "path", "file", "filename")
ID_ALIASES = ("product_id", "id", "sku")
TITLE_ALIASES = ("title", "name", "product_name")
DESCRIPTION_ALIASES = ("description", "text", "caption")
SPLIT_ALIASES = ("split",)
SPLIT_SYNONYMS = {"train": "train", "training": "train", "validation": "validation",
                  "val": "validation", "valid": "validation", "dev": "validation",
                  "test": "test"}
CATALOG_SPLIT = "catalog"  # BadRecords pseudo-split for row-level problems.
_MAPPED_SCHEMA_FIELDS = ("category", "subcategory", "brand", "season", "composition", "gender")
_RESERVED = set(schema.TEXT_FIELDS) | {schema.IMAGES}
_WHERE_FROM = "your own catalog export (see the image_text_folder module docstring)"
_SPLIT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def feature_name(column):
  """Column header -> TFDS feature name: "Colour Name" -> "colour_name", "2nd" -> "tag_2nd"."""
  name = re.sub(r"[^0-9a-z_]+", "_", column.strip().lower()).strip("_")
  if not name or name[0].isdigit():
    name = "tag_" + name
  return name


class ImageTextFolderConfig(tfds.core.BuilderConfig):
  """Where the catalog is and which columns mean what (None = find it by the aliases).

  Attributes:
    catalog: catalog file, relative to manual_dir (or absolute); None = the first of
      catalog.csv, catalog.tsv, catalog.jsonl present.
    image_column, id_column, title_column, description_column, split_column: header names.
    tag_columns: extra columns kept as Text features; None = every column not used otherwise.
    split_fractions: (train, validation, test) for products without a split value; sum to 1.
    max_image_side: longer image side after building (larger images are downscaled).
  """

  def __init__(self, *, name="default", catalog=None, image_column=None, id_column=None,
               title_column=None, description_column=None, split_column=None,
               tag_columns=None, split_fractions=(0.8, 0.1, 0.1),
               max_image_side=images_lib.DEFAULT_MAX_SIDE, **kwargs):
    kwargs.setdefault("description", "A product catalog: images + CSV/JSONL.")
    super().__init__(name=name, **kwargs)
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
      raise ValueError(f"split_fractions must be 3 non-negative numbers (train, validation, "
                       f"test) summing to 1, got {split_fractions}")
    self.catalog = catalog
    self.image_column = image_column
    self.id_column = id_column
    self.title_column = title_column
    self.description_column = description_column
    self.split_column = split_column
    self.tag_columns = None if tag_columns is None else tuple(tag_columns)
    self.split_fractions = fractions
    self.max_image_side = max_image_side


@dataclasses.dataclass
class Columns:
  """Resolved column roles: header name (or None) per role; tags: feature name -> header."""
  image: str
  id: str | None
  title: str | None
  description: str | None
  split: str | None
  schema_fields: dict
  tags: dict


def find_catalog(manual_dir, config):
  """Returns the catalog path, or raises MissingManualFileError naming what was expected."""
  manual_dir = os.fspath(manual_dir)
  if config.catalog:
    return images_lib.require_manual_file(manual_dir, config.catalog, "image_text_folder",
                                          _WHERE_FROM)
  for name in CATALOG_NAMES:
    path = os.path.join(manual_dir, name)
    if os.path.isfile(path):
      return path
  raise images_lib.MissingManualFileError(
      f"image_text_folder: expected a catalog file ({' or '.join(CATALOG_NAMES)}) in the manual "
      f"directory {manual_dir!r}, found none. It comes from {_WHERE_FROM}; or name the file with "
      "ImageTextFolderConfig(catalog=...).")


def _is_jsonl(path):
  return path.lower().endswith((".jsonl", ".ndjson"))


def _fix_field(value, bad, ref):
  """A CSV cell decoded with surrogateescape -> clean str (cp1252 fallback counted)."""
  if any("\udc80" <= ch <= "\udcff" for ch in value):
    text, conversion = images_lib.decode_bytes(value.encode("utf-8", "surrogateescape"))
    bad.convert(CATALOG_SPLIT, ref, conversion)
    return text
  return images_lib.clean_text(value)


def _json_value_to_text(value):
  if value is None:
    return ""
  if isinstance(value, str):
    return images_lib.clean_text(value)
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return ", ".join(images_lib.clean_text(v) for v in value if v.strip())
  if isinstance(value, (int, float, bool)):
    return str(value)
  return json.dumps(value, ensure_ascii=False, sort_keys=True)


def read_catalog(path, bad):
  """Yields (ref, {column: value}) for good rows; bad rows are counted in `bad` and skipped.

  CSV/TSV values are str; JSONL values are as parsed (lists, numbers, ...). The column names
  are `catalog_header(path)`.
  """
  name = os.path.basename(path)
  with open(path, "rb") as f:
    raw = f.read()
  if _is_jsonl(path):
    for lineno, line in enumerate(raw.splitlines(), start=1):
      if not line.strip():
        continue
      ref = f"{name} line {lineno}"
      text, conversion = images_lib.decode_bytes(line)
      if conversion:
        bad.convert(CATALOG_SPLIT, ref, conversion)
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        bad.skip(CATALOG_SPLIT, ref, f"not valid JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(obj, dict):
        bad.skip(CATALOG_SPLIT, ref, f"a JSON {type(obj).__name__}, not an object")
        continue
      yield ref, {str(k): v for k, v in obj.items()}
    return
  text = raw.decode("utf-8-sig", errors="surrogateescape")
  reader = csv.reader(io.StringIO(text, newline=""),
                      delimiter="\t" if path.lower().endswith(".tsv") else ",")
  header = next(reader, None)
  if not header:
    raise ValueError(f"image_text_folder: {path} is empty (no header row)")
  header = [_fix_field(h, bad, f"{name} header") for h in header]
  for row_number, row in enumerate(reader, start=1):
    if not row or all(not cell.strip() for cell in row):
      continue  # Blank lines are not records.
    ref = f"{name} row {row_number} (line {reader.line_num})"
    if len(row) != len(header):
      bad.skip(CATALOG_SPLIT, ref, f"{len(row)} fields, but the header has {len(header)} "
                                   f"({'missing columns' if len(row) < len(header) else 'extra fields'})")
      continue
    yield ref, {h: _fix_field(v, bad, ref) for h, v in zip(header, row)}


def catalog_header(path):
  """Column names: the CSV/TSV header, or the union of JSONL keys in first-seen order."""
  with open(path, "rb") as f:
    raw = f.read()
  if _is_jsonl(path):
    keys = {}
    for line in raw.splitlines():
      try:
        obj = json.loads(images_lib.decode_bytes(line)[0]) if line.strip() else None
      except json.JSONDecodeError:
        continue
      if isinstance(obj, dict):
        keys.update(dict.fromkeys(str(k) for k in obj))
    return list(keys)
  text = raw.decode("utf-8-sig", errors="replace")
  header = next(csv.reader(io.StringIO(text, newline=""),
                           delimiter="\t" if path.lower().endswith(".tsv") else ","), [])
  return [images_lib.clean_text(h) for h in header]


def resolve_columns(header, config, path="catalog"):
  """Assigns roles to the header's columns (see the module docstring); errors name columns."""
  by_name = {}
  for col in header:
    by_name.setdefault(feature_name(col), col)

  def pick(explicit, aliases, role):
    if explicit is not None:
      if explicit not in header:
        raise ValueError(f"image_text_folder: {role} column {explicit!r} is not in {path}; "
                         f"its columns are {header}")
      return explicit
    return next((by_name[a] for a in aliases if a in by_name), None)

  image = pick(config.image_column, IMAGE_ALIASES, "image")
  if image is None:
    raise ValueError(f"image_text_folder: {path} has no image column (one of {IMAGE_ALIASES}, or "
                     f"set ImageTextFolderConfig(image_column=...)); its columns are {header}")
  roles = dict(image=image, id=pick(config.id_column, ID_ALIASES, "id"),
               title=pick(config.title_column, TITLE_ALIASES, "title"),
               description=pick(config.description_column, DESCRIPTION_ALIASES, "description"),
               split=pick(config.split_column, SPLIT_ALIASES, "split"))
  if roles["title"] is None and roles["description"] is None:
    raise ValueError(f"image_text_folder: {path} has no text column (title: {TITLE_ALIASES}, "
                     f"description: {DESCRIPTION_ALIASES}); its columns are {header}")
  used = {c for c in roles.values() if c is not None}
  schema_fields = {f: by_name[f] for f in _MAPPED_SCHEMA_FIELDS
                   if f in by_name and by_name[f] not in used}
  used |= set(schema_fields.values())
  if config.tag_columns is not None:
    missing = [c for c in config.tag_columns if c not in header]
    if missing:
      raise ValueError(f"image_text_folder: tag column(s) {missing} are not in {path}; its "
                       f"columns are {header}")
    tag_cols = [c for c in config.tag_columns if c not in used]
  else:
    tag_cols = [c for c in header if c not in used]
  tags = {}
  for col in tag_cols:
    fname = feature_name(col)
    if fname in _RESERVED or fname in tags:
      other = tags.get(fname, fname)
      raise ValueError(f"image_text_folder: column {col!r} of {path} would become the feature "
                       f"{fname!r}, which is taken by {other!r}; rename the column")
    tags[fname] = col
  return Columns(schema_fields=schema_fields, tags=tags, **roles)


def hash_split(product_id, fractions):
  """Deterministic train/validation/test assignment from sha256(product_id)."""
  u = int.from_bytes(hashlib.sha256(product_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
  if u < fractions[0]:
    return "train"
  return "validation" if u < fractions[0] + fractions[1] else "test"


def parse_image_paths(value):
  """'a.jpg' | 'a.jpg|b.jpg' | '["a.jpg", "b.jpg"]' | a JSON list -> list of non-empty str."""
  if isinstance(value, list):
    paths = value
  else:
    value = str(value or "").strip()
    if value.startswith("["):
      try:
        paths = json.loads(value)
      except json.JSONDecodeError:
        paths = value.strip("[]").split(",")
    else:
      paths = value.split("|")
  return [str(p).strip().strip('"').strip() for p in paths if str(p).strip().strip('"').strip()]


class ImageTextFolder(images_lib.BadRecordsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """A user's product catalog: images + catalog.csv / catalog.tsv / catalog.jsonl."""

  name = "image_text_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Product catalog from images + CSV/JSONL."}
  BUILDER_CONFIGS = [ImageTextFolderConfig(name="default")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put your product images and one catalog file (catalog.csv, catalog.tsv or catalog.jsonl) "
      "with an image column and a title/description column in the manual_dir; see the "
      "fashion_jax.data.builders.image_text_folder docstring for the columns.")

  def __init__(self, **kwargs):
    self._discovered_tags = None
    self._info_obj = None
    super().__init__(**kwargs)

  # Config and features ------------------------------------------------------------------------
  def _create_builder_config(self, builder_config, version):
    """Accepts any config NAME: an unknown name is a default config with that name."""
    if isinstance(builder_config, str):
      name = builder_config.split(":")[0]
      if name not in self.builder_configs:
        builder_config = ImageTextFolderConfig(name=name)
    return super()._create_builder_config(builder_config, version)

  @property
  def info(self):
    # Overrides the base class's per-instance cached property so the features can be set once
    # the catalog header is known (see the module docstring, "Why the features are known").
    if self._info_obj is None:
      self._info_obj = self._info()
    return self._info_obj

  def _tag_feature_names(self):
    if self.builder_config.tag_columns is not None:
      return [feature_name(c) for c in self.builder_config.tag_columns]
    if self._discovered_tags is not None:
      return list(self._discovered_tags)
    features_json = os.path.join(os.fspath(self.data_path), "features.json")
    if os.path.isfile(features_json):
      stored = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
      return [k for k in stored.keys() if k not in _RESERVED]
    return []  # Discovered from the catalog in download_and_prepare.

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n")[0],
        features=schema.product_features(extra_text_fields=tuple(self._tag_feature_names())))

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """Reads the catalog's columns (when not configured) before tfds builds; see the docstring."""
    already_built = os.path.isfile(os.path.join(os.fspath(self.data_path), "dataset_info.json"))
    if self.builder_config.tag_columns is None and not already_built:
      manual_dir = download_config.manual_dir if download_config else None
      if not manual_dir:
        manual_dir = os.path.join(download_dir or os.path.join(self.data_dir_root, "downloads"),
                                  "manual")
      path = find_catalog(manual_dir, self.builder_config)
      columns = resolve_columns(catalog_header(path), self.builder_config, path)
      self._discovered_tags = list(columns.tags)
      file_format = self.info.file_format  # Set by the base constructor; keep it.
      self._info_obj = None
      self.info.set_file_format(file_format)
      logging.info("image_text_folder: %s: tag features %s", path, self._discovered_tags)
    return super().download_and_prepare(download_dir=download_dir,
                                        download_config=download_config, **kwargs)

  # Generation ---------------------------------------------------------------------------------
  def _split_generators(self, dl_manager):
    config = self.builder_config
    bad = self.bad_records
    path = find_catalog(dl_manager.manual_dir, config)
    root = os.path.dirname(os.path.abspath(path))
    columns = resolve_columns(catalog_header(path), config, path)
    expected = set(self._tag_feature_names())
    if set(columns.tags) != expected:
      raise ValueError(f"image_text_folder: {path} has tag columns {sorted(columns.tags)} but "
                       f"the dataset's features expect {sorted(expected)}; rebuild into a new "
                       "config name or set tag_columns")
    products = {}  # product id -> dict (insertion order = first row order).
    for ref, row in read_catalog(path, bad):
      value = lambda col: "" if col is None else _json_value_to_text(row.get(col))
      images = parse_image_paths(row.get(columns.image))
      if not images:
        bad.skip(CATALOG_SPLIT, ref, f"no image path in column {columns.image!r}")
        continue
      pid = value(columns.id) or images[0]
      if pid in products:  # Another row of the same product: more views (its text may be blank).
        bad.ok(CATALOG_SPLIT)
        known = products[pid]["images"]
        known.extend((p, ref) for p in images if p not in {q for q, _ in known})
        continue
      title, description = value(columns.title), value(columns.description)
      if not title and not description:
        bad.skip(CATALOG_SPLIT, ref, "empty title and description (a product needs text)")
        continue
      split = value(columns.split).lower()
      if split:
        split = SPLIT_SYNONYMS.get(split, split)
        if not _SPLIT_NAME_RE.match(split):
          bad.skip(CATALOG_SPLIT, ref, f"split {split!r} is not a valid split name "
                                       "(letters, digits, '_', starting with a letter)")
          continue
      bad.ok(CATALOG_SPLIT)
      products[pid] = {
          "ref": ref, "images": [(p, ref) for p in images], "split": split,
          "fields": {"title": title, "description": description,
                     **{f: value(c) for f, c in columns.schema_fields.items()},
                     **{f: value(c) for f, c in columns.tags.items()}}}
    bad.check(CATALOG_SPLIT)
    by_split = {}
    for pid, product in products.items():
      split = product["split"] or hash_split(pid, config.split_fractions)
      by_split.setdefault(split, []).append((pid, product))
    if not by_split:
      raise ValueError(f"image_text_folder: {path} has no usable rows; see the skipped rows "
                       "logged above")
    return {split: self._generate_examples(split, root, items)
            for split, items in sorted(by_split.items())}

  def _generate_examples(self, split, root, products):
    bad = self.bad_records
    for pid, product in products:
      sources = []
      for rel, ref in product["images"]:
        if re.match(r"^[a-z][a-z0-9+.-]*://", rel, re.IGNORECASE):
          bad.skip(split, f"{ref}: {rel}", "URL image paths are not fetched; download the image "
                                          "and list its local path", unit=images_lib.IMAGE)
        else:
          sources.append((os.path.join(root, rel), rel))
      jpegs = images_lib.load_views(sources, bad, split,
                                    max_side=self.builder_config.max_image_side)
      if not jpegs:
        bad.skip(split, f"product {pid} ({product['ref']})", "no usable image")
        continue
      bad.ok(split)
      example = {f: "" for f in schema.TEXT_FIELDS}
      example.update(product["fields"], product_id=pid, images=jpegs)
      yield pid, example
    bad.check(split)
