"""FashionViL pretraining: one shared BERT, six pretext tasks, one task sampled per step.

Config keys this system reads (besides the trainer's and the pipeline's `data`):
  model.image_encoder    'resnet' (grid features, the reference) | 'vit'
  model.resnet_variant   'resnet50' (reference) | 'tiny' (CPU smoke) | any resnet.VARIANTS key
  model.resnet           overrides of that variant (None = none), e.g. a 3-stage smoke trunk
  model.vit              dict for the 'vit' option: {variant, <ViTConfig overrides>}
  model.bert             {variant: 'base' | 'tiny' | ..., <Bert attribute overrides>}
  model.share            True = one BERT for text and fusion (FashionViL); False = ablation
  model.num_codes        VQ codebook size (MPFC classes), 1024; must equal the tokenizer's
  model.dtype            compute dtype ('float32' | 'bfloat16'); parameters, gradients and the
                         optimizer state stay float32 (master weights) either way
  model.scan             True = nn.scan over the layers of each BERT (and of a ViT image
                         encoder): one compiled block, params under encoder/layers with a
                         leading [num_layers] axis (layers.stack_layers converts). Works with
                         init.hf_bert_dir (the import stacks the layers) and with `export` (which
                         unstacks them)
  model.remat_policy     'none' | a jax.checkpoint_policies name (layers.REMAT_POLICIES):
                         rematerialise every BERT block and every image-encoder block (ResNet
                         residual block or ViT block); same parameter tree
  model.encode_chunks    1 | K: every task runs its encoders (ResNet / ViT, BERT, fusion) on K
                         row-chunks of the batch at a time, rematerialised (losses/contrastive.py
                         `map_in_chunks`), so one chunk's activations are live at once; the
                         losses still see the whole batch (ITC / MVC / ITM negatives). Exact
                         (rounding) without dropout; with dropout each chunk draws its own
                         masks (key folded with the chunk's first row), so the numbers differ
                         from K=1 while the distribution does not. K must divide the per-step
                         batch (per micro-batch with grad_accum_steps)
  objective.mode         'sample': one task per step, drawn with probabilities proportional to
                         objective.tasks (the reference); 'sum': loss = sum_t tasks[t] * L_t
                         (every task every step)
  objective.tasks        {itc, mlm, mpfc, itm, mvc, pac: weight >= 0}; 0 = task off
  objective.itm_neg_prob probability of swapping in the hardest negative text (0.5)
  objective.mvc_drop     fraction of text tokens and of patches dropped from attention (0.25)
  init.hf_bert_dir       '' or a local HF BERT directory (BertModel, BertForMaskedLM, ...): the
                         BERT's architecture and weights (both BERTs without sharing); the
                         tokenizer (data.tokenizer.path) must have its vocabulary. Of model.bert
                         only the dropout rates apply then (variant and sizes are the
                         checkpoint's); model.dtype, scan and remat_policy apply as without
                         it. Visual position / type embeddings start from BERT's
                         position rows 0..N-1 and type row 1, as the reference.
  init.hf_resnet_dir     '' or a local HF ResNetModel / ResNetForImageClassification directory:
                         the image encoder's architecture, weights and BN statistics
                         (model.resnet_variant / model.resnet are then ignored).

Data this system needs, by task (the pipeline provides them, see data/pipeline.py):
  all: image uint8 [B, S, S, 3], text int32 [B, L], text_mask bool [B, L]
  mlm: mlm_ids, mlm_labels [B, L] (data.mlm_prob > 0, tokenizer kind 'bert')
  mpfc: patch_mask bool [B, N] (data.patch_mask.grid**2 == N) and vq_codes int32 [B, N]
        (cached codes of the frozen VQ tokenizer, data.vq_codes; see prepare/vq_codes.py)
  mvc: image2 (data.views = 2)
  pac: attributes bool [B, A] (data.attributes: the mined vocabulary, data/attributes.py;
       launch.prepare makes both files, fashion_jax/prepare/)

Task sampling. The trainer's per-step key is fold_in(key(seed), step), the same on every host,
so `sample_task` draws the same task everywhere; `lax.switch` on the drawn index runs only that
task's branch inside the one jitted step (all six are compiled once). Metrics have one
structure for all branches: `<task>/loss` and the task's own metrics hold the value when the
task ran and 0 otherwise, and `task/<task>` is 1 when it ran; the trainer averages metrics over
its log window, so the mean loss of a task over a window is `<task>/loss / task/<task>`.
`loss` (the trainer's) is the loss of the task that ran.

Parameters: the model's variables dict, {'params': ..., 'batch_stats': ...} with a ResNet
(its BatchNorm statistics are used frozen: the config must freeze 'batch_stats/.*', checked
here), {'params': ...} with a ViT. Frozen inference-mode BN (not `mutable_collections`) is
deliberate: the reference fine-tunes an ImageNet ResNet-50 with small per-device batches, where
batch statistics would be noisy; there is no BN state to update.

Memory and speed levers (tests/test_levers_systems.py): model.scan, model.remat_policy,
model.dtype='bfloat16' (float32 master weights) and mesh.fsdp / mesh.tensor (params and
optimizer state sharded by their logical axes) change the loss and gradients only by rounding.
grad_accum_steps does so only for per-example losses: in
objective.mode='sum' with tasks whose loss is a mean over a fixed number of terms per example
(MPFC: a fixed count of masked patches per image; PAC: every row with attributes). ITC, MVC and
ITM see only the micro-batch's negatives, MLM averages over the micro-batch's masked tokens, and
in mode='sample' every micro-batch draws its own task (the step gives micro-batch i the key
fold_in(key, i)), so one step mixes up to A tasks: the same expected objective, other numbers.

Export (`export`, launch/export.py): interop/fashionvil_torch.py writes the BERT as a
transformers BertModel, the ResNet as a ResNetModel, the rest as safetensors, and its torch
module reproduces the forward.
"""

import logging
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.data import attributes as attributes_lib
from fashion_jax.data import tokenizers
from fashion_jax.interop import fashionvil_torch
from fashion_jax.interop import hf_bert
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_resnet
from fashion_jax.losses import contrastive
from fashion_jax.losses import fashionvil as losses
from fashion_jax.models import bert as bert_lib
from fashion_jax.models import fashionvil as fvil
from fashion_jax.models import layers

CONFIG_KEYS = ("model", "data", "init", "objective")
# model.bert keys that still apply when the architecture comes from init.hf_bert_dir.
_BERT_RUNTIME_KEYS = ("dropout_rate", "attention_dropout_rate")
# Levers set once for the whole model (model.<key>), never per BERT (model.bert.<key>).
_MODEL_LEVERS = ("dtype", "scan", "remat_policy")
_RESNET_FIELDS = ("depths", "widths", "stem_width", "block", "downsample_in_first_stage",
                  "downsample_in_bottleneck")

# Metrics each task reports (besides '<task>/loss').
TASK_METRICS = {
    "itc": ("i2t_acc", "t2i_acc", "scale"),
    "mlm": ("acc", "num_targets"),
    "mpfc": ("acc", "num_targets"),
    "itm": ("acc", "pos_frac"),
    "mvc": ("i2t_acc", "t2i_acc", "scale"),
    "pac": ("image_loss", "text_loss", "rows_with_attributes"),
}


class System:
  """FashionViL as a fashion_jax system (see systems/base.py)."""

  TASK_FEATURES = {"itc": (), "itm": (), "mlm": ("mlm_ids", "mlm_labels"),
                   "mpfc": ("patch_mask", "vq_codes"), "mvc": ("image2",), "pac": ("attributes",)}

  @classmethod
  def required_features(cls, config):
    """The batch keys `loss` reads for the tasks with a weight > 0 (systems/base.py)."""
    need = dict.fromkeys(("image", "text", "text_mask"), "")
    for task, weight in config.objective.tasks.items():
      if float(weight) > 0:
        need.update(dict.fromkeys(cls.TASK_FEATURES.get(task, ()),
                                  f"the {task.upper()} task (objective.tasks.{task} > 0)"))
    return need

  def __init__(self, config):
    self.config = config
    m, data, obj = config.model, config.data, config.objective
    if obj.mode not in ("sample", "sum"):
      raise ValueError(f"objective.mode={obj.mode!r}: use 'sample' or 'sum'.")
    self.tasks, self.probs = losses.task_probabilities(dict(obj.tasks))
    self.weights = {t: float(obj.tasks[t]) for t in self.tasks}
    if data.tokenizer.kind != "bert":
      raise ValueError(f"FashionViL needs data.tokenizer.kind='bert', got "
                       f"{data.tokenizer.kind!r}.")
    self.tokenizer = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path,
                                              data.max_len)
    dtype = layers.compute_dtype(m.dtype)
    scan, remat_policy = bool(m.get("scan", False)), str(m.get("remat_policy", "none"))
    init = config.get("init", {})
    resnet_overrides = m.get("resnet")
    if init.get("hf_resnet_dir"):
      if m.image_encoder != "resnet":
        raise ValueError(f"init.hf_resnet_dir needs model.image_encoder='resnet', got "
                         f"{m.image_encoder!r}.")
      hf_config, _ = hf_io.load_hf_config(init.hf_resnet_dir)
      cnn = hf_resnet.resnet_from_hf_config(hf_config)
      resnet_overrides = {f: getattr(cnn, f) for f in _RESNET_FIELDS}
    image_encoder, n = fvil.make_image_encoder(
        m.image_encoder, resnet_variant=m.get("resnet_variant", "resnet50"),
        resnet=resnet_overrides, vit=m.get("vit"), image_size=data.image_size, dtype=dtype,
        scan=scan, remat_policy=remat_policy)
    self.num_patches = n
    bert_kw = dict(m.bert)
    variant = bert_kw.pop("variant", "base")
    misplaced = sorted(k for k in bert_kw if k in _MODEL_LEVERS)
    if misplaced:
      raise ValueError(f"model.bert.{misplaced[0]} is set: {', '.join(_MODEL_LEVERS)} are "
                       f"model-wide levers, set model.{misplaced[0]} instead.")
    levers = dict(dtype=dtype, scan=scan, remat_policy=remat_policy)
    if init.get("hf_bert_dir"):
      hf_config, _ = hf_io.load_hf_config(init.hf_bert_dir)
      ignored = sorted(k for k in bert_kw if k not in _BERT_RUNTIME_KEYS)
      if ignored:
        logging.info("init.hf_bert_dir: model.bert keys %s are taken from the checkpoint.",
                     ignored)
      make_bert = lambda: hf_bert.bert_from_hf_config(
          hf_config, **levers, **{k: bert_kw[k] for k in _BERT_RUNTIME_KEYS if k in bert_kw})
    else:
      bert_kw.update(vocab_size=self.tokenizer.vocab_size,
                     pad_token_id=self.tokenizer.pad_token_id, **levers)
      make_bert = lambda: bert_lib.bert(variant, **bert_kw)
    text_bert = make_bert()
    fusion_bert = None if m.share else make_bert()
    if text_bert.vocab_size != self.tokenizer.vocab_size:
      raise ValueError(f"init.hf_bert_dir={init.hf_bert_dir!r} has {text_bert.vocab_size} word "
                       f"embeddings but data.tokenizer (path={data.tokenizer.path!r}) has "
                       f"{self.tokenizer.vocab_size} tokens: point data.tokenizer.path at the "
                       "checkpoint.")
    if data.max_len > text_bert.max_position:
      raise ValueError(f"data.max_len={data.max_len} exceeds BERT's max_position "
                       f"{text_bert.max_position}.")
    self.num_attributes = 0
    if "pac" in self.tasks:
      if not data.get("attributes"):
        raise ValueError("The PAC task needs data.attributes (a pseudo-attribute vocabulary): "
                         "`python -m launch.prepare` with the run's --config and --workdir mines "
                         "it, and launch.train with the same flags fills the key; or set "
                         "data.attributes=PATH, or objective.tasks.pac=0.")
      self.num_attributes = len(attributes_lib.load_vocabulary(data.attributes))
    if "mpfc" in self.tasks:
      grid = int(data.patch_mask.grid)
      if grid * grid != n:
        raise ValueError(f"MPFC: data.patch_mask.grid={grid} gives {grid * grid} patches but "
                         f"the image encoder has N={n} tokens at image_size={data.image_size}.")
      if not data.get("vq_codes"):
        raise ValueError("The MPFC task needs cached VQ codes (data.vq_codes): `python -m "
                         "launch.prepare` with the run's --config and --workdir trains the VQ "
                         "tokenizer and caches them, and launch.train with the same flags fills "
                         "the key; or set data.vq_codes=PATH (fashion_jax/prepare/vq_codes.py), "
                         "or objective.tasks.mpfc=0.")
    if "mlm" in self.tasks and not data.mlm_prob > 0:
      raise ValueError(f"The MLM task needs data.mlm_prob > 0, got {data.mlm_prob}.")
    if "mvc" in self.tasks and data.views != 2:
      raise ValueError(f"The MVC task needs data.views=2, got {data.views}.")
    self.encode_chunks = int(m.get("encode_chunks", 1))
    if self.encode_chunks < 1:
      raise ValueError(f"model.encode_chunks={m.get('encode_chunks')!r} must be >= 1.")
    self.uses_batch_stats = m.image_encoder == "resnet"
    if self.uses_batch_stats:
      freeze = tuple(config.get("optimizer", {}).get("freeze", ()) or ())
      probe = "batch_stats/image_encoder/stem_bn/mean"
      if not any(re.fullmatch(f, probe) for f in freeze):
        raise ValueError(
            "model.image_encoder='resnet' uses frozen BatchNorm statistics: add 'batch_stats/.*'"
            f" to optimizer.freeze (now {list(freeze)}), or AdamW would train them.")
    self.model = fvil.FashionViL(
        image_encoder=image_encoder, text_bert=text_bert, fusion_bert=fusion_bert,
        num_patches=n, num_codes=int(m.num_codes), num_attributes=self.num_attributes,
        dtype=dtype)

  # --- trainer interface ----------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l, n = self.config.data.image_size, self.config.data.max_len, self.num_patches
    b = {"image": np.zeros((batch_size, s, s, 3), np.uint8),
         "text": np.zeros((batch_size, l), np.int32),
         "text_mask": np.ones((batch_size, l), bool)}
    if "mlm" in self.tasks:
      b["mlm_ids"] = np.zeros((batch_size, l), np.int32)
      b["mlm_labels"] = np.full((batch_size, l), -1, np.int32)
    if "mpfc" in self.tasks:
      b["patch_mask"] = np.zeros((batch_size, n), bool)
      b["vq_codes"] = np.zeros((batch_size, n), np.int32)
    if "mvc" in self.tasks:
      b["image2"] = np.zeros((batch_size, s, s, 3), np.uint8)
    if "pac" in self.tasks:
      b["attributes"] = np.zeros((batch_size, self.num_attributes), bool)
    return b

  def init(self, rng: jax.Array, batch) -> Any:
    variables = self.model.init(rng, batch["image"], batch["text"], batch["text_mask"])
    return {k: variables[k] for k in ("params", "batch_stats") if k in variables}

  def pretrained_params(self, rng: jax.Array | None = None):
    """Variables with the BERT(s) from init.hf_bert_dir and the ResNet from init.hf_resnet_dir,
    the rest freshly initialised from `rng` (default key(config.seed)); None when neither is set.

    A BERT checkpoint without an MLM head or pooler gets fresh ones (hf_bert logs it); the
    visual position / type embeddings are copied from the imported BERT's.
    """
    init = self.config.get("init", {})
    if not (init.get("hf_bert_dir") or init.get("hf_resnet_dir")):
      return None
    rng = jax.random.key(self.config.seed) if rng is None else rng
    variables = jax.device_get(nn.unbox(jax.jit(self.init)(rng, self.dummy_batch(1))))
    variables = {k: dict(v) for k, v in variables.items()}
    params = variables["params"]
    if init.get("hf_bert_dir"):
      _, state = hf_io.load_hf_checkpoint(init.hf_bert_dir)
      params["text_bert"] = hf_bert.convert_hf_bert_state(state, self.model.text_bert,
                                                          jax.random.fold_in(rng, 1))
      if self.model.fusion_bert is not None:
        params["fusion_bert"] = hf_bert.convert_hf_bert_state(state, self.model.fusion_bert,
                                                              jax.random.fold_in(rng, 2))
      variables["params"] = jax.device_get(
          fvil.init_visual_embeddings_from_bert(params, params["text_bert"]))
    if init.get("hf_resnet_dir"):
      _, cnn_vars = hf_resnet.load_hf_resnet(init.hf_resnet_dir)
      variables["params"]["image_encoder"] = cnn_vars["params"]
      variables["batch_stats"]["image_encoder"] = cnn_vars["batch_stats"]
    return variables

  def _apply(self, params, *args, method, rng=None):
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply(params, *args, method=method, rngs=rngs)

  def _chunked(self, params, method, *xs, rng=None):
    """`self._apply(params, *xs, method=method, rng=rng)` over model.encode_chunks row-chunks.

    Every x has the batch as its leading axis and `method` must treat rows independently
    (frozen BatchNorm, attention within an example): its outputs are then the unchunked ones.
    K=1 is the plain call. With K > 1 chunk c's dropout key is fold_in(rng, its first row).
    """
    k = self.encode_chunks
    if k == 1:
      return self._apply(params, *xs, method=method, rng=rng)
    rows = jnp.arange(xs[0].shape[0], dtype=jnp.int32)

    def fn(row_ids, *chunk):
      r = None if rng is None else jax.random.fold_in(rng, row_ids[0])
      return self._apply(params, *chunk, method=method, rng=r)
    return contrastive.map_in_chunks(fn, rows, *xs, num_chunks=k)

  # --- the six tasks: each (params, batch, rng, deterministic) -> (loss, metrics) ---------------
  def _itc(self, params, batch, rng, det):
    def fwd(mod, images, ids, mask):
      u = mod.unimodal(images, ids, mask, det)
      return u["image"], u["text"]
    zi, zt = self._chunked(params, fwd, batch["image"], batch["text"], batch["text_mask"],
                           rng=rng)
    scale = self._apply(params, method=lambda mod: mod.itc_scale)
    loss, m = losses.itc_loss(zi, zt, scale)
    return loss, {**m, "scale": scale}

  def _pac(self, params, batch, rng, det):
    def fwd(mod, images, ids, mask):
      u = mod.unimodal(images, ids, mask, det)
      return mod.pac_logits(u["image"]), mod.pac_logits(u["text"])
    zi, zt = self._chunked(params, fwd, batch["image"], batch["text"], batch["text_mask"],
                           rng=rng)
    return losses.pac_loss(zi, zt, batch["attributes"])

  def _mlm(self, params, batch, rng, det):
    length = batch["text"].shape[1]

    def fwd(mod, images, ids, mask):
      hidden = mod.fuse(ids, mask, mod.image_tokens(images, None, det), None, det)
      return mod.mlm_logits(hidden[:, :length])
    logits = self._chunked(params, fwd, batch["image"], batch["mlm_ids"], batch["text_mask"],
                           rng=rng)
    return losses.mlm_loss(logits, batch["mlm_labels"])

  def _mpfc(self, params, batch, rng, det):
    length = batch["text"].shape[1]
    patch_mask = batch["patch_mask"].astype(bool)

    def fwd(mod, images, ids, mask, pm):
      hidden = mod.fuse(ids, mask, mod.image_tokens(images, pm, det), None, det)
      return mod.mpfc_logits(hidden[:, length:])
    logits = self._chunked(params, fwd, batch["image"], batch["text"], batch["text_mask"],
                           patch_mask, rng=rng)
    return losses.mpfc_loss(logits, batch["vq_codes"], patch_mask)

  def _itm(self, params, batch, rng, det):
    mine_rng, swap_rng, drop_rng = jax.random.split(rng, 3)
    text, mask = jnp.asarray(batch["text"]), jnp.asarray(batch["text_mask"])
    def embed(mod, images, ids, m):
      u = mod.unimodal(images, ids, m, det)
      return u["image"], u["text"]
    zi, zt = self._chunked(params, embed, batch["image"], text, mask, rng=mine_rng)
    sim = losses.scaled_cosine_logits(zi, zt, 1.0)
    idx, labels = losses.itm_pairs(sim, jax.random.uniform(swap_rng, (text.shape[0],)), text,
                                   float(self.config.objective.itm_neg_prob))

    def fwd(mod, images, ids, m):
      return mod.itm_logits(mod.fuse(ids, m, mod.image_tokens(images, None, det), None, det))
    logits = self._chunked(params, fwd, batch["image"], text[idx], mask[idx], rng=drop_rng)
    return losses.itm_loss(logits, labels)

  def _mvc(self, params, batch, rng, det):
    text_rng, patch_rng, drop_rng = jax.random.split(rng, 3)
    frac = float(self.config.objective.mvc_drop)
    text, mask = batch["text"], batch["text_mask"].astype(bool)
    b, length = text.shape
    droppable = mask & (jnp.arange(length) > 0)[None]  # [CLS] always stays.
    text_keep = mask & losses.drop_tokens(text_rng, droppable, frac)
    image_keep = losses.drop_tokens(patch_rng, jnp.ones((b, self.num_patches), bool), frac)

    def fwd(mod, image_a, image_b, ids, tmask, ikeep):
      v_a = jnp.mean(mod.image_tokens(image_a, None, det).astype(jnp.float32), axis=1)
      hidden = mod.fuse(ids, tmask, mod.image_tokens(image_b, None, det), ikeep, det)
      f_b = fvil.masked_mean(hidden[:, length:], ikeep)
      return v_a, f_b
    v_a, f_b = self._chunked(params, fwd, batch["image"], batch["image2"], text, text_keep,
                             image_keep, rng=drop_rng)
    s = self._apply(params, method=lambda mod: mod.mvc_scale)
    loss, m = losses.itc_loss(v_a, f_b, s)
    return loss, {**m, "scale": s}

  def task_loss(self, task: str, params, batch, rng, train: bool = True):
    """(loss, metrics) of one task, metrics as in TASK_METRICS."""
    fn = {"itc": self._itc, "mlm": self._mlm, "mpfc": self._mpfc, "itm": self._itm,
          "mvc": self._mvc, "pac": self._pac}[task]
    return fn(params, batch, rng, not train)

  def loss(self, params, batch, rng, train: bool = True):
    task_rng, rng = jax.random.split(rng)

    def full_metrics(task, loss, m):
      out = {f"{t}/{k}": jnp.zeros((), jnp.float32) for t in self.tasks
             for k in ("loss",) + TASK_METRICS[t]}
      out.update({f"task/{t}": jnp.zeros((), jnp.float32) for t in self.tasks})
      out.update({f"{task}/{k}": jnp.asarray(v, jnp.float32) for k, v in m.items()})
      out[f"{task}/loss"] = jnp.asarray(loss, jnp.float32)
      out[f"task/{task}"] = jnp.ones((), jnp.float32)
      return out

    if self.config.objective.mode == "sample":
      def branch(task):
        def run():
          loss, m = self.task_loss(task, params, batch, jax.random.fold_in(rng, 0), train)
          return jnp.asarray(loss, jnp.float32), full_metrics(task, loss, m)
        return run
      index = losses.sample_task(task_rng, self.probs)
      loss, metrics = losses.sampled_task_loss(index, [branch(t) for t in self.tasks])
    else:
      total, metrics = jnp.zeros((), jnp.float32), {}
      for i, task in enumerate(self.tasks):
        l, m = self.task_loss(task, params, batch, jax.random.fold_in(rng, i), train)
        total = total + self.weights[task] * l
        metrics.update({f"{task}/{k}": jnp.asarray(v, jnp.float32) for k, v in m.items()})
        metrics[f"{task}/loss"] = jnp.asarray(l, jnp.float32)
      loss = total
    return loss, metrics

  # --- two-tower interface (retrieval) ------------------------------------------------------------
  def embed_images(self, params, images: jax.Array) -> jax.Array:
    return self.model.apply(params, images, method=fvil.FashionViL.encode_images)

  def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
    mask = tokens != self.tokenizer.pad_token_id
    return self.model.apply(params, tokens, mask, method=fvil.FashionViL.encode_texts)

  def logit_scale(self, params) -> jax.Array:
    return jnp.square(params["params"]["itc_scale"])

  # --- export ---------------------------------------------------------------------------------
  def export(self, params, out_dir: str, overwrite: bool = False):
    """BertModel + ResNetModel directories, safetensors and metadata for FashionViLTorch
    (interop/fashionvil_torch.py)."""
    model = self.model
    if model.text_bert.scan:  # The export maps per-layer params: unstack a scanned model.
      params = layers.unstack_layers(jax.device_get(nn.unbox(params)))
      model = model.clone(text_bert=model.text_bert.clone(scan=False),
                          fusion_bert=None if model.fusion_bert is None
                          else model.fusion_bert.clone(scan=False))
    return fashionvil_torch.export_fashionvil(params, model, out_dir,
                                              image_size=int(self.config.data.image_size),
                                              tokenizer=self.tokenizer.hf, overwrite=overwrite)
