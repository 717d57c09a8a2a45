"""The CLIP-shaped Vision Transformer (the image tower of FashionCLIP and E2).

  pixels [B, H, W, 3] -> conv patch embedding (no bias) [B, N, D], N = (H / p) * (W / p)
  -> [class token; patches] + position embedding [B, 1 + N, D] -> pre-LayerNorm
  -> Encoder (pre-LN blocks, quick_gelu by default) -> tokens [B, 1 + N, D]
  -> post-LayerNorm of the CLS token: pooled [B, D] -> projection (no bias): embedding [B, P]

This is exactly transformers' CLIPVisionModel + visual_projection, so an HF checkpoint maps 1:1
(fashion_jax/interop/hf_clip.py). Images are channels-last. uint8 images are normalised on the
device with CLIP's mean/std (`normalize_images`); float images are taken as already normalised.

Named variants (`VIT_VARIANTS`): tiny, S/16, B/32, B/16, L/14; `vit_config(variant, **overrides)`
builds a ViTConfig from one and any field may be overridden (width, num_layers, ...).
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import layers

# OpenAI CLIP's pixel statistics (on [0, 1] RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of the CLIP vision tower."""
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}.")
    layers.activation(self.act)  # Validates the name.

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


VIT_VARIANTS = {
    # name: (width, layers, heads, mlp_dim, patch, image_size)
    "tiny": (64, 2, 4, 256, 16, 64),
    "S/16": (384, 12, 6, 1536, 16, 224),
    "B/32": (768, 12, 12, 3072, 32, 224),
    "B/16": (768, 12, 12, 3072, 16, 224),
    "L/14": (1024, 24, 16, 4096, 14, 224),
}


def vit_config(variant: str, **overrides) -> ViTConfig:
  """ViTConfig of a named variant, with any field overridden."""
  if variant not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; expected one of {list(VIT_VARIANTS)}.")
  w, l, h, m, p, s = VIT_VARIANTS[variant]
  fields = dict(width=w, num_layers=l, num_heads=h, mlp_dim=m, patch_size=p, image_size=s)
  fields.update(overrides)
  return ViTConfig(**fields)


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 [..., 3] in [0, 255] -> (x / 255 - CLIP_MEAN) / CLIP_STD in `dtype`.

  Runs on the device inside the jitted step, so the host ships uint8 (4x less than float32).
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize_images expects uint8 images, got {images.dtype}.")
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
  return x.astype(dtype)


def embed_patches(module: nn.Module, cfg: ViTConfig, images: jax.Array) -> jax.Array:
  """CLIP's input stem, run inside `module`'s compact call: [B, H, W, 3] -> [B, 1 + N, D].

  uint8 images are normalised with CLIP's mean/std (float images are taken as normalised); conv
  patch embedding without bias (`patch_embed`), then the class token (`class_embedding`) and the
  position embedding (`pos_embedding`), created on `module` in this order so that any tower
  built on this stem (ViT, E2) gets the same CLIP parameters from the same rng.
  """
  dtype, param_dtype = module.dtype, module.param_dtype
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected images [B, H, W, 3], got shape {images.shape}.")
  if images.shape[1:3] != (cfg.image_size, cfg.image_size):
    raise ValueError(f"Images are {images.shape[1]}x{images.shape[2]} but the model expects "
                     f"{cfg.image_size}x{cfg.image_size}.")
  x = normalize_images(images, dtype) if images.dtype == jnp.uint8 else images.astype(dtype)
  x = nn.with_logical_constraint(x, ("act_batch", None, None, None))
  p = cfg.patch_size
  x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
              dtype=dtype, param_dtype=param_dtype, name="patch_embed",
              kernel_init=nn.with_logical_partitioning(
                  nn.initializers.normal(0.02), (None, None, "conv_in", "embed")),
              parent=module)(x)
  b = x.shape[0]
  x = x.reshape(b, -1, cfg.width)  # [B, N, D], patches in row-major order like torch's flatten.
  cls = module.param("class_embedding", nn.with_logical_partitioning(
      nn.initializers.normal(cfg.width ** -0.5), ("embed",)), (cfg.width,), param_dtype)
  pos = module.param("pos_embedding", nn.with_logical_partitioning(
      nn.initializers.normal(0.02), (None, "embed")), (cfg.num_patches + 1, cfg.width),
                     param_dtype)
  cls = jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.width))
  return jnp.concatenate([cls, x], axis=1) + pos.astype(dtype)[None]


class VisionTransformer(nn.Module):
  """CLIP ViT: images [B, H, W, 3] -> {'embedding' [B, P], 'pooled' [B, D], 'tokens' [B, 1+N, D]}.

  'tokens' are the encoder's last hidden states (before the post-LN, as HF's last_hidden_state),
  'pooled' the post-LN CLS token, 'embedding' its projection (not normalised); with
  output_dim=None there is no projection and 'embedding' is absent. Outputs are float32.
  """
  config: ViTConfig
  output_dim: Optional[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"  # layers.ATTENTION_IMPLS.

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    x = embed_patches(self, cfg, images)
    x = nn.with_logical_constraint(x, layers.HIDDEN_AXES)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "pre_norm")(x)
    x = layers.Encoder(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, pre_norm=True,
        layer_norm_eps=cfg.layer_norm_eps, act=cfg.act, dtype=self.dtype,
        param_dtype=self.param_dtype, scan=self.scan, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl, name="encoder")(x, None, deterministic)
    pooled = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype,
                               "post_norm")(x[:, 0])
    out = {"tokens": x.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}
    if self.output_dim is not None:
      out["embedding"] = nn.Dense(
          self.output_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          name="projection", kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(cfg.width ** -0.5), ("embed", None)))(pooled).astype(
                  jnp.float32)
    return out

