"""FashionCLIP: the CLIP dual encoder (ViT image tower + causal text tower) and its config.

  image_embeds = normalize(ViT(images).embedding)      [B_i, P]
  text_embeds  = normalize(Text(ids).embedding)        [B_t, P]
  logit_scale  = exp(log_scale)                        scalar; log_scale init log(1 / 0.07)
  logits_per_image = logit_scale * image_embeds @ text_embeds^T      [B_i, B_t]

The parameter `logit_scale` stores the LOG of the scale, as CLIP and transformers do (so an HF
checkpoint's value maps unchanged). CLIP's bound scale <= 100 is kept on the PARAMETER, as
open_clip does (`logit_scale.clamp_(0, log(100))` after each optimizer step): the optimizer
projects it into [0, log 100] after every update (train/optimizer.py, DEFAULT_PARAM_BOUNDS).
The forward is exp(log_scale) unclamped, exactly transformers' CLIPModel, so an export
reproduces our logits for any stored value. (A forward clamp min(exp(s), 100) has zero gradient
once s > log 100: s could never come back down. With the bound float32(log 100), exp gives
100.0000076.)

CLIPConfig describes the architecture and the run-time options (compute dtype, scan, remat).
`clip_config(variant, ...)` builds one from a named variant (tiny, S/16, B/32, B/16, L/14);
`CLIPConfig.to_dict` / `from_dict` round trip through plain dicts (ml_collections ConfigDicts
are accepted); `CLIPConfig.from_hf` / `to_hf` convert from / to transformers' CLIPConfig (or its
config.json dict); `to_hf` refuses what a transformers CLIPModel cannot represent.
"""

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.models import layers
from fashion_jax.models import text as text_lib
from fashion_jax.models import vit as vit_lib

DEFAULT_LOGIT_SCALE_INIT = math.log(1 / 0.07)

# Our activation name <-> transformers' hidden_act. HF's 'gelu_new' is the same tanh formula.
_DTYPES = ("float32", "bfloat16", "float16")


class TowerConfig:
  """replace / to_dict / from_dict of the two-tower configs (CLIPConfig, SiglipConfig): frozen
  dataclasses with a `vision` ViTConfig and a `text` TextConfig."""

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)  # ml_collections.ConfigDict too.
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}.")
    d["vision"] = vit_lib.ViTConfig(**dict(d["vision"]))
    d["text"] = text_lib.TextConfig(**dict(d["text"]))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(TowerConfig):
  """Architecture (vision, text, projection_dim, logit scale init) and run-time options."""
  vision: vit_lib.ViTConfig
  text: text_lib.TextConfig
  projection_dim: int = 512
  logit_scale_init: float = DEFAULT_LOGIT_SCALE_INIT
  dtype: str = "float32"  # Compute dtype; parameters are always float32.
  scan: bool = False  # nn.scan over each tower's layers (params get a leading 'layers' axis).
  remat_policy: str = "none"  # 'none' or a jax.checkpoint_policies name, see layers.Encoder.
  # How both towers compute attention: 'einsum' | 'xla' | 'cudnn' (layers.ATTENTION_IMPLS; same
  # parameters and function, 'cudnn' is the fused kernel for NVIDIA GPUs in bf16/fp16).
  attention_impl: str = "einsum"
  # Pad each tower's tokens once to a multiple of this (layers.Encoder; 0 = never): with
  # 'cudnn', instead of padding odd lengths (50, 197, 77) in every attention call. Exact.
  seq_pad_multiple: int = 0
  # Each tower's last layer computes its pooled token only (CLS; EOS): the loss and every
  # embedding read nothing else, so embeddings and gradients are unchanged (to float rounding)
  # and the step skips 10/12 of a layer's matmuls per tower (layers.Encoder's pool_index). The
  # towers' 'tokens' output is then absent.
  pooled_last_layer: bool = False

  def __post_init__(self):
    v, t = self.vision, self.text
    clip_shape = dict(class_token=True, ln_pre=True, patch_bias=False, pool="cls")
    clip_text = dict(causal=True, pool="eos", projection_bias=False)
    for tower, cfg, want in (("vision", v, clip_shape), ("text", t, clip_text)):
      bad = {k: getattr(cfg, k) for k, w in want.items() if getattr(cfg, k) != w}
      if bad:
        raise ValueError(f"CLIPConfig: the {tower} tower has {bad}, not CLIP's {want}: that is "
                         "a SigLIP-shaped tower (models/siglip.py), which a CLIPModel (and its "
                         "transformers export) cannot hold.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype {self.dtype!r} not in {_DTYPES}.")
    layers.check_attention_impl(self.attention_impl, self.dtype)  # At config time, not trace.
    if self.seq_pad_multiple < 0:
      raise ValueError(f"seq_pad_multiple={self.seq_pad_multiple} must be >= 0 (0: no padding).")

  @classmethod
  def from_hf(cls, hf: Any, **runtime) -> "CLIPConfig":
    """From a transformers.CLIPConfig or its config.json dict; `runtime`: dtype, scan, remat."""
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    arch = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type not in (None, "clip") or (arch and not any(a.startswith("CLIP") for a in arch)):
      raise ValueError(f"Not a CLIP config: model_type={model_type!r}, architectures={arch}.")
    if "vision_config" not in d or "text_config" not in d:
      raise ValueError("Not a CLIPModel config: vision_config and text_config are required "
                       f"(got keys {sorted(d)}).")
    v, t = d["vision_config"], d["text_config"]

    def act(tower, name):
      if name not in layers.ACT_FROM_HF:
        raise ValueError(f"{tower} hidden_act {name!r} is not supported; expected one of "
                         f"{sorted(layers.ACT_FROM_HF)}.")
      return layers.ACT_FROM_HF[name]

    if v.get("num_channels", 3) != 3:
      raise ValueError(f"vision num_channels={v['num_channels']} is not supported (RGB only).")
    vision = vit_lib.ViTConfig(
        width=v["hidden_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        patch_size=v["patch_size"], image_size=v["image_size"],
        act=act("vision", v.get("hidden_act", "quick_gelu")),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5))
    text = text_lib.TextConfig(
        width=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
        vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"],
        act=act("text", t.get("hidden_act", "quick_gelu")),
        layer_norm_eps=t.get("layer_norm_eps", 1e-5), eos_token_id=t["eos_token_id"],
        bos_token_id=t.get("bos_token_id", 49406), pad_token_id=t.get("pad_token_id", 1))
    return cls(vision=vision, text=text, projection_dim=d.get("projection_dim", 512),
               logit_scale_init=d.get("logit_scale_init_value", DEFAULT_LOGIT_SCALE_INIT),
               **runtime)

  def to_hf_dict(self) -> dict[str, Any]:
    """Keyword arguments of transformers.CLIPConfig describing this architecture."""
    for tower, a in (("vision", self.vision.act), ("text", self.text.act)):
      if a not in layers.ACT_TO_HF:  # Unreachable for validated configs; kept as the export guard.
        raise ValueError(f"The {tower} activation {a!r} has no transformers equivalent: "
                         "this tower cannot be exported to CLIPModel losslessly.")
    v, t = self.vision, self.text
    return dict(
        projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init,
        vision_config=dict(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
            num_channels=3, hidden_act=layers.ACT_TO_HF[v.act], layer_norm_eps=v.layer_norm_eps,
            projection_dim=self.projection_dim),
        text_config=dict(
            hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, vocab_size=t.vocab_size,
            max_position_embeddings=t.max_len, hidden_act=layers.ACT_TO_HF[t.act],
            layer_norm_eps=t.layer_norm_eps, eos_token_id=t.eos_token_id,
            bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
            projection_dim=self.projection_dim))

  def to_hf(self):
    """A transformers.CLIPConfig with this architecture."""
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.CLIPConfig(**self.to_hf_dict())


def clip_config(variant: str = "B/32", *, projection_dim: Optional[int] = None,
                vision: Optional[Mapping[str, Any]] = None,
                text: Optional[Mapping[str, Any]] = None, **runtime) -> CLIPConfig:
  """CLIPConfig of a named variant ('tiny', 'S/16', 'B/32', 'B/16', 'L/14').

  `vision` / `text` override tower fields (e.g. vision=dict(image_size=96)); `runtime` sets
  dtype, scan, remat_policy, attention_impl, logit_scale_init. OpenAI's projection widths: 768
  for L/14, 512 for B, the text width otherwise.
  """
  v = vit_lib.vit_config(variant, **dict(vision or {}))
  t = text_lib.text_config(variant, **dict(text or {}))
  if projection_dim is None:
    projection_dim = {"L/14": 768, "B/32": 512, "B/16": 512}.get(variant, t.width)
  return CLIPConfig(vision=v, text=t, projection_dim=projection_dim, **runtime)


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
  """The FashionCLIP dual encoder. Sub-modules `vision`, `text`; parameter `logit_scale` (log).

  __call__(images [B_i, H, W, 3] (uint8, or normalised float), ids [B_t, L],
           attention_mask [B_t, L] | None, deterministic=True) -> dict with
    image_embeds [B_i, P], text_embeds [B_t, P] (both L2-normalised, float32),
    logits_per_image [B_i, B_t], logits_per_text [B_t, B_i], logit_scale (exp of the param).
  encode_images / encode_texts embed one side only (for evaluators), normalised unless
  normalize=False; logit_scale() returns exp(param). Call them with
  `model.apply(variables, x, method=model.encode_images)`.
  """
  config: CLIPConfig

  def clip_config(self) -> CLIPConfig:
    """The CLIP architecture (a subclass whose config wraps a CLIPConfig returns that)."""
    return self.config

  def make_vision(self, cfg: CLIPConfig, dtype: Any) -> nn.Module:
    """The vision tower; subclasses (E2) replace it, keeping the text tower and logit scale."""
    return vit_lib.VisionTransformer(cfg.vision, cfg.projection_dim, dtype=dtype,
                                     scan=cfg.scan, remat_policy=cfg.remat_policy,
                                     attention_impl=cfg.attention_impl,
                                     seq_pad_multiple=cfg.seq_pad_multiple,
                                     pooled_last_layer=cfg.pooled_last_layer)

  def setup(self):
    cfg = self.clip_config()
    dtype = jnp.dtype(cfg.dtype)
    self.vision = self.make_vision(cfg, dtype)
    self.text = text_lib.TextTransformer(cfg.text, cfg.projection_dim, dtype=dtype,
                                         scan=cfg.scan, remat_policy=cfg.remat_policy,
                                         attention_impl=cfg.attention_impl,
                                         seq_pad_multiple=cfg.seq_pad_multiple,
                                         pooled_last_layer=cfg.pooled_last_layer)
    self.log_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32)

  def encode_images(self, images: jax.Array, normalize: bool = True,
                    deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> [B, P] float32."""
    e = self.vision(images, deterministic)["embedding"]
    return l2_normalize(e) if normalize else e

  def encode_texts(self, ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                   normalize: bool = True, deterministic: bool = True) -> jax.Array:
    """[..., L] -> [..., P] float32 (leading axes are flattened for the tower and restored)."""
    lead = ids.shape[:-1]
    flat = ids.reshape(-1, ids.shape[-1])
    mask = None if attention_mask is None else attention_mask.reshape(flat.shape)
    e = self.text(flat, mask, deterministic)["embedding"]
    e = l2_normalize(e) if normalize else e
    return e.reshape(lead + e.shape[-1:])

  def logit_scale(self) -> jax.Array:
    """exp(param), unclamped (the optimizer bounds the param; module docstring)."""
    return jnp.exp(self.log_scale)

  def __call__(self, images: jax.Array, ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    img = self.encode_images(images, deterministic=deterministic)
    txt = self.encode_texts(ids, attention_mask, deterministic=deterministic)
    scale = self.logit_scale()
    logits = scale * img @ txt.T
    return {"image_embeds": img, "text_embeds": txt, "logits_per_image": logits,
            "logits_per_text": logits.T, "logit_scale": scale}


def dummy_inputs(config: Any, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """Zero images [B, S, S, 3] uint8 and ids [B, max_len] int32, for init and eval_shape (of
  any two-tower config with `vision.image_size` and `text.max_len`: CLIP's, SigLIP's)."""
  s = config.vision.image_size
  return (jnp.zeros((batch_size, s, s, 3), jnp.uint8),
          jnp.zeros((batch_size, config.text.max_len), jnp.int32))


def init_params(config: CLIPConfig, rng: jax.Array, model_cls: Optional[type] = None) -> Any:
  """The boxed (nn.LogicallyPartitioned) 'params' collection of CLIPModel(config) (or of
  `model_cls(config)`, another two-tower model such as SigLIP's).

  Meant to be run under jax.eval_shape or jax.jit(out_shardings=...), not eagerly for big models.
  """
  return (model_cls or CLIPModel)(config).init(rng, *dummy_inputs(config))["params"]


def count_params(config: CLIPConfig, model_cls: Optional[type] = None) -> int:
  """Number of parameters of CLIPModel(config) (or `model_cls(config)`), from shapes only
  (nothing is allocated)."""
  shapes = jax.eval_shape(functools.partial(init_params, config, model_cls=model_cls),
                          jax.random.PRNGKey(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes))))
