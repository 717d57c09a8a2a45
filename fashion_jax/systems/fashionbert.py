"""FashionBERT as a system: MLM + masked patch modelling + text-image alignment, weighted.

Config keys this system reads (besides the trainer's and the pipeline's `data`):
  model.bert_variant    'tiny' | 'mini' | 'base' | 'large' (models/bert.py), unless init.hf_bert_dir
  model.bert            Bert field overrides (e.g. dropout_rate, num_layers)
  model.cnn_variant     'tiny' | 'resnet50' | ... (models/resnet.py), unless init.hf_resnet_dir;
                        or 'pixels': no CNN, each patch's pixels average-pooled to
                        model.pixel_pool^2 cells (smoke scale only; models/fashionbert.py)
  model.pixel_pool      cells per patch side for cnn_variant='pixels' (default 4: F = 48)
  model.grid            patches per side (8 as the paper); data.image_size % grid == 0
  model.dtype           compute dtype of the BERT, the heads and the CNN ('float32' |
                        'bfloat16'); params, gradients and AdamW state stay float32
  model.scan            nn.scan over the BERT layers (params under bert/encoder/layers with a
                        leading [num_layers] axis; init.hf_bert_dir stacks the checkpoint's)
  model.remat_policy    'none' | a jax.checkpoint_policies name: rematerialise each BERT block.
                        The patch CNN is frozen behind stop_gradient, so the backward pass keeps
                        none of its activations and it has nothing to rematerialise
  init.hf_bert_dir      '' or a local HF BERT directory: architecture and weights of the BERT
  init.hf_resnet_dir    '' or a local HF ResNet directory: the (frozen) patch CNN
  objective.weighting   'adaptive' (FashionBERT) | 'equal' (fixed 1/3 each, the baseline)
  objective.weight_grad 'stop' | 'through' (see losses/weighting.py)
  objective.neg_prob    probability that a row's text is replaced by a negative (0.5)
  objective.mlm_max_predictions   0 = MLM logits at every text position; M > 0 = at the first M
                        masked positions of each row (BERT's max_predictions_per_seq; targets
                        beyond M are dropped and counted in `mlm_dropped`)

Data: `data.tokenizer.kind` must be 'bert'; `data.mlm_prob` > 0 turns MLM on and
`data.patch_mask.grid` (= model.grid) with `count` masked patches (FashionBERT: 5 random
patches, i.e. min_block = max_block = 1) turns MPM on; TIA is always on. The adaptive weights
run over the active tasks in the order [mlm, tia, mpm] (K = 3 when all are on).

One training step (B = global batch):
  1. partner[i] = random example of the same sub-category and another product (global batch,
     losses/matching.py); with probability neg_prob row i's text (masked ids, mask, labels) is
     replaced by its partner's: TIA label 0, else 1.
  2. one forward pass of [CLS, text, SEP, patches] with the masked text and the masked patches
     zeroed (a single pass serves all three tasks, as in the reference);
  3. L_tia = 2-way CE on every row; L_mlm = CE at masked text positions and L_mpm = KL at masked
     patches, both over ALIGNED rows only (our choice: predicting a product's words from an
     image of another product, or its patches from another product's text, teaches the model
     to ignore the other modality; the swapped rows' MLM labels are dropped);
  4. L = sum_i w_i L_i with adaptive or equal weights (losses/weighting.py).
Dropout is active when train=True (keys from the step key).

Memory and speed levers (tests/test_levers_systems.py): scan, remat_policy, bf16 compute and
fsdp / fsdp x tensor sharding of params and optimizer state change the loss and gradients only
by rounding (a train step on fsdp=8 or fsdp=2 x tensor=4 equals one device, CNN and pixel
paths). grad_accum_steps runs but is NOT the same objective: negatives are drawn within each
micro-batch (and with its own key), MLM averages over the micro-batch's masked tokens and the
adaptive weights are a nonlinear function of each micro-batch's losses.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.data import tokenizers
from fashion_jax.interop import fashionbert_torch
from fashion_jax.interop import hf_bert
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_resnet
from fashion_jax.losses import masked
from fashion_jax.losses import matching
from fashion_jax.losses import weighting
from fashion_jax.models import bert as bert_lib
from fashion_jax.models import fashionbert as fb_lib
from fashion_jax.models import layers
from fashion_jax.models import resnet as resnet_lib

CONFIG_KEYS = ("model", "data", "init", "objective")
TASK_ORDER = ("mlm", "tia", "mpm")
# A parameter path inside the frozen CNN; `optimizer.freeze` must cover it and its BN stats.
_CNN_PROBES = ("params/cnn/stem_conv/kernel", "batch_stats/cnn/stem_bn/mean")


def model_config(config) -> fb_lib.FashionBert:
  """The FashionBert module of a config (architecture from HF directories when given)."""
  m, data, init = config.model, config.data, config.init
  if data.tokenizer.kind != "bert":
    raise ValueError(f"FashionBERT reads BERT WordPiece ids; data.tokenizer.kind="
                     f"{data.tokenizer.kind!r} must be 'bert'.")
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  runtime = dict(dtype=layers.compute_dtype(m.dtype), scan=m.scan, remat_policy=m.remat_policy)
  if init.get("hf_bert_dir"):
    hf_config, _ = hf_io.load_hf_config(init.hf_bert_dir)
    bert = hf_bert.bert_from_hf_config(hf_config, **runtime, **dict(m.get("bert") or {}))
  else:
    overrides = dict(m.get("bert") or {})
    overrides.update(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, **runtime)
    bert = bert_lib.bert(m.bert_variant, **overrides)
  if bert.vocab_size != tok.vocab_size:
    raise ValueError(f"init.hf_bert_dir={init.hf_bert_dir!r} has {bert.vocab_size} word "
                     f"embeddings but data.tokenizer (path={data.tokenizer.path!r}) has "
                     f"{tok.vocab_size} tokens: point data.tokenizer.path at the checkpoint.")
  if data.max_len > bert.max_position:
    raise ValueError(f"data.max_len={data.max_len} exceeds the BERT's max_position "
                     f"{bert.max_position}.")
  pixel_pool = int(m.get("pixel_pool", 4))
  if m.cnn_variant == fb_lib.PIXELS:
    if init.get("hf_resnet_dir"):
      raise ValueError(f"model.cnn_variant='pixels' has no CNN, but init.hf_resnet_dir="
                       f"{init.hf_resnet_dir!r} is set: pick one.")
    patch_side = data.image_size // int(m.grid)
    if pixel_pool < 1 or patch_side % pixel_pool:
      raise ValueError(f"model.pixel_pool={pixel_pool} must divide the patch side "
                       f"{patch_side} (data.image_size={data.image_size} / model.grid={m.grid}).")
    cnn = None
  elif init.get("hf_resnet_dir"):
    hf_config, _ = hf_io.load_hf_config(init.hf_resnet_dir)
    cnn = hf_resnet.resnet_from_hf_config(hf_config, dtype=layers.compute_dtype(m.dtype))
  else:
    cnn = resnet_lib.resnet(m.cnn_variant, dtype=layers.compute_dtype(m.dtype))
  return fb_lib.FashionBert(bert=bert, cnn=cnn, grid=int(m.grid), pixel_pool=pixel_pool)


def _training_pass(module: fb_lib.FashionBert, ids, text_mask, images, features, patch_mask,
                   deterministic: bool):
  """(features [B, P, F], hidden [B, L + P, D], align logits [B, 2]) in one bound call.

  `features` (cached patch features: `launch.prepare`, fashion_jax/prepare/patches.py) replace the CNN over `images`
  when given."""
  if features is None:
    features = module.patch_features(images)
  hidden = module.encode(ids, text_mask, features, patch_mask, deterministic)
  return features, hidden, module.align_logits(hidden)


def _heads(module: fb_lib.FashionBert, text_hidden, patch_hidden):
  return module.mlm_logits(text_hidden), module.mpm_predict(patch_hidden)


def _pair_scores(module: fb_lib.FashionBert, ids, text_mask, features):
  hidden = module.encode(ids, text_mask, features, None, True)
  return matching.alignment_score(module.align_logits(hidden))


class System:
  """FashionBERT as a fashion_jax system (see systems/base.py and the module docstring)."""

  @staticmethod
  def required_features(config):
    """The batch keys `loss` reads (systems/base.py): MLM and MPM follow config.data."""
    need = dict.fromkeys(("image", "text", "text_mask", "product_key", "subcategory_key"), "")
    if float(config.data.mlm_prob) > 0:
      need.update(mlm_ids="MLM", mlm_labels="MLM")
    if int(config.data.patch_mask.grid) > 0:
      need["patch_mask"] = "MPM"
    return need

  def __init__(self, config):
    self.config = config
    self.model = model_config(config)
    data, obj = config.data, config.objective
    self.tokenizer = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path,
                                              data.max_len)
    if data.image_size % self.model.grid:
      raise ValueError(f"data.image_size={data.image_size} is not divisible by model.grid="
                       f"{self.model.grid}.")
    self.use_mlm = float(data.mlm_prob) > 0
    self.use_mpm = int(data.patch_mask.grid) > 0
    if self.use_mpm and int(data.patch_mask.grid) != self.model.grid:
      raise ValueError(f"data.patch_mask.grid={data.patch_mask.grid} must equal model.grid="
                       f"{self.model.grid} (the mask is over the model's patches).")
    self.tasks = tuple(t for t in TASK_ORDER
                       if t == "tia" or (t == "mlm" and self.use_mlm)
                       or (t == "mpm" and self.use_mpm))
    if obj.weighting not in weighting.SCHEMES:
      raise ValueError(f"objective.weighting={obj.weighting!r}; expected one of "
                       f"{weighting.SCHEMES}.")
    if obj.weight_grad not in weighting.WEIGHT_GRADS:
      raise ValueError(f"objective.weight_grad={obj.weight_grad!r}; expected one of "
                       f"{weighting.WEIGHT_GRADS}.")
    if not 0 < obj.neg_prob < 1:
      raise ValueError(f"objective.neg_prob={obj.neg_prob} must be in (0, 1).")
    if obj.mlm_max_predictions < 0:
      raise ValueError(f"objective.mlm_max_predictions={obj.mlm_max_predictions} must be >= 0.")
    freeze = [re.compile(r) for r in (config.get("optimizer", {}).get("freeze", ()) or ())]
    if "optimizer" in config and self.model.cnn is not None:
      uncovered = [p for p in _CNN_PROBES if not any(r.fullmatch(p) for r in freeze)]
      if uncovered:
        raise ValueError(
            f"The patch CNN is a frozen feature extractor, but optimizer.freeze="
            f"{tuple(r.pattern for r in freeze)} does not cover {uncovered}: weight decay "
            "would shrink it. Add r'(params/cnn|batch_stats)/.*'.")

  # --- trainer interface --------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l, data = self.config.data.image_size, self.config.data.max_len, self.config.data
    b = {"image": np.zeros((batch_size, s, s, 3), np.uint8),
         "text": np.zeros((batch_size, l), np.int32),
         "text_mask": np.ones((batch_size, l), bool),
         "product_key": np.arange(batch_size, dtype=np.int32),
         "subcategory_key": np.zeros((batch_size,), np.int32)}
    if self.use_mlm:
      b["mlm_ids"] = np.zeros((batch_size, l), np.int32)
      b["mlm_labels"] = np.full((batch_size, l), masked.IGNORE, np.int32)
    if self.use_mpm:
      b["patch_mask"] = np.zeros((batch_size, int(data.patch_mask.grid) ** 2), bool)
    return b

  def init(self, rng: jax.Array, batch) -> Any:
    """Variables {'params': ..., 'batch_stats': ...} (the CNN's BN statistics)."""
    return dict(self.model.init(rng, batch["text"], batch["text_mask"], images=batch["image"]))

  def pretrained_params(self, rng: jax.Array | None = None):
    """Variables with the BERT / CNN taken from init.hf_bert_dir / init.hf_resnet_dir, the rest
    (patch projection, patch positions, MPM and alignment heads, and any head the BERT
    checkpoint lacks) freshly initialised from `rng` (default: key(config.seed)); None when
    neither directory is set."""
    init = self.config.init
    if not (init.get("hf_bert_dir") or init.get("hf_resnet_dir")):
      return None
    rng = jax.random.key(self.config.seed) if rng is None else rng
    batch = self.dummy_batch(1)
    variables = jax.device_get(nn.unbox(jax.jit(self.init)(rng, batch)))
    variables = {k: dict(v) for k, v in variables.items()}
    if init.get("hf_bert_dir"):
      _, state = hf_io.load_hf_checkpoint(init.hf_bert_dir)
      variables["params"]["bert"] = hf_bert.convert_hf_bert_state(
          state, self.model.bert, jax.random.fold_in(rng, 1))
    if init.get("hf_resnet_dir"):
      _, cnn_vars = hf_resnet.load_hf_resnet(init.hf_resnet_dir, dtype=self.model.cnn.dtype)
      variables["params"]["cnn"] = cnn_vars["params"]
      variables["batch_stats"]["cnn"] = cnn_vars["batch_stats"]
    return variables

  def loss(self, params, batch, rng, train: bool = True):
    neg_rng, swap_rng, drop_rng = jax.random.split(rng, 3)
    obj, model = self.config.objective, self.model
    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # numpy rows cannot take traced indices
    text, text_mask = batch["text"], batch["text_mask"]
    b, l = text.shape
    ids = batch["mlm_ids"] if self.use_mlm else text

    # 1. TIA negatives over the global batch; swap the text of a neg_prob share of the rows.
    partner, has_neg, neg_stats = matching.group_negatives(
        neg_rng, batch["subcategory_key"], batch["product_key"])
    swap = (jax.random.uniform(swap_rng, (b,)) < obj.neg_prob) & has_neg
    source = jnp.where(swap, partner, jnp.arange(b, dtype=jnp.int32))
    ids, text_mask = ids[source], text_mask[source]
    aligned = ~swap

    # 2. One forward pass.
    patch_mask = batch["patch_mask"] if self.use_mpm else None
    cached = batch.get("patch_features")
    features, hidden, align_logits = model.apply(
        params, ids, text_mask, None if cached is not None else batch["image"],
        None if cached is None else cached.astype(jnp.float32), patch_mask, not train,
        method=_training_pass, rngs={"dropout": drop_rng})

    # 3. Task losses.
    losses, metrics = {}, dict(neg_stats)
    losses["tia"], m = matching.matching_loss(align_logits, aligned)
    metrics.update(m)
    text_hidden, patch_hidden = hidden[:, :l], hidden[:, l:]
    if self.use_mlm:
      labels = jnp.where(aligned[:, None], batch["mlm_labels"], masked.IGNORE)
      if obj.mlm_max_predictions and obj.mlm_max_predictions < l:
        valid = labels >= 0
        order = jnp.argsort(~valid, axis=1, stable=True)[:, :obj.mlm_max_predictions]
        text_hidden = jnp.take_along_axis(text_hidden, order[..., None], axis=1)
        kept = jnp.take_along_axis(labels, order, axis=1)
        metrics["mlm_dropped"] = (jnp.sum(valid) - jnp.sum(kept >= 0)).astype(jnp.float32)
        labels = kept
    else:
      text_hidden = text_hidden[:, :0]
    mpm_hidden = patch_hidden if self.use_mpm else patch_hidden[:, :0]
    mlm_logits, mpm_pred = model.apply(params, text_hidden, mpm_hidden, method=_heads)
    if self.use_mlm:
      losses["mlm"], m = masked.mlm_loss(mlm_logits, labels)
      metrics.update(m)
    if self.use_mpm:
      losses["mpm"], m = masked.mpm_kl_loss(mpm_pred, features, patch_mask & aligned[:, None])
      metrics.update(m)

    # 4. Weighted sum.
    total, w = weighting.combine(losses, self.tasks, obj.weighting, obj.weight_grad)
    metrics.update(w)
    metrics.update({f"loss_{k}": v for k, v in losses.items()})
    metrics["loss"] = total
    return total, metrics

  # --- cross-encoder interface (evaluate/cross_encoder.py) ----------------------------------
  def patch_features(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> frozen patch features float32 [B, P, F] (computed once per image)."""
    return self.model.apply(params, images, method=self.model.patch_features)

  def score_pairs(self, params, ids: jax.Array, text_mask: jax.Array, features: jax.Array
                  ) -> jax.Array:
    """ids, text_mask [B, L], features [B, P, F] -> alignment score logit_1 - logit_0 [B]."""
    return self.model.apply(params, ids, text_mask, features, method=_pair_scores)

  # --- export ---------------------------------------------------------------------------------
  def export(self, params, out_dir: str, overwrite: bool = False):
    """bert/ (a transformers BertModel with the run's tokenizer), cnn/ (a ResNetModel; none for
    pooled-pixel patches), the remaining arrays and metadata for FashionBertTorch
    (interop/fashionbert_torch.py). `params` are the variables System.init returns."""
    model = self.model
    if model.bert.scan:  # The export maps per-layer params: unstack a scanned model.
      params = layers.unstack_layers(jax.device_get(nn.unbox(params)))
      model = model.clone(bert=model.bert.clone(scan=False))
    return fashionbert_torch.export_fashionbert(
        params, model, out_dir, image_size=int(self.config.data.image_size),
        tokenizer=self.tokenizer.hf, overwrite=overwrite)
