"""VQ-VAE patch tokenizer: the frozen 1024-way targets of FashionViL's MPFC.

The reference never released its tokenizer; this is ours. The code grid equals the fusion
encoder's patch grid (7 x 7 at 224 px for ResNet-50), so code (i, j) labels patch (i, j).

  x  = images / 127.5 - 1                                            [B, S, S, 3]
  encoder: conv3x3(w0) -> `num_down` x [conv4x4/2 -> ReLU] (widths w_k) -> num_res x ResBlock
           -> conv1x1 -> z_e                                          [B, g, g, E],  g = S / 2^num_down
  quantise: z^ = z_e / |z_e|, c^_k = c_k / |c_k| (l2-normalised codes, cosine lookup as in
           ViT-VQGAN), k*(ij) = argmax_k z^_ij . c^_k,  z_q = c^_{k*}    [B, g, g, E]
           straight-through: z_st = z^ + sg(z_q - z^)
  decoder: conv3x3 -> num_res x ResBlock -> `num_down` x [ReLU -> convT4x4/2] -> conv3x3 -> x^

Two ways to learn the codebook (`codebook`):
  'ema' (default; the VQ-VAE-2 / Sonnet recipe): the codebook is not a parameter but state in
      the `vq_ema` collection: count N [K] and sum m [K, E]. Per training step, over the
      GLOBAL batch's M = B g^2 normalised encoder outputs z^_i with codes k_i:
        n_k = #{i : k_i = k},   s_k = sum_{i: k_i = k} z^_i
        N <- d N + (1 - d) n,   m <- d m + (1 - d) s        (d = ema_decay, 0.99)
        c_k = m_k / N_k, so c^_k = m_k / |m_k|: with cosine lookup the count only scales c_k
        and Laplace smoothing of N (needed with Euclidean lookup) is unnecessary.
      Dead-code restarts (restart_below > 0): after the update, every code with N_k <
      restart_below is re-seated on a batch vector: the dead codes, in index order, take the
      batch's worst-quantised vectors (largest 1 - z^_i . c^_{k_i}, descending; cycling when
      there are more dead codes than vectors), with N_k = 1, m_k = z^_i. Deterministic (no
      random draw), so sharded and single-device runs agree. Init: N = 1, m = random unit
      vectors. The trainer writes the new state (System.mutable_collections).
      loss = mean (x - x^)^2 + beta mean (z^ - sg(z_q))^2
  'gradient': the codebook is a parameter learned by VQ-VAE's codebook term:
      loss = mean (x - x^)^2 + mean (sg(z^) - z_q)^2 + beta mean (z^ - sg(z_q))^2
Measured on synthetic_catalog/smoke (experiments/vq_report.py): see the README's VQ table.

`code_usage(codes, K)` gives the usage statistics the README reports: perplexity
exp(-sum_k p_k log p_k) of the code histogram, and the share of codes never used.
"""

from typing import Sequence

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
    codebook: 'ema' (EMA state in the `vq_ema` collection) or 'gradient' (a parameter).
    ema_decay: d of the EMA codebook.
    restart_below: EMA count under which a code is re-seated (0 = never; 'ema' only).
  """
  widths: Sequence[int] = (32, 64, 128, 128, 128, 128)
  num_res: int = 2
  code_dim: int = 32
  num_codes: int = 1024
  beta: float = 0.25
  codebook: str = "ema"
  ema_decay: float = 0.99
  restart_below: float = 0.0

  @property
  def num_down(self) -> int:
    return len(self.widths) - 1

  def __post_init__(self):
    # Checked at construction (a System built from a bad config fails at once, not at init).
    if self.codebook not in ("ema", "gradient"):
      raise ValueError(f"VQVAE codebook={self.codebook!r}: use 'ema' or 'gradient'.")
    if self.codebook == "gradient" and self.restart_below:
      raise ValueError("restart_below is for the 'ema' codebook only.")
    if not 0.0 < self.ema_decay < 1.0:
      raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1).")
    super().__post_init__()

  def setup(self):
    shape = (self.num_codes, self.code_dim)
    if self.codebook == "gradient":
      self.codebook_param = self.param(
          "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None)),
          shape, jnp.float32)
    else:
      self.ema_count = self.variable("vq_ema", "count", jnp.ones, (self.num_codes,), jnp.float32)
      self.ema_sum = self.variable(
          "vq_ema", "sum",
          lambda: _l2n(nn.initializers.normal(1.0)(self.make_rng("params"), shape, jnp.float32)))
    self.encoder = Encoder(tuple(self.widths), self.num_res, self.code_dim)
    self.decoder = Decoder(tuple(self.widths), self.num_res)

  def codes_normalised(self) -> jax.Array:
    """c^ [K, E]: the l2-normalised codebook (m / |m| for 'ema')."""
    return _l2n(self.codebook_param if self.codebook == "gradient" else self.ema_sum.value)

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
    cn = self.codes_normalised()
    codes = jnp.argmax(zn @ cn.T, axis=-1).astype(jnp.int32)
    return zn, cn[codes], codes

  def encode(self, images: jax.Array) -> jax.Array:
    """uint8 images [B, S, S, 3] -> codes int32 [B, g * g] (row-major, the patch order)."""
    self._check(images)
    _, _, codes = self.quantise(self.encoder(self.to_input(images)))
    return codes.reshape(codes.shape[0], -1)

  def decode_codes(self, codes: jax.Array, grid: int) -> jax.Array:
    """codes int [B, g * g] -> reconstruction float32 [B, S, S, 3] in [-1, 1] units."""
    z = self.codes_normalised()[codes].reshape(codes.shape[0], grid, grid, self.code_dim)
    return self.decoder(z)

  def _update_ema(self, zn: jax.Array, zq: jax.Array, codes: jax.Array) -> jax.Array:
    """One EMA step (+ restarts) from zn, zq [M, E], codes [M]; returns #codes restarted."""
    zn, zq = jax.lax.stop_gradient(zn), jax.lax.stop_gradient(zq)
    onehot = jax.nn.one_hot(codes, self.num_codes, dtype=jnp.float32)      # [M, K]
    d = self.ema_decay
    count = d * self.ema_count.value + (1.0 - d) * jnp.sum(onehot, axis=0)
    total = d * self.ema_sum.value + (1.0 - d) * jnp.einsum(
        "mk,me->ke", onehot, zn, precision=jax.lax.Precision.HIGHEST)
    restarted = jnp.zeros((), jnp.float32)
    if self.restart_below:
      dead = count < self.restart_below                                    # [K]
      err = 1.0 - jnp.sum(zn * zq, axis=-1)                                # [M]
      worst = jnp.argsort(-err, stable=True)                               # [M]
      rank = jnp.cumsum(dead.astype(jnp.int32)) - 1                        # [K]
      seat = zn[worst[jnp.mod(rank, zn.shape[0])]]                         # [K, E]
      count = jnp.where(dead, 1.0, count)
      total = jnp.where(dead[:, None], seat, total)
      restarted = jnp.sum(dead.astype(jnp.float32))
    self.ema_count.value, self.ema_sum.value = count, total
    return restarted

  def __call__(self, images: jax.Array, update_codebook: bool = False
               ) -> dict[str, jax.Array]:
    """uint8 [B, S, S, 3] -> {'loss', 'recon_mse', 'codebook', 'commit', 'codes' [B, g*g],
    'recon' [B, S, S, 3], 'restarted'}.

    'codebook' = mean (sg(z^) - z_q)^2 is a loss term for the 'gradient' codebook and only a
    metric (the quantisation error) for 'ema'. update_codebook=True (training, 'ema') applies
    one EMA step to the `vq_ema` collection, which must then be mutable.
    """
    self._check(images)
    x = self.to_input(images)
    zn, zq, codes = self.quantise(self.encoder(x))
    z_st = zn + jax.lax.stop_gradient(zq - zn)
    recon = self.decoder(z_st)
    recon_mse = jnp.mean(jnp.square(recon - x))
    codebook = jnp.mean(jnp.square(jax.lax.stop_gradient(zn) - zq))
    commit = jnp.mean(jnp.square(zn - jax.lax.stop_gradient(zq)))
    loss = recon_mse + self.beta * commit
    restarted = jnp.zeros((), jnp.float32)
    if self.codebook == "gradient":
      loss = loss + codebook
    elif update_codebook and not self.is_initializing():
      e = self.code_dim
      restarted = self._update_ema(zn.reshape(-1, e), zq.reshape(-1, e), codes.reshape(-1))
    return {"loss": loss, "recon_mse": recon_mse, "codebook": codebook, "commit": commit,
            "codes": codes.reshape(codes.shape[0], -1), "recon": recon, "restarted": restarted}


def code_usage(codes: jax.Array, num_codes: int) -> dict[str, jax.Array]:
  """codes int [...] -> {'perplexity': exp(H(p)), 'dead_frac': share of the K codes unused}."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "dead_frac": jnp.mean(counts == 0)}
