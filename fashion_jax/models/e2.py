"""E2 (Easy Regional Contrastive Learning, NeurIPS 2024): CLIP + selection tokens + fusion blocks.

The text tower is CLIP's (models/text.py). The vision tower is CLIP's ViT (models/vit.py) with
S = sum_e n_e learnable selection tokens (n_e per tag entity e, 2 in the paper) and fusion blocks:

  x = [CLS; patches] + pos_embedding                          [B, 1 + N, D]
  x = [x; sel_tokens]   (appended AFTER the position embedding: no position for them)
  x = pre_LN(x)                                               [B, 1 + N + S, D]
  for block k = 1..L:
    x = TransformerBlock_k(x)        (selection tokens take part in self-attention)
    if k in fusion_after:  x = Fusion_j(x)
  Fusion_j (own weights per block), sel = x[:, 1+N:], patches = x[:, 1:1+N] (CLS not a key):
    q = sel W_q + b_q [B, S, D];  k = patches W_k + b_k, v = patches W_v + b_v  [B, N, D]
    sim = q k^T / sqrt(D)                                     [B, S, N]
    w = hard Gumbel-softmax over the N patches (training: one_hot(argmax((sim + g) / tau)),
        g ~ Gumbel(0, 1) from the 'gumbel' rng; evaluation: one_hot(argmax(sim)), no noise),
        with the straight-through gradient of softmax((sim + g) / tau)
    sel = (w v + sel) / 2                 (each selection token averages in ONE patch value)
    the LAST fusion block also drops the patch tokens: x = [CLS; sel]   [B, 1 + S, D]
  outputs:
    embedding        = projection(post_LN(x[:, 0]))                      [B, P] (CLIP's head)
    entity_embeddings[:, e] = projection_e(LN_e(mean of ALL n_e tokens of entity e))  [B, E, P]

Deliberate choices (the paper and its reference code leave these open or get them wrong):
  * The selection tokens join the sequence BEFORE the pre-LayerNorm (after the position
    embedding, as the paper says), so pre_LN normalises them like every other token.
  * The global head reuses CLIP's post-LN and visual projection (the reference speaks of a new
    projection): an E2 initialised from CLIP starts at CLIP's global embedding, and the CLIP
    part exports unchanged as a transformers CLIPModel.
  * Every entity pools all of its tokens (the reference's last token group pools only one by an
    indexing bug).
  * The fusion projections have biases and no LayerNorm in front of them; the straight-through
    gradient is also used at evaluation (it only matters if someone differentiates there).
  * Nothing is scanned (E2Config refuses clip.scan): fusion blocks cut the vision stack into
    unequal pieces, and one per-layer layout for both towers keeps CLIP checkpoints (HF or a
    FashionCLIP run) mapping 1:1. `clip.remat_policy` rematerialises every block of both
    towers (the vision blocks one by one, between the fusion blocks) and `clip.dtype` sets
    the compute dtype of both towers and of the fusion blocks (params stay float32).

Parameter layout (the CLIP part has exactly CLIPModel's names, so interop/hf_clip.py maps it):
  vision/{patch_embed, class_embedding, pos_embedding, pre_norm, encoder/layers_i, post_norm,
  projection}  (CLIP);  vision/selection_tokens [S, D], vision/fusion_j/{query,key,value},
  vision/entity_<name>_norm, vision/entity_<name>_projection  (new);  text/..., logit_scale.
With no selection tokens and no fusion blocks the tower IS the CLIP tower, bit for bit.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import clip as clip_lib
from fashion_jax.models import layers
from fashion_jax.models import vit as vit_lib


def default_fusion_after(num_layers: int) -> tuple[int, ...]:
  """E2's layout scaled to `num_layers`: after block floor(2L/3) and after block L-1.

  For L = 12 this is (8, 11), the paper's layout; L = 4 -> (2, 3); L = 2 -> (1,).
  """
  return tuple(sorted({max(1, (2 * num_layers) // 3), max(1, num_layers - 1)}))


@dataclasses.dataclass(frozen=True)
class E2Config:
  """CLIP architecture plus E2's entities, selection tokens and fusion layout.

  entities: tag entity names, in the order of the model's entity outputs (and of
    batch['tags'] [B, E, L]).
  tokens_per_entity: selection tokens of each entity (same length as entities).
  fusion_after: 1-based block indices after which a fusion block runs, strictly increasing in
    [1, L]; () = no fusion blocks (the selection tokens then only take part in self-attention).
  gumbel_tau: temperature of the training-time Gumbel-softmax.
  """
  clip: clip_lib.CLIPConfig
  entities: tuple[str, ...] = ("brand", "season", "subcategory", "composition")
  tokens_per_entity: tuple[int, ...] = (2, 2, 2, 2)
  fusion_after: tuple[int, ...] = (8, 11)
  gumbel_tau: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "entities", tuple(self.entities))
    object.__setattr__(self, "tokens_per_entity", tuple(int(n) for n in self.tokens_per_entity))
    object.__setattr__(self, "fusion_after", tuple(int(k) for k in self.fusion_after))
    if self.clip.scan:
      raise ValueError("E2 does not scan its vision tower (fusion blocks split the stack): "
                       "set scan=False (remat_policy still applies).")
    if len(set(self.entities)) != len(self.entities):
      raise ValueError(f"entities {self.entities} contain duplicates.")
    for e in self.entities:
      if not e or not e.replace("_", "").isalnum():
        raise ValueError(f"entity name {e!r} must be a non-empty identifier (it names params).")
    if len(self.tokens_per_entity) != len(self.entities):
      raise ValueError(f"tokens_per_entity={self.tokens_per_entity} must give one count per "
                       f"entity of {self.entities}.")
    if any(n < 1 for n in self.tokens_per_entity):
      raise ValueError(f"tokens_per_entity={self.tokens_per_entity}: every entity needs >= 1 "
                       "selection token (remove the entity instead).")
    num_layers = self.clip.vision.num_layers
    f = self.fusion_after
    if any(k < 1 or k > num_layers for k in f) or list(f) != sorted(set(f)):
      raise ValueError(f"fusion_after={f} must be strictly increasing block indices in "
                       f"[1, {num_layers}] (1-based: 8 = after the 8th block).")
    if f and not self.entities:
      raise ValueError(f"fusion_after={f} needs selection tokens: no entities are configured.")
    if self.gumbel_tau <= 0:
      raise ValueError(f"gumbel_tau={self.gumbel_tau} must be positive.")

  @property
  def num_selection_tokens(self) -> int:
    return sum(self.tokens_per_entity)

  def entity_slices(self) -> list[tuple[str, int, int]]:
    """(entity, start, stop) of each entity's tokens within the selection tokens."""
    out, start = [], 0
    for e, n in zip(self.entities, self.tokens_per_entity):
      out.append((e, start, start + n))
      start += n
    return out

  def replace(self, **kw) -> "E2Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "E2Config":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"Unknown E2Config fields {sorted(unknown)}.")
    d["clip"] = clip_lib.CLIPConfig.from_dict(d["clip"])
    return cls(**d)


def e2_config(clip: clip_lib.CLIPConfig, *, entities: Sequence[str] = (
    "brand", "season", "subcategory", "composition"), tokens_per_entity: int | Sequence[int] = 2,
              fusion_after: Optional[Sequence[int]] = None, gumbel_tau: float = 1.0) -> E2Config:
  """E2Config with an int token count for every entity and the scaled default fusion layout."""
  entities = tuple(entities)
  if isinstance(tokens_per_entity, int):
    tokens_per_entity = (tokens_per_entity,) * len(entities)
  if fusion_after is None:
    fusion_after = default_fusion_after(clip.vision.num_layers) if entities else ()
  return E2Config(clip=clip.replace(scan=False), entities=entities,
                  tokens_per_entity=tuple(tokens_per_entity), fusion_after=tuple(fusion_after),
                  gumbel_tau=gumbel_tau)


def straight_through_select(sim: jax.Array, tau: float, noise_rng: Optional[jax.Array]
                            ) -> jax.Array:
  """Hard one-hot choice over the last axis with a straight-through Gumbel-softmax gradient.

    y_soft = softmax((sim + g) / tau),  g ~ Gumbel(0, 1) (g = 0 when noise_rng is None)
    forward:  y = one_hot(argmax(y_soft))        (exactly one 1 per row)
    backward: dy/dsim = d y_soft / d sim        (y = hard + (y_soft - stop_gradient(y_soft)))

  sim: [..., N] float32 similarities. Returns [..., N] float32. The noise is drawn from
  `noise_rng` over the full global shape, so it does not depend on how `sim` is sharded.
  """
  sim = sim.astype(jnp.float32)
  if noise_rng is not None:
    sim = sim + jax.random.gumbel(noise_rng, sim.shape, jnp.float32)
  y_soft = jax.nn.softmax(sim / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(y_soft, axis=-1), sim.shape[-1], dtype=jnp.float32)
  # Parenthesised so that the forward value is exactly `hard` (soft - soft == 0 in floats).
  return hard + (y_soft - jax.lax.stop_gradient(y_soft))


class FusionBlock(nn.Module):
  """One E2 fusion block: each selection token picks one patch and averages its value in.

  __call__(sel [B, S, D], patches [B, N, D], deterministic) -> (sel' [B, S, D], w [B, S, N]).
  Sub-modules `query`, `key`, `value` (Dense D -> D with bias). See the module docstring.
  """
  tau: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, sel: jax.Array, patches: jax.Array, deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array]:
    d = sel.shape[-1]

    def dense(name, axes):
      return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=nn.with_logical_partitioning(
                          nn.initializers.xavier_uniform(), axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (axes[1],)))
    q = dense("query", ("embed", "mlp"))(sel)        # [B, S, D]
    k = dense("key", ("embed", "mlp"))(patches)      # [B, N, D]
    v = dense("value", ("mlp", "embed"))(patches)    # [B, N, D]
    sim = jnp.einsum("bsd,bnd->bsn", q, k).astype(jnp.float32) / math.sqrt(d)
    rng = None if deterministic else self.make_rng("gumbel")
    w = straight_through_select(sim, self.tau, rng)  # [B, S, N]
    picked = jnp.einsum("bsn,bnd->bsd", w.astype(self.dtype), v)
    return (picked + sel) / 2, w


class _Blocks(nn.Module):
  """The ViT's transformer blocks `layers_0..L-1`, callable on any contiguous range."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  act: str
  dtype: Any
  param_dtype: Any
  remat_policy: str
  attention_impl: str = "einsum"

  def setup(self):
    block_cls = layers.TransformerBlock
    if self.remat_policy != "none":
      if self.remat_policy not in layers.REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {self.remat_policy!r}: expected 'none' or one "
                         f"of {', '.join(layers.REMAT_POLICIES)}.")
      block_cls = nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                           static_argnums=(3,))
    self.layers = [block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True,
                             layer_norm_eps=self.layer_norm_eps, act=self.act, dtype=self.dtype,
                             param_dtype=self.param_dtype, attention_impl=self.attention_impl)
                   for _ in range(self.num_layers)]

  def __call__(self, x: jax.Array, start: int, stop: int, deterministic: bool = True):
    for i in range(start, stop):
      x = self.layers[i](x, None, deterministic)
    return x


class E2VisionTransformer(nn.Module):
  """The E2 image tower: images [B, H, W, 3] -> dict (float32):

    embedding [B, P] (global, not normalised), pooled [B, D] (post-LN CLS),
    tokens [B, T, D] (last hidden states: T = 1 + N + S without fusion blocks, 1 + S after a
      patch-dropping fusion block), entity_embeddings [B, E, P] (not normalised; absent without
      entities), selections [F, B, S, N] (each fusion block's one-hot patch choices; absent
      without fusion blocks).
  """
  config: E2Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
    e2 = self.config
    cfg = e2.clip.vision
    # CLIP's stem, with vit.VisionTransformer's parameter names, order and initialisers: the
    # same rng gives the same CLIP parameters.
    x = vit_lib.embed_patches(self, cfg, images)
    b, n = x.shape[0], x.shape[1] - 1
    s = e2.num_selection_tokens
    if s:
      sel = self.param("selection_tokens", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.width ** -0.5), (None, "embed")), (s, cfg.width),
                       self.param_dtype)
      x = jnp.concatenate([x, jnp.broadcast_to(sel.astype(self.dtype)[None],
                                               (b, s, cfg.width))], axis=1)
    x = nn.with_logical_constraint(x, layers.HIDDEN_AXES)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "pre_norm")(x)
    blocks = _Blocks(num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                     layer_norm_eps=cfg.layer_norm_eps, act=cfg.act, dtype=self.dtype,
                     param_dtype=self.param_dtype, remat_policy=e2.clip.remat_policy,
                     attention_impl=e2.clip.attention_impl, name="encoder")
    done, selections = 0, []
    for j, after in enumerate(e2.fusion_after):
      x = blocks(x, done, after, deterministic)
      done = after
      last = j == len(e2.fusion_after) - 1
      patches = x[:, 1:1 + n]
      sel, w = FusionBlock(tau=e2.gumbel_tau, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"fusion_{j}")(x[:, x.shape[1] - s:], patches, deterministic)
      selections.append(w)
      parts = [x[:, :1], sel] if last else [x[:, :1 + n], sel]
      x = nn.with_logical_constraint(jnp.concatenate(parts, axis=1), layers.HIDDEN_AXES)
    x = blocks(x, done, cfg.num_layers, deterministic)
    pooled = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype,
                               "post_norm")(x[:, 0])
    out = {"tokens": x.astype(jnp.float32), "pooled": pooled.astype(jnp.float32)}
    proj_dim = e2.clip.projection_dim

    def projection(name):
      return nn.Dense(proj_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name, kernel_init=nn.with_logical_partitioning(
                          nn.initializers.normal(cfg.width ** -0.5), ("embed", None)))

    out["embedding"] = projection("projection")(pooled).astype(jnp.float32)
    if s:
      sel_out = x[:, x.shape[1] - s:]
      ents = []
      for name, start, stop in e2.entity_slices():
        h = jnp.mean(sel_out[:, start:stop], axis=1)  # ALL of the entity's tokens.
        h = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype,
                              f"entity_{name}_norm")(h)
        ents.append(projection(f"entity_{name}_projection")(h))
      out["entity_embeddings"] = jnp.stack(ents, axis=1).astype(jnp.float32)
    if selections:
      out["selections"] = jnp.stack(selections)
    return out


class E2Model(clip_lib.CLIPModel):
  """E2 dual encoder. Sub-modules `vision` (E2VisionTransformer), `text`; param `logit_scale`.

  __call__(images [B, H, W, 3], ids [B, L], tag_ids [B, E, L] | None, deterministic) -> dict:
    image_embeds [B, P], text_embeds [B, P] (L2-normalised), logit_scale (exp, as CLIPModel),
    entity_image_embeds [B, E, P] and (given tag_ids) entity_text_embeds [B, E, P] (the CLIP
    text tower on each entity's tag string), both L2-normalised; selections [F, B, S, N].
  Training (deterministic=False) draws Gumbel noise from the 'gumbel' rng.
  """
  config: E2Config

  # CLIPModel's setup, encode_images, encode_texts and logit_scale, with the E2 vision tower: the
  # same parameter names and creation order as a CLIPModel.
  def clip_config(self) -> clip_lib.CLIPConfig:
    return self.config.clip

  def make_vision(self, cfg: clip_lib.CLIPConfig, dtype: Any) -> nn.Module:
    del cfg
    return E2VisionTransformer(self.config, dtype=dtype)

  def encode_entities(self, images: jax.Array, normalize: bool = True,
                      deterministic: bool = True) -> jax.Array:
    """Per-entity image embeddings [B, E, P] float32."""
    out = self.vision(images, deterministic)
    if "entity_embeddings" not in out:
      raise ValueError("This E2 model has no entities, hence no entity embeddings.")
    e = out["entity_embeddings"]
    return clip_lib.l2_normalize(e) if normalize else e

  def encode_image_views(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """[B, H, W, 3] -> L2-normalised float32 [B, 1 + E, P]: row 0 the global embedding
    (encode_images), rows 1.. the entity embeddings (encode_entities), from ONE tower pass."""
    out = self.vision(images, deterministic)
    views = [clip_lib.l2_normalize(out["embedding"]).astype(jnp.float32)[:, None]]
    if "entity_embeddings" in out:
      views.append(clip_lib.l2_normalize(out["entity_embeddings"]).astype(jnp.float32))
    return jnp.concatenate(views, axis=1)

  def __call__(self, images: jax.Array, ids: jax.Array, tag_ids: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    v = self.vision(images, deterministic)
    out = {"image_embeds": clip_lib.l2_normalize(v["embedding"]),
           "text_embeds": self.encode_texts(ids, deterministic=deterministic),
           "logit_scale": self.logit_scale()}
    if "entity_embeddings" in v:
      out["entity_image_embeds"] = clip_lib.l2_normalize(v["entity_embeddings"])
    if "selections" in v:
      out["selections"] = v["selections"]
    if tag_ids is not None:
      if tag_ids.ndim != 3 or tag_ids.shape[1] != len(self.config.entities):
        raise ValueError(f"tag_ids must be [B, E={len(self.config.entities)}, L] (one row per "
                         f"entity {self.config.entities}), got shape {tag_ids.shape}.")
      out["entity_text_embeds"] = self.encode_texts(tag_ids, deterministic=deterministic)
    return out


def dummy_inputs(config: E2Config, batch_size: int = 1):
  """Zero images [B, S, S, 3] uint8, ids [B, max_len] int32 and tag ids [B, E, max_len]."""
  images, ids = clip_lib.dummy_inputs(config.clip, batch_size)
  return images, ids, jnp.zeros((batch_size, len(config.entities), ids.shape[1]), jnp.int32)


def init_params(config: E2Config, rng: jax.Array) -> Any:
  """Boxed 'params' of E2Model(config) (run under jax.eval_shape or jit(out_shardings=...))."""
  images, ids, tags = dummy_inputs(config)
  return E2Model(config).init(rng, images, ids, tags if config.entities else None)["params"]


# The E2 additions, as a regex over '/'-joined param paths (for freezing everything else).
NEW_PARAM_REGEX = r"vision/(selection_tokens|fusion_\d+/.*|entity_[^/]+/.*)"


def is_new_param(vision_key: str) -> bool:
  """Whether a top-level key of params['vision'] is an E2 addition (not part of CLIP)."""
  return (vision_key == "selection_tokens" or vision_key.startswith("fusion_")
          or vision_key.startswith("entity_"))


def clip_part(params: Mapping[str, Any]) -> dict:
  """The plain CLIPModel params inside E2 params (the E2 additions removed)."""
  vision = {k: v for k, v in params["vision"].items() if not is_new_param(k)}
  return {"vision": vision, "text": params["text"], "logit_scale": params["logit_scale"]}
