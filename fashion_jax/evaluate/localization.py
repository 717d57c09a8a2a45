"""Occlusion localization maps and zero-shot boxes (FashionCLIP, "Grounding").

For an image x [H, W, 3] and a text embedding t [D], a square window of side `patch` slides over
the image with `stride` (origins ys = 0, stride, ..., and the last origin H - patch added when the
stride does not land on it, so every pixel is covered). Each occluded copy x_ij (window filled
with the image's mean colour, 'mean', or mid grey 128, 'grey') is re-encoded, in batches,
through the system's image tower, and the map is the similarity drop
    M[i, j] = cos(f(x), t) - cos(f(x_ij), t)                                  [H', W']
(large where the removed region carried the concept). For display and boxes the map is spread
back to pixels, each pixel getting the mean drop of the windows that cover it [H, W]. The
zero-shot box is the bounding rectangle of the 8-connected region of pixels >= threshold * max
that contains the maximum ("minimum bounding rectangle of highly activated areas"); no box when
no occlusion lowers the similarity (max <= 0).
"""

from collections.abc import Callable, Iterable, Mapping
import json
import os

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw
from scipy import ndimage

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common

FILLS = ("mean", "grey")


def window_origins(size: int, patch: int, stride: int) -> np.ndarray:
  """Window starts along one axis: 0, stride, ..., plus size - patch if not reached."""
  if not 1 <= patch <= size:
    raise ValueError(f"occlusion patch={patch} must be in [1, {size}] (the image side).")
  if stride < 1:
    raise ValueError(f"occlusion stride={stride} must be >= 1.")
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return np.asarray(starts)


def occluded_images(image: np.ndarray, origins: np.ndarray, patch: int, fill: str = "mean"
                    ) -> np.ndarray:
  """uint8 [H, W, 3] and int [K, 2] window origins (y, x) -> uint8 [K, H, W, 3] occluded copies."""
  if fill not in FILLS:
    raise ValueError(f"occlusion fill={fill!r}; choose from {FILLS}.")
  value = (np.round(image.reshape(-1, 3).mean(0)) if fill == "mean"
           else np.full(3, 128)).astype(np.uint8)
  out = np.repeat(image[None], len(origins), axis=0)
  for k, (y, x) in enumerate(origins):
    out[k, y:y + patch, x:x + patch] = value
  return out


def occlusion_map(embed_images: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                  text_emb: np.ndarray, *, patch: int, stride: int, fill: str = "mean",
                  batch_size: int = 64) -> tuple[np.ndarray, float]:
  """The similarity-drop map of one image for one text (module docstring).

  Args:
    embed_images: uint8 [N, H, W, 3] -> [N, D] (a system's image tower).
    image: uint8 [H, W, 3]; text_emb: [D].
    patch, stride, fill: the occluder.
    batch_size: occluded copies per call of embed_images.

  Returns:
    (M float32 [H', W'], cos(f(x), t) of the unoccluded image).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}.")
  h, w, _ = image.shape
  ys, xs = window_origins(h, patch, stride), window_origins(w, patch, stride)
  t = np.asarray(text_emb, np.float64)
  t = t / np.linalg.norm(t)

  def cos(e):
    e = np.asarray(e, np.float64)
    return e @ t / np.linalg.norm(e, axis=-1)

  base = float(cos(embed_images(image[None]))[0])
  origins = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)  # Row-major (i, j).
  sims = []
  for start in range(0, len(origins), batch_size):  # Built one batch at a time.
    sims.append(cos(embed_images(occluded_images(image, origins[start:start + batch_size],
                                                 patch, fill))))
  return (base - np.concatenate(sims)).reshape(len(ys), len(xs)).astype(np.float32), base


def pixel_map(grid_map: np.ndarray, height: int, width: int, patch: int, stride: int
              ) -> np.ndarray:
  """[H', W'] window map -> float32 [H, W]: each pixel's mean over the windows covering it."""
  ys, xs = window_origins(height, patch, stride), window_origins(width, patch, stride)
  if grid_map.shape != (len(ys), len(xs)):
    raise ValueError(f"map shape {grid_map.shape} does not match the {len(ys)}x{len(xs)} "
                     f"windows of a {height}x{width} image with patch={patch}, stride={stride}.")
  total = np.zeros((height, width))
  count = np.zeros((height, width))
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      total[y:y + patch, x:x + patch] += grid_map[i, j]
      count[y:y + patch, x:x + patch] += 1
  return (total / count).astype(np.float32)


def box_from_map(pmap: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
  """(y0, x0, y1, x1), ends exclusive, of the region >= threshold * max holding the maximum."""
  if not 0 < threshold <= 1:
    raise ValueError(f"box threshold={threshold} must be in (0, 1].")
  peak = float(pmap.max())
  if peak <= 0:
    return None
  labels, _ = ndimage.label(pmap >= threshold * peak, structure=np.ones((3, 3)))
  ys, xs = np.nonzero(labels == labels[np.unravel_index(np.argmax(pmap), pmap.shape)])
  return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def save_overlay(path: str, image: np.ndarray, pmap: np.ndarray,
                 box: tuple[int, int, int, int] | None = None) -> None:
  """Writes a PNG: the image | the image with the map as a heat overlay (and the box, green)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  heat = np.clip(pmap / pmap.max(), 0, 1) if pmap.max() > 0 else np.zeros_like(pmap)
  colours = matplotlib.colormaps["inferno"](heat)[..., :3] * 255
  alpha = 0.25 + 0.5 * heat[..., None]
  overlay = ((1 - alpha) * image + alpha * colours).astype(np.uint8)
  canvas = Image.fromarray(np.concatenate([image, overlay], axis=1))
  if box is not None:
    y0, x0, y1, x1 = box
    w = image.shape[1]
    ImageDraw.Draw(canvas).rectangle([w + x0, y0, w + x1 - 1, y1 - 1], outline=(0, 255, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)


class Evaluator:
  """Occlusion maps for the first `num_images` products of a split, saved as PNGs.

  The text is the product's own caption (query='text') or a prompt built from one of its fields
  (query='subcategory' -> template.format(value)). Every process reads the same images (the
  split's first rows), so on a mesh the occluded batches are replicated host data.

  Metric names: `{split}/localization/base_sim` (mean cosine image-text before occlusion),
  `{split}/localization/max_drop` (mean over images of the largest drop), `{split}/localization/
  box_area` (mean box area / image area; images without a box count 0). PNGs and boxes.json go
  to `output_dir` (default <config.workdir>/localization/<split>; '' = do not write).
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split, and the query field unless the query is the caption (base.DataNeed)."""
    a = base.arguments(cls, kwargs)
    fields = () if a["query"] == "text" else (a["query"],)
    return [base.DataNeed(a["split"], fields=fields, labelled=fields)]

  def __init__(self, system, config, mesh=None, *, split: str = "test", num_images: int = 8,
               patch: int = 16, stride: int = 8, fill: str = "mean", threshold: float = 0.5,
               query: str = "text", template: str = "a photo of a {}",
               output_dir: str | None = None, batch_size: int = 64,
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None,
               tokenizer: Callable[[list[str]], np.ndarray] | None = None):
    if fill not in FILLS:
      raise ValueError(f"occlusion fill={fill!r}; choose from {FILLS}.")
    if num_images < 1:
      raise ValueError(f"num_images={num_images} must be >= 1.")
    self.system, self.config = system, config
    self.split, self.num_images = split, num_images
    self.patch, self.stride, self.fill, self.threshold = patch, stride, fill, threshold
    self.query, self.template = query, template
    if output_dir is None:
      workdir = config.get("workdir") if config is not None and hasattr(config, "get") else None
      output_dir = os.path.join(workdir, "localization", split) if workdir else ""
      if not output_dir:
        logging.warning("localization: no output_dir and no config.workdir: maps not saved.")
    self.output_dir = output_dir
    self.batch_size, self.dataset_fn = batch_size, dataset_fn
    self.embedder = common.Embedder(system, mesh)
    self.tokenizer = tokenizer
    if query != "text" and tokenizer is None:
      self.tokenizer = common.tokenizer_from_config(config)

  def _first_rows(self):
    fields = () if self.query == "text" else (self.query,)
    rows = []
    for batch in common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                     fields=fields, dataset_fn=self.dataset_fn,
                                     single_process=True):
      for r in np.flatnonzero(batch["valid"]):
        rows.append({k: batch[k][r] for k in ("image", "text", "index") + fields})
        if len(rows) == self.num_images:
          return rows
    return rows

  def run(self, params) -> dict[str, float]:
    rows = self._first_rows()
    if not rows:
      raise ValueError(f"split {self.split!r} yielded no image to localize.")
    if self.query == "text":
      tokens = np.stack([r["text"] for r in rows])
      queries = [None] * len(rows)
    else:
      queries = [self.template.format(r[self.query]) for r in rows]
      tokens = self.tokenizer(queries)
    text_emb = self.embedder.embed_tokens(params, tokens, self.batch_size)
    embed = lambda x: self.embedder.embed_images(params, x, self.batch_size)
    base, drops, areas, records = [], [], [], []
    for r, t, q in zip(rows, text_emb, queries):
      image = np.asarray(r["image"])
      grid, b = occlusion_map(embed, image, t, patch=self.patch, stride=self.stride,
                              fill=self.fill, batch_size=self.batch_size)
      pmap = pixel_map(grid, image.shape[0], image.shape[1], self.patch, self.stride)
      box = box_from_map(pmap, self.threshold)
      base.append(b)
      drops.append(float(grid.max()))
      areas.append(0.0 if box is None else
                   (box[2] - box[0]) * (box[3] - box[1]) / (image.shape[0] * image.shape[1]))
      if self.output_dir:
        name = f"{self.split}_{int(r['index']):06d}.png"
        save_overlay(os.path.join(self.output_dir, name), image, pmap, box)
        records.append({"index": int(r["index"]), "png": name, "query": q, "box": box,
                        "base_sim": b, "max_drop": drops[-1]})
    if self.output_dir:
      with open(os.path.join(self.output_dir, "boxes.json"), "w") as f:
        json.dump(records, f, indent=1)
    prefix = f"{self.split}/localization"
    return {f"{prefix}/base_sim": float(np.mean(base)),
            f"{prefix}/max_drop": float(np.mean(drops)),
            f"{prefix}/box_area": float(np.mean(areas))}
