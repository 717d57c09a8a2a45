"""FashionCLIP / FashionSigLIP: a CLIP or SigLIP dual encoder trained contrastively over the
global batch (InfoNCE or the sigmoid loss, optionally multi-field and Matryoshka).

Config keys this system reads (besides the trainer's and the pipeline's `data`):
  model.family           'clip' (default; models/clip.py) | 'siglip' (models/siglip.py)
  model.variant          clip: 'tiny' | 'S/16' | 'B/32' | 'B/16' | 'L/14';
                         siglip: 'tiny' | 'B/16' | 'B/16-256' | 'So400m/14'
  model.projection_dim   clip: joint space width (None = the variant's); siglip: must be None
                         (the embedding width is the vision width)
  model.vision / .text   per-tower field overrides (e.g. vision.image_size, text.num_layers)
  model.dtype            compute dtype ('float32' on CPU, 'bfloat16' on accelerators)
  model.scan, model.remat_policy
  model.attention_impl   'einsum' (default) | 'xla' | 'cudnn' (fused attention on NVIDIA GPUs,
                         bf16; same parameters and loss, layers.MultiHeadAttention)
  model.pooled_last_layer  clip only: each tower's last layer computes the pooled token alone
                         (models/clip.py CLIPConfig; same loss and gradients; 10/12 of one
                         layer's matmuls fewer per tower, 6.8% of a B/32 step's FLOPs)
  model.encode_chunks    1 | K: encode K row-chunks at a time, rematerialised (exact loss)
  model.field_dedup      0 (off) | U: with data.fields, encode each distinct field text of the
                         (micro-)batch once, in U rows (colours, brands, categories repeat across
                         products: a batch of 64 synthetic products has 86-103 distinct texts
                         among its 320); a batch with more than U distinct texts encodes all
                         B * F (same loss; metric field_dedup_fallback = 1). Same loss and
                         gradients to float rounding (contrastive.encode_distinct). Metric
                         field_texts_distinct tells how many a batch had. U >= B * F encodes
                         every field text directly (nothing to save; no metrics); without
                         data.fields U is unused.
  model.loss_blocks      1 | K: blockwise [B, B] logits in K row blocks (exact loss)
  init.hf_clip_dir       '' = random init; else a local HF CLIPModel directory (or hub id)
                         whose weights initialise every parameter (FashionCLIP's recipe: full
                         fine-tuning from a pretrained CLIP). Its config then defines the
                         architecture and `model.variant/vision/text` must be left unset.
  init.hf_siglip_dir     the same for model.family='siglip': a transformers SiglipModel
                         directory (e.g. google/siglip-base-patch16-224 saved locally).
  init.open_clip_dir     instead of those: an open_clip checkpoint directory (open_clip_config
                         .json + weights, e.g. Marqo/marqo-fashionSigLIP), converted by
                         interop/open_clip.py; its kind ('clip' | 'siglip') must be
                         model.family. One key per format (rather than one path whose format
                         is guessed) so a config says what it loads and a wrong directory is
                         refused under the key that named it.

The text tower's vocabulary (size, bos/eos/pad ids) always comes from the tokenizer the pipeline
uses (`data.tokenizer`), and its context from `data.max_len`: a model and a tokenizer that
disagree cannot be configured.

Objective (config.loss; every key optional, the defaults are FashionCLIP's InfoNCE exactly):
  loss.kind              'infonce' (default) | 'sigmoid' (SigLIP's loss, losses/sigmoid.py)
  loss.sigmoid_impl      'dense' (default) | 'blockwise' (model.loss_blocks text blocks) | 'ring'
                         (texts passed around the mesh's batch shards; needs the trainer's mesh)
  loss.bias_init         the sigmoid loss's initial logit bias b (default sigmoid.INIT_BIAS =
                         -10, SigLIP's, chosen for batch 32k; log(1/B) starts a batch-B run at
                         the bias a batch of unrelated pairs would settle to). A random init
                         only: a pretrained model keeps its own bias. Unused by InfoNCE (a
                         SigLIP model's bias parameter is then left untrained).
  loss.text_weight       w of the image <-> `text` term (1.0; 0 = fields only)
  loss.field_weights     one weight per entry of data.fields (default 1 each)
  loss.field_positives   'row' (default): in the term of field f, image i's only positive is
                         product i's field text; 'value': every product whose field f has the
                         same text (tokens) is a positive of it too (sigmoid: l_ij = +1;
                         InfoNCE: a multi-positive target; sigmoid.token_keys, losses/
                         multifield.py). With few distinct values (colour, brand) 'row' asks
                         the model to tell identical texts apart.
  loss.matryoshka_weights  one weight c_g per entry of model.matryoshka_dims (default 1 each)
  model.matryoshka_dims  () = off; e.g. (64, 128, 0): the loss is summed over the embedding
                         prefixes of these widths, each re-normalised (0 = full width;
                         losses/matryoshka.py)
  data.pair_weight_field '' = off; a numeric column of the dataset (e.g. an image_text_folder
                         catalog's `score`): the per-product relevance score s_i, batch feature
                         `pair_weight` float32 [B]
  loss.pair_weight       dict(score_range=(s_lo, s_hi), weight_range=(w_lo, w_hi)), default
                         (0, 1) and (0, 1): GCL's score-to-weight map v_i = w_lo + (w_hi - w_lo)
                         clip((s_i - s_lo) / (s_hi - s_lo), 0, 1) (losses/pair_weights.py); v_i
                         multiplies the POSITIVE terms of pair i in every term below (text and
                         each field, each Matryoshka width), InfoNCE or sigmoid
The loss is
    L = sum_g c_g [ w_text L_pair(tn(img, m_g), tn(txt, m_g))
                    + sum_f w_f L_pair(tn(img, m_g), tn(field_f, m_g); mask_f) ]
(one g with m = full and no tn when matryoshka_dims is empty; losses/multifield.py). A product
without field f (data/features.py's field_mask) is left out of the term of f. With the defaults
(infonce, no fields, no Matryoshka, no pair weights) `loss` calls contrastive.info_nce exactly as
before.

Sigmoid loss on a CLIP model: the CLIP module has a learnable log-temperature (`logit_scale`)
but no bias, so the system adds a top-level parameter `logit_bias` (init sigmoid.INIT_BIAS),
and a randomly initialised CLIP starts at t' = sigmoid.INIT_LOG_TEMPERATURE instead of
log(1/0.07). The HF CLIPModel export has no bias and leaves it out: cosine ranking and CLIP's
softmax zero-shot do not depend on a constant bias.

Batches: 'image' uint8 [B, S, S, 3] (normalised with CLIP's mean/std on the device), 'text'
int32 [B, L]; with data.fields also 'field_text' int32 [B, F, L] and 'field_mask' bool [B, F];
with data.pair_weight_field also 'pair_weight' float32 [B] (the raw scores).
"""

import dataclasses
import difflib
import functools
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.data import features
from fashion_jax.data import pipeline
from fashion_jax.data import tokenizers
from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_siglip
from fashion_jax.interop import open_clip
from fashion_jax.losses import contrastive
from fashion_jax.losses import matryoshka
from fashion_jax.losses import multifield
from fashion_jax.losses import pair_weights
from fashion_jax.losses import sigmoid
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import siglip as siglip_lib

# The top-level config sections this system reads (systems/__init__.py).
CONFIG_KEYS = ("model", "data", "init", "loss")

FAMILIES = ("clip", "siglip")
_INIT_KEY = {"clip": "hf_clip_dir", "siglip": "hf_siglip_dir"}  # The pretrained dir per family.
LOSS_KINDS = ("infonce", "sigmoid")
SIGMOID_IMPLS = ("dense", "blockwise", "ring")
_LOSS_KEYS = ("kind", "sigmoid_impl", "text_weight", "field_weights", "matryoshka_weights",
              "pair_weight", "bias_init", "field_positives")
FIELD_POSITIVES = ("row", "value")
_PAIR_WEIGHT_KEYS = ("score_range", "weight_range")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The validated objective of a run (module docstring), from `config.loss` and friends.

  Attributes:
    kind: 'infonce' | 'sigmoid'.
    sigmoid_impl: 'dense' | 'blockwise' | 'ring'.
    loss_blocks: K of the blockwise InfoNCE / sigmoid (model.loss_blocks).
    text_weight: weight of the image <-> text term (0 = no text term).
    fields: the multi-field names (data.fields).
    field_weights: one per field.
    matryoshka_dims: () or the m_g (0 = full width).
    matryoshka_weights: one c_g per dim.
    pair_weight_field: '' or the dataset column of the per-pair scores (data.pair_weight_field).
    score_range, weight_range: the score-to-weight map (losses/pair_weights.py).
    bias_init: the sigmoid loss's initial logit bias (random init only).
    field_positives: 'row' | 'value' (module docstring).
    field_dedup: 0 or U, the rows the distinct field texts are encoded in (model.field_dedup).
  """
  kind: str = "infonce"
  sigmoid_impl: str = "dense"
  loss_blocks: int = 1
  text_weight: float = 1.0
  fields: tuple[str, ...] = ()
  field_weights: tuple[float, ...] = ()
  matryoshka_dims: tuple[int, ...] = ()
  matryoshka_weights: tuple[float, ...] = ()
  pair_weight_field: str = ""
  score_range: tuple[float, float] = pair_weights.DEFAULT_SCORE_RANGE
  weight_range: tuple[float, float] = pair_weights.DEFAULT_WEIGHT_RANGE
  bias_init: float = sigmoid.INIT_BIAS
  field_positives: str = "row"
  field_dedup: int = 0

  @property
  def is_default(self) -> bool:
    """FashionCLIP's original objective: one InfoNCE term, no fields, no Matryoshka, no pair
    weights."""
    return (self.kind == "infonce" and not self.fields and not self.matryoshka_dims
            and self.text_weight == 1.0 and not self.pair_weight_field)


def objective(config) -> Objective:
  """The Objective of `config` (config.loss, data.fields, model.matryoshka_dims/loss_blocks/
  field_dedup).

  Raises:
    ValueError naming the bad key and value (an unknown loss key, kind or implementation,
    weights that do not match their fields or dims, no term at all, InfoNCE with both a field
    mask and loss_blocks > 1, a bad pair-weight column name or score-to-weight map).
  """
  loss = config.get("loss") or {}
  for key in loss.keys():
    if key not in _LOSS_KEYS:
      close = difflib.get_close_matches(key, _LOSS_KEYS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ValueError(f"Unknown config key config.loss.{key}{hint}; known keys: "
                       f"{list(_LOSS_KEYS)}.")
  kind = loss.get("kind", "infonce")
  if kind not in LOSS_KINDS:
    raise ValueError(f"config.loss.kind={kind!r} is not one of {LOSS_KINDS}.")
  impl = loss.get("sigmoid_impl", "dense")
  if impl not in SIGMOID_IMPLS:
    raise ValueError(f"config.loss.sigmoid_impl={impl!r} is not one of {SIGMOID_IMPLS}.")
  fields = features.multi_fields(config.data)
  field_weights = loss.get("field_weights") or (1.0,) * len(fields)
  field_weights = multifield.check_weights(field_weights, fields, "config.loss.field_weights")
  (text_weight,) = multifield.check_weights((loss.get("text_weight", 1.0),), ("text",),
                                            "config.loss.text_weight")
  if text_weight == 0 and not fields:
    raise ValueError("config.loss.text_weight=0 and config.data.fields is empty: the loss has "
                     "no term.")
  dims = matryoshka.check_dims(config.model.get("matryoshka_dims") or (),
                               what="config.model.matryoshka_dims")
  dim_weights = loss.get("matryoshka_weights") or (1.0,) * len(dims)
  dim_weights = multifield.check_weights(dim_weights, dims, "config.loss.matryoshka_weights")
  blocks = config.model.get("loss_blocks", 1)
  if kind == "infonce" and fields and blocks > 1:
    raise ValueError(f"config.model.loss_blocks={blocks} with config.data.fields={fields}: the "
                     "masked InfoNCE of the field terms is dense only; set loss_blocks=1 (or "
                     "use loss.kind='sigmoid', whose blockwise and ring forms take the mask).")
  weight_field = config.data.get("pair_weight_field") or ""
  if not isinstance(weight_field, str):
    raise ValueError(f"config.data.pair_weight_field={weight_field!r} must be a column name "
                     "(e.g. 'score') or '' (off).")
  pw = dict(loss.get("pair_weight") or {})
  unknown = sorted(set(pw) - set(_PAIR_WEIGHT_KEYS))
  if unknown:
    raise ValueError(f"Unknown config key(s) config.loss.pair_weight.{unknown[0]}; known keys: "
                     f"{list(_PAIR_WEIGHT_KEYS)}.")
  score_range, weight_range = pair_weights.check_ranges(
      pw.get("score_range", pair_weights.DEFAULT_SCORE_RANGE),
      pw.get("weight_range", pair_weights.DEFAULT_WEIGHT_RANGE))
  bias_init = loss.get("bias_init", sigmoid.INIT_BIAS)
  if (isinstance(bias_init, bool) or not isinstance(bias_init, (int, float))
      or not math.isfinite(bias_init)):
    raise ValueError(f"config.loss.bias_init={bias_init!r} must be a finite number (SigLIP's "
                     f"{sigmoid.INIT_BIAS}; log(1/batch) for a small batch).")
  field_positives = loss.get("field_positives", "row")
  if field_positives not in FIELD_POSITIVES:
    raise ValueError(f"config.loss.field_positives={field_positives!r} is not one of "
                     f"{FIELD_POSITIVES}.")
  dedup = config.model.get("field_dedup", 0)
  if isinstance(dedup, bool) or not isinstance(dedup, int) or dedup < 0:
    raise ValueError(f"config.model.field_dedup={dedup!r} must be an int >= 0 (0 = off; U = "
                     "encode the distinct field texts of a batch in U rows).")
  # Without data.fields there is nothing to encode once and U is unused: a recipe that sets it
  # still runs one key away with --config.data.fields=() (its single-text comparison).
  chunks = config.model.get("encode_chunks", 1)
  if dedup and fields and dedup % chunks:
    raise ValueError(f"config.model.field_dedup={dedup} is not divisible by "
                     f"config.model.encode_chunks={chunks}: the distinct texts are encoded in "
                     "the same chunks.")
  return Objective(kind=kind, sigmoid_impl=impl, loss_blocks=blocks, text_weight=text_weight,
                   fields=fields, field_weights=field_weights, matryoshka_dims=dims,
                   matryoshka_weights=dim_weights, pair_weight_field=weight_field,
                   score_range=score_range, weight_range=weight_range,
                   bias_init=float(bias_init), field_positives=field_positives,
                   field_dedup=dedup)


def family(config) -> str:
  """config.model.family ('clip' default | 'siglip'), validated against the init keys."""
  fam = config.model.get("family", "clip")
  if fam not in FAMILIES:
    raise ValueError(f"config.model.family={fam!r} is not one of {FAMILIES}.")
  init = config.get("init") or {}
  wrong = {"clip": "hf_siglip_dir", "siglip": "hf_clip_dir"}[fam]
  if init.get(wrong):
    raise ValueError(f"config.init.{wrong}={init[wrong]!r} does not initialise a "
                     f"model.family={fam!r} model; use init.{_INIT_KEY[fam]}.")
  if init.get("open_clip_dir") and init.get(_INIT_KEY[fam]):
    raise ValueError(f"config.init.open_clip_dir={init.open_clip_dir!r} and config.init."
                     f"{_INIT_KEY[fam]}={init[_INIT_KEY[fam]]!r} are both set; set one.")
  return fam


@functools.lru_cache(maxsize=1)
def _open_clip_checkpoint(path: str) -> open_clip.OpenClipCheckpoint:
  """open_clip.to_hf(path), read once for model_config and pretrained_params (which clears it)."""
  return open_clip.to_hf(path)


def _check_vocab(key, path, cfg, tok, data):
  """The checkpoint at config.init.<key> and the pipeline's tokenizer must agree."""
  if cfg.text.vocab_size != tok.vocab_size:
    raise ValueError(
        f"init.{key}={path!r} has a text vocabulary of {cfg.text.vocab_size} tokens but "
        f"data.tokenizer ({data.tokenizer.kind!r}, path={data.tokenizer.path!r}) has "
        f"{tok.vocab_size}: point data.tokenizer.path at the checkpoint's tokenizer.")
  if data.max_len > cfg.text.max_len:
    raise ValueError(f"data.max_len={data.max_len} exceeds the checkpoint's context "
                     f"{cfg.text.max_len}.")


def model_config(config) -> clip_lib.CLIPConfig | siglip_lib.SiglipConfig:
  """The CLIPConfig or SiglipConfig (model.family) a run trains, from `config.model`,
  `config.data`, `config.init`."""
  m, data = config.model, config.data
  fam = family(config)
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  runtime = dict(dtype=m.dtype, scan=m.scan, remat_policy=m.remat_policy,
                 attention_impl=m.get("attention_impl", "einsum"),
                 seq_pad_multiple=int(m.get("seq_pad_multiple", 0)))
  if m.get("pooled_last_layer", False):
    if fam != "clip":
      raise ValueError(f"config.model.pooled_last_layer=True with model.family={fam!r}: CLIP "
                       "only (SigLIP's attention-pool head reads every token of the last layer).")
    runtime["pooled_last_layer"] = True
  cls = clip_lib.CLIPConfig if fam == "clip" else siglip_lib.SiglipConfig
  key = _INIT_KEY[fam]
  init = config.get("init") or {}
  if init.get(key):
    hf_config, _ = hf_io.load_hf_config(init[key])
    cfg = cls.from_hf(hf_config, **runtime)
    _check_vocab(key, init[key], cfg, tok, data)
    return cfg
  if init.get("open_clip_dir"):
    ckpt = _open_clip_checkpoint(init.open_clip_dir)
    if ckpt.kind != fam:
      raise ValueError(f"config.init.open_clip_dir={init.open_clip_dir!r} holds an open_clip "
                       f"{ckpt.kind!r} model but config.model.family={fam!r}.")
    want = pipeline.resize_mode_of(ckpt.preprocess["resize_mode"])
    if data.get("resize_mode", "crop") != want:
      raise ValueError(f"config.init.open_clip_dir={init.open_clip_dir!r} preprocesses with "
                       f"resize_mode={ckpt.preprocess['resize_mode']!r}: set "
                       f"config.data.resize_mode={want!r} (now "
                       f"{data.get('resize_mode', 'crop')!r}).")
    cfg = cls.from_hf(ckpt.hf_config, **runtime)
    _check_vocab("open_clip_dir", init.open_clip_dir, cfg, tok, data)
    return cfg
  text = dict(m.get("text") or {})
  text.update(vocab_size=tok.vocab_size, max_len=data.max_len, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
  vision = dict(m.get("vision") or {})
  vision.setdefault("image_size", data.image_size)
  if fam == "siglip":
    if m.get("projection_dim") is not None:
      raise ValueError(f"config.model.projection_dim={m.projection_dim!r}: a SigLIP model's "
                       "embedding width is its vision width (set model.vision.width).")
    return siglip_lib.siglip_config(m.variant, vision=vision, text=text,
                                    logit_bias_init=objective(config).bias_init, **runtime)
  if (config.get("loss") or {}).get("kind", "infonce") == "sigmoid":
    runtime["logit_scale_init"] = sigmoid.INIT_LOG_TEMPERATURE  # SigLIP's t' init.
  return clip_lib.clip_config(m.variant, projection_dim=m.get("projection_dim"), vision=vision,
                              text=text, **runtime)


class System:
  """FashionCLIP as a fashion_jax system (see systems/base.py)."""

  @staticmethod
  def required_features(config) -> tuple[str, ...]:
    """The batch keys `loss` reads (systems/base.py): image, text, the multi-field pair and the
    per-pair scores."""
    fields = features.multi_fields(config.data)
    weighted = bool(config.data.get("pair_weight_field"))
    return (("image", "text") + (("field_text", "field_mask") if fields else ())
            + (("pair_weight",) if weighted else ()))

  def __init__(self, config):
    self.config = config
    self.objective = objective(config)
    self.family = family(config)
    self.model_config = model_config(config)
    self.model = (clip_lib.CLIPModel(self.model_config) if self.family == "clip"
                  else siglip_lib.SiglipModel(self.model_config))
    self.tokenizer = tokenizers.get_tokenizer(
        config.data.tokenizer.kind, config.data.tokenizer.path, config.data.max_len)
    if config.data.image_size != self.model_config.vision.image_size:
      raise ValueError(f"data.image_size={config.data.image_size} but the vision tower takes "
                       f"{self.model_config.vision.image_size} px images.")
    width = self.model_config.projection_dim
    matryoshka.check_dims(self.objective.matryoshka_dims, width,
                          "config.model.matryoshka_dims")
    # The prefixes evaluators and search report (0 = full width): evaluate/retrieval.py.
    self.matryoshka_dims = self.objective.matryoshka_dims
    # CLIP has no bias parameter: the sigmoid loss adds one beside the model's (docstring).
    self._extra_bias = self.objective.kind == "sigmoid" and self.family == "clip"

  # --- trainer interface --------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.model_config.vision.image_size, self.config.data.max_len
    batch = {"image": np.zeros((batch_size, s, s, 3), np.uint8),
             "text": np.zeros((batch_size, l), np.int32)}
    f = len(self.objective.fields)
    if f:
      batch["field_text"] = np.zeros((batch_size, f, l), np.int32)
      batch["field_mask"] = np.zeros((batch_size, f), bool)
    if self.objective.pair_weight_field:
      batch["pair_weight"] = np.ones((batch_size,), np.float32)
    return batch

  def init(self, rng: jax.Array, batch) -> Any:
    params = self.model.init(rng, batch["image"], batch["text"])["params"]
    if self._extra_bias:
      params = {**params, "logit_bias": nn.LogicallyPartitioned(
          jnp.full((), self.objective.bias_init, jnp.float32), names=())}
    return params

  def pretrained_params(self):
    """Unboxed numpy params from `init.hf_clip_dir` / `init.hf_siglip_dir` (by model.family)
    or `init.open_clip_dir`, or None for a random init."""
    init = self.config.get("init") or {}
    interop = hf_clip if self.family == "clip" else hf_siglip
    if init.get(_INIT_KEY[self.family]):
      _, state = hf_io.load_hf_checkpoint(init[_INIT_KEY[self.family]])
      # self.model_config was made from the same directory's config (model_config).
      params = interop.hf_state_to_params(self.model_config, state)
    elif init.get("open_clip_dir"):
      ckpt = _open_clip_checkpoint(init.open_clip_dir)
      params = interop.hf_state_to_params(self.model_config, ckpt.hf_state)
      _open_clip_checkpoint.cache_clear()  # Do not hold a second copy of the weights.
    else:
      return None
    if self._extra_bias:
      params = {**params, "logit_bias": np.full((), self.objective.bias_init, np.float32)}
    return params

  def _model_params(self, params):
    """The CLIP module's own parameters (without the sigmoid loss's `logit_bias`)."""
    if not self._extra_bias:
      return params
    return {k: v for k, v in params.items() if k != "logit_bias"}

  def _pair_loss(self, scale, log_t, bias, weight=None):
    """(img, txt, mask) -> (loss, metrics) of the configured kind and implementation; `weight`
    [B] (or None): the per-pair weights of the positive terms, the same in every term."""
    obj = self.objective
    if obj.kind == "infonce":
      def pair(img, txt, mask, keys=None):
        if mask is None and keys is None:
          return contrastive.info_nce(img, txt, scale, num_blocks=obj.loss_blocks,
                                      pair_weight=weight)
        return multifield.masked_info_nce(img, txt, scale, mask, keys, weight=weight)
      return pair
    if obj.sigmoid_impl == "dense":
      return lambda img, txt, mask, keys=None: sigmoid.sigmoid_loss(
          img, txt, log_t, bias, pair_mask=mask, pair_weight=weight, pair_keys=keys)
    if obj.sigmoid_impl == "blockwise":
      return lambda img, txt, mask, keys=None: sigmoid.blockwise_sigmoid_loss(
          img, txt, log_t, bias, num_blocks=obj.loss_blocks, pair_mask=mask,
          pair_weight=weight, pair_keys=keys)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError("config.loss.sigmoid_impl='ring' needs the trainer's mesh (the loss runs "
                       "under jax.sharding.use_abstract_mesh in train/step.py); none is set.")
    return lambda img, txt, mask, keys=None: sigmoid.ring_sigmoid_loss(
        img, txt, log_t, bias, mesh=mesh, pair_mask=mask, pair_weight=weight, pair_keys=keys)

  def loss(self, params, batch, rng, train: bool = True):
    """The objective of the module docstring over the global batch.

    Memory levers (losses/contrastive.py, losses/sigmoid.py; none changes the loss beyond
    rounding): `model.encode_chunks` K encodes the batch K row-chunks at a time with
    rematerialisation (gradient cache), `model.loss_blocks` computes the [B, B] logits in
    blocks (InfoNCE, or the sigmoid loss with sigmoid_impl='blockwise').
    """
    del rng, train  # No dropout in CLIP.
    obj = self.objective
    chunks = self.config.model.get("encode_chunks", 1)
    variables = {"params": self._model_params(params)}
    img = contrastive.map_in_chunks(
        lambda x: self.model.apply(variables, x, method=self.model.encode_images),
        batch["image"], num_chunks=chunks)
    encode_texts = lambda ids: contrastive.map_in_chunks(
        lambda x: self.model.apply(variables, x, method=self.model.encode_texts),
        ids, num_chunks=chunks)
    scale = self.model.apply(variables, method=self.model.logit_scale)
    if obj.is_default:  # FashionCLIP's objective, exactly as it always was.
      loss, m = contrastive.info_nce(img, encode_texts(batch["text"]), scale,
                                     num_blocks=obj.loss_blocks)
      return loss, {"loss": loss, "i2t_acc": m["a2b_acc"], "t2i_acc": m["b2a_acc"],
                    "logit_scale": scale}

    log_t = bias = None
    if obj.kind == "sigmoid":
      log_t, bias = params["logit_scale"], params["logit_bias"]
    texts, masks, weights, names, keys = [], [], [], [], []
    if obj.text_weight > 0:
      texts.append(encode_texts(batch["text"]))
      masks.append(None)
      keys.append(None)
      weights.append(obj.text_weight)
      names.append("text")
    if obj.fields:
      ids = batch["field_text"]                                   # [B, F, L]
      b, f = ids.shape[:2]
      # One encode of the B * F field texts (rows b-major: the batch sharding is kept), or of
      # their distinct rows (model.field_dedup).
      emb, distinct, fell_back = contrastive.encode_distinct(
          encode_texts, ids.reshape((b * f,) + ids.shape[2:]), obj.field_dedup)
      emb = emb.reshape(b, f, -1)
      value_keys = sigmoid.token_keys(ids) if obj.field_positives == "value" else None
      for k, name in enumerate(obj.fields):
        texts.append(emb[:, k])
        masks.append(batch["field_mask"][:, k])
        keys.append(None if value_keys is None else value_keys[:, k])
        weights.append(obj.field_weights[k])
        names.append(name)
    weight = None
    if obj.pair_weight_field:  # GCL's score-to-weight of the raw scores, on the device.
      weight = pair_weights.score_to_weight(batch["pair_weight"], obj.score_range,
                                            obj.weight_range)
    pair = self._pair_loss(scale, log_t, bias, weight)
    terms = lambda i, ts: multifield.multi_field_loss(pair, i, ts, masks, weights, names, keys)
    if obj.matryoshka_dims:
      loss, metrics = matryoshka.matryoshka_loss(terms, img, texts, obj.matryoshka_dims,
                                                 obj.matryoshka_weights)
    else:
      loss, metrics = terms(img, texts)
    # temperature / bias are the same in every term: reported once, as logit_scale / _bias.
    metrics = {k: v for k, v in metrics.items()
               if k.split("/")[0] not in ("temperature", "bias")}
    metrics.update(loss=loss, logit_scale=scale)
    if obj.fields and 0 < obj.field_dedup < b * f:  # U >= B * F encodes every text directly.
      metrics.update(field_texts_distinct=distinct.astype(jnp.float32),
                     field_dedup_fallback=fell_back.astype(jnp.float32))
    if obj.kind == "sigmoid":
      metrics["logit_bias"] = bias
    return loss, jax.lax.stop_gradient(metrics)

  # --- two-tower interface (evaluators, product search) -------------------------------------
  def embed_images(self, params, images: jax.Array) -> jax.Array:
    params = self._model_params(params)
    return self.model.apply({"params": params}, images, method=self.model.encode_images)

  def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
    params = self._model_params(params)
    return self.model.apply({"params": params}, tokens, method=self.model.encode_texts)

  def logit_scale(self, params) -> jax.Array:
    params = self._model_params(params)
    return self.model.apply({"params": params}, method=self.model.logit_scale)

  # --- export ---------------------------------------------------------------------------------
  def export(self, params, out_dir: str, overwrite: bool = False):
    """A transformers CLIPModel or SiglipModel directory (by model.family): weights, config,
    tokenizer, preprocessor.

    A sigmoid-trained CLIP's `logit_bias` is not part of the CLIPModel format and is left out
    (logged): rankings and softmax zero-shot do not depend on it. model.matryoshka_dims goes
    into config.json as `matryoshka_dims`.
    """
    if self.family == "siglip":
      return hf_siglip.save_siglip(out_dir, self.model_config, params,
                                   tokenizer=self.tokenizer.hf, overwrite=overwrite,
                                   matryoshka_dims=self.matryoshka_dims)
    if self._extra_bias:
      logging.warning("export: the sigmoid loss's logit_bias=%s is not part of a CLIPModel "
                      "directory and is left out.", np.asarray(params["logit_bias"]))
    return hf_clip.save_clip(out_dir, self.model_config, self._model_params(params),
                             tokenizer=self.tokenizer.hf, overwrite=overwrite,
                             matryoshka_dims=self.matryoshka_dims)
