"""open_clip checkpoint directories -> transformers CLIP / SigLIP configs and state dicts.

  is_open_clip_dir(path) -> bool: a local directory holding open_clip_config.json.
  to_hf(path_or_id, vision_heads=None) -> OpenClipCheckpoint
      Reads open_clip_config.json {"model_cfg", "preprocess_cfg"} and the weights
      (open_clip_model.safetensors, open_clip_pytorch_model.safetensors, or
      open_clip_pytorch_model.bin read with torch.load(weights_only=True)) and returns the model
      as a transformers CLIPModel ('clip') or SiglipModel ('siglip') config dict + state dict,
      with the preprocessing, text cleaning and tokenizer facts the config carries. Our models
      load the result with hf_clip.hf_state_to_params(CLIPConfig.from_hf(hf_config), hf_state)
      (SigLIP: the same through hf_siglip / SiglipConfig.from_hf).
  clean_text(kind, s): open_clip's text cleaning ('canonicalize', 'lower', 'whitespace').

Two layouts are supported; anything else (a ResNet or CoCa model, an HF text tower, layer scale,
attentional pooling, qk-norm, another timm tower) is refused with a ValueError naming the field:
  'clip':   open_clip's own ViT + causal text tower (OpenAI, LAION, Marqo-FashionCLIP). Text keys
            at the top level or under `text.` (custom_text). Text pooling is argmax(ids) (the EOT
            id is the largest), which transformers spells eos_token_id=2 (its legacy path).
  'siglip': a timm SigLIP ViT (class_token=False, global_pool 'map', timm_proj 'none') and
            open_clip's text tower without causal mask, pooled at the last position
            (ViT-B-16-SigLIP, Marqo-FashionSigLIP).
Activations follow open_clip, not transformers' SigLIP defaults: open_clip's towers use
x*sigmoid(1.702x) ('quick_gelu') when model_cfg.quick_gelu, otherwise exact erf GELU ('gelu'),
tanh GELU only with act_kwargs {"approximate": "tanh"} (SigLIP2 text); timm towers are always
exact GELU. LayerNorm eps: open_clip 1e-5 unless norm_kwargs.eps; timm ViTs 1e-6.

Key mapping (open_clip -> transformers; `T` = transposed: open_clip's bare projection
Parameters are [in, out], a torch Linear weight [out, in]):
  visual.conv1 -> vision_model.embeddings.patch_embedding; visual.class_embedding ->
  ...embeddings.class_embedding; visual.positional_embedding -> ...position_embedding.weight;
  visual.ln_pre -> pre_layrnorm (sic); visual.ln_post -> post_layernorm; visual.proj ->
  visual_projection.weight (T); {visual.,}transformer.resblocks.i -> encoder.layers.i with
  ln_1/ln_2 -> layer_norm1/2, attn.in_proj_{weight,bias} (rows q; k; v) -> self_attn.{q,k,v}_proj,
  attn.out_proj -> self_attn.out_proj, mlp.c_fc/c_proj -> mlp.fc1/fc2; token_embedding,
  positional_embedding, ln_final -> text_model.embeddings.*, final_layer_norm; text_projection ->
  text_projection.weight (T) / SigLIP text_model.head; logit_scale (CLIP 0-d; SigLIP [1]).
  timm: trunk.patch_embed.proj -> patch_embedding (with bias); trunk.pos_embed[0] ->
  position_embedding.weight; blocks.i.norm1/norm2 -> layer_norm1/2; attn.qkv (rows q; k; v) ->
  q/k/v_proj; attn.proj -> out_proj; trunk.norm -> post_layernorm; attn_pool.latent ->
  head.probe; cat(attn_pool.q, attn_pool.kv) -> head.attention.in_proj_{weight,bias};
  attn_pool.proj -> head.attention.out_proj; attn_pool.norm -> head.layernorm; attn_pool.mlp ->
  head.mlp.
Every open_clip key and shape is checked (hf_io.check_state) against the shapes the config
implies before anything is converted, so a mismatch names the open_clip key and both shapes.
"""

import dataclasses
import html
import json
import pathlib
import re
import string
from typing import Any, Mapping, Optional

import ftfy
import numpy as np
import transformers

from fashion_jax.interop import hf_io
from fashion_jax.models import vit as vit_lib

CONFIG_FILE = "open_clip_config.json"
# In open_clip's own order of preference (factory._find_checkpoint_in_dir).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin")
KINDS = ("clip", "siglip")
CLEAN_KINDS = ("canonicalize", "lower", "whitespace")
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Preprocessing when preprocess_cfg leaves a field out (FRONTIER section 3).
_DEFAULT_PREPROCESS = {
    "clip": dict(mean=vit_lib.CLIP_MEAN, std=vit_lib.CLIP_STD, interpolation="bicubic",
                 resize_mode="shortest"),
    "siglip": dict(mean=SIGLIP_MEAN, std=SIGLIP_STD, interpolation="bicubic",
                   resize_mode="squash"),
}

# timm SigLIP ViT names (vit_{size}_patch{P}_siglip_{S}) -> (width, heads): the head count is not
# in the weights or in open_clip's config, only in timm's model definition.
_TIMM_SIGLIP = re.compile(r"vit_(base|large|so400m)_patch(\d+)_siglip_(\d+)")
_TIMM_SIZES = {"base": (768, 12), "large": (1024, 16), "so400m": (1152, 16)}
_TIMM_EPS = 1e-6

# Config fields that do not change the inference function of the supported layouts: dropout,
# training/freezing options, output plumbing, tokenizer details the tokenizer itself carries.
# final_ln_after_pool is here because LayerNorm is per token: LN then pool == pool then LN for
# the 'tok' / 'argmax' / 'last' pools, the only ones supported.
_IGNORED_MODEL = {"cast_dtype", "output_dict", "init_logit_scale", "nonscalar_logit_scale"}
_IGNORED_VISION = {"patch_dropout", "output_tokens", "final_ln_after_pool",
                   "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                   "timm_drop", "timm_drop_path", "timm_proj_bias"}
_IGNORED_TEXT = {"hf_tokenizer_name", "tokenizer_kwargs", "pad_id", "eos_id", "output_tokens",
                 "final_ln_after_pool", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
# Fields that must keep open_clip's default (None / False / a value) for the supported layouts.
_BLOCK_DEFAULTS = dict(ls_init_value=None, block_type=(None, "default"), qk_norm=False,
                       scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
                       scale_attn=False, scale_fc=False)
_VIT_DEFAULTS = dict(_BLOCK_DEFAULTS, attentional_pool=False, no_ln_pre=False,
                     pos_embed_type="learnable", pool_type="tok", timm_model_name=None)
_VIT_SHAPE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
              "act_kwargs", "norm_kwargs", "timm_pool", "timm_proj"}
_TIMM_VISION = {"timm_model_name", "timm_pool", "timm_proj", "image_size", "layers", "width",
                "head_width", "mlp_ratio", "patch_size"}  # the last four: timm ignores them.
_TEXT_SHAPE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
               "act_kwargs", "norm_kwargs"}
_TEXT_DEFAULTS = dict(_BLOCK_DEFAULTS, embed_cls=False, hf_model_name=None, tokenizer_mode=None)


@dataclasses.dataclass(frozen=True)
class OpenClipCheckpoint:
  """An open_clip checkpoint in transformers' terms.

  kind: 'clip' (transformers CLIPModel) or 'siglip' (SiglipModel).
  hf_config: transformers CLIPConfig.to_dict() / SiglipConfig.to_dict() of the architecture.
  hf_state: {transformers state_dict key: float32 numpy array}.
  preprocess: dict(mean (3 floats), std (3 floats), interpolation ('bicubic' | 'bilinear'),
    resize_mode ('shortest' (+ centre crop) | 'longest' | 'squash')), from preprocess_cfg, each
    missing field defaulted per kind (CLIP: OpenAI statistics, shortest; SigLIP: 0.5, squash).
  text_clean: clean_text kind ('canonicalize' | 'lower' | 'whitespace') of text_cfg
    .tokenizer_kwargs.clean; default 'whitespace' for an HF tokenizer, 'lower' for open_clip's
    CLIP BPE tokenizer (as open_clip's tokenizers default).
  tokenizer_name: text_cfg.hf_tokenizer_name (an HF hub id), None for the CLIP BPE tokenizer.
  context_length: text_cfg.context_length (ids are padded / truncated to it).
  """
  kind: str
  hf_config: dict
  hf_state: dict
  preprocess: dict
  text_clean: str
  tokenizer_name: Optional[str]
  context_length: int


# --- text cleaning -------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(s: str) -> str:
  """ftfy.fix_text (mojibake, curly quotes, NFC), HTML entities unescaped twice, strip."""
  return html.unescape(html.unescape(ftfy.fix_text(s))).strip()


def text_clean_of(text_cfg: dict, where: str) -> str:
  """The clean_text kind an open_clip text_cfg asks for (open_clip's rule).

  text_cfg.tokenizer_kwargs.clean when given, else 'whitespace' with an HF tokenizer
  (text_cfg.hf_tokenizer_name) and 'lower' with open_clip's own CLIP BPE. ValueError, prefixed
  with `where` (the config file and key), for tokenizer_kwargs that is not an object or a kind
  not in CLEAN_KINDS.
  """
  kwargs = text_cfg.get("tokenizer_kwargs") or {}
  if not isinstance(kwargs, dict):
    raise ValueError(f"{where}.text_cfg.tokenizer_kwargs={kwargs!r} is not an object.")
  clean = kwargs.get("clean", "whitespace" if text_cfg.get("hf_tokenizer_name") else "lower")
  if clean not in CLEAN_KINDS:
    raise ValueError(f"{where}.text_cfg.tokenizer_kwargs.clean={clean!r} is not one of "
                     f"{CLEAN_KINDS}.")
  return clean


def clean_text(kind: str, s: str) -> str:
  """open_clip's text cleaning of `s` (tokenizer.get_clean_fn(kind)), applied before tokenising.

  'whitespace': basic clean, then runs of whitespace -> one space.
  'lower': 'whitespace', then lower case.
  'canonicalize': basic clean, '_' -> ' ', drop string.punctuation, lower case, collapse
    whitespace (big_vision's canonicalisation, which SigLIP was trained with).
  """
  if kind not in CLEAN_KINDS:
    raise ValueError(f"Unknown text cleaning {kind!r}; expected one of {CLEAN_KINDS}.")
  if not isinstance(s, str):
    raise TypeError(f"clean_text expects a str, got {type(s).__name__}: {s!r}.")
  s = _basic_clean(s)
  if kind == "canonicalize":
    s = s.replace("_", " ").translate(_PUNCTUATION).lower()
  s = " ".join(s.split())
  return s.lower() if kind == "lower" else s


# --- reading --------------------------------------------------------------------------------------


def is_open_clip_dir(path) -> bool:
  """True iff `path` is a local directory with an open_clip_config.json (no network)."""
  p = pathlib.Path(path)
  return p.is_dir() and (p / CONFIG_FILE).is_file()


def read_config(root: pathlib.Path) -> tuple[dict, dict]:
  """(model_cfg, preprocess_cfg) of open_clip_config.json in `root`; clear errors naming it."""
  f = root / CONFIG_FILE
  if not f.is_file():
    raise FileNotFoundError(f"{f} not found: not an open_clip checkpoint directory.")
  try:
    d = json.loads(f.read_text())
  except ValueError as e:
    raise ValueError(f"{f} is not valid JSON: {e}") from e
  if not isinstance(d, dict) or not isinstance(d.get("model_cfg"), dict):
    raise ValueError(f"{f} has no 'model_cfg' object (keys: "
                     f"{sorted(d) if isinstance(d, dict) else type(d).__name__}).")
  model_cfg = d["model_cfg"]
  for tower in ("vision_cfg", "text_cfg"):
    if not isinstance(model_cfg.get(tower), dict):
      raise ValueError(f"{f}: model_cfg.{tower} is missing or not an object.")
  preprocess_cfg = d.get("preprocess_cfg") or {}
  if not isinstance(preprocess_cfg, dict):
    raise ValueError(f"{f}: preprocess_cfg must be an object, got {preprocess_cfg!r}.")
  return model_cfg, preprocess_cfg


def read_weights(root: pathlib.Path) -> dict[str, np.ndarray]:
  """The first of WEIGHT_FILES in `root` as {key: float32 array}.

  Safetensors are header-checked first (hf_io.CorruptWeightsError names a truncated file); a
  .bin is read with torch.load(weights_only=True), so a pickle that would build anything but
  tensors is refused (pickle.UnpicklingError), never executed.
  """
  for name in WEIGHT_FILES:
    f = root / name
    if f.is_file():
      state = hf_io._read_weight_file(f)  # pylint: disable=protected-access
      return {k: np.asarray(v, np.float32) for k, v in state.items()}
  raise FileNotFoundError(f"No open_clip weights in {root}: expected one of "
                          f"{', '.join(WEIGHT_FILES)}.")


# --- config checks --------------------------------------------------------------------------------


def _check_fields(cfg: Mapping[str, Any], where: str, allowed: set, defaults: Mapping[str, Any],
                  ignored: set) -> None:
  """ValueError naming the field unless each field of `cfg` is allowed, ignored, or equal to (one
  of) its value in `defaults` (checked first). Absent fields keep open_clip's defaults."""
  for key, value in cfg.items():
    if key in defaults:
      want = defaults[key]
      ok = value in want if isinstance(want, tuple) else value == want
      if not ok:
        raise ValueError(f"{where}.{key}={value!r} is not supported (only {want!r}).")
    elif key not in allowed and key not in ignored:
      raise ValueError(f"{where}.{key}={value!r} is not supported by this importer.")


def _act(where: str, quick_gelu: bool, act_kwargs: Optional[Mapping[str, Any]]) -> str:
  """transformers hidden_act of an open_clip tower (module docstring)."""
  act_kwargs = dict(act_kwargs or {})
  if not act_kwargs:
    return "quick_gelu" if quick_gelu else "gelu"
  if not quick_gelu and act_kwargs == {"approximate": "tanh"}:
    return "gelu_pytorch_tanh"
  raise ValueError(f"{where}.act_kwargs={act_kwargs!r} with quick_gelu={quick_gelu} is not "
                   "supported (only {'approximate': 'tanh'} on GELU).")


def _eps(where: str, norm_kwargs: Optional[Mapping[str, Any]]) -> float:
  norm_kwargs = dict(norm_kwargs or {})
  if set(norm_kwargs) - {"eps"}:
    raise ValueError(f"{where}.norm_kwargs={norm_kwargs!r}: only 'eps' is supported.")
  return float(norm_kwargs.get("eps", 1e-5))


def _square(where: str, value: Any) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{where}={value!r}: only square sizes are supported.")
    value = value[0]
  return int(value)


def _preprocess(kind: str, cfg: Mapping[str, Any], where: str) -> dict:
  out = dict(_DEFAULT_PREPROCESS[kind])
  for key in ("mean", "std"):
    if key in cfg:
      value = cfg[key]
      try:
        value = tuple(float(v) for v in value)
      except (TypeError, ValueError):
        value = ()
      if len(value) != 3 or (key == "std" and min(value) <= 0):
        raise ValueError(f"{where}.{key}={cfg[key]!r}: expected 3 per-channel values"
                         + (" > 0." if key == "std" else "."))
      out[key] = value
  for key, allowed in (("interpolation", INTERPOLATIONS), ("resize_mode", RESIZE_MODES)):
    if key in cfg:
      if cfg[key] not in allowed:
        raise ValueError(f"{where}.{key}={cfg[key]!r} is not supported; expected one of "
                         f"{allowed}.")
      out[key] = cfg[key]
  out["mean"], out["std"] = tuple(out["mean"]), tuple(out["std"])
  return out


# --- state conversion -----------------------------------------------------------------------------


def _ln_shapes(key: str, width: int) -> dict[str, tuple[int, ...]]:
  return {f"{key}.weight": (width,), f"{key}.bias": (width,)}


def _linear_shapes(key: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
  return {f"{key}.weight": (n_out, n_in), f"{key}.bias": (n_out,)}


def _resblock_shapes(prefix: str, layers: int, width: int, mlp: int) -> dict:
  """Shapes of open_clip ResidualAttentionBlocks `{prefix}.{i}.*`."""
  shapes = {}
  for i in range(layers):
    p = f"{prefix}.{i}"
    shapes.update(_ln_shapes(f"{p}.ln_1", width))
    shapes.update(_ln_shapes(f"{p}.ln_2", width))
    shapes[f"{p}.attn.in_proj_weight"] = (3 * width, width)
    shapes[f"{p}.attn.in_proj_bias"] = (3 * width,)
    shapes.update(_linear_shapes(f"{p}.attn.out_proj", width, width))
    shapes.update(_linear_shapes(f"{p}.mlp.c_fc", mlp, width))
    shapes.update(_linear_shapes(f"{p}.mlp.c_proj", width, mlp))
  return shapes


def _copy(out: dict, hf_key: str, state: Mapping[str, np.ndarray], oc_key: str) -> None:
  out[f"{hf_key}.weight"] = state[f"{oc_key}.weight"]
  out[f"{hf_key}.bias"] = state[f"{oc_key}.bias"]


def _split_qkv(out: dict, hf_attn: str, weight: np.ndarray, bias: np.ndarray) -> None:
  """Rows [q; k; v] of a fused [3D, D] projection -> {q,k,v}_proj.{weight,bias}."""
  for name, w, b in zip(("q_proj", "k_proj", "v_proj"), np.split(weight, 3, axis=0),
                        np.split(bias, 3, axis=0)):
    out[f"{hf_attn}.{name}.weight"] = w
    out[f"{hf_attn}.{name}.bias"] = b


def _resblocks_to_hf(out: dict, state: Mapping[str, np.ndarray], oc_prefix: str,
                     hf_prefix: str, layers: int) -> None:
  for i in range(layers):
    o, h = f"{oc_prefix}.{i}", f"{hf_prefix}.layers.{i}"
    _copy(out, f"{h}.layer_norm1", state, f"{o}.ln_1")
    _copy(out, f"{h}.layer_norm2", state, f"{o}.ln_2")
    _split_qkv(out, f"{h}.self_attn", state[f"{o}.attn.in_proj_weight"],
               state[f"{o}.attn.in_proj_bias"])
    _copy(out, f"{h}.self_attn.out_proj", state, f"{o}.attn.out_proj")
    _copy(out, f"{h}.mlp.fc1", state, f"{o}.mlp.c_fc")
    _copy(out, f"{h}.mlp.fc2", state, f"{o}.mlp.c_proj")


def _text_prefix(state: Mapping[str, np.ndarray]) -> str:
  """'text.' for custom_text checkpoints, '' for CLIP's top-level text keys (both occur)."""
  return "text." if any(k.startswith("text.") for k in state) else ""


def _text_dims(t: Mapping[str, Any], where: str) -> dict:
  width = int(t.get("width", 512))
  heads = int(t.get("heads", 8))
  if width % heads:
    raise ValueError(f"{where}.width={width} is not divisible by heads={heads}.")
  return dict(width=width, heads=heads, layers=int(t.get("layers", 12)),
              mlp=int(width * float(t.get("mlp_ratio", 4.0))),
              context=int(t.get("context_length", 77)), vocab=int(t.get("vocab_size", 49408)))


def _text_shapes(tp: str, d: dict) -> dict:
  shapes = {f"{tp}token_embedding.weight": (d["vocab"], d["width"]),
            f"{tp}positional_embedding": (d["context"], d["width"])}
  shapes.update(_resblock_shapes(f"{tp}transformer.resblocks", d["layers"], d["width"],
                                 d["mlp"]))
  shapes.update(_ln_shapes(f"{tp}ln_final", d["width"]))
  return shapes


def _text_to_hf(out: dict, state: Mapping[str, np.ndarray], tp: str, d: dict) -> None:
  out["text_model.embeddings.token_embedding.weight"] = state[f"{tp}token_embedding.weight"]
  out["text_model.embeddings.position_embedding.weight"] = state[f"{tp}positional_embedding"]
  _resblocks_to_hf(out, state, f"{tp}transformer.resblocks", "text_model.encoder", d["layers"])
  _copy(out, "text_model.final_layer_norm", state, f"{tp}ln_final")


def _clip(model_cfg: Mapping[str, Any], state: Mapping[str, np.ndarray], where: str
          ) -> tuple[dict, dict, set]:
  """(hf_config, hf_state, open_clip keys read) of an open_clip ViT CLIP."""
  v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  quick_gelu = bool(model_cfg.get("quick_gelu", False))
  _check_fields(v, f"{where}.vision_cfg", _VIT_SHAPE, _VIT_DEFAULTS, _IGNORED_VISION)
  _check_fields(t, f"{where}.text_cfg", _TEXT_SHAPE, dict(
      _TEXT_DEFAULTS, no_causal_mask=False, pool_type="argmax", proj_type="linear",
      proj_bias=False), _IGNORED_TEXT)
  if isinstance(v.get("layers", 12), (list, tuple)):
    raise ValueError(f"{where}.vision_cfg.layers={v['layers']!r}: a ResNet vision tower is not "
                     "supported (ViT only).")
  embed = int(model_cfg.get("embed_dim", 512))
  width = int(v.get("width", 768))
  head_width = int(v.get("head_width", 64))
  if width % head_width:
    raise ValueError(f"{where}.vision_cfg.width={width} is not divisible by head_width="
                     f"{head_width}.")
  patch = int(v.get("patch_size", 16))
  size = _square(f"{where}.vision_cfg.image_size", v.get("image_size", 224))
  if size % patch:
    raise ValueError(f"{where}.vision_cfg.image_size={size} is not a multiple of patch_size="
                     f"{patch}.")
  vl = int(v.get("layers", 12))
  vmlp = int(width * float(v.get("mlp_ratio", 4.0)))
  td = _text_dims(t, f"{where}.text_cfg")
  tp = _text_prefix(state)

  expected = {"visual.conv1.weight": (width, 3, patch, patch),
              "visual.class_embedding": (width,),
              "visual.positional_embedding": ((size // patch) ** 2 + 1, width),
              "visual.proj": (width, embed), f"{tp}text_projection": (td["width"], embed),
              "logit_scale": ()}
  expected.update(_ln_shapes("visual.ln_pre", width))
  expected.update(_ln_shapes("visual.ln_post", width))
  expected.update(_resblock_shapes("visual.transformer.resblocks", vl, width, vmlp))
  expected.update(_text_shapes(tp, td))
  state = dict(state)
  if state.get("logit_scale") is not None and state["logit_scale"].shape == (1,):
    state["logit_scale"] = state["logit_scale"].reshape(())  # nonscalar_logit_scale
  if "logit_bias" in state:
    raise ValueError(f"{where}: a CLIP ViT with a logit_bias (SigLIP loss) has no transformers "
                     "CLIPModel equivalent.")
  hf_io.check_state(expected, state, what=f"{where} (open_clip CLIP)")

  out = {"logit_scale": state["logit_scale"],
         "visual_projection.weight": state["visual.proj"].T,
         "text_projection.weight": state[f"{tp}text_projection"].T,
         "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
         "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
         "vision_model.embeddings.position_embedding.weight":
             state["visual.positional_embedding"]}
  _copy(out, "vision_model.pre_layrnorm", state, "visual.ln_pre")
  _copy(out, "vision_model.post_layernorm", state, "visual.ln_post")
  _resblocks_to_hf(out, state, "visual.transformer.resblocks", "vision_model.encoder", vl)
  _text_to_hf(out, state, tp, td)

  v_act = _act(f"{where}.vision_cfg", quick_gelu, v.get("act_kwargs"))
  t_act = _act(f"{where}.text_cfg", quick_gelu, t.get("act_kwargs"))
  config = transformers.CLIPConfig(
      projection_dim=embed,
      vision_config=dict(
          hidden_size=width, intermediate_size=vmlp, num_hidden_layers=vl,
          num_attention_heads=width // head_width, patch_size=patch, image_size=size,
          num_channels=3, hidden_act=v_act,
          layer_norm_eps=_eps(f"{where}.vision_cfg", v.get("norm_kwargs")),
          projection_dim=embed),
      text_config=dict(
          hidden_size=td["width"], intermediate_size=td["mlp"],
          num_hidden_layers=td["layers"], num_attention_heads=td["heads"],
          vocab_size=td["vocab"], max_position_embeddings=td["context"], hidden_act=t_act,
          layer_norm_eps=_eps(f"{where}.text_cfg", t.get("norm_kwargs")),
          # 2 = transformers' legacy EOS id: pool at argmax(ids), as open_clip's 'argmax'. BOS
          # is the second-largest id and pad 0 in open_clip's CLIP BPE tokenizer (49406 of
          # 49408); the model never reads them.
          eos_token_id=2, bos_token_id=td["vocab"] - 2, pad_token_id=0, projection_dim=embed))
  config.architectures = ["CLIPModel"]
  return config.to_dict(), out, set(expected)


def _check_timm_name(name: str, vision_heads: Optional[int], where: str) -> None:
  if vision_heads is None and not _TIMM_SIGLIP.fullmatch(str(name)):
    raise ValueError(
        f"{where}.vision_cfg.timm_model_name={name!r} is not a timm SigLIP ViT "
        "(vit_{base,large,so400m}_patch<P>_siglip_<S>); its head count is not in the "
        "checkpoint: pass vision_heads= if it is one (class_token=False, global_pool='map').")


def _timm_heads(name: str, width: int, vision_heads: Optional[int], where: str) -> int:
  if vision_heads is not None:
    if vision_heads <= 0 or width % vision_heads:
      raise ValueError(f"vision_heads={vision_heads} does not divide the timm width {width}.")
    return int(vision_heads)
  _check_timm_name(name, vision_heads, where)
  want_width, heads = _TIMM_SIZES[_TIMM_SIGLIP.fullmatch(str(name)).group(1)]
  if width != want_width:
    raise ValueError(f"{where}: timm model {name!r} has width {want_width}, the checkpoint "
                     f"{width} (visual.trunk.patch_embed.proj.weight).")
  return heads


def _siglip(model_cfg: Mapping[str, Any], state: Mapping[str, np.ndarray], where: str,
            vision_heads: Optional[int]) -> tuple[dict, dict, set]:
  """(hf_config, hf_state, open_clip keys read) of a timm-SigLIP + open_clip text model."""
  v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  quick_gelu = bool(model_cfg.get("quick_gelu", False))
  _check_fields(v, f"{where}.vision_cfg", _TIMM_VISION, {}, _IGNORED_VISION)
  for key, want in (("timm_pool", "map"), ("timm_proj", "none")):
    if v.get(key) != want:
      raise ValueError(f"{where}.vision_cfg.{key}={v.get(key)!r} is not supported (only "
                       f"{want!r}: the attention-pool head and no extra projection).")
  _check_fields(t, f"{where}.text_cfg", _TEXT_SHAPE | {"proj_bias"}, dict(
      _TEXT_DEFAULTS, no_causal_mask=True, pool_type="last", proj_type=("linear", "none")),
                _IGNORED_TEXT)
  # open_clip's defaults (causal mask, argmax pooling) are CLIP's: SigLIP must say otherwise.
  for key, want in (("no_causal_mask", True), ("pool_type", "last")):
    if key not in t:
      raise ValueError(f"{where}.text_cfg.{key} is absent (open_clip's default is CLIP's); a "
                       f"SigLIP text tower needs {key}={want!r}.")
  name = v["timm_model_name"]
  _check_timm_name(name, vision_heads, where)
  pw = state.get("visual.trunk.patch_embed.proj.weight")
  if pw is None or pw.ndim != 4:
    raise ValueError(f"{where}: visual.trunk.patch_embed.proj.weight is missing or not 4-D; not "
                     f"a timm ViT checkpoint of {name!r}.")
  width, patch = int(pw.shape[0]), int(pw.shape[2])
  heads = _timm_heads(name, width, vision_heads, where)
  size = _square(f"{where}.vision_cfg.image_size", v.get("image_size", 224))
  if size % patch:
    raise ValueError(f"{where}.vision_cfg.image_size={size} is not a multiple of the patch "
                     f"size {patch}.")
  block = re.compile(r"visual\.trunk\.blocks\.(\d+)\.")
  vl = 1 + max((int(m.group(1)) for k in state if (m := block.match(k))), default=-1)
  fc1 = state.get("visual.trunk.blocks.0.mlp.fc1.weight")
  vmlp = int(fc1.shape[0]) if fc1 is not None else 4 * width
  embed = int(model_cfg.get("embed_dim", width))
  if embed != width:
    raise ValueError(f"{where}.embed_dim={embed} != the timm width {width}: with timm_proj "
                     "'none' the image embedding is the trunk's width.")
  td = _text_dims(t, f"{where}.text_cfg")
  tp = _text_prefix(state)
  proj_type = t.get("proj_type", "linear")
  proj_bias = bool(t.get("proj_bias", False))
  if proj_type == "none" and td["width"] != embed:
    raise ValueError(f"{where}.text_cfg.proj_type='none' needs text width == embed_dim "
                     f"({td['width']} != {embed}).")

  tr = "visual.trunk"
  expected = {f"{tr}.patch_embed.proj.weight": (width, 3, patch, patch),
              f"{tr}.patch_embed.proj.bias": (width,),
              f"{tr}.pos_embed": (1, (size // patch) ** 2, width),
              f"{tr}.attn_pool.latent": (1, 1, width), "logit_scale": (), "logit_bias": ()}
  for i in range(vl):
    b = f"{tr}.blocks.{i}"
    expected.update(_ln_shapes(f"{b}.norm1", width))
    expected.update(_ln_shapes(f"{b}.norm2", width))
    expected.update(_linear_shapes(f"{b}.attn.qkv", 3 * width, width))
    expected.update(_linear_shapes(f"{b}.attn.proj", width, width))
    expected.update(_linear_shapes(f"{b}.mlp.fc1", vmlp, width))
    expected.update(_linear_shapes(f"{b}.mlp.fc2", width, vmlp))
  expected.update(_ln_shapes(f"{tr}.norm", width))
  ap = f"{tr}.attn_pool"
  expected.update(_linear_shapes(f"{ap}.q", width, width))
  expected.update(_linear_shapes(f"{ap}.kv", 2 * width, width))
  expected.update(_linear_shapes(f"{ap}.proj", width, width))
  expected.update(_ln_shapes(f"{ap}.norm", width))
  expected.update(_linear_shapes(f"{ap}.mlp.fc1", vmlp, width))
  expected.update(_linear_shapes(f"{ap}.mlp.fc2", width, vmlp))
  expected.update(_text_shapes(tp, td))
  if proj_type == "linear" and proj_bias:
    expected.update(_linear_shapes(f"{tp}text_projection", embed, td["width"]))
  elif proj_type == "linear":
    expected[f"{tp}text_projection"] = (td["width"], embed)
  state = {k: (a.reshape(()) if k in ("logit_scale", "logit_bias") and a.shape == (1,) else a)
           for k, a in state.items()}
  hf_io.check_state(expected, state, what=f"{where} (open_clip timm-SigLIP)")

  vm = "vision_model"
  out = {"logit_scale": state["logit_scale"].reshape(1),
         "logit_bias": state["logit_bias"].reshape(1),
         f"{vm}.embeddings.position_embedding.weight": state[f"{tr}.pos_embed"][0],
         f"{vm}.head.probe": state[f"{ap}.latent"],
         f"{vm}.head.attention.in_proj_weight": np.concatenate(
             [state[f"{ap}.q.weight"], state[f"{ap}.kv.weight"]], axis=0),
         f"{vm}.head.attention.in_proj_bias": np.concatenate(
             [state[f"{ap}.q.bias"], state[f"{ap}.kv.bias"]], axis=0)}
  _copy(out, f"{vm}.embeddings.patch_embedding", state, f"{tr}.patch_embed.proj")
  for i in range(vl):
    b, h = f"{tr}.blocks.{i}", f"{vm}.encoder.layers.{i}"
    _copy(out, f"{h}.layer_norm1", state, f"{b}.norm1")
    _copy(out, f"{h}.layer_norm2", state, f"{b}.norm2")
    _split_qkv(out, f"{h}.self_attn", state[f"{b}.attn.qkv.weight"],
               state[f"{b}.attn.qkv.bias"])
    _copy(out, f"{h}.self_attn.out_proj", state, f"{b}.attn.proj")
    _copy(out, f"{h}.mlp.fc1", state, f"{b}.mlp.fc1")
    _copy(out, f"{h}.mlp.fc2", state, f"{b}.mlp.fc2")
  _copy(out, f"{vm}.post_layernorm", state, f"{tr}.norm")
  _copy(out, f"{vm}.head.attention.out_proj", state, f"{ap}.proj")
  _copy(out, f"{vm}.head.layernorm", state, f"{ap}.norm")
  _copy(out, f"{vm}.head.mlp.fc1", state, f"{ap}.mlp.fc1")
  _copy(out, f"{vm}.head.mlp.fc2", state, f"{ap}.mlp.fc2")
  _text_to_hf(out, state, tp, td)
  # transformers' text head is always a biased Linear: a bias-free projection gets a zero bias,
  # proj_type 'none' the identity.
  if proj_type == "linear" and proj_bias:
    _copy(out, "text_model.head", state, f"{tp}text_projection")
  else:
    weight = (state[f"{tp}text_projection"].T if proj_type == "linear"
              else np.eye(embed, dtype=np.float32))
    out["text_model.head.weight"] = weight
    out["text_model.head.bias"] = np.zeros((embed,), np.float32)

  config = transformers.SiglipConfig(
      vision_config=dict(
          hidden_size=width, intermediate_size=vmlp, num_hidden_layers=vl,
          num_attention_heads=heads, patch_size=patch, image_size=size, num_channels=3,
          hidden_act="gelu", layer_norm_eps=_TIMM_EPS, vision_use_head=True),
      text_config=dict(
          hidden_size=td["width"], intermediate_size=td["mlp"],
          num_hidden_layers=td["layers"], num_attention_heads=td["heads"],
          vocab_size=td["vocab"], max_position_embeddings=td["context"],
          hidden_act=_act(f"{where}.text_cfg", quick_gelu, t.get("act_kwargs")),
          layer_norm_eps=_eps(f"{where}.text_cfg", t.get("norm_kwargs")),
          # SigLIP's SentencePiece ids (pad = EOS = 1, no BOS); the model never reads them
          # (last-position pooling, no padding mask).
          pad_token_id=1, eos_token_id=1, bos_token_id=None, projection_size=embed))
  config.architectures = ["SiglipModel"]
  return config.to_dict(), out, set(expected)


def to_hf(path_or_id: str, vision_heads: Optional[int] = None) -> OpenClipCheckpoint:
  """The open_clip checkpoint at `path_or_id` (a local directory, or an HF hub id where the
  network allows) as an OpenClipCheckpoint; see the module docstring.

  vision_heads: the attention heads of a timm vision tower whose name is not a known timm SigLIP
    ViT (the head count is in neither the weights nor open_clip's config); ignored for 'clip'.
  Raises FileNotFoundError (no config / no weights file, naming the path), ValueError naming the
  config field of an unsupported model, hf_io.CheckpointMismatchError naming the open_clip key
  and both shapes, hf_io.CorruptWeightsError for a truncated file.
  """
  root = hf_io.resolve_hf_path(path_or_id)
  model_cfg, preprocess_cfg = read_config(root)
  where = f"{root / CONFIG_FILE}: model_cfg"
  _check_fields(model_cfg, where, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu",
                                   "custom_text", "init_logit_bias"}, {}, _IGNORED_MODEL)
  v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  state = read_weights(root)
  if v.get("timm_model_name"):
    kind = "siglip"
    hf_config, hf_state, _ = _siglip(model_cfg, state, where, vision_heads)
  else:
    kind = "clip"
    hf_config, hf_state, _ = _clip(model_cfg, state, where)
  hf_state = {k: np.array(a, np.float32, order="C") for k, a in hf_state.items()}
  tokenizer_name = t.get("hf_tokenizer_name") or None
  text_clean = text_clean_of(t, where)
  return OpenClipCheckpoint(
      kind=kind, hf_config=hf_config, hf_state=hf_state,
      preprocess=_preprocess(kind, preprocess_cfg, f"{root / CONFIG_FILE}: preprocess_cfg"),
      text_clean=text_clean, tokenizer_name=tokenizer_name,
      context_length=int(t.get("context_length", 77)))
