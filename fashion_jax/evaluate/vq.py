"""The VQ tokenizer's evaluator (config.evals type 'vq'): reconstruction error and code usage.

On every first view of a split (the eval pipeline's resize + centre crop, evaluate/common.py):
  {split}/vq/recon_mse   mean squared error of the reconstruction, in [-1, 1] pixel units
  {split}/vq/psnr        10 log10(4 / recon_mse) dB (peak-to-peak 2)
  {split}/vq/perplexity  exp(entropy) of the code histogram over the whole split (of K codes)
  {split}/vq/dead_frac   share of the K codes never chosen on the split
`system` is fashion_jax/systems/vqvae.py's System (its `model`, a models/vqvae.VQVAE). A small
convolutional model: evaluated on the default device, whatever the mesh.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.models import vqvae as vqvae_lib


class Evaluator:
  """Reconstruction error and codebook usage on one split (see the module docstring)."""

  def __init__(self, system, config, mesh=None, *, split: str = "validation",
               batch_size: int = 64, dataset_fn=None):
    del mesh
    self.system, self.config, self.split = system, config, split
    self.batch_size, self.dataset_fn = batch_size, dataset_fn

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split, with at least one product."""
    return [base.DataNeed(base.arguments(cls, kwargs)["split"], why="VQ reconstruction")]

  def run(self, params) -> dict[str, float]:
    params = jax.device_get(params)
    f = jax.jit(lambda p, x: self.system.model.apply(p, x))
    se, n, codes = 0.0, 0, []
    for batch in common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                     dataset_fn=self.dataset_fn, single_process=True):
      valid = np.asarray(batch["valid"])
      out = jax.device_get(f(params, batch["image"]))
      x = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
      se += float(np.sum(np.square(out["recon"] - x)[valid]))
      n += int(valid.sum()) * x[0].size
      codes.append(np.asarray(out["codes"])[valid])
    if not n:
      raise ValueError(f"Split {self.split!r} is empty.")
    mse = se / n
    usage = vqvae_lib.code_usage(jnp.asarray(np.concatenate(codes)), self.system.model.num_codes)
    prefix = f"{self.split}/vq/"
    return {prefix + "recon_mse": mse, prefix + "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
            prefix + "perplexity": float(usage["perplexity"]),
            prefix + "dead_frac": float(usage["dead_frac"])}
