r"""The VQ tokenizer (VQ-VAE, 1024 codes) whose frozen codes are FashionViL's MPFC targets.

Variants (`--config=configs/vqvae.py:VARIANT`, then `--config.KEY=VALUE` overrides):

smoke: 64 px synthetic catalog images -> 4 x 4 codes (the patch grid of
  configs/fashionvil.py:smoke: a 3-stage tiny ResNet at 64 px), on a CPU.
  FashionViL's launch.prepare trains the variant that matches its config (same dataset, image
  size and grid) into <workdir>/prepared/vqvae and caches the codes
  (fashion_jax/prepare/vq_codes.py); nothing to run here for that. Trained alone:
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m launch.train --config=configs/vqvae.py:smoke --workdir=runs/vqvae_smoke
  python -m fashion_jax.prepare.vq_codes --config=configs/vqvae.py:smoke \
      --workdir=runs/vqvae_smoke --out=runs/vqvae_smoke/codes.npz \
      --picture=runs/vqvae_smoke/recon.png
  Reports validation recon_mse / psnr / perplexity / dead_frac (fashion_jax/evaluate/vq.py).
  Compare runs and draw originals beside reconstructions:
  python -m experiments.vq_report --run=ema=runs/vqvae_smoke \
      --run=gradient=runs/vqvae_smoke_grad --picture=docs/vq_reconstructions.png
  (the gradient-codebook run: --config.model.codebook=gradient --config.model.restart_below=0).

Codebook (models/vqvae.py): EMA (decay 0.99) with dead-code restarts below an EMA count of
0.03 (a code unused for ~350 steps is re-seated on a badly quantised batch vector), the
default; `codebook='gradient'` learns it by VQ-VAE's codebook loss instead.

base: 224 px -> 7 x 7 codes, the grid of ResNet-50 in configs/fashionvil.py:base.
"""

import ml_collections

from configs import common
from fashion_jax.train import config_check

VARIANTS = ("smoke", "base")  # fashion_jax/prepare/vq_codes.py picks the one that matches.


def get_config(arg: str = "smoke"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/vqvae.py: unknown variant {arg!r}; use smoke or base.")
  c = ml_collections.ConfigDict()
  c.system = "vqvae"
  c.seed = 0
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=("title",), tokenizer=dict(kind="bert", path=""), max_len=16, views=1,
      augment=dict(crop_scale=(0.8, 1.0), flip=True), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=4096, prefetch=2,
      resize_on="host", crop_pad=0)
  # 4 stride-2 stages: 64 px -> 4 x 4 codes.
  c.model = dict(widths=(16, 32, 64, 64, 64), num_res=1, code_dim=32, num_codes=1024,
                 beta=0.25, codebook="ema", ema_decay=0.99, restart_below=0.03, grid=4)
  c.init = dict()
  c.objective = dict()
  c.mesh = common.DATA_MESH
  c.batch_size = 64
  c.total_steps = 1500
  c.optimizer = common.adamw(1e-3, 0.0, warmup_steps=50)
  c.checkpoint = common.checkpoint(500, keep=2, best_metric="validation/vq/recon_mse",
                                   best_mode="min")
  c.log_every_steps = 25
  c.evals = dict(vq_validation=dict(type="vq", split="validation",
                                    every=500))
  if arg == "base":
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 224
    c.model = dict(widths=(64, 128, 128, 256, 256, 256), num_res=2, code_dim=32,
                   num_codes=1024, beta=0.25, codebook="ema", ema_decay=0.99,
                   restart_below=0.03, grid=7)
    c.batch_size = 128
    c.total_steps = 20000
    c.optimizer.schedule = dict(kind="cosine", warmup_steps=500)
    c.checkpoint = common.checkpoint(2000, keep=2, best_metric="validation/vq/recon_mse",
                                     best_mode="min")
  return config_check.with_defaults(c)
