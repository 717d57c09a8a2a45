"""FashionViL downstream metrics and losses against float64 numpy references; config errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import f1_score

from configs import fashionvil_downstream as ds_config
from fashion_jax.evaluate import classification
from fashion_jax.evaluate import tgir
from fashion_jax.losses import fashionvil_downstream as dl
from fashion_jax.prepare import downstream as driver


def _ce(logits, labels):
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def test_target_ranks_pessimistic_ties_and_exclusion_vs_loop():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, (30, 12)).astype(np.float64)  # Many ties.
  target = rng.integers(0, 12, 30)
  exclude = np.where(rng.random(30) < 0.5, rng.integers(0, 12, 30), -1)
  exclude[exclude == target] = -1
  want, want_ex = [], []
  for q in range(30):
    others = [g for g in range(12) if g != target[q]]
    want.append(1 + sum(scores[q, g] >= scores[q, target[q]] for g in others))
    want_ex.append(1 + sum(scores[q, g] >= scores[q, target[q]] for g in others
                           if g != exclude[q]))
  np.testing.assert_array_equal(tgir.target_ranks(scores, target), want)
  np.testing.assert_array_equal(tgir.target_ranks(scores, target, exclude), want_ex)
  # A collapsed model (all scores equal) gets the worst rank, never a hit.
  assert tgir.target_ranks(np.zeros((3, 5)), np.array([0, 2, 4])).tolist() == [5, 5, 5]
  r = tgir.recall_at(np.array([1, 10, 11, 50, 51]), (10, 50))
  assert r == {"R@10": 0.4, "R@50": 0.8}
  with pytest.raises(ValueError, match="0 ranks"):
    tgir.recall_at(np.array([]), (10,))


def test_macro_f1_equals_sklearn_including_never_predicted_and_unseen_classes():
  rng = np.random.default_rng(1)
  for trial in range(5):
    y = rng.integers(-1, 6, 80)
    pred = np.where(rng.random(80) < 0.5, y, rng.integers(0, 7, 80))
    want = f1_score(y, pred, average="macro", labels=np.union1d(y, pred), zero_division=0)
    assert classification.macro_f1(y, pred) == pytest.approx(want, abs=1e-12), trial
  with pytest.raises(ValueError, match="equal 1-D"):
    classification.macro_f1(np.zeros(3), np.zeros(4))


def test_tgir_and_classification_losses_vs_float64():
  rng = np.random.default_rng(2)
  q, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  s = 3.0
  loss, m = dl.tgir_loss(jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32),
                         jnp.float32(s))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=1, keepdims=True)
  logits = s * s * qn @ tn.T
  np.testing.assert_allclose(float(loss), _ce(logits, np.arange(6)).mean(), rtol=1e-5)
  assert float(m["acc"]) == pytest.approx(np.mean(logits.argmax(1) == np.arange(6)))

  z = rng.normal(size=(7, 4))
  y = np.array([0, 3, -1, 2, -1, 1, 1])
  loss, m = dl.classification_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y))
  known = y >= 0
  np.testing.assert_allclose(float(loss), _ce(z[known], y[known]).mean(), rtol=1e-5)
  assert float(m["known"]) == 5
  loss, _ = dl.classification_loss(jnp.asarray(z, jnp.float32), jnp.full((7,), -1))
  assert float(loss) == 0.0


def _numpy_pair_masks(u, v, c, masks):
  logits = u[:, None, :] + v[None, :, :] + c
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  return attn @ np.maximum(masks, 0.0)


def _numpy_score(items, cats, mask, cand, cand_cat, table):
  vals = []
  for x, a, ok in zip(items, cats, mask):
    if ok:
      w = table[a, cand_cat]
      xw, yw = x * w, cand * w
      vals.append(xw @ yw / (np.linalg.norm(xw) * np.linalg.norm(yw)))
  return np.mean(vals)


def test_ocir_scores_vs_float64_loop_and_the_one_category_form_agrees():
  rng = np.random.default_rng(3)
  c, k, d, q, m, g = 4, 3, 6, 5, 3, 7
  u, v, cc = rng.normal(size=(c, k)), rng.normal(size=(c, k)), rng.normal(size=(k,))
  masks = rng.normal(1.0, 0.7, size=(k, d))  # Some negative entries: relu matters.
  table = _numpy_pair_masks(u, v, cc, masks)
  got_table = dl.pair_masks(*(jnp.asarray(x, jnp.float32) for x in (u, v, cc, masks)))
  np.testing.assert_allclose(np.asarray(got_table), table, rtol=1e-5, atol=1e-6)

  items = rng.normal(size=(q, m, d))
  cats = rng.integers(0, c, (q, m))
  mask = np.ones((q, m), bool)
  mask[0, 2] = mask[3, 1:] = False
  cands = rng.normal(size=(g, d))
  cand_cats = rng.integers(0, c, g)
  want = np.array([[_numpy_score(items[i], cats[i], mask[i], cands[j], cand_cats[j], table)
                    for j in range(g)] for i in range(q)])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  got = dl.ocir_scores(f32(items), jnp.asarray(cats), jnp.asarray(mask), f32(cands),
                       jnp.asarray(cand_cats), f32(table))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)

  for b in range(c):
    want_b = np.array([[_numpy_score(items[i], cats[i], mask[i], cands[j], b, table)
                        for j in range(g)] for i in range(q)])
    got_b = dl.ocir_scores_one_category(f32(items), jnp.asarray(cats), jnp.asarray(mask),
                                        f32(cands), b, f32(table))
    np.testing.assert_allclose(np.asarray(got_b), want_b, rtol=1e-4, atol=1e-5)

  scores = rng.uniform(-1, 1, size=(5, 5))
  loss, _ = dl.ocir_loss(f32(scores), jnp.float32(2.0))
  np.testing.assert_allclose(float(loss), _ce(4.0 * scores, np.arange(5)).mean(), rtol=1e-5)


def test_ocir_scores_are_category_conditioned():
  """The same two items score differently under different candidate categories."""
  rng = np.random.default_rng(4)
  table = jnp.asarray(rng.uniform(0.0, 2.0, size=(3, 3, 8)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
  s = [float(dl.ocir_scores(x, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), y,
                            jnp.array([b]), table)[0, 0]) for b in range(3)]
  assert len(set(np.round(s, 6))) == 3


def test_config_variants_and_errors():
  for task, variant in itertools.product(ds_config.TASKS, ds_config.VARIANTS):
    c = ds_config.get_config(f"{task}_{variant}")
    assert c.system == "fashionvil_downstream"
    assert list(c.evals) == [task]
    assert "batch_stats/.*" in c.optimizer.freeze
  assert ds_config.get_config("scr_smoke").objective.label_fields == ("subcategory",)
  assert ds_config.get_config("cr_smoke").objective.task == "cls"
  with pytest.raises(ValueError, match="TASK_VARIANT"):
    ds_config.get_config("vqa_smoke")
  with pytest.raises(ValueError, match="TASK_VARIANT"):
    ds_config.get_config("tgir_large")


def test_driver_row_columns():
  metrics = {f"test/sample100/{d}_R@{k}": v for d in ("i2t", "t2i")
             for k, v in zip((1, 5, 10), (0.1, 0.2, 0.3))}
  metrics.update({"validation/tgir/mean": 0.25, "test/cls/subcategory_acc": 0.8,
                  "test/ocir/R@10": 0.1, "test/ocir/R@30": 0.2, "test/ocir/R@50": 0.6})
  r = driver.row(metrics)
  assert r["ITR"] == pytest.approx(20.0) and r["TIR"] == pytest.approx(20.0)
  assert r["TGIR"] == pytest.approx(25.0) and r["SCR"] == pytest.approx(80.0)
  assert r["OCIR"] == pytest.approx(30.0)
  assert r["Meta-sum"] == pytest.approx(20 + 20 + 25 + 80 + 30)
  assert "ITR_full" not in r
  assert "| 20.00 |" in driver.format_row("x", r)


def _tiny_classifier(readout, num_classes=5):
  """A from-scratch smoke-size FashionViL (32 px, 2 x 2 grid) under a cls head."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import fashionvil as pre_config  # pylint: disable=g-import-not-at-top
  from fashion_jax.models import fashionvil_downstream as heads  # pylint: disable=g-import-not-at-top
  from fashion_jax.systems import fashionvil as fvil_system  # pylint: disable=g-import-not-at-top
  c = pre_config.get_config("smoke")
  c.data.image_size, c.data.max_len = 32, 12
  c.data.patch_mask = ml_collections.ConfigDict(dict(grid=2, count=1, min_block=1))
  c.objective.tasks = ml_collections.ConfigDict({"itc": 1.0})
  backbone = fvil_system.System(c).model
  return heads.FashionViLDownstream(vil=backbone, task="cls", num_classes=(num_classes,),
                                    cls_readout=readout)


def _class_batches(n, b=16, k=5, l=12, seed=0):
  """Text [CLS] w w w <class word> w ... [SEP]: the label is which of k words the text holds."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    y = rng.integers(0, k, b)
    ids = rng.integers(200, 400, (b, l))
    ids[:, 0], ids[:, -1] = 2, 3
    ids[np.arange(b), rng.integers(1, l - 1, b)] = 1000 + y
    images = rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8)
    out.append((jnp.asarray(images), jnp.asarray(ids, jnp.int32), jnp.ones((b, l), bool),
                jnp.asarray(y, jnp.int32)))
  return out


def _readout_spread(model, params, batch):
  """mean_d std_b(r) / (mean_b |r| / sqrt(D)) of the head's input r [B, D]: 0 = r ignores x."""

  def feature(mod, images, ids, mask):
    hidden, _ = mod.fused(images, ids, mask)
    return hidden[:, 0] if mod.cls_readout == "cls" else jnp.mean(hidden, axis=1)

  r = model.apply(params, *batch[:3], method=feature)
  return float(jnp.std(r, 0).mean() / jnp.linalg.norm(r, axis=-1).mean() * np.sqrt(r.shape[-1]))


def test_cls_readout_depends_on_the_input_head_gets_gradient_and_loss_falls():
  """Regression: SCR stayed at chance (CE = ln K, one class predicted) with the [CLS] readout.

  A from-scratch BERT's fusion [CLS] is nearly the same vector for every input (spread 0.008
  measured), so the head cannot tell examples apart; the 'mean' readout spreads ~25x more.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  batch = _class_batches(1)[0]
  spreads = {}
  for readout in ("cls", "mean"):
    model = _tiny_classifier(readout)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), *batch[:3]))
    spreads[readout] = _readout_spread(model, params, batch)
  assert spreads["cls"] < 0.05 and spreads["mean"] > 5 * spreads["cls"], spreads

  def loss_fn(p):
    (z,) = model.apply(p, *batch[:3], method=type(model).classify)
    return dl.classification_loss(z, batch[3])[0]

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss0, grads = value_and_grad(params)
  assert float(loss0) == pytest.approx(np.log(5), abs=0.3)
  head = {jax.tree_util.keystr(path): float(jnp.linalg.norm(g))
          for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if "cls_0" in jax.tree_util.keystr(path) or "pooler" in jax.tree_util.keystr(path)}
  assert len(head) == 8 and min(head.values()) > 0, head
  opt = optax.adam(3e-3)
  state = opt.init(params)
  for _ in range(3):
    updates, state = opt.update(value_and_grad(params)[1], state, params)
    params = optax.apply_updates(params, updates)
  assert float(value_and_grad(params)[0]) < float(loss0) - 0.1
  with pytest.raises(ValueError, match="cls_readout='first'"):
    _tiny_classifier("first").init(jax.random.PRNGKey(0), *batch[:3])


def test_trainer_input_hook_unknown_module_is_named_before_compiling(tmp_path):
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import downstream  # pylint: disable=g-import-not-at-top
  config = ds_config.get_config("scr_smoke")
  assert config_check.input_factory(config.input) is downstream.make_train_iterator
  with config.unlocked():
    config.input = "fashion_jax.data.no_such_input"
  # Raised by the config check: no dataset is read (data_dir is empty), nothing compiles.
  with pytest.raises(config_check.ConfigError, match=r"config.input='fashion_jax.data.no_such"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  config.input = "fashion_jax.losses.fashionvil_downstream"  # a module without the function
  with pytest.raises(config_check.ConfigError, match="has no make_train_iterator"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
