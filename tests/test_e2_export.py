"""E2 export: the torch module of ours reproduces the Flax forward; files round trip; the CLIP
part loads as a transformers CLIPModel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_jax.interop import e2_torch
from fashion_jax.interop import hf_io
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import e2 as e2_lib
from fashion_jax.models import vit as vit_lib


def _config(**kw):
  clip_cfg = clip_lib.clip_config(
      "tiny", projection_dim=16,
      vision=dict(width=32, num_layers=4, num_heads=2, mlp_dim=64, patch_size=8, image_size=32),
      text=dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=60, max_len=10,
                eos_token_id=59, bos_token_id=58, pad_token_id=59))
  return e2_lib.e2_config(clip_cfg, **kw)


def _inputs(b=3):
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (b, 32, 32, 3)).astype(np.uint8)
  ids = np.full((b, 10), 59, np.int32)
  tags = np.full((b, 4, 10), 59, np.int32)
  for i in range(b):
    n = rs.randint(2, 8)
    ids[i, 0], ids[i, 1:n] = 58, rs.randint(0, 58, n - 1)
    for e in range(4):
      m = rs.randint(2, 5)
      tags[i, e, 0], tags[i, e, 1:m] = 58, rs.randint(0, 58, m - 1)
  return images, ids, tags


def _randomise(params, seed=1):
  """Non-trivial LayerNorm/bias values so that a mapping mistake cannot hide."""
  leaves, tree = jax.tree.flatten(params)
  rs = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [np.asarray(
      np.asarray(x) + 0.05 * rs.randn(*np.shape(x)), np.float32) for x in leaves])


@pytest.mark.parametrize("kw", [dict(), dict(fusion_after=(), tokens_per_entity=(1, 3, 2, 2))])
def test_torch_module_matches_flax(tmp_path, kw):
  config = _config(**kw)
  params = _randomise(jax.device_get(nn.unbox(e2_lib.init_params(config, jax.random.PRNGKey(0)))))
  images, ids, tags = _inputs()
  flax_out = e2_lib.E2Model(config).apply({"params": params}, images, ids, tags)
  flax_vis = e2_lib.E2Model(config).apply({"params": params}, images,
                                          method=lambda m, x: m.vision(x))
  out_dir = e2_torch.export_e2(str(tmp_path / "e2"), config, params)
  model = e2_torch.E2Torch.from_pretrained(str(out_dir))
  pixels = np.asarray(vit_lib.normalize_images(jnp.asarray(images))).transpose(0, 3, 1, 2)
  with torch.no_grad():
    t_out = model(torch.from_numpy(pixels), torch.from_numpy(ids).long(),
                  torch.from_numpy(tags).long())
    t_vis = model.encode_image(torch.from_numpy(pixels))
  for k in ("image_embeds", "text_embeds", "entity_image_embeds", "entity_text_embeds",
            "logit_scale"):
    np.testing.assert_allclose(t_out[k].numpy(), np.asarray(flax_out[k]), atol=1e-4, err_msg=k)
  np.testing.assert_allclose(t_vis["tokens"].numpy(), np.asarray(flax_vis["tokens"]), atol=1e-4)
  if config.fusion_after:  # The same patches are picked.
    np.testing.assert_array_equal(t_vis["selections"].numpy(), np.asarray(flax_vis["selections"]))
  # Flax round trip of the files.
  config2, params2 = e2_torch.load_e2(str(out_dir))
  assert config2 == config
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params2, params)


def test_clip_part_exports_as_clipmodel(tmp_path):
  config = _config()
  params = _randomise(jax.device_get(nn.unbox(e2_lib.init_params(config, jax.random.PRNGKey(2)))))
  out_dir = e2_torch.export_e2(str(tmp_path / "e2"), config, params)
  clip = transformers.CLIPModel.from_pretrained(str(out_dir / "clip")).eval()
  images, ids, _ = _inputs()
  pixels = np.asarray(vit_lib.normalize_images(jnp.asarray(images))).transpose(0, 3, 1, 2)
  with torch.no_grad():
    text = clip.get_text_features(input_ids=torch.from_numpy(ids).long())
  text = getattr(text, "pooler_output", text)
  ours = clip_lib.CLIPModel(config.clip).apply({"params": e2_lib.clip_part(params)}, ids,
                                               normalize=False,
                                               method=clip_lib.CLIPModel.encode_texts)
  np.testing.assert_allclose(text.numpy(), np.asarray(ours), atol=1e-4)
  del pixels


def test_export_refuses_params_of_another_config(tmp_path):
  config = _config()
  params = jax.device_get(nn.unbox(e2_lib.init_params(config, jax.random.PRNGKey(0))))
  other = _config(entities=("brand", "season"))
  with pytest.raises(hf_io.CheckpointMismatchError, match="entity_composition_norm"):
    e2_torch.export_e2(str(tmp_path / "x"), other, params)
  state = e2_torch.params_to_state(config, params)
  state["e2.selection_tokens"] = state["e2.selection_tokens"][:3]
  with pytest.raises(hf_io.CheckpointMismatchError, match="e2.selection_tokens"):
    e2_torch.state_to_params(config, state)
