r"""The README's figures from a trained FashionCLIP run (the quickstart's smoke run).

    bash launch/quickstart.sh runs/fashionclip_smoke          # or any FashionCLIP workdir
    python -m experiments.make_figures --workdir=runs/fashionclip_smoke --out_dir=docs

Writes (each a palette PNG, well under 300 KB), with the numbers printed and saved to
<out_dir>/figures.json:
  search_text_to_image.png  colour and title queries against the test split (launch.search's
                            engine), colour precision@k of each query
  image_to_text.png         test images and the titles they rank first
  zero_shot.png             zero-shot sub-category probabilities (softmax of scale * cos)
  localization.png          occlusion heat maps for each product's title, zero-shot boxes
  embedding_map.png         t-SNE of the test image embeddings by sub-category, silhouette score
                            (and, as a number, the silhouette by colour)
  training_summary.png      learning curves and validation retrieval over steps
                            (fashion_jax.train.plots)
The same functions draw the notebook's figures (fashion_jax/search/figures.py).
"""

import io
import json
import os

from absl import app
from absl import flags

from fashion_jax.checkpoint import restore as checkpoint_restore

_WORKDIR = flags.DEFINE_string("workdir", "runs/fashionclip_smoke", "FashionCLIP training run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to show.")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs", "Where the PNGs go.")
_ROWS = flags.DEFINE_list("rows", ["0", "1", "2", "3", "4", "5"], "Products (rows of the split) "
                          "shown in the image panels.")
_QUERIES = flags.DEFINE_list("queries", ["red", "navy", "yellow", "white", "black leather tote"],
                             "Text queries of the search grid.")


def _save(obj, path):
  """A PIL image or matplotlib figure -> palette PNG at `path`; returns its size in bytes."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(obj, Image.Image):
    buf = io.BytesIO()
    obj.savefig(buf, format="png", dpi=90)
    buf.seek(0)
    obj = Image.open(buf).convert("RGB")
  obj.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
  return os.path.getsize(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fashion_jax.api import FashionCLIP  # pylint: disable=g-import-not-at-top
  from fashion_jax.search import encoders, figures, products  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import plots  # pylint: disable=g-import-not-at-top

  workdir, out_dir = _WORKDIR.value, _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  config = checkpoint_restore.load_workdir_config(workdir)
  data_dir = _DATA_DIR.value if _DATA_DIR.value is not None else config.data.data_dir
  encoder = encoders.load_encoder(workdir)
  index = products.build_product_index(encoder, config.data.name, _SPLIT.value,
                                       data_dir=data_dir)
  numbers, sizes = {"workdir": workdir, "dataset": config.data.name, "split": _SPLIT.value,
                    "num_products": len(index)}, {}

  grid, hits = figures.text_to_image(index, encoder, _QUERIES.value, k=6, cell=80)
  numbers["colour_precision@6"] = {
      q: figures.attribute_precision(h, q.split()[0]) for q, h in zip(_QUERIES.value, hits)}
  sizes["search_text_to_image.png"] = _save(grid, os.path.join(out_dir,
                                                                "search_text_to_image.png"))
  numbers["search_HITS@10"] = index.text_query_hits(encoder, k=10)["HITS@10"]

  rows = [int(r) for r in _ROWS.value]
  images = index.thumbs[rows]
  titles = [p["title"] for p in index.products]
  fig, top = figures.image_to_text(encoder, images, titles, k=3)
  numbers["image_to_text_own_title_top3"] = float(np.mean([r in top[i]
                                                           for i, r in enumerate(rows)]))
  sizes["image_to_text.png"] = _save(fig, os.path.join(out_dir, "image_to_text.png"))

  fclip = FashionCLIP.from_pretrained(workdir)
  labels = sorted({p["subcategory"] for p in index.products})
  fig, probs = figures.zero_shot(fclip, images, labels)
  truth = [labels.index(index.products[r]["subcategory"]) for r in rows]
  numbers["zero_shot_shown_acc"] = float(np.mean(probs.argmax(1) == np.asarray(truth)))
  sizes["zero_shot.png"] = _save(fig, os.path.join(out_dir, "zero_shot.png"))

  fig, maps = figures.heat_maps(encoder, images, [titles[r] for r in rows], patch=16, stride=4)
  numbers["localization_max_drop"] = [float(m.max()) for m in maps]
  sizes["localization.png"] = _save(fig, os.path.join(out_dir, "localization.png"))

  fig, silhouette = figures.embedding_map(index.index.vectors,
                                          [p["subcategory"] for p in index.products])
  numbers["silhouette_subcategory"] = silhouette
  # What the map shows the smoke model groups by: the colour (first word of the title).
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  colours = [p["title"].split()[0].lower() for p in index.products]
  numbers["silhouette_colour"] = float(metrics.silhouette_score(index.index.vectors, colours,
                                                                metric="cosine"))
  sizes["embedding_map.png"] = _save(fig, os.path.join(out_dir, "embedding_map.png"))

  summary = plots.write_summary(workdir, os.path.join(out_dir, "training_summary.png"),
                                title=f"{config.data.name}: {os.path.basename(workdir)}")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(summary) as im:
    sizes["training_summary.png"] = _save(im.convert("RGB"), summary)
  numbers["png_bytes"] = sizes
  with open(os.path.join(out_dir, "figures.json"), "w") as f:
    json.dump(numbers, f, indent=1)
  print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
  app.run(main)
