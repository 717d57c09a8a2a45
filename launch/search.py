r"""Product search: build an index of a catalog's image embeddings, then query it.

    # 1. Index the test split of the synthetic catalog with a trained run (or an exported
    #    CLIPModel directory, or your own `image_text_folder/<shop>` dataset).
    python -m launch.search build --model=runs/fashionclip_smoke \
        --dataset=synthetic_catalog/smoke --split=test --index_dir=runs/search_test
    # 2. Text, image and text-modified image (TGIR, FashionViL runs) queries; top-k printed,
    #    and optionally drawn as a contact sheet (.png or .html).
    python -m launch.search query --index_dir=runs/search_test \
        --text="red checked trousers" --text="black leather tote bag" --k=8 --out=/tmp/q.png
    python -m launch.search query --index_dir=runs/search_test --image=shoe.jpg --k=8
    # 3. Each indexed product's own text as a query: HITS@K, which equals the evaluator's
    #    full-candidate t2i R@K of the same model on the same split (exact index).
    python -m launch.search evaluate --index_dir=runs/search_test --k=10

Index kinds (`--kind`): exact (default; brute force, the evaluator's top-k code), the FAISS
approximate indexes ivf_flat, ivf_pq and hnsw (the `search` extra: pip install -e .[search]),
for catalogs of millions, or ivf (our own IVF: faster than faiss only for large query batches at
nprobe >= 16; docs/search.md). `--params=name=value,...` sets their parameters at build (names and
defaults: fashion_jax/search/index.py PARAM_DEFAULTS, e.g. --params=nlist=4096,nprobe=32 or
--params=M=32,efConstruction=200,efSearch=64), all recorded in meta.json; at query / evaluate
time it overrides the search-time ones for that run (--params=nprobe=64, --params=efSearch=256).
Their recall against exact search: `evaluate --recall_vs_exact`, and benchmarks/benchmark_search.py.

The model used for queries is loaded from the path the index was built with (meta.json) unless
--model is given, at its newest checkpoint unless --step is given. The index records the
identity of the model that embedded its images (path, step, params fingerprint): `query` and
`evaluate` with any other params (typically: the run trained on after the index was built) are
refused with a message giving the build command that refreshes the index, or the --step that
matches it; --allow_model_mismatch queries anyway (with a warning). A --text must hold words;
--k above the number of indexed products is capped to it (with a note), --k < 1 is an error.
"""

import json
import sys

from absl import app
from absl import flags

from fashion_jax.search import encoders
from fashion_jax.search import index as index_lib
from fashion_jax.search import products
from fashion_jax.search import sheet

_MODEL = flags.DEFINE_string("model", None, "Training workdir or exported CLIPModel directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: newest).")
_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/smoke", "TFDS NAME[/CONFIG].")
_SPLIT = flags.DEFINE_string("split", "test", "Split to index (tfds slicing allowed).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = tfds's default).")
_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Directory of the product index.")
_KIND = flags.DEFINE_enum("kind", "exact", list(index_lib.KINDS), "Index kind (build).")
_PARAMS = flags.DEFINE_list(
    "params", [], "name=value,...: build: the index's parameters (index.PARAM_DEFAULTS[kind]); "
    "query/evaluate: search-time overrides (nprobe; efSearch; refine).")
_THUMB = flags.DEFINE_integer("thumb_size", 64, "Thumbnail side stored for sheets (0 = none).")
_DIM = flags.DEFINE_integer("dim", 0, "build: index the first DIM coordinates of each embedding, "
                            "re-normalised (a Matryoshka model's smaller index; queries are cut "
                            "the same way); 0 = the full width.")
_RERANK_DIM = flags.DEFINE_integer(
    "rerank_dim", 0, "build: also keep each product's first RERANK_DIM coordinates (above --dim, "
    "at most the model's width) and re-score each query's shortlist with them (a Matryoshka "
    "funnel); 0 = none.")
_SHORTLIST = flags.DEFINE_integer(
    "shortlist", None, "query/evaluate on a funnel index (--rerank_dim): products re-scored per "
    f"query (default {products.DEFAULT_SHORTLIST}, at least --k).")
_MAX = flags.DEFINE_integer("max_products", None, "Index at most this many products.")
_TEXT = flags.DEFINE_multi_string("text", [], "Text query (repeatable); with --image: the "
                                  "modification text of a TGIR query.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image query file (repeatable).")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_OUT = flags.DEFINE_string("out", None, "Write the results as a contact sheet (.png / .html).")
_FIELDS = flags.DEFINE_list("fields", None, "evaluate: product fields joined into the query "
                            "(default: the model's text fields, as the evaluator).")
_MAX_QUERIES = flags.DEFINE_integer("max_queries", None, "evaluate: the texts of this many "
                                    "products (drawn with seed 0) are the queries (default: all).")
_RECALL = flags.DEFINE_bool("recall_vs_exact", False, "evaluate: also the approximate index's "
                            "recall@k against exact search, for the same queries.")
_ALLOW_MISMATCH = flags.DEFINE_bool(
    "allow_model_mismatch", False, "query/evaluate: use a model other than the one the index was "
    "built with (another checkpoint step or run) instead of refusing; results are then suspect.")


def parse_params(specs) -> dict[str, int]:
  """['nprobe=32', ...] -> {'nprobe': 32} (names are checked by the index); UsageError for an
  entry that is not name=integer."""
  out = {}
  for spec in specs:
    name, _, value = spec.partition("=")
    try:
      out[name.strip()] = int(value)
    except ValueError:
      raise app.UsageError(f"--params entry {spec!r} is not name=integer.") from None
  return out


def _search_params(index) -> dict[str, int]:
  """--params as search-time overrides, checked against the index's kind."""
  params = parse_params(_PARAMS.value)
  allowed = index_lib.SEARCH_PARAMS[index.meta.get("kind", "exact")]
  bad = sorted(set(params) - set(allowed))
  if bad:
    raise app.UsageError(f"--params: {bad} are not search parameters of this "
                         f"{index.meta.get('kind', 'exact')} index; it has {list(allowed)}.")
  return params


def _shortlist(index) -> dict[str, int]:
  """{'shortlist': --shortlist} for the ProductIndex queries, checked before the model loads."""
  if _SHORTLIST.value is None:
    return {}
  if index.rerank is None:
    raise app.UsageError(f"--shortlist={_SHORTLIST.value}: this index has no rerank vectors "
                         "(build it with --rerank_dim for a funnel).")
  if _SHORTLIST.value < 1:
    raise app.UsageError(f"--shortlist={_SHORTLIST.value} must be >= 1.")
  return {"shortlist": _SHORTLIST.value}


def _load_index():
  try:
    return products.ProductIndex.load(_INDEX_DIR.value,
                                      allow_model_mismatch=_ALLOW_MISMATCH.value)
  except ImportError as e:  # A FAISS index without faiss: the message names the extra.
    sys.exit(f"error: {e}")


def _encoder(index):
  """The query model, checked against the index's (StaleIndexError before any query runs)."""
  enc = encoders.load_encoder(_MODEL.value or index.meta["model"], step=_STEP.value)
  index.check_model(enc)
  return enc


def _k(index) -> int:
  try:
    k, note = index_lib.resolve_k(_K.value, len(index), "indexed products")
  except ValueError as e:
    raise app.UsageError(f"--k: {e}") from e
  if note:
    print(f"note: {note}")
  return k


def build():
  if not _MODEL.value:
    raise app.UsageError("build needs --model (a workdir or an exported model directory).")
  params = parse_params(_PARAMS.value)
  bad = sorted(set(params) - set(index_lib.PARAM_DEFAULTS[_KIND.value]))
  if bad:  # Before the model and the catalog are read.
    raise app.UsageError(f"--params: {bad} are not parameters of --kind={_KIND.value}; it has "
                         f"{list(index_lib.PARAM_DEFAULTS[_KIND.value])}.")
  for flag in (_DIM, _RERANK_DIM):
    try:
      products.check_index_dim(flag.value)
    except ValueError as e:
      raise app.UsageError(f"--{flag.name}: {e}") from e
  if _RERANK_DIM.value and not 0 < _DIM.value < _RERANK_DIM.value:
    raise app.UsageError(f"--rerank_dim={_RERANK_DIM.value} re-scores a smaller index's "
                         f"shortlist: it needs --dim below it (got --dim={_DIM.value}).")
  enc = encoders.load_encoder(_MODEL.value, step=_STEP.value)
  index = products.build_product_index(enc, _DATASET.value, _SPLIT.value,
                                       data_dir=_DATA_DIR.value, kind=_KIND.value,
                                       thumb_size=_THUMB.value, max_products=_MAX.value,
                                       dim=_DIM.value, rerank_dim=_RERANK_DIM.value, **params)
  index.save(_INDEX_DIR.value)
  cut = (f" of the model's {index.model_dim}" if index.dim != index.model_dim else "")
  if index.rerank is not None:
    cut += f", re-scored at {index.rerank.shape[1]}"
  print(f"indexed {len(index)} products of {_DATASET.value}:{_SPLIT.value} ({_KIND.value} "
        f"{index.meta['index_params']}, dim {index.dim}{cut}) -> {_INDEX_DIR.value}")


def query():
  texts, images = _TEXT.value, _IMAGE.value
  if not texts and not images:
    raise app.UsageError("query needs --text and/or --image.")
  try:
    products.check_query_texts(texts)
  except ValueError as e:
    raise app.UsageError(f"--text: {e}") from e
  index = _load_index()
  k = _k(index)
  kw = {**_search_params(index), **_shortlist(index)}
  enc = _encoder(index)
  queries, results = [], []
  if images and texts:  # Text-modified image queries, paired in order.
    if len(images) != len(texts):
      raise app.UsageError(f"TGIR queries pair --image with --text: got {len(images)} images "
                           f"and {len(texts)} texts.")
    results = index.search_composed(enc, images, texts, k, **kw)
    queries = [{"text": t, "image": encoders.load_image(i, 64)} for i, t in zip(images, texts)]
    labels = [f"{i} + {t!r}" for i, t in zip(images, texts)]
  elif texts:
    results = index.search_text(enc, texts, k, **kw)
    queries = [{"text": t, "image": None} for t in texts]
    labels = texts
  else:
    results = index.search_image(enc, images, k, **kw)
    queries = [{"text": None, "image": encoders.load_image(i, 64)} for i in images]
    labels = images
  for label, hits in zip(labels, results):
    print(f"query: {label}")
    for h in hits:
      print(f"  {h.rank:3d}  {h.score:.4f}  {h.product.get('product_id', h.row)}  "
            f"{h.product.get('title', '')}")
  if _OUT.value:
    print("wrote", sheet.write_results(_OUT.value, queries, results, index.thumbs))


def evaluate():
  index = _load_index()
  k = _k(index)
  kw = _search_params(index)
  funnel = _shortlist(index)
  enc = _encoder(index)
  kind = index.meta.get("kind", "exact")
  if _RECALL.value and kind == "exact":
    raise app.UsageError("--recall_vs_exact needs an approximate index (this one is exact).")
  rows = index.sample_rows(_MAX_QUERIES.value)
  params = {n: kw.get(n, index.index.description()["params"][n])
            for n in index_lib.SEARCH_PARAMS[kind]}
  width = (f", dim {index.dim} of {index.model_dim}" if index.dim != index.model_dim else "")
  if index.rerank is not None:
    width += (f", re-scored at {index.rerank.shape[1]} over a shortlist of "
              f"{funnel.get('shortlist', products.DEFAULT_SHORTLIST)}")
  out = {"protocol": f"full ({index.meta['split']}, {len(index)} products, {kind}{width}"
                     f"{' ' + str(params) if params else ''}; queries: {len(rows)} products' "
                     "texts)"}
  full = enc.embed_texts(index.query_texts(_FIELDS.value, rows))
  out.update(index.text_query_hits(enc, _K.value, rows=rows, queries=full, **kw, **funnel))
  if _RECALL.value:  # The approximate index against exact search over the same vectors.
    q = index.index_queries(full)
    exact = index_lib.ExactIndex(index.index.reconstruct())
    _, ids_e, t_e = index_lib.timed_search(exact, q, k)
    _, ids_a, t_a = index_lib.timed_search(index.index, q, k, **kw)
    out.update({f"recall@{k}_vs_exact": index_lib.recall_at_k(ids_a, ids_e), "exact_s": t_e,
                f"{kind}_s": t_a})
  print(json.dumps(out, indent=1))


def main(argv):
  commands = {"build": build, "query": query, "evaluate": evaluate}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m launch.search {{{'|'.join(commands)}}} --flags; "
                         f"got {argv[1:]}")
  if not _INDEX_DIR.value:
    raise app.UsageError("--index_dir is required.")
  try:
    commands[argv[1]]()
  except (products.StaleIndexError, products.IndexWidthError, FileNotFoundError) as e:
    # A stale or missing index, a model or dataset or query image that is not there, an index
    # width the model cannot give: the message names it (and what to run); one line, exit 1.
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
