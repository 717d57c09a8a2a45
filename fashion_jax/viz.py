"""Pictures of what a patch-selecting model chose: E2's selection tokens as patch outlines.

E2's vision tower (models/e2.py) returns `selections` [F, B, S, N]: for each of its F fusion
blocks, each of the B images and each of the S selection tokens, a one-hot row over the N = g * g
patches of the image (row-major: patch n covers rows (n // g) p .. (n // g + 1) p - 1 and columns
(n % g) p .. (n % g + 1) p - 1 of the image, p the patch size, g = S_img / p). Entity e owns the
tokens [start_e, stop_e) of E2Config.entity_slices().

  selected_patches(selections)                     -> int [..., S] patch index per token
  patch_boxes(indices, image_size, patch_size)     -> int [..., 4] pixel boxes (x0, y0, x1, y1)
  box_patches(boxes, image_size, patch_size)       -> int [...] the patch index of each box
  draw_selections(images, selections, entity_slices, patch_size, blocks=...)
                                                   -> (figure, boxes [len(blocks), B, S, 4])

The boxes `draw_selections` returns are the rectangles it drew (half-open pixel boxes, before
the per-token inset that keeps two tokens on one patch both visible), so a caller can map them
back with `box_patches` and check them against the model's output.
"""

from collections.abc import Sequence

import numpy as np

# One colour per entity (tab10 order: blue, orange, green, red, purple, ...).
ENTITY_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf")


def selected_patches(selections) -> np.ndarray:
  """One-hot selections [..., N] -> int [...] index of the chosen patch.

  Raises ValueError unless every row is exactly one-hot (entries 0 or 1, exactly one 1): E2's
  hard Gumbel-softmax forward value is exactly one-hot, so anything else means the array is not
  a selection (e.g. soft attention weights).
  """
  s = np.asarray(selections)
  if s.ndim < 1 or s.shape[-1] < 1:
    raise ValueError(f"selections must be [..., N] with N >= 1 patches, got shape {s.shape}.")
  binary = (s == 0) | (s == 1)
  ones = (s == 1).sum(-1)
  if not binary.all() or (ones != 1).any():
    bad = tuple(int(i) for i in np.argwhere(~binary.all(-1) | (ones != 1))[0])
    raise ValueError(f"selections are not one-hot over the last axis: row {bad} is "
                     f"{s[bad][:8].tolist()}... (sum {s[bad].sum():.4g}).")
  return np.argmax(s, axis=-1)


def _grid(image_size: int, patch_size: int) -> int:
  if patch_size < 1 or image_size < patch_size or image_size % patch_size:
    raise ValueError(f"image_size={image_size} must be a positive multiple of "
                     f"patch_size={patch_size}.")
  return image_size // patch_size


def patch_boxes(indices, image_size: int, patch_size: int) -> np.ndarray:
  """Patch indices int [...] -> pixel boxes int [..., 4] = (x0, y0, x1, y1), x1/y1 exclusive:
  x0 = (n % g) p, y0 = (n // g) p, x1 = x0 + p, y1 = y0 + p, g = image_size / p."""
  g = _grid(image_size, patch_size)
  n = np.asarray(indices)
  if n.size and (n.min() < 0 or n.max() >= g * g):
    raise ValueError(f"patch indices must be in [0, {g * g}) for a {g}x{g} grid; got "
                     f"[{n.min()}, {n.max()}].")
  x0, y0 = (n % g) * patch_size, (n // g) * patch_size
  return np.stack([x0, y0, x0 + patch_size, y0 + patch_size], axis=-1).astype(np.int64)


def box_patches(boxes, image_size: int, patch_size: int) -> np.ndarray:
  """Inverse of patch_boxes: boxes int [..., 4] -> patch indices int [...]; a box that is not
  exactly one patch of the grid is an error."""
  g = _grid(image_size, patch_size)
  b = np.asarray(boxes)
  x0, y0, x1, y1 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
  ok = ((x0 % patch_size == 0) & (y0 % patch_size == 0) & (x1 - x0 == patch_size)
        & (y1 - y0 == patch_size) & (x0 >= 0) & (y0 >= 0) & (x1 <= image_size)
        & (y1 <= image_size))
  if not ok.all():
    raise ValueError(f"box {b[~ok][0].tolist()} is not one {patch_size}-px patch of a "
                     f"{image_size}-px image.")
  return (y0 // patch_size) * g + x0 // patch_size


def draw_selections(images, selections, entity_slices: Sequence[tuple[str, int, int]],
                    patch_size: int, *, blocks: Sequence[int] = (-1,),
                    titles: Sequence[str] | None = None, cell: float = 2.0):
  """Each image with the patch each selection token chose, one colour per entity.

  Args:
    images: uint8 [B, S_img, S_img, 3].
    selections: [F, B, S, N] one-hot (E2's vision output 'selections').
    entity_slices: (entity, start, stop) per entity (E2Config.entity_slices()); they must tile
      [0, S).
    patch_size: the tower's patch size p (N must be (S_img / p)^2).
    blocks: which fusion blocks to draw, one figure row each (-1 = the last).
    titles: optional text under each image (B strings).
    cell: inches per image.

  Returns:
    (matplotlib figure, boxes int [len(blocks), B, S, 4]): the drawn patch boxes (patch_boxes of
    the selected patches), token order as in `selections`.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  sel = np.asarray(selections)
  if sel.ndim != 4:
    raise ValueError(f"selections must be [F, B, S, N], got shape {sel.shape}.")
  f, b, s, n = sel.shape
  if images.ndim != 4 or images.shape[0] != b or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be [B={b}, S, S, 3] square, got shape {images.shape}.")
  size = images.shape[1]
  g = _grid(size, patch_size)
  if g * g != n:
    raise ValueError(f"selections choose among N={n} patches but a {size}-px image with "
                     f"{patch_size}-px patches has {g * g}.")
  spans = sorted((start, stop) for _, start, stop in entity_slices)
  if [a for a, _ in spans] != [0] + [z for _, z in spans[:-1]] or spans[-1][1] != s:
    raise ValueError(f"entity_slices {list(entity_slices)} must tile the S={s} selection tokens.")
  if len(entity_slices) > len(ENTITY_COLORS):
    raise ValueError(f"{len(entity_slices)} entities; at most {len(ENTITY_COLORS)} colours.")
  rows = [int(k) % f if -f <= int(k) < f else None for k in blocks]
  if not rows or None in rows:
    raise ValueError(f"blocks={list(blocks)} must index the F={f} fusion blocks.")
  if titles is not None and len(titles) != b:
    raise ValueError(f"{len(titles)} titles for {b} images.")
  chosen = selected_patches(sel[rows])                # [R, B, S]
  boxes = patch_boxes(chosen, size, patch_size)       # [R, B, S, 4]
  colour = np.zeros(s, int)
  for e, (_, start, stop) in enumerate(entity_slices):
    colour[start:stop] = e
  fig, axes = plt.subplots(len(rows), b, figsize=(cell * b, cell * len(rows) + 0.8),
                           squeeze=False)
  inset = min(0.35, patch_size / (2.5 * s))  # px between the outlines of tokens on one patch
  for r, block in enumerate(rows):
    for i in range(b):
      ax = axes[r, i]
      ax.imshow(images[i], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      for t in range(s):
        x0, y0, x1, y1 = boxes[r, i, t]
        d = inset * (t + 1)
        ax.add_patch(matplotlib.patches.Rectangle(
            (x0 - 0.5 + d, y0 - 0.5 + d), (x1 - x0) - 2 * d, (y1 - y0) - 2 * d, fill=False,
            ec=ENTITY_COLORS[colour[t]], lw=1.6))
      if i == 0:
        ax.set_ylabel(f"fusion block {block + 1}/{f}", fontsize=8)
      if titles is not None and r == len(rows) - 1:
        ax.set_xlabel(titles[i][:28], fontsize=7)
  handles = [matplotlib.lines.Line2D([], [], color=ENTITY_COLORS[e], lw=3,
                                     label=f"{name} ({stop - start} tok.)")
             for e, (name, start, stop) in enumerate(entity_slices)]
  fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (cell * len(rows) + 0.8)))
  return fig, boxes
