"""E2: CLIP + selection tokens + fusion blocks, trained with global + regional InfoNCE.

    loss = (1 - w) InfoNCE(global image, text) + w mean_e InfoNCE(entity image_e, tag text_e)
    (w = objective.regional_weight, 0.5 in the paper; both over the global batch)

Config keys this system reads (besides the trainer's and the pipeline's `data`):
  model.variant, projection_dim, vision, text, dtype, scan (must be False), remat_policy
                           as for FashionCLIP (systems/fashionclip.py): the CLIP architecture
  model.entities           tag entity names, e.g. ('brand', 'season', 'subcategory',
                           'composition'); () = no selection tokens (plain CLIP). Must equal
                           data.tag_fields, which makes the pipeline emit batch['tags'] [B, E, L]
  model.tokens_per_entity  int (every entity) or one int per entity (2 in the paper)
  model.fusion_after       1-based blocks followed by a fusion block; None = the paper's layout
                           scaled to the tower (after 8 and 11 of 12); () = no fusion blocks
  model.gumbel_tau         Gumbel-softmax temperature (1 in the paper)
  objective.regional_weight  w above; 0 = no regional loss (the tags are not even encoded)
  objective.false_negatives  'mask' | 'negatives' (losses/regional.py explains both)
  objective.tag_max_len    tag texts are cut to this many tokens before the text tower (tags are
                           a few words; the pipeline pads them to data.max_len). A row whose EOS
                           falls beyond the cut gets EOS at its last kept position, which is
                           exactly what the tokenizer's truncation would give (the text tower is
                           causal, so the kept prefix is unchanged)
  init.hf_clip_dir         '' or a local HF CLIPModel directory: the CLIP part starts from it
  init.checkpoint          '' or a workdir of an earlier run (FashionCLIP, E2 stage 1, ...): every
                           parameter it holds (newest step) starts from it
  In both cases the E2 additions missing from the source start fresh (from the seed); at most
  one of the two may be set.

Memory and speed levers (tests/test_levers_systems.py proves each changes the loss and the
gradients only by rounding): model.remat_policy (every block of both towers), model.dtype =
'bfloat16' (float32 params, gradients and AdamW state), mesh.fsdp / mesh.tensor (params and
optimizer state sharded by their logical axes; a train step on fsdp=8 or fsdp=2 x tensor=4
equals one device). model.scan is refused (config error naming remat_policy): the fusion blocks
split the vision stack. grad_accum_steps runs but is NOT the same objective: both InfoNCE terms
see only the micro-batch's negatives and each micro-batch draws its own Gumbel noise
(train/step.py); FashionCLIP's exact encode_chunks / loss_blocks are not implemented for E2.

Pretrained weights are merged inside `init`: the host reads them once (cached), and each array
enters the jitted, sharded init through `jax.pure_callback`, so the trainer needs no special
path, every mesh gets the same values, and nothing is baked into the compiled program.

Batches: 'image' uint8 [B, S, S, 3], 'text' int32 [B, L], 'tags' int32 [B, E, L] (each entity's
tag string tokenised on its own; rows equal to the tokenised '' are unknown tags and are left out
of that entity's loss).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.data import tokenizers
from fashion_jax.interop import e2_torch
from fashion_jax.losses import contrastive
from fashion_jax.losses import regional
from fashion_jax.models import e2 as e2_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.systems import fashionclip
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.interop import hf_clip

CONFIG_KEYS = ("model", "data", "init", "objective")


def model_config(config) -> e2_lib.E2Config:
  """The E2Config of a run, from config.model / data / init (CLIP part as for FashionCLIP)."""
  m = config.model
  if m.get("scan", False):
    raise ValueError("config.model.scan=True: E2's vision tower is never scanned (fusion "
                     "blocks split it); set scan=False and use remat_policy for memory.")
  clip_cfg = fashionclip.model_config(config)
  entities = tuple(m.get("entities", ()))
  tag_fields = tuple(config.data.get("tag_fields", ()))
  if tag_fields != entities and config.objective.regional_weight > 0:
    raise ValueError(f"config.data.tag_fields={tag_fields} must equal config.model.entities="
                     f"{entities}: the pipeline's batch['tags'] rows are the entities' texts.")
  fusion_after = m.get("fusion_after", None)
  return e2_lib.e2_config(clip_cfg, entities=entities,
                          tokens_per_entity=m.get("tokens_per_entity", 2),
                          fusion_after=None if fusion_after is None else tuple(fusion_after),
                          gumbel_tau=float(m.get("gumbel_tau", 1.0)))


def _read_checkpoint(workdir: str) -> dict[str, np.ndarray]:
  """'/'-joined path -> numpy array of every param of the newest checkpoint of `workdir`.

  Host numpy arrays verified against the checkpoint's fingerprints (checkpoint/restore.py
  read_params, which also works while the init is being traced); read-only: another run's.
  """
  params, _ = checkpoint_restore.read_params(workdir)
  return {k: np.asarray(v) for k, v in sharding_lib.flat_by_path(params).items()}


class System:
  """E2 as a fashion_jax system (see systems/base.py), with per-entity embeddings."""

  @staticmethod
  def required_features(config):
    """The batch keys `loss` reads (systems/base.py): tags only for the regional loss."""
    tags = {"tags": "the regional loss (objective.regional_weight > 0)"}
    return {"image": "", "text": "", **(tags if config.objective.regional_weight > 0 else {})}

  def __init__(self, config):
    self.config = config
    obj = config.objective
    if not 0.0 <= obj.regional_weight <= 1.0:
      raise ValueError(f"objective.regional_weight={obj.regional_weight} must be in [0, 1].")
    if obj.get("tag_max_len", 2) < 2:
      raise ValueError(f"objective.tag_max_len={obj.tag_max_len} must be >= 2 (BOS + EOS).")
    if obj.false_negatives not in regional.FALSE_NEGATIVES:
      raise ValueError(f"objective.false_negatives={obj.false_negatives!r} not in "
                       f"{regional.FALSE_NEGATIVES}.")
    if config.init.get("hf_clip_dir") and config.init.get("checkpoint"):
      raise ValueError("Set at most one of init.hf_clip_dir and init.checkpoint.")
    self.model_config = model_config(config)
    if obj.regional_weight > 0 and not self.model_config.entities:
      raise ValueError(f"objective.regional_weight={obj.regional_weight} needs entities "
                       "(config.model.entities is empty).")
    self.model = e2_lib.E2Model(self.model_config)
    self.tokenizer = tokenizers.get_tokenizer(
        config.data.tokenizer.kind, config.data.tokenizer.path, config.data.max_len)
    self.empty_tag_ids = np.asarray(self.tokenizer([""])[0], np.int32)
    if config.data.image_size != self.model_config.clip.vision.image_size:
      raise ValueError(f"data.image_size={config.data.image_size} but the vision tower takes "
                       f"{self.model_config.clip.vision.image_size} px images.")

  @property
  def uses_tags(self) -> bool:
    return self.config.objective.regional_weight > 0

  # --- pretrained weights ---------------------------------------------------------------------
  @functools.cached_property
  def _pretrained(self) -> dict[str, np.ndarray]:
    """'/'-joined param path -> numpy array from init.hf_clip_dir or init.checkpoint ({} if
    neither). Read once, on the host."""
    init = self.config.init
    if init.get("hf_clip_dir"):
      _, params = hf_clip.load_clip(init.hf_clip_dir, dtype=self.model_config.clip.dtype)
      return sharding_lib.flat_by_path(params)
    if init.get("checkpoint"):
      return _read_checkpoint(init.checkpoint)
    return {}

  def pretrained_arrays(self) -> dict[str, np.ndarray]:
    """The flat pretrained arrays ('/'-joined path -> numpy); {} for a random init.

    Deliberately not named `pretrained_params` (the trainer's hook for a COMPLETE host tree):
    E2's pretrained values enter through `init`, so the new parameters keep their seeded random
    init and every caller of `init` (eval_shape, sharded init, load_params) sees the same.
    """
    return dict(self._pretrained)

  def _merge_pretrained(self, boxed):
    src = self._pretrained
    if not src:
      return boxed
    want = sharding_lib.flat_by_path(nn.unbox(boxed))
    for name, x in src.items():
      if name not in want:
        if name.startswith("vision/") and e2_lib.is_new_param(name.split("/")[1]):
          continue  # An E2 addition this model does not have (e.g. an entity ablated).
        raise ValueError(f"Pretrained parameter {name} {x.shape} has no place in this E2 "
                         f"model; the source is another architecture.")
      if tuple(x.shape) != tuple(want[name].shape):
        raise ValueError(f"Pretrained parameter {name}: shape {x.shape} != this model's "
                         f"{tuple(want[name].shape)}.")
    missing = [n for n in want if n not in src and not (
        n.startswith("vision/") and e2_lib.is_new_param(n.split("/")[1]))]
    if missing:
      raise ValueError(f"The pretrained source lacks CLIP parameters {missing[:8]}: it is not "
                       "this CLIP architecture.")

    return sharding_lib.fill_from_host(boxed, src)

  # --- trainer interface --------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.model_config.clip.vision.image_size, self.config.data.max_len
    out = {"image": np.zeros((batch_size, s, s, 3), np.uint8),
           "text": np.zeros((batch_size, l), np.int32)}
    if self.uses_tags:
      out["tags"] = np.zeros((batch_size, len(self.model_config.entities), l), np.int32)
    return out

  def init(self, rng: jax.Array, batch) -> Any:
    tags = None
    if self.model_config.entities:
      tags = jnp.zeros((batch["image"].shape[0], len(self.model_config.entities),
                        batch["text"].shape[1]), jnp.int32)
    params = self.model.init(rng, batch["image"], batch["text"], tags)["params"]
    return self._merge_pretrained(params)

  def crop_tags(self, tags: jax.Array) -> jax.Array:
    """int [B, E, L] -> [B, E, min(L, tag_max_len)], EOS kept (see objective.tag_max_len)."""
    t = int(self.config.objective.get("tag_max_len", tags.shape[-1]))
    if t >= tags.shape[-1]:
      return tags
    eos = self.model_config.clip.text.eos_token_id
    kept = tags[..., :t]
    has_eos = jnp.any(kept == eos, axis=-1)
    return kept.at[..., t - 1].set(jnp.where(has_eos, kept[..., t - 1], eos))

  def loss(self, params, batch, rng, train: bool = True):
    tags = self.crop_tags(batch["tags"]) if self.uses_tags else None
    out = self.model.apply({"params": params}, batch["image"], batch["text"], tags,
                           deterministic=not train, rngs={"gumbel": rng})
    scale = out["logit_scale"]
    global_loss, m = contrastive.info_nce(out["image_embeds"], out["text_embeds"], scale)
    metrics = {"global_loss": global_loss, "i2t_acc": m["a2b_acc"], "t2i_acc": m["b2a_acc"],
               "logit_scale": scale}
    loss = global_loss
    if self.uses_tags:
      w = self.config.objective.regional_weight
      reg, rm = regional.regional_loss(
          out["entity_image_embeds"], out["entity_text_embeds"], scale, tags,
          self.model_config.entities, false_negatives=self.config.objective.false_negatives,
          empty_tag_ids=jnp.asarray(self.empty_tag_ids[:tags.shape[-1]]))
      loss = (1 - w) * global_loss + w * reg
      metrics["regional_loss"] = reg
      metrics.update({f"regional/{k}": v for k, v in rm.items()})
    metrics["loss"] = loss
    return loss, metrics

  # --- two-tower interface (evaluators, product search) -------------------------------------
  def embed_images(self, params, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, method=self.model.encode_images)

  def embed_entities(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> L2-normalised float32 [B, E, P], entities in model order."""
    return self.model.apply({"params": params}, images, method=self.model.encode_entities)

  @property
  def entities(self) -> tuple[str, ...]:
    """The entity names, in the order of embed_entities / embed_image_views rows."""
    return self.model_config.entities

  def embed_image_views(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> L2-normalised float32 [B, 1 + E, P]: the global embedding
    (embed_images) then each entity's (embed_entities), from one pass of the vision tower."""
    return self.model.apply({"params": params}, images, method=self.model.encode_image_views)

  def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, tokens, method=self.model.encode_texts)

  def logit_scale(self, params) -> jax.Array:
    return self.model.apply({"params": params}, method=self.model.logit_scale)

  # --- export ---------------------------------------------------------------------------------
  def export(self, params, out_dir: str, overwrite: bool = False):
    """E2Torch files (model.safetensors, e2_config.json) plus clip/, the CLIP part as a
    transformers CLIPModel directory with the run's tokenizer (interop/e2_torch.py)."""
    return e2_torch.export_e2(out_dir, self.model_config, params, tokenizer=self.tokenizer.hf,
                              overwrite=overwrite)
