r"""FashionViL pretraining: ResNet grid features + one BERT shared as text and fusion encoder.

Variants (`--config=configs/fashionvil.py:VARIANT`, then `--config.KEY=VALUE` overrides):

smoke: a 3-stage tiny ResNet (64 px -> 4 x 4 grid) + tiny BERT from scratch on the synthetic
  catalog, on a CPU. Three commands, the last two with the same flags:
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke
  python -m launch.train --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke
  launch.prepare makes what PAC and MPFC read into runs/fashionvil_smoke/prepared/: the
  pseudo-attributes mined from the train split (data.attributes) and the VQ tokenizer
  (configs/vqvae.py:smoke, same dataset, image size and grid) trained into prepared/vqvae, then
  its codes of every train view (data.vq_codes); launch.train fills both keys from
  prepared/manifest.json (fashion_jax/prepare/). Rerunning launch.prepare skips what is done.
  Ablation rows: `--config.objective.tasks.mvc=0` etc. (weights 0 switch tasks off; with
  pac=0 / mpfc=0 nothing is prepared for that task), `--config.model.share=False` (no sharing).

base: the paper's recipe: ResNet-50 at 224 px (7x7 grid, 8 of 49 patches masked), BERT-base,
  global batch 256, AdamW lr 1e-5 (x20 for the image encoder, projection and heads), wd 1e-4,
  warmup 15k, x0.1 at 45k and 90k, 120k steps, tasks itm .15 pac .15 itc .2 mvc .2 mlm .15
  mpfc .15.

Memory and speed levers (none changes the numbers beyond rounding: tests/test_levers_systems.py;
the defaults are all off). Each is a --config override:
  --config.model.remat_policy=nothing_saveable   (or dots_saveable,
      dots_with_no_batch_dims_saveable): rematerialise every BERT block and every ResNet block
  --config.model.scan=True        nn.scan over the BERT layers (one compiled block; works with
                                  init.hf_bert_dir and with export)
  --config.model.dtype=bfloat16   bf16 compute, float32 params and AdamW state (master weights)
  --config.mesh.fsdp=N --config.mesh.tensor=T   params, gradients and optimizer state sharded
                                  (fsdp: the model dimension; tensor: MLP / heads / vocabulary)
  --config.model.encode_chunks=K  every task encodes the batch K row-chunks at a time,
                                  rematerialised (the losses still see the whole batch); exact
                                  without dropout. K=2 is what brings base at 4k on 64 chips
                                  (64 per chip) to 32 rows of live activations (docs/pod.md)
  --config.grad_accum_steps=A     exact only for per-example tasks (MPFC, PAC) with
                                  objective.mode=sum; see systems/fashionvil.py
  Planned per-chip memory at global batch 4096 on 64 chips (no chips needed, a CPU compile):
  python -m launch.plan --config=configs/fashionvil.py:base --devices=64 --batch=4096 \
      --set data.attributes='"/tmp/fvil_attrs.txt"' --set model.remat_policy='"nothing_saveable"' \
      --set model.dtype='"bfloat16"' --jsonl=/tmp/plan_fashionvil.jsonl
  (data.attributes: any pseudo-attribute vocabulary file, only its length matters for a plan.)

Augmentation note: MPFC's cached codes describe the WHOLE (uncropped, unflipped) view, so every
variant here trains with crop_scale (1, 1) and no flip; the pipeline refuses cached codes with
any other augmentation.
"""

import ml_collections

from configs import common
from fashion_jax.train import config_check

TASKS = dict(itm=0.15, pac=0.15, itc=0.2, mvc=0.2, mlm=0.15, mpfc=0.15)


def get_config(arg: str = "smoke"):
  if arg not in ("smoke", "base"):
    raise ValueError(f"configs/fashionvil.py: unknown variant {arg!r}; use smoke or base.")
  c = ml_collections.ConfigDict()
  c.system = "fashionvil"
  c.seed = 0

  # --- data: fashion_jax/data/pipeline.py ----------------------------------------------------
  c.data = dict(
      name="synthetic_catalog/smoke", data_dir="", train_split="train", image_size=64,
      text_fields=("title", "description"), tokenizer=dict(kind="bert", path=""), max_len=48,
      views=2, augment=dict(crop_scale=(1.0, 1.0), flip=False), mlm_prob=0.15,
      patch_mask=dict(grid=4, count=3, min_block=2), attributes="", vq_codes="",
      shuffle_buffer=4096, prefetch=2, resize_on="host", crop_pad=0)

  # --- model and objective: fashion_jax/systems/fashionvil.py ---------------------------------
  c.model = dict(image_encoder="resnet", resnet_variant="tiny",
                 resnet=dict(depths=(1, 1, 1), widths=(16, 32, 64)), vit=None,
                 bert=dict(variant="tiny", max_position=64, dropout_rate=0.1,
                           attention_dropout_rate=0.1),
                 share=True, num_codes=1024, dtype="float32", scan=False, remat_policy="none",
                 encode_chunks=1)
  c.objective = dict(mode="sample", tasks=dict(TASKS), itm_neg_prob=0.5, mvc_drop=0.25)
  # Local HF directories to start from (systems/fashionvil.py): '' = random init.
  c.init = dict(hf_bert_dir="", hf_resnet_dir="")

  # --- trainer --------------------------------------------------------------------------------
  c.mesh = common.DATA_MESH
  c.batch_size = 64
  c.total_steps = 1500
  c.optimizer = common.adamw(5e-4, 1e-4, warmup_steps=100, freeze=("batch_stats/.*",))
  c.checkpoint = common.checkpoint(500, keep=2, best_metric="validation/full/t2i_R@10")
  c.log_every_steps = 25
  c.evals = dict(retrieval_validation=common.retrieval("validation", every=500),
                 retrieval_test=common.retrieval("test", ("full", "sample100")))

  if arg == "base":
    c.data.name = "synthetic_catalog/base"
    c.data.image_size = 224
    c.data.max_len = 75
    c.data.patch_mask = dict(grid=7, count=8, min_block=4)
    c.model.resnet_variant = "resnet50"
    c.model.resnet = None
    c.model.bert = dict(variant="base")
    c.batch_size = 256
    c.total_steps = 120000
    c.optimizer = common.adamw(
        1e-5, 1e-4, warmup_steps=15000, clip_norm=None,
        schedule=dict(kind="step", boundaries=(45000, 90000), factor=0.1),
        lr_mults=((r"params/(image_encoder|image_proj|itm_head|mpfc_\w+|pac_weight|"
                   r"visual_\w+|itc_scale|mvc_scale)(/.*)?", 20.0),),
        freeze=("batch_stats/.*",))
    c.checkpoint = common.checkpoint(5000, keep=3, best_metric="validation/full/t2i_R@10")
    c.log_every_steps = 100
    c.evals = dict(retrieval_validation=common.retrieval("validation", every=5000),
                   retrieval_test=common.retrieval("test", ("full", "sample100")))
  return config_check.with_defaults(c)
