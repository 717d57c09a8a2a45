r"""E2: regional contrastive learning (selection tokens + fusion blocks) on top of CLIP.

`--config=configs/e2.py:VARIANT[,key=value...]`, then `--config.KEY=VALUE` overrides.
VARIANT: smoke | base | pod. Options after the variant:
  stage=0|1|2   0: one stage, every parameter trained (default for smoke);
                1: only the E2 additions train (CLIP frozen by regex), lr 5e-4;
                2: every parameter at lr 5e-5, from init.checkpoint (stage 1's workdir) or
                   init.hf_clip_dir.
  ablation=NAME full (default) | no_fusion (selection tokens, no fusion blocks) |
                no_regional (regional_weight 0) | clip (no selection tokens, no fusion, no
                regional loss: exactly FashionCLIP's model and loss, the fine-tuning baseline) |
                no_<entity> (that entity and its tokens removed, e.g. no_brand)
  tokens=N      selection tokens per entity (2 in the paper)
  fn=mask|negatives   in-batch false negatives of the regional loss (losses/regional.py)
  text=title|paper    the global text (data.text_fields, training and evaluation alike):
                title (default) = "title. description", the text FashionCLIP
                (configs/fashionclip.py) trains on; paper = "composition. subcategory. brand.
                season. description", the E2 reference's text (its FashionGen loader builds it
                from the tags and the description). A deliberate choice: on the synthetic
                catalog, at equal steps and seed (python -m experiments.e2_compare, smoke), the
                paper text gave test full SumR 2.852 vs 3.212 and holdout_brand 3.484 vs 4.040
                (docs/results/e2.md); with `paper` the tags are also spelled out in the global
                text and the queries, so the two arms' retrieval numbers are not comparable.

smoke: the FashionCLIP smoke architecture (4-layer 128-wide towers, 64 px, patch 8, so the tower
  has 64 patches and fusion after blocks 2 and 3), on the synthetic catalog's tags.
  The README comparison (CLIP-FT vs E2 and every ablation from ONE FashionCLIP smoke checkpoint
  of 400 steps; stage 1 150 + stage 2 150 steps, CLIP-FT 300 steps; batch 64, seed 0) and its
  tables come from one command, which documents each stage's exact flags:
  python -m launch.build_data --dataset=synthetic_catalog/smoke --data_dir=/tmp/e2_tfds
  python -m experiments.e2_compare --root=/tmp/e2_runs --data_dir=/tmp/e2_tfds
  By hand, one arm:
  python -m launch.train --config=configs/fashionclip.py:smoke --workdir=runs/fc_pre \
      --config.data.data_dir=/tmp/e2_tfds --config.total_steps=400 \
      --config.optimizer.schedule.warmup_steps=40
  python -m launch.train --config=configs/e2.py:smoke,stage=1 --workdir=runs/e2_s1 \
      --config.data.data_dir=/tmp/e2_tfds --config.data.max_len=64 \
      --config.init.checkpoint=runs/fc_pre
  python -m launch.train --config=configs/e2.py:smoke,stage=2 --workdir=runs/e2_s2 \
      --config.data.data_dir=/tmp/e2_tfds --config.data.max_len=64 \
      --config.init.checkpoint=runs/e2_s1
  Evaluations: retrieval on test / holdout_brand (full and sample100), per-entity retrieval
  (evaluate/entity_retrieval.py: tag text <-> images, entity head and global embedding) on the
  same splits, and per-entity linear probes.

base: the paper's recipe on CLIP ViT-B/32 (224 px) from a local HF CLIPModel directory, batch 64,
  Adam wd 1e-4, cosine with 100 warmup steps; stage 1 5 epochs at 5e-4 (new params only),
  stage 2 20 epochs at 5e-5 (all params).
  python -m launch.train --config=configs/e2.py:base,stage=1 --workdir=runs/e2_b1 \
      --config.init.hf_clip_dir=/path/to/clip-vit-base-patch32 \
      --config.data.tokenizer.path=/path/to/clip-vit-base-patch32
  python -m launch.train --config=configs/e2.py:base,stage=2 --workdir=runs/e2_b2 \
      --config.init.checkpoint=runs/e2_b1 \
      --config.data.tokenizer.path=/path/to/clip-vit-base-patch32

pod: B/16 at 224 px, global batch 4096, bf16 compute, fsdp over the pod, rematerialised blocks
  (the E2 vision tower is not scanned), same two stages.

Memory and speed levers (off by default in smoke and base; tests/test_levers_systems.py shows
each changes the numbers only by rounding), as --config overrides:
  --config.model.remat_policy=nothing_saveable  (or dots_saveable,
      dots_with_no_batch_dims_saveable): rematerialise every transformer block of both towers
  --config.model.dtype=bfloat16     bf16 compute, float32 params and AdamW state
  --config.mesh.fsdp=N --config.mesh.tensor=T   shard params, gradients and optimizer state
  model.scan=True is refused (fusion blocks split the vision stack; use remat_policy).
  grad_accum_steps=A runs, but InfoNCE then sees B/A - 1 negatives: not the same objective.
"""

import ml_collections

from configs import common
from fashion_jax.train import config_check

ENTITIES = ("brand", "season", "subcategory", "composition")
# data.text_fields per `text=` option (joined with '. ', empty fields skipped).
GLOBAL_TEXTS = {
    "paper": ("composition", "subcategory", "brand", "season", "description"),
    "title": ("title", "description"),
}
# Everything of CLIP: frozen in stage 1 (regexes over '/'-joined param paths, re.fullmatch).
CLIP_PARAM_REGEXES = (
    r"text/.*", r"logit_scale",
    r"vision/(patch_embed|pre_norm|encoder|post_norm|projection)/.*",
    r"vision/(class_embedding|pos_embedding)",
)


def _parse(arg: str) -> tuple[str, dict[str, str]]:
  parts = [p for p in arg.split(",") if p]
  if not parts or parts[0] not in ("smoke", "base", "pod"):
    raise ValueError(f"configs/e2.py: the argument must start with smoke, base or pod; got "
                     f"{arg!r}.")
  opts = {}
  for p in parts[1:]:
    if "=" not in p:
      raise ValueError(f"configs/e2.py: option {p!r} is not key=value.")
    k, v = p.split("=", 1)
    if k not in ("stage", "ablation", "tokens", "fn", "text"):
      raise ValueError(f"configs/e2.py: unknown option {k!r}; use stage, ablation, tokens, fn, "
                       f"text.")
    opts[k] = v
  return parts[0], opts


def _evals(splits, every, entities):
  """End-of-run evaluations; optional: one whose split, entity labels or gallery size the dataset
  lacks (e.g. the synthetic probe splits on a shop's own catalog) is skipped with a note."""
  evals = {}
  for split in splits:
    evals[f"retrieval_{split}"] = dict(type="retrieval", split=split,
                                       protocols=("full", "sample100"), every=every,
                                       optional=True)
    # Tag text <-> images per entity, with the entity heads and the global embedding (every
    # entity, also ablated ones and CLIP-FT's: the global number stays comparable).
    evals[f"entity_retrieval_{split}"] = dict(type="entity_retrieval", split=split,
                                              fields=entities, every=every, optional=True)
  for field in entities:
    evals[f"probe_{field}"] = dict(type="linear_probe", split="test", field=field, every=every,
                                   optional=True)
  return evals


def get_config(arg: str = "smoke"):
  variant, opts = _parse(arg)
  stage = int(opts.get("stage", 0 if variant == "smoke" else 1))
  if stage not in (0, 1, 2):
    raise ValueError(f"configs/e2.py: stage={stage} must be 0, 1 or 2.")
  ablation = opts.get("ablation", "full")
  text = opts.get("text", "title")
  if text not in GLOBAL_TEXTS:
    raise ValueError(f"configs/e2.py: text={text!r}; use one of {sorted(GLOBAL_TEXTS)} (paper: "
                     f"{'. '.join(GLOBAL_TEXTS['paper'])}; title: title. description).")
  entities = ENTITIES
  fusion_after, regional_weight = None, 0.5
  if ablation == "no_fusion":
    fusion_after = ()
  elif ablation == "no_regional":
    regional_weight = 0.0
  elif ablation == "clip":
    entities, fusion_after, regional_weight = (), (), 0.0
  elif ablation.startswith("no_") and ablation[3:] in ENTITIES:
    entities = tuple(e for e in ENTITIES if e != ablation[3:])
  elif ablation != "full":
    raise ValueError(f"configs/e2.py: unknown ablation {ablation!r}; use full, no_fusion, "
                     f"no_regional, clip or no_<entity> with entity in {ENTITIES}.")
  if stage == 1 and not entities:
    raise ValueError("configs/e2.py: stage=1 trains only the E2 additions, which "
                     f"ablation={ablation!r} removes.")

  c = ml_collections.ConfigDict()
  c.system = "e2"
  c.seed = 0

  # --- data: the pipeline (fashion_jax/data/pipeline.py); tag_fields -> batch['tags'] ----------
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=GLOBAL_TEXTS[text], tokenizer=dict(kind="clip", path=""), max_len=77,
      views=1, augment=dict(crop_scale=(0.7, 1.0), flip=False), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=4096, prefetch=2,
      resize_on="host", crop_pad=0,
      tag_fields=entities if regional_weight > 0 else ())

  # --- model: fashion_jax/systems/e2.py ------------------------------------------------------
  c.model = dict(variant="tiny", projection_dim=128,
                 vision=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512, patch_size=8),
                 text=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512),
                 dtype="float32", scan=False, remat_policy="none",
                 entities=entities, tokens_per_entity=int(opts.get("tokens", 2)),
                 fusion_after=fusion_after, gumbel_tau=1.0)
  c.objective = dict(regional_weight=regional_weight,
                     false_negatives=opts.get("fn", "mask"), tag_max_len=16)
  c.init = dict(hf_clip_dir="", checkpoint="")

  # --- trainer -------------------------------------------------------------------------------
  c.mesh = common.DATA_MESH
  c.batch_size = 64
  c.total_steps = 300
  c.optimizer = common.adamw(5e-4, 1e-4, warmup_steps=30, betas=(0.9, 0.98), eps=1e-6)
  c.checkpoint = common.checkpoint(100, keep=1)
  c.log_every_steps = 25
  c.evals = _evals(("test", "holdout_brand"), 0, ENTITIES)

  if variant in ("base", "pod"):
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 224
    c.data.augment = dict(crop_scale=(0.8, 1.0), flip=False)
    c.model = dict(c.model.to_dict(), variant="B/32", projection_dim=None, vision=None,
                   text=None)
    c.batch_size = 64
    c.total_steps = None
    c.num_epochs = 5.0  # Stage 1; stage 2 below.
    c.optimizer = common.adamw(5e-4, 1e-4, warmup_steps=100, clip_norm=None,
                               betas=(0.9, 0.999), eps=1e-8)
    c.checkpoint = common.checkpoint(1000, keep=2)
    c.log_every_steps = 50
    c.evals = _evals(("test", "holdout_brand", "holdout_category"), 0, ENTITIES)
    c.evals.retrieval_validation = common.retrieval("validation", every=1000)
  if variant == "pod":
    c.model = dict(c.model.to_dict(), variant="B/16", dtype="bfloat16",
                   remat_policy="dots_with_no_batch_dims_saveable")
    c.mesh = common.FSDP_MESH
    c.batch_size = 4096

  if stage == 1:
    c.optimizer.freeze = CLIP_PARAM_REGEXES
    c.optimizer.lr = 5e-4
  elif stage == 2:
    c.optimizer.lr = 5e-5
    if variant != "smoke":
      c.num_epochs = 20.0
  if stage and variant == "smoke":
    c.total_steps = 150
    c.optimizer.schedule.warmup_steps = 15
  return config_check.with_defaults(c)
