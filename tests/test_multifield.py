"""Multi-field contrastive loss: values and gradients against float64 numpy, masks exact."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax.evaluate import retrieval
from fashion_jax.losses import contrastive
from fashion_jax.losses import multifield
from fashion_jax.losses import pair_weights
from fashion_jax.losses import sigmoid
from tests import test_matryoshka as tm


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=12, d=8, num_fields=3, seed=0):
  rng = np.random.default_rng(seed)
  img = _unit(rng, n, d)
  texts = [(img + 0.8 * _unit(rng, n, d)) for _ in range(num_fields)]
  texts = [(t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32) for t in texts]
  masks = [rng.random(n) > 0.35 for _ in range(num_fields)]
  masks[0][:] = True          # A field every product has.
  masks[1][[0, 3]] = False    # Some missing.
  masks[2][:] = False         # A field no product of this batch has: the term is 0.
  masks[2][5] = True          # ... except one (a term of a single pair).
  return img, texts, masks


def _np_positive(n, keys):
  """[n, n] bool: i == j, or keys[i] == keys[j] (keys: one hashable value per row)."""
  if keys is None:
    return np.eye(n, dtype=bool)
  return np.array([[ki == kj for kj in keys] for ki in keys])


def _np_info_nce(a, b, scale, m, v=None, keys=None):
  """float64: 1/2 [(1/N) sum over valid i of v_i row_i + the same over columns], row_i =
  logsumexp_j s_ij - mean over i's positives j (i only, or every j with keys_j == keys_i) of
  s_ij (UniCL's multi-positive target); v = per-pair weights (1 each when None), N = the
  number of valid rows."""
  a, b, m = np.float64(a), np.float64(b), np.asarray(m, bool)
  if not m.any():
    return 0.0
  v = np.ones(m.sum()) if v is None else np.float64(v)[m]
  s = scale * (a[m] @ b[m].T)
  pos = _np_positive(len(a), keys)[np.ix_(m, m)]
  row = np.log(np.exp(s).sum(1)) - (s * pos).sum(1) / pos.sum(1)
  col = np.log(np.exp(s).sum(0)) - (s * pos).sum(0) / pos.sum(0)
  return 0.5 * ((v * row).mean() + (v * col).mean())


def _np_sigmoid(a, b, lt, bias, m, v=None, keys=None):
  a, b, m = np.float64(a), np.float64(b), np.float64(m)
  z = np.exp(lt) * (a @ b.T) + bias
  pos = _np_positive(len(a), keys)
  labels = 2.0 * pos - 1.0
  c = np.ones_like(z)
  if v is not None:
    c[pos] = np.broadcast_to(np.float64(v)[:, None], z.shape)[pos]
  return np.sum(np.outer(m, m) * c * np.logaddexp(0.0, -labels * z)) / max(m.sum(), 1.0)


def np_multi_field_loss(kind, img, texts, masks, weights, scale=7.0, lt=math.log(10.0),
                        bias=-5.0, pair_weight=None, keys=None):
  """float64 numpy: sum_f w_f L(img, texts[f]; masks[f]), L = InfoNCE or the sigmoid loss, its
  positive terms weighted by `pair_weight` (one per product, the same in every field); keys:
  None, or per field None or one key per product (equal keys = positives of each other)."""
  keys = [None] * len(texts) if keys is None else keys
  if kind == "infonce":
    terms = [_np_info_nce(img, t, scale, m, pair_weight, k)
             for t, m, k in zip(texts, masks, keys)]
  else:
    terms = [_np_sigmoid(img, t, lt, bias, m, pair_weight, k)
             for t, m, k in zip(texts, masks, keys)]
  return sum(w * t for w, t in zip(weights, terms))


def _np_grad(f, x, h=1e-6):
  """Central differences of a float64 scalar function of the array x."""
  x = np.float64(x)
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def _jax_multi(kind, img, texts, masks, weights, scale=7.0, lt=math.log(10.0), bias=-5.0,
               pair_weight=None, keys=None):
  if kind == "infonce":
    pair = lambda a, b, m, k=None: multifield.masked_info_nce(a, b, scale, m, k,
                                                              weight=pair_weight)
  else:
    pair = lambda a, b, m, k=None: sigmoid.sigmoid_loss(a, b, lt, bias, pair_mask=m,
                                                        pair_weight=pair_weight, pair_keys=k)
  names = [f"f{i}" for i in range(len(texts))]
  return multifield.multi_field_loss(pair, img, texts, [jnp.asarray(m) for m in masks],
                                     weights, names, keys)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
@pytest.mark.parametrize("weighted", [False, True])
def test_keyed_multi_field_loss_equals_numpy_values_and_grads(kind, weighted):
  # Field values shared by several products (3 values in field 0, 2 in field 1) are positives
  # of each other; field 2 keeps row positives.
  img, texts, masks = _data()
  n = len(img)
  rng = np.random.default_rng(7)
  keys = [rng.integers(0, 3, n).astype(np.int32), rng.integers(0, 2, n).astype(np.int32), None]
  weights, v = (1.0, 0.5, 2.0), (_pair_weight(n) if weighted else None)
  fn = lambda i, ts: _jax_multi(kind, i, ts, masks, weights, pair_weight=v, keys=keys)[0]
  np_loss = lambda i, ts: np_multi_field_loss(kind, i, ts, masks, weights, pair_weight=v,
                                              keys=[None if k is None else list(k)
                                                    for k in keys])
  loss = _assert_matches_numpy(fn, np_loss, img, texts)
  assert not np.isclose(loss, np_multi_field_loss(kind, img, texts, masks, weights,
                                                  pair_weight=v), rtol=1e-3)


def _assert_matches_numpy(fn, np_loss, img, texts):
  """fn(img, texts) (jax) equals np_loss(img, texts) (float64) in value and in the gradients
  w.r.t. img and every text (central differences); returns the loss."""
  loss, (g_img, g_txt) = jax.value_and_grad(fn, argnums=(0, 1))(img, texts)
  np.testing.assert_allclose(float(loss), np_loss(img, texts), rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(np.asarray(g_img), _np_grad(lambda x: np_loss(x, texts), img),
                             rtol=1e-4, atol=2e-6)
  for f in range(len(texts)):
    def vary(t, f=f):
      ts = list(texts)
      ts[f] = t
      return np_loss(img, ts)
    np.testing.assert_allclose(np.asarray(g_txt[f]), _np_grad(vary, texts[f]),
                               rtol=1e-4, atol=2e-6)
  return float(loss)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_multi_field_loss_equals_numpy_values_and_grads(kind):
  img, texts, masks = _data()
  weights = (1.0, 0.5, 2.0)
  fn = lambda i, ts: _jax_multi(kind, i, ts, masks, weights)[0]
  loss, (g_img, g_txt) = jax.value_and_grad(fn, argnums=(0, 1))(img, texts)
  want = np_multi_field_loss(kind, img, texts, masks, weights)
  np.testing.assert_allclose(float(loss), want, rtol=2e-6, atol=2e-6)
  want_img = _np_grad(lambda x: np_multi_field_loss(kind, x, texts, masks, weights), img)
  np.testing.assert_allclose(np.asarray(g_img), want_img, rtol=1e-4, atol=2e-6)
  for f in range(3):
    def vary(t, f=f):
      ts = list(texts)
      ts[f] = t
      return np_multi_field_loss(kind, img, ts, masks, weights)
    np.testing.assert_allclose(np.asarray(g_txt[f]), _np_grad(vary, texts[f]),
                               rtol=1e-4, atol=2e-6)
    # A missing field's text gets no gradient at all.
    assert np.all(np.asarray(g_txt[f])[~masks[f]] == 0.0)


def _pair_weight(n, seed=4):
  w = 1.5 * np.random.default_rng(seed).random(n)
  w[2] = 0.0
  return w.astype(np.float32)


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_pair_weighted_multi_field_loss_equals_numpy_values_and_grads(kind):
  img, texts, masks = _data()
  weights, v = (1.0, 0.5, 2.0), _pair_weight(len(img))
  fn = lambda i, ts: _jax_multi(kind, i, ts, masks, weights, pair_weight=v)[0]
  np_loss = lambda i, ts: np_multi_field_loss(kind, i, ts, masks, weights, pair_weight=v)
  loss = _assert_matches_numpy(fn, np_loss, img, texts)
  assert not np.isclose(loss, np_multi_field_loss(kind, img, texts, masks, weights), rtol=1e-3)


@pytest.mark.parametrize("num_blocks", [1, 4])
def test_pair_weighted_info_nce_equals_numpy_values_and_grads(num_blocks):
  img, texts, _ = _data(n=16, seed=6)
  v = _pair_weight(16)
  fn = lambda a, b: contrastive.info_nce(a, b, 6.0, num_blocks=num_blocks, pair_weight=v)[0]
  loss, (g_a, g_b) = jax.value_and_grad(fn, argnums=(0, 1))(img, texts[0])
  m = np.ones(16, bool)
  np_loss = lambda a, b: _np_info_nce(a, b, 6.0, m, v)
  np.testing.assert_allclose(float(loss), np_loss(img, texts[0]), rtol=2e-6)
  np.testing.assert_allclose(np.asarray(g_a), _np_grad(lambda x: np_loss(x, texts[0]), img),
                             rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(np.asarray(g_b), _np_grad(lambda x: np_loss(img, x), texts[0]),
                             rtol=1e-4, atol=2e-6)


def test_pair_weights_of_one_equal_the_unweighted_losses():
  img, texts, masks = _data(n=16, seed=7)
  ones = np.ones(16, np.float32)
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))(img, texts[0])
  for blocks in (1, 4):  # Bitwise: the weights multiply by exactly 1.0.
    plain = grad(lambda a, b, k=blocks: contrastive.info_nce(a, b, 6.0, num_blocks=k)[0])
    ones_ = grad(lambda a, b, k=blocks: contrastive.info_nce(a, b, 6.0, num_blocks=k,
                                                              pair_weight=ones)[0])
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(ones_)):
      np.testing.assert_array_equal(x, y)
  # The masked InfoNCE with weights has its own code path: equal within 1e-7.
  mask = jnp.asarray(masks[1])
  plain = grad(lambda a, b: multifield.masked_info_nce(a, b, 6.0, mask)[0])
  ones_ = grad(lambda a, b: multifield.masked_info_nce(a, b, 6.0, mask, weight=ones)[0])
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(ones_)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_score_to_weight_is_the_clipped_affine_map():
  s = np.array([-1.0, 0.0, 0.5, 1.5, 3.0, 4.0, 9.0], np.float32)
  got = np.asarray(pair_weights.score_to_weight(jnp.asarray(s), (0.0, 3.0), (0.2, 1.4)))
  u = np.clip((np.float64(s) - 0.0) / 3.0, 0.0, 1.0)
  np.testing.assert_allclose(got, 0.2 + 1.2 * u, rtol=1e-6)
  # The defaults: a score in [0, 1] is its own weight.
  np.testing.assert_array_equal(
      np.asarray(pair_weights.score_to_weight(jnp.asarray([0.0, 0.25, 1.0, 2.0]))),
      [0.0, 0.25, 1.0, 1.0])
  with pytest.raises(ValueError, match=r"score_range=\(1.0, 1.0\)"):
    pair_weights.check_ranges((1.0, 1.0), (0.0, 1.0))
  with pytest.raises(ValueError, match=r"weight_range=\(-0.5, 1.0\)"):
    pair_weights.check_ranges((0.0, 1.0), (-0.5, 1.0))


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_a_missing_field_is_excluded(kind):
  img, texts, masks = _data(seed=3)
  weights = (1.0, 1.0, 1.0)
  base, _ = _jax_multi(kind, img, texts, masks, weights)
  changed = [t.copy() for t in texts]
  rng = np.random.default_rng(9)
  for f in range(3):
    changed[f][~masks[f]] = _unit(rng, int((~masks[f]).sum()), img.shape[1])
  other, _ = _jax_multi(kind, img, changed, masks, weights)
  assert float(other) == float(base)
  # ... and changing a PRESENT field's text does change it.
  changed[1][masks[1].argmax()] *= -1.0
  assert float(_jax_multi(kind, img, changed, masks, weights)[0]) != float(base)


def test_masked_info_nce_without_mask_equals_info_nce():
  img, texts, _ = _data(n=16, seed=5)
  got, gm = multifield.masked_info_nce(img, texts[0], 9.0)
  want, wm = contrastive.info_nce(img, texts[0], 9.0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(gm["a2b_acc"]) == float(wm["a2b_acc"])


def test_masked_info_nce_of_no_valid_row_is_zero_and_finite():
  img, texts, _ = _data(n=6)
  mask = jnp.zeros(6, bool)
  loss, grads = jax.value_and_grad(
      lambda a, b: multifield.masked_info_nce(a, b, 5.0, mask)[0], argnums=(0, 1))(img, texts[0])
  assert float(loss) == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_bad_shapes_and_weights_are_named():
  img, texts, masks = _data(n=6)
  with pytest.raises(ValueError, match=r"mask \(5,\) must be \[B\] = \(6,\)"):
    multifield.masked_info_nce(img, texts[0], 1.0, jnp.ones(5, bool))
  with pytest.raises(ValueError, match=r"weight \(5,\) must be \[B\] = \(6,\)"):
    multifield.masked_info_nce(img, texts[0], 1.0, jnp.ones(6, bool), weight=jnp.ones(5))
  with pytest.raises(ValueError, match=r"pair_weight \(5,\) must be \[B\] = \(6,\)"):
    contrastive.info_nce(img, texts[0], 1.0, pair_weight=jnp.ones(5))
  with pytest.raises(ValueError, match=r"field_weights=\(1.0, -1.0\): -1.0 is not"):
    multifield.check_weights((1.0, -1.0), ("title", "colour"), "field_weights")
  with pytest.raises(ValueError, match=r"one weight per entry of \('title',\)"):
    multifield.check_weights((1.0, 2.0), ("title",), "field_weights")


def _brute_field_metrics(q, g, values, names, ks):
  """Independent float64 reference: sort each query's gallery (score desc, NON-matching first
  on ties) and read the matches off the list."""
  s = np.float64(q) @ np.float64(g).T
  out = {f"HITS@{k}": [] for k in ks} | {f"P@{k}": [] for k in ks} | {"MRR": []}
  for row, name in zip(s, names):
    match = [str(v).strip() == name for v in values]
    ranked = sorted(range(len(row)), key=lambda j: (-row[j], match[j]))
    first = next(r for r, j in enumerate(ranked) if match[j]) + 1
    out["MRR"].append(1.0 / first)
    for k in ks:
      out[f"HITS@{k}"].append(first <= k)
      out[f"P@{k}"].append(sum(match[j] for j in ranked[:k]) / k)
  return {k: float(np.mean(v)) for k, v in out.items()}


def test_field_metrics_equal_a_brute_force_ranking_with_ties():
  rng = np.random.default_rng(0)
  values = np.array(["red", "navy", "", "red ", "green", "navy", "red", "navy", "green", ""],
                    object)
  g = _unit(rng, len(values), 4)
  g[7] = g[6]  # A navy image equal to a red one: ties are pessimistic.
  names, positives = retrieval.field_queries(values)
  assert names == ["green", "navy", "red"]
  assert [p.tolist() for p in positives] == [[4, 8], [1, 5, 7], [0, 3, 6]]
  q = _unit(rng, 3, 4)
  q[2] = g[6]  # The red query's best image ties with a navy one.
  got = retrieval.field_metrics(q, g, positives, ks=(1, 5))
  want = _brute_field_metrics(q, g, values, names, (1, 5))
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-12), k
  assert got["num_queries"] == 3.0
  assert got["MRR"] < 1.0  # The tie counted against the red query.


def test_retrieval_evaluator_field_protocol():
  system = tm._StubSystem()  # pylint: disable=protected-access
  params, dataset_fn, raw = tm.stub_data(fields=("colour",))
  tokenized = {}

  def tokenizer(texts):
    ids = np.asarray([[3 + i % 40] * 5 for i in range(len(texts))], np.int32)
    tokenized.update(zip(texts, ids.tolist()))
    return ids
  ev = retrieval.Evaluator(system, config=None, split="test", protocols=("field",),
                           query_field="colour", query_template="a {} product", batch_size=8,
                           dataset_fn=dataset_fn, tokenizer=tokenizer)
  out = ev.run(params)
  assert sorted(tokenized) == ["a green product", "a navy product", "a red product"]
  names, positives = retrieval.field_queries(raw["colour"])
  img = np.asarray(system.embed_images(params, jnp.asarray(raw["images"])))
  q = np.asarray(system.embed_texts(params, jnp.asarray(tokenizer(
      [f"a {n} product" for n in names]))))
  want = retrieval.field_metrics(q, img, positives)
  assert out["test/field_colour/P@5"] == want["P@5"]
  assert out["test/field_colour/MRR"] == want["MRR"]
  assert "test/field_colour/MRR@d4" in out
  with pytest.raises(ValueError, match=r"'field' protocol and query_field go together"):
    retrieval.Evaluator(system, config=None, protocols=("field",), dataset_fn=dataset_fn)
