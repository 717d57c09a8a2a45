"""Bad input: converted where possible, skipped and counted (with the file/row and reason) where
not, never a crashed build, never a silently emptied one (above max_bad_fraction: an error naming
the fraction and examples), and a missing manual file names itself and where it comes from."""

import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests import fixtures_real as F
from fashion_jax.data import images as I
from fashion_jax.data.builders import fashiongen
from fashion_jax.data.builders import fashioniq
from fashion_jax.data.builders import image_text_folder as itf
from fashion_jax.data.builders import polyvore_outfits

RGB = F.image_array(3)


# ----------------------------------------------------------------------------------------------
# Image conversions.
# ----------------------------------------------------------------------------------------------
def test_grayscale_palette_cmyk_become_rgb():
  gray = I.decode_image(F.encode(Image.fromarray(RGB[..., 0], "L"), "PNG"))
  assert gray.pixels.shape == (32, 32, 3) and gray.conversions == ["grayscale->RGB"]
  np.testing.assert_array_equal(gray.pixels, np.repeat(RGB[..., :1], 3, axis=-1))

  pal_img = Image.fromarray(RGB).quantize(16)
  pal = I.decode_image(F.encode(pal_img, "PNG"))
  np.testing.assert_array_equal(pal.pixels, np.asarray(pal_img.convert("RGB")))
  assert pal.conversions == ["palette->RGB"]

  cmyk = I.decode_image(F.encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=98))
  assert cmyk.conversions == ["CMYK->RGB"] and cmyk.jpeg_passthrough is None
  assert np.abs(cmyk.pixels.astype(float) - RGB).mean() < 6


def test_transparency_is_composited_on_white():
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 0] = 255            # red ...
  rgba[:16, :, 3] = 0           # ... fully transparent on top -> white
  rgba[16:, :, 3] = 128         # ... half transparent below -> pink
  out = I.decode_image(F.encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  np.testing.assert_array_equal(out.pixels[0, 0], [255, 255, 255])
  np.testing.assert_allclose(out.pixels[20, 0], [255, 127, 127], atol=1)
  assert "composited on white" in out.conversions[0]
  # Palette image whose transparent index is black: white, not black, comes out.
  pal = Image.new("P", (8, 8), 0)
  pal.putpalette([0, 0, 0] + [200, 10, 10] * 255)
  pal.info["transparency"] = 0
  out = I.decode_image(F.encode(pal, "PNG", transparency=0))
  np.testing.assert_array_equal(out.pixels[0, 0], [255, 255, 255])


def test_16_bit_is_scaled_not_clipped():
  values = np.array([[0, 257 * 128, 65535, 257 * 10]], np.uint16)
  out = I.decode_image(F.encode(Image.fromarray(values), "PNG"))
  assert out.pixels[0, :, 0].tolist() == [0, 128, 255, 10]  # Pillow's convert would give 255s.
  assert out.conversions == ["16-bit grayscale->8-bit RGB"]


def test_exif_orientation_is_applied():
  img = np.zeros((16, 32, 3), np.uint8)  # Stored landscape, left half red.
  img[:, :16, 0] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  out = I.decode_image(F.encode(Image.fromarray(img), "JPEG", quality=98, exif=exif))
  assert out.pixels.shape == (32, 16, 3)  # Upright portrait.
  assert out.pixels[2, 8, 0] > 200 and out.pixels[-3, 8, 0] < 50  # Red moved to the top.
  assert out.conversions == ["EXIF orientation 6 applied"]


def test_upright_rgb_jpeg_is_passed_through_unchanged():
  data = F.encode(Image.fromarray(RGB), "JPEG", quality=90)
  jpeg, conversions = I.to_jpeg(data)
  assert jpeg == data and conversions == []


@pytest.mark.slow
def test_huge_image_is_downscaled_and_bomb_refused():
  huge = F.encode(Image.new("RGB", (10000, 10000), (200, 30, 30)), "JPEG", quality=80)
  out = I.decode_image(huge)
  assert out.pixels.shape == (1024, 1024, 3)
  assert out.conversions == ["downscaled 10000x10000->1024x1024"]
  np.testing.assert_allclose(out.pixels[512, 512], [200, 30, 30], atol=4)
  # A PNG whose header claims 100000 x 100000 pixels: refused before any decoding.
  png = bytearray(F.encode(Image.new("RGB", (4, 4)), "PNG"))
  ihdr = bytearray(png[12:29])  # b"IHDR" + 13 data bytes.
  ihdr[4:12] = struct.pack(">II", 100000, 100000)
  png[12:29] = ihdr
  png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
  with pytest.raises(I.BadImageError, match="decompression bomb"):
    I.decode_image(bytes(png))
  with pytest.raises(I.BadImageError, match="decompression bomb"):
    I.decode_image(F.encode(Image.fromarray(RGB), "PNG"), max_pixels=32 * 31)


@pytest.mark.parametrize("data, reason", [
    (b"", "zero-byte file"),
    (b"<html>404 not found</html>", "not a recognised image format"),
    (F.encode(Image.fromarray(RGB), "JPEG")[:400], "truncated image"),
    (F.encode(Image.fromarray(RGB), "PNG")[:-30], "truncated image|corrupt image"),
])
def test_undecodable_inputs_raise_with_reason(data, reason):
  with pytest.raises(I.BadImageError, match=reason):
    I.decode_image(data)


def test_missing_path_and_views_of_different_sizes(tmp_path):
  with pytest.raises(I.BadImageError, match="missing file"):
    I.decode_image(tmp_path / "nope.jpg")
  bad = I.BadRecords("t")
  small = F.write_jpeg(tmp_path / "a.jpg", 1, size=16)
  big = F.write_jpeg(tmp_path / "b.jpg", 2, size=32)
  jpegs = I.load_views([(small, "a.jpg"), (tmp_path / "gone.jpg", "gone.jpg"), (big, "b.jpg")],
                       bad, "train")
  assert len(jpegs) == 2
  padded = np.asarray(Image.open(io.BytesIO(jpegs[0])))
  assert padded.shape == (32, 32, 3)
  assert (padded[:8] >= 250).all()  # White border around the centred 16x16 view.
  assert bad.counts("train", I.IMAGE) == (2, 1)
  assert bad.skipped == [{"split": "train", "unit": "image", "ref": "gone.jpg",
                          "reason": "missing file"}]
  assert "padded on white 16x16->32x32" in bad.converted[0]["reason"]


# ----------------------------------------------------------------------------------------------
# Text and accounting.
# ----------------------------------------------------------------------------------------------
def test_text_decoding():
  assert I.decode_bytes("Café".encode("utf-8")) == ("Café", None)
  assert I.decode_bytes(b"Caf\xe9 \x93quoted\x94") == (
      "Café \u201cquoted\u201d", "non-UTF-8 text decoded as cp1252")
  assert I.decode_bytes(b"Caf\xe9", "latin-1") == ("Café", None)
  assert I.clean_text("  a\n\tb\u00a0 c ") == "a b c"


def test_bad_records_fraction_and_report(tmp_path):
  bad = I.BadRecords("demo", max_bad_fraction=0.25)
  for _ in range(3):
    bad.ok("train")
  bad.skip("train", "row 4", "empty caption")
  bad.convert("train", "x.png", "downscaled 4000x3000->1024x768", unit=I.IMAGE)
  bad.convert("train", "y.png", "downscaled 5000x3000->1024x614", unit=I.IMAGE)
  bad.check("train")  # 1 / 4 = 25% is not MORE than 25%.
  bad.skip("train", "row 5", "no image")
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"2 of 5 records in split 'train' were bad \(40.0%\), more than "
                           r"max_bad_fraction=25.0%\. Examples: row 4: empty caption; row 5"):
    bad.check("train")
  bad.write(tmp_path / "r.json")
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["splits"]["train"]["record"] == {"ok": 3, "skipped": 2, "fraction": 0.4}
  assert rep["conversion_counts"]["train"] == {"image: downscaled NxN->NxN": 2}
  with pytest.raises(ValueError, match="max_bad_fraction must be in"):
    I.BadRecords("x", 1.5)


# ----------------------------------------------------------------------------------------------
# A messy shop catalog, end to end through tfds.
# ----------------------------------------------------------------------------------------------
def _messy_shop(root):
  """23 data rows: 14 plain; 4 whose image is converted (grayscale, CMYK, RGBA, 16-bit); 1 with
  a cp1252 title; 1 two-view product with one view missing; 2 bad rows (missing columns, no
  text); 1 product whose only image is truncated."""
  for i in range(18):
    F.write_jpeg(os.path.join(root, "img", f"p{i}.jpg"), i)
  arr = F.image_array(50)
  F.write_bytes(os.path.join(root, "img", "gray.png"), F.encode(Image.fromarray(arr[..., 0]), "PNG"))
  F.write_bytes(os.path.join(root, "img", "cmyk.jpg"),
                F.encode(Image.fromarray(arr).convert("CMYK"), "JPEG"))
  F.write_bytes(os.path.join(root, "img", "rgba.png"),
                F.encode(Image.fromarray(arr).convert("RGBA"), "PNG"))
  F.write_bytes(os.path.join(root, "img", "deep.png"),
                F.encode(Image.fromarray(arr[..., 1].astype(np.uint16) * 257), "PNG"))
  F.write_bytes(os.path.join(root, "img", "broken.jpg"), F.encode(Image.fromarray(arr))[:300])
  rows = [b"id,image,title,description,colour"]
  for i in range(14):
    rows.append(f"g{i},img/p{i}.jpg,Good {i},A product,blue".encode())
  rows += [b"gray,img/gray.png,Gray,x,grey", b"cmyk,img/cmyk.jpg,Cmyk,x,cyan",
           b"rgba,img/rgba.png,Rgba,x,red", b"deep,img/deep.png,Deep,x,green",
           b"latin,img/p14.jpg,Caf\xe9 cr\xe8me shirt,x,beige",           # cp1252 title
           b"twoviews,img/p15.jpg|img/missing.jpg,Two views,x,black",    # one view missing
           b"short,img/p16.jpg,Short row",                               # missing columns (row 21)
           b"notext,img/p17.jpg,,,white",                                # empty text (row 22)
           b"broken,img/broken.jpg,Broken,x,pink"]                       # no usable image
  F.write_bytes(os.path.join(root, "catalog.csv"), b"\r\n".join(rows) + b"\r\n")


def test_messy_catalog_converts_skips_counts_and_completes(tmp_path):
  manual = tmp_path / "shop"
  _messy_shop(manual)
  config = itf.ImageTextFolderConfig(name="messy", split_fractions=(1.0, 0.0, 0.0))
  builder = F.build(itf.ImageTextFolder, manual, tmp_path / "data", config=config,
                    max_bad_fraction=0.15)
  got = {e["product_id"]: e for e in F.read(builder, "train")}
  assert sorted(got) == sorted([f"g{i}" for i in range(14)] +
                               ["gray", "cmyk", "rgba", "deep", "latin", "twoviews"])
  assert got["latin"]["title"] == "Café crème shirt"
  assert len(got["twoviews"]["images"]) == 1
  for pid in ("gray", "cmyk", "rgba", "deep"):
    assert got[pid]["images"].shape == (1, 32, 32, 3)
  assert np.abs(got["deep"]["images"][0, ..., 0].astype(float) - F.image_array(50)[..., 1]).mean() < 3

  rep = F.bad_report(builder)
  skipped = {(s["ref"], s["reason"]) for s in rep["skipped"]}
  assert ("catalog.csv row 21 (line 22)", "3 fields, but the header has 5 (missing columns)") in skipped
  assert ("catalog.csv row 22 (line 23)",
          "empty title and description (a product needs text)") in skipped
  assert ("img/missing.jpg", "missing file") in skipped
  assert any(ref == "img/broken.jpg" and reason.startswith("truncated image")
             for ref, reason in skipped)
  assert any(ref.startswith("product broken") for ref, _ in skipped)
  assert rep["splits"]["catalog"]["record"] == {"ok": 21, "skipped": 2, "fraction": round(2 / 23, 6)}
  assert rep["splits"]["train"]["record"]["skipped"] == 1
  reasons = {c["reason"] for c in rep["converted"]}
  assert {"grayscale->RGB", "CMYK->RGB", "RGBA with transparency composited on white",
          "16-bit grayscale->8-bit RGB", "non-UTF-8 text decoded as cp1252"} <= reasons


def test_messy_catalog_above_max_fraction_stops_with_fraction(tmp_path):
  manual = tmp_path / "shop"
  _messy_shop(manual)
  config = itf.ImageTextFolderConfig(name="messy", split_fractions=(1.0, 0.0, 0.0))
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"2 of 23 records in split 'catalog' were bad \(8.7%\), more than "
                           r"max_bad_fraction=5.0%. Examples: catalog.csv row 21"):
    F.build(itf.ImageTextFolder, manual, tmp_path / "data", config=config)
  # Row problems alone pass at 9% (2 of 23); with the product whose only image is broken, 3 of
  # the catalog's 23 records are bad, judged over the whole catalog (image_text_folder).
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"3 of 23 records of the whole catalog were bad \(13.0%\), more than "
                           r"max_bad_fraction=9.0% \(per split: catalog rows 2 of 23, "
                           r"train 1 of 21\)"):
    F.build(itf.ImageTextFolder, manual, tmp_path / "data2", config=config, max_bad_fraction=0.09)
  assert not (tmp_path / "data2" / "image_text_folder" / "messy" / "1.0.0").exists()


def test_catalog_with_every_image_missing_is_an_error_not_an_empty_dataset(tmp_path):
  manual = tmp_path / "shop"
  manual.mkdir()
  (manual / "catalog.jsonl").write_text(
      "\n".join(json.dumps({"image": f"nope{i}.jpg", "title": "t"}) for i in range(5)))
  with pytest.raises(I.TooManyBadRecordsError, match=r"5 of 5 records .* \(100.0%\)"):
    F.build(itf.ImageTextFolder, manual, tmp_path / "data",
            config=itf.ImageTextFolderConfig(name="gone", split_fractions=(1.0, 0.0, 0.0)))


# ----------------------------------------------------------------------------------------------
# Real formats: missing images, empty captions, placeholder rows.
# ----------------------------------------------------------------------------------------------
def test_fashioniq_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
  manual = tmp_path / "fiq"
  F.write_fashioniq(manual, n_images=4, with_test=False, missing=("dress3",),
                    corrupt=("shirt0",))
  F.write_json(manual / "captions" / "cap.toptee.val.json",  # Captions: one empty, all empty.
               [{"candidate": "toptee0", "target": "toptee1", "captions": ["", "is red"]},
                {"candidate": "toptee1", "target": "toptee2", "captions": [" ", ""]},
                {"candidate": "toptee2", "target": "toptee3", "captions": ["a", "b"]}])
  builder = F.build(fashioniq.Fashioniq, manual, tmp_path / "data", config="triplets",
                    max_bad_fraction=0.4)
  val = F.read(builder, "validation")
  keys = {(e["candidate_id"], e["target_id"]) for e in val}
  assert ("dress2", "dress3") not in keys and ("shirt0", "shirt1") not in keys
  assert ("toptee1", "toptee2") not in keys
  top0 = next(e for e in val if e["candidate_id"] == "toptee0")
  assert top0["captions"] == ["is red"] and top0["caption"] == "is red"
  rep = F.bad_report(builder)
  val_skips = [s for s in rep["skipped"] if s["split"] == "validation"]
  reasons = sorted(s["reason"] for s in val_skips if s["unit"] == "record")
  assert reasons == ["candidate image shirt0 missing or unreadable", "no non-empty caption",
                     "target image dress3 missing or unreadable"]
  # Each bad image counted once per split even though triplets reuse it.
  assert rep["splits"]["validation"]["image"]["skipped"] == 2
  assert {(s["ref"], s["reason"]) for s in val_skips if s["unit"] == "image"} >= {
      ("images/dress3.jpg", "missing file")}
  assert set(builder.info.splits.keys()) == {"train", "validation"}  # No test files: no split.
  with pytest.raises(I.TooManyBadRecordsError, match=r"2 of 9 records in split 'train'"):
    F.build(fashioniq.Fashioniq, manual, tmp_path / "data2", config="triplets")


def test_fashiongen_empty_caption_and_placeholder_rows(tmp_path):
  rows = F.fashiongen_rows([(str(1000 + k), 2, {}) for k in range(10)])
  rows[4]["description"] = "   "              # product 1002: empty caption -> skipped
  rows[4 + 1]["description"] = "   "
  rows[8]["image"] = np.zeros_like(rows[8]["image"])  # product 1004: one blank pose dropped
  rows[10]["image"] = np.full_like(rows[10]["image"], 255)  # product 1005: both poses blank
  rows[11]["image"] = np.full_like(rows[11]["image"], 255)
  manual = tmp_path / "fg"
  manual.mkdir()
  F.write_fashiongen_h5(manual / "fashiongen_256_256_train.h5", rows)
  F.write_fashiongen_h5(manual / "fashiongen_256_256_validation.h5", F.fashiongen_rows([("9", 1, {})]))
  builder = F.build(fashiongen.Fashiongen, manual, tmp_path / "data", max_bad_fraction=0.25)
  got = {e["product_id"]: e for e in F.read(builder, "train")}
  assert "1002" not in got and "1005" not in got and len(got) == 8
  assert len(got["1004"]["images"]) == 1 and got["1004"]["poses"] == ["id_gridfs_2"]
  rep = F.bad_report(builder)
  reasons = {(s["ref"], s["reason"]) for s in rep["skipped"]}
  assert ("fashiongen_256_256_train.h5 product 1002 (first row 4)",
          "empty input_description (the caption)") in reasons
  assert ("fashiongen_256_256_train.h5 row 8 (product 1004)", "constant image (all pixels 0)") in reasons
  assert ("fashiongen_256_256_train.h5 product 1005 (first row 10)",
          "no usable image among its pose rows") in reasons
  with pytest.raises(I.TooManyBadRecordsError, match=r"2 of 10 records in split 'train' .*20.0%"):
    F.build(fashiongen.Fashiongen, manual, tmp_path / "data2", max_bad_fraction=0.19)


def test_polyvore_missing_item_image_propagates(tmp_path):
  manual = tmp_path / "pv"
  F.write_polyvore(manual, n_outfits=4, missing_images=("test1shoes",),
                   missing_metadata=("test2tops",))
  build = lambda part, frac=0.5: F.build(polyvore_outfits.PolyvoreOutfits, manual,
                                        tmp_path / "data", config=f"disjoint_{part}",
                                        max_bad_fraction=frac)
  items = {e["product_id"] for e in F.read(build("items"), "test")}
  assert "test1shoes" not in items and "test2tops" not in items and len(items) == 14
  outfits = {e["set_id"] for e in F.read(build("outfits"), "test")}
  assert outfits == {"100test", "103test"}
  # Every test question has test1shoes among its answers or test2tops in its question: 100%.
  with pytest.raises(I.TooManyBadRecordsError, match=r"4 of 4 records in split 'test'"):
    build("fitb")
  # Even when the user allows every record to be bad, an empty split is an error.
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"split 'test' has no usable record \(4 skipped\). Examples: "
                           r"disjoint/fill_in_blank_test.json\[0\]: image images/test1shoes.jpg"):
    build("fitb", frac=1.0)
  fitb_builder = polyvore_outfits.PolyvoreOutfits(data_dir=os.fspath(tmp_path / "data"),
                                                  config="disjoint_fitb")
  assert not fitb_builder.is_prepared()  # Nothing half-built was left behind.
  compat = build("compatibility")  # 4 of 8 test lines use a bad item: 50% is allowed here.
  rep = F.bad_report(compat)
  test_skips = [s for s in rep["skipped"] if s["split"] == "test"]
  assert len(test_skips) == 4 and {s["reason"] for s in test_skips} == {
      "image images/test1shoes.jpg is missing",
      "item test2tops has no entry in polyvore_item_metadata.json"}
  assert len(F.read(compat, "test")) == 4 and len(F.read(compat, "train")) == 8


# ----------------------------------------------------------------------------------------------
# Missing manual files.
# ----------------------------------------------------------------------------------------------
def test_missing_manual_files_are_named_with_their_source(tmp_path):
  manual = tmp_path / "fg"
  manual.mkdir()
  F.write_fashiongen_h5(manual / "fashiongen_256_256_train.h5", F.fashiongen_rows([("1", 1, {})]))
  with pytest.raises(I.MissingManualFileError,
                     match=r"fashiongen: expected file 'fashiongen_256_256_validation.h5' .*"
                           r"comes from: the official FashionGen release"):
    F.build(fashiongen.Fashiongen, manual, tmp_path / "d1")

  fiq = tmp_path / "fiq"
  F.write_fashioniq(fiq, n_images=2, with_test=False)
  os.remove(fiq / "captions" / "cap.shirt.val.json")
  with pytest.raises(I.MissingManualFileError,
                     match=r"expected file 'captions/cap.shirt.val.json'.*XiaoxiaoGuo/fashion-iq"):
    F.build(fashioniq.Fashioniq, fiq, tmp_path / "d2", config="triplets")

  pv = tmp_path / "pv"
  F.write_polyvore(pv)
  os.remove(pv / "polyvore_item_metadata.json")
  with pytest.raises(I.MissingManualFileError,
                     match=r"expected file 'polyvore_item_metadata.json'.*mvasil/fashion-compatibility"):
    F.build(polyvore_outfits.PolyvoreOutfits, pv, tmp_path / "d3", config="nondisjoint_fitb")

  shop = tmp_path / "shop"
  shop.mkdir()
  (shop / "products.txt").write_text("not a catalog")
  with pytest.raises(I.MissingManualFileError,
                     match=r"expected a catalog file \(catalog.csv or catalog.tsv or catalog.jsonl\)"):
    F.build(itf.ImageTextFolder, shop, tmp_path / "d4")


def test_wrong_h5_names_its_missing_fields(tmp_path):
  import h5py  # pylint: disable=g-import-not-at-top
  manual = tmp_path / "fg"
  manual.mkdir()
  for split in ("train", "validation"):
    with h5py.File(manual / f"fashiongen_256_256_{split}.h5", "w") as f:
      f.create_dataset("input_image", data=np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"lacks the field\(s\) \['input_productID', 'input_pose'"):
    F.build(fashiongen.Fashiongen, manual, tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# A large catalog with 1% bad records of every kind, built AND trained on.
# ----------------------------------------------------------------------------------------------
CAPTION_CASES = {  # product id -> (raw title bytes in the CSV, the title the dataset must hold)
    "long": (b"x" * 100_000, "x" * 100_000),                    # 100k characters, one "word"
    "emoji": ("Summer dress \U0001F457\U0001F525 with \U0001F338 print".encode(),
              "Summer dress \U0001F457\U0001F525 with \U0001F338 print"),
    "rtl": ("\u05e9\u05de\u05dc\u05d4 \u05d0\u05d3\u05d5\u05de\u05d4 \u0641\u0633\u062a\u0627\u0646"
            .encode(), "\u05e9\u05de\u05dc\u05d4 \u05d0\u05d3\u05d5\u05de\u05d4 "
            "\u0641\u0633\u062a\u0627\u0646"),                    # Hebrew + Arabic, right-to-left
    "badutf8": (b"Caf\xe9 \xff\xfe shirt", "Caf\u00e9 \u00ff\u00fe shirt"),  # invalid UTF-8
}


def _one_percent_catalog(root, n):
  """n rows, 12 of them bad (1%): 3 undecodable images (corrupt, truncated, zero-byte) and one
  empty caption are skipped; a 10000 x 10000 image, grayscale, CMYK, 16-bit, a 100k-character
  caption, emoji, right-to-left text and invalid UTF-8 are converted or kept as they are."""
  arr = F.image_array(7)
  special_images = {
      "corrupt": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 2000,
                                                                             dtype=np.uint8)),
      "truncated": F.encode(Image.fromarray(arr), "JPEG")[:300],
      "zero": b"",
      "huge": F.encode(Image.new("RGB", (10000, 10000), (200, 30, 30)), "JPEG", quality=80),
      "gray": F.encode(Image.fromarray(arr[..., 0]), "PNG"),
      "cmyk": F.encode(Image.fromarray(arr).convert("CMYK"), "JPEG"),
      "deep": F.encode(Image.fromarray(arr[..., 1].astype(np.uint16) * 257), "PNG"),
  }
  rows = [b"id,image,title,description"]
  for pid, data in special_images.items():
    F.write_bytes(os.path.join(root, "img", f"{pid}.img"), data)
    rows.append(f"{pid},img/{pid}.img,Product {pid},special image".encode())
  for pid, (title, _) in CAPTION_CASES.items():
    F.write_jpeg(os.path.join(root, "img", f"{pid}.jpg"), len(rows))
    rows.append(f"{pid},img/{pid}.jpg,".encode() + title + b",")
  F.write_jpeg(os.path.join(root, "img", "empty.jpg"), 1)
  rows.append(b"empty,img/empty.jpg,,")
  good = [f"g{i}" for i in range(n - len(rows) + 1)]
  for i, pid in enumerate(good):
    F.write_jpeg(os.path.join(root, "img", f"{pid}.jpg"), 1000 + i)
    rows.append(f"{pid},img/{pid}.jpg,Good item {i},A plain product".encode())
  F.write_bytes(os.path.join(root, "catalog.csv"), b"\n".join(rows) + b"\n")
  return good


@pytest.mark.slow
def test_one_percent_bad_catalog_builds_names_every_bad_record_and_trains(tmp_path):
  n = 1200
  good = _one_percent_catalog(tmp_path / "shop", n)
  config = itf.ImageTextFolderConfig(name="onepct", split_fractions=(1.0, 0.0, 0.0))
  builder = F.build(itf.ImageTextFolder, tmp_path / "shop", tmp_path / "data", config=config,
                    max_bad_fraction=0.01)
  got = {e["product_id"]: e for e in F.read(builder, "train")}
  skipped = {"corrupt", "truncated", "zero", "empty"}
  # Nothing but the 4 unusable records is dropped.
  assert sorted(got) == sorted(set(good) | {"huge", "gray", "cmyk", "deep"} | set(CAPTION_CASES))
  assert len(got) == n - len(skipped)
  for pid, (_, title) in CAPTION_CASES.items():
    assert got[pid]["title"] == title, pid
  assert max(got["huge"]["images"].shape[1:3]) == 1024
  rep = F.bad_report(builder)
  reasons = {s["ref"]: s["reason"] for s in rep["skipped"]}
  assert reasons["img/zero.img"] == "zero-byte file"
  assert reasons["img/truncated.img"].startswith("truncated image")
  assert re.match(r"corrupt image|not a recognised image format|truncated image",
                  reasons["img/corrupt.img"])
  assert any(ref.startswith("catalog.csv row") and "empty title and description" in reason
             for ref, reason in reasons.items())
  assert {r.split()[1] for r in reasons if r.startswith("product ")} == {
      "corrupt", "truncated", "zero"}
  assert rep["splits"]["catalog"]["record"]["skipped"] == 1
  assert rep["splits"]["train"]["image"]["skipped"] == 3
  converted = {(c["ref"], c["reason"]) for c in rep["converted"]}
  assert {("img/huge.img", "downscaled 10000x10000->1024x1024"),
          ("img/gray.img", "grayscale->RGB"), ("img/cmyk.img", "CMYK->RGB"),
          ("img/deep.img", "16-bit grayscale->8-bit RGB")} <= converted
  assert any(reason == "non-UTF-8 text decoded as cp1252" for _, reason in converted)

  # Train on it: the input pipeline reads every record (one full epoch), then a few steps.
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.test_fashionclip_system import tiny_config  # pylint: disable=g-import-not-at-top
  train_config = tiny_config()
  train_config.data.name = "image_text_folder/onepct"
  train_config.data.data_dir = str(tmp_path / "data")
  train_config.data.shuffle_buffer = 64
  train_config.total_steps = 3
  train_config.log_every_steps = 1
  it = pipeline.make_train_iterator(train_config, start_step=0, process_index=0,
                                    process_count=1)
  assert it.num_examples == n - len(skipped)
  for _ in range(-(-it.num_examples // train_config.batch_size)):
    batch = next(it)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["text"].shape == (16, 16)
  result = loop.train_and_evaluate(train_config, str(tmp_path / "run"))
  assert int(result.state.step) == 3 and np.isfinite(result.metrics["train/loss"])
