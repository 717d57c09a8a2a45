"""FashionBERT: model layout, losses vs numpy/torch, TIA negatives, sharding, export, HF import."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch

from configs import fashionbert as fb_config
from fashion_jax.data import tokenizers
from fashion_jax.losses import masked
from fashion_jax.losses import matching
from fashion_jax.models import fashionbert as fb_lib
from fashion_jax.parallel import axes
from fashion_jax.systems import fashionbert as fb_system

L, S, GRID = 12, 32, 4


def _config(**objective):
  c = fb_config.get_config("smoke")
  # The ResNet patch path (smoke itself runs on pooled pixels: tests/test_fashionbert_pixels.py).
  c.model.cnn_variant, c.optimizer.freeze = "tiny", fb_config.FREEZE_CNN
  c.data.image_size, c.data.max_len = S, L
  c.data.patch_mask = dict(grid=GRID, count=3, min_block=1, max_block=1)
  c.model.grid = GRID
  c.model.bert = dict(num_layers=1, dropout_rate=0.1, attention_dropout_rate=0.1)
  c.objective.update(objective)
  return c


def _batch(system, b=16, seed=0):
  rng = np.random.default_rng(seed)
  tok = system.tokenizer
  text = rng.integers(5, tok.vocab_size, (b, L)).astype(np.int32)
  text[:, 0] = tok.bos_token_id
  lengths = rng.integers(4, L + 1, b)
  mask = np.arange(L)[None] < lengths[:, None]
  text = np.where(mask, text, tok.pad_token_id)
  text[np.arange(b), lengths - 1] = tok.eos_token_id
  labels = np.where(mask & (rng.random((b, L)) < 0.3), text, -1).astype(np.int32)
  labels[:, 0] = -1
  mlm_ids = np.where(labels >= 0, tok.mask_token_id, text).astype(np.int32)
  patch_mask = np.zeros((b, GRID * GRID), bool)
  for i in range(b):
    patch_mask[i, rng.choice(GRID * GRID, 3, replace=False)] = True
  return {"image": rng.integers(0, 256, (b, S, S, 3)).astype(np.uint8), "text": text,
          "text_mask": mask, "mlm_ids": mlm_ids, "mlm_labels": labels, "patch_mask": patch_mask,
          "product_key": (np.arange(b) // 2).astype(np.int32),           # 2 rows per product
          "subcategory_key": (np.arange(b) % 3).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
  """(system, batch of 16, variables): one init shared by the model tests (compiles are slow)."""
  system = fb_system.System(_config())
  b = _batch(system, b=16)
  variables = jax.device_get(nn.unbox(jax.jit(system.init)(jax.random.key(0), b)))
  return system, b, variables


# ------------------------------------------------------------------------------------------------
# Losses.
# ------------------------------------------------------------------------------------------------
def test_mlm_loss_matches_torch_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32)
  labels = np.where(rng.random((3, 5)) < 0.5, rng.integers(0, 11, (3, 5)), -1).astype(np.int32)
  loss, m = masked.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
  ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 11),
                                          torch.tensor(labels, dtype=torch.long).reshape(-1),
                                          ignore_index=-1)
  np.testing.assert_allclose(loss, ref.item(), rtol=1e-6)
  valid = labels >= 0
  np.testing.assert_allclose(m["mlm_acc"], (logits.argmax(-1) == labels)[valid].mean(),
                             rtol=1e-6)
  loss0, _ = masked.mlm_loss(jnp.asarray(logits), jnp.full((3, 5), -1))
  assert float(loss0) == 0.0


def test_mpm_kl_matches_float64_numpy():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(2, 4, 6)).astype(np.float32)
  target = rng.normal(size=(2, 4, 6)).astype(np.float32) * 3
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], bool)

  def log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(
        -1, keepdims=True))

  q = np.exp(log_softmax(target))
  kl = (q * (log_softmax(target) - log_softmax(pred))).sum(-1)
  loss, m = masked.mpm_kl_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(loss, kl[mask].mean(), rtol=1e-5)
  assert m["mpm_targets"] == 3
  # The target is a constant: no gradient flows into it.
  g = jax.grad(lambda t: masked.mpm_kl_loss(jnp.asarray(pred), t, jnp.asarray(mask))[0])(
      jnp.asarray(target))
  assert float(jnp.abs(g).max()) == 0.0


def test_group_negatives_same_subcategory_other_product():
  product = jnp.array([0, 0, 1, 2, 3, 4, 5, 5])
  group = jnp.array([7, 7, 7, 8, 8, 9, 1, 1])   # 5: alone in group 9; 6, 7: one product in 1.
  for seed in range(20):
    partner, has, stats = matching.group_negatives(jax.random.key(seed), group, product)
    partner = np.asarray(partner)
    assert np.asarray(has).all()
    assert (np.asarray(product)[partner] != np.asarray(product)).all()
    for i in range(5):                      # rows with a same-group, other-product partner
      assert group[partner[i]] == group[i], (seed, i, partner)
    np.testing.assert_allclose(stats["neg_same_group_frac"], 5 / 8)
    np.testing.assert_allclose(stats["neg_fallback_frac"], 3 / 8)
  # Both same-group candidates of row 2 (rows 0 and 1) get drawn.
  drawn = {int(matching.group_negatives(jax.random.key(s), group, product)[0][2])
           for s in range(30)}
  assert drawn == {0, 1}
  # One product only: nobody has a negative.
  _, has, stats = matching.group_negatives(jax.random.key(0), group, jnp.zeros(8, jnp.int32))
  assert not np.asarray(has).any() and float(stats["neg_none_frac"]) == 1.0


def test_matching_loss_and_score():
  logits = jnp.array([[0.0, 2.0], [1.0, -1.0], [0.5, 0.2]])
  labels = jnp.array([1, 0, 1])
  loss, m = matching.matching_loss(logits, labels)
  ref = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)),
                                          torch.tensor([1, 0, 1]))
  np.testing.assert_allclose(loss, ref.item(), rtol=1e-6)
  np.testing.assert_allclose(m["tia_acc"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(matching.alignment_score(logits), [2.0, -2.0, -0.3], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------
def test_patch_features_are_the_cnn_on_each_grid_cell(setup):
  system, b, variables = setup
  feats = np.asarray(jax.jit(system.patch_features)(variables, b["image"]))
  assert feats.shape == (16, GRID * GRID, system.model.feature_dim)
  p = S // GRID
  model = system.model
  for idx in (0, 5, GRID * GRID - 1):
    r, c = divmod(idx, GRID)
    crop = b["image"][:, r * p:(r + 1) * p, c * p:(c + 1) * p]
    x = (crop / 255.0 - np.array(fb_lib.IMAGENET_MEAN)) / np.array(fb_lib.IMAGENET_STD)
    cnn_vars = {"params": variables["params"]["cnn"],
                "batch_stats": variables["batch_stats"]["cnn"]}
    want = jax.jit(model.cnn.apply)(cnn_vars, jnp.asarray(x, jnp.float32))["pooled"]
    np.testing.assert_allclose(feats[:, idx], want, rtol=1e-5, atol=1e-6)


def test_masked_patches_only_change_through_their_features(setup):
  system, b, variables = setup
  feats = jax.jit(system.patch_features)(variables, b["image"])
  pm = jnp.zeros((16, GRID * GRID), bool).at[:, 3].set(True)
  apply = jax.jit(system.model.apply)
  zeroed = apply(variables, b["text"], b["text_mask"], features=feats.at[:, 3].set(0.0))
  masked_out = apply(variables, b["text"], b["text_mask"], features=feats, patch_mask=pm)
  plain = apply(variables, b["text"], b["text_mask"], features=feats)
  np.testing.assert_allclose(zeroed["hidden"], masked_out["hidden"], atol=1e-6)
  assert float(jnp.abs(plain["hidden"] - masked_out["hidden"]).max()) > 1e-3


# ------------------------------------------------------------------------------------------------
# System: loss semantics, sharding.
# ------------------------------------------------------------------------------------------------
def test_loss_semantics(setup):
  _, b, variables = setup
  system = fb_system.System(_config(weighting="equal"))
  loss, m = jax.jit(system.loss, static_argnames="train")(variables, b, jax.random.key(3),
                                                          train=False)
  np.testing.assert_allclose(loss, (m["loss_mlm"] + m["loss_tia"] + m["loss_mpm"]) / 3,
                             rtol=1e-6)
  # MLM/MPM only count aligned rows: fewer targets than in the whole batch, in proportion.
  pos = float(m["tia_pos_frac"])
  assert 0 < pos < 1
  np.testing.assert_allclose(m["mpm_targets"], 3 * round(pos * 16))
  assert float(m["mlm_targets"]) < (b["mlm_labels"] >= 0).sum()
  np.testing.assert_allclose(m["neg_same_group_frac"], 1.0)  # every row has a same-group other
  # The CNN gets no gradient.
  grads = jax.jit(jax.grad(lambda v: system.loss(v, b, jax.random.key(3))[0]))(variables)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads["params"]["cnn"])) == 0.0
  assert float(jnp.abs(grads["params"]["patch_proj"]["kernel"]).max()) > 0


def test_mlm_max_predictions_keeps_the_first_targets(setup):
  full, b, variables = setup
  capped = fb_system.System(_config(mlm_max_predictions=2))
  _, m_full = jax.jit(full.loss, static_argnames="train")(variables, b, jax.random.key(3),
                                                           train=False)
  _, m_cap = jax.jit(capped.loss, static_argnames="train")(variables, b, jax.random.key(3),
                                                           train=False)
  assert float(m_cap["mlm_targets"]) + float(m_cap["mlm_dropped"]) == float(
      m_full["mlm_targets"])
  assert float(m_cap["mlm_dropped"]) > 0


# Heavy (22 s): the slow job, beside the sharded FashionBERT steps with levers
# (tests/test_levers_systems.py -k fashionbert_sharded).
@pytest.mark.slow
def test_eight_devices_equal_one_device(setup):
  """Loss, metrics and gradients of the training loss (dropout on) on a data=8 mesh equal one
  device within 1e-5: the negatives are drawn over the global batch either way."""
  assert len(jax.devices()) == 8
  _, b, variables = setup
  system = fb_system.System(_config(weight_grad="through"))
  rng = jax.random.key(11)

  def loss_and_grad(v, batch, key):
    return jax.value_and_grad(lambda p: system.loss(p, batch, key, train=True),
                              has_aux=True)(v)

  d0 = jax.devices()[0]
  v1 = jax.device_put(variables, d0)
  (l1, m1), g1 = jax.jit(loss_and_grad)(v1, jax.device_put(b, d0), rng)

  mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(("data", "fsdp")))

  def sharded(v, batch, key):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
        nn.logical_axis_rules(axes.DEFAULT_RULES):
      return loss_and_grad(v, batch, key)

  v8 = jax.device_put(variables, rep)
  b8 = jax.device_put(b, data)
  assert len(b8["image"].sharding.device_set) == 8
  (l8, m8), g8 = jax.jit(sharded, out_shardings=rep)(v8, b8, rng)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  flat1 = jax.tree_util.tree_leaves_with_path(g1)
  flat8 = dict(jax.tree_util.tree_leaves_with_path(g8))
  for path, x in flat1:
    np.testing.assert_allclose(flat8[path], x, rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("change,match", [
    (lambda c: c.data.tokenizer.update(kind="clip"), "tokenizer.kind='clip' must be 'bert'"),
    (lambda c: c.optimizer.update(freeze=()), "does not cover"),
    (lambda c: c.data.patch_mask.update(grid=8), "patch_mask.grid=8 must equal model.grid=4"),
    (lambda c: c.data.update(image_size=30), "image_size=30 is not divisible"),
    (lambda c: c.objective.update(weighting="uncertainty"), "weighting='uncertainty'"),
    (lambda c: c.objective.update(weight_grad="half"), "weight_grad='half'"),
])
def test_config_errors(change, match):
  c = _config()
  change(c)
  with pytest.raises(ValueError, match=match):
    fb_system.System(c)


# ------------------------------------------------------------------------------------------------
# Interop.
# ------------------------------------------------------------------------------------------------
def test_torch_export_parity(tmp_path, setup):
  from fashion_jax.interop import fashionbert_torch  # pylint: disable=g-import-not-at-top
  system, b, variables = setup
  b = {k: v[:3] for k, v in b.items()}
  # Non-trivial BN statistics and biases, so every exported array matters.
  noise = np.random.default_rng(1)
  variables = jax.tree.map(
      lambda x: np.asarray(x) + 0.05 * noise.standard_normal(x.shape).astype(np.float32),
      variables)
  variables["batch_stats"] = jax.tree.map(lambda x: np.abs(x) + 0.5, variables["batch_stats"])
  model = system.model
  out = jax.jit(model.apply)(variables, b["text"], b["text_mask"], images=b["image"],
                             patch_mask=b["patch_mask"])
  text_h, patch_h = out["hidden"][:, :L], out["hidden"][:, L:]
  mlm = jax.jit(lambda v, h: model.apply(v, h, method=model.mlm_logits))(variables, text_h)
  mpm = jax.jit(lambda v, h: model.apply(v, h, method=model.mpm_predict))(variables, patch_h)

  fashionbert_torch.export_fashionbert(variables, model, tmp_path / "export", image_size=S)
  tm = fashionbert_torch.load_fashionbert_torch(tmp_path / "export")
  with torch.no_grad():
    t = tm(torch.tensor(b["text"], dtype=torch.long), torch.tensor(b["text_mask"]),
           images=torch.tensor(b["image"]), patch_mask=torch.tensor(b["patch_mask"]))
    t_mlm = tm.mlm_logits(t["hidden"][:, :L])
    t_mpm = tm.mpm_predict(t["hidden"][:, L:])
  valid = np.concatenate([b["text_mask"], np.ones((3, GRID * GRID), bool)], 1)
  np.testing.assert_allclose(t["features"].numpy(), out["features"], atol=1e-4)
  np.testing.assert_allclose(t["hidden"].numpy()[valid], np.asarray(out["hidden"])[valid],
                             atol=1e-4)
  np.testing.assert_allclose(t["align_logits"].numpy(), out["align_logits"], atol=1e-4)
  np.testing.assert_allclose(t_mlm.numpy()[b["text_mask"]], np.asarray(mlm)[b["text_mask"]],
                             atol=1e-4)
  np.testing.assert_allclose(t_mpm.numpy(), mpm, atol=1e-4)
  # bert/ alone is a standard BertModel directory.
  import transformers  # pylint: disable=g-import-not-at-top
  alone = transformers.BertModel.from_pretrained(str(tmp_path / "export" / "bert"))
  assert alone.config.hidden_size == model.bert.hidden_size


def test_pretrained_bert_import(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer("bert", "", L)
  hf = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64)).eval()
  hf.save_pretrained(tmp_path / "bert")
  c = _config()
  c.init.hf_bert_dir = str(tmp_path / "bert")
  c.model.bert = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
  system = fb_system.System(c)
  assert system.model.bert.hidden_size == 32
  variables = system.pretrained_params()
  word = np.asarray(variables["params"]["bert"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(word, hf.bert.embeddings.word_embeddings.weight.detach().numpy())
  # The MLM head came from the checkpoint: same logits as BertForMaskedLM's head.
  h = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  ours = jax.jit(lambda v, x: system.model.apply(v, x, method=system.model.mlm_logits))(
      variables, jnp.asarray(h))
  with torch.no_grad():
    ref = hf.cls(torch.tensor(h))
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
