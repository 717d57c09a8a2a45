"""FashionViL downstream fine-tuning: retrieval, TGIR, (sub)category recognition, OCIR.

One system, `objective.task` picks the task; the backbone is the pretraining FashionViL
(systems/fashionvil.py builds it from the same `model` / `data` keys) under `vil`, the task's
head beside it (models/fashionvil_downstream.py), the loss in losses/fashionvil_downstream.py.

Config keys this system reads (besides the trainer's):
  model.*                as configs/fashionvil.py (image_encoder, resnet_variant, resnet, vit,
                         bert, share, num_codes, dtype): MUST equal the pretraining run's
                         (fashion_jax/prepare/downstream.py copies them from its config.json)
  data.*                 the pipeline's keys (data/pipeline.py); for tgir data.name =
                         'fashioniq/triplets' and data.gallery = 'fashioniq/gallery'; for ocir
                         data.name = a Polyvore `_items` config, data.outfits and data.fitb the
                         `_outfits` / `_fitb` configs of the same version (data/downstream.py)
  init.checkpoint        '' (no pretraining: the seeded random init) or a FashionViL workdir
                         (pretraining, or a downstream run): every backbone parameter of its
                         newest checkpoint is loaded, the task head starts fresh (from the seed)
  objective.task         'retrieval' | 'tgir' | 'cls' | 'ocir'
  objective.label_fields cls: ('subcategory',) = SCR, ('category',) = CR, both = one model, two
                         heads, loss = sum of the two CEs
  objective.readout      cls: 'cls' (fusion [CLS], the paper) or 'mean' (mean of the fused
                         outputs; models/fashionvil_downstream.py says why smoke uses it)
  objective.max_items    ocir: M, query items per outfit (the blank excluded)
  objective.num_masks    ocir: K subspace masks

Losses: retrieval = ITC (symmetric InfoNCE, pretraining's itc_scale); tgir = one-directional
in-batch CE of the fused query against target vectors; cls = CE per label field; ocir = in-batch
InfoNCE of category-conditioned outfit scores. Batches: data/downstream.py.

Pretrained parameters that the downstream model has no place for are an error, except the
pseudo-attribute classifier `pac_weight` (PAC is a pretraining head; the downstream backbone is
built without it); a backbone parameter the source lacks is an error. The unused pretraining
heads (itm_head, mpfc_*, mvc_scale) are kept, so configs freeze them (and a pretrained source
maps one-to-one); the trainer's freeze regexes must also hold 'batch_stats/.*' (frozen BN).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fashion_jax.data import downstream as data_lib
from fashion_jax.losses import fashionvil as fvl
from fashion_jax.losses import fashionvil_downstream as losses
from fashion_jax.models import fashionvil_downstream as heads
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.systems import fashionvil as fashionvil_system
from fashion_jax.checkpoint import restore as checkpoint_restore

CONFIG_KEYS = ("model", "data", "init", "objective")
# Pretraining parameters without a place downstream (loaded nowhere, silently skipped).
PRETRAINING_ONLY = ("pac_weight",)


@functools.lru_cache(maxsize=4)
def read_pretrained(workdir: str) -> dict[str, np.ndarray]:
  """'/'-joined path -> host numpy array of every parameter of the newest checkpoint of a
  FashionViL run (its config.json names the system; checkpoint/restore.py reads the params).

  Read eagerly when the System is built (never inside the traced init), once per process.
  """
  name = checkpoint_restore.load_workdir_config(workdir).system
  if name not in ("fashionvil", "fashionvil_downstream"):
    raise ValueError(f"init.checkpoint={workdir!r} is a {name!r} run, not a FashionViL one.")
  params, _ = checkpoint_restore.read_params(workdir)
  return {k: np.asarray(v) for k, v in sharding_lib.flat_by_path(params).items()}


class System:
  """FashionViL fine-tuned on one downstream task (see the module docstring)."""

  @staticmethod
  def required_features(config):
    """The batch keys `loss` reads for config.objective.task (systems/base.py)."""
    task = config.objective.task
    if task == "ocir":
      return ("items", "item_cats", "item_mask", "target_image", "target_cat")
    extra = {"tgir": ("target_image",),
             "cls": tuple(f"label_{f}" for f in config.objective.get("label_fields", ()))}
    return ("image", "text", "text_mask") + extra.get(task, ())

  def __init__(self, config):
    self.config = config
    obj = config.objective
    self.task = obj.task
    if self.task not in heads.TASKS:
      raise ValueError(f"objective.task={self.task!r}; use one of {heads.TASKS}.")
    backbone_config = ml_collections.ConfigDict(config.to_dict())
    backbone_config.objective = ml_collections.ConfigDict(
        dict(mode="sample", tasks={"itc": 1.0}, itm_neg_prob=0.5, mvc_drop=0.25))
    # The pretraining system builds the backbone exactly as pretraining did (and checks the
    # tokenizer, image size and frozen BatchNorm statistics).
    self.backbone = fashionvil_system.System(backbone_config)
    self.tokenizer = self.backbone.tokenizer
    self.num_patches = self.backbone.num_patches
    self.label_fields, self.vocabularies, self.categories = (), {}, ()
    kwargs = {}
    if self.task == "cls":
      self.label_fields = tuple(obj.label_fields)
      if not self.label_fields:
        raise ValueError("objective.label_fields is empty; use ('subcategory',) and/or "
                         "('category',).")
      self.vocabularies = {f: data_lib.label_vocabulary(config, f) for f in self.label_fields}
      kwargs["num_classes"] = tuple(len(self.vocabularies[f]) for f in self.label_fields)
      kwargs["cls_readout"] = obj.get("readout", "cls")
    elif self.task == "ocir":
      self.categories = data_lib.category_vocabulary(config)
      kwargs.update(num_categories=len(self.categories), num_masks=int(obj.num_masks))
      self.max_items = int(obj.max_items)
    self.model = heads.FashionViLDownstream(vil=self.backbone.model, task=self.task, **kwargs)
    self._pretrained  # pylint: disable=pointless-statement  # Read now, outside any trace.

  # --- pretrained weights ---------------------------------------------------------------------
  @functools.cached_property
  def _pretrained(self) -> dict[str, np.ndarray]:
    path = self.config.init.get("checkpoint", "")
    return read_pretrained(path) if path else {}

  def _merge_pretrained(self, boxed):
    """boxed init params with every pretrained array put in place (module docstring).

    A pretraining checkpoint's 'params/X' goes to 'params/vil/X' (idem batch_stats); a
    downstream checkpoint's names are used as they are.
    """
    if not self._pretrained:
      return boxed
    want = sharding_lib.flat_by_path(nn.unbox(boxed))
    src = {}
    for name, x in self._pretrained.items():
      collection, _, rest = name.partition("/")
      src[name if name in want else f"{collection}/vil/{rest}"] = x
    for name, x in src.items():
      if name not in want:
        if name.split("/")[-1] in PRETRAINING_ONLY:
          continue
        raise ValueError(f"Pretrained parameter {name} {tuple(x.shape)} has no place in this "
                         f"model (init.checkpoint={self.config.init.checkpoint!r}): another "
                         "architecture (compare config.model with the pretraining run's).")
      if tuple(x.shape) != tuple(want[name].shape):
        raise ValueError(f"Pretrained parameter {name}: shape {tuple(x.shape)} != this model's "
                         f"{tuple(want[name].shape)} (config.model / data.image_size differ "
                         "from the pretraining run's).")
    missing = [n for n in want if "/vil/" in n and n not in src]
    if missing:
      raise ValueError(f"init.checkpoint={self.config.init.checkpoint!r} lacks backbone "
                       f"parameters {missing[:6]}: it is not this FashionViL architecture.")

    return sharding_lib.fill_from_host(boxed, src)

  # --- trainer interface --------------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.config.data.image_size, self.config.data.max_len
    b = {"image": np.zeros((batch_size, s, s, 3), np.uint8),
         "text": np.zeros((batch_size, l), np.int32),
         "text_mask": np.ones((batch_size, l), bool)}
    if self.task == "tgir":
      b["target_image"] = np.zeros((batch_size, s, s, 3), np.uint8)
    elif self.task == "cls":
      b.update({f"label_{f}": np.zeros((batch_size,), np.int32) for f in self.label_fields})
    elif self.task == "ocir":
      m = self.max_items
      b = {"items": np.zeros((batch_size, m, s, s, 3), np.uint8),
           "item_cats": np.zeros((batch_size, m), np.int32),
           "item_mask": np.ones((batch_size, m), bool),
           "target_image": np.zeros((batch_size, s, s, 3), np.uint8),
           "target_cat": np.zeros((batch_size,), np.int32)}
    return b

  def init(self, rng: jax.Array, batch) -> Any:
    image = batch["image"] if "image" in batch else batch["target_image"]
    b, l = image.shape[0], self.config.data.max_len
    text = batch.get("text", jnp.zeros((b, l), jnp.int32))
    mask = batch.get("text_mask", jnp.ones((b, l), bool))
    variables = self.model.init(rng, image, text, mask)
    out = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    return self._merge_pretrained(out)

  def _apply(self, params, *args, method, rng=None):
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply(params, *args, method=method, rngs=rngs)

  def loss(self, params, batch, rng, train: bool = True):
    det = not train
    if self.task == "retrieval":
      out = self._apply(params, batch["image"], batch["text"], batch["text_mask"], det,
                        method=lambda m, *a: m.vil.unimodal(*a), rng=rng)
      loss, m = fvl.itc_loss(out["image"], out["text"], out["itc_scale"])
      metrics = {**m, "scale": out["itc_scale"]}
    elif self.task == "tgir":
      q, t, s = self._apply(params, batch["image"], batch["text"], batch["text_mask"],
                            batch["target_image"], det, method=heads.FashionViLDownstream.tgir,
                            rng=rng)
      loss, metrics = losses.tgir_loss(q, t, s)
    elif self.task == "cls":
      logits = self._apply(params, batch["image"], batch["text"], batch["text_mask"], det,
                           method=heads.FashionViLDownstream.classify, rng=rng)
      loss, metrics = jnp.zeros((), jnp.float32), {}
      for f, z in zip(self.label_fields, logits):
        l, m = losses.classification_loss(z, batch[f"label_{f}"])
        loss = loss + l
        metrics.update({f"{f}/loss": l, **{f"{f}/{k}": v for k, v in m.items()}})
    else:
      items = batch["items"]
      b, m_items = items.shape[:2]

      def fwd(mod, items, target):
        v = mod.image_vector(items.reshape((-1,) + items.shape[2:]), det)
        return (v.reshape(b, m_items, -1), mod.image_vector(target, det), mod.ocir_table(),
                mod.ocir_scale)
      x, y, table, s = self._apply(params, items, batch["target_image"], method=fwd, rng=rng)
      scores = losses.ocir_scores(x, batch["item_cats"], batch["item_mask"], y,
                                  batch["target_cat"], table)
      loss, metrics = losses.ocir_loss(scores, s)
    return loss, {**metrics, "loss": loss}

  # --- evaluation interface -----------------------------------------------------------------------
  def embed_images(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> L2-normalised unimodal image vectors [B, D]."""
    return self.model.apply(params, images, method=lambda m, x: m.vil.encode_images(x))

  def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
    mask = tokens != self.tokenizer.pad_token_id
    return self.model.apply(params, tokens, mask,
                            method=lambda m, t, k: m.vil.encode_texts(t, k))

  def logit_scale(self, params) -> jax.Array:
    return jnp.square(params["params"]["vil"]["itc_scale"])

  def tgir_query(self, params, images, ids, mask) -> jax.Array:
    """Reference images uint8 [B, S, S, 3], caption ids/mask [B, L] -> L2-normalised q [B, D]."""
    return self.model.apply(params, images, ids, mask,
                            method=heads.FashionViLDownstream.tgir_query)

  def classify(self, params, images, ids, mask) -> tuple[jax.Array, ...]:
    """-> logits [B, K_f] per objective.label_fields (inference mode)."""
    return self.model.apply(params, images, ids, mask,
                            method=heads.FashionViLDownstream.classify)

  def ocir_table(self, params) -> jax.Array:
    """[C, C, D] subspace masks of every category pair (losses/fashionvil_downstream.py)."""
    return self.model.apply(params, method=heads.FashionViLDownstream.ocir_table)
