"""The Vision Transformer of the CLIP and SigLIP image towers (FashionCLIP, E2, SigLIP).

CLIP (the defaults; transformers' CLIPVisionModel + visual_projection, hf_clip.py):
  pixels [B, H, W, 3] -> conv patch embedding (no bias) [B, N, D], N = (H / p) * (W / p)
  -> [class token; patches] + position embedding [B, 1 + N, D] -> pre-LayerNorm
  -> Encoder (pre-LN blocks, quick_gelu by default) -> tokens [B, 1 + N, D]
  -> post-LayerNorm of the CLS token: pooled [B, D] -> projection (no bias): embedding [B, P]
SigLIP (class_token=False, ln_pre=False, patch_bias=True, pool='map'; transformers'
SiglipVisionModel, hf_siglip.py):
  pixels -> conv patch embedding (with bias) + position embedding [B, N, D] -> Encoder
  -> post-LayerNorm of ALL tokens -> layers.AttentionPool ('head'): pooled [B, D]

The structure flags are ViTConfig fields whose defaults are CLIP, so a CLIP tower's parameters
(names, shapes, rng order) and outputs do not depend on them. Images are channels-last. uint8
images are normalised on the device with the config's image_mean / image_std (CLIP's by
default, 0.5 / 0.5 for SigLIP; `normalize_images`); float images are taken as normalised.

Named variants (`VIT_VARIANTS`): tiny, S/16, B/32, B/16, L/14; `vit_config(variant, **overrides)`
builds a ViTConfig from one and any field may be overridden (width, num_layers, ...).
"""

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import layers

# OpenAI CLIP's pixel statistics (on [0, 1] RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POOLS = ("cls", "map")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of the vision tower (CLIP's by default; module docstring for SigLIP's).

  class_token: prepend a learnt CLS token (and one more position embedding).
  ln_pre: LayerNorm the embeddings before the encoder ('pre_norm').
  patch_bias: the patch-embedding convolution has a bias.
  pool: 'cls' (post-LN of token 0; needs class_token) or 'map' (post-LN of all tokens, then
    multi-head attention pooling, layers.AttentionPool, sub-module 'head').
  image_mean / image_std: per-channel statistics on [0, 1] RGB for the on-device uint8
    normalisation (tuples; lists, e.g. from JSON, are converted).
  """
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  class_token: bool = True
  ln_pre: bool = True
  patch_bias: bool = False
  pool: str = "cls"
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD

  def __post_init__(self):
    for name in ("image_mean", "image_std"):
      value = tuple(float(v) for v in getattr(self, name))
      if len(value) != 3 or (name == "image_std" and min(value) <= 0):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected 3 per-channel values"
                         f"{' > 0' if name == 'image_std' else ''}.")
      object.__setattr__(self, name, value)  # Hashable and equal after a JSON round trip.
    if self.pool not in POOLS:
      raise ValueError(f"Unknown pool {self.pool!r}; expected one of {POOLS}.")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("pool='cls' needs class_token=True (there is no CLS token to pool).")
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size={self.image_size} is smaller than patch_size="
                       f"{self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}.")
    layers.activation(self.act)  # Validates the name.

  @property
  def num_patches(self) -> int:
    """(image_size // patch_size)^2: like transformers, the valid convolution drops a remainder
    (SigLIP So400m/14 at 384 px: 27 x 27 patches cover 378 px)."""
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


def normalize_images(images: jax.Array, dtype: Any = jnp.float32,
                     mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> jax.Array:
  """uint8 [..., 3] in [0, 255] -> (x / 255 - mean) / std in `dtype` (CLIP's stats by default).

  Runs on the device inside the jitted step, so the host ships uint8 (4x less than float32).
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f"normalize_images expects uint8 images, got {images.dtype}.")
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patch embedding: [B, H, W, C] -> [B, N, D], N = (H // p) * (W // p).

  The same function and parameters as nn.Conv(D, (p, p), strides=(p, p), padding='VALID')
  followed by a reshape to [B, N, D] (patches in row-major order, like torch's flatten):
  `kernel` [p, p, C, D] (HWIO, axes (None, None, 'conv_in', 'embed')) and `bias` [D] iff
  use_bias, created in nn.Conv's order with its initialisers, so checkpoints and the init rng
  are unchanged. Because the stride equals the kernel size, the convolution is exactly
      y[b, n] = patches[b, n] @ kernel.reshape(p * p * C, D) (+ bias),
  patches[b, i * (W // p) + j] = x[b, i p:(i + 1) p, j p:(j + 1) p, :].ravel()  (rows, cols, C),
  which is computed here as one reshape + transpose and a matmul instead: XLA's CPU backend
  runs the strided convolution, and above all its kernel gradient (a window-dilated
  convolution), through a generic convolution path, while the matmul goes to the same dot
  kernels as the rest of the model. Pixels beyond the last whole patch are dropped (VALID).
  """
  features: int
  patch_size: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, d = self.patch_size, self.features
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "conv_in", "embed")), (p, p, c, d),
                        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (d,), self.param_dtype) if self.use_bias \
        else None
    gh, gw = h // p, w // p
    x = x[:, :gh * p, :gw * p].astype(self.dtype)
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    y = jnp.einsum("bnk,kd->bnd", x, kernel.astype(self.dtype).reshape(p * p * c, d))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y


def embed_patches(module: nn.Module, cfg: ViTConfig, images: jax.Array) -> jax.Array:
  """The input stem, run inside `module`'s compact call: [B, H, W, 3] -> [B, T, D].

  uint8 images are normalised with cfg.image_mean / image_std (float images are taken as
  normalised); conv patch embedding (`patch_embed`, bias iff cfg.patch_bias), then the class
  token (`class_embedding`, iff cfg.class_token; T = 1 + N, else T = N) and the position
  embedding (`pos_embedding` [T, D]), created on `module` in this order so that any tower built
  on this stem (ViT, E2) gets the same CLIP parameters from the same rng.
  """
  dtype, param_dtype = module.dtype, module.param_dtype
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Expected images [B, H, W, 3], got shape {images.shape}.")
  if images.shape[1:3] != (cfg.image_size, cfg.image_size):
    raise ValueError(f"Images are {images.shape[1]}x{images.shape[2]} but the model expects "
                     f"{cfg.image_size}x{cfg.image_size}.")
  if images.dtype == jnp.uint8:
    x = normalize_images(images, dtype, cfg.image_mean, cfg.image_std)
  else:
    x = images.astype(dtype)
  x = nn.with_logical_constraint(x, ("act_batch", None, None, None))
  x = PatchEmbed(cfg.width, cfg.patch_size, use_bias=cfg.patch_bias, dtype=dtype,
                 param_dtype=param_dtype, name="patch_embed", parent=module)(x)  # [B, N, D]
  b = x.shape[0]
  if cfg.class_token:
    cls = module.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.width ** -0.5), ("embed",)), (cfg.width,), param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.width)), x], axis=1)
  pos = module.param("pos_embedding", nn.with_logical_partitioning(
      nn.initializers.normal(0.02), (None, "embed")),
                     (cfg.num_patches + int(cfg.class_token), cfg.width), param_dtype)
  return x + pos.astype(dtype)[None]


class VisionTransformer(nn.Module):
  """ViT: images [B, H, W, 3] -> {'embedding' [B, P], 'pooled' [B, D], 'tokens' [B, T, D]}.

  'tokens' are transformers' last_hidden_state: the encoder's output, before the post-LN for
  pool='cls' (CLIP) and after it for pool='map' (SigLIP). 'pooled' is the post-LN CLS token
  ('cls') or the attention pool of the post-LN tokens ('map'); 'embedding' its projection (not
  normalised); with output_dim=None there is no projection and 'embedding' is absent. Outputs
  are float32.
  """
  config: ViTConfig
  output_dim: Optional[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"  # layers.ATTENTION_IMPLS.
  seq_pad_multiple: int = 0  # layers.Encoder: pad the tokens once per tower (0: never).
  # The last layer computes the CLS token only (layers.Encoder's pool_index): 'tokens' is then
  # absent. pool='cls' only (the 'map' head reads every token).
  pooled_last_layer: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    if self.pooled_last_layer and cfg.pool != "cls":
      raise ValueError(f"pooled_last_layer=True needs pool='cls', not {cfg.pool!r}: the "
                       "attention-pool head reads every token of the last layer.")
    x = embed_patches(self, cfg, images)
    x = nn.with_logical_constraint(x, layers.HIDDEN_AXES)
    if cfg.ln_pre:
      x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "pre_norm")(x)
    pool_index = jnp.zeros(x.shape[:1], jnp.int32) if self.pooled_last_layer else None
    x = layers.Encoder(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, pre_norm=True,
        layer_norm_eps=cfg.layer_norm_eps, act=cfg.act, dtype=self.dtype,
        param_dtype=self.param_dtype, scan=self.scan, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl, seq_pad_multiple=self.seq_pad_multiple,
        name="encoder")(x, None, deterministic, pool_index)
    post_norm = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "post_norm")
    if self.pooled_last_layer:  # x: the CLS token [B, D].
      pooled = post_norm(x)
    elif cfg.pool == "cls":
      pooled = post_norm(x[:, 0])
    else:
      x = post_norm(x)
      pooled = layers.AttentionPool(
          cfg.num_heads, cfg.mlp_dim, layer_norm_eps=cfg.layer_norm_eps, act=cfg.act,
          dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
          name="head")(x)
    out = {"pooled": pooled.astype(jnp.float32)}
    if not self.pooled_last_layer:
      out["tokens"] = x.astype(jnp.float32)
    if self.output_dim is not None:
      out["embedding"] = nn.Dense(
          self.output_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          name="projection", kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(cfg.width ** -0.5), ("embed", None)))(pooled).astype(
                  jnp.float32)
    return out
