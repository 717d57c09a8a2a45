"""FashionViL's downstream heads around the pretrained model (models/fashionvil.py).

The pretrained FashionViL lives unchanged under the submodule `vil` (params/vil/...,
batch_stats/vil/...), so a pretraining checkpoint maps onto it path for path; each task adds only
its own head:

  retrieval  two-tower: v = mean of the image tokens, w = masked mean of the text pass, the
             pretraining ITC scale (vil/itc_scale); nothing new.
  tgir       query q = mean over the image positions of fuse([modification text ; reference
             image tokens]) [B, D]; target t = unimodal image vector [B, D] of the target image;
             own scale `tgir_scale` (init 4), logits s^2 cos (the reference's composition head:
             NormalizationLayer on both sides, batch-based classification loss).
  cls        fusion of [text ; image] -> readout r [B, D] -> BERT pooler tanh(Dense(r)) -> per
             label field f: Dense -> GELU -> LayerNorm -> Dense(K_f) (`cls_<f>_*`, BERT's
             prediction-head transform followed by the classifier, as the reference's head).
             `cls_readout`: 'cls' = the fusion [CLS] output (the paper, which starts from a
             pretrained BERT); 'mean' = the mean of the fused outputs over the valid text
             positions and all image positions. Decision: smoke configs use 'mean'. A BERT
             trained from scratch (or for a few hundred smoke steps) has an input-independent
             [CLS] output: measured on the smoke model at init, the per-dimension std of
             hidden[:, 0] over a batch is 0.008 against a norm of 11.3, so the head sees one
             vector for every example, predicts one class and its CE stays at ln K (60 steps
             even at lr 2e-3); the mean readout reaches CE 1.1 in the same 60 steps.
  ocir       item vector = unimodal image vector (text unused, Polyvore OCIR is image-based);
             CSA-Net category-conditioned masks: `ocir_masks` [K, D] (init 1 + N(0, 0.1), used
             through relu), `ocir_u`, `ocir_v` [C, K], `ocir_c` [K] (the pair attention
             softmax(U_a + V_b + c), a linear layer on the two categories' one-hots), own scale
             `ocir_scale` (init 4). losses/fashionvil_downstream.py gives the formulas.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.losses import fashionvil_downstream as losses
from fashion_jax.models import fashionvil as fvil
from fashion_jax.models import layers

TASKS = ("retrieval", "tgir", "cls", "ocir")
READOUTS = ("cls", "mean")


class FashionViLDownstream(nn.Module):
  """See the module docstring.

  Attributes:
    vil: the FashionViL backbone (same architecture as the pretraining run).
    task: one of TASKS.
    num_classes: cls: classes of each label field, in field order.
    num_categories: ocir: C (category vocabulary incl. the 'unknown' slot).
    num_masks: ocir: K subspace masks (5 in CSA-Net).
    scale_init: initial s of the tgir / ocir scales.
    cls_readout: cls: 'cls' or 'mean' (module docstring).
  """
  vil: fvil.FashionViL
  task: str
  num_classes: Sequence[int] = ()
  num_categories: int = 0
  num_masks: int = 5
  scale_init: float = 4.0
  cls_readout: str = "cls"

  def setup(self):
    if self.task not in TASKS:
      raise ValueError(f"task={self.task!r}; use one of {TASKS}.")
    if self.cls_readout not in READOUTS:
      raise ValueError(f"cls_readout={self.cls_readout!r}; use one of {READOUTS}.")
    bert = self.vil.fusion_bert if self.vil.fusion_bert is not None else self.vil.text_bert
    d, std, eps = bert.hidden_size, bert.initializer_range, bert.layer_norm_eps
    init = nn.initializers.normal(std)
    scale = nn.with_logical_partitioning(nn.initializers.constant(self.scale_init), ())

    def dense(features, axes, name):
      return nn.Dense(features, dtype=self.vil.dtype, param_dtype=jnp.float32, name=name,
                      kernel_init=nn.with_logical_partitioning(init, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

    if self.task == "tgir":
      self.tgir_scale = self.param("tgir_scale", scale, (), jnp.float32)
    elif self.task == "cls":
      if not self.num_classes or min(self.num_classes) < 2:
        raise ValueError(f"cls needs >= 2 classes per field, got num_classes={self.num_classes}.")
      self.cls_transform = [dense(d, ("embed", "mlp"), f"cls_{i}_transform")
                            for i in range(len(self.num_classes))]
      self.cls_norm = [layers.layer_norm(eps, self.vil.dtype, jnp.float32, f"cls_{i}_norm")
                       for i in range(len(self.num_classes))]
      self.cls_out = [dense(k, ("embed", None), f"cls_{i}_out")
                      for i, k in enumerate(self.num_classes)]
    elif self.task == "ocir":
      if self.num_categories < 1 or self.num_masks < 1:
        raise ValueError(f"ocir needs num_categories >= 1 and num_masks >= 1, got "
                         f"{self.num_categories}, {self.num_masks}.")
      k, c = self.num_masks, self.num_categories
      mask_init = lambda key, shape, dtype: 1.0 + 0.1 * jax.random.normal(key, shape, dtype)
      self.ocir_masks = self.param(
          "ocir_masks", nn.with_logical_partitioning(mask_init, (None, "embed")), (k, d),
          jnp.float32)
      self.ocir_u = self.param("ocir_u", nn.with_logical_partitioning(init, (None, None)),
                               (c, k), jnp.float32)
      self.ocir_v = self.param("ocir_v", nn.with_logical_partitioning(init, (None, None)),
                               (c, k), jnp.float32)
      self.ocir_c = self.param("ocir_c", nn.with_logical_partitioning(
          nn.initializers.zeros, (None,)), (k,), jnp.float32)
      self.ocir_scale = self.param("ocir_scale", scale, (), jnp.float32)

  # --- shared -----------------------------------------------------------------------------------
  def image_vector(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """uint8 [B, S, S, 3] -> v [B, D] (mean of the image tokens, float32, not normalised)."""
    return jnp.mean(self.vil.image_tokens(images, None, deterministic).astype(jnp.float32), 1)

  def fused(self, images, ids, mask, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Fusion of [text ; image] -> (hidden [B, L + N, D], image-position mean [B, D])."""
    tokens = self.vil.image_tokens(images, None, deterministic)
    hidden = self.vil.fuse(ids, mask, tokens, None, deterministic)
    return hidden, jnp.mean(hidden[:, ids.shape[1]:].astype(jnp.float32), axis=1)

  # --- tasks --------------------------------------------------------------------------------------
  def tgir(self, ref_images, ids, mask, target_images, deterministic: bool = True):
    """-> (q [B, D], t [B, D], s): fused query, target vector, scale (see the module docstring)."""
    _, q = self.fused(ref_images, ids, mask, deterministic)
    return q, self.image_vector(target_images, deterministic), self.tgir_scale

  def tgir_query(self, ref_images, ids, mask) -> jax.Array:
    """L2-normalised q [B, D] (evaluation)."""
    _, q = self.fused(ref_images, ids, mask)
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)

  def classify(self, images, ids, mask, deterministic: bool = True) -> tuple[jax.Array, ...]:
    """[text ; image] -> one logits array [B, K_f] per label field."""
    hidden, _ = self.fused(images, ids, mask, deterministic)
    bert = self.vil.fusion_bert if self.vil.fusion_bert is not None else self.vil.text_bert
    if self.cls_readout == "mean":
      b, n = hidden.shape[0], hidden.shape[1] - ids.shape[1]
      valid = jnp.concatenate([mask.astype(jnp.float32), jnp.ones((b, n), jnp.float32)], 1)
      r = (jnp.sum(hidden.astype(jnp.float32) * valid[..., None], axis=1)
           / jnp.sum(valid, axis=1, keepdims=True))
      hidden = r[:, None, :].astype(hidden.dtype)                    # pool reads position 0
    pooled = bert.pool(hidden)
    out = []
    for t, n, o in zip(self.cls_transform, self.cls_norm, self.cls_out):
      out.append(o(n(nn.gelu(t(pooled), approximate=False))).astype(jnp.float32))
    return tuple(out)

  def ocir_table(self) -> jax.Array:
    """[C, C, D] subspace mask of every (item category, candidate category) pair."""
    return losses.pair_masks(self.ocir_u, self.ocir_v, self.ocir_c, self.ocir_masks)

  def __call__(self, images, ids, mask):
    """Init path: touches the backbone's every parameter and this task's head."""
    out = self.vil(images, ids, mask)
    if self.task == "tgir":
      out["tgir"] = self.tgir(images, ids, mask, images)
    elif self.task == "cls":
      out["cls"] = self.classify(images, ids, mask)
    elif self.task == "ocir":
      out["ocir"] = (self.ocir_table(), self.ocir_scale)
    return out
