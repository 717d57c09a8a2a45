"""Transformer layers shared by every encoder: attention, MLP, block, and the encoder stack.

One set of modules serves CLIP's towers (pre-LN, quick_gelu, causal or full mask, eps 1e-5),
SigLIP's (pre-LN, tanh GELU, full mask, eps 1e-6, attention-pooling head) and BERT (post-LN,
exact erf GELU, padding mask, eps 1e-12).

API (all Flax linen; `dtype` is the compute dtype, `param_dtype` the storage dtype, float32 by
default; every parameter carries logical axis names from fashion_jax.parallel.axes):

  MultiHeadAttention(num_heads, head_dim=None, dropout_rate=0., dtype, param_dtype, kernel_init,
                     attention_impl='einsum', causal=False)
      (x [B, Lq, D], mask=None, *, kv=None [B, Lk, D], deterministic=True, key_lengths=None,
       query_positions=None [B, Lq] int) -> [B, Lq, D]
    Sub-modules `query`, `key`, `value` (DenseGeneral, kernel [D, H, Dh] axes (embed, heads, kv),
    bias [H, Dh]) and `out` (kernel [H, Dh, D] axes (heads, kv, embed), bias [D]).
    An HF Linear (weight [H*Dh, D], bias [H*Dh]) maps 1:1: kernel = W.T.reshape(D, H, Dh),
    bias = b.reshape(H, Dh); for the output projection (weight [D, H*Dh]) kernel =
    W.T.reshape(H, Dh, D). `mask` is boolean, True = may attend, broadcastable to
    [B, H, Lq, Lk] (the convention of flax.linen.make_attention_mask / make_causal_mask /
    combine_masks, which build it). causal=True adds the causal mask (query i sees keys <= i)
    to `mask`: the text tower's, given as a flag so that fused kernels use their causal mode
    instead of a [Lq, Lk] bias. query_positions: where each query sits among the keys, for the
    causal mask (query j of row b sees keys <= query_positions[b, j]; default j, aligned); set,
    the causal mask becomes an explicit [B, 1, Lq, Lk] one. Logits = q k^T / sqrt(Dh), softmax
    in float32.
    attention_impl (ATTENTION_IMPLS) chooses how softmax(q k^T / sqrt(Dh)) v is computed; the
    projections and parameters are the same for all three, so a checkpoint runs under any:
      'einsum': two einsums around a float32 softmax, every intermediate materialised (the
                default, and the only one with attention dropout);
      'xla':    jax.nn.dot_product_attention(implementation='xla'): the same arithmetic through
                JAX's API (runs anywhere; the CPU check that the API wiring and masks are right);
      'cudnn':  jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's fused (flash)
                attention on an NVIDIA GPU, bf16/fp16 compute only. The [B, H, Lq, Lk] logits
                and probabilities never reach HBM, which is what makes it faster: at 197 tokens
                attention is ~4% of a ViT-B/16's FLOPs but its float32 softmax traffic was a
                large share of the step (README "Accelerator efficiency"). Its softmax is
                computed in float32 inside the kernel; a boolean mask becomes an additive bias.
                cuDNN trains only on even sequence lengths, so odd ones (a ViT's 1 + 196
                tokens, CLIP's 77) are padded to a multiple of 8 inside the call and the
                padding excluded by cuDNN's sequence-length masking (exact), then sliced off.
      With attention dropout in training, 'xla' and 'cudnn' raise (their API has no dropout).

  Mlp(mlp_dim, act='quick_gelu', dropout_rate=0., ...)
      (x [B, L, D], deterministic=True) -> [B, L, D]
    Sub-modules `fc1` (kernel [D, F] axes (embed, mlp)), `fc2` (kernel [F, D] axes (mlp, embed)).
    act: 'quick_gelu' (x sigmoid(1.702 x), CLIP), 'gelu' (exact, erf; BERT and CLIP 'gelu'),
    'gelu_tanh' (tanh approximation; SigLIP, transformers' 'gelu_pytorch_tanh'). Unknown names
    raise ValueError. ACT_TO_HF / ACT_FROM_HF translate to and from transformers' hidden_act.

  TransformerBlock(num_heads, mlp_dim, pre_norm=True, layer_norm_eps=1e-5, act='quick_gelu',
                   dropout_rate=0., attention_dropout_rate=0., attention_impl='einsum',
                   causal=False, ...)
      (x [B, L, D], mask=None, deterministic=True, key_lengths=None, query_index=None)
      -> [B, L, D]
    pre_norm (CLIP):  x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
    post_norm (BERT): x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))
    Sub-modules `norm1`, `attn`, `norm2`, `mlp`.
    query_index [B] int (pre_norm only): the output [B, D] of token query_index[b] alone, the
    other tokens serving as keys and values: h = norm1(x); y = x_i + attn(h_i, kv=h);
    y = y + mlp(norm2(y)), with the causal mask at position i and a [B, 1, L, L] mask's row i.
    Equal to the full block at those tokens; with dropout in training the masks are drawn for
    the computed tokens only.

  AttentionPool(num_heads, mlp_dim, layer_norm_eps=1e-6, act='gelu_tanh', ...)
      (x [B, L, D]) -> [B, D]
    Multi-head attention pooling (SigLIP's "MAP" head, transformers'
    SiglipMultiheadAttentionPoolingHead): one learnt query `probe` [1, 1, D] attends over x,
      a = attn(probe, x, x);  y = a + mlp(norm(a));  out = y[:, 0].
    Sub-modules `attn` (MultiHeadAttention with kv=x: the fused in_proj of torch's
    nn.MultiheadAttention is the q/k/v projections stacked), `norm`, `mlp`; parameter `probe`.

  Encoder(num_layers, <TransformerBlock fields>, scan=False, remat_policy='none')
    (attention_impl and causal included: every block's attention uses them)
      (x [B, L, D], mask=None, deterministic=True, pool_index=None) -> [B, L, D]
    pool_index [B] int (pre-LN only): the stack's output at token pool_index[b] alone, [B, D];
    the last block computes only those tokens (query_index), skipping 10/12 of its matmuls
    (q, out and MLP of every other token; k and v still see all), which is exact because
    nothing reads the other tokens' last outputs. CLIP's towers use it for the pooled CLS / EOS
    token (CLIPConfig.pooled_last_layer). With scan=True the first N-1 layers run as a
    lax.scan over the `layers` params (sliced, so the layout and checkpoints stay nn.scan's),
    the last as one block; initialisation runs the full stack.
    scan=False: blocks `layers_0` ... `layers_{N-1}`.
    scan=True: one `layers` sub-tree whose leaves carry a leading [N] axis named 'layers'
    (nn.scan; compiles one block instead of N).
    remat_policy: 'none' (store all activations) or the name of a jax.checkpoint_policies
    member, e.g. 'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable'.
    seq_pad_multiple (0 = off): pad the tokens ONCE at the stack's entry to a multiple of it
    (zeros), run every block on [B, L', D] with the padded keys masked by length (key_lengths
    = L: the fused kernels' key_value_seq_lengths, a length mask for 'einsum'), and slice the
    padded rows off at the exit. Exact: a padded key never gets attention weight (masked) and
    the padded query rows only influence themselves (LayerNorm and MLP act per token; their
    rows stay finite), so real rows and all gradients equal the unpadded stack's. It replaces
    the per-call padding of odd lengths that cuDNN needs ('cudnn' pads each attention to a
    multiple of 8 otherwise: 12 pads and slices of q/k/v per tower and step).
  stack_layers(params) / unstack_layers(params): convert a params tree between the two layouts
    (every dict holding layers_0..layers_{N-1} <-> one 'layers' dict of [N, ...] leaves).

Activations are constrained with nn.with_logical_constraint: hidden states
(act_batch, act_length, act_embed), MLP hidden (act_batch, act_length, act_mlp), per-head
q/k/v (act_batch, act_length, act_heads, act_kv). Outside a mesh/rules context these are no-ops.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

HIDDEN_AXES = ("act_batch", "act_length", "act_embed")
# Ready-made jax.checkpoint_policies (the others are factories that need arguments).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
# Our activation name <-> transformers' hidden_act ('gelu_new' is the same tanh formula).
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}


def check_attention_impl(impl: str, dtype: Any = None) -> str:
  """`impl` if it is one of ATTENTION_IMPLS (and, given the compute `dtype`, one it runs in:
  'cudnn' needs bfloat16 or float16), else ValueError naming the value."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention_impl {impl!r}: expected one of {ATTENTION_IMPLS}.")
  if impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16,
                                                                        jnp.float16):
    raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 compute, got dtype="
                     f"{jnp.dtype(dtype).name}.")
  return impl


def compute_dtype(name: Any) -> Any:
  """A config's dtype ('float32', 'bfloat16', 'float16', or a dtype) as a jnp dtype."""
  return jnp.dtype(name) if isinstance(name, str) else name


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function named `name` ('quick_gelu', 'gelu', 'gelu_tanh')."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"Unknown activation {name!r}; expected 'quick_gelu', 'gelu' or 'gelu_tanh'.")


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over the last axis with logically partitioned scale/bias (axis 'norm')."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


def _flat_init(init: Initializer, num_in_axes: int) -> Initializer:
  """`init` applied to the kernel flattened to [prod(in), prod(out)], reshaped back.

  nn.DenseGeneral does this flattening itself (so fan-in/fan-out are those of the matrix), but by
  reshaping the BOXED kernel, which under active logical axis rules applies the 3-d axis names to
  the 2-d flat array and fails. So the projections are nn.Einsum (same kernel/bias names and
  shapes as DenseGeneral) created in their full shape, with this flattened initialiser.
  """
  def wrapped(key, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:num_in_axes])), int(np.prod(shape[num_in_axes:])))
    return init(key, flat, dtype).reshape(shape)
  return wrapped


def fused_attention(q, k, v, mask, causal: bool, implementation: str,
                    pad_odd: Optional[bool] = None,
                    key_lengths: Optional[jax.Array] = None) -> jax.Array:
  """jax.nn.dot_product_attention(implementation=...) on [B, L, H, Dh] q, k, v.

  pad_odd (default: implementation == 'cudnn', which refuses odd lengths in training): odd
  lengths are padded to a multiple of 8 and the padding masked by sequence lengths, so the
  result equals unpadded attention; the padded query rows are sliced off.
  key_lengths [B] int32 (optional): keys at positions >= key_lengths[b] are masked (the API's
  key_value_seq_lengths; what an Encoder padded once per tower passes, see Encoder).
  """
  if pad_odd is None:
    pad_odd = implementation == "cudnn"
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  if not pad_odd or (lq % 2 == 0 and lk % 2 == 0):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        key_value_seq_lengths=key_lengths,
                                        implementation=implementation)
  pq, pk = -lq % 8, -lk % 8
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  if mask is not None:  # Padded keys are masked by their length; padded query rows are dropped.
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pq), (0, pk)), constant_values=True)
  out = jax.nn.dot_product_attention(
      pad(q, pq), pad(k, pk), pad(v, pk), mask=mask, is_causal=causal,
      query_seq_lengths=jnp.full((b,), lq, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), lk, jnp.int32) if key_lengths is None else key_lengths,
      implementation=implementation)
  return out[:, :lq]


class MultiHeadAttention(nn.Module):
  """Multi-head (self- or cross-) attention with separate q/k/v/out projections and biases."""
  num_heads: int
  head_dim: Optional[int] = None  # Default: D // num_heads.
  dropout_rate: float = 0.0  # On the attention probabilities.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  attention_impl: str = "einsum"  # See ATTENTION_IMPLS and the module docstring.
  causal: bool = False  # Add the causal mask (see the module docstring).

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None, *,
               kv: Optional[jax.Array] = None, deterministic: bool = True,
               key_lengths: Optional[jax.Array] = None,
               query_positions: Optional[jax.Array] = None) -> jax.Array:
    impl = check_attention_impl(self.attention_impl, self.dtype)
    if impl != "einsum" and self.dropout_rate > 0 and not deterministic:
      raise ValueError(f"attention_impl={impl!r} has no attention dropout but dropout_rate="
                       f"{self.dropout_rate} in training: use attention_impl='einsum' or set the "
                       "attention dropout to 0.")
    d_model = x.shape[-1]
    head_dim = self.head_dim or d_model // self.num_heads
    if self.head_dim is None and d_model % self.num_heads:
      raise ValueError(f"Width {d_model} is not divisible by num_heads={self.num_heads}.")
    kv = x if kv is None else kv

    def proj(name):  # kernel [D, H, Dh], bias [H, Dh]: nn.DenseGeneral's layout.
      return nn.Einsum(
          (d_model if name == "query" else kv.shape[-1], self.num_heads, head_dim),
          "bld,dhk->blhk", dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(
              _flat_init(self.kernel_init, 1), ("embed", "heads", "kv")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv")))

    head_axes = ("act_batch", "act_length", "act_heads", "act_kv")
    q = nn.with_logical_constraint(proj("query")(x), head_axes)    # [B, Lq, H, Dh]
    k = nn.with_logical_constraint(proj("key")(kv), head_axes)     # [B, Lk, H, Dh]
    v = nn.with_logical_constraint(proj("value")(kv), head_axes)   # [B, Lk, H, Dh]

    causal = self.causal
    if causal and query_positions is not None:  # Query j sits at key position positions[b, j].
      below = (jnp.arange(k.shape[1])[None, None, None, :]
               <= query_positions[:, None, :, None])  # [B, 1, Lq, Lk]
      mask, causal = (below if mask is None else jnp.logical_and(mask, below)), False
    if impl == "einsum":
      if causal:
        tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = tril if mask is None else jnp.logical_and(mask, tril)
      if key_lengths is not None:
        valid = jnp.arange(k.shape[1])[None, None, None, :] < key_lengths[:, None, None, None]
        mask = valid if mask is None else jnp.logical_and(mask, valid)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(
          jnp.float32(head_dim))
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      if self.dropout_rate > 0 and not deterministic:
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    else:
      if mask is not None:  # The API wants boolean [B|1, H|1, Lq, Lk] (flax's are float).
        mask = jnp.reshape(mask.astype(bool), (1,) * (4 - mask.ndim) + mask.shape)
      out = fused_attention(q, k, v, mask, causal, impl, key_lengths=key_lengths)
    out = nn.with_logical_constraint(out, head_axes)
    out = nn.Einsum(
        (self.num_heads, head_dim, d_model), "blhk,hkd->bld", dtype=self.dtype,
        param_dtype=self.param_dtype, name="out",
        kernel_init=nn.with_logical_partitioning(_flat_init(self.kernel_init, 2),
                                                 ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(out)
    return nn.with_logical_constraint(out, HIDDEN_AXES)


class Mlp(nn.Module):
  """fc1 -> activation -> dropout -> fc2: [B, L, D] -> [B, L, F] -> [B, L, D]."""
  mlp_dim: int
  act: str = "quick_gelu"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    act = activation(self.act)
    d_model = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                 kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(x)
    h = nn.with_logical_constraint(act(h), ("act_batch", "act_length", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = nn.Dense(d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                 kernel_init=nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(h)
    return nn.with_logical_constraint(h, HIDDEN_AXES)


class TransformerBlock(nn.Module):
  """One attention + MLP block, pre-LN (CLIP) or post-LN (BERT); see the module docstring."""
  num_heads: int
  mlp_dim: int
  pre_norm: bool = True
  layer_norm_eps: float = 1e-5
  act: str = "quick_gelu"
  dropout_rate: float = 0.0  # On each sub-layer's output, before the residual add.
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  attention_impl: str = "einsum"
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               deterministic: bool = True, key_lengths: Optional[jax.Array] = None,
               query_index: Optional[jax.Array] = None) -> jax.Array:
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    norm1 = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm1")
    norm2 = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm2")
    attn = MultiHeadAttention(self.num_heads, dropout_rate=self.attention_dropout_rate,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=self.kernel_init, attention_impl=self.attention_impl,
                              causal=self.causal, name="attn")
    mlp = Mlp(self.mlp_dim, act=self.act, dropout_rate=self.dropout_rate, dtype=self.dtype,
              param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="mlp")
    drop = nn.Dropout(self.dropout_rate)
    if query_index is not None:
      if not self.pre_norm:
        raise ValueError("query_index (one output token per row) needs pre_norm=True: a "
                         "post-LN block's keys are not a function of the normed input alone.")
      rows = jnp.arange(x.shape[0])
      h = norm1(x)  # Keys and values: every token.
      if mask is not None and mask.ndim == 4 and mask.shape[2] > 1:  # Keep the query's row.
        mask = jnp.broadcast_to(mask, (x.shape[0],) + mask.shape[1:])[rows, :, query_index]
        mask = mask[:, :, None]
      y = x[rows, query_index][:, None]  # [B, 1, D]
      y = y + drop(attn(h[rows, query_index][:, None], mask, kv=h, deterministic=deterministic,
                        key_lengths=key_lengths, query_positions=query_index[:, None]),
                   deterministic)
      y = y + drop(mlp(norm2(y), deterministic), deterministic)
      return nn.with_logical_constraint(y[:, 0], ("act_batch", "act_embed"))
    if self.pre_norm:
      x = x + drop(attn(norm1(x), mask, deterministic=deterministic,
                        key_lengths=key_lengths), deterministic)
      x = x + drop(mlp(norm2(x), deterministic), deterministic)
    else:
      x = norm1(x + drop(attn(x, mask, deterministic=deterministic, key_lengths=key_lengths),
                         deterministic))
      x = norm2(x + drop(mlp(x, deterministic), deterministic))
    return nn.with_logical_constraint(x, HIDDEN_AXES)


class AttentionPool(nn.Module):
  """Multi-head attention pooling [B, L, D] -> [B, D]; see the module docstring."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  act: str = "gelu_tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.with_logical_constraint(x, HIDDEN_AXES)
    d = x.shape[-1]
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, d), self.param_dtype)
    q = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, d))
    a = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=self.kernel_init, attention_impl=self.attention_impl,
                           name="attn")(q, kv=x)
    h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm")(a)
    y = a + Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init, name="mlp")(h)
    return y[:, 0]


class _ScanBlock(TransformerBlock):
  """TransformerBlock with the (carry, output) signature nn.scan expects."""

  def __call__(self, x, mask=None, deterministic=True,  # pylint: disable=arguments-renamed
               key_lengths=None):
    return super().__call__(x, mask, deterministic, key_lengths), None


class Encoder(nn.Module):
  """A stack of `num_layers` TransformerBlocks, optionally scanned and rematerialised."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  pre_norm: bool = True
  layer_norm_eps: float = 1e-5
  act: str = "quick_gelu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"
  causal: bool = False
  # Pad the tokens once, at the stack's entry, to a multiple of this (0 or 1: never), masking
  # the padded keys by length; sliced off at the exit. See the module docstring.
  seq_pad_multiple: int = 0

  def _block_kwargs(self):
    return dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=self.pre_norm,
                layer_norm_eps=self.layer_norm_eps, act=self.act, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                attention_impl=self.attention_impl, causal=self.causal)

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               deterministic: bool = True, pool_index: Optional[jax.Array] = None
               ) -> jax.Array:
    if self.seq_pad_multiple < 0:
      raise ValueError(f"seq_pad_multiple={self.seq_pad_multiple} must be >= 0 (0: no padding).")
    length = x.shape[1]
    pad = -length % self.seq_pad_multiple if self.seq_pad_multiple > 1 else 0
    key_lengths = None
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
      key_lengths = jnp.full((x.shape[0],), length, jnp.int32)
      if mask is not None:  # Padded keys: masked (by length too); padded query rows: see all.
        mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad if mask.shape[2] > 1 else 0),
                              (0, pad if mask.shape[3] > 1 else 0)),
                       constant_values=True)
    block_cls = _ScanBlock if self.scan else TransformerBlock
    policy = None
    if self.remat_policy != "none":
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat_policy {self.remat_policy!r}: expected 'none' or one of "
                         f"{', '.join(REMAT_POLICIES)} (members of jax.checkpoint_policies).")
      policy = getattr(jax.checkpoint_policies, self.remat_policy)
      # static_argnums counts `self` as 0: `deterministic` is argument 3.
      block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.scan,
                           static_argnums=(3,))
    if pool_index is not None:
      if pool_index.shape != x.shape[:1]:
        raise ValueError(f"pool_index has shape {pool_index.shape}; expected one position per "
                         f"row, ({x.shape[0]},).")
      if self.scan and not self.is_initializing():
        return self._scanned_pooled(x, mask, deterministic, key_lengths, pool_index, policy)
    if self.scan:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                          "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(name="layers", **self._block_kwargs())(x, mask, deterministic, key_lengths)
    else:
      last = self.num_layers - 1
      for i in range(self.num_layers):  # The last block computes the pooled tokens only.
        x = block_cls(name=f"layers_{i}", **self._block_kwargs())(
            x, mask, deterministic, key_lengths, pool_index if i == last else None)
    if pool_index is not None:
      if self.scan:  # Initialising a scanned stack: its params, and the pooled rows' shape.
        x = x[jnp.arange(x.shape[0]), pool_index]
      return nn.with_logical_constraint(x, ("act_batch", "act_embed"))
    if pad:
      x = x[:, :length]
    return nn.with_logical_constraint(x, HIDDEN_AXES)

  def _scanned_pooled(self, x, mask, deterministic, key_lengths, pool_index, policy):
    """scan=True with pool_index: layers 0..N-2 by lax.scan over the stacked params, then the
    last layer's block for the pooled tokens only. The params are nn.scan's own `layers` tree
    (read, not re-declared), so both paths share one checkpoint layout; an nn.scan of N-1
    layers cannot hold N layers' params, hence the functional form.
    """
    n = self.num_layers
    stacked = nn.unbox(self.variables["params"]["layers"])
    block = TransformerBlock(**self._block_kwargs())
    dropout = not deterministic and (self.dropout_rate > 0 or self.attention_dropout_rate > 0)
    rngs = jax.random.split(self.make_rng("dropout"), n) if dropout else [None] * n

    def layer(params, x, rng, query_index):
      return block.apply({"params": params}, x, mask, deterministic, key_lengths, query_index,
                         rngs=None if rng is None else {"dropout": rng})

    if policy is not None:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

    def body(x, params_rng):
      params, rng = params_rng
      return layer(params, x, rng, None), None

    head = jax.tree.map(lambda a: a[:n - 1], stacked)
    x, _ = jax.lax.scan(body, x, (head, None if rngs[0] is None else rngs[:n - 1]))
    last = jax.tree.map(lambda a: a[n - 1], stacked)
    x = layer(last, x, rngs[n - 1], pool_index)
    return nn.with_logical_constraint(x, ("act_batch", "act_embed"))


def stack_layers(tree: Any) -> Any:
  """Per-layer Encoder params -> the scan layout.

  Every dict holding `layers_0` ... `layers_{N-1}` (an Encoder with scan=False) gets them
  replaced by one `layers` sub-tree whose leaves are stacked on a new leading axis [N, ...].
  numpy leaves stay numpy; other dicts are copied unchanged.
  """
  if not isinstance(tree, dict):
    return tree
  out = {k: stack_layers(v) for k, v in tree.items() if not k.startswith("layers_")}
  n = sum(1 for k in tree if k.startswith("layers_"))
  if n:
    names = [f"layers_{i}" for i in range(n)]
    if any(name not in tree for name in names):
      raise ValueError(f"Layer names are not contiguous: {sorted(k for k in tree if 'layers_' in k)}")
    stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)
    out["layers"] = jax.tree.map(stack, *[tree[name] for name in names])
  return out


def unstack_layers(tree: Any) -> Any:
  """The scan layout -> per-layer params: the inverse of `stack_layers`."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if k == "layers" and isinstance(v, dict):
      n = jax.tree.leaves(v)[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], v)
    else:
      out[k] = unstack_layers(v)
  return out
