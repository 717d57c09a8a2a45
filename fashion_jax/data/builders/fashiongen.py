"""FashionGen (Rostamzadeh et al. 2018) as a TFDS dataset of PRODUCTS, read from the official h5.

Build (offline; the h5 files must already be on disk):
  python -m launch.build_data --dataset=fashiongen --manual_dir=/data/fashiongen

manual_dir holds the two files of the official 256x256 release:
  fashiongen_256_256_train.h5        ~260k rows, ~30 GB
  fashiongen_256_256_validation.h5   ~32k rows

Splits (FashionGen has NO public test split):
  train       <- fashiongen_256_256_train.h5
  validation  <- fashiongen_256_256_validation.h5. This is the EVALUATION split: the "test"
                 numbers of FashionBERT, Kaleido-BERT, FashionViL and E2 (sample-100 and
                 full-candidate retrieval) are computed on it. We do not invent a test split.

h5 layout (one row per IMAGE): `input_image` uint8 [N, 256, 256, 3]; string fields `input_name`,
`input_description`, `input_category`, `input_subcategory`, `input_brand`, `input_season`,
`input_composition`, `input_gender`, `input_pose`, `input_department`, `input_productID` are
[N, 1] byte strings in latin-1 (`input_productID` may also be numeric). Rows are grouped into
one example per product id: a product's pose rows become its `images` (in row order) and
`poses`; the text fields are taken from its first row (they repeat on every pose row).

Example fields: the product schema (fashion_jax/data/schema.py), with
  product_id   input_productID (str)          title        input_name
  description  input_description (the caption) category     input_category
  subcategory  input_subcategory               brand        input_brand
  season       input_season                    composition  input_composition
  gender       input_gender lower-cased ("men", "women")
plus `poses` (Sequence(Text), one per image, e.g. "id_gridfs_1") and `department`.

Bad input (see fashion_jax/data/images.py for the policy): a product whose description is empty
after cleaning is skipped (the description is FashionGen's caption for every system here); a row
whose image is not uint8 [H, W, 3] or is constant (an all-black/white placeholder) is dropped from
its product and counted; a product left with no image is skipped. A missing h5 or a missing field
stops the build with an error naming it.

Reading: the h5 is streamed in chunks of `H5_CHUNK_ROWS` rows (the train file does not fit in
memory); only the product-id column is read whole, to know how many rows each product has, so a
product is emitted as soon as its last row has been read (in the official files a product's
rows are consecutive, so at most one chunk is buffered).
"""

import collections
import os

import numpy as np
import tensorflow_datasets as tfds

from fashion_jax.data import images as images_lib
from fashion_jax.data import schema

_WHERE_FROM = ("the official FashionGen release (Rostamzadeh et al., 2018, "
               "https://fashion-gen.com/ ; access on request from SSENSE / Element AI): "
               "the 256x256 h5 files")
_FILES = {
    "train": "fashiongen_256_256_train.h5",
    "validation": "fashiongen_256_256_validation.h5",
}
# Schema field -> h5 dataset name.
_TEXT_FIELDS = {
    "title": "input_name",
    "description": "input_description",
    "category": "input_category",
    "subcategory": "input_subcategory",
    "brand": "input_brand",
    "season": "input_season",
    "composition": "input_composition",
    "gender": "input_gender",
    "department": "input_department",
}
_REQUIRED = ("input_image", "input_productID", "input_pose") + tuple(_TEXT_FIELDS.values())
_ENCODING = "latin-1"


def h5_cell_to_str(cell, encoding=_ENCODING):
  """One h5 cell (1-element byte array, bytes, or a number) -> cleaned str."""
  if isinstance(cell, np.ndarray):
    cell = cell.reshape(-1)[0] if cell.size else b""
  if isinstance(cell, (bytes, np.bytes_)):
    return images_lib.decode_bytes(bytes(cell), encoding)[0]
  if isinstance(cell, (float, np.floating)) and float(cell).is_integer():
    return str(int(cell))
  if isinstance(cell, (np.integer, int)):
    return str(int(cell))
  return images_lib.clean_text(str(cell))


def _normalize_gender(text):
  return {"man": "men", "woman": "women", "male": "men", "female": "women"}.get(
      text.lower(), text.lower())


class Fashiongen(images_lib.BadRecordsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """FashionGen products (several poses each) from the official h5 files."""

  name = "fashiongen"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Products grouped from pose rows; train + validation (eval) splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put fashiongen_256_256_train.h5 and fashiongen_256_256_validation.h5 (from "
      f"{_WHERE_FROM}) directly in the manual_dir.")
  H5_CHUNK_ROWS = 512  # 512 x 196 KiB = 100 MiB of images per read.

  def _info(self):
    features = schema.product_features(extra_text_fields=("department",))
    features = tfds.features.FeaturesDict({
        **{k: features[k] for k in features.keys()},
        "poses": tfds.features.Sequence(tfds.features.Text()),
    })
    return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0],
                                 features=features, homepage="https://fashion-gen.com/")

  def _split_generators(self, dl_manager):
    paths = {split: images_lib.require_manual_file(dl_manager.manual_dir, fname, self.name,
                                                  _WHERE_FROM)
             for split, fname in _FILES.items()}
    return {split: self._generate_examples(split, path) for split, path in paths.items()}

  def _generate_examples(self, split, path):
    import h5py  # pylint: disable=g-import-not-at-top
    bad = self.bad_records
    fname = os.path.basename(path)
    with h5py.File(path, "r") as f:
      missing = [k for k in _REQUIRED if k not in f]
      if missing:
        raise images_lib.BadInputFileError(
            f"{self.name}: {path} lacks the field(s) {missing}; a FashionGen h5 has "
            f"{list(_REQUIRED)}. Is it the official file from {_WHERE_FROM}?")
      n = f["input_image"].shape[0]
      lengths = {k: f[k].shape[0] for k in _REQUIRED}
      if any(v != n for v in lengths.values()):
        raise images_lib.BadInputFileError(
            f"{self.name}: {path} fields have different row counts: {lengths}")
      ids = [h5_cell_to_str(c) for c in f["input_productID"][:]]
      rows_left = collections.Counter(ids)
      pending = {}  # product id -> {"text": {...}, "images": [...], "poses": [...], "row": int}
      for start in range(0, n, self.H5_CHUNK_ROWS):
        stop = min(n, start + self.H5_CHUNK_ROWS)
        chunk = {k: f[k][start:stop] for k in _REQUIRED if k != "input_productID"}
        for i in range(stop - start):
          row = start + i
          pid = ids[row]
          if pid not in pending:
            pending[pid] = {
                "row": row, "images": [], "poses": [],
                "text": {k: h5_cell_to_str(chunk[h5k][i]) for k, h5k in _TEXT_FIELDS.items()}}
          product = pending[pid]
          image = np.asarray(chunk["input_image"][i])
          ref = f"{fname} row {row} (product {pid})"
          if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            bad.skip(split, ref, f"image is {image.dtype} {image.shape}, not uint8 [H, W, 3]",
                     unit=images_lib.IMAGE)
          elif image.min() == image.max():
            bad.skip(split, ref, f"constant image (all pixels {int(image.min())})",
                     unit=images_lib.IMAGE)
          else:
            bad.ok(split, unit=images_lib.IMAGE)
            product["images"].append(images_lib.encode_jpeg(image))
            product["poses"].append(h5_cell_to_str(chunk["input_pose"][i]))
          rows_left[pid] -= 1
          if rows_left[pid] == 0:
            example = self._finish_product(split, fname, pid, pending.pop(pid))
            if example is not None:
              yield pid, example
      assert not pending, f"unfinished products {list(pending)[:5]}"
    bad.check(split)

  def _finish_product(self, split, fname, pid, product):
    """Product buffer -> example dict, or None after counting the skip."""
    bad = self.bad_records
    text = product["text"]
    ref = f"{fname} product {pid} (first row {product['row']})"
    if not pid:
      bad.skip(split, ref, "empty input_productID")
      return None
    if not text["description"]:
      bad.skip(split, ref, "empty input_description (the caption)")
      return None
    if not product["images"]:
      bad.skip(split, ref, "no usable image among its pose rows")
      return None
    bad.ok(split)
    example = dict(text)
    example["gender"] = _normalize_gender(text["gender"])
    example.update(product_id=pid, images=product["images"], poses=product["poses"])
    return example
