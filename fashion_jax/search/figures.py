"""Figures of a trained two-tower model, shared by notebooks/quickstart.ipynb and
experiments/make_figures.py (the PNGs of docs/): every function returns numbers as well as a
picture, so the notebook and the tests assert on the numbers.

  text_to_image(index, encoder, queries, k)      -> (PIL sheet, hits)
  image_to_text(encoder, images, texts, k)       -> (matplotlib figure, top-k text rows [N, k])
  zero_shot(fclip, images, labels)               -> (figure, probabilities [N, K])
  heat_maps(encoder, images, texts, patch, stride) -> (figure, pixel maps [N, S, S])
  embedding_map(embeddings, labels, method)      -> (figure, silhouette score)
  as_png(figure)                                 -> an IPython PNG image (notebook display)

Colours: `attribute_precision(hits, word, field='title')` is the fraction of the returned
products whose field mentions `word` (what a colour query should return).
"""

from collections.abc import Sequence

import numpy as np

from fashion_jax.evaluate import localization
from fashion_jax.evaluate import prompts
from fashion_jax.search import sheet


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def as_png(fig, dpi: int = 90):
  """A matplotlib figure -> IPython.display.Image (PNG bytes), closing the figure: shown the
  same way by every notebook front end and by nbclient, whatever the matplotlib backend."""
  import io  # pylint: disable=g-import-not-at-top
  from IPython.display import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  _plt().close(fig)
  return Image(data=buf.getvalue(), format="png")


def text_to_image(index, encoder, queries: Sequence[str], k: int = 6, cell: int = 80):
  """Text queries against a ProductIndex -> (PIL contact sheet, per query its Hits)."""
  hits = index.search_text(encoder, list(queries), k)
  img = sheet.results_png([{"text": q, "image": None} for q in queries], hits, index.thumbs,
                          cell=cell)
  return img, hits


def attribute_precision(hits, word: str, field: str = "title") -> float:
  """Fraction of the hits whose `field` contains `word` as a word (case-insensitive)."""
  if not hits:
    raise ValueError("no hits")
  w = word.lower()
  return float(np.mean([w in h.product.get(field, "").lower().split() for h in hits]))


def image_to_text(encoder, images: np.ndarray, texts: Sequence[str], k: int = 3):
  """Ranks `texts` for each image -> (figure: image + its top-k texts, int [N, k] text rows).

  images: uint8 [N, S, S, 3]; texts: the candidate captions (e.g. every product title).
  """
  plt = _plt()
  img_emb = encoder.embed_images(images)
  txt_emb = encoder.embed_texts(list(texts))
  scores = img_emb @ txt_emb.T
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  n = len(images)
  fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 3.2), squeeze=False)
  for i, ax in enumerate(axes[0]):
    ax.imshow(images[i], interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    lines = [f"{r + 1}. {texts[j][:26]} ({scores[i, j]:.2f})" for r, j in enumerate(top[i])]
    ax.set_xlabel("\n".join(lines), fontsize=6.5, loc="left")
  fig.tight_layout()
  return fig, top


def zero_shot(fclip, images: np.ndarray, labels: Sequence[str], top: int = 3,
              templates: str | Sequence[str] = prompts.TEMPLATES):
  """FashionCLIP.zero_shot_classify with the shared prompts (evaluate/prompts.py, as the
  zero-shot evaluator) -> (figure: image + top classes with probabilities, probabilities
  [N, K])."""
  plt = _plt()
  probs = fclip.zero_shot_classify(list(images), list(labels), templates=templates)
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.0), squeeze=False,
                           gridspec_kw={"height_ratios": [1.3, 1]})
  for i in range(n):
    axes[0, i].imshow(images[i], interpolation="nearest")
    axes[0, i].axis("off")
    best = np.argsort(-probs[i])[:top][::-1]
    axes[1, i].barh(range(top), probs[i, best], color="#4a7fb5")
    axes[1, i].set_yticks(range(top))
    axes[1, i].set_yticklabels([labels[j] for j in best], fontsize=7)
    axes[1, i].set_xlim(0, 1)
    axes[1, i].tick_params(axis="x", labelsize=6)
  fig.tight_layout()
  return fig, probs


def heat_maps(encoder, images: np.ndarray, texts: Sequence[str], *, patch: int = 16,
              stride: int = 4, fill: str = "mean"):
  """Occlusion localization (evaluate/localization.py) of each image for its text ->
  (figure: image | heat overlay with the zero-shot box, pixel maps float32 [N, S, S])."""
  plt = _plt()
  import matplotlib  # pylint: disable=g-import-not-at-top
  t = encoder.embed_texts(list(texts))
  maps = []
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.3), squeeze=False)
  for i, (image, text) in enumerate(zip(images, texts)):
    grid, _ = localization.occlusion_map(encoder.embed_images, image, t[i], patch=patch,
                                         stride=stride, fill=fill)
    pmap = localization.pixel_map(grid, image.shape[0], image.shape[1], patch, stride)
    maps.append(pmap)
    box = localization.box_from_map(pmap)
    axes[0, i].imshow(image, interpolation="nearest")
    axes[0, i].set_title(text[:22], fontsize=7)
    axes[1, i].imshow(image, interpolation="nearest")
    axes[1, i].imshow(np.clip(pmap / max(pmap.max(), 1e-9), 0, 1), cmap="inferno", alpha=0.6,
                      interpolation="bilinear")
    if box is not None:
      y0, x0, y1, x1 = box
      axes[1, i].add_patch(matplotlib.patches.Rectangle((x0 - .5, y0 - .5), x1 - x0, y1 - y0,
                                                        fill=False, ec="lime", lw=1.2))
    for ax in axes[:, i]:
      ax.axis("off")
  fig.tight_layout()
  return fig, np.stack(maps)


def embedding_map(embeddings: np.ndarray, labels: Sequence[str], method: str = "tsne",
                  seed: int = 0, max_legend: int = 12):
  """2-D map of embeddings coloured by label -> (figure, silhouette score).

  The silhouette (sklearn, cosine distance) is computed on the EMBEDDINGS, not on the 2-D map:
  s = mean_i (b_i - a_i) / max(a_i, b_i), a_i the mean distance to i's own label, b_i to the
  nearest other label; in [-1, 1], about 0 for labels unrelated to the embedding.
  """
  plt = _plt()
  from sklearn import manifold, metrics  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  if method != "tsne":
    raise ValueError(f"embedding map method {method!r}: only 'tsne' is available (sklearn).")
  if len(np.unique(labels)) < 2:
    raise ValueError("the silhouette needs at least 2 distinct labels.")
  score = float(metrics.silhouette_score(embeddings, labels, metric="cosine"))
  xy = manifold.TSNE(n_components=2, perplexity=min(30, max(5, len(labels) // 4)),
                     init="pca", random_state=seed, metric="cosine").fit_transform(embeddings)
  fig, ax = plt.subplots(figsize=(6.4, 5.0))
  uniq, counts = np.unique(labels, return_counts=True)
  cmap = plt.get_cmap("tab20")
  shown = set(uniq[np.argsort(-counts)][:max_legend])
  for j, u in enumerate(uniq):
    m = labels == u
    ax.scatter(xy[m, 0], xy[m, 1], s=9, color=cmap(j % 20), label=u if u in shown else None)
  ax.set_title(f"t-SNE of image embeddings by sub-category (silhouette {score:.3f}, cosine)",
               fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  return fig, score
