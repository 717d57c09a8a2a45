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
               id are MERGED into one product when they agree (a one-row-per-image export works
               as is); see "Which image belongs to which product" below.
  title        title | name | product_name
  description  description | text | caption     title or description must be non-empty.
  split        split: train | validation (also val, valid, dev) | test | any other identifier
               (becomes its own split). Without a split column (or for an empty cell) a product
               goes to train/validation/test by a hash of its product_id with `split_fractions`
               (default 0.8/0.1/0.1): deterministic, stable when rows are added or reordered.
  category, subcategory, brand, season, composition, gender: the product-schema fields.
  ANY OTHER COLUMN becomes a tag: a Text feature named after the column (lower-cased,
               non-alphanumerics -> '_', e.g. "Colour Name" -> colour_name).
               A numeric tag column can grade each product's image-text pair (e.g. `score`,
               a relevance from raters or search logs): training reads it with
               `--config.data.pair_weight_field=score` (parsed as float32 per product; a
               blank or non-numeric cell stops the input pipeline with TensorFlow's "could
               not correctly convert string: <the cell>"; a missing column is a KeyError
               naming config.data.pair_weight_field and the dataset's columns) and
               weighs that product's positive loss terms by GCL's score-to-weight map
               (fashion_jax/losses/pair_weights.py).

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

Which image belongs to which product: every image path in a row is a view of that row's
product (its product_id, else its first image path). A later row with an id already seen adds its
new image paths as further views (in row order; a path already among the views is not repeated)
and may leave text, tags and split blank (they come from the earlier rows; a blank there is filled
from the later row). A later row whose non-empty title, description, schema field, tag or split
DIFFERS from the product's is a conflicting duplicate (two products under one id): it is
skipped, and counted in bad_records.json with its row, the first row of the id and the differing
fields; its images are not added. One image path listed by two different products is kept in
both (e.g. a shared look shot) and noted in the report's conversions.

Encodings and separators: a byte-order mark is honoured (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE:
Excel's "Unicode Text" export is UTF-16 LE with a BOM and tab-separated); a file with NUL bytes
but no BOM is read as UTF-16 (LE or BE from where the NULs sit), and if it does not decode the
error names the encoding found and the `iconv` command that converts it. A catalog.csv whose
header line has more tabs (or semicolons) than commas is read as tab- (semicolon-) separated.
Without a BOM, UTF-8 is tried first per field, with cp1252 as the fallback (see below). What was
detected is noted in the report's conversions.

Bad input (policy in fashion_jax/data/images.py; report in bad_records.json next to the data):
  a CSV row with more or fewer fields than the header, an unparsable JSONL line, a row without an
  image path or without any text, a conflicting duplicate id: skipped and counted with its row
  number (under the pseudo-split "catalog", checked against max_bad_fraction before any image is
  decoded); a field that is not UTF-8: decoded as cp1252 and counted; an image that is missing or
  unreadable: that view is dropped and counted; a product with no usable view left: skipped and
  counted. Views of one product with different sizes are centred on white to a common size (the
  schema's Sequence(Image) decodes to one [V, H, W, 3] tensor), counted as a conversion.
  max_bad_fraction is judged over the WHOLE catalog, not per split (the hash split makes
  validation/test small samples of one population, where 2 bad of 30 says little): records =
  unusable rows + products without a usable view, out of unusable rows + products; images =
  unusable views out of all views. The error and the report ("totals"/"whole catalog") give the
  per-split counts too; every split must still keep at least one product.

Rebuilding after the catalog changes: the build records a fingerprint (catalog_fingerprint.json
next to the data): the catalog's sha256, the config's options and the sizes/modification times
of every referenced image file. `download_and_prepare` on a built dataset recomputes it and
raises StaleDatasetError naming what changed, instead of serving the old build;
`python -m launch.build_data ... --overwrite` rebuilds (the old build is replaced only once the
new one succeeds). Reading a built dataset (`as_dataset`, hence the training pipeline) logs a
warning when the catalog it was built from has changed (one stat, a hash only if it differs).
"""

import codecs
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
WHOLE_CATALOG = "whole catalog"  # BadRecords.check_total label.
FINGERPRINT_FILENAME = "catalog_fingerprint.json"
FINGERPRINT_OPTIONS = ("catalog", "image_column", "id_column", "title_column",
                       "description_column", "split_column", "tag_columns", "split_fractions",
                       "max_image_side")
# Byte-order marks, longest first (UTF-32 LE's starts with UTF-16 LE's):
# (BOM, Python codec, name in messages, iconv name).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE", "UTF-32LE"),
         (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE", "UTF-32BE"),
         (codecs.BOM_UTF8, "utf-8", "UTF-8", "UTF-8"),
         (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE", "UTF-16LE"),
         (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE", "UTF-16BE"))
_DELIMITER_NAMES = {",": "comma-separated", "\t": "tab-separated", ";": "';'-separated"}


class StaleDatasetError(images_lib.InputDataError, ValueError):
  """A built dataset whose catalog, options or image files changed since it was built."""


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
      f"directory {manual_dir!r}, found none. It comes from {_WHERE_FROM}; give its folder with "
      "`launch.build_data --manual_dir=DIR`, or name the file with "
      "ImageTextFolderConfig(catalog=...).")


def _is_jsonl(path):
  return path.lower().endswith((".jsonl", ".ndjson"))


def _decode_cell(value):
  """A CSV cell decoded with surrogateescape -> (clean str, conversion or None)."""
  if any("\udc80" <= ch <= "\udcff" for ch in value):
    return images_lib.decode_bytes(value.encode("utf-8", "surrogateescape"))
  return images_lib.clean_text(value), None


def _fix_field(value, bad, ref):
  """A CSV cell decoded with surrogateescape -> clean str (cp1252 fallback counted)."""
  text, conversion = _decode_cell(value)
  if conversion:
    bad.convert(CATALOG_SPLIT, ref, conversion)
  return text


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


def _encoding_error(path, found, iconv_name, detail):
  name = os.path.basename(path)
  stem, ext = os.path.splitext(name)
  return ValueError(
      f"image_text_folder: {path} looks like {found} text but does not decode as such "
      f"({detail}). Convert it to UTF-8, e.g. `iconv -f {iconv_name} -t UTF-8 {name} > "
      f"{stem}_utf8{ext}`, or in Excel save it as 'CSV UTF-8 (Comma delimited)'.")


def _decode_catalog(path, raw):
  """The catalog's bytes -> (text, encoding note), see "Encodings" in the module docstring.

  UTF-8 (with or without a BOM) is decoded with surrogateescape, so that a non-UTF-8 field can
  be decoded as cp1252 on its own (`_decode_cell`); other encodings are decoded strictly. The
  note is None for UTF-8 without a BOM, else e.g. "UTF-16 LE (byte-order mark)".
  """
  for bom, codec, found, iconv_name in _BOMS:
    if raw.startswith(bom):
      found += " (byte-order mark)"
      if codec == "utf-8":
        return raw[len(bom):].decode("utf-8", errors="surrogateescape"), found
      try:
        return raw[len(bom):].decode(codec), found
      except UnicodeDecodeError as e:
        raise _encoding_error(path, found, iconv_name,
                              f"{e.reason} at byte {e.start + len(bom)}") from None
  sample = raw[:4096]
  if b"\x00" in sample:  # No text encoding but UTF-16/32 puts NUL bytes in ASCII text.
    little = sample[1::2].count(0) >= sample[0::2].count(0)
    codec, iconv_name = ("utf-16-le", "UTF-16LE") if little else ("utf-16-be", "UTF-16BE")
    found = f"UTF-16 {'LE' if little else 'BE'} (no byte-order mark: guessed from its NUL bytes)"
    try:
      text = raw.decode(codec)
    except UnicodeDecodeError as e:
      raise _encoding_error(path, found, iconv_name, f"{e.reason} at byte {e.start}") from None
    if "\x00" in text:
      raise _encoding_error(path, found, iconv_name, "NUL characters remain after decoding; "
                            "it may be UTF-32 without a byte-order mark")
    return text, found
  return raw.decode("utf-8", errors="surrogateescape"), None


def _delimiter(path, text):
  """Tab for .tsv; else the most frequent of ',', tab, ';' in the header line (',' on ties)."""
  if path.lower().endswith(".tsv"):
    return "\t"
  first = text.split("\n", 1)[0]
  counts = {d: first.count(d) for d in (",", "\t", ";")}
  return max(counts, key=lambda d: (counts[d], d == ","))


def _read_text(path):
  """(catalog text, note for the report or None, CSV delimiter or None for JSONL)."""
  with open(path, "rb") as f:
    raw = f.read()
  text, found = _decode_catalog(path, raw)
  if _is_jsonl(path):
    note = f"read as {found}" if found and not found.startswith("UTF-8") else None
    return text, note, None
  delimiter = _delimiter(path, text)
  default = "\t" if path.lower().endswith(".tsv") else ","
  note = None
  if (found and not found.startswith("UTF-8")) or delimiter != default:
    note = f"read as {found or 'UTF-8'}, {_DELIMITER_NAMES[delimiter]}"
  return text, note, delimiter


def _jsonl_lines(text):
  """(line number, line) of a JSONL text; a line's JSON cannot hold a raw CR or LF."""
  return enumerate(re.split(r"\r\n|\r|\n", text), start=1)


def read_catalog(path, bad):
  """Yields (ref, {column: value}) for good rows; bad rows are counted in `bad` and skipped.

  CSV/TSV values are str; JSONL values are as parsed (lists, numbers, ...). The column names
  are `catalog_header(path)`. The detected encoding/separator, when not the default, is noted
  as a conversion of the catalog file.
  """
  name = os.path.basename(path)
  text, note, delimiter = _read_text(path)
  if note:
    bad.convert(CATALOG_SPLIT, name, note)
  if delimiter is None:
    for lineno, line in _jsonl_lines(text):
      if not line.strip():
        continue
      ref = f"{name} line {lineno}"
      line, conversion = _decode_cell(line)
      if conversion:
        bad.convert(CATALOG_SPLIT, ref, conversion)
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        bad.skip(CATALOG_SPLIT, ref, f"not valid JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(obj, dict):
        bad.skip(CATALOG_SPLIT, ref, f"a JSON {type(obj).__name__}, not an object")
        continue
      yield ref, {str(k): v for k, v in obj.items()}
    return
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  header = next(reader, None)
  if not header:
    raise images_lib.BadInputFileError(f"image_text_folder: {path} is empty (no header row)")
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
  text, _, delimiter = _read_text(path)
  if delimiter is None:
    keys = {}
    for _, line in _jsonl_lines(text):
      try:
        obj = json.loads(_decode_cell(line)[0]) if line.strip() else None
      except json.JSONDecodeError:
        continue
      if isinstance(obj, dict):
        keys.update(dict.fromkeys(str(k) for k in obj))
    return list(keys)
  header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
  return [_decode_cell(h)[0] for h in header]


def resolve_columns(header, config, path="catalog"):
  """Assigns roles to the header's columns (see the module docstring); errors name columns."""
  by_name = {}
  for col in header:
    by_name.setdefault(feature_name(col), col)

  def pick(explicit, aliases, role):
    if explicit is not None:
      if explicit not in header:
        raise images_lib.BadInputFileError(
            f"image_text_folder: {role} column {explicit!r} is not in {path}; "
            f"its columns are {header}")
      return explicit
    return next((by_name[a] for a in aliases if a in by_name), None)

  image = pick(config.image_column, IMAGE_ALIASES, "image")
  if image is None:
    raise images_lib.BadInputFileError(
        f"image_text_folder: {path} has no image column (one of {IMAGE_ALIASES}, or "
        f"set ImageTextFolderConfig(image_column=...)); its columns are {header}")
  roles = dict(image=image, id=pick(config.id_column, ID_ALIASES, "id"),
               title=pick(config.title_column, TITLE_ALIASES, "title"),
               description=pick(config.description_column, DESCRIPTION_ALIASES, "description"),
               split=pick(config.split_column, SPLIT_ALIASES, "split"))
  if roles["title"] is None and roles["description"] is None:
    raise images_lib.BadInputFileError(
        f"image_text_folder: {path} has no text column (title: {TITLE_ALIASES}, "
        f"description: {DESCRIPTION_ALIASES}); its columns are {header}")
  used = {c for c in roles.values() if c is not None}
  schema_fields = {f: by_name[f] for f in _MAPPED_SCHEMA_FIELDS
                   if f in by_name and by_name[f] not in used}
  used |= set(schema_fields.values())
  if config.tag_columns is not None:
    missing = [c for c in config.tag_columns if c not in header]
    if missing:
      raise images_lib.BadInputFileError(
          f"image_text_folder: tag column(s) {missing} are not in {path}; its "
          f"columns are {header}")
    tag_cols = [c for c in config.tag_columns if c not in used]
  else:
    tag_cols = [c for c in header if c not in used]
  tags = {}
  for col in tag_cols:
    fname = feature_name(col)
    if fname in _RESERVED or fname in tags:
      other = tags.get(fname, fname)
      raise images_lib.BadInputFileError(
          f"image_text_folder: column {col!r} of {path} would become the feature "
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


def _is_url(path):
  return re.match(r"^[a-z][a-z0-9+.-]*://", path, re.IGNORECASE) is not None


# ----------------------------------------------------------------------------------------------
# Fingerprint of a build's inputs.
# ----------------------------------------------------------------------------------------------
def _sha256_file(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _options(config):
  """The config's options that shape the data, JSON-normalised (tuples -> lists)."""
  return json.loads(json.dumps({k: getattr(config, k) for k in FINGERPRINT_OPTIONS}))


def catalog_fingerprint(path, config):
  """What a build of `path` with `config` depends on, as a JSON-able dict.

  catalog: the file's sha256 and size (its path and mtime are kept to make the read-time check
  one stat, but are not compared: a moved or touched catalog with the same bytes is the same);
  options: FINGERPRINT_OPTIONS of the config; images: the count and a sha256 over the sorted
  (path, size, mtime_ns) of every local image path any row lists (a missing file counts as
  such; its contents are not read, so a rebuild check costs one catalog parse and one stat per
  image).
  """
  path = os.path.abspath(path)
  stat = os.stat(path)
  columns = resolve_columns(catalog_header(path), config, path)
  root = os.path.dirname(path)
  paths = set()
  for _, row in read_catalog(path, images_lib.BadRecords("fingerprint")):
    paths.update(os.path.normpath(p) for p in parse_image_paths(row.get(columns.image))
                 if not _is_url(p))
  h = hashlib.sha256()
  for rel in sorted(paths):
    try:
      st = os.stat(os.path.join(root, rel))
      entry = f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
      entry = f"{rel}\tmissing"
    h.update(entry.encode("utf-8", "surrogateescape") + b"\n")
  return {"catalog": {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "sha256": _sha256_file(path)},
          "options": _options(config),
          "images": {"count": len(paths), "sha256": h.hexdigest()}}


def _show(value):
  return repr(tuple(value) if isinstance(value, list) else value)


def _clip(text, n=60):
  return text if len(text) <= n else text[:n - 3] + "..."


def fingerprint_changes(built, now):
  """Human-readable differences between two `catalog_fingerprint`s (empty: up to date)."""
  changes = []
  old_cat, new_cat = built["catalog"], now["catalog"]
  if old_cat["sha256"] != new_cat["sha256"]:
    changes.append(
        f"{os.path.basename(new_cat['path'])} changed since this dataset was built (sha256 "
        f"{old_cat['sha256'][:12]}... -> {new_cat['sha256'][:12]}..., {old_cat['size']} -> "
        f"{new_cat['size']} bytes; built from {old_cat['path']})")
  for key in FINGERPRINT_OPTIONS:
    old, new = built["options"].get(key), now["options"].get(key)
    if old != new:
      changes.append(f"option {key}: {_show(old)} -> {_show(new)}")
  if built["images"] != now["images"]:
    changes.append(
        f"the referenced image files changed (their list, sizes or modification times; "
        f"{built['images']['count']} files at the build, {now['images']['count']} now)")
  return changes


def read_fingerprint(data_path):
  """The fingerprint stored with a build, or None (built before fingerprints were recorded)."""
  path = os.path.join(os.fspath(data_path), FINGERPRINT_FILENAME)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def rebuild_hint(name, data_dir_root, manual_dir=None):
  """The command that rebuilds `name` ("image_text_folder/CONFIG") after its catalog changed."""
  return (f"Rebuild it with `python -m launch.build_data --dataset={name} "
          f"--manual_dir={manual_dir or 'DIR'} --data_dir={data_dir_root} --overwrite` "
          "(the old build is replaced once the new one succeeds; in Python: "
          "launch.build_data.build(..., overwrite=True)), or build into a new config name "
          f"(--dataset={name}_v2) to keep both.")


def check_built(builder):
  """Logs a warning if the catalog a built dataset was made from has changed since.

  For readers (fashion_jax.data.pipeline calls it on every dataset it opens; the builder's
  as_dataset too); works on any builder of a built image_text_folder dataset, tfds's read-only
  one included. Cost: one stat of the recorded catalog, its sha256 only if its size or mtime
  differ. Image files are not checked here (a catalog of a million images would take a million
  stats); `download_and_prepare` checks them.
  """
  try:
    built = read_fingerprint(builder.data_path)
    if built is None:
      return  # Built before fingerprints were recorded.
    cat = built["catalog"]
    stat = os.stat(cat["path"])
  except (OSError, ValueError, KeyError):
    return  # The catalog is not on this machine (or the file is unreadable): nothing to compare.
  if (stat.st_size, stat.st_mtime_ns) == (cat["size"], cat["mtime_ns"]):
    return
  if _sha256_file(cat["path"]) != cat["sha256"]:
    name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else (
        builder.name)
    logging.warning(
        "%s: %s changed since this dataset was built (%s); the dataset in %s still holds the "
        "catalog as it was. %s", name, os.path.basename(cat["path"]), cat["path"],
        builder.data_path, rebuild_hint(name, builder.data_dir_root,
                                        os.path.dirname(cat["path"])))


# ----------------------------------------------------------------------------------------------
# The builder.
# ----------------------------------------------------------------------------------------------
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
    self._fingerprint = None
    self._splits_left = set()
    self._stale_checked = False
    self.up_to_date_note = None  # Set when download_and_prepare reused a checked build.
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

  def _rebuild_hint(self, manual_dir=None):
    return rebuild_hint(f"{self.name}/{self.builder_config.name}", self.data_dir_root,
                        manual_dir)

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """Builds, or reuses an up-to-date build; see "Rebuilding" in the module docstring.

    Raises:
      StaleDatasetError: the dataset is built, the mode reuses it (tfds's default), and its
        catalog (in download_config.manual_dir, else at the path recorded by the build),
        options or image files differ from those it was built from.
      MissingManualFileError: a manual_dir is given but holds no catalog.
    """
    download_config = download_config or tfds.download.DownloadConfig()
    mode = tfds.download.GenerateMode(download_config.download_mode)
    already_built = os.path.isfile(os.path.join(os.fspath(self.data_path), "dataset_info.json"))
    manual_dir = download_config.manual_dir
    if already_built and mode == tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS:
      self._check_up_to_date(manual_dir)
    elif self.builder_config.tag_columns is None and (
        not already_built or mode.overwrite_dataset):  # About to build: discover the tags.
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

  def _check_up_to_date(self, manual_dir):
    """Raises StaleDatasetError if the build's inputs changed (catalog from `manual_dir`, else
    the recorded catalog path when it still exists)."""
    built = read_fingerprint(self.data_path)
    name = f"{self.name}/{self.builder_config.name}"
    if built is None:
      logging.warning("%s in %s was built without a catalog fingerprint (by an older "
                      "fashion_jax), so a changed catalog cannot be detected; reusing it. %s",
                      name, self.data_path, self._rebuild_hint(manual_dir))
      return
    if manual_dir:
      path = find_catalog(manual_dir, self.builder_config)
    elif os.path.isfile(built["catalog"]["path"]):
      path = built["catalog"]["path"]
    else:
      return  # Neither given nor where it was: nothing to compare with.
    changes = fingerprint_changes(built, catalog_fingerprint(path, self.builder_config))
    if changes:
      raise StaleDatasetError(
          f"{name} is already built in {self.data_path}, but its inputs changed: "
          + "; ".join(changes) + ". It was not rebuilt. "
          + self._rebuild_hint(manual_dir or os.path.dirname(path)))
    self.up_to_date_note = f"up to date with {path}, its options and image files"

  def as_dataset(self, *args, **kwargs):
    """tfds's as_dataset; first logs a warning if the catalog changed since the build."""
    if not self._stale_checked:
      self._stale_checked = True
      check_built(self)
    return super().as_dataset(*args, **kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    """The mixin's build (with bad_records.json), then the fingerprint next to the data."""
    super()._download_and_prepare(dl_manager, download_config)
    with open(os.path.join(os.fspath(self.data_path), FINGERPRINT_FILENAME), "w",
              encoding="utf-8") as f:
      json.dump(self._fingerprint, f, indent=1, ensure_ascii=False)

  # Generation ---------------------------------------------------------------------------------
  def _split_generators(self, dl_manager):
    config = self.builder_config
    path = find_catalog(dl_manager.manual_dir, config)
    root = os.path.dirname(os.path.abspath(path))
    columns = resolve_columns(catalog_header(path), config, path)
    expected = set(self._tag_feature_names())
    if set(columns.tags) != expected:
      raise images_lib.BadInputFileError(
          f"image_text_folder: {path} has tag columns {sorted(columns.tags)} but "
          f"the dataset's features expect {sorted(expected)}; rebuild into a new "
          "config name or set tag_columns")
    self._fingerprint = catalog_fingerprint(path, config)
    products = self._read_products(path, columns)
    by_split = {}
    for pid, product in products.items():
      split = product["split"] or hash_split(pid, config.split_fractions)
      by_split.setdefault(split, []).append((pid, product))
    if not by_split:
      raise images_lib.BadInputFileError(
          f"image_text_folder: {path} has no usable rows; see the skipped rows "
          "logged above")
    self._splits_left = set(by_split)
    return {split: self._generate_examples(split, root, items)
            for split, items in sorted(by_split.items())}

  def _read_products(self, path, columns):
    """Catalog rows -> {product id: product} (row order), applying "Which image belongs to
    which product" of the module docstring; row problems are counted under CATALOG_SPLIT and
    judged (`BadRecords.check`) before any image is decoded."""
    bad = self.bad_records
    products = {}
    owner = {}  # normalised image path -> (product id, ref of the row that listed it first).
    for ref, row in read_catalog(path, bad):
      value = lambda col: "" if col is None else _json_value_to_text(row.get(col))
      images = parse_image_paths(row.get(columns.image))
      if not images:
        bad.skip(CATALOG_SPLIT, ref, f"no image path in column {columns.image!r}")
        continue
      pid = value(columns.id) or images[0]
      split = value(columns.split).lower()
      if split:
        split = SPLIT_SYNONYMS.get(split, split)
        if not _SPLIT_NAME_RE.match(split):
          bad.skip(CATALOG_SPLIT, ref, f"split {split!r} is not a valid split name "
                                       "(letters, digits, '_', starting with a letter)")
          continue
      fields = {"title": value(columns.title), "description": value(columns.description),
                **{f: value(c) for f, c in columns.schema_fields.items()},
                **{f: value(c) for f, c in columns.tags.items()}}
      product = products.get(pid)
      if product is None:
        if not fields["title"] and not fields["description"]:
          bad.skip(CATALOG_SPLIT, ref, "empty title and description (a product needs text)")
          continue
        product = products[pid] = {"ref": ref, "images": [], "split": split, "fields": fields}
      else:  # Another row of a product already seen: more views, if it agrees.
        pairs = [(k, product["fields"][k], v) for k, v in fields.items()]
        pairs.append(("split", product["split"], split))
        conflicts = [f"{k} {_clip(old)!r} vs {_clip(new)!r}" for k, old, new in pairs
                     if old and new and old != new]
        if conflicts:
          bad.skip(CATALOG_SPLIT, ref,
                   f"product id {pid!r} is already used by {product['ref']} with a different "
                   f"{', '.join(conflicts)}; rows sharing an id are merged only when their "
                   "non-empty text, tags and split agree: give this row its own id, or make "
                   "the fields agree (or leave them blank)")
          continue
        for k, v in fields.items():  # Blanks are filled from later rows.
          product["fields"][k] = product["fields"][k] or v
        product["split"] = product["split"] or split
      bad.ok(CATALOG_SPLIT)
      known = {os.path.normpath(p) for p, _ in product["images"]}
      for p in images:
        key = os.path.normpath(p)
        if key in known:
          continue
        known.add(key)
        product["images"].append((p, ref))
        first = owner.setdefault(key, (pid, ref))
        if first[0] != pid:
          bad.convert(CATALOG_SPLIT, f"{ref}: {p} (also a view of product {first[0]!r}, "
                                     f"{first[1]})",
                      "image listed by two products; kept in both")
    bad.check(CATALOG_SPLIT)
    return products

  def _generate_examples(self, split, root, products):
    bad = self.bad_records
    for pid, product in products:
      sources = []
      for rel, ref in product["images"]:
        if _is_url(rel):
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
    self._splits_left.discard(split)
    where = f". Image paths are read relative to {root} (the catalog's folder)."
    if not self._splits_left:  # The last split: judge the whole catalog.
      self._check_whole_catalog(where)
    else:  # An empty split stops here, before tfds's own "No examples were yielded" would.
      bad.check(split, fraction=False, detail=where)

  def _check_whole_catalog(self, where=""):
    """max_bad_fraction over the whole catalog (module docstring, "Bad input"), then that no
    split is empty (`where` ends that message). Runs at the end of the last split's generator,
    inside tfds's temporary directory, so a refused build leaves nothing behind."""
    bad = self.bad_records
    splits = sorted(s for s in bad.splits() if s != CATALOG_SPLIT)
    rows_ok, rows_bad = bad.counts(CATALOG_SPLIT)
    per_split = {u: {s: bad.counts(s, u) for s in splits}
                 for u in (images_lib.RECORD, images_lib.IMAGE)}
    describe = lambda counts: ", ".join(f"{s} {b} of {g + b}" for s, (g, b) in counts.items())
    records = per_split[images_lib.RECORD]
    bad.check_total(
        WHOLE_CATALOG, [CATALOG_SPLIT] + splits, images_lib.RECORD,
        rows_bad + sum(b for _, b in records.values()),
        rows_bad + sum(g + b for g, b in records.values()),
        f" (per split: catalog rows {rows_bad} of {rows_ok + rows_bad}, {describe(records)})")
    images = per_split[images_lib.IMAGE]
    bad.check_total(WHOLE_CATALOG, splits, images_lib.IMAGE, sum(b for _, b in images.values()),
                    sum(g + b for g, b in images.values()),
                    f" (per split: {describe(images)})")
    for split in splits:
      bad.check(split, fraction=False, detail=where)
