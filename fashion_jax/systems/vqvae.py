r"""The VQ tokenizer of FashionViL's MPFC as a system: trained by the trainer, then frozen.

`python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir=W` trains it (the
configs/vqvae.py variant that matches the FashionViL config) into W/prepared/vqvae with the
normal trainer and caches the codes MPFC needs (fashion_jax/prepare/vq_codes.py). Trained alone:
  python -m launch.train --config=configs/vqvae.py:smoke --workdir=runs/vqvae_smoke

Config keys this system reads: model.widths, model.num_res, model.code_dim, model.num_codes,
model.beta, model.codebook ('ema' | 'gradient'), model.ema_decay, model.restart_below,
model.grid (the code grid g; must equal data.image_size / 2^(len(widths) - 1) and the
FashionViL run's patch grid), data.image_size.

Params: the model's variables, {'params': ...} and, with the EMA codebook, 'vq_ema':
{count [K], sum [K, E]}, declared in `mutable_collections`: the trainer writes the state the
loss returns after each step (fashion_jax/train/step.py), so it is sharded, checkpointed and
restored with the parameters.

Loss and metrics (models/vqvae.py): loss = recon + beta commit (+ codebook for 'gradient');
metrics recon_mse (in [-1, 1] pixel units), codebook (the quantisation error), commit, the
batch's code perplexity / dead share, and with EMA `restarted` (codes re-seated this step).

Elsewhere: the cached codes (`cache_codes`, reconstruction pictures) in prepare/vq_codes.py; the
evaluator (config.evals type 'vq': recon_mse, psnr, perplexity, dead_frac) in evaluate/vq.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.models import vqvae as vqvae_lib

CONFIG_KEYS = ("model", "data", "init", "objective")


class System:
  """The VQ-VAE tokenizer as a fashion_jax system (see systems/base.py)."""

  required_features = ("image",)  # The batch keys `loss` reads (systems/base.py).

  def __init__(self, config):
    self.config = config
    m = config.model
    self.model = vqvae_lib.VQVAE(widths=tuple(m.widths), num_res=int(m.num_res),
                                 code_dim=int(m.code_dim), num_codes=int(m.num_codes),
                                 beta=float(m.beta), codebook=m.get("codebook", "ema"),
                                 ema_decay=float(m.get("ema_decay", 0.99)),
                                 restart_below=float(m.get("restart_below", 0.0)))
    self.mutable_collections = ("vq_ema",) if self.model.codebook == "ema" else ()
    size, down = int(config.data.image_size), 2 ** (len(m.widths) - 1)
    if size % down or size // down != int(m.grid):
      raise ValueError(f"model.grid={m.grid} but data.image_size={size} with "
                       f"{len(m.widths) - 1} downsamplings (model.widths) gives a "
                       f"{size / down:g} x {size / down:g} code grid.")
    self.grid = int(m.grid)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s = self.config.data.image_size
    return {"image": np.zeros((batch_size, s, s, 3), np.uint8)}

  def init(self, rng, batch):
    """The variables dict: {'params': ...} (+ 'vq_ema' for the EMA codebook)."""
    return dict(self.model.init(rng, batch["image"]))

  def loss(self, params, batch, rng, train: bool = True):
    """(loss, metrics), or (loss, (metrics, {'vq_ema': new state})) when training with EMA."""
    del rng  # Quantisation and restarts are deterministic.
    update = train and bool(self.mutable_collections)
    if update:
      out, new_state = self.model.apply(params, batch["image"], update_codebook=True,
                                        mutable=list(self.mutable_collections))
    else:
      out = self.model.apply(params, batch["image"])
    usage = vqvae_lib.code_usage(out["codes"], self.model.num_codes)
    metrics = {k: out[k] for k in ("recon_mse", "codebook", "commit")}
    metrics.update({f"batch_{k}": v for k, v in usage.items()})
    if not update:
      return out["loss"], metrics
    metrics["restarted"] = out["restarted"]
    return out["loss"], (metrics, dict(new_state))

  def encode(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> codes int32 [B, g * g]."""
    return self.model.apply(params, images, method=vqvae_lib.VQVAE.encode)

  def reconstruct(self, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 [B, S, S, 3] -> (reconstruction uint8 [B, S, S, 3], codes [B, g * g])."""
    codes = self.encode(params, images)
    rec = self.model.apply(params, codes, self.grid, method=vqvae_lib.VQVAE.decode_codes)
    return jnp.clip(jnp.round((rec + 1.0) * 127.5), 0, 255).astype(jnp.uint8), codes
