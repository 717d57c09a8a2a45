"""Text-guided image retrieval on FashionIQ-format data: R@10 / R@50 per category and mean.

Protocol (FashionIQ, as FashionViL / CLIP4Cir report it): for each category c in (dress, shirt,
toptee), every triplet of `split` is a query q = system.tgir_query(reference image, relative
captions joined with ", "); the gallery is every image of the category's image list
(`fashioniq/gallery`, split `{c}_{split}`), embedded with system.embed_images; the target is the
triplet's target asin. Scores are dot products of the L2-normalised vectors (cosines).

Rank (pessimistic ties, as evaluate/retrieval.py): rank = 1 + #{g != target: s(q, g) >= s(q,
target)}. The reference image stays in the gallery (the FashionIQ evaluation of the papers
above does not remove it); `exclude_reference=True` removes it (CIRR's convention).
A target missing from its gallery is an error naming it (the builders keep both consistent).

Metrics: `{split}/tgir/{c}_R@10`, `{c}_R@50`, `{c}_num_queries`, `mean_R@10`, `mean_R@50`
(means over categories) and `mean` = (mean_R@10 + mean_R@50) / 2 (the "Mean" column of
FashionViL's Table 2).
"""

from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from fashion_jax.data import downstream as data_lib
from fashion_jax.data import pipeline
from fashion_jax.data import tokenizers
from fashion_jax.evaluate import batched

CATEGORIES = ("dress", "shirt", "toptee")


def target_ranks(scores: np.ndarray, target: np.ndarray,
                 exclude: np.ndarray | None = None) -> np.ndarray:
  """Pessimistic 1-based rank of column target[q] in row q of scores [Q, G] -> int [Q].

  exclude: optional int [Q] column per query left out of the ranking (-1 = none).
  """
  scores = np.asarray(scores)
  target = np.asarray(target)
  q = np.arange(scores.shape[0])
  pos = scores[q, target][:, None]
  ahead = scores >= pos
  ahead[q, target] = False
  if exclude is not None:
    exclude = np.asarray(exclude)
    rows = exclude >= 0
    ahead[q[rows], exclude[rows]] = False
  return 1 + ahead.sum(1)


def recall_at(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """{'R@K': mean(ranks <= K)}."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("recall_at got 0 ranks.")
  return {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}


class Evaluator:
  """TGIR on one split of FashionIQ-format data (see the module docstring)."""

  def __init__(self, system, config, mesh=None, *, split: str = "validation",
               categories: Sequence[str] = CATEGORIES, ks: Sequence[int] = (10, 50),
               batch_size: int = 64, exclude_reference: bool = False):
    self.system, self.config = system, config
    self.split, self.categories, self.ks = split, tuple(categories), tuple(ks)
    self.exclude_reference = exclude_reference
    self.apply = batched.BatchedApply(mesh, batch_size)
    data = config.data
    self.size = int(data.image_size)
    self.tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
    self.triplets = data_lib.builder(data.name, data.data_dir)
    self.gallery = data_lib.builder(data.gallery, data.data_dir)

  def _batches(self, b, split, image_key, fields):
    size = self.size
    ds = b.as_dataset(split=split, shuffle_files=False,
                      decoders={image_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: {"image": pipeline.resize_center_crop(ex[image_key], size),
                            **{f: ex[f] for f in fields}})
    return ds.batch(self.apply.batch_size).as_numpy_iterator()

  def _gallery(self, params, cat):
    ids, embs = [], []
    for batch in self._batches(self.gallery, f"{cat}_{self.split}", "image", ("image_id",)):
      embs.append(self.apply.run(self.system.embed_images, params, batch["image"]))
      ids += [x.decode() for x in batch["image_id"]]
    if not ids:
      raise ValueError(f"The {cat}_{self.split} gallery of {self.config.data.gallery} is empty.")
    return ids, np.concatenate(embs)

  def run(self, params) -> dict[str, float]:
    queries = {c: ([], [], []) for c in self.categories}  # embeddings, target ids, ref ids
    for batch in self._batches(self.triplets, self.split, "candidate_image",
                               ("category", "caption", "target_id", "candidate_id")):
      ids, mask = self.tok([x.decode() for x in batch["caption"]], with_mask=True)
      q = self.apply.run(self.system.tgir_query, params, batch["image"], ids, mask)
      for i, c in enumerate(batch["category"]):
        c = c.decode()
        if c in queries:
          queries[c][0].append(q[i])
          queries[c][1].append(batch["target_id"][i].decode())
          queries[c][2].append(batch["candidate_id"][i].decode())
    prefix = f"{self.split}/tgir"
    out, means = {}, {k: [] for k in self.ks}
    for c in self.categories:
      q, targets, refs = queries[c]
      if not q:
        raise ValueError(f"No {c} triplets in {self.config.data.name}:{self.split}.")
      ids, gallery = self._gallery(params, c)
      index = {a: i for i, a in enumerate(ids)}
      missing = [t for t in targets if t not in index]
      if missing:
        raise ValueError(f"{len(missing)} {c} targets are not in the {c}_{self.split} gallery "
                         f"(first: {missing[0]!r}).")
      exclude = None
      if self.exclude_reference:
        exclude = np.asarray([index.get(r, -1) for r in refs])
      ranks = target_ranks(np.stack(q) @ gallery.T, np.asarray([index[t] for t in targets]),
                           exclude)
      for k, v in recall_at(ranks, self.ks).items():
        out[f"{prefix}/{c}_{k}"] = v
        means[int(k[2:])].append(v)
      out[f"{prefix}/{c}_num_queries"] = float(len(q))
    for k in self.ks:
      out[f"{prefix}/mean_R@{k}"] = float(np.mean(means[k]))
    out[f"{prefix}/mean"] = float(np.mean([out[f"{prefix}/mean_R@{k}"] for k in self.ks]))
    return out
