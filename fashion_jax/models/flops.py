"""Analytic model FLOPs and device peaks, for MFU and the memory/speed planner.

Model FLOPs count the matmuls of the forward pass (2 m n k each) x 3 for forward + backward;
rematerialisation is excluded (the usual MFU convention). They are computed from the config, not
from XLA's `cost_analysis()`, which counts a scanned layer body once.
"""

import jax

from fashion_jax.models import clip as clip_lib

# Dense peak TFLOP/s per device: (bfloat16, float32). float32 matmuls on Hopper/Ampere run as TF32
# under XLA's default precision, so the TF32 peak is listed for float32.
PEAK_TFLOPS = {
    "H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0),
    "L4": (121.0, 60.0), "V100": (125.0, 15.7), "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0), "TPU v5p": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0),
}


def tower_flops(width: int, layers: int, mlp_dim: int, tokens: int) -> int:
  """Forward matmul FLOPs of one transformer tower per example."""
  per_layer = (2 * tokens * width * 4 * width      # q, k, v, out projections
               + 2 * 2 * tokens * tokens * width    # q k^T and probs v
               + 2 * 2 * tokens * width * mlp_dim)  # fc1, fc2
  return layers * per_layer


def clip_train_flops_per_step(config: clip_lib.CLIPConfig, batch: int, length: int) -> float:
  """Model FLOPs of one CLIP train step: both towers, projections and logits, forward x 3."""
  v, t, p = config.vision, config.text, config.projection_dim
  n = v.num_patches + 1
  vision = (2 * v.num_patches * v.patch_size ** 2 * 3 * v.width
            + tower_flops(v.width, v.num_layers, v.mlp_dim, n) + 2 * v.width * p)
  text = tower_flops(t.width, t.num_layers, t.mlp_dim, length) + 2 * t.width * p
  logits = 2 * batch * p  # per example: one row of the [B, B] similarity matrix
  return 3.0 * batch * (vision + text + logits)


def peak_flops(dtype: str, override_tflops: float = 0.0) -> float | None:
  """Dense peak FLOP/s of this process's first device for `dtype`; None if unknown."""
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, (bf16, f32) in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return (bf16 if dtype in ("bfloat16", "float16") else f32) * 1e12
  return None
