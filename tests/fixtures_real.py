"""Writers of tiny fixtures in the REAL on-disk formats of FashionGen, FashionIQ, Polyvore Outfits
and a user's catalog (docs/data.md, "Data formats"). Used by
tests/test_real_builders.py and tests/test_bad_input.py; nothing here is downloaded."""

import io
import json
import os
import zlib

import numpy as np
from PIL import Image

SIZE = 32


def image_array(seed, size=SIZE):
  """A non-constant RGB uint8 [size, size, 3] image: 4x4 colour blocks drawn from `seed`."""
  rng = np.random.RandomState(seed % 2**32)
  blocks = rng.randint(0, 256, size=(4, 4, 3), dtype=np.uint8)
  return np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def encode(img, fmt="JPEG", **kwargs):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def write_bytes(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def write_jpeg(path, seed, size=SIZE):
  return write_bytes(path, encode(Image.fromarray(image_array(seed, size)), "JPEG", quality=95,
                                 subsampling=0))


def write_json(path, obj):
  return write_bytes(path, json.dumps(obj).encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# FashionGen h5.
# ----------------------------------------------------------------------------------------------
FASHIONGEN_STRING_FIELDS = (
    "input_description", "input_name", "input_category", "input_subcategory", "input_brand",
    "input_season", "input_composition", "input_gender", "input_productID", "input_pose",
    "input_concat_description", "input_department")


def write_fashiongen_h5(path, rows):
  """rows: list of dicts with 'image' ([256|32, ., 3] uint8) and the string fields by short name
  (description, name, category, subcategory, brand, season, composition, gender, productID,
  pose, department). Strings are stored as the official files do: [N, 1] fixed-length byte
  strings encoded in latin-1; msrpUSD float, index/index_2 int."""
  import h5py  # pylint: disable=g-import-not-at-top
  n = len(rows)
  with h5py.File(path, "w") as f:
    f.create_dataset("input_image", data=np.stack([r["image"] for r in rows]).astype(np.uint8))
    for field in FASHIONGEN_STRING_FIELDS:
      short = field[len("input_"):]
      if short == "concat_description":
        values = [f"{r.get('name', '')} {r.get('description', '')}" for r in rows]
      else:
        values = [str(r.get(short, "")) for r in rows]
      encoded = [v.encode("latin-1") for v in values]
      width = max(1, max(len(e) for e in encoded))
      f.create_dataset(field, data=np.array(encoded, dtype=f"S{width}").reshape(n, 1))
    f.create_dataset("input_msrpUSD", data=np.full((n, 1), 99.0, np.float32))
    f.create_dataset("index", data=np.arange(n, dtype=np.int64).reshape(n, 1))
    f.create_dataset("index_2", data=np.arange(n, dtype=np.int64).reshape(n, 1))
  return path


def fashiongen_rows(products, seed=0):
  """products: list of (productID, n_poses, overrides) -> h5 rows, poses consecutive."""
  rows = []
  for k, (pid, n_poses, overrides) in enumerate(products):
    for pose in range(n_poses):
      row = {
          "image": image_array(seed + 100 * k + pose),
          "productID": pid, "pose": f"id_gridfs_{pose + 1}",
          "name": f"Café cotton shirt {pid}", "description": f"Crème shirt number {pid}.",
          "category": "TOPS", "subcategory": "SHIRTS", "brand": f"Brand{k}",
          "season": "SS2017", "composition": "100% cotton", "gender": "WOMEN",
          "department": "CLOTHING"}
      row.update(overrides)
      rows.append(row)
  return rows


# ----------------------------------------------------------------------------------------------
# FashionIQ.
# ----------------------------------------------------------------------------------------------
FIQ_CATEGORIES = ("dress", "shirt", "toptee")


def write_fashioniq(root, n_images=4, with_test=True, missing=(), corrupt=()):
  """Per category: n_images images '<cat>N', image_splits listing all of them for every split,
  and per split the triplets (cat0 -> cat1), (cat1 -> cat2), ... with two captions each.
  `missing` asins get no image file; `corrupt` asins get garbage bytes. Returns the triplets."""
  triplets = {}
  splits = ("train", "val", "test") if with_test else ("train", "val")
  for c, cat in enumerate(FIQ_CATEGORIES):
    asins = [f"{cat}{i}" for i in range(n_images)]
    for i, asin in enumerate(asins):
      path = os.path.join(root, "images", asin + ".jpg")
      if asin in corrupt:
        write_bytes(path, b"\xff\xd8\xff\xe0 this is not a jpeg")
      elif asin not in missing:
        write_jpeg(path, 10 * c + i)
    for split in splits:
      write_json(os.path.join(root, "image_splits", f"split.{cat}.{split}.json"), asins)
      caps = [{"candidate": asins[i], "target": asins[i + 1],
               "captions": [f"is {cat} {i} longer", f"has {split} sleeves"]}
              for i in range(n_images - 1)]
      write_json(os.path.join(root, "captions", f"cap.{cat}.{split}.json"), caps)
      triplets[(cat, split)] = caps
  return triplets


# ----------------------------------------------------------------------------------------------
# Polyvore Outfits.
# ----------------------------------------------------------------------------------------------
POLYVORE_CATEGORIES = ("tops", "bottoms", "shoes", "bags")


def write_polyvore(root, n_outfits=4, missing_images=(), missing_metadata=()):
  """For both versions and all splits: n_outfits outfits of 4 items (one per category), a FITB
  question per outfit (blank = the shoes, answers: the right shoes + shoes of the other outfits)
  and two compatibility lines per outfit (1 = the outfit, 0 = items mixed across outfits). Item
  ids are '<split><outfit><category>' so disjoint and nondisjoint share them. Returns
  {split: [outfit dicts]}."""
  metadata, outfits_by_split = {}, {}
  for split in ("train", "valid", "test"):
    outfits = []
    for o in range(n_outfits):
      set_id = f"{100 + o}{split}"
      items = []
      for idx, cat in enumerate(POLYVORE_CATEGORIES, start=1):
        item_id = f"{split}{o}{cat}"
        items.append({"item_id": item_id, "index": idx})
        if item_id not in missing_metadata:
          metadata[item_id] = {
              "semantic_category": cat, "category_id": str(idx * 10),
              "title": "" if cat == "bags" else f"{cat} {o}",
              "url_name": f"{cat} url {o}", "description": f"a {cat}",
              "catgeories": ["Women's Fashion", cat.capitalize(), f"{cat} fine"],
              "related": []}
        if item_id not in missing_images:
          write_jpeg(os.path.join(root, "images", f"{item_id}.jpg"), zlib.crc32(item_id.encode()))
      outfits.append({"set_id": set_id, "items": items})
    outfits_by_split[split] = outfits
    fitb, compat = [], []
    for o, outfit in enumerate(outfits):
      sid = outfit["set_id"]
      others = [outfits[(o + k) % n_outfits]["set_id"] for k in range(1, n_outfits)]
      # Right answer placed at position o % 4 to test answer_index.
      answers = [f"{s}_3" for s in others[:3]]
      answers.insert(o % 4, f"{sid}_3")
      fitb.append({"question": [f"{sid}_1", f"{sid}_2", f"{sid}_4"], "answers": answers[:4],
                   "blank_position": 3})
      compat.append(f"1 {sid}_1 {sid}_2 {sid}_3 {sid}_4")
      compat.append(f"0 {sid}_1 {others[0]}_2 {sid}_3")
    for version in ("nondisjoint", "disjoint"):
      write_json(os.path.join(root, version, f"{split}.json"), outfits)
      write_json(os.path.join(root, version, f"fill_in_blank_{split}.json"), fitb)
      write_bytes(os.path.join(root, version, f"compatibility_{split}.txt"),
                  ("\n".join(compat) + "\n").encode())
  write_json(os.path.join(root, "polyvore_item_metadata.json"), metadata)
  return outfits_by_split


# ----------------------------------------------------------------------------------------------
# Building and reading through tfds.
# ----------------------------------------------------------------------------------------------
def build(builder_cls, manual_dir, data_dir, config=None, **kwargs):
  """Builds like launch/build_data does: download_and_prepare with DownloadConfig(manual_dir)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = builder_cls(data_dir=os.fspath(data_dir), config=config, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def _to_py(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype == object:
    return [_to_py(v) for v in value]
  if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def read(builder, split):
  """All examples of a split as dicts of str / int / list / uint8 arrays (images)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return [{k: _to_py(v) for k, v in ex.items()}
          for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


def bad_report(builder):
  with open(os.path.join(builder.data_dir, "bad_records.json"), encoding="utf-8") as f:
    return json.load(f)
