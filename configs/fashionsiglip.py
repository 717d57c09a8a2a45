r"""FashionSigLIP: a SigLIP dual encoder trained with the sigmoid loss on several product fields,
with Matryoshka embeddings (the Marqo-FashionSigLIP recipe: GCL-style multi-field contrastive
fine-tuning of a SigLIP B/16; their weights and loss weights are unpublished, ours are set here).

System: fashion_jax/systems/fashionclip.py with model.family='siglip', loss.kind='sigmoid',
data.fields and model.matryoshka_dims (its docstring has the formula).

Variants (`--config=configs/fashionsiglip.py:VARIANT`, then `--config.KEY=VALUE` overrides):

smoke: a small SigLIP trained from scratch on the built-in synthetic catalog, on a CPU: the
  image paired with title+description and with five attribute fields (a product without a field
  is left out of that field's term), sigmoid loss, Matryoshka prefixes 32 / 64 / 128. Each
  distinct field text of a batch is encoded once (model.field_dedup=128: a batch's 320 field
  texts hold 86-103 distinct ones), 1.65x faster a step than encoding all 320, same loss.
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m launch.train --config=configs/fashionsiglip.py:smoke --workdir=runs/fsiglip_smoke
  python -m launch.evaluate --config=configs/fashionsiglip.py:smoke --workdir=runs/fsiglip_smoke
  Reported: test full-candidate t2i/i2t R@K at each Matryoshka width (`.../t2i_R@10@d32`, the
  full width unsuffixed) and colour / brand / category / sub-category query retrieval
  (`test/field_primary_color/HITS@10`, `P@10`, `MRR`).

base: fine-tune a pretrained SigLIP B/16 at 224 px (a local transformers SiglipModel directory,
  e.g. google/siglip-base-patch16-224 saved with save_pretrained), every layer, small lr; its own
  SentencePiece tokenizer, 64-token context.
  python -m launch.build_data --dataset=synthetic_catalog/base   (or fashiongen, image_text_folder)
  python -m launch.train --config=configs/fashionsiglip.py:base --workdir=runs/fsiglip_base \
      --config.init.hf_siglip_dir=/path/to/siglip-base-patch16-224 \
      --config.data.tokenizer.path=/path/to/siglip-base-patch16-224
  An open_clip / Marqo directory instead (e.g. Marqo/marqo-fashionSigLIP saved locally):
      --config.init.hf_siglip_dir= --config.init.open_clip_dir=/path/to/marqo-fashionSigLIP

pod: SigLIP B/16 at 224 px, global batch 32k, bf16, fsdp over the whole pod, scanned and
  rematerialised layers, chunked encoding, the ring sigmoid loss (texts passed around the batch
  shards: no [B, B] buffer, losses/sigmoid.py). On a catalog whose category, sub-category and
  brand repeat, --config.model.field_dedup=U encodes each distinct field text of the batch once
  in U rows (U above the distinct count the run's train/field_texts_distinct metric logs; a
  batch with more falls back to encoding all, same loss). Memory per chip before launching:
  python -m launch.plan --config=configs/fashionsiglip.py:pod --devices=64 --hbm_gib=16 \
      --set data.tokenizer.path='"/path/to/siglip-base-patch16-224"' --strategies=fsdp
  (without a SigLIP directory, --set data.tokenizer.kind='"clip"' plans with the shipped CLIP
  vocabulary: 3.5k instead of 32k tokens, about 5 MiB per chip less over 64 chips.)

Comparisons at equal steps and seed (the same smoke schedule; each one key away):
  InfoNCE instead of sigmoid:   --config.loss.kind=infonce --config.model.loss_blocks=1
  single field (text only):     --config.data.fields=() --config.loss.field_weights=()
  no Matryoshka:                --config.model.matryoshka_dims=() \
                                --config.loss.matryoshka_weights=()
  width m alone (m = 32, 64):   --config.model.matryoshka_dims='(m,)' \
                                --config.loss.matryoshka_weights='(1.0,)'
  SigLIP's bias init:           --config.loss.bias_init=-10.0   (the recipe: log(1/batch))
  equal field values positive:  --config.loss.field_positives=value   (the recipe: row)
  All rows, several seeds, one table (docs/results/fashionsiglip.md):
  python -m experiments.fashionsiglip_compare --root=/tmp/fsiglip_cmp --data_dir=DATA_DIR \
      --seeds=0,1 --steps=600

Graded relevance (GCL's per-pair weights, losses/pair_weights.py): a numeric column of the
catalog (e.g. an image_text_folder `score` column) weighs each product's positive terms:
  --config.data.pair_weight_field=score --config.loss.pair_weight.score_range='(0.0, 5.0)' \
      --config.loss.pair_weight.weight_range='(0.2, 1.0)'
(a score below 0 weighs 0.2, above 5 weighs 1, linear between; '' = off, the default.)
"""

import math

import ml_collections

from configs import fashionclip as fashionclip_config
from fashion_jax.train import config_check

# The attribute fields of the synthetic catalog paired with the image (besides the title +
# description text): colour, pattern and material are often left unsaid by the description.
SMOKE_FIELDS = ("primary_color", "pattern", "material", "subcategory", "brand")
# Fields of a real catalog (FashionGen / a shop's image_text_folder) that most products have.
BASE_FIELDS = ("title", "description", "category", "subcategory", "brand")


def _field_evals(splits, fields, every=0):
  """Per-field query retrieval (evaluate/retrieval.py, protocol 'field'): one query per distinct
  value of the field against every product image of the split (optional: skipped on datasets
  without the field)."""
  return {f"retrieval_{split}_{field}": dict(type="retrieval", split=split, protocols=("field",),
                                             query_field=field, every=every, optional=True)
          for split in splits for field in fields}


def get_config(arg: str = "smoke"):
  if arg not in ("smoke", "base", "pod"):
    raise ValueError(f"configs/fashionsiglip.py: unknown variant {arg!r}; use smoke, base or "
                     "pod.")
  c = ml_collections.ConfigDict()
  c.system = "fashionclip"
  c.seed = 0

  # --- data: the input pipeline (fashion_jax/data/pipeline.py) ---------------------------------
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=("title", "description"), tokenizer=dict(kind="clip", path=""), max_len=64,
      views=1, augment=dict(crop_scale=(0.7, 1.0), flip=False), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=4096, prefetch=2,
      resize_on="host", crop_pad=0, fields=SMOKE_FIELDS,
      pair_weight_field="",
      resize_mode="squash")  # SigLIP's eval resize: the whole image to the square, no crop.

  # --- model: fashion_jax/systems/fashionclip.py (family 'siglip') ----------------------------
  c.model = dict(family="siglip", variant="tiny", projection_dim=None,
                 vision=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512, patch_size=8),
                 text=dict(width=128, num_layers=4, num_heads=4, mlp_dim=512),
                 dtype="float32", scan=False, remat_policy="none", attention_impl="einsum",
                 seq_pad_multiple=0, encode_chunks=1, loss_blocks=1, matryoshka_dims=(32, 64, 0),
                 # Each distinct field text of a batch encoded once: 86-103 distinct among a
                 # batch's 320 (64 products x 5 fields), so the text tower runs 128 rows, not 320.
                 field_dedup=128)
  c.init = dict(hf_siglip_dir="", open_clip_dir="")
  c.loss = dict(kind="sigmoid", sigmoid_impl="dense", text_weight=1.0, bias_init=-10.0,
                field_positives="row",
                field_weights=(1.0,) * len(SMOKE_FIELDS), matryoshka_weights=(1.0, 1.0, 1.0),
                pair_weight=dict(score_range=(0.0, 1.0), weight_range=(0.0, 1.0)))

  # --- trainer: FashionCLIP smoke's schedule, so the two compare at equal steps ----------------
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.batch_size = 64
  c.total_steps = 600
  schedule = dict(lr=1e-3, weight_decay=0.1, warmup_steps=50, eval_every=100, log_every=25)
  probe_splits = fashionclip_config.PROBE_SPLITS
  query_fields = ("primary_color", "brand", "category", "subcategory")

  if arg in ("base", "pod"):
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 224
    c.data.max_len = 64  # SigLIP's context.
    c.data.tokenizer = dict(kind="siglip", path="")
    c.data.augment = dict(crop_scale=(0.8, 1.0), flip=False)
    c.data.fields = BASE_FIELDS
    c.loss.field_weights = (1.0,) * len(BASE_FIELDS)
    query_fields = ("category", "subcategory", "brand")
  if arg == "base":
    c.model = dict(family="siglip", variant="B/16", projection_dim=None, vision=None,
                   text=None, dtype="float32", scan=False, remat_policy="none",
                   attention_impl="einsum", seq_pad_multiple=0, encode_chunks=1, loss_blocks=1,
                   matryoshka_dims=(64, 256, 0), field_dedup=0)
    c.init.hf_siglip_dir = ""  # Required for the recipe: set it on the command line.
    c.batch_size = 256
    c.total_steps = 20000
    schedule = dict(lr=1e-5, weight_decay=0.2, warmup_steps=500, eval_every=1000, log_every=50)
  elif arg == "pod":
    c.model = dict(family="siglip", variant="B/16", projection_dim=None, vision=None,
                   text=None, dtype="bfloat16", scan=True, remat_policy="nothing_saveable",
                   attention_impl="einsum", seq_pad_multiple=0, encode_chunks=2, loss_blocks=1,
                   matryoshka_dims=(64, 256, 0), field_dedup=0)
    c.loss.sigmoid_impl = "ring"
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 32768
    c.total_steps = 10000
    schedule = dict(lr=5e-4, weight_decay=0.2, warmup_steps=1000, eval_every=1000, log_every=20)
    probe_splits = probe_splits[:2]
  # The sigmoid loss's initial bias (a random init; a pretrained model keeps its own):
  # log(1/batch), the logit at which a batch of unrelated pairs is in balance. SigLIP's -10 is
  # that value at its batch of 32k; at batch 64 it starts every pair far below it and the towers
  # collapse to one direction to close the gap (docs/results/fashionsiglip.md).
  c.loss.bias_init = -math.log(c.batch_size)
  fashionclip_config._schedule(c, **schedule)  # pylint: disable=protected-access
  c.evals.update(fashionclip_config._evals(  # pylint: disable=protected-access
      ("test",) + probe_splits, every=0))
  c.evals.update(_field_evals(("test",), query_fields))
  # Every trainer key present, so that any of them can be overridden on the command line.
  return config_check.with_defaults(c)
