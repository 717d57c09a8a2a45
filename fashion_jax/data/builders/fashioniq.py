"""FashionIQ (Wu et al. 2021) for text-guided image retrieval, as TFDS triplets and galleries.

Build (offline):
  python -m launch.build_data --dataset=fashioniq/triplets --manual_dir=/data/fashioniq
  python -m launch.build_data --dataset=fashioniq/gallery --manual_dir=/data/fashioniq

manual_dir layout (the public release, https://github.com/XiaoxiaoGuo/fashion-iq, with the
images fetched by its download script):
  captions/cap.{dress,shirt,toptee}.{train,val,test}.json
      [{"candidate": asin, "target": asin, "captions": [str, str]}, ...]
  image_splits/split.{dress,shirt,toptee}.{train,val,test}.json   [asin, ...]
  images/<asin>.jpg          (.jpeg / .png also accepted)

Configs and splits (split names map the release's train/val/test to train/validation/test):
  triplets (default)  splits train, validation, test. One example per caption pair:
      category        "dress" | "shirt" | "toptee"
      candidate_id, candidate_image   the reference image (asin, JPEG)
      target_id, target_image         the image the text asks for
      captions        Sequence(Text): the relative captions, in file order, empty ones dropped
      caption         Text: the non-empty captions joined with ", " (FashionViL's query text)
  gallery             splits {dress,shirt,toptee}_{train,validation,test}: every image listed in
      image_splits/split.{cat}.{split}.json, fields image_id, category, image. The evaluation
      target gallery: R@10 / R@50 of each category's validation triplets rank its
      `{cat}_validation` gallery (the protocol of FashionIQ, CLIP4Cir, FashionViL).

Required files: captions and image_splits for train and val of all three categories. The test
files are optional: their split is built only if present for all three categories and (for
triplets) if the captions carry targets; the public test captions withhold them, in which case
the test split is left out with a log line (that is the release's design, not bad input).

Bad input: a triplet whose candidate or target image is missing or unreadable is skipped and
counted (the public release misses many images: raise max_bad_fraction, e.g.
`tfds.builder("fashioniq/triplets", max_bad_fraction=0.3)`, if yours misses more than 5%); a
triplet whose captions are all empty is skipped; one with a single non-empty caption is kept and
counted as a conversion. Each image's decode outcome is counted once per split.
"""

import collections
import json
import logging
import os

import tensorflow_datasets as tfds

from fashion_jax.data import images as images_lib

CATEGORIES = ("dress", "shirt", "toptee")
_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # ours -> release's name
_OPTIONAL_SPLITS = ("test",)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_WHERE_FROM = ("the FashionIQ release, https://github.com/XiaoxiaoGuo/fashion-iq (captions/ and "
               "image_splits/ from the repository, images/ from its image download script)")
CAPTION_JOINER = ", "


class FashioniqConfig(tfds.core.BuilderConfig):
  """`kind` is "triplets" or "gallery" (see the module docstring)."""

  def __init__(self, *, kind, **kwargs):
    super().__init__(name=kind, **kwargs)
    self.kind = kind


def _image_path(manual_dir, asin):
  """Existing images/<asin>.{jpg,jpeg,png}, or the .jpg path (reported missing later)."""
  for ext in _IMAGE_EXTS:
    path = os.path.join(manual_dir, "images", asin + ext)
    if os.path.isfile(path):
      return path
  return os.path.join(manual_dir, "images", asin + ".jpg")


class Fashioniq(images_lib.BadRecordsBuilderMixin, tfds.core.GeneratorBasedBuilder):
  """FashionIQ triplets (reference image + relative captions -> target) and target galleries."""

  name = "fashioniq"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Triplets and per-category galleries."}
  BUILDER_CONFIGS = [
      FashioniqConfig(kind="triplets", description="(reference, captions, target) triplets"),
      FashioniqConfig(kind="gallery", description="per-category target galleries"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put captions/, image_splits/ and images/ from {_WHERE_FROM} in the manual_dir.")
  IMAGE_CACHE_SIZE = 4096  # Encoded JPEGs kept in memory: triplets reuse images a lot.

  def _info(self):
    text, image = tfds.features.Text(), tfds.features.Image(shape=(None, None, 3),
                                                            encoding_format="jpeg")
    if self.builder_config.kind == "triplets":
      features = {
          "category": text, "candidate_id": text, "candidate_image": image,
          "target_id": text, "target_image": image,
          "captions": tfds.features.Sequence(tfds.features.Text()), "caption": text}
    else:
      features = {"image_id": text, "category": text, "image": image}
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/XiaoxiaoGuo/fashion-iq")

  # Files ---------------------------------------------------------------------------------------
  def _files(self, manual_dir, split):
    """{cat: (captions path, image split path)} for a split, or None for a missing test split."""
    rel = {cat: (f"captions/cap.{cat}.{_SPLITS[split]}.json",
                 f"image_splits/split.{cat}.{_SPLITS[split]}.json") for cat in CATEGORIES}
    if split in _OPTIONAL_SPLITS and not all(
        os.path.isfile(os.path.join(manual_dir, p)) for pair in rel.values() for p in pair):
      return None
    return {cat: tuple(images_lib.require_manual_file(manual_dir, p, self.name, _WHERE_FROM)
                       for p in pair) for cat, pair in rel.items()}

  @staticmethod
  def _load_json_list(path):
    with open(path, "rb") as f:
      try:
        data = json.loads(f.read().decode("utf-8-sig"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise images_lib.BadInputFileError(
            f"fashioniq: {path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, list):
      raise images_lib.BadInputFileError(
          f"fashioniq: {path} should hold a JSON list, got {type(data).__name__}")
    return data

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    generators = {}
    for split in _SPLITS:
      files = self._files(manual_dir, split)
      if files is None:
        logging.warning("fashioniq: no %s files for all of %s; split not built.", split,
                        CATEGORIES)
        continue
      if self.builder_config.kind == "triplets":
        triplets = {cat: self._load_json_list(cap) for cat, (cap, _) in files.items()}
        if split in _OPTIONAL_SPLITS and not any(
            isinstance(t, dict) and t.get("target") for ts in triplets.values() for t in ts):
          logging.warning("fashioniq: the %s captions carry no targets (withheld in the public "
                          "release); split not built.", split)
          continue
        generators[split] = self._generate_examples(split, manual_dir, triplets=triplets)
      else:
        for cat, (_, image_split) in files.items():
          generators[f"{cat}_{split}"] = self._generate_examples(
              f"{cat}_{split}", manual_dir, gallery=(cat, self._load_json_list(image_split)))
    return generators

  # Generators ---------------------------------------------------------------------------------
  def _generate_examples(self, split, manual_dir, triplets=None, gallery=None):
    """Triplets ({cat: caption entries}) or one gallery ((cat, asins)) of one split."""
    if triplets is not None:
      return self._generate_triplets(split, manual_dir, triplets)
    return self._generate_gallery(split, manual_dir, *gallery)

  def _image_loader(self, split, manual_dir):
    """Returns asin -> JPEG bytes or None; each image's outcome is counted once per split."""
    cache = collections.OrderedDict()  # LRU of encoded JPEGs.
    decoded_ok = {}  # asin -> bool, for every asin tried in this split.

    def load(asin):
      if asin in cache:
        cache.move_to_end(asin)
        return cache[asin]
      if decoded_ok.get(asin) is False:
        return None
      path = _image_path(manual_dir, asin)
      if asin in decoded_ok:  # Decoded fine before, evicted since: no second count.
        jpeg = images_lib.to_jpeg(path)[0]
      else:
        jpeg = images_lib.load_image(path, self.bad_records, split,
                                     os.path.relpath(path, manual_dir))
        decoded_ok[asin] = jpeg is not None
        if jpeg is None:
          return None
      cache[asin] = jpeg
      if len(cache) > self.IMAGE_CACHE_SIZE:
        cache.popitem(last=False)
      return jpeg
    return load

  def _generate_triplets(self, split, manual_dir, triplets_by_cat):
    bad = self.bad_records
    load = self._image_loader(split, manual_dir)
    for cat, triplets in triplets_by_cat.items():
      fname = f"captions/cap.{cat}.{_SPLITS[split]}.json"
      for i, t in enumerate(triplets):
        ref = f"{fname}[{i}]"
        if not isinstance(t, dict):
          bad.skip(split, ref, f"entry is {type(t).__name__}, not an object")
          continue
        cand, target = str(t.get("candidate") or ""), str(t.get("target") or "")
        if not cand or not target:
          bad.skip(split, ref, f"missing {'candidate' if not cand else 'target'} asin")
          continue
        raw = t.get("captions")
        raw = raw if isinstance(raw, list) else ([raw] if isinstance(raw, str) else [])
        captions = [images_lib.clean_text(c) for c in raw if isinstance(c, str)]
        captions = [c for c in captions if c]
        if not captions:
          bad.skip(split, ref, "no non-empty caption")
          continue
        if len(captions) < len(raw):
          bad.convert(split, ref, f"kept {len(captions)} of {len(raw)} captions (others empty)")
        cand_jpeg = load(cand)
        target_jpeg = load(target)
        if cand_jpeg is None or target_jpeg is None:
          which = "candidate" if cand_jpeg is None else "target"
          asin = cand if cand_jpeg is None else target
          bad.skip(split, ref, f"{which} image {asin} missing or unreadable")
          continue
        bad.ok(split)
        yield f"{cat}/{i}", {
            "category": cat, "candidate_id": cand, "candidate_image": cand_jpeg,
            "target_id": target, "target_image": target_jpeg,
            "captions": captions, "caption": CAPTION_JOINER.join(captions)}
    bad.check(split)

  def _generate_gallery(self, split, manual_dir, cat, asins):
    bad = self.bad_records
    seen = set()
    for asin in asins:
      asin = str(asin)
      if asin in seen:  # Duplicates in a split list would duplicate tfds keys.
        continue
      seen.add(asin)
      path = _image_path(manual_dir, asin)
      jpeg = images_lib.load_image(path, bad, split, os.path.relpath(path, manual_dir))
      if jpeg is None:
        bad.skip(split, f"image_splits/split.{cat}.*.json: {asin}", "image missing or unreadable")
        continue
      bad.ok(split)
      yield asin, {"image_id": asin, "category": cat, "image": jpeg}
    bad.check(split)
