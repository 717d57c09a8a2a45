"""BERT encoder (text encoder and single-stream fusion encoder) built on models/layers.py.

  embed_text:  e = word[ids] + position[pos] + type[type_ids]                         [B, L, D]
  encode:      h = Encoder(Dropout(LayerNorm(e)), mask)   post-LN blocks, exact GELU   [B, L, D]
  pool:        p = tanh(Dense(h[:, 0]))                                                [B, D]
  mlm_logits:  z = LayerNorm(gelu(Dense(h))) @ word^T + mlm_bias                       [..., V]

Fusion models (FashionViL, FashionBERT) build their own image-token embeddings (projected
features + their own position / type embeddings), concatenate them with `embed_text(...)` along
the length axis and call `encode` on the result: the embedding LayerNorm is applied in `encode`,
i.e. to the concatenated sequence, which is what both references do (MMF's visual BERT
embeddings and EasyTransfer's image BERT normalise the joint sequence with BERT's embedding LN).
So `encode(embed_text(ids, type_ids), mask)` is exactly transformers' BertModel.

`mask` is [B, L] (1/True = token, 0 = padding): only the keys are masked, as in BERT, so padded
positions still produce (unused) outputs, equal to torch's. A [B, 1 or H, L, L] boolean mask
(True = may attend) is used as given (e.g. FashionViL's MVC drops tokens per query).

Parameter tree (params, float32; `encoder/layers_{i}` or, with scan, `encoder/layers` with a
leading [num_layers] axis; see layers.py for the block's sub-tree):
  word_embeddings/embedding [V, D] (vocab, embed)   position_embeddings/embedding [P, D]
  type_embeddings/embedding [T, D]                   embeddings_norm/{scale, bias} [D]
  encoder/...                                        pooler/{kernel [D, D], bias}   (with_pooler)
  mlm_transform/{kernel [D, D], bias}, mlm_norm/{scale, bias}, mlm_bias [V]        (with_mlm_head)
The MLM decoder has no weight of its own: it is tied to word_embeddings (`Embed.attend`).
Initialisation as BERT: every kernel and embedding ~ N(0, initializer_range^2), biases 0, LN 1/0.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fashion_jax.models import layers

# (hidden size, layers, heads, MLP width).
VARIANTS = {
    "tiny": (128, 2, 2, 512),      # google/bert_uncased_L-2_H-128_A-2 shape.
    "mini": (256, 4, 4, 1024),     # google/bert_uncased_L-4_H-256_A-4 shape.
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


class Bert(nn.Module):
  """BERT with pooler and tied MLM head; see the module docstring for the formulas and tree.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, mlp_dim: the usual BERT sizes.
    max_position: rows of the learned position table (512); longer inputs raise ValueError.
    type_vocab_size: rows of the token-type (segment) table.
    layer_norm_eps: 1e-12 in BERT.
    act: 'gelu' (exact erf, BERT), 'gelu_tanh' or 'quick_gelu'; also used by the MLM transform.
    dropout_rate: on embeddings and every sub-layer output (hidden_dropout_prob).
    attention_dropout_rate: on attention probabilities (attention_probs_dropout_prob).
    pad_token_id: id of [PAD]; carried into exported configs (the forward pass masks padding
      with `mask`, not by id).
    initializer_range: std of the normal initialiser.
    with_pooler / with_mlm_head: create (and import/export) those heads.
    dtype: compute dtype; param_dtype: storage dtype (float32).
    scan, remat_policy: passed to layers.Encoder.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  act: str = "gelu"
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pad_token_id: int = 0
  initializer_range: float = 0.02
  with_pooler: bool = True
  with_mlm_head: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"

  def setup(self):
    init = nn.initializers.normal(self.initializer_range)

    def embed(rows, axes):
      return nn.Embed(rows, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=nn.with_logical_partitioning(init, axes))

    def dense(axes):
      return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(init, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

    self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(self.max_position, (None, "embed"))
    self.type_embeddings = embed(self.type_vocab_size, (None, "embed"))
    self.embeddings_norm = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype,
                                             None)
    self.embeddings_dropout = nn.Dropout(self.dropout_rate)
    self.encoder = layers.Encoder(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        pre_norm=False, layer_norm_eps=self.layer_norm_eps, act=self.act,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, scan=self.scan,
        remat_policy=self.remat_policy)
    if self.with_pooler:
      self.pooler = dense(("embed", "mlp"))
    if self.with_mlm_head:
      self.mlm_transform = dense(("embed", "mlp"))
      self.mlm_norm = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, None)
      self.mlm_bias = self.param(
          "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
          (self.vocab_size,), self.param_dtype)

  def embed_text(self, ids: jax.Array, type_ids: Optional[jax.Array] = None,
                 position_ids: Optional[jax.Array] = None) -> jax.Array:
    """Raw (pre-LayerNorm) text embeddings: ids [B, L] -> word + position + type [B, L, D].

    position_ids default to 0..L-1 and type_ids to 0; both broadcast against [B, L].
    """
    if ids.ndim != 2:
      raise ValueError(f"ids must be [B, L], got shape {ids.shape}")
    length = ids.shape[1]
    if position_ids is None:
      if length > self.max_position:
        raise ValueError(f"Sequence length {length} exceeds max_position={self.max_position}; "
                         "truncate the input (the tokenizer's max_length).")
      position_ids = jnp.arange(length)[None, :]
    if type_ids is None:
      type_ids = jnp.zeros_like(ids)
    e = (self.word_embeddings(ids) + self.type_embeddings(type_ids)
         + self.position_embeddings(position_ids))
    return nn.with_logical_constraint(e, layers.HIDDEN_AXES)

  def encode(self, embeddings: jax.Array, mask: Optional[jax.Array] = None,
             deterministic: bool = True) -> jax.Array:
    """embeddings [B, L, D] (raw sums), mask [B, L] or [B, 1|H, L, L] -> hidden states [B, L, D]."""
    if embeddings.ndim != 3 or embeddings.shape[-1] != self.hidden_size:
      raise ValueError(f"embeddings must be [B, L, {self.hidden_size}], got {embeddings.shape}")
    attn_mask = None
    if mask is not None:
      b, l = embeddings.shape[:2]
      if mask.ndim == 2:
        if mask.shape != (b, l):
          raise ValueError(f"mask shape {mask.shape} != (B, L) = {(b, l)}")
        attn_mask = mask.astype(bool)[:, None, None, :]  # Keys only: [B, 1, 1, L].
      elif mask.ndim == 4:
        attn_mask = mask.astype(bool)
      else:
        raise ValueError(f"mask must be [B, L] or [B, H, L, L], got shape {mask.shape}")
    x = self.embeddings_dropout(self.embeddings_norm(embeddings), deterministic=deterministic)
    return self.encoder(x, attn_mask, deterministic)

  def pool(self, hidden: jax.Array) -> jax.Array:
    """hidden [B, L, D] -> tanh(Dense(hidden[:, 0])) [B, D]."""
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] (e.g. gathered masked positions) -> vocabulary logits [..., V]."""
    h = self.mlm_transform(hidden)
    h = self.mlm_norm(layers.activation(self.act)(h))
    logits = self.word_embeddings.attend(h) + self.mlm_bias.astype(self.dtype)
    return nn.with_logical_constraint(
        logits, ("act_batch", "act_length", "act_vocab")[-logits.ndim:])

  def __call__(self, ids: jax.Array, mask: Optional[jax.Array] = None,
               type_ids: Optional[jax.Array] = None, position_ids: Optional[jax.Array] = None,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """ids [B, L] -> {'hidden': [B, L, D], 'pooled': [B, D] (with_pooler)}.

    MLM logits are not computed here (a [B, L, V] tensor is wasteful): call
    `apply(..., method=Bert.mlm_logits)` on the positions that need them. Initialising through
    __call__ creates every parameter, heads included.
    """
    hidden = self.encode(self.embed_text(ids, type_ids, position_ids), mask, deterministic)
    out = {"hidden": hidden}
    if self.with_pooler:
      out["pooled"] = self.pool(hidden)
    if self.with_mlm_head and self.is_initializing():
      self.mlm_logits(hidden[:, :1])
    return out


def bert(variant: str = "base", **overrides) -> Bert:
  """A Bert from a named variant (see VARIANTS) with attribute overrides (vocab_size, dtype...)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown BERT variant {variant!r}; known: {', '.join(VARIANTS)}")
  d, n, h, f = VARIANTS[variant]
  kw = dict(hidden_size=d, num_layers=n, num_heads=h, mlp_dim=f)
  kw.update(overrides)
  return Bert(**kw)
