"""ResNet (v1.5) grid-feature encoder, laid out like transformers' ResNetModel.

FashionViL takes the last stage's grid, `[B, H/32, W/32, 2048]` (7 x 7 at 224 px), as its image
tokens; FashionBERT takes the pooled `[B, 2048]` feature of each image patch. Both come from one
module:

  stem:   x -> conv7x7/2 (no bias) -> BN -> ReLU -> maxpool3x3/2 (pad 1)          [B, H/4, W/4, C0]
  stage s (s = 0..3), block j:
    bottleneck: y = ReLU(BN(conv1x1(x))); y = ReLU(BN(conv3x3/stride(y))); y = BN(conv1x1(y))
    basic:      y = ReLU(BN(conv3x3/stride(x))); y = BN(conv3x3(y))
    out = ReLU(y + shortcut(x)),  shortcut = BN(conv1x1/stride(x)) when the channels or the
          stride change, else the identity.
  stride = 2 for the first block of stages 1..3 (and of stage 0 when `downsample_in_first_stage`);
  v1.5 puts it on the 3x3 convolution of a bottleneck (`downsample_in_bottleneck=True` moves it to
  the first 1x1, the v1 layout).
  grid = output of the last stage [B, h, w, C_last];  pooled = mean of grid over (h, w) [B, C_last].

Padding is explicit and symmetric (k // 2 on each side) as in torch's Conv2d, not XLA's 'SAME'
(which pads a stride-2 convolution asymmetrically and would shift every feature map by a pixel).
BatchNorm runs in inference mode (running statistics) unless `train=True`, in which case batch
statistics are used and the `batch_stats` collection must be mutable; momentum 0.9 / eps 1e-5 are
torch's defaults (torch momentum 0.1 = Flax momentum 0.9). One deliberate difference in training:
Flax updates the running variance with the biased batch variance, torch with the unbiased one
(factor n / (n - 1), n = B * H * W per channel: 0.06% for a 7x7 grid at batch 32); forward
outputs in both modes match torch exactly.

Parameter tree (per block, `stage{s}_block{j}`): conv_{k} {kernel [kh, kw, in, out]},
bn_{k} {scale, bias} (+ batch_stats {mean, var}), and when there is a projection shortcut,
proj_conv / proj_bn. Stem: stem_conv, stem_bn. Kernels carry the logical axes
(None, None, 'conv_in', 'conv_out'), BN vectors ('norm',).

`remat_policy` ('none' or a jax.checkpoint_policies name, as layers.Encoder) rematerialises
each residual block: the backward pass recomputes the block's activations instead of storing
them. Same parameter tree and the same numbers up to rounding (a memory lever for a trained CNN,
e.g. FashionViL's image encoder).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import layers

# (block type, stem width, stage widths (block output channels), blocks per stage).
VARIANTS = {
    "resnet18": ("basic", 64, (64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet34": ("basic", 64, (64, 128, 256, 512), (3, 4, 6, 3)),
    "resnet50": ("bottleneck", 64, (256, 512, 1024, 2048), (3, 4, 6, 3)),
    "resnet101": ("bottleneck", 64, (256, 512, 1024, 2048), (3, 4, 23, 3)),
    # Cheap CNN for smoke runs (FashionBERT patch features, CPU tests): same code path.
    "tiny": ("basic", 8, (8, 16, 32, 64), (1, 1, 1, 1)),
}

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv_init():
  # Kaiming normal, fan_out, ReLU gain: what torchvision / HF ResNet use.
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(2.0, "fan_out", "normal"), _CONV_AXES)


def _conv_bn(x, features: int, kernel: int, stride: int, *, relu: bool, train: bool, dtype,
             conv_name: str, bn_name: str, zero_init_scale: bool = False):
  """conv(k x k, stride, symmetric pad k // 2, no bias) -> BatchNorm -> optional ReLU.

  Called inside a parent's compact method, so `conv_name` / `bn_name` are direct children of the
  parent (flat tree: block/conv_0, block/bn_0, ... like HF's layer.K.convolution/normalization).
  """
  pad = kernel // 2
  x = nn.Conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
              param_dtype=jnp.float32, kernel_init=_conv_init(), name=conv_name)(x)
  scale_init = nn.initializers.zeros if zero_init_scale else nn.initializers.ones
  # use_fast_variance=False: two-pass var (E[(x - mean)^2]), not E[x^2] - mean^2, which loses
  # digits in float32 when a channel's mean is large relative to its spread.
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                   scale_init=nn.with_logical_partitioning(scale_init, ("norm",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                   name=bn_name)(x)
  return nn.relu(x) if relu else x


class ResidualBlock(nn.Module):
  """A basic or bottleneck block (see the module docstring): [B, H, W, Cin] -> [B, H/s, W/s, C]."""
  features: int
  stride: int = 1
  block: str = "bottleneck"
  reduction: int = 4
  downsample_in_bottleneck: bool = False
  zero_init_last_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block == "bottleneck":
      mid = self.features // self.reduction
      s1, s3 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
      specs = [(mid, 1, s1, True), (mid, 3, s3, True), (self.features, 1, 1, False)]
    else:
      specs = [(self.features, 3, self.stride, True), (self.features, 3, 1, False)]
    y = x
    for k, (feat, ks, st, relu) in enumerate(specs):
      last = k == len(specs) - 1
      y = _conv_bn(y, feat, ks, st, relu=relu, train=train, dtype=self.dtype,
                   conv_name=f"conv_{k}", bn_name=f"bn_{k}",
                   zero_init_scale=last and self.zero_init_last_bn)
    if x.shape[-1] != self.features or self.stride != 1:
      x = _conv_bn(x, self.features, 1, self.stride, relu=False, train=train, dtype=self.dtype,
                   conv_name="proj_conv", bn_name="proj_bn")
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet trunk returning grid and pooled features.

  Attributes:
    depths: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    widths: output channels of each stage's blocks, e.g. (256, 512, 1024, 2048).
    stem_width: channels of the 7x7 stem convolution.
    block: 'bottleneck' (1x1 -> 3x3 -> 1x1, width / 4 inside) or 'basic' (3x3 -> 3x3).
    downsample_in_first_stage: stride 2 in stage 0 as well (HF option; False for ResNet-50).
    downsample_in_bottleneck: stride on the first 1x1 (v1) instead of the 3x3 (v1.5, default).
    zero_init_last_bn: initialise the last BN scale of every block to 0 (each block starts as the
      identity; Goyal et al. 2017). Only affects initialisation.
    dtype: compute dtype; parameters and batch statistics stay float32.
    remat_policy: 'none' or a jax.checkpoint_policies name: rematerialise each residual block.
  """
  depths: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (256, 512, 1024, 2048)
  stem_width: int = 64
  block: str = "bottleneck"
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  zero_init_last_bn: bool = False
  dtype: Any = jnp.float32
  remat_policy: str = "none"

  def _validate(self):
    if self.block not in ("bottleneck", "basic"):
      raise ValueError(f"block must be 'bottleneck' or 'basic', got {self.block!r}")
    if len(self.depths) != len(self.widths) or not self.depths:
      raise ValueError(f"depths {tuple(self.depths)} and widths {tuple(self.widths)} must be "
                       "non-empty and of the same length")
    if self.remat_policy != "none" and self.remat_policy not in layers.REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy {self.remat_policy!r}: expected 'none' or one of "
                       f"{', '.join(layers.REMAT_POLICIES)}.")

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images [B, H, W, C] (normalised floats) -> {'grid': [B, h, w, Cl], 'pooled': [B, Cl]}.

    h = ceil(H / 32) for the standard 4-stage layouts (224 -> 7).
    """
    self._validate()
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    x = images.astype(self.dtype)
    x = _conv_bn(x, self.stem_width, 7, 2, relu=True, train=train, dtype=self.dtype,
                 conv_name="stem_conv", bn_name="stem_bn")
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = ResidualBlock
    if self.remat_policy != "none":  # static_argnums counts `self` as 0: `train` is 2.
      block_cls = nn.remat(ResidualBlock, static_argnums=(2,),
                           policy=getattr(jax.checkpoint_policies, self.remat_policy))
    for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for j in range(depth):
        stride = 2 if j == 0 and (s > 0 or self.downsample_in_first_stage) else 1
        x = block_cls(width, stride, block=self.block,
                      downsample_in_bottleneck=self.downsample_in_bottleneck,
                      zero_init_last_bn=self.zero_init_last_bn, dtype=self.dtype,
                      name=f"stage{s}_block{j}")(x, train)
    grid = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    pooled = jnp.mean(grid.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    return {"grid": grid, "pooled": pooled}


def resnet(variant: str = "resnet50", **overrides) -> ResNet:
  """A ResNet from a named variant (see VARIANTS) with attribute overrides (dtype, ...)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ResNet variant {variant!r}; known: {', '.join(VARIANTS)}")
  block, stem, widths, depths = VARIANTS[variant]
  kw = dict(block=block, stem_width=stem, widths=widths, depths=depths)
  kw.update(overrides)
  return ResNet(**kw)
