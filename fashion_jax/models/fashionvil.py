"""FashionViL: an image encoder and ONE BERT shared as text encoder and fusion encoder.

  image tokens  u = Linear(grid features)                                         [B, N, D]
                ResNet: last-stage grid [B, h, w, C] (7 x 7 x 2048 at 224 px) flattened row-major
                (N = h w); ViT option: the patch tokens of the last layer (CLS dropped).
                MPFC zeroes the GRID FEATURES of masked patches before the Linear (the reference
                masks the 2048-d features), so a masked token is bias + visual embeddings.
  image vector  v = mean_n u_n                                                    [B, D]
                (no transformer on the unimodal image path, as the reference's
                `bypass_transformer`).
  text pass     h = BERT(text) with the padding mask; text vector w = masked mean of h [B, D].
  fusion pass   e = [BERT.embed_text(text) ; u + P_vis + t_vis]                   [B, L + N, D]
                h = BERT.encode(e, joint mask) (embedding LayerNorm over the joint sequence);
                fused vector f = mean of h over the KEPT image positions          [B, D]
                (FashionViL's TGIR query; also our MVC feature).
  heads         ITM: Dense(2)(BERT.pool(h)); MLM: BERT's tied decoder on text positions;
                MPFC: Dense -> GELU -> LayerNorm -> Dense(C) on image positions; PAC: cosine
                classifier W [D, A]; ITC / MVC: one learnable scale s each, logits s^2 cos.

Visual embeddings (deliberate choice). P_vis [N, D] is a learned position per patch and t_vis
[D] one visual token type. The reference (MMF's BertVisioLinguisticEmbeddings) gives every
visual token position 0, which, once MPFC zeroes masked features, makes all masked tokens
identical inputs that the model cannot tell apart; a per-patch position keeps the grid layout.
When BERT is imported, P_vis may be initialised from BERT's first N position rows and t_vis from
its type row 1 (`init_visual_embeddings_from_bert`), as the reference copies them.

Sharing. `fusion_bert=None` (FashionViL) runs the text pass and the fusion pass through the same
`text_bert`; passing a second Bert gives the no-sharing ablation (two BERTs, the text one only
for unimodal text, the fusion one only for fusion; the MLM head then lives on the fusion BERT).

Images arrive uint8 [B, S, S, 3]: ResNet inputs are normalised with ImageNet statistics (the
statistics of torchvision / HF ResNet checkpoints), the ViT option normalises itself (CLIP's).

Parameter tree: image_encoder/..., image_proj/{kernel [C, D], bias}, visual_position [N, D],
visual_type [D], text_bert/... (and fusion_bert/... without sharing), itm_head/{kernel, bias},
mpfc_transform/..., mpfc_norm/..., mpfc_out/..., pac_weight [D, A] (A > 0), itc_scale,
mvc_scale. The ResNet's BatchNorm running statistics live in the `batch_stats` collection and
are used frozen (inference-mode BN), as is usual when fine-tuning a CNN with small per-device
batches; systems/fashionvil.py keeps them in its params tree under the frozen 'batch_stats'.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import bert as bert_lib
from fashion_jax.models import layers
from fashion_jax.models import resnet as resnet_lib
from fashion_jax.models import vit as vit_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x [B, L, D], mask [B, L] -> sum_l m_l x_l / max(sum_l m_l, 1)  [B, D] (float32)."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class FashionViL(nn.Module):
  """See the module docstring.

  Attributes:
    image_encoder: a resnet.ResNet (grid features) or a vit.VisionTransformer (output_dim=None).
    text_bert: the BERT (with pooler and MLM head) used for text, and for fusion when shared.
    fusion_bert: None = shared (FashionViL); a second Bert = the no-sharing ablation.
    num_patches: N, image tokens per image (h * w of the grid); checked against the encoder.
    num_codes: C, size of the VQ tokenizer's codebook (MPFC classes).
    num_attributes: A, pseudo-attributes (PAC classes); 0 = no PAC head.
    itc_scale_init: initial s of ITC and MVC (4.0 in the reference).
    dtype: compute dtype of the heads and the projection.
  """
  image_encoder: nn.Module
  text_bert: bert_lib.Bert
  fusion_bert: Optional[bert_lib.Bert] = None
  num_patches: int = 49
  num_codes: int = 1024
  num_attributes: int = 0
  itc_scale_init: float = 4.0
  dtype: Any = jnp.float32

  def setup(self):
    d = self.text_bert.hidden_size
    if self.fusion_bert is not None and self.fusion_bert.hidden_size != d:
      raise ValueError(f"fusion_bert.hidden_size={self.fusion_bert.hidden_size} != "
                       f"text_bert.hidden_size={d}.")
    init = nn.initializers.normal(self.text_bert.initializer_range)

    def dense(features, axes, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                      kernel_init=nn.with_logical_partitioning(init, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

    self.image_proj = dense(d, (None, "embed"), "image_proj")
    self.visual_position = self.param(
        "visual_position", nn.with_logical_partitioning(init, (None, "embed")),
        (self.num_patches, d), jnp.float32)
    self.visual_type = self.param(
        "visual_type", nn.with_logical_partitioning(init, ("embed",)), (d,), jnp.float32)
    self.itm_head = dense(2, ("embed", None), "itm_head")
    self.mpfc_transform = dense(d, ("embed", "mlp"), "mpfc_transform")
    self.mpfc_norm = layers.layer_norm(self.text_bert.layer_norm_eps, self.dtype, jnp.float32,
                                       "mpfc_norm")
    self.mpfc_out = dense(self.num_codes, ("embed", None), "mpfc_out")
    if self.num_attributes:
      self.pac_weight = self.param(
          "pac_weight", nn.with_logical_partitioning(init, ("embed", None)),
          (d, self.num_attributes), jnp.float32)
    scale = nn.with_logical_partitioning(nn.initializers.constant(self.itc_scale_init), ())
    self.itc_scale = self.param("itc_scale", scale, (), jnp.float32)
    self.mvc_scale = self.param("mvc_scale", scale, (), jnp.float32)

  @property
  def _fusion(self) -> bert_lib.Bert:
    return self.text_bert if self.fusion_bert is None else self.fusion_bert

  # --- unimodal passes --------------------------------------------------------------------------
  def image_tokens(self, images: jax.Array, patch_mask: Optional[jax.Array] = None,
                   deterministic: bool = True) -> jax.Array:
    """uint8 images [B, S, S, 3] (, bool patch_mask [B, N]: True = zero it) -> u [B, N, D]."""
    if images.dtype != jnp.uint8:
      raise ValueError(f"FashionViL takes uint8 images, got {images.dtype}.")
    if isinstance(self.image_encoder, resnet_lib.ResNet):
      x = images.astype(jnp.float32) / 255.0
      x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
      grid = self.image_encoder(x, train=False)["grid"]
      feats = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    else:
      feats = self.image_encoder(images, deterministic=deterministic)["tokens"][:, 1:]
    if feats.shape[1] != self.num_patches:
      raise ValueError(f"The image encoder gives {feats.shape[1]} tokens for "
                       f"{images.shape[1]}x{images.shape[2]} images but num_patches="
                       f"{self.num_patches}.")
    if patch_mask is not None:
      if patch_mask.shape != feats.shape[:2]:
        raise ValueError(f"patch_mask shape {patch_mask.shape} != (B, N) = {feats.shape[:2]}.")
      feats = jnp.where(patch_mask[..., None], 0.0, feats)
    u = self.image_proj(feats.astype(self.dtype))
    return nn.with_logical_constraint(u, layers.HIDDEN_AXES)

  def text_hidden(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True
                  ) -> jax.Array:
    """Text-only BERT pass: ids, mask [B, L] -> hidden [B, L, D]."""
    return self.text_bert(ids, mask, deterministic=deterministic)["hidden"]

  def unimodal(self, images, ids, mask, deterministic: bool = True) -> dict[str, jax.Array]:
    """{'image': v [B, D], 'text': w [B, D], 'itc_scale': s}: the ITC/PAC/ITM-mining vectors."""
    v = jnp.mean(self.image_tokens(images, None, deterministic).astype(jnp.float32), axis=1)
    w = masked_mean(self.text_hidden(ids, mask, deterministic), mask)
    return {"image": v, "text": w, "itc_scale": self.itc_scale}

  # --- fusion -------------------------------------------------------------------------------------
  def fuse(self, ids: jax.Array, text_mask: jax.Array, tokens: jax.Array,
           image_keep: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
    """Fusion pass over [text ; image tokens] -> hidden [B, L + N, D].

    Args:
      ids: int [B, L] text (possibly MLM-masked) ids; text_mask: [B, L] keys that exist.
      tokens: u [B, N, D] image tokens (image_tokens).
      image_keep: optional [B, N] bool, image keys that may be attended (MVC drops patches);
        None = all. Only keys are masked (BERT's padding-mask convention).
    """
    fb = self._fusion
    b, n = tokens.shape[:2]
    if n != self.num_patches:
      raise ValueError(f"tokens have {n} positions, num_patches={self.num_patches}.")
    vis = tokens + (self.visual_position + self.visual_type).astype(tokens.dtype)[None]
    emb = jnp.concatenate([fb.embed_text(ids), vis.astype(jnp.float32)], axis=1)
    keep = jnp.ones((b, n), bool) if image_keep is None else image_keep.astype(bool)
    mask = jnp.concatenate([text_mask.astype(bool), keep], axis=1)
    return fb.encode(emb, mask, deterministic)

  def itm_logits(self, hidden: jax.Array) -> jax.Array:
    """Fusion hidden [B, L + N, D] -> [B, 2] (pooled CLS; logit 1 = matched)."""
    return self.itm_head(self._fusion.pool(hidden)).astype(jnp.float32)

  def mlm_logits(self, text_hidden: jax.Array) -> jax.Array:
    """Fusion hidden at text positions [B, L, D] -> [B, L, V] (tied decoder)."""
    return self._fusion.mlm_logits(text_hidden).astype(jnp.float32)

  def mpfc_logits(self, image_hidden: jax.Array) -> jax.Array:
    """Fusion hidden at image positions [B, N, D] -> [B, N, C]."""
    h = self.mpfc_norm(nn.gelu(self.mpfc_transform(image_hidden), approximate=False))
    return self.mpfc_out(h).astype(jnp.float32)

  def pac_logits(self, x: jax.Array) -> jax.Array:
    """x [B, D] -> cos(x, W) [B, A] (unscaled, as the reference)."""
    if not self.num_attributes:
      raise ValueError("num_attributes=0: this model has no PAC head.")
    xn = x.astype(jnp.float32)
    xn = xn / jnp.maximum(jnp.linalg.norm(xn, axis=-1, keepdims=True), 1e-12)
    w = self.pac_weight / jnp.maximum(jnp.linalg.norm(self.pac_weight, axis=0, keepdims=True),
                                      1e-12)
    return xn @ w

  def scales(self) -> dict[str, jax.Array]:
    return {"itc": self.itc_scale, "mvc": self.mvc_scale}

  # --- two-tower embeddings (retrieval) ---------------------------------------------------------
  def encode_images(self, images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> L2-normalised v [B, D]."""
    v = jnp.mean(self.image_tokens(images).astype(jnp.float32), axis=1)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

  def encode_texts(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids, mask [B, L] -> L2-normalised w [B, D]."""
    w = masked_mean(self.text_hidden(ids, mask), mask)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)

  def __call__(self, images, ids, mask, deterministic: bool = True):
    """Init path: touches every parameter (both BERTs, every head)."""
    out = self.unimodal(images, ids, mask, deterministic)
    tokens = self.image_tokens(images, None, deterministic)
    hidden = self.fuse(ids, mask, tokens, None, deterministic)
    length = ids.shape[1]
    out["itm"] = self.itm_logits(hidden)
    out["mlm"] = self.mlm_logits(hidden[:, :1])
    out["mpfc"] = self.mpfc_logits(hidden[:, length:])
    if self.num_attributes:
      out["pac"] = self.pac_logits(out["image"])
    if self.fusion_bert is not None and self.is_initializing():
      self.text_bert.mlm_logits(hidden[:, :1])  # Both BERTs keep the full BertForMaskedLM tree.
    out.update(self.scales())
    return out


def make_image_encoder(kind: str, *, resnet_variant: str = "resnet50",
                       resnet: Optional[dict] = None, vit: Optional[dict] = None,
                       image_size: int = 224, dtype: Any = jnp.float32, scan: bool = False,
                       remat_policy: str = "none") -> tuple[nn.Module, int]:
  """(image encoder, N tokens per image) for kind 'resnet' (grid) or 'vit' (patch tokens).

  resnet: overrides of the named variant (e.g. depths=(1, 1, 1), widths=(8, 16, 32) for a
  3-stage CPU smoke trunk). The grid stride is 4 * 2^(stages - 1): 32 for the usual 4 stages
  (224 px -> 7 x 7), 16 for 3 stages (64 px -> 4 x 4).
  remat_policy rematerialises each residual block (ResNet) or transformer block (ViT); scan
  applies to the ViT's layers only (a ResNet's blocks differ in shape, there is nothing to scan).
  """
  if kind == "resnet":
    encoder = resnet_lib.resnet(resnet_variant, dtype=dtype, remat_policy=remat_policy,
                                **dict(resnet or {}))
    stride = 4 * 2 ** (len(encoder.depths) - 1 + int(encoder.downsample_in_first_stage))
    if image_size % stride:
      raise ValueError(f"image_size={image_size} must be a multiple of the ResNet grid stride "
                       f"{stride}.")
    return encoder, (image_size // stride) ** 2
  if kind == "vit":
    vit = dict(vit or {})
    variant = vit.pop("variant", "B/16")
    cfg = vit_lib.vit_config(variant, image_size=image_size, **vit)
    return vit_lib.VisionTransformer(cfg, output_dim=None, dtype=dtype, scan=scan,
                                     remat_policy=remat_policy), cfg.num_patches
  raise ValueError(f"Unknown image encoder {kind!r}; use 'resnet' or 'vit'.")


def init_visual_embeddings_from_bert(params: dict, bert_params: dict) -> dict:
  """Copies BERT's position rows 0..N-1 and type row 1 into visual_position / visual_type.

  params: FashionViL params (unboxed, the 'params' collection); bert_params: the text BERT's
  params (e.g. params['text_bert'] after an HF import). Returns a new dict (the reference
  initialises its visual position/type embeddings from BERT's in the same way).
  """
  n = params["visual_position"].shape[0]
  pos = bert_params["position_embeddings"]["embedding"]
  types = bert_params["type_embeddings"]["embedding"]
  if pos.shape[0] < n:
    raise ValueError(f"BERT has {pos.shape[0]} positions, fewer than N={n} image tokens.")
  out = dict(params)
  out["visual_position"] = jnp.asarray(pos[:n])
  out["visual_type"] = jnp.asarray(types[min(1, types.shape[0] - 1)])
  return out
