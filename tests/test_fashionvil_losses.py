"""FashionViL's objectives against float64 numpy formulas, and their global-batch semantics."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from fashion_jax.losses import fashionvil as fl


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_itc(a, b, s):
  a, b = _unit(a.astype(np.float64)), _unit(b.astype(np.float64))
  logits = s * s * a @ b.T
  return 0.5 * (-np.mean(np.diag(_log_softmax(logits))) - np.mean(np.diag(_log_softmax(logits.T))))


def _np_masked_ce(logits, targets, where):
  lp = _log_softmax(logits.astype(np.float64))
  total, n = 0.0, 0
  for idx in zip(*np.nonzero(where)):
    total -= lp[idx][targets[idx]]
    n += 1
  return total / max(n, 1)


def test_itc_matches_float64_formula_with_s_squared_cosine():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(12, 6)).astype(np.float32)
  b = (a + rng.normal(size=(12, 6))).astype(np.float32) * 3.0  # Unnormalised inputs.
  for s in (1.0, 4.0, 7.5):
    loss, m = fl.itc_loss(a, b, jnp.float32(s))
    np.testing.assert_allclose(float(loss), _np_itc(a, b, s), rtol=1e-5)
  sim = _unit(a) @ _unit(b).T
  np.testing.assert_allclose(float(m["i2t_acc"]), np.mean(sim.argmax(1) == np.arange(12)))
  np.testing.assert_allclose(float(m["t2i_acc"]), np.mean(sim.argmax(0) == np.arange(12)))


def test_itc_gradient_reaches_the_scale():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 8, 4)).astype(np.float32)
  g = jax.grad(lambda s: fl.itc_loss(a, b, s)[0])(jnp.float32(4.0))
  eps = 1e-3
  num = (_np_itc(a, b, 4.0 + eps) - _np_itc(a, b, 4.0 - eps)) / (2 * eps)
  np.testing.assert_allclose(float(g), num, rtol=1e-3)


def test_mlm_counts_only_masked_positions_over_the_whole_batch():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  labels = np.full((3, 7), -1, np.int32)
  labels[0, [1, 4]] = [3, 9]
  labels[2, 6] = 0          # Row 1 has no target at all.
  loss, m = fl.mlm_loss(logits, labels)
  np.testing.assert_allclose(float(loss), _np_masked_ce(logits, labels, labels >= 0), rtol=1e-5)
  assert float(m["num_targets"]) == 3
  # Not a mean of per-row means: row 0's two targets weigh twice row 2's one.
  per_row = np.mean([_np_masked_ce(logits[i:i + 1], labels[i:i + 1], labels[i:i + 1] >= 0)
                     for i in (0, 2)])
  assert abs(float(loss) - per_row) > 1e-4
  zero, _ = fl.mlm_loss(logits, np.full((3, 7), -1, np.int32))
  assert float(zero) == 0.0


def test_mpfc_selects_masked_patches_and_their_codes():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 9, 16)).astype(np.float32)
  codes = rng.integers(0, 16, size=(4, 9)).astype(np.int32)
  mask = rng.random((4, 9)) < 0.3
  loss, m = fl.mpfc_loss(logits, codes, mask)
  np.testing.assert_allclose(float(loss), _np_masked_ce(logits, codes, mask), rtol=1e-5)
  assert float(m["num_targets"]) == mask.sum()
  lp = logits.argmax(-1)
  np.testing.assert_allclose(float(m["acc"]), np.mean(lp[mask] == codes[mask]), rtol=1e-6)
  with pytest.raises(ValueError, match="MPFC shapes disagree"):
    fl.mpfc_loss(logits, codes[:, :8], mask[:, :8])


def _np_hardest(sim, text):
  b = sim.shape[0]
  out = np.arange(b)
  for i in range(b):
    best, arg = -np.inf, i
    for j in range(b):
      if j == i or np.array_equal(text[i], text[j]):
        continue
      if sim[i, j] > best:
        best, arg = sim[i, j], j
    out[i] = arg
  return out


def test_itm_hardest_negative_and_swap_match_numpy():
  rng = np.random.default_rng(4)
  b = 10
  sim = rng.normal(size=(b, b)).astype(np.float32)
  text = rng.integers(0, 50, size=(b, 5)).astype(np.int32)
  text[7] = text[3]         # Identical texts are never each other's negative.
  sim[3, 7] = sim[7, 3] = 100.0
  neg = fl.hardest_negatives(sim, text)
  np.testing.assert_array_equal(np.asarray(neg), _np_hardest(sim, text))
  assert int(neg[3]) != 7 and int(neg[7]) != 3
  u = rng.random(b).astype(np.float32)
  idx, labels = fl.itm_pairs(sim, u, text, 0.5)
  want_idx = np.where(u < 0.5, _np_hardest(sim, text), np.arange(b))
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(labels), (u >= 0.5).astype(np.int32))
  logits = rng.normal(size=(b, 2)).astype(np.float32)
  loss, _ = fl.itm_loss(logits, labels)
  np.testing.assert_allclose(float(loss), _np_masked_ce(logits, np.asarray(labels),
                                                        np.ones(b, bool)), rtol=1e-5)


def test_pac_uniform_soft_labels_on_cosine_logits():
  rng = np.random.default_rng(5)
  x_img, x_txt = rng.normal(size=(2, 6, 8)).astype(np.float32)
  w = rng.normal(size=(8, 5)).astype(np.float32)
  attrs = rng.random((6, 5)) < 0.4
  attrs[2] = False          # A product without any attribute adds nothing.
  zi, zt = fl.cosine_logits(x_img, w), fl.cosine_logits(x_txt, w)
  np.testing.assert_allclose(np.asarray(zi), _unit(x_img.astype(np.float64))
                             @ _unit(w.T.astype(np.float64)).T, rtol=1e-5, atol=1e-6)
  loss, m = fl.pac_loss(zi, zt, attrs)

  def np_soft(z):
    rows = [i for i in range(6) if attrs[i].any()]
    lp = _log_softmax(np.asarray(z, np.float64))
    return np.mean([-(attrs[i] / attrs[i].sum() * lp[i]).sum() for i in rows])
  np.testing.assert_allclose(float(loss), np_soft(zi) + np_soft(zt), rtol=1e-5)
  assert float(m["rows_with_attributes"]) == attrs.any(1).sum()


def test_drop_tokens_drops_exactly_a_quarter_of_droppable_positions():
  droppable = np.zeros((5, 12), bool)
  for i, n in enumerate((0, 3, 4, 9, 12)):
    droppable[i, :n] = True
  keep = np.asarray(fl.drop_tokens(jax.random.key(0), droppable, 0.25))
  dropped = ~keep
  assert not (dropped & ~droppable).any()
  np.testing.assert_array_equal(dropped.sum(1), [0, 0, 1, 2, 3])
  with pytest.raises(ValueError, match="Drop fraction 1.5"):
    fl.drop_tokens(jax.random.key(0), droppable, 1.5)


def test_task_sampling_frequencies_match_the_config():
  tasks = dict(itm=0.15, pac=0.15, itc=0.2, mvc=0.2, mlm=0.15, mpfc=0.15)
  names, probs = fl.task_probabilities(tasks)
  n = 20000
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
  draws = np.asarray(jax.vmap(lambda k: fl.sample_task(k, probs))(keys))
  freq = np.bincount(draws, minlength=len(names)) / n
  want = np.array([tasks[t] for t in names])
  # 4 standard deviations of a binomial proportion.
  np.testing.assert_array_less(np.abs(freq - want), 4 * np.sqrt(want * (1 - want) / n))
  names2, probs2 = fl.task_probabilities(dict(itc=3.0, mlm=1.0, mvc=0.0))
  assert names2 == ("itc", "mlm")
  np.testing.assert_allclose(np.asarray(probs2), [0.75, 0.25])
  with pytest.raises(ValueError, match="Unknown FashionViL task"):
    fl.task_probabilities(dict(itc=1.0, tia=1.0))
  with pytest.raises(ValueError, match="All task weights are zero"):
    fl.task_probabilities(dict(itc=0.0))


def test_sampled_task_loss_runs_only_the_drawn_branch():
  calls = [lambda: (jnp.float32(1.0), {"x": jnp.float32(10.0)}),
           lambda: (jnp.float32(2.0), {"x": jnp.float32(20.0)})]
  loss, m = jax.jit(lambda i: fl.sampled_task_loss(i, calls))(1)
  assert float(loss) == 2.0 and float(m["x"]) == 20.0


def test_itm_mining_over_the_sharded_global_batch_equals_one_device():
  """Hardest negatives are mined over the GLOBAL batch, not per device shard."""
  rng = np.random.default_rng(6)
  b, d = 16, 8
  img = rng.normal(size=(b, d)).astype(np.float32)
  txt = rng.normal(size=(b, d)).astype(np.float32)
  # Make every row's hardest negative live on ANOTHER device's shard (rows i and i + 8).
  txt[(np.arange(b) + 8) % b] += 3.0 * img
  text = np.arange(b * 4, dtype=np.int32).reshape(b, 4)
  u = rng.random(b).astype(np.float32)

  def f(img, txt, text, u):
    sim = fl.scaled_cosine_logits(img, txt, 1.0)
    idx, labels = fl.itm_pairs(sim, u, text)
    return idx, labels, text[idx]

  single = jax.jit(f)(img, txt, text, u)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  sh = NamedSharding(mesh, P("data"))
  args = [jax.device_put(x, sh) for x in (img, txt, text, u)]
  sharded = jax.jit(f, out_shardings=(sh, sh, sh))(*args)
  for a, b_ in zip(single, sharded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
  neg = np.asarray(fl.hardest_negatives(fl.scaled_cosine_logits(img, txt, 1.0), text))
  np.testing.assert_array_equal(neg, (np.arange(b) + 8) % b)  # Cross-shard picks.
