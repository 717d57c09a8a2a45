"""Transformer layers against float64 numpy formulas; scan/remat layouts; errors; axis names."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.models import layers
from fashion_jax.models import vit as vit_lib
from tests import numerics


def _np_ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


_NP_ACTS = {
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
    "gelu": np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
}


def _np_attention(p, x, mask):
  """Multi-head attention in float64 from the documented kernel layouts."""
  q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", x, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _np_block(p, x, mask, pre_norm, act, eps):
  def mlp(h):
    h = _NP_ACTS[act](h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
    return h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  ln1 = lambda h: _np_ln(h, p["norm1"]["scale"], p["norm1"]["bias"], eps)
  ln2 = lambda h: _np_ln(h, p["norm2"]["scale"], p["norm2"]["bias"], eps)
  if pre_norm:
    x = x + _np_attention(p["attn"], ln1(x), mask)
    return x + mlp(ln2(x))
  x = ln1(x + _np_attention(p["attn"], x, mask))
  return ln2(x + mlp(x))


def _randomize(params, seed):
  """Replace every leaf with random values so LayerNorm scales and biases matter too."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [rng.randn(*l.shape).astype(np.float32) * 0.3 for l in leaves])


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("pre_norm,act,eps,masking", [
    (True, "quick_gelu", 1e-5, "causal"),
    (False, "gelu", 1e-12, "padding"),
    (True, "gelu_tanh", 1e-6, None),
])
def test_encoder_matches_float64_numpy(pre_norm, act, eps, masking, impl):
  b, l, d, heads, mlp_dim, n = 2, 6, 16, 4, 24, 2
  x = np.random.RandomState(0).randn(b, l, d).astype(np.float32)
  if masking == "causal":
    mask = np.tril(np.ones((l, l), bool))[None, None]
  elif masking == "padding":
    valid = np.array([[1] * l, [1] * 3 + [0] * (l - 3)], bool)
    mask = valid[:, None, None, :]
  else:
    mask = None
  enc = layers.Encoder(num_layers=n, num_heads=heads, mlp_dim=mlp_dim, pre_norm=pre_norm,
                       act=act, layer_norm_eps=eps, attention_impl=impl)
  params = _randomize(nn.unbox(enc.init(jax.random.PRNGKey(0), x, mask))["params"], 1)
  got = enc.apply({"params": params}, x, None if mask is None else jnp.asarray(mask))
  want = x.astype(np.float64)
  for i in range(n):
    want = _np_block(_f64(params[f"layers_{i}"]), want, mask, pre_norm, act, eps)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow  # ~30 s; scan is also checked in the towers' tests (test_clip_sharding, test_siglip).
def test_scan_and_remat_match_unrolled_values_and_grads():
  x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32)
  mask = jnp.asarray(np.tril(np.ones((5, 5), bool))[None, None])
  kw = dict(num_layers=3, num_heads=4, mlp_dim=32)
  unrolled = layers.Encoder(**kw)
  params = nn.unbox(unrolled.init(jax.random.PRNGKey(0), x, mask))["params"]
  loss = lambda m, p: (m.apply({"params": p}, x, mask) ** 2).sum()
  y0, g0 = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
  stacked = layers.stack_layers(params)
  assert jax.tree.leaves(stacked)[0].shape[0] == 3
  for policy in ("none", "nothing_saveable"):
    scanned = layers.Encoder(**kw, scan=True, remat_policy=policy)
    y1, g1 = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
    # Up to float32 rounding of the loss's sum of 2 x 5 x 16 terms (tests/numerics.py).
    numerics.assert_rounding_close(y1, y0, 160, what=policy)
    numerics.assert_rounding_close(layers.unstack_layers(g1), g0, 160, what=policy)
  remat_only = layers.Encoder(**kw, remat_policy="dots_with_no_batch_dims_saveable")
  numerics.assert_rounding_close(jax.grad(lambda p: loss(remat_only, p))(params), g0, 160)


def test_logical_axis_names_on_params():
  x = jnp.zeros((1, 4, 8))
  boxed = layers.Encoder(num_layers=2, num_heads=2, mlp_dim=16, scan=True).init(
      jax.random.PRNGKey(0), x)["params"]
  names = jax.tree.map(lambda b: b.names, boxed,
                       is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  blk = names["layers"]
  assert blk["attn"]["query"]["kernel"] == ("layers", "embed", "heads", "kv")
  assert blk["attn"]["out"]["kernel"] == ("layers", "heads", "kv", "embed")
  assert blk["mlp"]["fc1"]["kernel"] == ("layers", "embed", "mlp")
  assert blk["mlp"]["fc2"]["kernel"] == ("layers", "mlp", "embed")
  assert blk["norm1"]["scale"] == ("layers", "norm")


def test_dropout_is_active_only_when_not_deterministic():
  x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32)
  enc = layers.Encoder(num_layers=1, num_heads=4, mlp_dim=32, pre_norm=False, act="gelu",
                       dropout_rate=0.5, attention_dropout_rate=0.5)
  variables = enc.init(jax.random.PRNGKey(0), x)
  a = enc.apply(variables, x)
  b = enc.apply(variables, x, deterministic=True)
  c = enc.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_bad_names_raise():
  x = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match="Unknown activation 'relu6'"):
    layers.Mlp(16, act="relu6").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="Unknown remat_policy 'save_only_these_names'"):
    layers.Encoder(num_layers=1, num_heads=2, mlp_dim=8,
                   remat_policy="save_only_these_names").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="not divisible by num_heads=3"):
    layers.MultiHeadAttention(3).init(jax.random.PRNGKey(0), x)


def test_attention_impl_errors_name_the_value():
  x = jnp.zeros((1, 4, 8))
  with pytest.raises(ValueError, match="Unknown attention_impl 'flash'"):
    layers.MultiHeadAttention(2, attention_impl="flash").init(jax.random.PRNGKey(0), x)
  attn = layers.MultiHeadAttention(2, dropout_rate=0.1, attention_impl="xla")
  variables = attn.init(jax.random.PRNGKey(0), x)  # Deterministic: allowed.
  with pytest.raises(ValueError, match="attention_impl='xla' has no attention dropout"):
    attn.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  with pytest.raises(ValueError, match="needs bfloat16 or float16 compute, got dtype=float32"):
    layers.MultiHeadAttention(2, attention_impl="cudnn").init(jax.random.PRNGKey(0), x)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("length,causal", [(197, False), (77, True), (64, True)])
def test_cudnn_attention_matches_einsum_on_gpu(length, causal):
  """bf16 encoder, ViT-B-sized heads (odd lengths padded, even ones not): values and gradients
  within bf16 rounding of the einsum implementation."""
  b, d, heads = 4, 768, 12
  rs = np.random.RandomState(length)
  x = jnp.asarray(rs.randn(b, length, d).astype(np.float32))
  kw = dict(num_layers=2, num_heads=heads, mlp_dim=4 * d, dtype=jnp.bfloat16, causal=causal)
  ref = layers.Encoder(**kw)
  params = nn.unbox(ref.init(jax.random.PRNGKey(0), x))["params"]
  def run(impl):
    enc = layers.Encoder(**kw, attention_impl=impl)
    f = lambda p, x: (enc.apply({"params": p}, x).astype(jnp.float32) ** 2).mean()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
  (y0, (gp0, gx0)), (y1, (gp1, gx1)) = run("einsum"), run("cudnn")
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(y1, y0) < 1e-2
  assert rel(gx1, gx0) < 2e-2
  # All parameter gradients together (the key bias's own gradient is ~0: softmax ignores it).
  flat = lambda t: jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(t)])
  assert rel(flat(gp1), flat(gp0)) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("length,causal", [(197, False), (77, True)])
def test_cudnn_pooled_last_layer_matches_einsum_on_gpu(length, causal):
  """bf16 encoder with pool_index (one query row in the last layer: padded to 8 for cuDNN, the
  causal mask explicit) against the einsum stack's full output at those tokens."""
  b, d, heads = 4, 768, 12
  rs = np.random.RandomState(length)
  x = jnp.asarray(rs.randn(b, length, d).astype(np.float32))
  index = jnp.asarray(rs.randint(0, length, b), jnp.int32)
  kw = dict(num_layers=2, num_heads=heads, mlp_dim=4 * d, dtype=jnp.bfloat16, causal=causal)
  params = nn.unbox(layers.Encoder(**kw).init(jax.random.PRNGKey(0), x))["params"]
  full = layers.Encoder(**kw)
  pooled = layers.Encoder(**kw, attention_impl="cudnn")
  y0 = jax.jit(lambda p: full.apply({"params": p}, x)[jnp.arange(b), index])(params)
  y1 = jax.jit(lambda p: pooled.apply({"params": p}, x, None, True, index))(params)
  rel = float(jnp.linalg.norm((y1 - y0).astype(jnp.float32))
              / jnp.linalg.norm(y0.astype(jnp.float32)))
  assert rel < 1e-2, rel


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_causal_flag_equals_the_causal_mask(impl):
  b, l = 2, 7
  x = np.random.RandomState(0).randn(b, l, 16).astype(np.float32)
  pad = jnp.asarray(np.array([[1] * l, [1] * 4 + [0] * 3], bool)[:, None, None, :])
  causal = jnp.asarray(np.tril(np.ones((l, l), bool))[None, None])
  kw = dict(num_layers=2, num_heads=4, mlp_dim=24)
  explicit = layers.Encoder(**kw)
  params = explicit.init(jax.random.PRNGKey(0), x, causal)
  flagged = layers.Encoder(**kw, causal=True, attention_impl=impl)
  np.testing.assert_allclose(flagged.apply(params, x), explicit.apply(params, x, causal),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flagged.apply(params, x, pad),
                             explicit.apply(params, x, jnp.logical_and(causal, pad)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_padding_odd_lengths_is_exact(causal, masked):
  """The padding that cuDNN needs (odd lengths -> multiple of 8, masked by sequence lengths),
  run through the XLA implementation on the CPU: values and gradients equal unpadded."""
  rs = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rs.randn(2, 13, 3, 8).astype(np.float32)) for _ in range(3))
  mask = jnp.asarray(rs.rand(2, 1, 13, 13) > 0.3) | jnp.eye(13, dtype=bool) if masked else None
  def f(pad_odd):
    out = lambda q, k, v: layers.fused_attention(q, k, v, mask, causal, "xla", pad_odd=pad_odd)
    y = out(q, k, v)
    g = jax.grad(lambda *a: (out(*a) * v).sum(), argnums=(0, 1, 2))(q, k, v)
    return y, g
  (y0, g0), (y1, g1) = f(False), f(True)
  assert y1.shape == y0.shape
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_bias,size", [(False, 16), (True, 18)])  # 18: VALID drops 2 px.
def test_patch_embed_matmul_equals_the_strided_conv(use_bias, size):
  """vit.PatchEmbed (reshape + matmul) == nn.Conv(stride = kernel = p, VALID) + reshape:
  the same parameters from the same rng, the same values, input and parameter gradients."""
  p, d = 4, 8
  x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32))
  conv = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                 kernel_init=nn.initializers.normal(0.02))
  mm = vit_lib.PatchEmbed(d, p, use_bias=use_bias)
  params = nn.unbox(mm.init(jax.random.PRNGKey(3), x))
  conv_params = conv.init(jax.random.PRNGKey(3), x)
  assert jax.tree.structure(params) == jax.tree.structure(conv_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(conv_params)):
    np.testing.assert_array_equal(a, b)  # nn.Conv's init order and initialisers: same draws.
  params = _randomize(params, 1)  # Non-zero bias too.
  ref = lambda p_, x_: conv.apply(p_, x_).reshape(x.shape[0], -1, d)
  new = lambda p_, x_: mm.apply(p_, x_)
  np.testing.assert_allclose(new(params, x), ref(params, x), rtol=1e-5, atol=1e-6)
  w = jnp.asarray(np.random.RandomState(2).randn(*ref(params, x).shape).astype(np.float32))
  g_ref = jax.grad(lambda *a: (ref(*a) * w).sum(), argnums=(0, 1))(params, x)
  g_new = jax.grad(lambda *a: (new(*a) * w).sum(), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,causal,masked,scan", [
    ("einsum", False, False, False), ("xla", False, True, False),
    pytest.param("xla", True, False, False, marks=pytest.mark.slow),
    pytest.param("einsum", True, True, True, marks=pytest.mark.slow)])
def test_padding_once_per_tower_equals_unpadded(impl, causal, masked, scan):
  """Encoder(seq_pad_multiple=8): 13 tokens padded once to 16 at the entry, padded keys masked
  by length, sliced at the exit == the unpadded stack: values, parameter and input gradients."""
  rs = np.random.RandomState(0)
  b, l = 2, 13
  x = jnp.asarray(rs.randn(b, l, 16).astype(np.float32))
  mask = jnp.asarray(np.array([[1] * l, [1] * 9 + [0] * 4], bool)[:, None, None, :]) \
      if masked else None
  kw = dict(num_layers=2, num_heads=4, mlp_dim=24, attention_impl=impl, causal=causal, scan=scan)
  plain, padded = layers.Encoder(**kw), layers.Encoder(**kw, seq_pad_multiple=8)
  params = _randomize(plain.init(jax.random.PRNGKey(0), x, mask), 1)
  w = jnp.asarray(rs.randn(b, l, 16).astype(np.float32))
  def run(model):
    f = lambda p, x_: (model.apply(p, x_, mask) * w).sum()
    return model.apply(params, x, mask), jax.grad(f, argnums=(0, 1))(params, x)
  (y0, g0), (y1, g1) = run(plain), run(padded)
  assert y1.shape == y0.shape == (b, l, 16)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_seq_pad_multiple_must_not_be_negative():
  x = jnp.zeros((1, 3, 8))
  with pytest.raises(ValueError, match="seq_pad_multiple=-8 must be >= 0"):
    layers.Encoder(num_layers=1, num_heads=2, mlp_dim=8, seq_pad_multiple=-8).init(
        jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("impl,causal,mask_kind,scan,remat,pad", [
    ("einsum", False, None, False, "none", 0),
    ("einsum", True, "keys", True, "nothing_saveable", 0),
    ("xla", True, "full", False, "dots_saveable", 8),
    pytest.param("xla", False, "keys", True, "none", 8, marks=pytest.mark.slow)])
def test_pool_index_equals_the_full_stack_at_those_tokens(impl, causal, mask_kind, scan, remat,
                                                          pad):
  """Encoder(...)(x, mask, pool_index=i) == the full stack's output at token i[b] of row b:
  values, parameter and input gradients, with the last layer computing only those tokens (the
  scanned stack runs N-1 layers by lax.scan over its own params). Masks: by key ([B,1,1,L]) or
  a full [B,1,L,L] one, whose query rows the pooled layer must pick."""
  rs = np.random.RandomState(0)
  b, l, d = 3, 13, 16
  x = jnp.asarray(rs.randn(b, l, d).astype(np.float32))
  index = jnp.asarray([0, 8, 12], jnp.int32)
  mask = None
  if mask_kind == "keys":
    mask = jnp.asarray(np.arange(l)[None] < np.array([l, 9, 13])[:, None])[:, None, None, :]
  elif mask_kind == "full":
    m = rs.rand(b, 1, l, l) < 0.7
    m[..., np.arange(l), np.arange(l)] = True  # No fully masked row.
    mask = jnp.asarray(m)
  model = layers.Encoder(num_layers=3, num_heads=4, mlp_dim=24, attention_impl=impl,
                         causal=causal, scan=scan, remat_policy=remat, seq_pad_multiple=pad)
  params = _randomize(model.init(jax.random.PRNGKey(0), x, mask), 1)
  params_pooled_init = model.init(jax.random.PRNGKey(0), x, mask, True, index)
  assert jax.tree.structure(params_pooled_init) == jax.tree.structure(params)
  w = jnp.asarray(rs.randn(b, d).astype(np.float32))
  def run(f):  # (output [B, D], gradients of <output, w> for the params and x), one jit.
    out = lambda p, x_: (lambda y: ((y * w).sum(), y))(f(p, x_))
    (_, y), g = jax.jit(jax.value_and_grad(out, argnums=(0, 1), has_aux=True))(params, x)
    return y, g
  y0, g0 = run(lambda p, x_: model.apply(p, x_, mask)[jnp.arange(b), index])
  y1, g1 = run(lambda p, x_: model.apply(p, x_, mask, True, index))
  assert y1.shape == (b, d)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_pool_index_errors_name_the_bad_value():
  x = jnp.zeros((2, 5, 8))
  enc = layers.Encoder(num_layers=1, num_heads=2, mlp_dim=8)
  params = enc.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"pool_index has shape \(3,\); expected .* \(2,\)"):
    enc.apply(params, x, None, True, jnp.zeros((3,), jnp.int32))
  post = layers.Encoder(num_layers=1, num_heads=2, mlp_dim=8, pre_norm=False)
  with pytest.raises(ValueError, match="query_index .* needs pre_norm=True"):
    post.init(jax.random.PRNGKey(0), x, None, True, jnp.zeros((2,), jnp.int32))
  siglip_vit = vit_lib.vit_config("tiny", class_token=False, ln_pre=False, patch_bias=True,
                                  pool="map", image_size=32)
  with pytest.raises(ValueError, match="pooled_last_layer=True needs pool='cls', not 'map'"):
    vit_lib.VisionTransformer(siglip_vit, None, pooled_last_layer=True).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
