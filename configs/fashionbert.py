r"""FashionBERT: single-stream BERT over [CLS, text, SEP, 8x8 patch features], MLM + MPM + TIA.

Variants (`--config=configs/fashionbert.py:VARIANT`, then `--config.KEY=VALUE` overrides):

smoke: a tiny BERT (2 x 128) over 64 patches, from scratch, on the synthetic catalog, on a CPU
  (minutes). Patch features: model.cnn_variant='pixels', each patch's ImageNet-normalised pixels
  average-pooled to 4 x 4 cells (F = 48, no parameters, so frozen and a well-defined MPM
  target). A smoke-scale choice, NOT the paper's (pretrained ResNet-50 features, see base): the
  randomly initialised tiny ResNet ('tiny', still available with
  --config.model.cnn_variant=tiny --config.optimizer.freeze="(r'(params/cnn|batch_stats)/.*',)")
  gives nearly constant features (across-image std 0.04-0.07 around 0.3), pooled pixels keep
  each patch's colours (across-image std 0.9), and the titles name the product's colour.
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m launch.train --config=configs/fashionbert.py:smoke --workdir=runs/fashionbert_smoke
  python -m launch.evaluate --config=configs/fashionbert.py:smoke --workdir=runs/fashionbert_smoke
  The baseline with fixed equal weights: add --config.objective.weighting=equal.
  Adaptive vs fixed weights at equal compute (cached patch features, 4 x 4 patches, 32 tokens,
  1000 steps, lr 1e-3):
  python -m experiments.fashionbert_compare --data_dir=/tmp/fb_tfds --root=/tmp/fb_compare \
      --parallel
  Measured (2 shared CPU cores, pixels, one seed): the alignment task (TIA) sits at ln 2 for
  ~500-600 steps in every arm, then leaves it in both adaptive arms (train TIA acc 0.57 / 0.64
  at step 1000; test balanced alignment acc 0.55 / 0.67, AUC 0.65 / 0.77, sample-100 i2t R@10
  18.5 / 34.5%) but not with equal weights (0.49; test 0.505, AUC 0.50, at chance). With the
  tiny random ResNet and 2e-3 the same schedule stayed at chance for 200-300 steps in every arm.
  2 layers overfit TIA on 32 real pairs in ~250 steps (pixels: eval acc 0.96; tiny ResNet:
  0.84), so the plateau is a from-scratch optimisation effect, not a blind head.
  Cached patch features (computed once by launch.prepare, fashion_jax/prepare/patches.py), the
  same flags on both commands:
  python -m launch.prepare --config=configs/fashionbert.py:smoke --workdir=runs/fb_cached \
      --config.data.patch_features=prepared --config.data.augment.crop_scale="(1.0, 1.0)"
  python -m launch.train --config=configs/fashionbert.py:smoke --workdir=runs/fb_cached \
      --config.data.patch_features=prepared --config.data.augment.crop_scale="(1.0, 1.0)"
  (or --config.data.patch_features=FILE.npz, a file of your own in the same format).

base: the paper's recipe: BERT-base from a local HF directory (e.g. bert-base-uncased saved with
  save_pretrained) and a pretrained ResNet-50 (HF microsoft/resnet-50 layout) as the frozen patch
  network, 256 px images cut into 8 x 8 patches of 32 px, Adam lr 1e-4 with 10% warmup.
  python -m launch.build_data --dataset=synthetic_catalog/base   (or fashiongen)
  python -m launch.train --config=configs/fashionbert.py:base --workdir=runs/fb_base \
      --config.init.hf_bert_dir=/path/to/bert-base-uncased \
      --config.data.tokenizer.path=/path/to/bert-base-uncased \
      --config.init.hf_resnet_dir=/path/to/resnet-50

pod: base at global batch 2048 in bf16, fsdp over the pod, scanned + rematerialised layers.

Memory and speed levers (pod sets the first three; smoke and base leave them off; each changes
the numbers only by rounding, tests/test_levers_systems.py), as --config overrides:
  --config.model.scan=True          nn.scan over the BERT layers (works with init.hf_bert_dir)
  --config.model.remat_policy=dots_with_no_batch_dims_saveable  (or nothing_saveable,
      dots_saveable): rematerialise each BERT block (the frozen CNN needs none)
  --config.model.dtype=bfloat16     bf16 compute, float32 params and AdamW state
  --config.mesh.fsdp=N --config.mesh.tensor=T   shard params, gradients and optimizer state
  grad_accum_steps=A runs, but negatives, token means and adaptive weights then become
  per-micro-batch: not the same objective (systems/fashionbert.py).
"""

import ml_collections

from configs import common

from fashion_jax.train import config_check

# The CNN is a frozen feature extractor (FashionBERT extracts patch features once).
FREEZE_CNN = (r"(params/cnn|batch_stats)/.*",)


def _evals(split, every, num_queries, pair_batch):
  return dict(type="cross_encoder", split=split, num_queries=num_queries, num_negatives=100,
              repeats=1, pair_batch=pair_batch, every=every)


def get_config(arg: str = "smoke"):
  if arg not in ("smoke", "base", "pod"):
    raise ValueError(f"configs/fashionbert.py: unknown variant {arg!r}; use smoke, base or pod.")
  c = ml_collections.ConfigDict()
  c.system = "fashionbert"
  c.seed = 0

  # --- data: fashion_jax/data/pipeline.py ------------------------------------------------------
  # FashionBERT masks 15% of the words and 5 random patches (single-patch "blocks").
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=("title", "description"), tokenizer=dict(kind="bert", path=""), max_len=48,
      views=1, augment=dict(crop_scale=(0.8, 1.0), flip=False), mlm_prob=0.15,
      patch_mask=dict(grid=8, count=5, min_block=1, max_block=1), shuffle_buffer=4096,
      prefetch=2, resize_on="host", crop_pad=0, patch_features="")

  # --- model / init / objective: fashion_jax/systems/fashionbert.py --------------------------
  # smoke's patch features are pooled pixels (no CNN, nothing to freeze): see the docstring.
  c.model = dict(bert_variant="tiny", bert=dict(dropout_rate=0.1, attention_dropout_rate=0.1),
                 cnn_variant="pixels", pixel_pool=4, grid=8, dtype="float32", scan=False,
                 remat_policy="none")
  c.init = dict(hf_bert_dir="", hf_resnet_dir="")
  c.objective = dict(weighting="adaptive", weight_grad="stop", neg_prob=0.5,
                     mlm_max_predictions=0)

  # --- trainer -------------------------------------------------------------------------------
  c.mesh = common.DATA_MESH
  c.batch_size = 64
  c.total_steps = 600
  c.optimizer = common.adamw(5e-4, 0.01, warmup_steps=60, betas=(0.9, 0.999), eps=1e-6,
                             freeze=())
  c.checkpoint = common.checkpoint(200, keep=2)
  c.log_every_steps = 25
  c.evals = dict(xenc_test=_evals("test", every=0, num_queries=200, pair_batch=1024))

  if arg in ("base", "pod"):
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 256
    c.data.max_len = 64
    c.model = dict(bert_variant="base", bert=dict(), cnn_variant="resnet50", grid=8,
                   dtype="float32", scan=False, remat_policy="none")
    c.init = dict(hf_bert_dir="", hf_resnet_dir="")  # Set both on the command line.
    c.objective.mlm_max_predictions = 20
    c.batch_size = 256
    c.total_steps = 20000
    c.optimizer = common.adamw(1e-4, 0.01, warmup_steps=2000, betas=(0.9, 0.999), eps=1e-6,
                               freeze=FREEZE_CNN)
    c.checkpoint = common.checkpoint(1000, keep=3)
    c.log_every_steps = 50
    c.evals = dict(xenc_validation=_evals("validation", every=2000, num_queries=200,
                                          pair_batch=2048),
                   xenc_test=_evals("test", every=0, num_queries=1000, pair_batch=2048))
  if arg == "pod":
    c.model.dtype = "bfloat16"
    c.model.scan = True
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
    c.mesh = common.FSDP_MESH
    c.batch_size = 2048
    c.total_steps = 10000
    c.optimizer.schedule.warmup_steps = 1000
    c.evals.xenc_test.pair_batch = 8192
  return config_check.with_defaults(c)
