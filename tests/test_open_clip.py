"""open_clip checkpoints imported through interop.open_clip agree with open_clip's own forward.

Tiny random open_clip models (odd widths and head counts) are built here, saved as open_clip
checkpoint directories (open_clip_config.json + safetensors or .bin), and re-loaded by open_clip
itself (`create_model('local-dir:...')`, so the files are what open_clip reads); its
encode_image / encode_text are the reference. The timm-SigLIP vision tower is a tiny timm
VisionTransformer(class_token=False, global_pool='map') registered under a test-only timm name.

open_clip and timm are imported through tests/torchvision_cpu.py (no working torchvision on CPU);
the reference tests skip with the reason when open_clip is not installed, the error tests run.
"""

import json
import pickle
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_siglip
from fashion_jax.interop import open_clip as oc_import
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import siglip as siglip_lib
from tests import torchvision_cpu

TOL = 1e-4
TIMM_NAME = "fashion_jax_test_siglip_vit"
# The tiny timm SigLIP ViT: width 36, 3 heads (head dim 12), 2 blocks, patch 8 on 32x32 images.
TIMM_ARCH = dict(img_size=32, patch_size=8, embed_dim=36, depth=2, num_heads=3, mlp_ratio=2.5)


@pytest.fixture(scope="module")
def ocl():
  """The open_clip module (timm SigLIP test model registered), or skip with the reason."""
  try:
    module = torchvision_cpu.import_open_clip()
  except ImportError as e:
    pytest.skip(f"open_clip reference unavailable: {e}")
  import timm  # pylint: disable=g-import-not-at-top  (imported by import_open_clip)
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top

  if not timm.models.is_model(TIMM_NAME):
    def fashion_jax_test_siglip_vit(pretrained=False, **kwargs):
      del pretrained
      # open_clip's TimmModel passes num_classes=0, global_pool='map' (timm_proj 'none').
      args = dict(TIMM_ARCH, class_token=False, global_pool="map")
      args.update({k: kwargs[k] for k in ("num_classes", "global_pool") if k in kwargs})
      return vision_transformer.VisionTransformer(**args)

    fashion_jax_test_siglip_vit.__module__ = vision_transformer.__name__
    timm.models.register_model(fashion_jax_test_siglip_vit)
  return module


def _perturb(model, seed):
  """Adds noise to every parameter: open_clip and timm init LayerNorms to 1 / 0, biases to 0 and
  matrices small (std 0.02: near-uniform attention, which would hide a q/k mix-up)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_((0.15 if p.ndim >= 2 else 0.3) * torch.randn(p.shape, generator=g))
  return model


def _save(ocl, directory, model_cfg, preprocess_cfg, fmt, seed=0):
  """Builds a random open_clip model from model_cfg, saves it as a checkpoint directory and
  returns open_clip's own re-load of that directory (eval mode)."""
  torch.manual_seed(seed)
  cfg = json.loads(json.dumps(model_cfg))
  custom = cfg.pop("custom_text", False)
  cls = ocl.model.CustomTextCLIP if custom else ocl.model.CLIP
  model = _perturb(cls(**cfg), seed).eval()
  directory.mkdir(parents=True)
  (directory / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  if fmt == "bin":
    torch.save(state, directory / "open_clip_pytorch_model.bin")
  else:
    save_file(state, str(directory / "open_clip_model.safetensors"))
  loaded = ocl.create_model(f"local-dir:{directory}").eval()
  for k, v in loaded.state_dict().items():  # The files hold exactly the random model.
    torch.testing.assert_close(v, state[k], rtol=0, atol=0)
  return loaded


def _inputs(image_size, context, vocab, n_img=3, n_txt=4, seed=0, eot=None):
  """Normalised images (NCHW torch, NHWC jax) and ids; with `eot`, CLIP-style rows: ids < eot,
  EOT (the largest id) at varying positions, 0-padding after it."""
  rng = np.random.RandomState(seed)
  images = rng.randn(n_img, 3, image_size, image_size).astype(np.float32)
  if eot is None:
    ids = rng.randint(0, vocab, (n_txt, context))
  else:
    ids = np.zeros((n_txt, context), np.int64)
    for i, n in enumerate(np.linspace(2, context, n_txt).astype(int)):
      ids[i, :n - 1] = rng.randint(1, eot, n - 1)
      ids[i, n - 1] = eot
  return (torch.from_numpy(images), jnp.asarray(images.transpose(0, 2, 3, 1)),
          torch.from_numpy(ids), jnp.asarray(ids, jnp.int32))


def _load_strict(torch_model, state):
  """load_state_dict where only transformers' position_ids buffers may be absent."""
  res = torch_model.load_state_dict({k: torch.from_numpy(a) for k, a in state.items()},
                                    strict=False)
  assert not res.unexpected_keys, res.unexpected_keys
  assert all(k.endswith("position_ids") for k in res.missing_keys), res.missing_keys


def _close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref.detach().numpy(), np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = np.max(np.abs(ours - ref))
  assert err < TOL, f"{what}: max |ours - open_clip| = {err:.2e}"


# --- CLIP ViT ------------------------------------------------------------------------------------

CLIP_CASES = {
    # OpenAI-style: QuickGELU, top-level text keys, safetensors.
    "quickgelu_safetensors": dict(
        model_cfg=dict(embed_dim=24, quick_gelu=True, vision_cfg=dict(
            image_size=32, layers=2, width=36, head_width=12, patch_size=8, mlp_ratio=2.5),
                       text_cfg=dict(context_length=12, vocab_size=64, width=20, heads=5,
                                     layers=2, mlp_ratio=3.0)),
        preprocess_cfg={"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                        "interpolation": "bilinear", "resize_mode": "shortest"},
        fmt="safetensors"),
    # LAION-style exact GELU, custom_text (text.* keys), eps 1e-6, as a .bin.
    "gelu_customtext_bin": dict(
        model_cfg=dict(embed_dim=16, custom_text=True, vision_cfg=dict(
            image_size=24, layers=1, width=30, head_width=10, patch_size=6,
            norm_kwargs={"eps": 1e-6}),
                       text_cfg=dict(context_length=10, vocab_size=50, width=28, heads=7,
                                     layers=3, norm_kwargs={"eps": 1e-6})),
        preprocess_cfg={}, fmt="bin"),
}


@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clip_matches_open_clip(ocl, tmp_path, name):
  case = CLIP_CASES[name]
  ref = _save(ocl, tmp_path / "oc", case["model_cfg"], case["preprocess_cfg"], case["fmt"])
  ck = oc_import.to_hf(str(tmp_path / "oc"))
  assert ck.kind == "clip"
  v, t = case["model_cfg"]["vision_cfg"], case["model_cfg"]["text_cfg"]
  act = "quick_gelu" if case["model_cfg"].get("quick_gelu") else "gelu"
  assert ck.hf_config["vision_config"]["hidden_act"] == act
  assert ck.hf_config["text_config"]["hidden_act"] == act

  config = clip_lib.CLIPConfig.from_hf(ck.hf_config)
  params = hf_clip.hf_state_to_params(config, ck.hf_state)
  img_t, img_j, ids_t, ids_j = _inputs(v["image_size"], t["context_length"], t["vocab_size"],
                                       eot=t["vocab_size"] - 1)
  ours = jax.jit(clip_lib.CLIPModel(config).apply)({"params": params}, img_j, ids_j)
  with torch.no_grad():
    _close(ours["image_embeds"], ref.encode_image(img_t, normalize=True), "image_embeds")
    _close(ours["text_embeds"], ref.encode_text(ids_t, normalize=True), "text_embeds")
    _close(ours["logit_scale"], ref.logit_scale.exp(), "logit_scale")

  # The hf pair is a valid transformers CLIPModel checkpoint (strict load, same features).
  hf = transformers.CLIPModel(transformers.CLIPConfig.from_dict(ck.hf_config)).eval()
  _load_strict(hf, ck.hf_state)
  with torch.no_grad():
    feats = hf.get_image_features(pixel_values=img_t)
    _close(getattr(feats, "pooler_output", feats), ref.encode_image(img_t), "HF image features")


def test_clip_preprocess_text_facts_from_config(ocl, tmp_path):
  case = CLIP_CASES["quickgelu_safetensors"]
  cfg = json.loads(json.dumps(case["model_cfg"]))
  cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "whitespace"}
  _save(ocl, tmp_path / "a", cfg, case["preprocess_cfg"], "safetensors")
  ck = oc_import.to_hf(str(tmp_path / "a"))
  assert ck.preprocess == dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                               interpolation="bilinear", resize_mode="shortest")
  assert (ck.text_clean, ck.tokenizer_name, ck.context_length) == ("whitespace", None, 12)
  # No preprocess_cfg, no clean: CLIP defaults (OpenAI statistics, bicubic, shortest side) and
  # open_clip's CLIP BPE tokenizer's default cleaning ('lower').
  _save(ocl, tmp_path / "b", CLIP_CASES["gelu_customtext_bin"]["model_cfg"], {}, "bin")
  ck = oc_import.to_hf(str(tmp_path / "b"))
  assert ck.preprocess == dict(mean=(0.48145466, 0.4578275, 0.40821073),
                               std=(0.26862954, 0.26130258, 0.27577711),
                               interpolation="bicubic", resize_mode="shortest")
  assert (ck.text_clean, ck.tokenizer_name, ck.context_length) == ("lower", None, 10)


# --- timm SigLIP ----------------------------------------------------------------------------------

SIGLIP_TEXT = dict(context_length=9, vocab_size=40, width=20, heads=5, layers=2,
                   no_causal_mask=True, pool_type="last", norm_kwargs={"eps": 1e-6},
                   hf_tokenizer_name="timm/ViT-B-16-SigLIP",
                   tokenizer_kwargs={"clean": "canonicalize"})
SIGLIP_CASES = {
    # ViT-B-16-SigLIP's layout: biased text projection, exact GELU everywhere.
    "siglip1": dict(text=dict(SIGLIP_TEXT, proj_bias=True), text_act="gelu"),
    # SigLIP2-style text (tanh GELU) with a bias-free projection (a zero-bias HF head).
    "tanh_text_nobias": dict(text=dict(SIGLIP_TEXT, act_kwargs={"approximate": "tanh"}),
                             text_act="gelu_pytorch_tanh"),
}


def _siglip_cfg(text):
  return dict(embed_dim=TIMM_ARCH["embed_dim"], init_logit_bias=-10, custom_text=True,
              vision_cfg=dict(image_size=32, timm_model_name=TIMM_NAME,
                              timm_model_pretrained=False, timm_pool="map", timm_proj="none"),
              text_cfg=text)


@pytest.mark.parametrize("name", list(SIGLIP_CASES))
def test_siglip_matches_open_clip(ocl, tmp_path, name):
  case = SIGLIP_CASES[name]
  preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                "resize_mode": "squash"}
  ref = _save(ocl, tmp_path / "oc", _siglip_cfg(case["text"]), preprocess, "safetensors")
  assert ref.visual.trunk.attn_pool is not None and ref.visual.trunk.cls_token is None
  ck = oc_import.to_hf(str(tmp_path / "oc"), vision_heads=TIMM_ARCH["num_heads"])
  assert ck.kind == "siglip"
  assert ck.hf_config["vision_config"]["hidden_act"] == "gelu"  # timm: exact GELU.
  assert ck.hf_config["text_config"]["hidden_act"] == case["text_act"]
  assert ck.preprocess == dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                               resize_mode="squash")
  assert (ck.text_clean, ck.tokenizer_name, ck.context_length) == (
      "canonicalize", "timm/ViT-B-16-SigLIP", 9)
  t = case["text"]
  img_t, img_j, ids_t, ids_j = _inputs(32, t["context_length"], t["vocab_size"])
  with torch.no_grad():
    ref_img = ref.encode_image(img_t)
    ref_txt = ref.encode_text(ids_t)
    ref_logits = (ref.logit_scale.exp() * ocl_normalize(ref_img) @ ocl_normalize(ref_txt).T
                  + ref.logit_bias)

  # Check 1: transformers' SiglipModel from (hf_config, hf_state), strict.
  hf = transformers.SiglipModel(transformers.SiglipConfig.from_dict(ck.hf_config)).eval()
  _load_strict(hf, ck.hf_state)
  with torch.no_grad():
    fi = hf.get_image_features(pixel_values=img_t)
    ft = hf.get_text_features(input_ids=ids_t)
    out = hf(pixel_values=img_t, input_ids=ids_t)
  _close(getattr(fi, "pooler_output", fi), ref_img, "HF image features")
  _close(getattr(ft, "pooler_output", ft), ref_txt, "HF text features")
  _close(out.logits_per_image, ref_logits, "HF logits_per_image")

  # Check 2: our SiglipModel through H1's transformers importer.
  config = siglip_lib.SiglipConfig.from_hf(ck.hf_config)
  params = hf_siglip.hf_state_to_params(config, ck.hf_state)
  ours = jax.jit(siglip_lib.SiglipModel(config).apply)({"params": params}, img_j, ids_j)
  _close(ours["image_embeds"], ocl_normalize(ref_img), "image_embeds")
  _close(ours["text_embeds"], ocl_normalize(ref_txt), "text_embeds")
  _close(ours["logits_per_image"], ref_logits, "logits_per_image")


def ocl_normalize(x):
  return torch.nn.functional.normalize(x, dim=-1)


# --- text cleaning --------------------------------------------------------------------------------

CLEAN_SAMPLES = [
    "  A Red_Dress,  with   GOLD buttons!! ", "caf\u00e9 \u2018quoted\u2019 &amp;amp; more",
    "tab\tand\nnewline", "mojibake: caf\u00c3\u00a9", "(50% off) {size: M} #summer",
    string.punctuation + " x", "",
]


@pytest.mark.parametrize("kind", oc_import.CLEAN_KINDS)
def test_clean_text_matches_open_clip(ocl, kind):
  from open_clip import tokenizer  # pylint: disable=g-import-not-at-top  (optional dependency)
  ref = tokenizer.get_clean_fn(kind)
  for s in CLEAN_SAMPLES:
    assert oc_import.clean_text(kind, s) == ref(s), (kind, s)


def test_clean_text_bad_kind():
  with pytest.raises(ValueError, match="'shout'"):
    oc_import.clean_text("shout", "x")


# --- errors ---------------------------------------------------------------------------------------


def _dir(tmp_path, model_cfg, weights=True, preprocess_cfg=None):
  d = tmp_path / "ck"
  d.mkdir()
  (d / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}))
  if weights:
    save_file({"logit_scale": torch.zeros(())}, str(d / "open_clip_model.safetensors"))
  return d


def test_is_open_clip_dir_and_missing_files(tmp_path):
  assert not oc_import.is_open_clip_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
    oc_import.to_hf(str(tmp_path))
  d = _dir(tmp_path, CLIP_CASES["quickgelu_safetensors"]["model_cfg"], weights=False)
  assert oc_import.is_open_clip_dir(d)
  with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors.*"
                     "open_clip_pytorch_model.bin"):
    oc_import.to_hf(str(d))


@pytest.mark.parametrize("tower,field,value,match", [
    ("vision_cfg", "layers", [3, 4, 6, 3], "ResNet"),
    ("text_cfg", "hf_model_name", "roberta-base", "hf_model_name='roberta-base'"),
    ("vision_cfg", "ls_init_value", 0.1, "ls_init_value=0.1"),
    ("text_cfg", "pool_type", "eos", "pool_type='eos'"),
    ("vision_cfg", "timm_model_name", "convnext_base", "convnext_base"),
    ("model", "multimodal_cfg", {"width": 8}, "multimodal_cfg"),
])
def test_unsupported_model_cfg(tmp_path, tower, field, value, match):
  cfg = json.loads(json.dumps(CLIP_CASES["quickgelu_safetensors"]["model_cfg"]))
  (cfg if tower == "model" else cfg[tower])[field] = value
  if field == "timm_model_name":
    cfg["vision_cfg"].update(timm_pool="map", timm_proj="none")
    cfg["text_cfg"].update(no_causal_mask=True, pool_type="last")
  with pytest.raises(ValueError, match=match):
    oc_import.to_hf(str(_dir(tmp_path, cfg)))


def test_bad_preprocess_cfg(ocl, tmp_path):
  case = CLIP_CASES["quickgelu_safetensors"]
  _save(ocl, tmp_path / "a", case["model_cfg"], {"resize_mode": "crop"}, "safetensors")
  with pytest.raises(ValueError, match="resize_mode='crop'"):
    oc_import.to_hf(str(tmp_path / "a"))


def test_shape_mismatch_names_key_and_shapes(ocl, tmp_path):
  case = CLIP_CASES["quickgelu_safetensors"]
  _save(ocl, tmp_path / "a", case["model_cfg"], {}, "safetensors")
  cfg = json.loads((tmp_path / "a" / "open_clip_config.json").read_text())
  cfg["model_cfg"]["embed_dim"] = 25  # The weights project to 24.
  (tmp_path / "a" / "open_clip_config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"'visual.proj': checkpoint shape \(36, 24\) != expected shape "
                     r"\(36, 25\)"):
    oc_import.to_hf(str(tmp_path / "a"))


def test_unknown_timm_name_needs_heads(ocl, tmp_path):
  _save(ocl, tmp_path / "a", _siglip_cfg(dict(SIGLIP_TEXT, proj_bias=True)), {}, "safetensors")
  with pytest.raises(ValueError, match=f"{TIMM_NAME}.*vision_heads="):
    oc_import.to_hf(str(tmp_path / "a"))


class _NotATensor:
  """A pickled object that is not a tensor: weights_only=True must refuse to build it."""


def test_bin_is_read_with_weights_only(tmp_path):
  d = _dir(tmp_path, CLIP_CASES["quickgelu_safetensors"]["model_cfg"], weights=False)
  torch.save({"logit_scale": torch.zeros(()), "evil": _NotATensor()},
             d / "open_clip_pytorch_model.bin")
  with pytest.raises(pickle.UnpicklingError, match="Refused to load"):
    oc_import.to_hf(str(d))
