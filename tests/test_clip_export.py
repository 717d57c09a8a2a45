"""Flax FashionCLIP -> transformers CLIPModel directory, bit-exact; strict import errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from fashion_jax.interop import hf_clip
from fashion_jax.interop.hf_io import CheckpointMismatchError
from fashion_jax.models import clip as clip_lib
from tests.test_clip_parity import TEXTS, make_hf_clip, make_tokenizer, random_images

SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, patch_size=8, image_size=32, hidden_act="quick_gelu")
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="quick_gelu")


def _our_config(tokenizer, **runtime):
  return clip_lib.clip_config(
      "tiny", projection_dim=24,
      vision=dict(width=48, num_layers=2, num_heads=4, mlp_dim=96, patch_size=8, image_size=32),
      text=dict(width=32, num_layers=3, num_heads=2, mlp_dim=64, vocab_size=len(tokenizer),
                max_len=16, act="gelu", eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
      **runtime)


def _random_params(config, seed=0):
  """Params with every leaf random (LayerNorm scales/biases and logit scale included)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(jax.jit(functools.partial(clip_lib.init_params, config))(
      jax.random.PRNGKey(seed)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [jnp.asarray(l) + 0.1 * np.asarray(rng.randn(*l.shape), np.float32)
                                   for l in leaves])


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_to_transformers_is_bit_exact(tmp_path, scan):
  tok = make_tokenizer(tmp_path / "tok")
  config = _our_config(tok, scan=scan)
  params = _random_params(config)
  out = hf_clip.save_clip(str(tmp_path / "export"), config, params, tokenizer=tok)

  model, info = transformers.CLIPModel.from_pretrained(str(out), output_loading_info=True)
  model.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  expected = hf_clip.params_to_hf_state(config, params)
  sd = model.state_dict()
  assert set(expected) == {k for k in sd if not k.endswith("position_ids")}
  for key, value in expected.items():
    assert sd[key].dtype == torch.float32
    np.testing.assert_array_equal(sd[key].numpy(), value, err_msg=key)

  processor = transformers.CLIPProcessor.from_pretrained(str(out))
  inputs = processor(text=TEXTS, images=random_images(2), return_tensors="pt", padding=True)
  assert inputs["pixel_values"].shape == (2, 3, 32, 32)
  np.testing.assert_array_equal(inputs["input_ids"][0].numpy(),
                                tok(TEXTS[0], padding="longest")["input_ids"]
                                + [tok.pad_token_id] * (inputs["input_ids"].shape[1] -
                                                        len(tok(TEXTS[0])["input_ids"])))
  with torch.no_grad():
    want = model(**inputs)
  ours = jax.jit(clip_lib.CLIPModel(config).apply)(
      {"params": params}, jnp.asarray(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)),
      jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy()))
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    np.testing.assert_allclose(np.asarray(ours[key]), getattr(want, key).numpy(), atol=1e-4,
                               err_msg=key)

  # Back again: the exported directory imports to the same params.
  config2, params2 = hf_clip.load_clip(str(out), scan=scan)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def _zero_params(config):
  """Zeros of the right shapes, from eval_shape (no init compute)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(functools.partial(clip_lib.init_params, config), jax.random.PRNGKey(0))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes))


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path):
  tok = make_tokenizer(tmp_path / "tok")
  config = _our_config(tok)
  params = _zero_params(config)
  target = tmp_path / "export"
  target.mkdir()
  (target / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty"):
    hf_clip.save_clip(str(target), config, params)
  assert not (target / "model.safetensors").exists()
  # Overwrite never deletes the user's own files (issue #16 item 3): refused, file kept.
  with pytest.raises(FileExistsError, match=r"notes\.txt, which no export writes"):
    hf_clip.save_clip(str(target), config, params, overwrite=True)
  assert (target / "notes.txt").read_text() == "keep me"
  (target / "notes.txt").unlink()
  (target / "pytorch_model.bin").write_bytes(b"stale weights of an older export")
  hf_clip.save_clip(str(target), config, params, overwrite=True)
  assert (target / "model.safetensors").exists()
  # Overwrite replaces the export: no stale file of the previous export is left behind.
  assert not (target / "pytorch_model.bin").exists()


def test_overwrite_never_deletes_what_no_export_writes(tmp_path):
  tok = make_tokenizer(tmp_path / "tok")
  config = _our_config(tok)
  params = _zero_params(config)
  target = tmp_path / "data"
  (target / "images").mkdir(parents=True)
  (target / "images" / "shoe.jpg").write_bytes(b"jpeg")
  with pytest.raises(FileExistsError, match=r"shoe\.jpg, which no export writes"):
    hf_clip.save_clip(str(target), config, params, overwrite=True)
  assert (target / "images" / "shoe.jpg").read_bytes() == b"jpeg"


def test_export_refuses_params_that_are_not_plain_clip(tmp_path):
  tok = make_tokenizer(tmp_path / "tok")
  config = _our_config(tok)
  params = dict(_zero_params(config))
  params["vision"] = dict(params["vision"], selection_tokens=jnp.zeros((8, 48)))
  with pytest.raises(CheckpointMismatchError, match="vision/selection_tokens"):
    hf_clip.save_clip(str(tmp_path / "out"), config, params)
  assert not (tmp_path / "out").exists()


def test_import_names_the_key_and_both_shapes(tmp_path):
  tok = make_tokenizer(tmp_path / "tok")
  make_hf_clip(tmp_path / "hf", tok, SMALL_VISION, SMALL_TEXT)
  weights = tmp_path / "hf" / "model.safetensors"
  state = load_file(str(weights))
  key = "vision_model.encoder.layers.1.mlp.fc1.weight"
  state[key] = np.zeros((65, 32), np.float32)
  save_file(state, str(weights), metadata={"format": "pt"})
  with pytest.raises(CheckpointMismatchError,
                     match=r"'vision_model\.encoder\.layers\.1\.mlp\.fc1\.weight': checkpoint "
                           r"shape \(65, 32\) != expected shape \(64, 32\)"):
    hf_clip.load_clip(str(tmp_path / "hf"))
  del state[key]
  save_file(state, str(weights), metadata={"format": "pt"})
  with pytest.raises(CheckpointMismatchError, match=r"missing key 'vision_model\.encoder\.layers"
                                                    r"\.1\.mlp\.fc1\.weight' \(expected shape "
                                                    r"\(64, 32\)\)"):
    hf_clip.load_clip(str(tmp_path / "hf"))


def test_import_rejects_another_architecture(tmp_path):
  tok = make_tokenizer(tmp_path / "tok")
  make_hf_clip(tmp_path / "hf", tok, SMALL_VISION, SMALL_TEXT)
  # A checkpoint whose config claims one more text layer than its weights hold.
  cfg = transformers.CLIPConfig.from_pretrained(str(tmp_path / "hf"))
  cfg.text_config.num_hidden_layers = 3
  cfg.save_pretrained(str(tmp_path / "hf"))
  with pytest.raises(CheckpointMismatchError, match=r"missing key 'text_model\.encoder\.layers"
                                                    r"\.2\.self_attn\.q_proj\.weight'"):
    hf_clip.load_clip(str(tmp_path / "hf"))
  # A vision-only model is not a CLIPModel.
  vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL_VISION))
  vision.save_pretrained(str(tmp_path / "vision_only"))
  with pytest.raises(CheckpointMismatchError, match="not a transformers CLIPModel checkpoint"):
    hf_clip.load_clip(str(tmp_path / "vision_only"))
