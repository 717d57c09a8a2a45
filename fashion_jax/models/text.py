"""The text transformer of the CLIP and SigLIP text towers (FashionCLIP, E2, SigLIP).

CLIP (the defaults; transformers' CLIPTextModel + text_projection):
  ids [B, L] (L <= max_len) -> token embedding + position embedding [B, L, D]
  -> Encoder (pre-LN blocks, causal mask, AND the padding mask when one is given)
  -> final LayerNorm: tokens [B, L, D] -> the token at the EOS position: pooled [B, D]
  -> projection (no bias): embedding [B, P]
SigLIP (causal=False, pool='last', projection_bias=True; transformers' SiglipTextModel):
  the same, with a bidirectional encoder (the padding mask only when one is given), the LAST
  token pooled (pool='last': position L - 1, whatever it holds) and a projection with a bias.
  SigLIP was trained on ids padded to max_len with pad = EOS and no padding mask, so the pooled
  token is an EOS that attended to the whole text (the api tokenizes that way).

EOS pooling (pool='eos') follows transformers' CLIPTextTransformer exactly:
  - eos_token_id == 2 (the legacy value in OpenAI-converted configs): position argmax(ids), which
    is the EOS token only because it has the largest id of the original vocabulary;
  - otherwise: the first position where ids == eos_token_id (pad may equal EOS, so the FIRST one).
    A row without an EOS pools position 0, as HF's argmax over all-False does.
With the causal mask, tokens after the EOS (padding) never influence the pooled vector.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import layers

LEGACY_EOS_TOKEN_ID = 2
POOLS = ("eos", "last")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Architecture of the text tower (CLIP's by default; module docstring for SigLIP's).

  bos_token_id and pad_token_id do not change the forward pass; they are carried so that an
  exported transformers config says what the tokenizer does (None: the tokenizer has none).
  causal: the causal mask (CLIP) or none (SigLIP). pool: 'eos' or 'last' (POOLS).
  projection_bias: the output projection has a bias (SigLIP's `head`).
  """
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  vocab_size: int = 49408
  max_len: int = 77
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  bos_token_id: Optional[int] = 49406
  pad_token_id: Optional[int] = 1
  causal: bool = True
  pool: str = "eos"
  projection_bias: bool = False

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f"Unknown text pool {self.pool!r}; expected one of {POOLS}.")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}.")
    layers.activation(self.act)  # Validates the name.


TEXT_VARIANTS = {
    # name: (width, layers, heads, mlp_dim)  -- the text towers paired with each CLIP ViT.
    "tiny": (64, 2, 4, 256),
    "S/16": (384, 12, 6, 1536),
    "B/32": (512, 12, 8, 2048),
    "B/16": (512, 12, 8, 2048),
    "L/14": (768, 12, 12, 3072),
}


def text_config(variant: str, **overrides) -> TextConfig:
  """TextConfig of a named variant (the tower paired with that ViT), any field overridden."""
  if variant not in TEXT_VARIANTS:
    raise ValueError(f"Unknown text variant {variant!r}; expected one of {list(TEXT_VARIANTS)}.")
  w, l, h, m = TEXT_VARIANTS[variant]
  fields = dict(width=w, num_layers=l, num_heads=h, mlp_dim=m)
  fields.update(overrides)
  return TextConfig(**fields)


def eos_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B, L] int ids -> [B] int32 pooling positions (see the module docstring)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(ids == eos_token_id, axis=-1).astype(jnp.int32)


class TextTransformer(nn.Module):
  """Text tower: ids [B, L] -> {'embedding' [B, P], 'pooled' [B, D], 'tokens' [B, L, D]}.

  'tokens' are after the final LayerNorm (as HF's last_hidden_state), 'pooled' the token at the
  EOS position (pool='eos') or the last one (pool='last'), 'embedding' its projection (not
  normalised; absent when output_dim is None).
  `attention_mask` [B, L] (1 = token, 0 = padding) is optional. Outputs are float32.
  """
  config: TextConfig
  output_dim: Optional[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"  # layers.ATTENTION_IMPLS.
  seq_pad_multiple: int = 0  # layers.Encoder: pad the tokens once per tower (0: never).
  # The last layer computes the pooled token only (layers.Encoder's pool_index): 'tokens' is
  # then absent.
  pooled_last_layer: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array, attention_mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    cfg = self.config
    if ids.ndim != 2:
      raise ValueError(f"Expected token ids [B, L], got shape {ids.shape}.")
    length = ids.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"Token sequence length {length} exceeds the context max_len="
                       f"{cfg.max_len}; truncate with the tokenizer (max_length={cfg.max_len}).")
    ids = nn.with_logical_constraint(ids, ("act_batch", "act_length"))
    x = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="token_embedding", embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(0.02), ("vocab", "embed")))(ids)
    pos = self.param("pos_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, "embed")), (cfg.max_len, cfg.width),
                     self.param_dtype)
    x = x + pos[:length].astype(self.dtype)[None]
    x = nn.with_logical_constraint(x, layers.HIDDEN_AXES)
    # The causal mask (CLIP) is the Encoder's `causal` flag (fused kernels have a causal mode).
    mask = None
    if attention_mask is not None:
      # Padding masks keys only (as HF does): a padded query row still sees the real tokens
      # before it, so no row is ever fully masked.
      mask = (attention_mask > 0)[:, None, None, :]
    position = (jnp.full(ids.shape[:1], length - 1, jnp.int32) if cfg.pool == "last"
                else eos_positions(ids, cfg.eos_token_id))
    x = layers.Encoder(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, pre_norm=True,
        layer_norm_eps=cfg.layer_norm_eps, act=cfg.act, dtype=self.dtype,
        param_dtype=self.param_dtype, scan=self.scan, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl,
        seq_pad_multiple=self.seq_pad_multiple, causal=cfg.causal,
        name="encoder")(x, mask, deterministic, position if self.pooled_last_layer else None)
    x = layers.layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_norm")(x)
    if self.pooled_last_layer:  # x: the pooled token [B, D].
      pooled = x
    else:
      pooled = jnp.take_along_axis(x, position[:, None, None], axis=1)[:, 0]
    out = {"pooled": pooled.astype(jnp.float32)}
    if not self.pooled_last_layer:
      out["tokens"] = x.astype(jnp.float32)
    if self.output_dim is not None:
      out["embedding"] = nn.Dense(
          self.output_dim, use_bias=cfg.projection_bias, dtype=self.dtype,
          param_dtype=self.param_dtype, name="projection",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.normal(cfg.width ** -0.5), ("embed", None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(
              pooled).astype(jnp.float32)
    return out
