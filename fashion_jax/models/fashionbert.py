"""FashionBERT: one BERT over [CLS, text, SEP, image patches] (Gao et al., SIGIR 2020).

Input sequence (S x S image, g x g grid, P = g^2 patches of p = S / g pixels, text of L tokens
from the BERT tokenizer, which already holds [CLS] ... [SEP] [PAD]...):

  patches:   image [B, S, S, 3] -> [B * P, p, p, 3] (row-major grid order)
  features:  f = stop_gradient(pooled(CNN(normalise(patch))))                      [B, P, F]
             CNN = ResNet (ResNet-50 pooled, F = 2048, as the paper; the 'tiny' variant, F = 64,
             for smoke runs), inference-mode BatchNorm, FROZEN: the paper extracts the patch
             features once with a pretrained network, which is also what lets
             `launch.prepare` (fashion_jax/prepare/patches.py) cache them.
             cnn = None ('pixels', a smoke-scale choice, NOT the paper's): each normalised
             patch average-pooled to q x q cells (q = pixel_pool; p % q == 0), flattened in
             (row, col, channel) order, F = 3 q^2. No parameters, so it is frozen and the MPM
             target is well defined; unlike a randomly initialised ResNet (whose
             inference-mode BatchNorm with untrained statistics gives nearly constant
             features: across-image std 0.04-0.07 around 0.3) it keeps the patch's colours and
             coarse layout, the information a pretrained ResNet-50 would carry at this scale.
  masking:   f_bp <- 0 where patch_mask[b, p] (masked patch modelling zeroes masked features)
  patch emb: e_img = Dense(f) + patch_position[p] + segment[1]                     [B, P, D]
  text emb:  e_txt = word[ids] + position[t] + segment[0]  (BERT's own tables)      [B, L, D]
  encoder:   h = BERT.encode([e_txt ; e_img], [text_mask ; 1])                      [B, L+P, D]
             (BERT's embedding LayerNorm and dropout apply to the joint sequence)
  heads:     pooled = tanh(Dense(h[:, 0]))                                          [B, D]
             align  = Dense_2(pooled)   text-image alignment logits (1 = aligned)   [B, 2]
             mlm    = BERT's tied MLM head on text positions                        [..., V]
             mpm    = Dense_F(h_patch)  predicted patch features                    [B, P, F]

The segment embedding of the patches is row 1 of BERT's token-type table (text is segment 0),
so a pretrained BERT's two segments become "text" and "image". Patch positions have their own
table [P, D] (N(0, 0.02) like BERT's); the text keeps BERT's absolute positions 0..L-1.
Images are normalised with ImageNet statistics (what torchvision / HF ResNets were trained on).

Parameter tree (variables; `params` and the CNN's `batch_stats`):
  params/bert/...              the Bert of models/bert.py (pooler and MLM head included)
  params/cnn/...               the ResNet of models/resnet.py; batch_stats/cnn/... (neither
                               exists when cnn is None: pooled pixels have no parameters)
  params/patch_proj/{kernel [F, D], bias [D]}, params/patch_position/embedding [P, D]
  params/mpm_head/{kernel [D, F], bias [F]}, params/align_head/{kernel [D, 2], bias [2]}
The CNN receives no gradient (stop_gradient on its output); configs also freeze it in the
optimizer (`optimizer.freeze`) so weight decay leaves it alone.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import bert as bert_lib
from fashion_jax.models import layers
from fashion_jax.models import resnet as resnet_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_SEGMENT, IMAGE_SEGMENT = 0, 1


def split_patches(images: jax.Array, grid: int) -> jax.Array:
  """[B, S, S, C] -> [B, grid * grid, S / grid, S / grid, C], patches in row-major grid order."""
  b, h, w, c = images.shape
  if h != w or h % grid:
    raise ValueError(f"images must be square with a side divisible by grid={grid}; got "
                     f"{h}x{w}.")
  p = h // grid
  x = images.reshape(b, grid, p, grid, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, p, p, c)


class FashionBert(nn.Module):
  """See the module docstring.

  Attributes:
    bert: the Bert (with pooler and MLM head) used as the single-stream encoder.
    cnn: the ResNet patch network, or None for pooled pixels (see the module docstring).
    grid: patches per side (8 in the paper; the reference extraction script used 4).
    pixel_pool: q, the pooled cells per patch side when cnn is None (F = 3 q^2).
  """
  bert: bert_lib.Bert
  cnn: Optional[resnet_lib.ResNet]
  grid: int = 8
  pixel_pool: int = 4

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def feature_dim(self) -> int:
    return 3 * self.pixel_pool ** 2 if self.cnn is None else self.cnn.widths[-1]

  def setup(self):
    if self.bert.type_vocab_size < 2:
      raise ValueError(f"FashionBERT needs two segments (text, image); the BERT has "
                       f"type_vocab_size={self.bert.type_vocab_size}.")
    if not (self.bert.with_pooler and self.bert.with_mlm_head):
      raise ValueError("FashionBERT's BERT needs its pooler and MLM head (with_pooler and "
                       "with_mlm_head True).")
    d, f = self.bert.hidden_size, self.feature_dim
    init = nn.initializers.normal(self.bert.initializer_range)
    zeros = nn.initializers.zeros
    kw = dict(dtype=self.bert.dtype, param_dtype=self.bert.param_dtype)
    self.patch_proj = nn.Dense(d, kernel_init=nn.with_logical_partitioning(init, (None, "embed")),
                               bias_init=nn.with_logical_partitioning(zeros, ("embed",)), **kw)
    self.patch_position = nn.Embed(
        self.num_patches, d, embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
        **kw)
    self.mpm_head = nn.Dense(f, kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                             bias_init=nn.with_logical_partitioning(zeros, (None,)), **kw)
    self.align_head = nn.Dense(2, kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                               bias_init=nn.with_logical_partitioning(zeros, (None,)), **kw)

  def patch_features(self, images: jax.Array) -> jax.Array:
    """uint8 (or [0, 255] float) images [B, S, S, 3] -> frozen patch features [B, P, F] float32."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, S, S, 3], got shape {images.shape}")
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    patches = split_patches(x, self.grid)
    b, p = patches.shape[:2]
    if self.cnn is None:
      side, q = patches.shape[2], self.pixel_pool
      if q < 1 or side % q:
        raise ValueError(f"pixel_pool={q} must divide the patch side {side} (image side "
                         f"{images.shape[1]} / grid {self.grid}).")
      cells = patches.reshape(b, p, q, side // q, q, side // q, 3).mean(axis=(3, 5))
      return jax.lax.stop_gradient(cells.reshape(b, p, 3 * q * q))
    pooled = self.cnn(patches.reshape((b * p,) + patches.shape[2:]), train=False)["pooled"]
    return jax.lax.stop_gradient(pooled.astype(jnp.float32).reshape(b, p, -1))

  def embed_patches(self, features: jax.Array, patch_mask: Optional[jax.Array] = None
                    ) -> jax.Array:
    """features [B, P, F] (+ bool patch_mask [B, P], True = zeroed) -> raw embeddings [B, P, D]."""
    if features.ndim != 3 or features.shape[1:] != (self.num_patches, self.feature_dim):
      raise ValueError(f"features must be [B, {self.num_patches}, {self.feature_dim}], got "
                       f"{features.shape}")
    if patch_mask is not None:
      if patch_mask.shape != features.shape[:2]:
        raise ValueError(f"patch_mask {patch_mask.shape} != [B, P] = {features.shape[:2]}")
      features = jnp.where(patch_mask[..., None], 0.0, features)
    segment = self.bert.type_embeddings(jnp.full((1, 1), IMAGE_SEGMENT, jnp.int32))
    e = (self.patch_proj(features.astype(self.bert.dtype))
         + self.patch_position(jnp.arange(self.num_patches)[None, :]) + segment)
    return nn.with_logical_constraint(e, layers.HIDDEN_AXES)

  def encode(self, ids: jax.Array, text_mask: jax.Array, features: jax.Array,
             patch_mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
    """ids, text_mask [B, L], features [B, P, F] -> joint hidden states [B, L + P, D]."""
    if text_mask.shape != ids.shape:
      raise ValueError(f"text_mask {text_mask.shape} != ids {ids.shape}")
    e = jnp.concatenate([self.bert.embed_text(ids, jnp.full_like(ids, TEXT_SEGMENT)),
                         self.embed_patches(features, patch_mask)], axis=1)
    mask = jnp.concatenate(
        [text_mask.astype(bool), jnp.ones(features.shape[:2], bool)], axis=1)
    return self.bert.encode(e, mask, deterministic)

  def align_logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, L + P, D] -> alignment logits [B, 2] from the pooled [CLS]."""
    return self.align_head(self.bert.pool(hidden)).astype(jnp.float32)

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """text hidden states [..., D] -> vocabulary logits [..., V] (tied decoder)."""
    return self.bert.mlm_logits(hidden)

  def mpm_predict(self, hidden: jax.Array) -> jax.Array:
    """patch hidden states [..., D] -> predicted features [..., F]."""
    return self.mpm_head(hidden)

  def __call__(self, ids: jax.Array, text_mask: jax.Array, images: Optional[jax.Array] = None,
               features: Optional[jax.Array] = None, patch_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Forward pass from images or precomputed features (exactly one).

    Returns {'hidden': [B, L+P, D], 'align_logits': [B, 2], 'features': [B, P, F]}; initialising
    through here creates every parameter (CNN, heads included).
    """
    if (images is None) == (features is None):
      raise ValueError("Pass exactly one of images and features.")
    if features is None:
      features = self.patch_features(images)
    hidden = self.encode(ids, text_mask, features, patch_mask, deterministic)
    out = {"hidden": hidden, "align_logits": self.align_logits(hidden), "features": features}
    if self.is_initializing():
      self.mlm_logits(hidden[:, :1])
      self.mpm_predict(hidden[:, -1:])
    return out


PIXELS = "pixels"


def fashionbert(bert_variant: str = "base", cnn_variant: str = "resnet50", grid: int = 8, *,
                bert: Optional[dict[str, Any]] = None, cnn: Optional[dict[str, Any]] = None,
                pixel_pool: int = 4) -> FashionBert:
  """FashionBert from named BERT / ResNet variants with per-part field overrides.

  cnn_variant='pixels' uses pooled pixels (pixel_pool^2 cells per patch) instead of a ResNet."""
  if cnn_variant == PIXELS:
    if cnn:
      raise ValueError(f"cnn_variant='pixels' has no CNN to override; got cnn={cnn}.")
    net = None
  else:
    net = resnet_lib.resnet(cnn_variant, **(cnn or {}))
  return FashionBert(bert=bert_lib.bert(bert_variant, **(bert or {})), cnn=net, grid=grid,
                     pixel_pool=pixel_pool)
