"""A searchable product catalog: image embeddings in a vector index plus what to show.

Build: every product of one split of a TFDS product dataset (synthetic_catalog, fashiongen,
image_text_folder/<your shop>, ...) is read by the evaluation pipeline
(`fashion_jax.data.pipeline.make_eval_dataset`: first view, short side -> S, centre crop, in split
order), its image embedded by the model (`encoders.Encoder`), and the embeddings [N, D] put in an
exact or IVF index (`index.py`). Row i of the index is product i of the split (the dataset
`index`), as in the retrieval evaluator.

Saved as a directory:
  meta.json        model path, dataset, split, kind, dimension, text fields, counts
  index.npz        the vector index (index.py)
  products.json    per product: product_id, title and the tag fields the dataset has, plus the
                   text the model's evaluator would pair with it (config.data.text_fields joined)
  thumbs.npy       uint8 [N, t, t, 3] thumbnails for contact sheets (optional, --thumb_size)

Query: text, image, or text-modified image (TGIR) -> the k best products with their scores.
`text_query_hits` runs each product's own evaluator text as a query and reports
HITS@K = mean_i [product i in the top K of its text], which for the exact index is the
evaluator's full-candidate t2i HITS@K (= R@K with one image per product) of the same model.
"""

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from fashion_jax.search import encoders as encoders_lib
from fashion_jax.search import index as index_lib

SHOW_FIELDS = ("product_id", "title", "category", "subcategory", "brand", "season", "color")


def join_text(values: Sequence[str]) -> str:
  """The pipeline's text of a product: non-empty fields, stripped of trailing spaces and
  periods, joined with '. ' (fashion_jax.data.pipeline._join_text, in python)."""
  parts = [re.sub(r"[\s.]+$", "", v.strip()) for v in values]
  return ". ".join(p for p in parts if p)


@dataclasses.dataclass
class Hit:
  """One result: rank (1-based), score, index row, and the product's fields."""
  rank: int
  score: float
  row: int
  product: dict[str, str]


@dataclasses.dataclass
class ProductIndex:
  """Vector index + product records + thumbnails (module docstring)."""
  index: Any
  products: list[dict[str, str]]
  meta: dict[str, Any]
  thumbs: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.products)

  # -- persistence -----------------------------------------------------------------------------
  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    self.index.save(os.path.join(directory, "index.npz"))
    with open(os.path.join(directory, "products.json"), "w") as f:
      json.dump(self.products, f)
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(self.meta, f, indent=1)
    thumbs = os.path.join(directory, "thumbs.npy")
    if self.thumbs is not None:
      np.save(thumbs, self.thumbs)
    elif os.path.exists(thumbs):
      os.remove(thumbs)
    return directory

  @classmethod
  def load(cls, directory: str) -> "ProductIndex":
    if not os.path.exists(os.path.join(directory, "meta.json")):
      raise FileNotFoundError(f"{directory} holds no product index (meta.json missing); build one "
                              "with `python -m launch.search build`.")
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
    with open(os.path.join(directory, "products.json")) as f:
      products = json.load(f)
    thumbs = os.path.join(directory, "thumbs.npy")
    return cls(index_lib.load_index(os.path.join(directory, "index.npz")), products, meta,
               np.load(thumbs) if os.path.exists(thumbs) else None)

  # -- queries ---------------------------------------------------------------------------------
  def search(self, query_embeddings: np.ndarray, k: int, **kwargs) -> list[list[Hit]]:
    """float [Q, D] -> Q lists of up to k Hits, best first."""
    k = min(k, len(self))
    scores, rows = self.index.search(np.asarray(query_embeddings, np.float32), k, **kwargs)
    return [[Hit(r + 1, float(s), int(i), self.products[int(i)])
             for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
            for srow, irow in zip(scores, rows)]

  def search_text(self, encoder: encoders_lib.Encoder, texts: Sequence[str], k: int = 10,
                  **kwargs) -> list[list[Hit]]:
    return self.search(encoder.embed_texts(list(texts)), k, **kwargs)

  def search_image(self, encoder: encoders_lib.Encoder, images: Sequence[Any], k: int = 10,
                   **kwargs) -> list[list[Hit]]:
    """Images: paths, PIL images or uint8 arrays (any size)."""
    x = np.stack([encoders_lib.load_image(im, encoder.image_size) for im in images])
    return self.search(encoder.embed_images(x), k, **kwargs)

  def search_composed(self, encoder: encoders_lib.Encoder, images: Sequence[Any],
                      texts: Sequence[str], k: int = 10, **kwargs) -> list[list[Hit]]:
    """Text-modified image queries (TGIR); raises if the model has none."""
    x = np.stack([encoders_lib.load_image(im, encoder.image_size) for im in images])
    return self.search(encoder.composed(x, texts), k, **kwargs)

  def query_texts(self, fields: Sequence[str] | None = None,
                  rows: Sequence[int] | None = None) -> list[str]:
    """The products' own texts (`fields` joined; default meta['text_fields']) as queries.

    rows: which products (default all, in index order).
    """
    fields = tuple(fields or self.meta["text_fields"])
    missing = [f for f in fields if f not in self.products[0]]
    if missing:
      raise KeyError(f"fields {missing} are not stored in this index; it has "
                     f"{sorted(self.products[0])}.")
    rows = range(len(self)) if rows is None else rows
    return [join_text([self.products[r][f] for f in fields]) for r in rows]

  def text_query_hits(self, encoder: encoders_lib.Encoder, k: int = 10,
                      fields: Sequence[str] | None = None, rows: Sequence[int] | None = None,
                      queries: np.ndarray | None = None, **kwargs) -> dict[str, float]:
    """Each product's text as a query; HITS@k = fraction whose own product is in the top k.

    fields: the product fields joined into the query (default: the evaluator's text fields,
    meta['text_fields']); rows: the products whose texts are the queries (default all; a
    subset for large catalogs, see `sample_rows`); queries: their text embeddings when the
    caller already has them (float [len(rows), D]). Returns {'HITS@k', 'num_queries'}.
    """
    rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
    if queries is None:
      queries = encoder.embed_texts(self.query_texts(fields, rows))
    _, found = self.index.search(queries, min(k, len(self)), **kwargs)
    hits = (found == rows[:, None]).any(axis=1)
    return {f"HITS@{k}": float(hits.mean()), "num_queries": float(len(rows))}

  def sample_rows(self, n: int | None, seed: int = 0) -> np.ndarray:
    """n distinct product rows drawn with `seed`, sorted (all rows when n is None or >= size)."""
    if n is None or n >= len(self):
      return np.arange(len(self))
    if n < 1:
      raise ValueError(f"the number of query products must be >= 1, got {n}.")
    return np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.shape[0] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def build_product_index(encoder: encoders_lib.Encoder, dataset: str, split: str, *,
                        data_dir: str = "", kind: str = "exact", thumb_size: int = 64,
                        max_products: int | None = None, batch_size: int = 64,
                        **index_kwargs) -> ProductIndex:
  """Embeds every product of `dataset`:`split` and indexes it (module docstring).

  Args:
    encoder: the model.
    dataset: TFDS name[/config], built in `data_dir` ('' = tfds's default).
    split: e.g. 'test'; tfds slicing ('train[:1000]') works.
    kind: 'exact' or 'ivf'; index_kwargs go to IVFIndex.build (num_lists, nprobe, ...).
    thumb_size: side of the stored thumbnails; 0 = none.
    max_products: stop after this many (None = the whole split).
    batch_size: eval batch size (the retrieval evaluator's default is 64; the same batch shape
      gives bit-identical embeddings).
  """
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({"data": encoder.data_config.to_dict()})
  config.data.name = dataset
  config.data.data_dir = data_dir
  text_fields = tuple(config.data.text_fields)
  probe = pipeline.make_eval_dataset(config, split, batch_size=batch_size, process_index=0,
                                     process_count=1)
  available = set(probe._builder.info.features.keys())  # pylint: disable=protected-access
  fields = tuple(dict.fromkeys(f for f in SHOW_FIELDS + text_fields if f in available))
  batches = pipeline.make_eval_dataset(config, split, batch_size=batch_size, fields=fields,
                                       process_index=0, process_count=1)
  embs, products, thumbs = [], [], []
  for batch in batches:
    valid = np.asarray(batch["valid"])
    # The whole padded batch goes through the model (the evaluator's shapes), then the padding
    # rows are dropped.
    e = encoder.embed_images(batch["image"])[valid]
    embs.append(e)
    for r in np.flatnonzero(valid):
      products.append({f: str(batch[f][r]) for f in fields})
      if thumb_size:
        thumbs.append(_thumbnail(batch["image"][r], thumb_size))
    if max_products and len(products) >= max_products:
      break
  if not products:
    raise ValueError(f"{dataset}:{split} yielded no product.")
  n = min(len(products), max_products or len(products))
  vectors = np.concatenate(embs)[:n]
  index = index_lib.build_index(vectors, kind, **index_kwargs)
  meta = {"model": encoder.name, "system": encoder.system, "dataset": dataset, "split": split,
          "data_dir": data_dir, "kind": kind, "dim": int(vectors.shape[1]), "num_products": n,
          "image_size": encoder.image_size, "text_fields": list(text_fields),
          "fields": list(fields), "thumb_size": thumb_size}
  if kind == "ivf":
    meta.update(num_lists=index.num_lists, nprobe=index.nprobe)
  return ProductIndex(index, products[:n], meta, np.stack(thumbs[:n]) if thumbs else None)
