"""VQ-VAE patch tokenizer: the frozen 1024-way targets of FashionViL's MPFC.

The reference never released its tokenizer; this is ours. The code grid equals the fusion
encoder's patch grid (7 x 7 at 224 px for ResNet-50), so code (i, j) labels patch (i, j).

  x  = images / 127.5 - 1                                            [B, S, S, 3]
  encoder: conv3x3(w0) -> `num_down` x [conv4x4/2 -> ReLU] (widths w_k) -> num_res x ResBlock
           -> conv1x1 -> z_e                                          [B, g, g, E],  g = S / 2^num_down
  quantise: z^ = z_e / |z_e|, c^_k = c_k / |c_k| (l2-normalised codes, cosine lookup as in
           ViT-VQGAN: it keeps far more codes alive than Euclidean lookup without restarts),
           k*(ij) = argmax_k z^_ij . c^_k,  z_q = c^_{k*}              [B, g, g, E]
           straight-through: z_st = z^ + sg(z_q - z^)
  decoder: conv3x3 -> num_res x ResBlock -> `num_down` x [ReLU -> convT4x4/2] -> conv3x3 -> x^
  loss:    L = mean (x - x^)^2 + mean (sg(z^) - z_q)^2 + beta mean (z^ - sg(z_q))^2
           (reconstruction, codebook, commitment; VQ-VAE's loss on the normalised vectors).

Codebook (deliberate deviation from "EMA codebook"): the codebook is learned by the codebook
term above, not by exponential moving averages. EMA updates are not gradients: they need a train
step that writes non-gradient state, which fashion_jax/train does not offer (its step applies
the optimizer to gradients only). With l2-normalised codes the gradient codebook keeps a high
usage (see `code_usage`); EMA can replace it once the trainer supports state updates.

`code_usage(codes, K)` gives the usage statistics the README reports: perplexity
exp(-sum_k p_k log p_k) of the code histogram, and the share of codes never used.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _conv(features, kernel, stride=1, name=None):
  pad = (kernel - 1) // 2 if stride == 1 else (kernel - stride) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                     (None, None, "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class ResBlock(nn.Module):
  """x + conv1x1(ReLU(conv3x3(ReLU(x))))  [B, h, w, C]."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = _conv(self.hidden, 3, name="conv_0")(nn.relu(x))
    y = _conv(x.shape[-1], 1, name="conv_1")(nn.relu(y))
    return x + y


def _l2n(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Encoder(nn.Module):
  """uint8-normalised x [B, S, S, 3] -> z_e [B, S / 2^d, S / 2^d, E], d = len(widths) - 1."""
  widths: Sequence[int]
  num_res: int
  code_dim: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.widths[0], 3, name="stem")(x)
    for k, w in enumerate(self.widths[1:]):
      h = nn.relu(_conv(w, 4, 2, name=f"down_{k}")(h))
    for r in range(self.num_res):
      h = ResBlock(self.widths[-1], name=f"res_{r}")(h)
    return _conv(self.code_dim, 1, name="out")(nn.relu(h))


class Decoder(nn.Module):
  """z [B, g, g, E] -> x^ [B, g 2^d, g 2^d, 3] (mirror of Encoder, transposed convolutions)."""
  widths: Sequence[int]
  num_res: int

  @nn.compact
  def __call__(self, z):
    h = _conv(self.widths[-1], 3, name="stem")(z)
    for r in range(self.num_res):
      h = ResBlock(self.widths[-1], name=f"res_{r}")(h)
    for k, w in enumerate(reversed(self.widths[:-1])):
      h = nn.ConvTranspose(w, (4, 4), strides=(2, 2), padding="SAME", name=f"up_{k}",
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                               (None, None, "conv_in", "conv_out")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("conv_out",)))(nn.relu(h))
    return _conv(3, 3, name="out")(nn.relu(h))


class VQVAE(nn.Module):
  """See the module docstring.

  Attributes:
    widths: channels after the stem and after each downsampling (len = num_down + 1).
    num_res: residual blocks at the lowest resolution (encoder and decoder).
    code_dim: E, the code vector width.
    num_codes: K (1024 for FashionViL's MPFC).
    beta: commitment weight.
  """
  widths: Sequence[int] = (32, 64, 128, 128, 128, 128)
  num_res: int = 2
  code_dim: int = 32
  num_codes: int = 1024
  beta: float = 0.25

  @property
  def num_down(self) -> int:
    return len(self.widths) - 1

  def setup(self):
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
        (self.num_codes, self.code_dim), jnp.float32)
    self.encoder = Encoder(tuple(self.widths), self.num_res, self.code_dim)
    self.decoder = Decoder(tuple(self.widths), self.num_res)

  @staticmethod
  def to_input(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    if images.dtype != jnp.uint8:
      raise ValueError(f"VQVAE takes uint8 images, got {images.dtype}.")
    return images.astype(jnp.float32) / 127.5 - 1.0

  def _check(self, images):
    s = images.shape[1]
    if images.ndim != 4 or images.shape[2] != s or s % (2 ** self.num_down):
      raise ValueError(f"images {images.shape} must be [B, S, S, 3] with S a multiple of "
                       f"2^num_down = {2 ** self.num_down}.")

  def quantise(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z_e [..., E] -> (normalised z^, z_q, codes int32 [...])."""
    zn = _l2n(z.astype(jnp.float32))
    cn = _l2n(self.codebook)
    codes = jnp.argmax(zn @ cn.T, axis=-1).astype(jnp.int32)
    return zn, cn[codes], codes

  def encode(self, images: jax.Array) -> jax.Array:
    """uint8 images [B, S, S, 3] -> codes int32 [B, g * g] (row-major, the patch order)."""
    self._check(images)
    _, _, codes = self.quantise(self.encoder(self.to_input(images)))
    return codes.reshape(codes.shape[0], -1)

  def decode_codes(self, codes: jax.Array, grid: int) -> jax.Array:
    """codes int [B, g * g] -> reconstruction float32 [B, S, S, 3] in [-1, 1] units."""
    z = _l2n(self.codebook)[codes].reshape(codes.shape[0], grid, grid, self.code_dim)
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 [B, S, S, 3] -> {'loss', 'recon_mse', 'codebook', 'commit', 'codes' [B, g*g],
    'recon' [B, S, S, 3]}."""
    self._check(images)
    x = self.to_input(images)
    zn, zq, codes = self.quantise(self.encoder(x))
    z_st = zn + jax.lax.stop_gradient(zq - zn)
    recon = self.decoder(z_st)
    recon_mse = jnp.mean(jnp.square(recon - x))
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(zn) - zq))
    commit = jnp.mean(jnp.square(zn - jax.lax.stop_gradient(zq)))
    return {"loss": recon_mse + codebook + self.beta * commit, "recon_mse": recon_mse,
            "codebook": codebook, "commit": commit,
            "codes": codes.reshape(codes.shape[0], -1), "recon": recon}


def code_usage(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
  """codes int [...] -> {'perplexity': exp(H(p)), 'dead_frac': share of the K codes unused}."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "dead_frac": jnp.mean(counts == 0)}
