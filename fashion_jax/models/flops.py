"""Analytic model FLOPs and device peaks, for MFU and the memory/speed planner.

Model FLOPs count the matmuls of the forward pass (2 m n k each) x 3 for forward + backward;
rematerialisation is excluded (the usual MFU convention). They are computed from the config, not
from XLA's `cost_analysis()`, which counts a scanned layer body once.
"""

import jax

from fashion_jax.models import clip as clip_lib
from fashion_jax.models import siglip as siglip_lib

# Dense peak TFLOP/s per device: (bfloat16, float32). float32 matmuls on Hopper/Ampere run as TF32
# under XLA's default precision, so the TF32 peak is listed for float32.
PEAK_TFLOPS = {
    "H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0),
    "L4": (121.0, 60.0), "V100": (125.0, 15.7), "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0), "TPU v5p": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0),
}


def tower_flops(width: int, layers: int, mlp_dim: int, tokens: int,
                pooled_last_layer: bool = False) -> int:
  """Forward matmul FLOPs of one transformer tower per example.

  pooled_last_layer: the last layer computes one query token (layers.Encoder's pool_index): its
  k and v projections still see every token, its q, out, attention row and MLP one token.
  """
  def layer(queries):
    return (2 * tokens * width * 2 * width              # k, v projections
            + 2 * queries * width * 2 * width           # q, out projections
            + 2 * 2 * queries * tokens * width          # q k^T and probs v
            + 2 * 2 * queries * width * mlp_dim)        # fc1, fc2
  if pooled_last_layer:
    return (layers - 1) * layer(tokens) + layer(1)
  return layers * layer(tokens)


def _logit_flops(batch: int, width: int, text_rows: int, logit_dims) -> int:
  """Per example: one row of each [B, B] similarity matrix, 2 B m per width m (0 = full)."""
  dims = [m or width for m in (logit_dims or (0,))]
  return text_rows * sum(2 * batch * m for m in dims)


def clip_train_flops_per_step(config: clip_lib.CLIPConfig, batch: int, length: int,
                              text_rows: int = 1, logit_dims=(0,),
                              encoded_text_rows: float | None = None) -> float:
  """Model FLOPs of one CLIP train step: both towers, projections and logits, forward x 3.

  text_rows: texts per example that enter the loss (1, or 1 + F field texts with a multi-field
  loss, or F with text_weight 0). logit_dims: the embedding widths the logits are computed at
  (Matryoshka prefixes; 0 = the full width), each once per text row. encoded_text_rows: texts
  the tower encodes per example when fewer than text_rows (model.field_dedup encodes each
  distinct field text of the batch once: 1 + U / B); default text_rows.
  """
  v, t, p = config.vision, config.text, config.projection_dim
  n = v.num_patches + 1
  vision = (2 * v.num_patches * v.patch_size ** 2 * 3 * v.width
            + tower_flops(v.width, v.num_layers, v.mlp_dim, n, config.pooled_last_layer)
            + 2 * v.width * p)
  text = (tower_flops(t.width, t.num_layers, t.mlp_dim, length, config.pooled_last_layer)
          + 2 * t.width * p)
  logits = _logit_flops(batch, p, text_rows, logit_dims)
  encoded = text_rows if encoded_text_rows is None else encoded_text_rows
  return 3.0 * batch * (vision + encoded * text + logits)


def attention_pool_flops(width: int, mlp_dim: int, tokens: int) -> int:
  """Forward matmul FLOPs of one attention-pool head (layers.AttentionPool) per example.

  One probe query over `tokens` keys: q and out projections on 1 token (2 w^2 each), k and v
  projections on every token (2 x 2 n w^2), q k^T and probs v (2 x 2 n w), the MLP on 1 token
  (2 x 2 w m).
  """
  return (2 * 2 * width * width + 2 * 2 * tokens * width * width + 2 * 2 * tokens * width
          + 2 * 2 * width * mlp_dim)


def siglip_train_flops_per_step(config: siglip_lib.SiglipConfig, batch: int, length: int,
                                text_rows: int = 1, logit_dims=(0,),
                                encoded_text_rows: float | None = None) -> float:
  """Model FLOPs of one SigLIP train step, forward x 3 (arguments as the CLIP count).

  Vision: patch embedding, the tower on num_patches tokens (no class token), the attention-pool
  head, no projection (the pooled vector is the embedding). Text: the tower on `length` tokens
  (no causal mask: the same matmuls) and the head on the last token (w_t x p; its bias is no
  matmul). Logits: the [B, B] pairwise matrix of the sigmoid loss, as CLIP's.
  """
  v, t, p = config.vision, config.text, config.projection_dim
  n = v.num_patches
  vision = (2 * n * v.patch_size ** 2 * 3 * v.width
            + tower_flops(v.width, v.num_layers, v.mlp_dim, n)
            + attention_pool_flops(v.width, v.mlp_dim, n))
  text = tower_flops(t.width, t.num_layers, t.mlp_dim, length) + 2 * t.width * p
  logits = _logit_flops(batch, p, text_rows, logit_dims)
  encoded = text_rows if encoded_text_rows is None else encoded_text_rows
  return 3.0 * batch * (vision + encoded * text + logits)


def peak_flops(dtype: str, override_tflops: float = 0.0) -> float | None:
  """Dense peak FLOP/s of this process's first device for `dtype`; None if unknown."""
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, (bf16, f32) in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return (bf16 if dtype in ("bfloat16", "float16") else f32) * 1e12
  return None
