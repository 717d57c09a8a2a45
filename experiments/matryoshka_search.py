r"""Matryoshka search: HITS@K and bytes per product of a run's prefix indexes and funnels.

    python -m experiments.matryoshka_search --model=runs/fsiglip_smoke \
        --dataset=synthetic_catalog/smoke --split=test [--data_dir=DIR] [--dims=32,64,0] \
        [--shortlists=10,25,50] [--ks=1,5,10]

One exact index per width (--dims; default the run's model.matryoshka_dims, 0 = full), then a
funnel for each --shortlists entry: the smallest width's index, its shortlist re-scored at the
full width (`launch.search build --dim=m --rerank_dim=D`, `--shortlist=S`). Each product's own
text (the evaluator's text fields) is a query, so an index's HITS@K is the retrieval
evaluator's full-candidate t2i R@K at that width (`ProductIndex.text_query_hits`). The model
embeds the split once; the indexes are cut from those embeddings exactly as `build` cuts them.
Prints a markdown table: what each row is, the float32 bytes it keeps per product (index, plus
the funnel's rerank vectors), and HITS@K.
"""

from absl import app
from absl import flags

from fashion_jax.search import encoders
from fashion_jax.search import products

_MODEL = flags.DEFINE_string("model", None, "Training workdir (or exported directory).")
_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/smoke", "TFDS NAME[/CONFIG].")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose products are indexed and queried.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = tfds's default).")
_DIMS = flags.DEFINE_list("dims", None, "Widths (0 = full); default: the run's matryoshka_dims.")
_SHORTLISTS = flags.DEFINE_list("shortlists", ["10", "25", "50"], "Funnel shortlists.")
_KS = flags.DEFINE_list("ks", ["1", "5", "10"], "K of HITS@K.")
flags.mark_flags_as_required(["model"])


def main(argv):
  del argv
  enc = encoders.load_encoder(_MODEL.value)
  full = products.build_product_index(enc, _DATASET.value, _SPLIT.value,
                                      data_dir=_DATA_DIR.value, thumb_size=0)
  width = full.dim
  dims = [int(d) or width for d in (_DIMS.value or enc.matryoshka_dims or (0,))]
  ks = [int(k) for k in _KS.value]
  queries = enc.embed_texts(full.query_texts())
  vectors = full.index.reconstruct()
  rows = []

  def measure(name, index, bytes_per_product, **kwargs):
    hits = [index.text_query_hits(enc, k=k, queries=queries, **kwargs)[f"HITS@{k}"] for k in ks]
    rows.append((name, bytes_per_product, hits))

  def cut(dim, rerank_dim=0):
    """The index `build --dim=dim --rerank_dim=rerank_dim` makes, from the same embeddings."""
    return products.index_vectors(vectors, full.products, full.meta, dim=dim,
                                  rerank_dim=rerank_dim, trained=enc.matryoshka_dims)

  for dim in sorted(set(dims)):
    measure(f"`--dim={dim}`" if dim != width else f"full width ({width})", cut(dim), 4 * dim)
  small = min(dims)
  if small < width:
    funnel = cut(small, width)
    for shortlist in (int(s) for s in _SHORTLISTS.value):
      measure(f"`--dim={small} --rerank_dim={width}`, `--shortlist={shortlist}`", funnel,
              4 * (small + width), shortlist=shortlist)
  print(f"{_MODEL.value}, {_DATASET.value}:{_SPLIT.value}, {len(full)} products, exact "
        "indexes, each product's text as the query\n")
  print("| index | float32 bytes / product | " + " | ".join(f"HITS@{k}" for k in ks) + " |")
  print("|---|---|" + "---|" * len(ks))
  for name, nbytes, hits in rows:
    print(f"| {name} | {nbytes} | " + " | ".join(f"{h:.3f}" for h in hits) + " |")


if __name__ == "__main__":
  app.run(main)
