"""FashionCLIP imported from tiny random transformers CLIPModels agrees with torch (float32).

Also holds the fixtures the other CLIP tests import: a tiny CLIP BPE tokenizer written by the
test, and a tiny random HF CLIPModel directory (weights, tokenizer, preprocessor config).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_jax.interop import hf_clip
from fashion_jax.models import clip as clip_lib

TEXTS = ["a photo of a red dress", "black shoes with a red heel", "blue silk dress",
         "long sleeves"]
_WORDS = ["a", "photo", "of", "red", "dress", "black", "shoes", "with", "heel", "blue", "silk",
          "long", "sleeves"]


def _bytes_to_unicode():
  """GPT-2 / CLIP byte -> printable unicode character table."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def make_tokenizer(directory):
  """A tiny CLIP BPE tokenizer (byte symbols + merges of a few fashion words), saved and loaded.

  EOS has the largest id, as in OpenAI's vocabulary, so the legacy argmax pooling is valid.
  """
  symbols = list(_bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  merges = []
  for w in _WORDS:
    parts = list(w[:-1]) + [w[-1] + "</w>"]
    while len(parts) > 1:
      merged = parts[0] + parts[1]
      if (parts[0], parts[1]) not in merges:
        merges.append((parts[0], parts[1]))
        if merged not in vocab:
          vocab.append(merged)
      parts = [merged] + parts[2:]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>"}))
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def make_hf_clip(directory, tokenizer, vision, text, projection_dim=24, seed=0,
                 legacy_eos=False):
  """A random transformers CLIPModel (LayerNorms and logit scale perturbed), saved to `directory`
  with the tokenizer and a CLIP image processor. Returns the torch model (eval mode)."""
  text = dict(vocab_size=len(tokenizer), max_position_embeddings=16,
              eos_token_id=2 if legacy_eos else tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                projection_dim=projection_dim)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name == "logit_scale":
        p.add_(0.2 * torch.randn_like(p))
  model.save_pretrained(str(directory))
  tokenizer.save_pretrained(str(directory))
  s = vision["image_size"]
  transformers.CLIPImageProcessorPil(size={"shortest_edge": s},
                                     crop_size={"height": s, "width": s}).save_pretrained(
                                         str(directory))
  return model


def random_images(n, seed=0, sizes=((40, 30), (33, 50), (64, 64), (25, 41))):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 256, (*sizes[i % len(sizes)], 3)).astype(np.uint8) for i in range(n)]


CONFIGS = {
    # vision: patch 8 / image 32; text gelu; new-style EOS pooling; unrolled layers.
    "p8_quickgelu": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, patch_size=8, image_size=32, hidden_act="quick_gelu"),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="gelu"),
        projection_dim=24, legacy_eos=False, scan=False),
    # vision: patch 4 / image 24, gelu; text quick_gelu, 8 heads; legacy (argmax) pooling.
    "p4_gelu_legacy_eos": dict(
        vision=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=1,
                    num_attention_heads=2, patch_size=4, image_size=24, hidden_act="gelu"),
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, hidden_act="quick_gelu"),
        projection_dim=16, legacy_eos=True, scan=False),
    # Imported into the scanned layout; tanh-GELU vision tower.
    "p16_tanh_scan": dict(
        vision=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=5, patch_size=16, image_size=48,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, hidden_act="quick_gelu"),
        projection_dim=32, legacy_eos=False, scan=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_embeddings_and_logits_match_torch(tmp_path, name):
  c = CONFIGS[name]
  tok = make_tokenizer(tmp_path / "tok")
  torch_model = make_hf_clip(tmp_path / "hf", tok, c["vision"], c["text"], c["projection_dim"],
                             legacy_eos=c["legacy_eos"])
  config, params = hf_clip.load_clip(str(tmp_path / "hf"), scan=c["scan"])
  assert config.scan == c["scan"]
  processor = transformers.CLIPProcessor.from_pretrained(str(tmp_path / "hf"))
  # Padding to the longest string: the mask matters for all tokens, not for the pooled one.
  inputs = processor(text=TEXTS, images=random_images(3), return_tensors="pt", padding=True)
  with torch.no_grad():
    out = torch_model(**inputs)
  model = clip_lib.CLIPModel(config)
  pixels = jnp.asarray(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1))
  ids = jnp.asarray(inputs["input_ids"].numpy())
  mask = jnp.asarray(inputs["attention_mask"].numpy())
  ours = jax.jit(model.apply)({"params": params}, pixels, ids, mask)
  for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
    np.testing.assert_allclose(np.asarray(ours[key]), getattr(out, key).numpy(), atol=1e-4,
                               err_msg=key)
  text_tokens = jax.jit(lambda p: model.apply({"params": p}, ids, mask,
                                              method=lambda m, i, a: m.text(i, a)))(params)
  np.testing.assert_allclose(np.asarray(text_tokens["tokens"]),
                             out.text_model_output.last_hidden_state.numpy(), atol=1e-4)
  vision = jax.jit(lambda p: model.apply({"params": p}, pixels,
                                         method=lambda m, x: m.vision(x)))(params)
  np.testing.assert_allclose(np.asarray(vision["tokens"]),
                             out.vision_model_output.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(float(ours["logit_scale"]),
                             float(torch_model.logit_scale.detach().exp()), rtol=1e-6)
  # The last layers computed for the CLS / EOS token only: the same embeddings as torch's.
  pooled = clip_lib.CLIPModel(dataclasses.replace(config, pooled_last_layer=True))
  ours = jax.jit(pooled.apply)({"params": params}, pixels, ids, mask)
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    np.testing.assert_allclose(np.asarray(ours[key]), getattr(out, key).numpy(), atol=1e-4,
                               err_msg=f"pooled_last_layer {key}")


@pytest.mark.parametrize("variant,expected_b32", [("B/32", 151_277_313), ("B/16", None),
                                                  ("L/14", None)])
def test_param_counts_equal_transformers(variant, expected_b32):
  config = clip_lib.clip_config(variant)
  with torch.device("meta"):
    torch_model = transformers.CLIPModel(config.to_hf())
  torch_count = sum(p.numel() for p in torch_model.parameters())
  assert clip_lib.count_params(config) == torch_count
  assert clip_lib.count_params(config.replace(scan=True)) == torch_count
  if expected_b32 is not None:
    assert torch_count == expected_b32


def test_config_round_trips_through_transformers():
  config = clip_lib.clip_config("tiny", vision=dict(act="gelu_tanh"), text=dict(max_len=32))
  hf = config.to_hf()
  assert hf.vision_config.hidden_act == "gelu_pytorch_tanh"
  assert hf.text_config.max_position_embeddings == 32
  assert clip_lib.CLIPConfig.from_hf(hf) == config
  assert clip_lib.CLIPConfig.from_hf(hf.to_dict()) == config
  assert clip_lib.CLIPConfig.from_dict(config.to_dict()) == config
  bad = hf.to_dict()
  bad["text_config"]["hidden_act"] = "relu"
  with pytest.raises(ValueError, match="text hidden_act 'relu' is not supported"):
    clip_lib.CLIPConfig.from_hf(bad)
