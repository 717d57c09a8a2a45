"""Occlusion maps find a planted region; boxes; PNG output; the evaluator end to end."""

import json

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from PIL import Image
import pytest

from fashion_jax.evaluate import localization


class RedSystem:
  """Image -> normalise([100 * fraction of pure-red pixels, 1]); text token 1 -> 'red' = [1, 0],
  token 2 -> 'anything' = [0, 1]. The similarity to 'red' depends only on the red pixels."""

  def embed_images(self, params, images):
    red = (images[..., 0] > 200) & (images[..., 1] < 50) & (images[..., 2] < 50)
    x = jnp.stack([100.0 * red.mean((1, 2)), jnp.ones(images.shape[0])], -1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_texts(self, params, tokens):
    return params["words"][tokens[:, 0]]

  def logit_scale(self, params):
    return jnp.float32(1.0)


PARAMS = {"words": jnp.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], jnp.float32)}


def planted_image(size=48, box=(10, 26, 22, 40), seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(60, 180, (size, size, 3)).astype(np.uint8)  # Noisy, never pure red.
  y0, x0, y1, x1 = box
  img[y0:y1, x0:x1] = (255, 0, 0)
  return img


def iou(a, b):
  ya, xa = max(a[0], b[0]), max(a[1], b[1])
  yb, xb = min(a[2], b[2]), min(a[3], b[3])
  inter = max(0, yb - ya) * max(0, xb - xa)
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


def test_window_origins_cover_the_border():
  np.testing.assert_array_equal(localization.window_origins(10, 4, 3), [0, 3, 6])
  np.testing.assert_array_equal(localization.window_origins(11, 4, 3), [0, 3, 6, 7])
  with pytest.raises(ValueError, match="patch=12 must be in"):
    localization.window_origins(10, 12, 3)


def test_occlusion_map_finds_planted_patch():
  truth = (10, 26, 22, 40)
  img = planted_image(box=truth)
  system = RedSystem()
  embed = lambda x: np.asarray(system.embed_images(PARAMS, jnp.asarray(x)))
  grid, base = localization.occlusion_map(embed, img, np.array([1.0, 0.0]), patch=8, stride=4,
                                          batch_size=16)
  ys, xs = localization.window_origins(48, 8, 4), localization.window_origins(48, 8, 4)
  assert grid.shape == (len(ys), len(xs))
  assert base > 0.9
  # The most damaging window lies inside the planted square; windows away from it change nothing.
  i, j = np.unravel_index(np.argmax(grid), grid.shape)
  assert truth[0] <= ys[i] and ys[i] + 8 <= truth[2] and truth[1] <= xs[j] and xs[j] + 8 <= truth[3]
  assert grid[0, 0] == pytest.approx(0.0, abs=1e-6)
  assert grid.max() > 0.01
  pmap = localization.pixel_map(grid, 48, 48, 8, 4)
  box = localization.box_from_map(pmap, threshold=0.5)
  assert iou(box, truth) > 0.5, box
  # For the other text, hiding red only raises the similarity: no positive drop, no box.
  grid2, _ = localization.occlusion_map(embed, img, np.array([0.0, 1.0]), patch=8, stride=4)
  assert grid2.min() < 0
  assert localization.box_from_map(localization.pixel_map(grid2, 48, 48, 8, 4)) is None


def test_box_from_map_picks_the_component_of_the_peak():
  m = np.zeros((20, 20))
  m[2:5, 3:9] = 1.0  # Peak region.
  m[12:18, 12:18] = 0.8  # A second, weaker region above threshold: not merged.
  assert localization.box_from_map(m, 0.5) == (2, 3, 5, 9)
  assert localization.box_from_map(m, 0.5) != (2, 3, 18, 18)
  with pytest.raises(ValueError, match="threshold=0"):
    localization.box_from_map(m, 0)


def test_save_overlay_writes_png(tmp_path):
  img = planted_image()
  pmap = np.zeros((48, 48), np.float32)
  pmap[10:22, 26:40] = 1
  path = tmp_path / "sub" / "m.png"
  localization.save_overlay(str(path), img, pmap, (10, 26, 22, 40))
  out = np.asarray(Image.open(path))
  assert out.shape == (48, 96, 3)
  np.testing.assert_array_equal(out[:, :48], img)  # Left: the image untouched.
  assert tuple(out[10, 48 + 30]) == (0, 255, 0)  # Box edge drawn on the overlay.


def dataset_fn(images, tokens):
  def fn(config, split, *, batch_size, fields=(), process_index=None, process_count=None):
    assert (process_index, process_count) == (0, 1)  # Every process reads the same rows.
    n = len(images)
    for start in range(0, n, batch_size):
      rows = np.arange(start, min(n, start + batch_size))
      rows_p = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
      batch = {"image": images[rows_p], "text": tokens[rows_p], "index": rows_p.astype(np.int32),
               "valid": np.arange(batch_size) < len(rows)}
      batch.update({f: np.array(["red"] * batch_size, dtype=object) for f in fields})
      yield batch
  return fn


@pytest.mark.parametrize("use_mesh", [False, True])
def test_evaluator_writes_maps(tmp_path, use_mesh):
  mesh = None
  if use_mesh:
    if len(jax.devices()) < 8:
      pytest.skip("needs 8 devices")
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"),
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
  boxes = [(4, 4, 16, 16), (30, 20, 44, 34), (10, 26, 22, 40)]
  images = np.stack([planted_image(box=b, seed=k) for k, b in enumerate(boxes)])
  tokens = np.ones((3, 4), np.int32)  # Caption token 1 = 'red'.
  ev = localization.Evaluator(RedSystem(), None, mesh, split="test", num_images=2, patch=8,
                              stride=4, batch_size=8, output_dir=str(tmp_path),
                              dataset_fn=dataset_fn(images, tokens))
  m = ev.run(PARAMS)
  assert set(m) == {"test/localization/base_sim", "test/localization/max_drop",
                    "test/localization/box_area"}
  assert m["test/localization/max_drop"] > 0.01
  records = json.loads((tmp_path / "boxes.json").read_text())
  assert [r["index"] for r in records] == [0, 1]
  for r in records:
    assert (tmp_path / r["png"]).exists()
    assert iou(r["box"], boxes[r["index"]]) > 0.5
  # A prompt from a field, tokenized by the given tokenizer.
  ev2 = localization.Evaluator(RedSystem(), None, mesh, num_images=1, patch=8, stride=4,
                               batch_size=8, query="subcategory", output_dir="",
                               tokenizer=lambda texts: np.ones((len(texts), 4), np.int32),
                               dataset_fn=dataset_fn(images, tokens))
  assert ev2.run(PARAMS)["test/localization/box_area"] > 0
