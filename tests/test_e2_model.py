"""E2 model: one-patch selection, straight-through gradients, token dropping, CLIP equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.models import clip as clip_lib
from fashion_jax.models import e2 as e2_lib
from fashion_jax.models import vit as vit_lib

NUM_PATCHES = 16  # 32 px / patch 8 -> 4 x 4.


def _clip(num_layers=4):
  return clip_lib.clip_config(
      "tiny", projection_dim=16,
      vision=dict(width=32, num_layers=num_layers, num_heads=2, mlp_dim=64, patch_size=8,
                  image_size=32),
      text=dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, vocab_size=50, max_len=8,
                eos_token_id=49))


def _images(b=3, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (b, 32, 32, 3)), jnp.uint8)


def _vision(cfg, seed=0):
  model = e2_lib.E2VisionTransformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), _images(1))["params"])
  return model, params


def test_default_fusion_layout():
  assert e2_lib.default_fusion_after(12) == (8, 11)  # The paper: after block 8 and block 11.
  assert e2_lib.default_fusion_after(4) == (2, 3)
  assert e2_lib.default_fusion_after(2) == (1,)
  assert e2_lib.e2_config(_clip(4)).fusion_after == (2, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fusion_after=(3, 2)), r"fusion_after=\(3, 2\) must be strictly increasing"),
    (dict(fusion_after=(5,)), r"in \[1, 4\]"),
    (dict(tokens_per_entity=(2, 2)), r"one count per entity"),
    (dict(entities=(), tokens_per_entity=(), fusion_after=(2,)), r"needs selection tokens"),
    (dict(gumbel_tau=0.0), r"gumbel_tau=0.0 must be positive"),
    (dict(entities=("brand", "brand"), tokens_per_entity=(1, 1)), r"duplicates"),
])
def test_config_errors(kwargs, match):
  base = dict(clip=_clip(), entities=("brand", "season", "subcategory", "composition"),
              tokens_per_entity=(2, 2, 2, 2), fusion_after=(2, 3))
  base.update(kwargs)
  with pytest.raises(ValueError, match=match):
    e2_lib.E2Config(**base)
  with pytest.raises(ValueError, match="does not scan"):
    e2_lib.E2Config(clip=_clip().replace(scan=True))


def test_no_tokens_no_fusion_is_the_clip_tower_bit_for_bit():
  clip_cfg = _clip()
  cfg = e2_lib.e2_config(clip_cfg, entities=(), fusion_after=())
  model, params = _vision(cfg)
  ref = vit_lib.VisionTransformer(clip_cfg.vision, clip_cfg.projection_dim)
  ref_params = nn.unbox(ref.init(jax.random.PRNGKey(0), _images(1))["params"])
  # Same names, same rng streams: the initialisations agree exactly too.
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  images = _images()
  ours = jax.jit(model.apply)({"params": ref_params}, images)
  theirs = jax.jit(ref.apply)({"params": ref_params}, images)
  assert set(ours) == {"tokens", "pooled", "embedding"}
  for k in theirs:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)


def test_clip_part_of_e2_init_equals_clip_init():
  clip_cfg = _clip()
  cfg = e2_lib.e2_config(clip_cfg)
  rng = jax.random.PRNGKey(3)
  e2_params = nn.unbox(e2_lib.init_params(cfg, rng))
  clip_params = nn.unbox(clip_lib.init_params(clip_cfg, rng))
  new = sorted(k for k in e2_params["vision"] if e2_lib.is_new_param(k))
  assert new == sorted(["selection_tokens", "fusion_0", "fusion_1"] + [
      f"entity_{e}_{p}" for e in cfg.entities for p in ("norm", "projection")])
  jax.tree.map(np.testing.assert_array_equal, e2_lib.clip_part(e2_params), clip_params)


@pytest.mark.parametrize("fusion_after,length,last_block_len", [
    ((2, 3), 1 + 8, 1 + 8),                     # Blocks 1-2 full, fusion, 3, fusion+drop, 4.
    ((4,), 1 + 8, 1 + NUM_PATCHES + 8),         # Drop after the last block: nothing follows.
    ((), 1 + NUM_PATCHES + 8, 1 + NUM_PATCHES + 8),  # No fusion: the tokens stay.
])
def test_last_fusion_block_drops_patch_tokens(fusion_after, length, last_block_len):
  cfg = e2_lib.e2_config(_clip(), fusion_after=fusion_after)
  model, params = _vision(cfg)
  out, inter = model.apply({"params": params}, _images(2), capture_intermediates=True,
                           mutable=["intermediates"])
  assert out["tokens"].shape == (2, length, 32)
  blocks = inter["intermediates"]["encoder"]
  lens = [blocks[f"layers_{i}"]["__call__"][0].shape[1] for i in range(4)]
  full = 1 + NUM_PATCHES + 8
  expected = [full] * 4
  if fusion_after:
    expected[fusion_after[-1]:] = [1 + 8] * (4 - fusion_after[-1])
  assert lens == expected and lens[-1] == last_block_len
  if fusion_after:
    assert out["selections"].shape == (len(fusion_after), 2, 8, NUM_PATCHES)
  else:
    assert "selections" not in out


def test_selection_picks_exactly_one_patch_and_averages_its_value():
  rs = np.random.RandomState(0)
  sel = jnp.asarray(rs.randn(3, 5, 32), jnp.float32)
  patches = jnp.asarray(rs.randn(3, NUM_PATCHES, 32), jnp.float32)
  block = e2_lib.FusionBlock(tau=1.0)
  params = nn.unbox(block.init(jax.random.PRNGKey(0), sel, patches)["params"])
  for deterministic in (True, False):
    out, w = block.apply({"params": params}, sel, patches, deterministic,
                         rngs={"gumbel": jax.random.PRNGKey(7)})
    w = np.asarray(w)
    assert set(np.unique(w)) <= {0.0, 1.0}
    np.testing.assert_array_equal(w.sum(-1), np.ones((3, 5)))
    idx = w.argmax(-1)
    p = jax.tree.map(np.asarray, params)
    v = np.asarray(patches) @ p["value"]["kernel"] + p["value"]["bias"]
    expected = (np.take_along_axis(v, idx[..., None], axis=1) + np.asarray(sel)) / 2
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    if deterministic:  # Evaluation: the argmax of q k^T / sqrt(D), no noise.
      q = np.asarray(sel) @ p["query"]["kernel"] + p["query"]["bias"]
      k = np.asarray(patches) @ p["key"]["kernel"] + p["key"]["bias"]
      np.testing.assert_array_equal(idx, np.einsum("bsd,bnd->bsn", q, k).argmax(-1))
  # Training draws Gumbel noise: other rngs pick other patches somewhere.
  picks = {tuple(np.asarray(block.apply({"params": params}, sel, patches, False,
                                        rngs={"gumbel": jax.random.PRNGKey(s)})[1]
                            ).argmax(-1).ravel()) for s in range(4)}
  assert len(picks) > 1


def test_straight_through_gradient_matches_finite_differences_of_the_soft_relaxation():
  """d/dsim <G, y> with y = hard + soft - sg(soft) equals d/dsim <G, softmax((sim + g)/tau)>."""
  rs = np.random.RandomState(1)
  sim = rs.randn(2, 3, 6).astype(np.float32)
  g_out = rs.randn(2, 3, 6)
  key = jax.random.PRNGKey(5)
  tau = 0.7
  grad = np.asarray(jax.grad(lambda s: jnp.sum(jnp.asarray(g_out, jnp.float32) *
                                               e2_lib.straight_through_select(s, tau, key)))(
                                                   jnp.asarray(sim)))
  noise = np.asarray(jax.random.gumbel(key, sim.shape, jnp.float32), np.float64)

  def surrogate(s):  # float64 numpy, independent of the implementation.
    z = (s + noise) / tau
    z = np.exp(z - z.max(-1, keepdims=True))
    return np.sum(g_out * z / z.sum(-1, keepdims=True))

  fd = np.zeros_like(sim, np.float64)
  eps = 1e-5
  for i in np.ndindex(sim.shape):
    hi, lo = sim.astype(np.float64), sim.astype(np.float64)
    hi[i] += eps
    lo[i] -= eps
    fd[i] = (surrogate(hi) - surrogate(lo)) / (2 * eps)
  assert np.abs(fd).max() > 1e-2
  np.testing.assert_allclose(grad, fd, atol=2e-5)
  # Forward value is the hard one-hot of the noisy argmax.
  y = np.asarray(e2_lib.straight_through_select(jnp.asarray(sim), tau, key))
  np.testing.assert_array_equal(y, np.eye(6)[(sim + noise).argmax(-1)])


def test_query_and_key_receive_gradients_only_through_straight_through():
  rs = np.random.RandomState(2)
  sel = jnp.asarray(rs.randn(2, 4, 32), jnp.float32)
  patches = jnp.asarray(rs.randn(2, NUM_PATCHES, 32), jnp.float32)
  target = jnp.asarray(rs.randn(2, 4, 32), jnp.float32)
  block = e2_lib.FusionBlock()
  params = nn.unbox(block.init(jax.random.PRNGKey(0), sel, patches)["params"])

  def loss(p):
    out, _ = block.apply({"params": p}, sel, patches, False, rngs={"gumbel": jax.random.PRNGKey(1)})
    return jnp.sum((out - target) ** 2)

  grads = jax.grad(loss)(params)
  for name in ("query", "key", "value"):
    assert float(jnp.abs(grads[name]["kernel"]).max()) > 1e-4, name

  # The same loss through a pure hard selection (no straight-through) gives q/k no gradient.
  def hard_loss(p):
    q = sel @ p["query"]["kernel"] + p["query"]["bias"]
    k = patches @ p["key"]["kernel"] + p["key"]["bias"]
    v = patches @ p["value"]["kernel"] + p["value"]["bias"]
    w = jax.nn.one_hot(jnp.argmax(jnp.einsum("bsd,bnd->bsn", q, k), -1), NUM_PATCHES)
    return jnp.sum(((w @ v + sel) / 2 - target) ** 2)

  assert float(jnp.abs(jax.grad(hard_loss)(params)["query"]["kernel"]).max()) == 0.0


def test_entity_embeddings_pool_all_of_each_entitys_tokens():
  cfg = e2_lib.e2_config(_clip(), entities=("brand", "season"), tokens_per_entity=(3, 2))
  model, params = _vision(cfg)
  out = model.apply({"params": params}, _images(2))
  sel = np.asarray(out["tokens"])[:, -5:]
  for e, (name, start, stop) in enumerate(cfg.entity_slices()):
    h = sel[:, start:stop].mean(1)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    norm = params[f"entity_{name}_norm"]
    h = h * norm["scale"] + norm["bias"]
    expected = h @ params[f"entity_{name}_projection"]["kernel"]
    np.testing.assert_allclose(np.asarray(out["entity_embeddings"][:, e]), expected, atol=1e-5)
  assert cfg.entity_slices() == [("brand", 0, 3), ("season", 3, 5)]


def test_e2_model_outputs_and_tag_shape_error():
  cfg = e2_lib.e2_config(_clip())
  model = e2_lib.E2Model(cfg)
  params = nn.unbox(e2_lib.init_params(cfg, jax.random.PRNGKey(0)))
  ids = jnp.full((3, 8), 49, jnp.int32)
  tags = jnp.full((3, 4, 8), 49, jnp.int32)
  out = model.apply({"params": params}, _images(), ids, tags)
  assert out["entity_image_embeds"].shape == (3, 4, 16)
  assert out["entity_text_embeds"].shape == (3, 4, 16)
  np.testing.assert_allclose(np.linalg.norm(out["entity_image_embeds"], axis=-1), 1, atol=1e-5)
  # The entity texts go through the same text tower as the captions.
  np.testing.assert_allclose(out["entity_text_embeds"][:, 0], out["text_embeds"], atol=1e-6)
  with pytest.raises(ValueError, match=r"tag_ids must be \[B, E=4, L\]"):
    model.apply({"params": params}, _images(), ids, tags[:, :2])


@pytest.mark.parametrize("entities", [("brand", "season"), ()])
def test_image_views_are_the_global_and_entity_embeddings_of_one_pass(entities):
  cfg = e2_lib.e2_config(_clip(), entities=entities, tokens_per_entity=(2,) * len(entities),
                         fusion_after=(2, 3) if entities else ())
  model = e2_lib.E2Model(cfg)
  params = nn.unbox(e2_lib.init_params(cfg, jax.random.PRNGKey(1)))
  views = model.apply({"params": params}, _images(), method=model.encode_image_views)
  assert views.shape == (3, 1 + len(entities), 16)
  np.testing.assert_allclose(views[:, 0], model.apply({"params": params}, _images(),
                                                      method=model.encode_images), atol=1e-6)
  if entities:
    np.testing.assert_allclose(views[:, 1:], model.apply({"params": params}, _images(),
                                                         method=model.encode_entities),
                               atol=1e-6)
