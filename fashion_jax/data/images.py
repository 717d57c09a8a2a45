"""Input hygiene for the TFDS builders: robust image decoding and bad-record accounting.

Real fashion data is dirty: FashionIQ's public release misses thousands of images, shops export
CMYK JPEGs, transparent PNGs, 16-bit scans and Excel CSVs in cp1252. Every builder routes its
inputs through this module so that one policy holds everywhere:

  * convert what can be converted (and count the conversion),
  * skip what cannot (and count the skip with the file/row and the reason),
  * never crash the whole build on one bad file,
  * never silently drop everything: a split whose bad fraction exceeds `max_bad_fraction`
    (default 5%) stops the build with an error naming the fraction and a few examples,
  * write the full report as `bad_records.json` next to the built dataset
    (`<data_dir>/<name>/<config>/<version>/bad_records.json`) and log a summary.

Image policy (`decode_image`, `to_jpeg`):
  input    bytes or a path, any format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)
  output   RGB uint8 `[H, W, 3]` (`decode_image`) or JPEG bytes for a TFDS `Image` feature
           (`to_jpeg`)
  EXIF     orientation tags are applied (a phone photo tagged "rotate 90" comes out upright)
  modes    grayscale/bilevel -> RGB by channel replication; palette -> RGB; CMYK/YCbCr/LAB -> RGB
           via Pillow's conversion; RGBA/LA/PA/palette-with-transparency -> composited on WHITE
           (product shots are cut out on white, black would invent a dark background);
           16-bit (I;16*, I) -> 8-bit by v * 255 / 65535 (Pillow's own convert clips at 255, which
           turns most 16-bit images white); float (F) -> min-max scaled
  size     images whose longer side exceeds `max_side` (default 1024) are downscaled with their
           aspect ratio kept (JPEGs are reduced while decoding via `draft`, so a 10000x10000
           JPEG never materialises at full size); images with more than `max_pixels` pixels
           (default Pillow's hard limit, 2 * Image.MAX_IMAGE_PIXELS ~ 179 MP) are refused as
           decompression bombs without being decoded
  frames   multi-frame files (GIF, TIFF) keep their first frame
  bad      missing, zero-byte, non-image, corrupt or truncated files raise `BadImageError` with
           a reason; builders catch it and call `BadRecords.skip`.
  pass-through  a JPEG that is already RGB, upright and within `max_side` is stored as its
           original bytes (after a full verifying decode), so it is not re-compressed.

Text policy (`clean_text`, `decode_bytes`): bytes are decoded in the encoding the format states
(FashionGen h5: latin-1). Where the encoding is not stated (a user's CSV) UTF-8 is tried first
and a field that is not valid UTF-8 is decoded as cp1252 (the usual Excel export; it maps every
byte except 5 unassigned ones, which fall back to latin-1) and counted as a conversion. Whitespace
runs collapse to one space. An EMPTY caption is a skip, not a conversion: a product with no text
cannot be a retrieval query or a contrastive positive; each builder documents which field is its
caption.
"""

import collections
import dataclasses
import io
import json
import logging
import os
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_SIDE = 1024
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
DEFAULT_MAX_BAD_FRACTION = 0.05
DEFAULT_JPEG_QUALITY = 95
BAD_RECORDS_FILENAME = "bad_records.json"

RECORD = "record"
IMAGE = "image"

# Conversions kept verbatim in the report per reason; beyond this only the count grows.
_MAX_LISTED_CONVERSIONS_PER_REASON = 200
_WS_RE = re.compile(r"\s+")


class BadImageError(ValueError):
  """An image that cannot be turned into RGB pixels; `reason` says why."""

  def __init__(self, reason):
    super().__init__(reason)
    self.reason = reason


class InputDataError(Exception):
  """The files a builder reads (a release, a shop's catalog) are wrong: fixed in the input, not
  in the code. launch.build_data ends on one of these with its message and exit status 1."""


class TooManyBadRecordsError(InputDataError, RuntimeError):
  """More than `max_bad_fraction` of a split's records (or images) were bad."""


class MissingManualFileError(InputDataError, FileNotFoundError):
  """A file the builder needs is not in the manual directory."""


class BadInputFileError(InputDataError, ValueError):
  """A catalog or release file the builder cannot read as its format says: no header, no image
  column, a JSON file that is not the list it should be, an h5 without a field."""


# ----------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodedImage:
  """An image decoded to RGB uint8 plus the conversions applied to get there.

  Attributes:
    pixels: `[H, W, 3]` uint8 RGB.
    conversions: human-readable list, e.g. ["CMYK->RGB", "downscaled 4000x3000->1024x768"].
    jpeg_passthrough: original JPEG bytes when they can be stored unchanged, else None.
  """
  pixels: np.ndarray
  conversions: list
  jpeg_passthrough: bytes | None = None


def _read_source(source):
  """Returns the bytes of `source` (bytes or a path); BadImageError for missing/empty files."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
  else:
    try:
      with open(os.fspath(source), "rb") as f:
        data = f.read()
    except FileNotFoundError:
      raise BadImageError("missing file") from None
    except IsADirectoryError:
      raise BadImageError("is a directory, not an image file") from None
    except OSError as e:
      raise BadImageError(f"unreadable file ({e.strerror or e})") from None
  if not data:
    raise BadImageError("zero-byte file")
  return data


def _to_uint8_rgb(img, conversions):
  """Converts any Pillow mode to RGB (documented in the module docstring), recording changes."""
  mode = img.mode
  if mode.startswith("I;16") or mode == "I":
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else arr.max()
    arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    conversions.append(f"{'16' if top == 65535.0 else '32'}-bit grayscale->8-bit RGB")
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode == "F":
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(np.nanmin(arr, initial=0)), float(np.nanmax(arr, initial=0))
    arr = np.nan_to_num((arr - lo) / max(hi - lo, 1e-12))
    conversions.append("float->8-bit RGB (min-max scaled)")
    arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode == "P" and "transparency" in img.info) or (
      mode in ("L", "RGB") and "transparency" in img.info)
  if has_alpha:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    conversions.append(f"{mode} with transparency composited on white")
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
  if mode != "RGB":
    names = {"L": "grayscale", "1": "bilevel", "P": "palette"}
    conversions.append(f"{names.get(mode, mode)}->RGB")
    img = img.convert("RGB")
  return np.asarray(img)


def decode_image(source, *, max_side=DEFAULT_MAX_SIDE, max_pixels=DEFAULT_MAX_PIXELS):
  """Decodes bytes or a path to RGB uint8, following the module's image policy.

  Args:
    source: encoded image bytes, or a path to an image file.
    max_side: longer side of the output is at most this many pixels (aspect ratio kept).
    max_pixels: images with more pixels (width * height, read from the header before any
      decoding) are refused as decompression bombs.

  Returns:
    DecodedImage with `pixels` `[H, W, 3]` uint8.

  Raises:
    BadImageError: missing, zero-byte, non-image, truncated, corrupt, or bomb-sized input.
  """
  data = _read_source(source)
  conversions = []
  try:
    with warnings.catch_warnings():
      # Our own max_pixels check replaces Pillow's warning; its hard error is still caught.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      width, height = img.size
      if width <= 0 or height <= 0:
        raise BadImageError(f"degenerate size {width}x{height}")
      if width * height > max_pixels:
        raise BadImageError(
            f"decompression bomb guard: {width}x{height} = {width * height} pixels > "
            f"max_pixels={max_pixels}")
      fmt = img.format
      if getattr(img, "n_frames", 1) > 1:
        conversions.append(f"{fmt} with {img.n_frames} frames: kept the first")
      orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag.
      if fmt == "JPEG" and max(width, height) > max_side:
        # DCT-domain reduction while decoding: a 10000 px JPEG decodes at <= 1/8 of its size.
        img.draft("RGB", (max_side, max_side))
      img.load()
  except BadImageError:
    raise
  except Image.DecompressionBombError as e:
    raise BadImageError(f"decompression bomb guard: {e}") from None
  except UnidentifiedImageError:
    raise BadImageError("not a recognised image format (corrupt or not an image)") from None
  except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
    msg = str(e) or type(e).__name__
    kind = "truncated image" if "truncat" in msg.lower() else "corrupt image"
    raise BadImageError(f"{kind} ({msg})") from None

  passthrough = (fmt == "JPEG" and img.mode == "RGB" and orientation == 1
                 and max(width, height) <= max_side)
  if orientation != 1:
    try:
      img = ImageOps.exif_transpose(img)
    except Exception as e:  # pylint: disable=broad-except  # Malformed EXIF: keep as stored.
      conversions.append(f"EXIF orientation {orientation} not applied ({e})")
    else:
      conversions.append(f"EXIF orientation {orientation} applied")
  pixels = _to_uint8_rgb(img, conversions)
  if max(pixels.shape[:2]) > max_side:
    small = Image.fromarray(pixels, "RGB")
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    pixels = np.asarray(small)
  if max(width, height) > max_side:
    conversions.append(f"downscaled {width}x{height}->{pixels.shape[1]}x{pixels.shape[0]}")
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
    raise BadImageError(f"could not convert to RGB uint8 (got {pixels.shape} {pixels.dtype})")
  return DecodedImage(pixels=pixels, conversions=conversions,
                      jpeg_passthrough=data if passthrough else None)


def encode_jpeg(pixels, quality=DEFAULT_JPEG_QUALITY):
  """`[H, W, 3]` uint8 -> baseline JPEG bytes (4:4:4 chroma at quality >= 90)."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
    raise ValueError(f"encode_jpeg expects [H, W, 3] uint8, got {pixels.shape} {pixels.dtype}")
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality,
                                      subsampling=0 if quality >= 90 else 2)
  return buf.getvalue()


def to_jpeg(source, *, max_side=DEFAULT_MAX_SIDE, max_pixels=DEFAULT_MAX_PIXELS,
            quality=DEFAULT_JPEG_QUALITY):
  """Bytes or path -> (JPEG bytes for a TFDS Image feature, list of conversions).

  Raises BadImageError like `decode_image`.
  """
  decoded = decode_image(source, max_side=max_side, max_pixels=max_pixels)
  if decoded.jpeg_passthrough is not None:
    return decoded.jpeg_passthrough, decoded.conversions
  return encode_jpeg(decoded.pixels, quality), decoded.conversions


def pad_on_white(pixels, height, width):
  """Centres `[h, w, 3]` uint8 on a white `[height, width, 3]` canvas (h <= height, w <= width)."""
  h, w = pixels.shape[:2]
  out = np.full((height, width, 3), 255, dtype=np.uint8)
  top, left = (height - h) // 2, (width - w) // 2
  out[top:top + h, left:left + w] = pixels
  return out


def load_views(sources, bad, split, *, max_side=DEFAULT_MAX_SIDE):
  """Decodes a product's views with accounting; returns JPEG bytes of the usable ones.

  The product schema stores views as Sequence(Image), which TFDS decodes into ONE
  `[V, H, W, 3]` tensor, so all views of a product must share a size. Views of different sizes
  are therefore centred on a white canvas of the largest height and width among them (no
  resampling, no distortion; product photos are shot on white) and the padding is counted as a
  conversion. A view that cannot be decoded is skipped and counted (unit IMAGE).

  Args:
    sources: list of (bytes or path, ref) pairs; ref names the view in the report.
    bad: the builder's BadRecords.
    split: split name (fractions are per split).
    max_side: see `decode_image`.

  Returns:
    list of JPEG bytes (possibly empty), in input order.
  """
  decoded = []
  for source, ref in sources:
    try:
      d = decode_image(source, max_side=max_side)
    except BadImageError as e:
      bad.skip(split, ref, e.reason, unit=IMAGE)
      continue
    for c in d.conversions:
      bad.convert(split, ref, c, unit=IMAGE)
    bad.ok(split, unit=IMAGE)
    decoded.append((d, ref))
  if not decoded:
    return []
  height = max(d.pixels.shape[0] for d, _ in decoded)
  width = max(d.pixels.shape[1] for d, _ in decoded)
  jpegs = []
  for d, ref in decoded:
    h, w = d.pixels.shape[:2]
    if (h, w) == (height, width):
      jpegs.append(d.jpeg_passthrough or encode_jpeg(d.pixels))
    else:
      bad.convert(split, ref, f"padded on white {w}x{h}->{width}x{height} to match the "
                              "product's other views", unit=IMAGE)
      jpegs.append(encode_jpeg(pad_on_white(d.pixels, height, width)))
  return jpegs


def load_image(source, bad, split, ref, *, max_side=DEFAULT_MAX_SIDE):
  """One image with accounting: JPEG bytes, or None after `bad.skip(..., unit=IMAGE)`."""
  jpegs = load_views([(source, ref)], bad, split, max_side=max_side)
  return jpegs[0] if jpegs else None


# ----------------------------------------------------------------------------------------------
# Text.
# ----------------------------------------------------------------------------------------------
def clean_text(text):
  """Collapses whitespace runs (incl. newlines, tabs, NBSP) to one space and strips."""
  return _WS_RE.sub(" ", text.replace("\x00", " ")).strip()


def decode_bytes(raw, encoding=None):
  """Bytes -> (str, conversion or None).

  Args:
    raw: bytes (or str, returned cleaned).
    encoding: the encoding the format states (e.g. 'latin-1' for FashionGen); None means
      "unknown": UTF-8 first, then cp1252 (latin-1 for cp1252's 5 unassigned bytes).

  Returns:
    (cleaned text, None) or (cleaned text, "non-UTF-8 text decoded as cp1252").
  """
  if isinstance(raw, str):
    return clean_text(raw), None
  raw = bytes(raw)
  if encoding is not None:
    return clean_text(raw.decode(encoding)), None
  try:
    return clean_text(raw.decode("utf-8")), None
  except UnicodeDecodeError:
    pass
  try:
    text = raw.decode("cp1252")
  except UnicodeDecodeError:
    text = raw.decode("latin-1")
  return clean_text(text), "non-UTF-8 text decoded as cp1252"


# ----------------------------------------------------------------------------------------------
# Manual files.
# ----------------------------------------------------------------------------------------------
def require_manual_file(manual_dir, relpath, dataset, where_from):
  """Returns `manual_dir/relpath` or raises MissingManualFileError naming file and source.

  Args:
    manual_dir: the builder's manual directory.
    relpath: expected path inside it, e.g. "fashiongen_256_256_train.h5".
    dataset: builder name for the message.
    where_from: one line saying where the file comes from (the dataset's official source).
  """
  path = os.path.join(os.fspath(manual_dir), relpath)
  if not os.path.isfile(path):
    raise MissingManualFileError(
        f"{dataset}: expected file {relpath!r} in the manual directory {os.fspath(manual_dir)!r}, "
        f"but {path!r} does not exist. It comes from: {where_from}")
  return path


# ----------------------------------------------------------------------------------------------
# Bad-record accounting.
# ----------------------------------------------------------------------------------------------
class BadRecords:
  """Counts kept, skipped and converted inputs per split and unit, and enforces a max fraction.

  Units: RECORD (one example-to-be: a product, triplet, outfit, CSV row) and IMAGE (one image
  file or h5 image row). A product with one unreadable view out of three is 1 skipped IMAGE and
  1 kept RECORD. Fractions are checked per (split, unit): bad / (bad + ok) > max_bad_fraction
  raises TooManyBadRecordsError; a builder whose splits are one population cut by a hash judges
  them together instead (`check(split, fraction=False)` + `check_total`). The error's hint
  names launch.build_data's --max_bad_fraction flag. Conversions are recorded but never count
  as bad.

  Usage in a builder (see BadRecordsBuilderMixin, which does the bookkeeping around the build):
    bad.ok(split)                               # a record kept
    bad.skip(split, "row 17", "empty caption")  # a record dropped
    bad.convert(split, "img/1.png", "RGBA composited on white", unit=IMAGE)
    bad.check(split)                            # at the end of the split's generator
  """

  def __init__(self, dataset, max_bad_fraction=DEFAULT_MAX_BAD_FRACTION, n_examples=5):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    self.dataset = dataset
    self.max_bad_fraction = float(max_bad_fraction)
    self.n_examples = n_examples
    self._ok = collections.Counter()       # (split, unit) -> n
    self._bad = collections.Counter()      # (split, unit) -> n
    self.skipped = []                      # dicts: split, unit, ref, reason
    self._conv_counts = collections.Counter()  # (split, unit, reason-kind) -> n
    self.converted = []                    # dicts, capped per reason-kind
    self.totals = {}                       # label -> unit -> counts (`check_total`)

  # Counting -----------------------------------------------------------------------------------
  def ok(self, split, unit=RECORD, n=1):
    self._ok[(split, unit)] += n

  def skip(self, split, ref, reason, unit=RECORD):
    self._bad[(split, unit)] += 1
    self.skipped.append({"split": split, "unit": unit, "ref": str(ref), "reason": reason})
    logging.debug("%s: skipped %s %s (%s): %s", self.dataset, unit, ref, split, reason)

  def convert(self, split, ref, reason, unit=RECORD):
    kind = re.sub(r"\d+", "N", reason)  # "downscaled 4000x3000->..." groups as one kind.
    key = (split, unit, kind)
    self._conv_counts[key] += 1
    if self._conv_counts[key] <= _MAX_LISTED_CONVERSIONS_PER_REASON:
      self.converted.append({"split": split, "unit": unit, "ref": str(ref), "reason": reason})

  # Queries ------------------------------------------------------------------------------------
  def counts(self, split, unit=RECORD):
    """(ok, skipped) for a split and unit."""
    return self._ok[(split, unit)], self._bad[(split, unit)]

  def fraction(self, split, unit=RECORD):
    good, bad = self.counts(split, unit)
    return bad / (good + bad) if good + bad else 0.0

  def splits(self):
    return sorted({s for s, _ in list(self._ok) + list(self._bad)})

  def check(self, split, fraction=True, detail=""):
    """Raises TooManyBadRecordsError if any unit of `split` is over the max fraction, or if the
    split kept no record at all (even with max_bad_fraction=1: an empty split is never a
    successful build). fraction=False checks only the latter, for builders that judge the
    fraction over several splits together (`check_total`). `detail` ends the empty-split
    message (e.g. where relative image paths were looked up)."""
    for unit in (RECORD, IMAGE) if fraction else ():
      good, bad = self.counts(split, unit)
      self._raise_if_over(f"in split {split!r}", [split], unit, bad, good + bad)
    good, bad = self.counts(split, RECORD)
    if not good:
      examples = [s for s in self.skipped if s["split"] == split][:self.n_examples]
      self.log()
      raise TooManyBadRecordsError(
          f"{self.dataset}: split {split!r} has no usable record ({bad} skipped)"
          + (". Examples: " + "; ".join(f"{s['ref']}: {s['reason']}" for s in examples)
             if examples else "; its input lists none") + detail)

  def check_total(self, label, splits, unit, bad, total, detail=""):
    """Judges `bad` of `total` `unit`s counted over `splits` together against max_bad_fraction.

    For a builder whose splits are one population cut by a hash (a shop catalog), where a
    small split's fraction says little. The totals go into the report under "totals"/label.

    Args:
      label: what was counted, e.g. "whole catalog"; the message says "... of the {label}".
      splits: the splits (pseudo-splits included) whose skips are shown as examples.
      unit: RECORD or IMAGE.
      bad, total: the counts; the builder defines how its splits add up.
      detail: appended to the message, e.g. the per-split counts.
    """
    self.totals.setdefault(label, {})[unit] = {
        "ok": total - bad, "skipped": bad, "fraction": round(bad / total, 6) if total else 0.0}
    self._raise_if_over(f"of the {label}", splits, unit, bad, total, detail)

  def _raise_if_over(self, scope, splits, unit, bad, total, detail=""):
    if not total or bad / total <= self.max_bad_fraction:
      return
    examples = [s for s in self.skipped if s["split"] in splits and s["unit"] == unit]
    shown = "; ".join(f"{s['ref']}: {s['reason']}" for s in examples[:self.n_examples])
    allow = max(1, -(-100 * bad // total)) / 100  # The fraction seen, rounded up to 1%.
    self.log()
    raise TooManyBadRecordsError(
        f"{self.dataset}: {bad} of {total} {unit}s {scope} were bad ({bad / total:.1%}), more "
        f"than max_bad_fraction={self.max_bad_fraction:.1%}{detail}. Examples: {shown}. Fix the "
        f"inputs (the skips are logged above), or allow this many with "
        f"`python -m launch.build_data ... --max_bad_fraction={allow:g}`.")

  def report(self):
    """JSON-able dict: per split/unit counts and fractions, every skip, listed conversions."""
    per_split = {}
    for split in self.splits():
      per_split[split] = {}
      for unit in (RECORD, IMAGE):
        good, bad = self.counts(split, unit)
        if good + bad:
          per_split[split][unit] = {"ok": good, "skipped": bad,
                                    "fraction": round(bad / (good + bad), 6)}
    conv = collections.defaultdict(dict)
    for (split, unit, kind), n in sorted(self._conv_counts.items()):
      conv[split][f"{unit}: {kind}"] = n
    return {"dataset": self.dataset, "max_bad_fraction": self.max_bad_fraction,
            "splits": per_split, "totals": self.totals, "conversion_counts": dict(conv),
            "skipped": self.skipped, "converted": self.converted}

  def log(self):
    """Logs one summary line per split/unit, and the first skips."""
    rep = self.report()
    for split, units in rep["splits"].items():
      for unit, c in units.items():
        logging.info("%s [%s] %ss: %d kept, %d skipped (%.2f%%)", self.dataset, split, unit,
                     c["ok"], c["skipped"], 100 * c["fraction"])
      for kind, n in rep["conversion_counts"].get(split, {}).items():
        logging.info("%s [%s] converted %d x %s", self.dataset, split, n, kind)
    for label, units in self.totals.items():
      for unit, c in units.items():
        logging.info("%s [%s] %ss: %d kept, %d skipped (%.2f%%)", self.dataset, label, unit,
                     c["ok"], c["skipped"], 100 * c["fraction"])
    for s in self.skipped[:20]:
      logging.warning("%s [%s] skipped %s %s: %s", self.dataset, s["split"], s["unit"],
                      s["ref"], s["reason"])
    if len(self.skipped) > 20:
      logging.warning("%s: %d more skips, see %s", self.dataset, len(self.skipped) - 20,
                      BAD_RECORDS_FILENAME)

  def write(self, path):
    with open(os.fspath(path), "w", encoding="utf-8") as f:
      json.dump(self.report(), f, indent=1, ensure_ascii=False)


class BadRecordsBuilderMixin:
  """Gives a tfds GeneratorBasedBuilder a `bad_records` and writes `bad_records.json`.

  Put it first in the bases: `class MyBuilder(BadRecordsBuilderMixin, tfds.core.GeneratorBasedBuilder)`.
  The constructor takes `max_bad_fraction` (default 0.05), e.g.
  `tfds.builder("fashioniq", data_dir=..., max_bad_fraction=0.2)`. Each `_generate_examples`
  calls `self.bad_records.check(split)` after its last example; after all splits the report is
  logged and written into the dataset directory (the tfds temporary directory that becomes
  `<data_dir>/<name>/<config>/<version>/` when the build succeeds).
  """

  def __init__(self, *, max_bad_fraction=DEFAULT_MAX_BAD_FRACTION, **kwargs):
    self.max_bad_fraction = max_bad_fraction
    self.bad_records = BadRecords("", max_bad_fraction)
    super().__init__(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    name = self.name + (f"/{self.builder_config.name}" if self.builder_config else "")
    self.bad_records = BadRecords(name, self.max_bad_fraction)
    super()._download_and_prepare(dl_manager, download_config)
    self.bad_records.log()
    self.bad_records.write(os.path.join(os.fspath(self.data_path), BAD_RECORDS_FILENAME))
