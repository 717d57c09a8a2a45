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

Index kinds: `--kind=exact` (default; brute force, the evaluator's top-k code) or `--kind=ivf`
(inverted file over spherical k-means lists, `--num_lists`, `--nprobe`; for catalogs of millions;
its recall against exact is measured by launch/benchmark_search.py and by
`evaluate --recall_vs_exact`).

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

_MODEL = flags.DEFINE_string("model", None, "Training workdir or exported CLIPModel directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: newest).")
_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/smoke", "TFDS NAME[/CONFIG].")
_SPLIT = flags.DEFINE_string("split", "test", "Split to index (tfds slicing allowed).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = tfds's default).")
_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Directory of the product index.")
_KIND = flags.DEFINE_enum("kind", "exact", ["exact", "ivf"], "Index kind.")
_NUM_LISTS = flags.DEFINE_integer("num_lists", None, "IVF lists (default 2 sqrt(N)).")
_NPROBE = flags.DEFINE_integer("nprobe", None, "IVF lists scanned per query.")
_THUMB = flags.DEFINE_integer("thumb_size", 64, "Thumbnail side stored for sheets (0 = none).")
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
_RECALL = flags.DEFINE_bool("recall_vs_exact", False, "evaluate: also the IVF recall@k "
                            "against exact search, for the same queries.")
_ALLOW_MISMATCH = flags.DEFINE_bool(
    "allow_model_mismatch", False, "query/evaluate: use a model other than the one the index was "
    "built with (another checkpoint step or run) instead of refusing; results are then suspect.")


def _load_index():
  from fashion_jax.search import products  # pylint: disable=g-import-not-at-top
  return products.ProductIndex.load(_INDEX_DIR.value,
                                    allow_model_mismatch=_ALLOW_MISMATCH.value)


def _encoder(index):
  """The query model, checked against the index's (StaleIndexError before any query runs)."""
  from fashion_jax.search import encoders  # pylint: disable=g-import-not-at-top
  enc = encoders.load_encoder(_MODEL.value or index.meta["model"], step=_STEP.value)
  index.check_model(enc)
  return enc


def _k(index) -> int:
  from fashion_jax.search import index as index_lib  # pylint: disable=g-import-not-at-top
  try:
    k, note = index_lib.resolve_k(_K.value, len(index), "indexed products")
  except ValueError as e:
    raise app.UsageError(f"--k: {e}") from e
  if note:
    print(f"note: {note}")
  return k


def build():
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  if not _MODEL.value:
    raise app.UsageError("build needs --model (a workdir or an exported model directory).")
  ivf = {}
  if _KIND.value == "ivf":
    ivf = {k: v for k, v in (("num_lists", _NUM_LISTS.value), ("nprobe", _NPROBE.value))
           if v is not None}
  elif _NUM_LISTS.value or _NPROBE.value:
    raise app.UsageError("--num_lists/--nprobe apply to --kind=ivf only.")
  enc = encoders.load_encoder(_MODEL.value, step=_STEP.value)
  index = products.build_product_index(enc, _DATASET.value, _SPLIT.value,
                                       data_dir=_DATA_DIR.value, kind=_KIND.value,
                                       thumb_size=_THUMB.value, max_products=_MAX.value, **ivf)
  index.save(_INDEX_DIR.value)
  print(f"indexed {len(index)} products of {_DATASET.value}:{_SPLIT.value} ({_KIND.value}, "
        f"dim {index.meta['dim']}) -> {_INDEX_DIR.value}")


def query():
  from fashion_jax.search import encoders, products, sheet  # pylint: disable=g-import-not-at-top
  texts, images = _TEXT.value, _IMAGE.value
  if not texts and not images:
    raise app.UsageError("query needs --text and/or --image.")
  try:
    products.check_query_texts(texts)
  except ValueError as e:
    raise app.UsageError(f"--text: {e}") from e
  index = _load_index()
  k = _k(index)
  enc = _encoder(index)
  kw = {"nprobe": _NPROBE.value} if _NPROBE.value else {}
  queries, results = [], []
  if images and texts:  # Text-modified image queries, paired in order.
    if len(images) != len(texts):
      raise app.UsageError(f"TGIR queries pair --image with --text: got {len(images)} images "
                           f"and {len(texts)} texts.")
    results = index.search_composed(enc, images, texts, k, **kw)
    queries = [{"text": t, "image": encoders.load_image(i, 64)} for i, t in zip(images, texts)]
  elif texts:
    results = index.search_text(enc, texts, k, **kw)
    queries = [{"text": t, "image": None} for t in texts]
  else:
    results = index.search_image(enc, images, k, **kw)
    queries = [{"text": None, "image": encoders.load_image(i, 64)} for i in images]
  for q, hits in zip(queries, results):
    print(f"query: {q['text'] or ''}{' + image' if q['image'] is not None else ''}")
    for h in hits:
      print(f"  {h.rank:3d}  {h.score:.4f}  {h.product.get('product_id', h.row)}  "
            f"{h.product.get('title', '')}")
  if _OUT.value:
    print("wrote", sheet.write_results(_OUT.value, queries, results, index.thumbs))


def evaluate():
  from fashion_jax.search import index as index_lib  # pylint: disable=g-import-not-at-top
  index = _load_index()
  k = _k(index)
  enc = _encoder(index)
  if _RECALL.value and index.meta["kind"] != "ivf":
    raise app.UsageError("--recall_vs_exact needs an IVF index.")
  kw = {}
  if _NPROBE.value:
    if index.meta["kind"] != "ivf":
      raise app.UsageError("--nprobe applies to an IVF index only.")
    kw["nprobe"] = _NPROBE.value
  rows = index.sample_rows(_MAX_QUERIES.value)
  kind = index.meta["kind"]
  if kind == "ivf":
    kind += f", nprobe {kw.get('nprobe', index.index.nprobe)}"
  out = {"protocol": f"full ({index.meta['split']}, {len(index)} products, {kind}; queries: "
                     f"{len(rows)} products' texts)"}
  q = enc.embed_texts(index.query_texts(_FIELDS.value, rows))
  out.update(index.text_query_hits(enc, _K.value, rows=rows, queries=q, **kw))
  if _RECALL.value:
    exact = index_lib.ExactIndex(index.index.vectors)
    _, ids_e, t_e = index_lib.timed_search(exact, q, k)
    _, ids_a, t_a = index_lib.timed_search(index.index, q, k, **kw)
    out.update({f"recall@{k}_vs_exact": index_lib.recall_at_k(index.index.item_ids[ids_e], ids_a),
                "exact_s": t_e, "ivf_s": t_a})
  print(json.dumps(out, indent=1))


def main(argv):
  commands = {"build": build, "query": query, "evaluate": evaluate}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m launch.search {{{'|'.join(commands)}}} --flags; "
                         f"got {argv[1:]}")
  if not _INDEX_DIR.value:
    raise app.UsageError("--index_dir is required.")
  from fashion_jax.search import products  # pylint: disable=g-import-not-at-top
  try:
    commands[argv[1]]()
  except products.StaleIndexError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
