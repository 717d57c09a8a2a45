"""The random resized crop's resize, run on the accelerator: `config.data.resize_on='device'`.

The train pipeline (data/pipeline.py) makes each training image by decoding a random crop
window of the stored JPEG, flipping it, and resizing it bilinearly to S x S. On the host the
resize (and the float casts around it) costs about as much as the crop decode itself. With
`data.resize_on='device'` the host ships the decoded crop instead, and the jitted train step
resizes it (`finish_images`, applied by train/step.py before the system's loss sees the batch):

  image          uint8 [b, C, C, 3]  the decoded crop window, UNflipped, at the top-left corner,
                                     zeros elsewhere (C = data.crop_pad, default
                                     features.default_crop_pad(S)).
  image_window   int32 [b, 3]        (h, w, flip) of that crop: h x w pixels, flip 1 = mirror.
  (image2, image2_window the same for views=2.)

A crop taller or wider than C is resized (and flipped) on the host as before and shipped as an
S x S crop with window (S, S, 0), which `resize_crop` maps to itself exactly (scale 1 samples
every pixel at weight 1). So C only trades host work against bytes sent, never the result.

`resize_crop` is TF's ResizeBilinear with half-pixel centres and no antialias (what
tf.image.resize(method='bilinear', antialias=False) runs on the host), in float32, then rounded
as the host rounds (+0.5, truncate). For output pixel o of an axis with n input pixels:
    x = (o + 0.5) * (n / S) - 0.5,  lo = max(floor(x), 0),  hi = min(ceil(x), n - 1),
    t = x - floor(x)
    top = p[ylo, xlo] + (p[ylo, xhi] - p[ylo, xlo]) * tx  (bottom the same at yhi)
    out = top + (bottom - top) * ty
The flip reads column w - 1 - c instead of c: the same values the host's flipped crop holds.
The positions (lo, hi, t) are TF's bit for bit: tabulated on the host in float32 for every
crop side (`_sample_tables`). XLA:CPU still fuses the lerps' `a + b * c` into one fused
multiply-add where TF rounds twice, so a value within float rounding of a .5 boundary can round
the other way: pixels differ by at most 1, on a few in 10,000 (tests/test_device_crop.py bounds
it at 1 in 1,000), far inside the bfloat16 tolerance every model lever is held to.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.data import features


def _sample_tables(size: int, max_n: int):
  """TF's sample positions for every input length n in [0, max_n]: (lo, hi, t) [max_n + 1, size].

  Computed here in numpy float32, operation by operation as TF's kernel computes them, and used
  as constants: on the device XLA would turn the division by `size` into a multiplication by a
  rounded reciprocal, and fuse the multiply and subtract into one rounding, either of which moves
  a position by an ulp.
  """
  n = np.arange(max_n + 1, dtype=np.float32)[:, None]
  scale = n / np.float32(size)
  x = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  xf = np.floor(x)
  lo = np.maximum(xf, 0).astype(np.int32)
  hi = np.minimum(np.ceil(x), np.maximum(n - 1, 0)).astype(np.int32)
  return lo, hi, (x - xf).astype(np.float32)


def resize_crop(crop: jax.Array, window: jax.Array, size: int) -> jax.Array:
  """uint8 [C, C, 3] crop at the top-left + int32 [3] (h, w, flip) -> uint8 [size, size, 3]."""
  h, w, flip = window[0], window[1], window[2]
  lo, hi, t = (jnp.asarray(a) for a in _sample_tables(size, crop.shape[0]))
  ylo, yhi, ty = lo[h], hi[h], t[h]
  xlo, xhi, tx = lo[w], hi[w], t[w]
  xlo, xhi = (jnp.where(flip > 0, w - 1 - x, x) for x in (xlo, xhi))
  p = crop.astype(jnp.float32)
  top_rows, bottom_rows = p[ylo], p[yhi]  # [size, C, 3]
  tx = tx[None, :, None]
  top = top_rows[:, xlo] + (top_rows[:, xhi] - top_rows[:, xlo]) * tx
  bottom = bottom_rows[:, xlo] + (bottom_rows[:, xhi] - bottom_rows[:, xlo]) * tx
  out = top + (bottom - top) * ty[:, None, None]
  # Bilinear values lie in [0, 255]: +0.5 and truncation round as the host does.
  return (out + 0.5).astype(jnp.uint8)


def finish_images(batch: Mapping[str, jax.Array], size: int) -> dict[str, jax.Array]:
  """Resizes every shipped crop of a train batch to [b, size, size, 3]; drops the windows.

  A batch without window keys (data.resize_on='host') is returned unchanged (as a dict). A
  window key without its image, or a window not int [b, 3], is a ValueError naming the key.
  """
  out = dict(batch)
  for key in [k for k in batch if k.endswith(features.WINDOW_SUFFIX)]:
    field = key[:-len(features.WINDOW_SUFFIX)]
    window = out.pop(key)
    if field not in out:
      raise ValueError(f"finish_images: batch has {key!r} but no {field!r} to resize.")
    images = out[field]
    if (window.ndim != 2 or window.shape[-1] != 3 or window.shape[0] != images.shape[0]
        or not jnp.issubdtype(window.dtype, jnp.integer)):
      raise ValueError(f"finish_images: {key!r} must be int [b, 3] (h, w, flip) for {field!r} "
                       f"of shape {images.shape}; got {window.dtype} {window.shape}.")
    out[field] = jax.vmap(resize_crop, in_axes=(0, 0, None))(images, window, int(size))
  return out


def batch_transform(data) -> Callable[[dict], dict] | None:
  """The train step's batch transform for config.data: finish_images at image_size, or None
  (resize_on='host': the batch already holds the final images)."""
  if features.resize_on(data) == "host":
    return None
  size = int(data["image_size"])
  return lambda batch: finish_images(batch, size)
