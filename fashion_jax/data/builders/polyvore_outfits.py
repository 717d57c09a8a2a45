"""Polyvore Outfits (Vasileva et al. 2018) as TFDS items, outfits, FITB and compatibility questions.

Build (offline), one config at a time:
  python -m launch.build_data --dataset=polyvore_outfits/nondisjoint_items --manual_dir=/data/polyvore_outfits
  python -m launch.build_data --dataset=polyvore_outfits/nondisjoint_fitb --manual_dir=/data/polyvore_outfits

manual_dir layout (the public release, https://github.com/mvasil/fashion-compatibility):
  polyvore_item_metadata.json    {item_id: {"semantic_category", "category_id", "title",
                                  "url_name", "description", "catgeories" (sic), ...}}
  images/<item_id>.jpg
  {nondisjoint,disjoint}/{train,valid,test}.json       [{"set_id", "items": [{"item_id",
                                                        "index"}, ...]}, ...]
  {nondisjoint,disjoint}/fill_in_blank_{train,valid,test}.json
      [{"question": ["<set_id>_<index>", ...], "answers": [4 x "<set_id>_<index>"],
        "blank_position": int}, ...]
  {nondisjoint,disjoint}/compatibility_{train,valid,test}.txt
      one outfit per line: "<label 0|1> <set_id>_<index> <set_id>_<index> ..."
(The FITB and compatibility files also live inside the version folder, as in the release.)

Configs: `{version}_{part}` for version in nondisjoint | disjoint and part in
  items          one example per item referenced by the split's outfits, in the product schema:
                 product_id = item_id, images = [the item image], title = title (url_name when the
                 title is empty), description, category = semantic_category, subcategory = the
                 last of `catgeories` (Polyvore's fine category), plus `category_id`. brand,
                 season, composition, gender are '' (Polyvore has none).
  outfits        set_id, item_ids, item_indices (the outfit-local "index" the question files use),
                 categories (semantic categories): for outfit compatibility training; images
                 are joined from the `items` config by item_id.
  fitb           fill-in-the-blank questions: set_id, question_item_ids, question_categories,
                 answer_item_ids (4 candidates), answer_categories, answer_index (the candidate
                 from the question's own outfit, the release's definition of the right answer),
                 blank_position (as in the file). Also the OCIR queries: the blank's category is
                 answer_categories[answer_index].
  compatibility  label (1 compatible / 0 not), item_ids, categories.
Splits: train, validation (<- valid), test. In `disjoint` no item is shared between splits' outfits;
in `nondisjoint` they may be (the usual "Polyvore Outfits" numbers use nondisjoint).

Bad input: an item without metadata or whose image is missing/unreadable is skipped (items) and
counted; an outfit, question or compatibility line that references such an item, or a
"<set_id>_<index>" that no outfit of the split defines, is skipped and counted. The non-item
configs check that the image FILE exists and is non-empty but do not decode it: a present but
corrupt image is dropped only from `items` (and named in its bad_records.json). Items with no text
at all are KEPT (outfit tasks are image-based) and counted as a conversion.
"""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from fashion_jax.data import images as images_lib
from fashion_jax.data import schema

VERSIONS = ("nondisjoint", "disjoint")
PARTS = ("items", "outfits", "fitb", "compatibility")
_SPLITS = {"train": "train", "validation": "valid", "test": "test"}  # ours -> release's name
_WHERE_FROM = ("the Polyvore Outfits release of Vasileva et al. 2018, "
               "https://github.com/mvasil/fashion-compatibility (polyvore_outfits.tar.gz)")
_METADATA = "polyvore_item_metadata.json"


class PolyvoreOutfitsConfig(tfds.core.BuilderConfig):
  """`version_name`: nondisjoint | disjoint; `part`: items | outfits | fitb | compatibility."""

  def __init__(self, *, version_name, part, **kwargs):
    super().__init__(name=f"{version_name}_{part}", **kwargs)
    self.version_name = version_name
    self.part = part


def _load_json(path, dataset="polyvore_outfits"):
  with open(path, "rb") as f:
    try:
      return json.loads(f.read().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise images_lib.BadInputFileError(
          f"{dataset}: {path} is not valid UTF-8 JSON: {e}") from None


class PolyvoreOutfits(images_lib.BadRecordsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """Polyvore Outfits items, outfits, FITB and compatibility questions."""

  name = "polyvore_outfits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "items / outfits / fitb / compatibility for both versions."}
  BUILDER_CONFIGS = [PolyvoreOutfitsConfig(version_name=v, part=p)
                     for v in VERSIONS for p in PARTS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Extract {_WHERE_FROM} into the manual_dir: it must contain {_METADATA}, images/, "
      "nondisjoint/ and disjoint/.")

  def _info(self):
    text = tfds.features.Text()
    texts = tfds.features.Sequence(tfds.features.Text())
    part = self.builder_config.part
    if part == "items":
      features = schema.product_features(extra_text_fields=("category_id",))
    elif part == "outfits":
      features = tfds.features.FeaturesDict({
          "set_id": text, "item_ids": texts, "categories": texts,
          "item_indices": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32))})
    elif part == "fitb":
      features = tfds.features.FeaturesDict({
          "set_id": text, "question_item_ids": texts, "question_categories": texts,
          "answer_item_ids": texts, "answer_categories": texts,
          "answer_index": tfds.features.Scalar(dtype=np.int32),
          "blank_position": tfds.features.Scalar(dtype=np.int32)})
    else:
      features = tfds.features.FeaturesDict({
          "label": tfds.features.Scalar(dtype=np.int32), "item_ids": texts, "categories": texts})
    return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0],
                                 features=features,
                                 homepage="https://github.com/mvasil/fashion-compatibility")

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    req = lambda rel: images_lib.require_manual_file(manual_dir, rel, self.name, _WHERE_FROM)
    version, part = self.builder_config.version_name, self.builder_config.part
    paths = {}
    for split, name in _SPLITS.items():
      paths[split] = {"outfits": req(f"{version}/{name}.json")}
      if part == "fitb":
        paths[split]["questions"] = req(f"{version}/fill_in_blank_{name}.json")
      elif part == "compatibility":
        paths[split]["questions"] = req(f"{version}/compatibility_{name}.txt")
    metadata = _load_json(req(_METADATA), self.name)
    if not isinstance(metadata, dict):
      raise images_lib.BadInputFileError(f"{self.name}: {_METADATA} should map item_id -> metadata")
    return {split: self._generate_examples(split, manual_dir, metadata, p)
            for split, p in paths.items()}

  def _generate_examples(self, split, manual_dir, metadata, paths):
    """Dispatches to the config's part: _generate_{items,outfits,fitb,compatibility}."""
    return getattr(self, f"_generate_{self.builder_config.part}")(split, manual_dir, metadata,
                                                                  paths)

  # Shared --------------------------------------------------------------------------------------
  def _read_outfits(self, split, path):
    """Outfit json -> list of (set_id, [(item_id, index)]), malformed outfits counted."""
    data = _load_json(path, self.name)
    if not isinstance(data, list):
      raise images_lib.BadInputFileError(f"{self.name}: {path} should hold a JSON list of outfits")
    rel = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    outfits = []
    for i, outfit in enumerate(data):
      try:
        set_id = str(outfit["set_id"])
        items = [(str(it["item_id"]), int(it["index"])) for it in outfit["items"]]
      except (KeyError, TypeError, ValueError) as e:
        self.bad_records.skip(split, f"{rel}[{i}]", f"malformed outfit ({type(e).__name__}: {e})")
        continue
      outfits.append((set_id, items))
    return outfits, rel

  def _item_problem(self, manual_dir, metadata, item_id):
    """Why an item cannot be used by an outfit/question (None if it can); no decoding."""
    if item_id not in metadata:
      return f"item {item_id} has no entry in {_METADATA}"
    path = os.path.join(manual_dir, "images", f"{item_id}.jpg")
    if not os.path.isfile(path):
      return f"image images/{item_id}.jpg is missing"
    if os.path.getsize(path) == 0:
      return f"image images/{item_id}.jpg is a zero-byte file"
    return None

  @staticmethod
  def _category(metadata, item_id):
    return images_lib.clean_text(str(metadata[item_id].get("semantic_category") or ""))

  # Items ---------------------------------------------------------------------------------------
  def _generate_items(self, split, manual_dir, metadata, paths):
    bad = self.bad_records
    outfits, rel = self._read_outfits(split, paths["outfits"])
    seen = set()
    for set_id, items in outfits:
      for item_id, _ in items:
        if item_id in seen:
          continue
        seen.add(item_id)
        ref = f"item {item_id} (outfit {set_id} in {rel})"
        meta = metadata.get(item_id)
        if not isinstance(meta, dict):
          bad.skip(split, ref, f"no entry in {_METADATA}")
          continue
        image = images_lib.load_image(os.path.join(manual_dir, "images", f"{item_id}.jpg"), bad,
                                      split, f"images/{item_id}.jpg")
        if image is None:
          bad.skip(split, ref, "image missing or unreadable")
          continue
        field = lambda k: images_lib.clean_text(str(meta.get(k) or ""))
        title = field("title") or field("url_name")
        if field("url_name") and not field("title"):
          bad.convert(split, ref, "empty title: used url_name")
        description = field("description")
        if not title and not description:
          bad.convert(split, ref, "no title, url_name or description: kept without text")
        fine = meta.get("catgeories", meta.get("categories")) or []
        fine = [images_lib.clean_text(str(c)) for c in fine] if isinstance(fine, list) else []
        bad.ok(split)
        yield item_id, {
            "product_id": item_id, "images": [image], "title": title,
            "description": description, "category": field("semantic_category"),
            "subcategory": fine[-1] if fine else "", "category_id": field("category_id"),
            "brand": "", "season": "", "composition": "", "gender": ""}
    bad.check(split)

  # Outfits ------------------------------------------------------------------------------------
  def _generate_outfits(self, split, manual_dir, metadata, paths):
    bad = self.bad_records
    outfits, rel = self._read_outfits(split, paths["outfits"])
    for set_id, items in outfits:
      problems = [p for p in (self._item_problem(manual_dir, metadata, it) for it, _ in items) if p]
      if problems or not items:
        bad.skip(split, f"outfit {set_id} in {rel}", problems[0] if problems else "no items")
        continue
      bad.ok(split)
      yield set_id, {"set_id": set_id, "item_ids": [it for it, _ in items],
                     "item_indices": [idx for _, idx in items],
                     "categories": [self._category(metadata, it) for it, _ in items]}
    bad.check(split)

  # Questions ----------------------------------------------------------------------------------
  def _resolver(self, split, manual_dir, metadata, paths):
    """Returns resolve: "<set_id>_<index>" -> ((set_id, item_id), None) or (None, problem)."""
    outfits, rel = self._read_outfits(split, paths["outfits"])
    lookup = {f"{set_id}_{idx}": (set_id, it) for set_id, items in outfits for it, idx in items}

    def resolve(key):
      key = str(key)
      if key not in lookup:
        return None, f"{key!r} is not an item of any outfit in {rel}"
      set_id, item_id = lookup[key]
      problem = self._item_problem(manual_dir, metadata, item_id)
      return (None, problem) if problem else ((set_id, item_id), None)
    return resolve

  def _generate_fitb(self, split, manual_dir, metadata, paths):
    bad = self.bad_records
    resolve = self._resolver(split, manual_dir, metadata, paths)
    questions = _load_json(paths["questions"], self.name)
    if not isinstance(questions, list):
      raise images_lib.BadInputFileError(
          f"{self.name}: {paths['questions']} should hold a JSON list of questions")
    rel = os.path.relpath(paths["questions"], manual_dir)
    for i, q in enumerate(questions):
      ref = f"{rel}[{i}]"
      try:
        question, answers = list(q["question"]), list(q["answers"])
        blank = int(q.get("blank_position", -1))
      except (KeyError, TypeError, ValueError) as e:
        bad.skip(split, ref, f"malformed question ({type(e).__name__}: {e})")
        continue
      resolved = [resolve(k) for k in question + answers]
      problem = next((p for _, p in resolved if p), None)
      if problem or not question or not answers:
        bad.skip(split, ref, problem or "empty question or answers")
        continue
      q_items = [r for r, _ in resolved[:len(question)]]
      a_items = [r for r, _ in resolved[len(question):]]
      set_id = q_items[0][0]
      right = [j for j, (s, _) in enumerate(a_items) if s == set_id]
      if len(right) != 1:
        bad.skip(split, ref, f"{len(right)} answers come from the question's outfit {set_id} "
                             "(expected exactly 1)")
        continue
      bad.ok(split)
      yield f"{i}", {
          "set_id": set_id,
          "question_item_ids": [it for _, it in q_items],
          "question_categories": [self._category(metadata, it) for _, it in q_items],
          "answer_item_ids": [it for _, it in a_items],
          "answer_categories": [self._category(metadata, it) for _, it in a_items],
          "answer_index": right[0], "blank_position": blank}
    bad.check(split)

  def _generate_compatibility(self, split, manual_dir, metadata, paths):
    bad = self.bad_records
    resolve = self._resolver(split, manual_dir, metadata, paths)
    rel = os.path.relpath(paths["questions"], manual_dir)
    with open(paths["questions"], "rb") as f:
      lines = f.read().decode("utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, start=1):
      fields = line.split()
      if not fields:
        continue
      ref = f"{rel} line {lineno}"
      if fields[0] not in ("0", "1") or len(fields) < 2:
        bad.skip(split, ref, f"expected '<0|1> <set_id>_<index> ...', got {line[:80]!r}")
        continue
      resolved = [resolve(k) for k in fields[1:]]
      problem = next((p for _, p in resolved if p), None)
      if problem:
        bad.skip(split, ref, problem)
        continue
      bad.ok(split)
      item_ids = [it for (_, it), _ in resolved]
      yield f"{lineno}", {"label": int(fields[0]), "item_ids": item_ids,
                          "categories": [self._category(metadata, it) for it in item_ids]}
    bad.check(split)
