"""Each real-format TFDS builder reads a tiny fixture written here in the real on-disk format
(FashionGen h5 with latin-1 [N, 1] byte strings, FashionIQ / Polyvore JSON, JPEGs, a shop CSV /
JSONL) and emits the right products / triplets / outfits / questions."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import fixtures_real as F
from fashion_jax.data import schema
from fashion_jax.data.builders import fashiongen
from fashion_jax.data.builders import fashioniq
from fashion_jax.data.builders import image_text_folder as itf
from fashion_jax.data.builders import polyvore_outfits


def _close(stored, original, tol=3.0):
  """JPEG q95 4:4:4 of 8x8-block images is near-lossless: mean |diff| well under `tol`."""
  assert stored.shape == original.shape
  return np.abs(stored.astype(np.float64) - original).mean() < tol


# ----------------------------------------------------------------------------------------------
# FashionGen.
# ----------------------------------------------------------------------------------------------
def test_fashiongen_groups_pose_rows_into_products(tmp_path, monkeypatch):
  # Chunks of 2 rows: products straddle chunk boundaries; product "1004" is NOT contiguous.
  monkeypatch.setattr(fashiongen.Fashiongen, "H5_CHUNK_ROWS", 2)
  rows = F.fashiongen_rows([("1001", 3, {}), ("1002", 2, {"gender": "MEN"}), ("1003", 1, {})])
  extra = F.fashiongen_rows([("1004", 2, {"brand": "Maison Noël"})], seed=7)
  rows = rows[:2] + [extra[0]] + rows[2:] + [extra[1]]
  val_rows = F.fashiongen_rows([("2001", 4, {})], seed=50)
  manual = tmp_path / "manual"
  manual.mkdir()
  F.write_fashiongen_h5(manual / "fashiongen_256_256_train.h5", rows)
  F.write_fashiongen_h5(manual / "fashiongen_256_256_validation.h5", val_rows)

  builder = F.build(fashiongen.Fashiongen, manual, tmp_path / "data")
  assert set(builder.info.splits.keys()) == {"train", "validation"}
  train = {ex["product_id"]: ex for ex in F.read(builder, "train")}
  assert sorted(train) == ["1001", "1002", "1003", "1004"]
  # Each product holds exactly its pose rows' images, in row order.
  for pid, ex in train.items():
    originals = [r for r in rows if r["productID"] == pid]
    assert len(ex["images"]) == len(originals) == len(ex["poses"])
    for stored, row in zip(ex["images"], originals):
      assert _close(stored, row["image"])
    assert ex["poses"] == [r["pose"] for r in originals]
  ex = train["1004"]
  assert ex["brand"] == "Maison Noël"  # latin-1 bytes decoded.
  assert ex["title"] == "Café cotton shirt 1004" and ex["description"] == "Crème shirt number 1004."
  assert (ex["category"], ex["subcategory"], ex["season"], ex["composition"]) == (
      "TOPS", "SHIRTS", "SS2017", "100% cotton")
  assert train["1001"]["gender"] == "women" and train["1002"]["gender"] == "men"
  assert train["1001"]["department"] == "CLOTHING"
  val = F.read(builder, "validation")
  assert [e["product_id"] for e in val] == ["2001"] and len(val[0]["images"]) == 4
  report = F.bad_report(builder)
  assert report["skipped"] == []
  assert report["splits"]["train"]["image"] == {"ok": 8, "skipped": 0, "fraction": 0.0}
  # Every product-schema field is present.
  assert set(schema.TEXT_FIELDS) | {schema.IMAGES} <= set(builder.info.features.keys())


def test_fashiongen_cell_decoding():
  assert fashiongen.h5_cell_to_str(np.array([b"Caf\xe9  au\nlait "])) == "Café au lait"
  assert fashiongen.h5_cell_to_str(np.array([123456])) == "123456"
  assert fashiongen.h5_cell_to_str(np.float64(42.0)) == "42"


# ----------------------------------------------------------------------------------------------
# FashionIQ.
# ----------------------------------------------------------------------------------------------
def test_fashioniq_triplets_and_galleries(tmp_path):
  manual = tmp_path / "fiq"
  triplets = F.write_fashioniq(manual, n_images=4)
  trip = F.build(fashioniq.Fashioniq, manual, tmp_path / "data", config="triplets")
  assert set(trip.info.splits.keys()) == {"train", "validation", "test"}
  val = F.read(trip, "validation")
  assert len(val) == 3 * 3
  by_key = {(e["category"], e["candidate_id"]): e for e in val}
  for cat in F.FIQ_CATEGORIES:
    for t in triplets[(cat, "val")]:
      e = by_key[(cat, t["candidate"])]
      assert e["target_id"] == t["target"]
      assert e["captions"] == t["captions"]
      assert e["caption"] == ", ".join(t["captions"])
  e = by_key[("shirt", "shirt1")]
  assert _close(e["candidate_image"], F.image_array(10 * 1 + 1))
  assert _close(e["target_image"], F.image_array(10 * 1 + 2))

  gal = F.build(fashioniq.Fashioniq, manual, tmp_path / "data", config="gallery")
  assert set(gal.info.splits.keys()) == {f"{c}_{s}" for c in F.FIQ_CATEGORIES
                                         for s in ("train", "validation", "test")}
  dress = F.read(gal, "dress_validation")
  assert sorted(e["image_id"] for e in dress) == [f"dress{i}" for i in range(4)]
  assert {e["category"] for e in dress} == {"dress"}


def test_fashioniq_test_split_left_out_when_targets_withheld(tmp_path):
  manual = tmp_path / "fiq"
  F.write_fashioniq(manual, n_images=3)
  for cat in F.FIQ_CATEGORIES:  # The public test captions have no targets.
    F.write_json(manual / "captions" / f"cap.{cat}.test.json",
                 [{"candidate": f"{cat}0", "captions": ["a", "b"]}])
  trip = F.build(fashioniq.Fashioniq, manual, tmp_path / "data", config="triplets")
  assert set(trip.info.splits.keys()) == {"train", "validation"}


# ----------------------------------------------------------------------------------------------
# Polyvore Outfits.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def polyvore_builds(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("polyvore")
  outfits = F.write_polyvore(tmp / "manual", n_outfits=4)
  builders = {part: F.build(polyvore_outfits.PolyvoreOutfits, tmp / "manual", tmp / "data",
                            config=f"nondisjoint_{part}") for part in polyvore_outfits.PARTS}
  return outfits, builders


def test_polyvore_items(polyvore_builds):
  outfits, builders = polyvore_builds
  items = {e["product_id"]: e for e in F.read(builders["items"], "validation")}
  expected = {it["item_id"] for o in outfits["valid"] for it in o["items"]}
  assert set(items) == expected
  shoe = items["valid2shoes"]
  assert (shoe["title"], shoe["category"], shoe["subcategory"], shoe["category_id"]) == (
      "shoes 2", "shoes", "shoes fine", "30")
  assert items["valid1bags"]["title"] == "bags url 1"  # Empty title -> url_name.
  assert len(shoe["images"]) == 1
  assert set(builders["items"].info.splits.keys()) == {"train", "validation", "test"}


def test_polyvore_outfits_fitb_and_compatibility(polyvore_builds):
  outfits, builders = polyvore_builds
  got = {e["set_id"]: e for e in F.read(builders["outfits"], "test")}
  for o in outfits["test"]:
    assert got[o["set_id"]]["item_ids"] == [it["item_id"] for it in o["items"]]
    assert got[o["set_id"]]["item_indices"] == [1, 2, 3, 4]
    assert got[o["set_id"]]["categories"] == list(F.POLYVORE_CATEGORIES)

  fitb = {e["set_id"]: e for e in F.read(builders["fitb"], "test")}
  assert len(fitb) == 4
  for o, outfit in enumerate(outfits["test"]):
    q = fitb[outfit["set_id"]]
    # The fixture puts the right answer at position o % 4; it is this outfit's shoes.
    assert q["answer_index"] == o % 4
    assert q["answer_item_ids"][q["answer_index"]] == f"test{o}shoes"
    assert q["question_item_ids"] == [f"test{o}tops", f"test{o}bottoms", f"test{o}bags"]
    assert q["answer_categories"] == ["shoes"] * 4 and q["blank_position"] == 3

  compat = F.read(builders["compatibility"], "train")
  assert sorted(e["label"] for e in compat) == [0] * 4 + [1] * 4
  positives = [e for e in compat if e["label"] == 1]
  assert all(len({i[len("trainN"):] for i in e["item_ids"]}) == 4 for e in positives)
  negatives = [e for e in compat if e["label"] == 0]
  assert all(len({i[:len("trainN")] for i in e["item_ids"]}) == 2 for e in negatives)


# ----------------------------------------------------------------------------------------------
# A user's catalog.
# ----------------------------------------------------------------------------------------------
def _shop(root, n=12):
  for i in range(n):
    F.write_jpeg(os.path.join(root, "img", f"p{i}.jpg"), i)
    F.write_jpeg(os.path.join(root, "img", f"p{i}_back.jpg"), 100 + i)


def test_image_text_folder_csv_views_tags_and_splits(tmp_path):
  manual = tmp_path / "shop"
  _shop(manual)
  lines = ["SKU,Image,Title,Description,Brand,Colour Name,Material,Split"]
  for i in range(10):
    views = f'"[""img/p{i}.jpg"", ""img/p{i}_back.jpg""]"' if i % 2 else f"img/p{i}.jpg|img/p{i}_back.jpg"
    split = {0: "test", 1: "val", 2: "train"}.get(i, "")
    lines.append(f"sku{i},{views},Shirt {i},Linen shirt {i},Acme,navy {i},linen,{split}")
  lines.append("sku10,img/p10.jpg,Coat 10,,Acme,red,wool,train")   # Same product over two rows:
  lines.append("sku10,img/p10_back.jpg,,,,,,train")                # views are merged.
  (manual / "catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

  builder = tfds.builder("image_text_folder/myshop", data_dir=os.fspath(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
  assert {"colour_name", "material"} <= set(builder.info.features.keys())
  assert "split" not in builder.info.features.keys()
  examples = {}
  for split in builder.info.splits.keys():
    for e in F.read(builder, split):
      examples[e["product_id"]] = (split, e)
  assert sorted(examples) == sorted(f"sku{i}" for i in range(11))
  # Explicit split column values (with synonyms), hash split for the empty cells.
  assert examples["sku0"][0] == "test" and examples["sku1"][0] == "validation"
  for i in range(3, 10):
    assert examples[f"sku{i}"][0] == itf.hash_split(f"sku{i}", (0.8, 0.1, 0.1))
  split, e = examples["sku3"]
  assert (e["title"], e["description"], e["brand"], e["colour_name"], e["material"]) == (
      "Shirt 3", "Linen shirt 3", "Acme", "navy 3", "linen")
  assert len(e["images"]) == 2  # JSON-list cell.
  assert _close(e["images"][0], F.image_array(3)) and _close(e["images"][1], F.image_array(103))
  assert len(examples["sku4"][1]["images"]) == 2  # '|'-separated cell.
  coat = examples["sku10"][1]
  assert len(coat["images"]) == 2 and coat["title"] == "Coat 10" and coat["colour_name"] == "red"

  # Reading back needs neither the catalog nor a config object: features come from disk.
  again = tfds.builder("image_text_folder/myshop", data_dir=os.fspath(tmp_path / "data"))
  assert set(again.info.features.keys()) == set(builder.info.features.keys())
  assert len(F.read(again, "test")) == sum(s == "test" for s, _ in examples.values())


def test_image_text_folder_jsonl_with_explicit_config(tmp_path):
  manual = tmp_path / "shop"
  _shop(manual, n=4)
  records = [{"ref": f"r{i}", "pictures": [f"img/p{i}.jpg"], "copy": f"dress {i}",
              "fit": ["slim", "long"], "ignored": i} for i in range(4)]
  (manual / "export.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  config = itf.ImageTextFolderConfig(
      name="exported", catalog="export.jsonl", image_column="pictures", id_column="ref",
      description_column="copy", tag_columns=("fit",), split_fractions=(1.0, 0.0, 0.0))
  builder = F.build(itf.ImageTextFolder, manual, tmp_path / "data", config=config)
  assert set(builder.info.splits.keys()) == {"train"}  # Empty splits are not created.
  assert "ignored" not in builder.info.features.keys()
  got = {e["product_id"]: e for e in F.read(builder, "train")}
  assert sorted(got) == ["r0", "r1", "r2", "r3"]
  assert got["r2"]["description"] == "dress 2" and got["r2"]["fit"] == "slim, long"
  assert got["r2"]["title"] == ""


def test_hash_split_is_deterministic_and_follows_fractions():
  ids = [f"sku{i}" for i in range(20000)]
  splits = [itf.hash_split(i, (0.7, 0.2, 0.1)) for i in ids]
  assert splits == [itf.hash_split(i, (0.7, 0.2, 0.1)) for i in ids]
  frac = {s: splits.count(s) / len(ids) for s in ("train", "validation", "test")}
  assert abs(frac["train"] - 0.7) < 0.015 and abs(frac["validation"] - 0.2) < 0.015
  assert abs(frac["test"] - 0.1) < 0.015


def test_image_text_folder_column_errors():
  config = itf.ImageTextFolderConfig(name="x")
  with pytest.raises(ValueError, match="no image column"):
    itf.resolve_columns(["title", "brand"], config)
  with pytest.raises(ValueError, match="no text column"):
    itf.resolve_columns(["image", "brand"], config)
  with pytest.raises(ValueError, match="column 'Colour!' of catalog would become the feature 'colour'"):
    itf.resolve_columns(["image", "title", "colour", "Colour!"], config)
  with pytest.raises(ValueError, match=r"tag column\(s\) \['fit'\] are not in"):
    itf.resolve_columns(["image", "title"], itf.ImageTextFolderConfig(name="y", tag_columns=["fit"]))
  with pytest.raises(ValueError, match="split_fractions"):
    itf.ImageTextFolderConfig(name="z", split_fractions=(0.5, 0.1, 0.1))
  assert itf.parse_image_paths('["a.jpg", "b.jpg"]') == ["a.jpg", "b.jpg"]
  assert itf.parse_image_paths(" a.jpg | b.jpg |") == ["a.jpg", "b.jpg"]
  assert itf.feature_name("Colour Name") == "colour_name" and itf.feature_name("2nd") == "tag_2nd"


# ----------------------------------------------------------------------------------------------
# The documented build path (launch/build_data.py) and the project's derived real-format sets.
# ----------------------------------------------------------------------------------------------
def test_builds_through_launch_build_data(tmp_path):
  from fashion_jax.data import derived  # pylint: disable=g-import-not-at-top
  from launch import build_data  # pylint: disable=g-import-not-at-top
  data_dir = os.fspath(tmp_path / "data")
  fg = tmp_path / "fg"
  fg.mkdir()
  F.write_fashiongen_h5(fg / "fashiongen_256_256_train.h5", F.fashiongen_rows([("5", 2, {})]))
  F.write_fashiongen_h5(fg / "fashiongen_256_256_validation.h5", F.fashiongen_rows([("6", 1, {})]))
  b = build_data.build("fashiongen", data_dir, os.fspath(fg))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 1, "validation": 1}

  # Synthetic sets in the public releases' formats build unchanged and lose nothing.
  counts = derived.write_fashioniq(tmp_path / "fiq", size="tiny", image_size=32)
  b = build_data.build("fashioniq/triplets", data_dir, os.fspath(tmp_path / "fiq"))
  for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
    assert b.info.splits[split].num_examples == sum(
        counts[f"cap.{c}.{name}"] for c in F.FIQ_CATEGORIES)
  counts = derived.write_polyvore(tmp_path / "pv", size="tiny", image_size=32)
  b = build_data.build("polyvore_outfits/nondisjoint_fitb", data_dir, os.fspath(tmp_path / "pv"))
  assert b.info.splits["test"].num_examples == counts["fill_in_blank_test"]
  assert F.bad_report(b)["skipped"] == []
  for q in F.read(b, "test"):  # Candidates share the blank's category; the blank is not asked.
    assert len(q["answer_item_ids"]) == 4 and len(set(q["answer_categories"])) == 1
    assert q["answer_item_ids"][q["answer_index"]] not in q["question_item_ids"]
