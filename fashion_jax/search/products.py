"""A searchable product catalog: image embeddings in a vector index plus what to show.

Build: every product of one split of a TFDS product dataset (synthetic_catalog, fashiongen,
image_text_folder/<your shop>, ...) is read by the evaluation pipeline
(`fashion_jax.data.pipeline.make_eval_dataset`: first view, short side -> S, centre crop, in split
order), its image embedded by the model (`encoders.Encoder`), and the embeddings [N, D] put in a
vector index of any `index.KINDS` (exact, or FAISS IVF-Flat / IVF-PQ / HNSW). Row i of the index
is product i of the split (the dataset `index`), as in the retrieval evaluator.

A smaller index (Matryoshka): with `dim=m` the index holds the first m coordinates of each image
embedding, re-L2-normalised (`losses.matryoshka.truncate_and_normalize`, the cut the trainer's
loss and the retrieval evaluator's `@d<m>` metrics use), so an index of a model trained with
`model.matryoshka_dims` containing m ranks exactly as the evaluator's width-m retrieval, in
m/D of the memory. Query embeddings at the model's width D are cut the same way before the
search (`ProductIndex.index_queries`); ones already m wide are used as they are. A width the
model was not trained at (or any width of a model trained without Matryoshka) is allowed with a
logged warning: its prefixes are not trained to stand alone, so measure them first
(`text_query_hits`, `launch.search evaluate`).

A funnel (Matryoshka's adaptive retrieval): with `rerank_dim=M` (dim < M <= D) the index also
keeps each product's first M coordinates, re-normalised (rerank.npy, float32 [N, M], memory-
mapped when loaded). A query then takes the `shortlist` best products of the small index
(default DEFAULT_SHORTLIST, at least k) and re-orders them by their width-M cosine; with a
shortlist of every product that is exact width-M search. Queries must then come at the model's
width D (or M): an m-wide query cannot be re-scored.

Saved as a directory:
  meta.json        model path, dataset, split, dim (the index's width m), model_dim (the
                   model's width D; equal unless built with dim=m) and rerank_dim (M, 0 = no
                   funnel), text fields, counts; the index's `kind` and `index_params` (every
                   build and default search parameter, index.resolve_params); and
                   model_identity: {path, step, fingerprint} of the model that embedded the
                   images (encoders.Encoder.identity)
  index.npz        the exact index (vectors) or our IVF (index.py), or
  index.faiss      a FAISS index in faiss' own format (faiss.write_index; reading it needs the
                   `search` extra, pip install -e .[search])
  products.json    per product: product_id, title and the tag fields the dataset has, plus the
                   text the model's evaluator would pair with it (config.data.text_fields joined)
  thumbs.npy       uint8 [N, t, t, 3] thumbnails for contact sheets (optional, --thumb_size)
  rerank.npy       float32 [N, M] width-M vectors of a funnel (optional, rerank_dim)

Query: text, image, or text-modified image (TGIR) -> the k best products with their scores.
Every query first checks that the encoder is the model the index was built with (same params
fingerprint): query embeddings of another model (a newer checkpoint of the same run, another
run) ranked against these image embeddings give plausible-looking but wrong results, so this is
a StaleIndexError saying how to rebuild, unless the index was loaded with
`allow_model_mismatch=True` (`--allow_model_mismatch`), which only warns. Query texts must hold
words (an empty or whitespace-only text is a ValueError, not "any product"); k < 1 is an error
and k above the number of products is capped to it with a logged note (index.resolve_k).
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

from absl import logging
import ml_collections
import numpy as np

from fashion_jax.search import encoders as encoders_lib
from fashion_jax.search import index as index_lib
from fashion_jax.data import pipeline
from fashion_jax.losses import matryoshka

INDEX_FILES = ("index.npz", "index.faiss")
DEFAULT_SHORTLIST = 200  # Products a funnel re-scores per query (MRL's adaptive retrieval: 200).
# A funnel gathers [queries, shortlist, M] float32 rerank vectors; queries go in chunks of at
# most this many bytes of them (100k queries x 200 x 768 at once would be 61 GB).
RERANK_CHUNK_BYTES = 64 << 20
SHOW_FIELDS = ("product_id", "title", "category", "subcategory", "brand", "season", "color")


def join_text(values: Sequence[str]) -> str:
  """The pipeline's text of a product: non-empty fields, stripped of trailing spaces and
  periods, joined with '. ' (fashion_jax.data.pipeline._join_text, in python)."""
  parts = [re.sub(r"[\s.]+$", "", v.strip()) for v in values]
  return ". ".join(p for p in parts if p)


class StaleIndexError(ValueError):
  """The query model is not the model the index was built with (module docstring)."""


class IndexWidthError(ValueError):
  """A bad `dim` / `rerank_dim` for the model's embeddings (module docstring)."""


def _describe(identity: dict[str, Any] | None) -> str:
  if not identity:
    return "a model of unknown identity"
  step = "an exported model" if identity.get("step") is None else f"step {identity['step']}"
  return f"{identity.get('path')} ({step}, params fingerprint {identity.get('fingerprint')})"


def check_query_texts(texts: Sequence[str]) -> list[str]:
  """`texts` as a list; ValueError for a bare string or an empty / whitespace-only text."""
  if isinstance(texts, str):
    raise TypeError(f"texts must be a list of query strings, got the string {texts!r}; pass "
                    f"[{texts!r}].")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f"query text {i} is empty ({t!r}): a text query needs words (an empty "
                       "text would return arbitrary products). Query by image instead, or "
                       "drop it.")
  return texts


@dataclasses.dataclass
class Hit:
  """One result: rank (1-based), score, index row, and the product's fields."""
  rank: int
  score: float
  row: int
  product: dict[str, str]


@dataclasses.dataclass
class ProductIndex:
  """Vector index + product records + thumbnails (module docstring).

  allow_model_mismatch: query with a model other than the index's (warned, not refused).
  directory: where it was loaded from (for messages), or None.
  """
  index: Any
  products: list[dict[str, str]]
  meta: dict[str, Any]
  thumbs: np.ndarray | None = None
  allow_model_mismatch: bool = False
  directory: str | None = None
  rerank: np.ndarray | None = None
  _unchecked_warned: bool = dataclasses.field(default=False, init=False, repr=False)

  def __len__(self) -> int:
    return len(self.products)

  # -- persistence -----------------------------------------------------------------------------
  def save(self, directory: str) -> str:
    """Writes the directory of the module docstring; meta.json's kind / index_params are taken
    from the index itself (`description()`), and an index file of another kind is removed."""
    os.makedirs(directory, exist_ok=True)
    description = self.index.description()
    self.meta.update(kind=description["kind"], index_params=description["params"])
    for name in INDEX_FILES:
      if name != self.index.filename and os.path.exists(os.path.join(directory, name)):
        os.remove(os.path.join(directory, name))
    self.index.save(os.path.join(directory, self.index.filename))
    with open(os.path.join(directory, "products.json"), "w") as f:
      json.dump(self.products, f)
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(self.meta, f, indent=1)
    for name, array in (("thumbs.npy", self.thumbs), ("rerank.npy", self.rerank)):
      path = os.path.join(directory, name)
      if (isinstance(array, np.memmap) and os.path.exists(path)
          and os.path.samefile(array.filename, path)):
        continue  # Loaded (memory-mapped) from this very file: rewriting it would truncate it.
      if array is not None:
        np.save(path, array)
      elif os.path.exists(path):
        os.remove(path)
    return directory

  @classmethod
  def load(cls, directory: str, allow_model_mismatch: bool = False) -> "ProductIndex":
    if not os.path.exists(os.path.join(directory, "meta.json")):
      raise FileNotFoundError(f"{directory} holds no product index (meta.json missing); build one "
                              "with `python -m launch.search build`.")
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
    with open(os.path.join(directory, "products.json")) as f:
      products = json.load(f)
    thumbs = os.path.join(directory, "thumbs.npy")
    kind = meta.get("kind", "exact")
    name = "index.npz" if kind in ("exact", "ivf") else "index.faiss"
    index = index_lib.load_index(os.path.join(directory, name), kind, meta.get("index_params"))
    rerank = os.path.join(directory, "rerank.npy")
    return cls(index, products, meta,
               np.load(thumbs) if os.path.exists(thumbs) else None,
               allow_model_mismatch=allow_model_mismatch, directory=directory,
               rerank=np.load(rerank, mmap_mode="r") if os.path.exists(rerank) else None)

  # -- the model ---------------------------------------------------------------------------------
  def check_model(self, encoder: encoders_lib.Encoder) -> None:
    """Raises StaleIndexError unless `encoder` has the params fingerprint the index was built
    with (module docstring); warns instead with allow_model_mismatch, or when either side
    records no identity (an index built before identities were recorded, a custom Encoder)."""
    built, query = self.meta.get("model_identity"), encoder.identity
    if not built or not query:
      if not self._unchecked_warned:  # Once per index: notebooks query in loops.
        self._unchecked_warned = True
        logging.warning("Cannot check that the query model %s is the one product index %s was "
                        "built with (%s records no model identity); rebuild the index to "
                        "record it.", encoder.name, self.directory or "(in memory)",
                        "the encoder" if built else "the index")
      return
    if built.get("fingerprint") == query.get("fingerprint"):
      return
    where = self.directory or "<index_dir>"
    step = "" if query.get("step") is None else f" --step={query['step']}"
    built_step = "" if built.get("step") is None else f" --step={built['step']}"
    message = (
        f"Product index {where} was built with {_describe(built)}, but the query model is "
        f"{_describe(query)}: its query embeddings would be ranked against the other model's "
        "image embeddings (plausible-looking, wrong results). Rebuild the index with this "
        f"model: python -m launch.search build --model={query.get('path')}{step} "
        f"--dataset={self.meta.get('dataset')} --split={self.meta.get('split')} "
        f"--index_dir={where}; or query with the index's model (--model={built.get('path')}"
        f"{built_step}); or pass --allow_model_mismatch (ProductIndex.load(..., "
        "allow_model_mismatch=True)) to query anyway.")
    if self.allow_model_mismatch:
      logging.warning("%s (allowed by allow_model_mismatch)", message)
      return
    raise StaleIndexError(message)

  def resolve_k(self, k: int) -> int:
    """k capped to the number of products (noted in the log); k < 1 raises ValueError."""
    k, note = index_lib.resolve_k(k, len(self), "indexed products")
    if note:
      logging.warning(note)
    return k

  # -- queries ---------------------------------------------------------------------------------
  @property
  def dim(self) -> int:
    """m: the width of the indexed vectors."""
    return int(self.meta.get("dim", self.index.dim))

  @property
  def model_dim(self) -> int:
    """D: the width of the model's embeddings (= dim unless built with dim=m < D)."""
    return int(self.meta.get("model_dim", self.dim))

  def index_queries(self, query_embeddings: np.ndarray) -> np.ndarray:
    """float [Q, D] or [Q, m] -> float32 [Q, m]: the model's D-wide query embeddings cut to
    the index's first m coordinates and re-normalised (module docstring); m-wide ones as they
    are. Any other width is a ValueError naming both widths."""
    q = np.asarray(query_embeddings, np.float32)
    if q.ndim != 2 or q.shape[1] not in (self.dim, self.model_dim):
      widths = (f"{self.model_dim} (the model's width, cut to the index's first {self.dim}) "
                f"or {self.dim}" if self.dim != self.model_dim else str(self.dim))
      raise ValueError(f"query embeddings of shape {q.shape}: this index takes [Q, {widths}] "
                       "float vectors.")
    return q if q.shape[1] == self.dim else matryoshka.truncate_and_normalize(q, self.dim)

  def _search_rows(self, queries: np.ndarray, k: int, shortlist: int | None = None,
                   **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [Q, k], rows int64 [Q, k], -1 = none) of the index, or of the funnel
    when the index has rerank vectors (module docstring); k already resolved."""
    if self.rerank is None:
      if shortlist is not None:
        raise ValueError(f"shortlist={shortlist!r}: this index has no rerank vectors (build it "
                         "with rerank_dim / --rerank_dim for a funnel).")
      return self.index.search(self.index_queries(queries), k, **kwargs)
    width = self.rerank.shape[1]
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] not in (self.model_dim, width):
      raise ValueError(f"query embeddings of shape {q.shape}: this funnel index re-scores at "
                       f"width {width}, so it takes [Q, {self.model_dim}] (the model's width) "
                       f"or [Q, {width}] float vectors.")
    shortlist = DEFAULT_SHORTLIST if shortlist is None else shortlist
    if isinstance(shortlist, bool) or not isinstance(shortlist, (int, np.integer)) \
        or shortlist < 1:
      raise ValueError(f"shortlist={shortlist!r} must be an int >= 1 (products re-scored per "
                       "query).")
    n = min(max(k, int(shortlist)), len(self))
    _, cand = self.index.search(matryoshka.truncate_and_normalize(q, self.dim), n, **kwargs)
    wide = q if q.shape[1] == width else matryoshka.truncate_and_normalize(q, width)
    found = cand >= 0
    scores = np.empty(cand.shape, np.float32)
    step = max(1, RERANK_CHUNK_BYTES // (4 * n * width))  # Queries per chunk (module constant).
    for i in range(0, len(q), step):
      vectors = np.asarray(self.rerank[np.where(found[i:i + step], cand[i:i + step], 0)])
      scores[i:i + step] = np.einsum("qm,qsm->qs", wide[i:i + step], vectors)
    scores = np.where(found, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.where(np.isfinite(scores), np.take_along_axis(cand, order, axis=1), -1)
    return scores, rows

  def search(self, query_embeddings: np.ndarray, k: int, **kwargs) -> list[list[Hit]]:
    """float [Q, D] (or [Q, m], `index_queries`) -> Q lists of up to k Hits, best first (k
    capped as `resolve_k`).

    The embeddings must come from the index's model; the search_* methods check that.
    kwargs: `shortlist` of a funnel index (module docstring), and the index's search-time
    parameters for this query (index.SEARCH_PARAMS: nprobe, efSearch, refine); a name the
    index's kind does not have is a ValueError naming it."""
    k = self.resolve_k(k)
    scores, rows = self._search_rows(query_embeddings, k, **kwargs)
    return [[Hit(r + 1, float(s), int(i), self.products[int(i)])
             for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
            for srow, irow in zip(scores, rows)]

  def search_text(self, encoder: encoders_lib.Encoder, texts: Sequence[str], k: int = 10,
                  **kwargs) -> list[list[Hit]]:
    """Text queries (each must hold words) -> Q lists of Hits."""
    texts = check_query_texts(texts)
    k = self.resolve_k(k)  # Bad input fails before the model runs.
    self.check_model(encoder)
    return self.search(encoder.embed_texts(texts), k, **kwargs)

  def search_image(self, encoder: encoders_lib.Encoder, images: Sequence[Any], k: int = 10,
                   **kwargs) -> list[list[Hit]]:
    """Images: paths, PIL images or uint8 arrays (any size)."""
    k = self.resolve_k(k)
    self.check_model(encoder)
    x = np.stack([encoders_lib.load_image(im, encoder.image_size) for im in images])
    return self.search(encoder.embed_images(x), k, **kwargs)

  def search_composed(self, encoder: encoders_lib.Encoder, images: Sequence[Any],
                      texts: Sequence[str], k: int = 10, **kwargs) -> list[list[Hit]]:
    """Text-modified image queries (TGIR); raises if the model has none."""
    texts = check_query_texts(texts)
    k = self.resolve_k(k)
    self.check_model(encoder)
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
    caller already has them (float [len(rows), D] or [len(rows), m]). Returns {'HITS@k',
    'num_queries'}.
    """
    rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
    search_k = self.resolve_k(k)
    self.check_model(encoder)
    if queries is None:
      queries = encoder.embed_texts(self.query_texts(fields, rows))
    _, found = self._search_rows(queries, search_k, **kwargs)
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


def check_index_dim(dim: Any, width: int | None = None, trained: Sequence[int] | None = None,
                    model: str = "the model") -> tuple[int, str | None]:
  """(m, warning or None) for an index of the first `dim` coordinates (0 = the full width).

  width: D, the model's embedding width (None: only the type is checked). trained: the widths
  the model was trained at (its matryoshka_dims, 0 = D; () = trained without Matryoshka; None =
  not recorded). IndexWidthError (a ValueError) naming the value for a non-int, a negative dim
  or one above D; the warning (module docstring) for a width the model was not trained at.
  """
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
    raise IndexWidthError(f"dim={dim!r}: the index width must be an int >= 0 (0 = the model's "
                          "full width).")
  if width is None or dim in (0, width):
    return (width or 0) if dim == 0 else int(dim), None
  if dim > width:
    raise IndexWidthError(f"dim={dim} exceeds the width of {model}'s embeddings ({width}): an "
                          f"index holds at most all {width} coordinates (dim=0).")
  cut = f"the first {dim} of its {width} coordinates"
  if trained is None:
    return int(dim), (f"dim={dim}: {model} records no Matryoshka widths, so {cut} may not be "
                      "trained to stand alone; check the index with `launch.search evaluate`.")
  resolved = sorted(width if d == 0 else int(d) for d in trained)
  if not resolved:
    return int(dim), (f"dim={dim}: {model} was trained without Matryoshka "
                      f"(model.matryoshka_dims is empty), so {cut} are not trained to stand "
                      "alone; check the index with `launch.search evaluate`.")
  if dim not in resolved:
    return int(dim), (f"dim={dim} is not one of the widths {model} was trained at {resolved}; "
                      f"{cut} are not trained to stand alone; check the index with "
                      "`launch.search evaluate`.")
  return int(dim), None


def check_widths(dim: Any, rerank_dim: Any, width: int,
                 trained: Sequence[int] | None = None, model: str = "the model",
                 warn: bool = True) -> tuple[int, int]:
  """(m, M) of an index of the first `dim` of `width` coordinates and its funnel's rerank width
  (0 = none): `check_index_dim` for each (its warnings logged when `warn`), and dim < M <= width
  for a funnel, else an IndexWidthError naming rerank_dim."""
  dim, note = check_index_dim(dim, width, trained, model)
  if note and warn:
    logging.warning(note)
  check_index_dim(rerank_dim)
  if not rerank_dim:
    return dim, 0
  if not dim < rerank_dim <= width:
    raise IndexWidthError(f"rerank_dim={rerank_dim}: a funnel re-scores at a width above the "
                          f"index's dim={dim} and at most the model's {width}.")
  rerank_dim, note = check_index_dim(rerank_dim, width, trained, model)
  if note and warn:
    logging.warning("rerank_%s", note)
  return dim, rerank_dim


def index_vectors(vectors: np.ndarray, records: list[dict[str, str]], meta: dict[str, Any], *,
                  kind: str = "exact", dim: int = 0, rerank_dim: int = 0,
                  thumbs: np.ndarray | None = None, trained: Sequence[int] | None = None,
                  warn: bool = True, **index_kwargs) -> ProductIndex:
  """A ProductIndex over the model's unit embeddings `vectors` float [N, D] of `records`: cut to
  `dim` (and `rerank_dim`, a funnel) as the module docstring says, indexed as `kind` with
  index_kwargs. `meta` (model, dataset, ...) is completed with kind, dim, model_dim,
  rerank_dim, num_products and index_params. trained, warn: the model's Matryoshka widths for
  the warnings of `check_widths`, and whether to log them."""
  width = vectors.shape[1]
  dim, rerank_dim = check_widths(dim, rerank_dim, width, trained, meta.get("model", "the model"),
                                 warn)
  rerank = matryoshka.truncate_and_normalize(vectors, rerank_dim) if rerank_dim else None
  if dim != width:
    vectors = matryoshka.truncate_and_normalize(vectors, dim)
  index = index_lib.build_index(vectors, kind, **index_kwargs)
  meta = dict(meta, kind=kind, dim=dim, model_dim=width, rerank_dim=rerank_dim,
              num_products=len(records), index_params=index.description()["params"])
  return ProductIndex(index, records, meta, thumbs, rerank=rerank)


def build_product_index(encoder: encoders_lib.Encoder, dataset: str, split: str, *,
                        data_dir: str = "", kind: str = "exact", thumb_size: int = 64,
                        max_products: int | None = None, batch_size: int = 64, dim: int = 0,
                        rerank_dim: int = 0, **index_kwargs) -> ProductIndex:
  """Embeds every product of `dataset`:`split` and indexes it (module docstring;
  `index_vectors`).

  Args:
    encoder: the model.
    dataset: TFDS name[/config], built in `data_dir` ('' = tfds's default).
    split: e.g. 'test'; tfds slicing ('train[:1000]') works.
    kind: one of index.KINDS; index_kwargs: its parameters (index.PARAM_DEFAULTS[kind]: nlist,
      nprobe, m, nbits, refine, M, efConstruction, efSearch), recorded in meta.json.
    thumb_size: side of the stored thumbnails; 0 = none.
    max_products: stop after this many (None = the whole split).
    batch_size: eval batch size (the retrieval evaluator's default is 64; the same batch shape
      gives bit-identical embeddings).
    dim: index the first `dim` coordinates, re-normalised (module docstring); 0 = all D.
    rerank_dim: M of a funnel (module docstring): dim < M <= D; 0 = no funnel.
  """
  # The types before the catalog is read, the widths at its first batch (warnings once).
  check_index_dim(dim)
  check_index_dim(rerank_dim)
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
    if not embs:
      dim, rerank_dim = check_widths(dim, rerank_dim, e.shape[1], encoder.matryoshka_dims,
                                     encoder.name)
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
  meta = {"model": encoder.name, "system": encoder.system, "dataset": dataset, "split": split,
          "data_dir": data_dir, "image_size": encoder.image_size,
          "text_fields": list(text_fields), "fields": list(fields), "thumb_size": thumb_size,
          "model_identity": encoder.identity}
  # The widths were checked and warned about at the first batch.
  return index_vectors(np.concatenate(embs)[:n], products[:n], meta, kind=kind, dim=dim,
                       rerank_dim=rerank_dim, thumbs=np.stack(thumbs[:n]) if thumbs else None,
                       warn=False, **index_kwargs)
