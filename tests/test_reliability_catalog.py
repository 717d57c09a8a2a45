"""A user's own catalog (image_text_folder) stays trustworthy when it changes or is messy:
a stale build is noticed (refused, rebuilt with --overwrite, warned about on read), duplicate
ids that disagree are reported with their rows, the bad fraction is judged over the whole
catalog, and Excel's UTF-16 "Unicode Text" export reads as what it says."""

import codecs
import json
import logging
import os
import re

import ml_collections
import pytest
import tensorflow_datasets as tfds
from absl import flags
from absl.testing import flagsaver

from tests import fixtures_real as F
from fashion_jax.data import images as I
from fashion_jax.data import pipeline
from fashion_jax.data.builders import image_text_folder as itf
from launch import build_data


def _write_catalog(root, header, rows, name="catalog.csv"):
  """Writes `root/name` (UTF-8, '\n' lines) and a 32 px JPEG for each 'img/...' path it lists
  that does not exist yet (a path under 'img/missing' is left missing)."""
  for row in rows:
    for cell in row.split(","):
      for path in cell.split("|"):
        if path.startswith("img/") and not path.startswith("img/missing"):
          full = os.path.join(root, path)
          if not os.path.exists(full):
            F.write_jpeg(full, len(path) * 31 + sum(map(ord, path)))
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, name), "w", encoding="utf-8") as f:
    f.write("\n".join([header] + rows) + "\n")


def _shop_rows(n, start=0, titles=None):
  titles = titles or {}
  return [f"p{i},img/p{i}.jpg,{titles.get(i, f'Shirt {i}')},Acme" for i in range(start, start + n)]


def _all_examples(builder):
  """product_id -> example over every split of a built dataset."""
  out = {}
  for split in builder.info.splits.keys():
    for e in F.read(builder, split):
      out[e["product_id"]] = e
  return out


def _reader(name, data_dir):
  """A fresh builder that reads what is on disk (as the training pipeline does)."""
  return tfds.builder(name, data_dir=os.fspath(data_dir))


def _cli(capsys, **flag_values):
  """Runs `python -m launch.build_data` in-process with these flags; returns its last line."""
  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  try:
    with flagsaver.as_parsed(**{k: str(v) for k, v in flag_values.items()}):
      build_data.main(["build_data"])
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()
  return capsys.readouterr().out.strip().splitlines()[-1]  # (tfds prints progress before.)


# ----------------------------------------------------------------------------------------------
# Item 6: a changed catalog is not silently served from the old build.
# ----------------------------------------------------------------------------------------------
def test_edited_catalog_is_refused_then_rebuilt_with_overwrite(tmp_path, capsys):
  manual, data = tmp_path / "shop", tmp_path / "data"
  header = "product_id,image,title,brand"
  _write_catalog(manual, header, _shop_rows(12))
  out = _cli(capsys, dataset="image_text_folder/x", data_dir=data, manual_dir=manual)
  assert out.startswith("built image_text_folder/x/1.0.0")
  assert len(_all_examples(_reader("image_text_folder/x", data))) == 12

  # 10 rows added, a title changed: refused with what changed and how to rebuild.
  _write_catalog(manual, header, _shop_rows(22, titles={3: "Renamed linen coat"}))
  # The command ends with one line (SystemExit's message, exit status 1), not a traceback.
  with pytest.raises(SystemExit,
                     match=r"^launch\.build_data: .*catalog\.csv changed since .*--overwrite") as e:
    _cli(capsys, dataset="image_text_folder/x", data_dir=data, manual_dir=manual)
  assert isinstance(e.value.__cause__, itf.StaleDatasetError) and "\n" not in str(e.value)
  assert len(_all_examples(_reader("image_text_folder/x", data))) == 12  # Old build untouched.

  out = _cli(capsys, dataset="image_text_folder/x", data_dir=data, manual_dir=manual,
             overwrite=True)
  assert out.startswith("built image_text_folder/x/1.0.0")
  got = _all_examples(_reader("image_text_folder/x", data))  # What is on disk now.
  assert sorted(got) == sorted(f"p{i}" for i in range(22))
  assert got["p3"]["title"] == "Renamed linen coat" and got["p21"]["title"] == "Shirt 21"
  # The new build carries the new fingerprint: the same command now reuses it, and says so.
  out = _cli(capsys, dataset="image_text_folder/x", data_dir=data, manual_dir=manual)
  assert out.startswith("reused image_text_folder/x/1.0.0") and "up to date" in out


def test_a_split_without_usable_records_ends_the_command_with_where_paths_were_read(
    tmp_path, capsys):
  """Every image path names a file the catalog's folder lacks (the images sit one folder down):
  the build stops at the first empty split with the examples and the folder the paths are
  relative to, in one line, before tfds's own "No examples were yielded"; nothing is built."""
  manual, data = tmp_path / "shop", tmp_path / "data"
  _write_catalog(manual, "product_id,image,title", [r.rsplit(",", 1)[0] for r in _shop_rows(12)])
  os.rename(manual / "img", manual / "pictures")
  with pytest.raises(SystemExit) as e:
    _cli(capsys, dataset="image_text_folder/moved", data_dir=data, manual_dir=manual)
  message = str(e.value)
  assert isinstance(e.value.__cause__, I.TooManyBadRecordsError), message
  assert re.search(r"^launch\.build_data: image_text_folder/moved: split '\w+' has no usable "
                   r"record \(\d+ skipped\)\. Examples: img/p\d+\.jpg: missing file", message)
  assert message.endswith(f"relative to {manual} (the catalog's folder).")
  assert not os.path.exists(data / "image_text_folder" / "moved" / "1.0.0")


def test_changed_options_and_image_files_are_noticed(tmp_path):
  manual, data = tmp_path / "shop", tmp_path / "data"
  _write_catalog(manual, "product_id,image,title", [r.rsplit(",", 1)[0] for r in _shop_rows(6)])
  config = lambda fractions: itf.ImageTextFolderConfig(name="opt", split_fractions=fractions)
  F.build(itf.ImageTextFolder, manual, data, config=config((1.0, 0.0, 0.0)))
  with pytest.raises(ValueError,  # itf.StaleDatasetError
                     match=r"option split_fractions: \(1\.0, 0\.0, 0\.0\) -> \(0\.5, 0\.5, 0\.0\)"):
    F.build(itf.ImageTextFolder, manual, data, config=config((0.5, 0.5, 0.0)))
  # An image file replaced by another one (other size): the catalog text is the same.
  F.write_jpeg(manual / "img" / "p2.jpg", 999, size=64)
  with pytest.raises(ValueError, match=r"referenced image files"):
    F.build(itf.ImageTextFolder, manual, data, config=config((1.0, 0.0, 0.0)))


def test_failed_overwrite_keeps_the_previous_build(tmp_path):
  manual, data = tmp_path / "shop", tmp_path / "data"
  header = "product_id,image,title,brand"
  _write_catalog(manual, header, _shop_rows(8))
  build_data.build("image_text_folder/keep", os.fspath(data), os.fspath(manual))
  # Every new row points at a missing image: the rebuild must fail ...
  _write_catalog(manual, header, _shop_rows(8) + [
      f"m{i},img/missing{i}.jpg,Gone {i},Acme" for i in range(8)])
  with pytest.raises(I.TooManyBadRecordsError):
    build_data.build("image_text_folder/keep", os.fspath(data), os.fspath(manual),
                     overwrite=True)
  # ... and the previous dataset is still there, readable, and the only copy on disk.
  assert sorted(_all_examples(_reader("image_text_folder/keep", data))) == sorted(
      f"p{i}" for i in range(8))
  assert os.listdir(data / "image_text_folder" / "keep") == ["1.0.0"]


def test_reading_a_stale_build_warns(tmp_path, caplog):
  manual, data = tmp_path / "shop", tmp_path / "data"
  header = "product_id,image,title,brand"
  _write_catalog(manual, header, _shop_rows(5))
  build_data.build("image_text_folder/warn", os.fspath(data), os.fspath(manual))
  config = ml_collections.ConfigDict(dict(data=dict(
      name="image_text_folder/warn", data_dir=os.fspath(data), image_size=16,
      text_fields=("title",), tokenizer=dict(kind="clip", path=""), max_len=12)))
  read = lambda: pipeline.make_eval_dataset(config, "train", batch_size=2, process_index=0,
                                            process_count=1)
  with caplog.at_level(logging.WARNING):
    read()
  assert "changed since" not in caplog.text
  _write_catalog(manual, header, _shop_rows(5, titles={0: "New title"}))
  with caplog.at_level(logging.WARNING):
    read()  # What training and evaluation do.
  assert "catalog.csv changed since this dataset was built" in caplog.text
  assert "--overwrite" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # The builder class itself, as a Python user reads.
    itf.ImageTextFolder(config="warn", data_dir=os.fspath(data)).as_dataset(split="train")
  assert "catalog.csv changed since this dataset was built" in caplog.text


# ----------------------------------------------------------------------------------------------
# Item 7: duplicate product ids.
# ----------------------------------------------------------------------------------------------
def test_conflicting_duplicate_ids_are_reported_with_their_rows(tmp_path):
  manual = tmp_path / "shop"
  _write_catalog(manual, "product_id,image,title,brand,split", [
      "sku1,img/a.jpg,Red wool coat,Acme,train",         # row 1
      "sku2,img/b.jpg,Blue shirt,Acme,train",            # row 2
      "sku1,img/a_back.jpg,,,",                          # row 3: blank text -> more views
      "sku1,img/c.jpg,Green dress,Other,test",           # row 4: conflicts with row 1
      "sku3,img/b.jpg,Blue shirt twin,Acme,train",       # row 5: b.jpg is also sku2's
  ])
  builder = F.build(itf.ImageTextFolder, manual, tmp_path / "data", config="dups",
                    max_bad_fraction=0.5)
  got = _all_examples(builder)
  assert sorted(got) == ["sku1", "sku2", "sku3"]
  assert (got["sku1"]["title"], got["sku1"]["brand"]) == ("Red wool coat", "Acme")
  assert len(got["sku1"]["images"]) == 2  # a.jpg + a_back.jpg; not c.jpg.
  assert "test" not in builder.info.splits  # The conflicting row's split was not used.
  rep = F.bad_report(builder)
  conflicts = [s for s in rep["skipped"] if s["ref"].startswith("catalog.csv row 4")]
  assert len(conflicts) == 1, rep["skipped"]
  reason = conflicts[0]["reason"]
  assert "product id 'sku1'" in reason and "catalog.csv row 1 (line 2)" in reason
  for field in ("title 'Red wool coat' vs 'Green dress'", "brand 'Acme' vs 'Other'",
                "split 'train' vs 'test'"):
    assert field in reason
  assert rep["splits"]["catalog"]["record"]["skipped"] == 1
  assert len(rep["skipped"]) == 1  # The consistent duplicate (row 3) is a plain merge.
  shared = [c for c in rep["converted"] if "img/b.jpg" in c["ref"]]
  assert len(shared) == 1 and "sku2" in shared[0]["ref"] and "row 5" in shared[0]["ref"]


# ----------------------------------------------------------------------------------------------
# Item 8: max_bad_fraction over the whole catalog.
# ----------------------------------------------------------------------------------------------
def _small_test_split_catalog(root):
  """61 rows: 40 train, 20 test of which 2 have a missing image, 1 row without text.
  Whole catalog: 3 of 61 records unusable (4.9%); split 'test' alone: 2 of 20 (10%)."""
  rows = [f"t{i},img/t{i}.jpg,Train item {i},train" for i in range(40)]
  rows += [f"s{i},img/{'missing' if i < 2 else ''}s{i}.jpg,Test item {i},test" for i in range(20)]
  rows.append("notext,img/t0.jpg,,train")
  _write_catalog(root, "product_id,image,title,split", rows)


def test_bad_fraction_is_judged_over_the_whole_catalog(tmp_path):
  manual = tmp_path / "shop"
  _small_test_split_catalog(manual)
  builder = F.build(itf.ImageTextFolder, manual, tmp_path / "data", config="whole")
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 40, "test": 18}
  rep = F.bad_report(builder)
  assert rep["splits"]["test"]["record"] == {"ok": 18, "skipped": 2, "fraction": 0.1}
  assert rep["splits"]["train"]["record"] == {"ok": 40, "skipped": 0, "fraction": 0.0}
  assert rep["totals"]["whole catalog"]["record"] == {
      "ok": 58, "skipped": 3, "fraction": round(3 / 61, 6)}
  assert rep["totals"]["whole catalog"]["image"] == {
      "ok": 58, "skipped": 2, "fraction": round(2 / 60, 6)}


def test_too_many_bad_names_the_flag_and_the_splits(tmp_path):
  manual = tmp_path / "shop"
  _small_test_split_catalog(manual)
  with pytest.raises(I.TooManyBadRecordsError) as e:
    F.build(itf.ImageTextFolder, manual, tmp_path / "d1", config="whole", max_bad_fraction=0.04)
  msg = str(e.value)
  assert ("3 of 61 records of the whole catalog were bad (4.9%), more than "
          "max_bad_fraction=4.0%") in msg
  assert "per split: catalog rows 1 of 61, test 2 of 20, train 0 of 40" in msg
  assert "--max_bad_fraction=0.05" in msg and "tfds.builder" not in msg
  assert not (tmp_path / "d1" / "image_text_folder" / "whole" / "1.0.0").exists()
  # Rows are still judged before any image is decoded; that error names the flag too.
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"1 of 61 records in split 'catalog' .*--max_bad_fraction=0\.02"):
    F.build(itf.ImageTextFolder, manual, tmp_path / "d2", config="whole", max_bad_fraction=0.01)


def test_image_fraction_is_judged_over_the_whole_catalog_too(tmp_path):
  rows = [f"v{i},img/v{i}.jpg|img/{'missing' if i < 3 else ''}v{i}_back.jpg,Two views {i},"
          f"{'test' if i < 3 else 'train'}" for i in range(10)]
  _write_catalog(tmp_path / "shop", "product_id,image,title,split", rows)
  with pytest.raises(I.TooManyBadRecordsError,
                     match=r"3 of 20 images of the whole catalog were bad \(15.0%\), more than "
                           r"max_bad_fraction=10.0% \(per split: test 3 of 6, train 0 of 14\)\. "
                           r"Examples: img/missingv0_back.jpg: missing file"):
    F.build(itf.ImageTextFolder, tmp_path / "shop", tmp_path / "data", config="views",
            max_bad_fraction=0.1)


# ----------------------------------------------------------------------------------------------
# Item 13c: encodings of Excel exports.
# ----------------------------------------------------------------------------------------------
_EXCEL_ROWS = [("p0", "img/p0.jpg", "Café crème blouse", "écru"),
               ("p1", "img/p1.jpg", "Żółta sukienka", "żółty"),
               ("p2", "img/p2.jpg", "Plain tee", "white")]


def _unicode_text_export(root, encoding, bom, delimiter="\t", name="catalog.csv"):
  """Writes the catalog as Excel's "Unicode Text" does: `bom` + tab-separated, CRLF lines."""
  for _, image, _, _ in _EXCEL_ROWS:
    F.write_jpeg(os.path.join(root, image), len(image))
  lines = [delimiter.join(("Product ID", "Image", "Title", "Colour Name"))]
  lines += [delimiter.join(r) for r in _EXCEL_ROWS]
  F.write_bytes(os.path.join(root, name), bom + ("\r\n".join(lines) + "\r\n").encode(encoding))


def test_utf16_excel_unicode_text_catalog_builds(tmp_path):
  manual = tmp_path / "shop"
  _unicode_text_export(manual, "utf-16-le", codecs.BOM_UTF16_LE)
  builder = F.build(itf.ImageTextFolder, manual, tmp_path / "data",
                    config=itf.ImageTextFolderConfig(name="excel", split_fractions=(1, 0, 0)))
  assert "colour_name" in builder.info.features.keys()
  got = {e["product_id"]: e for e in F.read(builder, "train")}
  assert {p: (e["title"], e["colour_name"]) for p, e in got.items()} == {
      p: (t, c) for p, _, t, c in _EXCEL_ROWS}
  notes = [c["reason"] for c in F.bad_report(builder)["converted"]]
  assert "read as UTF-16 LE (byte-order mark), tab-separated" in notes


@pytest.mark.parametrize("encoding, bom, delimiter, note", [
    ("utf-16-be", codecs.BOM_UTF16_BE, "\t", "read as UTF-16 BE (byte-order mark), tab-separated"),
    ("utf-8", codecs.BOM_UTF8, "\t", "read as UTF-8 (byte-order mark), tab-separated"),
    ("utf-8", codecs.BOM_UTF8, ";", "read as UTF-8 (byte-order mark), ';'-separated"),
    ("utf-16-le", b"", "\t",
     "read as UTF-16 LE (no byte-order mark: guessed from its NUL bytes), tab-separated"),
])
def test_catalog_encodings_and_delimiters_are_detected(tmp_path, encoding, bom, delimiter, note):
  _unicode_text_export(tmp_path, encoding, bom, delimiter)
  path = os.fspath(tmp_path / "catalog.csv")
  assert itf.catalog_header(path) == ["Product ID", "Image", "Title", "Colour Name"]
  bad = I.BadRecords("t")
  rows = [row for _, row in itf.read_catalog(path, bad)]
  assert [tuple(r.values()) for r in rows] == _EXCEL_ROWS
  assert [c["reason"] for c in bad.converted] == [note]


def test_undecodable_utf16_says_what_was_found(tmp_path):
  # A UTF-16 BOM followed by an odd number of bytes (a truncated copy).
  F.write_bytes(tmp_path / "catalog.csv",
                codecs.BOM_UTF16_LE + "image\ttitle\r\n".encode("utf-16-le") + b"a")
  with pytest.raises(ValueError,
                     match=r"UTF-16 LE \(byte-order mark\).*iconv -f UTF-16LE -t UTF-8"):
    itf.catalog_header(os.fspath(tmp_path / "catalog.csv"))


def test_jsonl_with_utf8_bom_keeps_its_first_line(tmp_path):
  F.write_bytes(tmp_path / "catalog.jsonl", codecs.BOM_UTF8 + "\n".join(
      json.dumps({"image": f"img/p{i}.jpg", "title": f"t{i}"}) for i in range(3)).encode())
  bad = I.BadRecords("t")
  rows = [row for _, row in itf.read_catalog(os.fspath(tmp_path / "catalog.jsonl"), bad)]
  assert [r["title"] for r in rows] == ["t0", "t1", "t2"] and bad.skipped == []
  assert itf.catalog_header(os.fspath(tmp_path / "catalog.jsonl")) == ["image", "title"]
