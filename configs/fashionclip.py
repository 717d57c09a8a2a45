r"""FashionCLIP: contrastive fine-tuning of a CLIP dual encoder on fashion products.

Variants (`--config=configs/fashionclip.py:VARIANT`, then `--config.KEY=VALUE` overrides):

smoke: a small CLIP trained from scratch on the built-in synthetic catalog, on a CPU.
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m launch.train --config=configs/fashionclip.py:smoke --workdir=runs/fashionclip_smoke
  python -m launch.evaluate --config=configs/fashionclip.py:smoke --workdir=runs/fashionclip_smoke
  Expect (2 CPU cores, minutes): test full-candidate t2i R@10 far above chance (chance = 10/500),
  see README for the measured table.

own: the smoke model trained from scratch on a shop's own catalog (an image_text_folder): a CLIP
  BPE learnt on the catalog's train texts (every brand / product word one token, not byte
  pieces), no random crop (a crop removes small brand marks and labels), each product's first
  image only (the one retrieval and search encode; other views of a product can lack what the
  caption names), test-split evaluation only. docs/results/recipe_strength.md compares it with
  a minimal JAX CLIP at equal samples.
  python -m launch.build_data --dataset=image_text_folder/myshop --manual_dir=/data/myshop
  python -m fashion_jax.data.tokenizers --catalog_vocab=runs/myshop_vocab \
      --dataset=image_text_folder/myshop
  python -m launch.train --config=configs/fashionclip.py:own --workdir=runs/myshop \
      --config.data.name=image_text_folder/myshop --config.data.tokenizer.path=runs/myshop_vocab

base: FashionCLIP's recipe: CLIP ViT-B/32 at 224 px, every layer fine-tuned from a pretrained
  CLIP (a local HF CLIPModel directory, e.g. openai/clip-vit-base-patch32 or
  laion/CLIP-ViT-B-32-laion2B-s34B-b79K saved with save_pretrained), its own tokenizer.
  python -m launch.build_data --dataset=synthetic_catalog/base   (or fashiongen, image_text_folder)
  python -m launch.train --config=configs/fashionclip.py:base --workdir=runs/fc_base \
      --config.init.hf_clip_dir=/path/to/clip-vit-base-patch32 \
      --config.data.tokenizer.path=/path/to/clip-vit-base-patch32

pod: CLIP B/16 at 224 px, global batch 32k, bf16 compute, fsdp over the whole pod, scanned and
  rematerialised layers, chunked encoding and blockwise InfoNCE (exact: same loss). Launch with
  launch/ pod scripts (see README). Memory per chip before launching:
  python -m launch.plan --config=configs/fashionclip.py:pod --devices=64 --hbm_gib=16

Any variant: --config.model.pooled_last_layer=True computes each tower's last layer for its
  pooled token (CLS, EOS) only: the same loss and gradients (to float rounding), 10/12 of a
  layer's matmuls fewer per tower (B/32 step on a CPU: docs/benchmarks.md).
"""

import ml_collections

from fashion_jax.evaluate import prompts
from fashion_jax.train import config_check

# Splits of the synthetic catalog that probe generalisation (unseen brands / categories,
# improbable captions). Other catalogs (FashionGen, a shop's own image_text_folder) lack them.
PROBE_SPLITS = ("holdout_brand", "holdout_category", "improbable")


def _evals(splits, every, protocols=("full", "sample100"), zeroshot=True):
  """End-of-run evaluations of `splits`: one per retrieval protocol, and zero-shot by
  sub-category with the shared prompts (evaluate/prompts.py, as FashionCLIP.zero_shot_classify).

  All are optional: on a dataset without the split (e.g. the probe splits on a shop's own
  catalog), without sub-category labels, or with a split too small for the sample-100 protocol
  (101 products), that evaluation is skipped with a logged note and the others run.
  """
  evals = {}
  for split in splits:
    for protocol in protocols:
      name = f"retrieval_{split}" + ("" if protocol == "full" else f"_{protocol}")
      evals[name] = dict(type="retrieval", split=split, protocols=(protocol,), every=every,
                         optional=True)
    if zeroshot:
      evals[f"zeroshot_{split}"] = dict(type="zeroshot", split=split, field="subcategory",
                                        templates=prompts.TEMPLATES, every=every, optional=True)
  return evals


def _schedule(c, *, lr, weight_decay, warmup_steps, eval_every, log_every):
  """AdamW with CLIP's betas, cosine decay, checkpoints and validation retrieval per eval_every."""
  c.optimizer = dict(name="adamw", lr=lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
                     clip_norm=1.0, schedule=dict(kind="cosine", warmup_steps=warmup_steps))
  c.checkpoint = dict(every_steps=eval_every, keep=3, best_metric="validation/full/t2i_R@10",
                      best_mode="max")
  c.log_every_steps = log_every
  # Periodic: validation retrieval (the learning curve, and best_metric: required). At the end:
  # the full table (optional evaluations, see _evals).
  c.evals = dict(retrieval_validation=dict(type="retrieval", split="validation",
                                           protocols=("full",), every=eval_every))


def get_config(arg: str = "smoke"):
  if arg not in ("smoke", "own", "base", "pod"):
    raise ValueError(f"configs/fashionclip.py: unknown variant {arg!r}; use smoke, own, base or "
                     "pod.")
  c = ml_collections.ConfigDict()
  c.system = "fashionclip"
  c.seed = 0

  # --- data: the input pipeline (fashion_jax/data/pipeline.py) ---------------------------------
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=("title", "description"), tokenizer=dict(kind="clip", path=""), max_len=64,
      views=1, view="random", augment=dict(crop_scale=(0.7, 1.0), flip=False), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=4096, prefetch=2,
      resize_on="host", crop_pad=0)

  # --- model: fashion_jax/systems/fashionclip.py ---------------------------------------------
  c.model = dict(variant="tiny", projection_dim=128,
                 vision=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512, patch_size=8),
                 text=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512),
                 dtype="float32", scan=False, remat_policy="none", attention_impl="einsum",
                 seq_pad_multiple=0, pooled_last_layer=False, encode_chunks=1, loss_blocks=1,
                 field_dedup=0)
  c.init = dict(hf_clip_dir="")

  # --- trainer -------------------------------------------------------------------------------
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Sized for 2 CPU cores: batch 64 runs at about 0.5 s/step there (batch 128 is 4x slower).
  c.batch_size = 64
  c.total_steps = 600
  _schedule(c, lr=1e-3, weight_decay=0.1, warmup_steps=50, eval_every=100, log_every=25)
  c.evals.update(_evals(("test",) + PROBE_SPLITS, every=0))

  if arg == "own":
    c.data.name = "image_text_folder/myshop"  # Set it on the command line.
    # The path of `python -m fashion_jax.data.tokenizers --catalog_vocab=DIR` ('' = shipped).
    c.data.tokenizer = dict(kind="clip", path="")
    c.data.augment = dict(crop_scale=(1.0, 1.0), flip=False)
    c.data.view = "first"
    c.evals.update(_evals(("test",), every=0))
    for split in PROBE_SPLITS:
      for name in (f"retrieval_{split}", f"retrieval_{split}_sample100", f"zeroshot_{split}"):
        del c.evals[name]
  if arg in ("base", "pod"):
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 224
    c.data.max_len = 77  # CLIP's context.
    c.data.augment = dict(crop_scale=(0.8, 1.0), flip=False)
  if arg == "base":
    c.model = dict(variant="B/32", projection_dim=None, vision=None, text=None,
                   dtype="float32", scan=False, remat_policy="none",
                   attention_impl="einsum", seq_pad_multiple=0, pooled_last_layer=False,
                   encode_chunks=1, loss_blocks=1, field_dedup=0)
    c.init.hf_clip_dir = ""  # Required for the recipe: set it on the command line.
    c.batch_size = 256
    c.total_steps = 20000
    # FashionCLIP fine-tunes all layers at a small lr from the pretrained CLIP.
    _schedule(c, lr=1e-5, weight_decay=0.2, warmup_steps=500, eval_every=1000, log_every=50)
    c.evals.update(_evals(("test",) + PROBE_SPLITS, every=0))
  elif arg == "pod":
    # Levers measured with launch/plan.py (64 chips, 512 per chip, fsdp): full remat with
    # 2 encode chunks and 8 InfoNCE blocks plans 9.1 GiB/chip; dots_with_no_batch_dims_saveable
    # without chunks 51 GiB. L/14: --config.model.variant=L/14 --config.model.encode_chunks=4
    # (9.8 GiB/chip). README "Memory plan" has the table.
    c.model = dict(variant="B/16", projection_dim=None, vision=None, text=None,
                   dtype="bfloat16", scan=True, remat_policy="nothing_saveable",
                   attention_impl="einsum", seq_pad_multiple=0, pooled_last_layer=False,
                   encode_chunks=2, loss_blocks=8, field_dedup=0)
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 32768
    c.total_steps = 10000
    _schedule(c, lr=5e-4, weight_decay=0.2, warmup_steps=1000, eval_every=1000, log_every=20)
    c.evals.update(_evals(("test",) + PROBE_SPLITS[:2], every=0))
  # Every trainer key present, so that any of them can be overridden on the command line.
  return config_check.with_defaults(c)
