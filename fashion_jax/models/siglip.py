"""SigLIP: the sigmoid-loss dual encoder (transformers' SiglipModel) and its config.

  image_embeds = normalize(ViT(images).pooled)          [B_i, D]  (attention-pool head, no proj)
  text_embeds  = normalize(Text(ids).embedding)         [B_t, D]  (last token, biased proj)
  logit_scale  = exp(t'), logit_bias = b                 scalars; t' init log 10, b init -10
  logits_per_image = logit_scale * image_embeds @ text_embeds^T + logit_bias   [B_i, B_t]

Both towers are vit.VisionTransformer / text.TextTransformer (the CLIP towers' code) with their
SigLIP structure flags, so every lever (scan, remat_policy, dtype, attention_impl) and the
logical axis names of CLIP's parameters apply unchanged. The text projection maps to the vision
width (transformers' text projection_size must equal the vision hidden_size). Parameters:
`vision`, `text`, `logit_scale` (stores t', as HF's `logit_scale`) and `logit_bias`; both scalars
are unclamped in the forward (train-time bounds belong to the optimizer, as for CLIP). Their init
is losses/sigmoid.py's INIT_LOG_TEMPERATURE / INIT_BIAS (transformers initialises both to 0).

`siglip_config(variant, ...)` builds a SiglipConfig from a named variant (tiny, B/16, B/16-256,
So400m/14); to_dict / from_dict round trip through plain dicts, from_hf / to_hf convert from / to
transformers' SiglipConfig (or its config.json dict).
"""

import dataclasses
import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.losses import sigmoid as sigmoid_lib
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import layers
from fashion_jax.models import text as text_lib
from fashion_jax.models import vit as vit_lib



def _not_siglip_class_default_ids(record) -> bool:
  """Log filter: False for transformers' warning about SiglipTextConfig's own CLASS defaults.

  transformers 5 defaults SiglipTextConfig to bos 49406 / eos 49407 (CLIP's ids) with a 32,000
  token vocabulary, and builds a throwaway default config on every save, repr and diff of a
  SigLIP config (to_diff_dict); its validation then warns "bos_token_id must be `None` or an
  integer within the vocabulary (between 0 and 31999), got 49406. This may result in unexpected
  behavior." about that throwaway, never about the checkpoint (transformers issue #47612).
  Exactly those two messages are dropped; any other id warning passes."""
  message = record.getMessage()
  return not ("(between 0 and 31999), got 4940" in message
              and message.split("got ")[-1].startswith(("49406.", "49407.")))


# transformers' config validation logs through this logger (configuration_utils).
logging.getLogger("transformers.configuration_utils").addFilter(_not_siglip_class_default_ids)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
_DTYPES = ("float32", "bfloat16", "float16")

# The structure flags that make the CLIP towers SigLIP's (transformers' SiglipModel has no other).
VISION_STRUCTURE = dict(class_token=False, ln_pre=False, patch_bias=True, pool="map")
TEXT_STRUCTURE = dict(causal=False, pool="last", projection_bias=True)
_VISION_DEFAULTS = dict(VISION_STRUCTURE, act="gelu_tanh", layer_norm_eps=1e-6,
                        image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
# SentencePiece ids of SigLIP's tokenizer: pad = EOS = 1 '</s>', no BOS.
_TEXT_DEFAULTS = dict(TEXT_STRUCTURE, act="gelu_tanh", layer_norm_eps=1e-6, vocab_size=32000,
                      max_len=64, eos_token_id=1, pad_token_id=1, bos_token_id=None)

SIGLIP_VARIANTS = {
    # name: ((vision width, layers, heads, mlp_dim, patch, image_size),
    #        (text width, layers, heads, mlp_dim))
    "tiny": ((64, 2, 4, 256, 16, 64), (64, 2, 4, 256)),
    "B/16": ((768, 12, 12, 3072, 16, 224), (768, 12, 12, 3072)),
    "B/16-256": ((768, 12, 12, 3072, 16, 256), (768, 12, 12, 3072)),
    # The shape-optimised 400M ViT (google/siglip-so400m-patch14-384); its text tower is as wide.
    "So400m/14": ((1152, 27, 16, 4304, 14, 384), (1152, 27, 16, 4304)),
}


@dataclasses.dataclass(frozen=True)
class SiglipConfig(clip_lib.TowerConfig):
  """Architecture (vision, text, logit scale / bias init) and run-time options, as CLIPConfig."""
  vision: vit_lib.ViTConfig
  text: text_lib.TextConfig
  logit_scale_init: float = sigmoid_lib.INIT_LOG_TEMPERATURE  # t' (scale = exp(t') = 10).
  logit_bias_init: float = sigmoid_lib.INIT_BIAS
  dtype: str = "float32"  # Compute dtype; parameters are always float32.
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"
  seq_pad_multiple: int = 0  # As CLIPConfig's: pad each tower's tokens once (0 = never).

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype {self.dtype!r} not in {_DTYPES}.")
    layers.check_attention_impl(self.attention_impl, self.dtype)
    if self.seq_pad_multiple < 0:
      raise ValueError(f"seq_pad_multiple={self.seq_pad_multiple} must be >= 0 (0: no padding).")
    for tower, cfg, want in (("vision", self.vision, VISION_STRUCTURE),
                             ("text", self.text, TEXT_STRUCTURE)):
      for field, value in want.items():
        if getattr(cfg, field) != value:
          raise ValueError(f"SigLIP needs {tower}.{field}={value!r}, got {tower}.{field}="
                           f"{getattr(cfg, field)!r} (a transformers SiglipModel has no other).")

  @property
  def projection_dim(self) -> int:
    """The embedding width: the vision width (the text tower projects to it)."""
    return self.vision.width

  @classmethod
  def from_hf(cls, hf: Any, **runtime) -> "SiglipConfig":
    """From a transformers.SiglipConfig or its config.json dict; `runtime`: dtype, scan, ...

    Refuses (ValueError naming the value) what is not a plain SiglipModel: another model_type,
    a custom-code config (`auto_map`: such a repo's weights belong to its own code, e.g. an
    open_clip model, and remote code is never run), no attention-pool head, a text projection
    narrower or wider than the vision width, non-RGB or non-square images.
    """
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    model_type = d.get("model_type")
    arch = d.get("architectures") or []
    if d.get("auto_map"):
      raise ValueError(f"A custom-code config (auto_map={d['auto_map']}, architectures={arch}) "
                       "is not a transformers SiglipModel; its code is not run here.")
    if model_type not in (None, "siglip") or (arch and not any(a.startswith("Siglip")
                                                               for a in arch)):
      raise ValueError(f"Not a SigLIP config: model_type={model_type!r}, architectures={arch}.")
    if "vision_config" not in d or "text_config" not in d:
      raise ValueError("Not a SiglipModel config: vision_config and text_config are required "
                       f"(got keys {sorted(d)}).")
    v, t = d["vision_config"], d["text_config"]

    def act(tower, name):
      if name not in layers.ACT_FROM_HF:
        raise ValueError(f"{tower} hidden_act {name!r} is not supported; expected one of "
                         f"{sorted(layers.ACT_FROM_HF)}.")
      return layers.ACT_FROM_HF[name]

    def square(name, value):
      if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
          raise ValueError(f"vision {name}={value} is not square; only square sizes are "
                           "supported.")
        value = value[0]
      return int(value)

    if v.get("num_channels", 3) != 3:
      raise ValueError(f"vision num_channels={v['num_channels']} is not supported (RGB only).")
    if not v.get("vision_use_head", True):
      raise ValueError("vision_use_head=False: a SiglipModel without the attention-pool head has "
                       "no image embedding.")
    width = v["hidden_size"]
    if t.get("projection_size") not in (None, width):
      raise ValueError(f"text projection_size={t['projection_size']} != vision hidden_size="
                       f"{width}: the two embeddings could not be compared.")
    vision = vit_lib.ViTConfig(
        width=width, num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"], patch_size=square("patch_size", v["patch_size"]),
        image_size=square("image_size", v["image_size"]),
        act=act("vision", v.get("hidden_act", "gelu_pytorch_tanh")),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6), image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD, **VISION_STRUCTURE)
    if t.get("projection_size") is None and t["hidden_size"] != width:
      raise ValueError(f"text hidden_size={t['hidden_size']} (its default projection_size) != "
                       f"vision hidden_size={width}.")
    # transformers' defaults where a key is absent (its SiglipTextConfig copied CLIP's ids).
    text = text_lib.TextConfig(
        width=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
        vocab_size=t.get("vocab_size", 32000), max_len=t.get("max_position_embeddings", 64),
        act=act("text", t.get("hidden_act", "gelu_pytorch_tanh")),
        layer_norm_eps=t.get("layer_norm_eps", 1e-6), eos_token_id=t.get("eos_token_id", 49407),
        bos_token_id=t.get("bos_token_id", 49406), pad_token_id=t.get("pad_token_id", 1),
        **TEXT_STRUCTURE)
    return cls(vision=vision, text=text, **runtime)

  def to_hf_dict(self) -> dict[str, Any]:
    """Keyword arguments of transformers.SiglipConfig describing this architecture."""
    v, t = self.vision, self.text
    return dict(
        vision_config=dict(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
            num_channels=3, hidden_act=layers.ACT_TO_HF[v.act],
            layer_norm_eps=v.layer_norm_eps, vision_use_head=True),
        text_config=dict(
            hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, vocab_size=t.vocab_size,
            max_position_embeddings=t.max_len, hidden_act=layers.ACT_TO_HF[t.act],
            layer_norm_eps=t.layer_norm_eps, eos_token_id=t.eos_token_id,
            bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
            projection_size=self.projection_dim))

  def to_hf(self):
    """A transformers.SiglipConfig with this architecture."""
    import transformers  # pylint: disable=g-import-not-at-top
    return transformers.SiglipConfig(**self.to_hf_dict())


def siglip_config(variant: str = "B/16", *, vision: Optional[Mapping[str, Any]] = None,
                  text: Optional[Mapping[str, Any]] = None, **runtime) -> SiglipConfig:
  """SiglipConfig of a named variant (SIGLIP_VARIANTS), tower fields overridden by `vision` /
  `text` (e.g. vision=dict(image_size=96)); `runtime`: dtype, scan, remat_policy,
  attention_impl, logit_scale_init, logit_bias_init. SigLIP defaults: tanh GELU, LN eps 1e-6,
  0.5 / 0.5 pixel statistics, a 32000-token vocabulary, 64-token context, pad = EOS = 1."""
  if variant not in SIGLIP_VARIANTS:
    raise ValueError(f"Unknown SigLIP variant {variant!r}; expected one of "
                     f"{list(SIGLIP_VARIANTS)}.")
  (w, l, h, m, p, s), (tw, tl, th, tm) = SIGLIP_VARIANTS[variant]
  v = dict(_VISION_DEFAULTS, width=w, num_layers=l, num_heads=h, mlp_dim=m, patch_size=p,
           image_size=s)
  v.update(vision or {})
  t = dict(_TEXT_DEFAULTS, width=tw, num_layers=tl, num_heads=th, mlp_dim=tm)
  t.update(text or {})
  return SiglipConfig(vision=vit_lib.ViTConfig(**v), text=text_lib.TextConfig(**t), **runtime)


class SiglipModel(nn.Module):
  """The SigLIP dual encoder; the interface of clip.CLIPModel plus logit_bias.

  __call__(images [B_i, H, W, 3] (uint8, or normalised float), ids [B_t, L],
           attention_mask [B_t, L] | None, deterministic=True) -> dict with
    image_embeds [B_i, D], text_embeds [B_t, D] (L2-normalised, float32),
    logits_per_image [B_i, B_t] = scale * cos + bias, logits_per_text [B_t, B_i],
    logit_scale (exp of the param), logit_bias.
  SigLIP was trained without a padding mask (ids padded with EOS to max_len): pass
  attention_mask=None to reproduce it; a mask is applied to the keys as transformers does.
  encode_images / encode_texts embed one side (normalised unless normalize=False);
  logit_scale() = exp(param), logit_bias() = the bias.
  """
  config: SiglipConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    runtime = dict(dtype=dtype, scan=cfg.scan, remat_policy=cfg.remat_policy,
                   attention_impl=cfg.attention_impl, seq_pad_multiple=cfg.seq_pad_multiple)
    self.vision = vit_lib.VisionTransformer(cfg.vision, None, **runtime)
    self.text = text_lib.TextTransformer(cfg.text, cfg.projection_dim, **runtime)
    self.log_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32)
    self.bias = self.param(
        "logit_bias", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_bias_init), ()), (), jnp.float32)

  def encode_images(self, images: jax.Array, normalize: bool = True,
                    deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> [B, D] float32 (the attention-pooled image embedding)."""
    e = self.vision(images, deterministic)["pooled"]
    return clip_lib.l2_normalize(e) if normalize else e

  def encode_texts(self, ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                   normalize: bool = True, deterministic: bool = True) -> jax.Array:
    """[..., L] -> [..., D] float32 (leading axes are flattened for the tower and restored)."""
    lead = ids.shape[:-1]
    flat = ids.reshape(-1, ids.shape[-1])
    mask = None if attention_mask is None else attention_mask.reshape(flat.shape)
    e = self.text(flat, mask, deterministic)["embedding"]
    e = clip_lib.l2_normalize(e) if normalize else e
    return e.reshape(lead + e.shape[-1:])

  def logit_scale(self) -> jax.Array:
    """exp(param), unclamped."""
    return jnp.exp(self.log_scale)

  def logit_bias(self) -> jax.Array:
    return self.bias

  def __call__(self, images: jax.Array, ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    img = self.encode_images(images, deterministic=deterministic)
    txt = self.encode_texts(ids, attention_mask, deterministic=deterministic)
    scale, bias = self.logit_scale(), self.logit_bias()
    logits = scale * img @ txt.T + bias
    return {"image_embeds": img, "text_embeds": txt, "logits_per_image": logits,
            "logits_per_text": logits.T, "logit_scale": scale, "logit_bias": bias}


dummy_inputs = clip_lib.dummy_inputs  # Zero uint8 images and int32 ids of a config's shapes.


def init_params(config: SiglipConfig, rng: jax.Array) -> Any:
  """The boxed 'params' collection of SiglipModel(config) (clip.init_params)."""
  return clip_lib.init_params(config, rng, SiglipModel)


def count_params(config: SiglipConfig) -> int:
  """Number of parameters of SiglipModel(config), from shapes only."""
  return clip_lib.count_params(config, SiglipModel)
