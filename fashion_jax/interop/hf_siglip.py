"""transformers SiglipModel <-> fashion_jax.models.siglip params, both directions.

  load_siglip(path_or_id, **runtime) -> (SiglipConfig, params)
      A local HF SiglipModel directory (model.safetensors, or pytorch_model.bin read with
      weights_only=True) or, where the network allows, a hub id (hf_io.resolve_hf_path). Strict:
      another architecture (a custom-code `auto_map` config included), a missing key or a wrong
      shape raises CheckpointMismatchError naming the key and both shapes. `runtime` = dtype /
      scan / remat_policy / attention_impl; with scan=True the layers come stacked.
  save_siglip(out_dir, config, params, tokenizer=None, overwrite=False) -> Path
      Writes config.json (SiglipConfig, architectures ["SiglipModel"]), model.safetensors,
      preprocessor_config.json (SiglipImageProcessor: bicubic resize to image_size x image_size,
      no crop, the config's mean/std, 0.5 / 0.5 for SigLIP) and, given a transformers
      tokenizer, its files, so SiglipModel.from_pretrained and AutoProcessor load the directory.
      Refuses a non-empty directory unless overwrite=True (hf_io.prepare_export_dir).
  hf_state_to_params(config, state) / params_to_hf_state(config, params): the pure conversions.

Layouts are hf_clip's (same encoder layer keys, same transforms), plus:
  head.attention.in_proj_weight [3D, D] / in_proj_bias [3D] (torch nn.MultiheadAttention: q; k;
      v stacked by rows) <-> head/attn/{query,key,value} kernels [D, H, Dh] / biases [H, Dh];
  head.attention.out_proj -> head/attn/out; head.layernorm -> head/norm; head.mlp -> head/mlp;
  head.probe [1, 1, D] -> head/probe; patch_embedding.bias -> patch_embed/bias;
  text_model.head (Linear with bias) -> text/projection; logit_scale / logit_bias [1] -> [].
"""

import functools
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.models import siglip as siglip_lib

_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_HEAD = "vision_model.head.attention"
_QKV = ("q_proj", "k_proj", "v_proj")

_TRANSFORMS = hf_clip.TRANSFORMS  # The same tensor layouts as CLIP's.
_encoder_map = hf_clip.encoder_map
_ln = hf_clip.ln


def key_map(config: siglip_lib.SiglipConfig) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF key, Flax param path in the per-layer layout, transform kind) for each param.

  The head's fused in_proj appears as three per-projection keys `{_HEAD}.{q,k,v}_proj.{weight,
  bias}` (split_in_proj / merge_in_proj convert to and from the real state dict).
  """
  v, t = ("vision_model", ("vision",)), ("text_model", ("text",))
  head = v[1] + ("head",)
  entries = [
      ("logit_scale", ("logit_scale",), "scalar"),
      ("logit_bias", ("logit_bias",), "scalar"),
      ("vision_model.embeddings.patch_embedding.weight", v[1] + ("patch_embed", "kernel"), "conv"),
      ("vision_model.embeddings.patch_embedding.bias", v[1] + ("patch_embed", "bias"), "same"),
      ("vision_model.embeddings.position_embedding.weight", v[1] + ("pos_embedding",), "same"),
      ("vision_model.head.probe", head + ("probe",), "same"),
      (f"{_HEAD}.out_proj.weight", head + ("attn", "out", "kernel"), "out_kernel"),
      (f"{_HEAD}.out_proj.bias", head + ("attn", "out", "bias"), "same"),
      ("text_model.embeddings.token_embedding.weight", t[1] + ("token_embedding", "embedding"),
       "same"),
      ("text_model.embeddings.position_embedding.weight", t[1] + ("pos_embedding",), "same"),
      ("text_model.head.weight", t[1] + ("projection", "kernel"), "linear"),
      ("text_model.head.bias", t[1] + ("projection", "bias"), "same"),
  ]
  for hf_name, fx_name in zip(_QKV, ("query", "key", "value")):
    entries.append((f"{_HEAD}.{hf_name}.weight", head + ("attn", fx_name, "kernel"), "qkv_kernel"))
    entries.append((f"{_HEAD}.{hf_name}.bias", head + ("attn", fx_name, "bias"), "qkv_bias"))
  for n in ("1", "2"):
    entries.append((f"vision_model.head.mlp.fc{n}.weight", head + ("mlp", f"fc{n}", "kernel"),
                    "linear"))
    entries.append((f"vision_model.head.mlp.fc{n}.bias", head + ("mlp", f"fc{n}", "bias"),
                    "same"))
  entries += _ln("vision_model.head.layernorm", head + ("norm",))
  entries += _ln(f"{v[0]}.post_layernorm", v[1] + ("post_norm",))
  entries += _ln(f"{t[0]}.final_layer_norm", t[1] + ("final_norm",))
  entries += _encoder_map(f"{v[0]}.encoder", v[1] + ("encoder",), config.vision.num_layers)
  entries += _encoder_map(f"{t[0]}.encoder", t[1] + ("encoder",), config.text.num_layers)
  return entries


def split_in_proj(state: dict) -> dict:
  """The state with the head's in_proj_{weight,bias} [3D, ...] split into q/k/v_proj keys."""
  out = {k: v for k, v in state.items() if not k.startswith(f"{_HEAD}.in_proj_")}
  for kind in ("weight", "bias"):
    for name, part in zip(_QKV, np.split(np.asarray(state[f"{_HEAD}.in_proj_{kind}"]), 3)):
      out[f"{_HEAD}.{name}.{kind}"] = part
  return out


def merge_in_proj(state: dict) -> dict:
  """The inverse of split_in_proj: q/k/v_proj keys concatenated (q; k; v) into in_proj_*."""
  out = {k: v for k, v in state.items()
         if not k.startswith(tuple(f"{_HEAD}.{n}." for n in _QKV))}
  for kind in ("weight", "bias"):
    out[f"{_HEAD}.in_proj_{kind}"] = np.concatenate(
        [state[f"{_HEAD}.{n}.{kind}"] for n in _QKV], axis=0)
  return out


@functools.lru_cache(maxsize=16)
def _flax_shapes(config: siglip_lib.SiglipConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  return hf_clip.flax_shapes(siglip_lib.init_params, config)


def expected_hf_shapes(config: siglip_lib.SiglipConfig) -> dict[str, tuple[int, ...]]:
  """HF state_dict key -> shape for a SiglipModel of this architecture (real keys)."""
  fx = _flax_shapes(config)
  virtual = {hf: np.empty(_TRANSFORMS[kind][1](np.empty(fx[path], np.float32)).shape, np.uint8)
             for hf, path, kind in key_map(config)}
  return {k: tuple(a.shape) for k, a in merge_in_proj(virtual).items()}


def hf_state_to_params(config: siglip_lib.SiglipConfig, state: dict[str, np.ndarray]) -> dict:
  """A transformers SiglipModel state dict (numpy) -> our params (numpy float32).

  Raises CheckpointMismatchError (key and both shapes) unless the state is exactly this
  architecture. The layout follows config.scan.
  """
  hf_io.check_state(expected_hf_shapes(config), state, what="transformers SiglipModel",
                    ignore_unexpected=_IGNORED)
  return hf_clip.state_to_params(key_map(config), _flax_shapes(config), split_in_proj(state),
                                 config.scan)


def params_to_hf_state(config: siglip_lib.SiglipConfig, params: Any) -> dict[str, np.ndarray]:
  """Our params (boxed or not, per-layer or scanned, possibly sharded) -> HF state dict."""
  return merge_in_proj(hf_clip.params_to_state(key_map(config), _flax_shapes(config), params,
                                               "SiglipModel"))


def load_siglip(path_or_id: str, **runtime) -> tuple[siglip_lib.SiglipConfig, dict]:
  """(SiglipConfig, params) from an HF SiglipModel directory or hub id (module docstring)."""
  hf_config, state = hf_io.load_hf_checkpoint(path_or_id)
  try:
    config = siglip_lib.SiglipConfig.from_hf(hf_config, **runtime)
  except (KeyError, ValueError) as e:
    raise hf_io.CheckpointMismatchError(
        f"{path_or_id}: not a transformers SiglipModel checkpoint ({type(e).__name__}: {e})."
    ) from e
  return config, hf_state_to_params(config, state)


def image_processor(config: siglip_lib.SiglipConfig):
  """transformers' SigLIP image processor for this model: bicubic resize to S x S (no crop),
  /255, the config's mean / std. The PIL backend (torchvision is not a dependency)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  s = config.vision.image_size
  return transformers.SiglipImageProcessorPil(
      size={"height": s, "width": s}, resample=Image.BICUBIC,
      image_mean=list(config.vision.image_mean), image_std=list(config.vision.image_std))


def save_siglip(out_dir: str, config: siglip_lib.SiglipConfig, params: Any,
                tokenizer: Optional[Any] = None, overwrite: bool = False,
                matryoshka_dims: Sequence[int] = ()) -> pathlib.Path:
  """Writes a transformers SiglipModel directory; see the module docstring.

  matryoshka_dims: the widths a Matryoshka model was trained at (0 = full), recorded as the
  config.json key `matryoshka_dims` (transformers keeps unknown keys; `api.load` and the search
  index read it). Empty: no key.
  """
  state = params_to_hf_state(config, params)  # Validate before touching the directory.
  out = hf_io.prepare_export_dir(out_dir, overwrite)
  hf_config = config.to_hf()
  hf_config.architectures = ["SiglipModel"]
  hf_config.dtype = "float32"
  if matryoshka_dims:
    hf_config.matryoshka_dims = [int(d) for d in matryoshka_dims]
  hf_config.save_pretrained(str(out))
  hf_io.save_safetensors(state, str(out / "model.safetensors"))
  image_processor(config).save_pretrained(str(out))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  # A stale file from an overwritten export (e.g. an old pytorch_model.bin) would shadow ours.
  for name in hf_io.WEIGHT_FILES:
    if name != "model.safetensors" and (out / name).exists():
      (out / name).unlink()
  return out
