"""fashion_jax/viz.py: patch boxes of E2's selections, checked against the grid geometry, the
one-hot rule, the drawn rectangles and a real E2 tower's output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

from fashion_jax import viz
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import e2 as e2_lib

matplotlib.use("Agg")


def _one_hot(idx, n):
  return np.eye(n, dtype=np.float32)[idx]


def test_patch_boxes_follow_the_row_major_grid():
  # 32 px, patch 8: a 4 x 4 grid; patch 5 is row 1, column 1; patch 14 is row 3, column 2.
  np.testing.assert_array_equal(viz.patch_boxes([0, 5, 14, 15], 32, 8),
                                [[0, 0, 8, 8], [8, 8, 16, 16], [16, 24, 24, 32], [24, 24, 32, 32]])
  idx = np.random.RandomState(0).randint(0, 64, (3, 5, 7))
  np.testing.assert_array_equal(viz.box_patches(viz.patch_boxes(idx, 64, 8), 64, 8), idx)
  with pytest.raises(ValueError, match=r"in \[0, 16\)"):
    viz.patch_boxes([16], 32, 8)
  with pytest.raises(ValueError, match="multiple of patch_size=7"):
    viz.patch_boxes([0], 32, 7)
  with pytest.raises(ValueError, match="not one 8-px patch"):
    viz.box_patches([[4, 0, 12, 8]], 32, 8)


def test_selected_patches_requires_exactly_one_hot():
  sel = _one_hot(np.array([[3, 0], [15, 7]]), 16)
  np.testing.assert_array_equal(viz.selected_patches(sel), [[3, 0], [15, 7]])
  soft = sel.copy()
  soft[1, 0] = 1 / 16  # soft attention weights, not a choice
  with pytest.raises(ValueError, match=r"not one-hot.*row \(1, 0\)"):
    viz.selected_patches(soft)
  two = sel.copy()
  two[0, 1, 5] = 1.0  # two patches for one token
  with pytest.raises(ValueError, match=r"not one-hot.*row \(0, 1\)"):
    viz.selected_patches(two)


def test_draw_selections_draws_each_token_on_its_patch_in_its_entity_colour():
  rng = np.random.RandomState(1)
  f, b, s, n = 2, 3, 5, 16
  idx = rng.randint(0, n, (f, b, s))
  sel = _one_hot(idx, n)
  slices = [("brand", 0, 2), ("season", 2, 3), ("subcategory", 3, 5)]
  images = rng.randint(0, 256, (b, 32, 32, 3)).astype(np.uint8)
  fig, boxes = viz.draw_selections(images, sel, slices, 8, blocks=(0, -1),
                                   titles=["a", "b", "c"])
  assert boxes.shape == (2, b, s, 4)
  np.testing.assert_array_equal(viz.box_patches(boxes, 32, 8), idx)
  colours = [viz.ENTITY_COLORS[e] for e in (0, 0, 1, 2, 2)]
  axes = np.asarray(fig.axes).reshape(2, b)
  for r in range(2):
    for i in range(b):
      rects = axes[r, i].patches
      assert len(rects) == s
      for t, rect in enumerate(rects):
        # The outline lies inside the chosen patch (pixel centres at integers: edges at -0.5).
        cx, cy = rect.get_x() + rect.get_width() / 2, rect.get_y() + rect.get_height() / 2
        assert int((cy + 0.5) // 8) * 4 + int((cx + 0.5) // 8) == idx[r, i, t]
        assert matplotlib.colors.to_hex(rect.get_edgecolor()) == colours[t]
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == ["brand (2 tok.)", "season (1 tok.)", "subcategory (2 tok.)"]
  matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("kwargs, match", [
    (dict(slices=[("brand", 0, 2), ("season", 3, 5)]), "must tile"),
    (dict(patch=16), "N=16 patches but a 32-px image with 16-px patches has 4"),
    (dict(blocks=(2,)), "must index the F=2 fusion blocks"),
])
def test_draw_selections_refuses_inconsistent_inputs(kwargs, match):
  sel = _one_hot(np.zeros((2, 1, 5), int), 16)
  images = np.zeros((1, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match=match):
    viz.draw_selections(images, sel, kwargs.get("slices", [("brand", 0, 2), ("season", 2, 5)]),
                        kwargs.get("patch", 8), blocks=kwargs.get("blocks", (-1,)))


def test_real_e2_selections_are_drawn_where_the_fusion_similarity_peaks():
  clip = clip_lib.clip_config(
      "tiny", projection_dim=16,
      vision=dict(width=32, num_layers=3, num_heads=2, mlp_dim=64, patch_size=8, image_size=32),
      text=dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, vocab_size=50, max_len=8,
                eos_token_id=49))
  cfg = e2_lib.e2_config(clip, entities=("brand", "season"), tokens_per_entity=(2, 1),
                         fusion_after=(1, 2))
  model = e2_lib.E2VisionTransformer(cfg)
  images = jnp.asarray(np.random.RandomState(2).randint(0, 256, (4, 32, 32, 3)), jnp.uint8)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), images[:1])["params"])
  out, state = model.apply({"params": params}, images, capture_intermediates=True,
                           mutable=["intermediates"])
  sel = np.asarray(out["selections"])
  assert sel.shape == (2, 4, 3, 16)
  chosen = viz.selected_patches(sel)
  for j in range(2):
    q = state["intermediates"][f"fusion_{j}"]["query"]["__call__"][0]
    k = state["intermediates"][f"fusion_{j}"]["key"]["__call__"][0]
    np.testing.assert_array_equal(np.einsum("bsd,bnd->bsn", q, k).argmax(-1), chosen[j])
  fig, boxes = viz.draw_selections(np.asarray(images), sel, cfg.entity_slices(), 8,
                                   blocks=(0, 1))
  np.testing.assert_array_equal(viz.box_patches(boxes, 32, 8), chosen)
  matplotlib.pyplot.close(fig)
