"""FashionViL model and system: sharing, fusion semantics, config errors, 8 devices == 1 device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import fashionvil as fashionvil_config
from fashion_jax.data import attributes
from fashion_jax.losses import fashionvil as fl
from fashion_jax.models import fashionvil as fvil
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.systems import fashionvil as system_lib
from fashion_jax.train import state as state_lib

B, S, L, GRID, CODES = 8, 32, 12, 2, 16


def tiny_config(tmp_path, **tasks):
  c = fashionvil_config.get_config("smoke")
  c.data.image_size = S
  c.data.max_len = L
  c.data.patch_mask = dict(grid=GRID, count=1, min_block=1)
  path = str(tmp_path / "attrs.txt")
  attributes.save_vocabulary([("red", 9), ("blue", 8), ("cotton", 7), ("silk scarf", 5)], path)
  c.data.attributes = path
  c.data.vq_codes = str(tmp_path / "codes.npz")  # Only checked for presence here.
  c.model.bert = dict(variant="tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_position=32, dropout_rate=0.1, attention_dropout_rate=0.0)
  c.model.num_codes = CODES
  if tasks:
    c.objective.tasks = tasks
  return c


def make_batch(system, seed=0):
  rng = np.random.default_rng(seed)
  b = system.dummy_batch(B)
  b["image"] = rng.integers(0, 256, b["image"].shape, dtype=np.uint8)
  if "image2" in b:
    b["image2"] = rng.integers(0, 256, b["image2"].shape, dtype=np.uint8)
  lengths = rng.integers(4, L + 1, B)
  text = rng.integers(5, 200, (B, L)).astype(np.int32)
  text[:, 0] = 2
  mask = np.arange(L)[None] < lengths[:, None]
  text = np.where(mask, text, 0).astype(np.int32)
  b["text"], b["text_mask"] = text, mask
  if "mlm_ids" in b:
    sel = mask & (rng.random((B, L)) < 0.3) & (np.arange(L) > 0)
    b["mlm_ids"] = np.where(sel, 4, text).astype(np.int32)
    b["mlm_labels"] = np.where(sel, text, -1).astype(np.int32)
  if "patch_mask" in b:
    b["patch_mask"] = np.zeros((B, GRID * GRID), bool)
    b["patch_mask"][np.arange(B), rng.integers(0, GRID * GRID, B)] = True
    b["vq_codes"] = rng.integers(0, CODES, (B, GRID * GRID)).astype(np.int32)
  if "attributes" in b:
    b["attributes"] = rng.random(b["attributes"].shape) < 0.4
  return b


def init(system, batch, seed=0):
  return nn.unbox(system.init(jax.random.key(seed), batch))


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_shared_bert_serves_text_and_fusion_and_the_ablation_separates_them(tmp_path):
  c = tiny_config(tmp_path, itc=1.0, mlm=1.0)
  shared = system_lib.System(c)
  batch = make_batch(shared)
  params = init(shared, batch)
  assert "fusion_bert" not in params["params"]
  c.model.share = False
  separate = system_lib.System(c)
  p2 = init(separate, batch)
  assert set(p2["params"]["fusion_bert"]) == set(p2["params"]["text_bert"])

  def grads(system, p, task):
    fn = lambda q: system.task_loss(task, q, batch, jax.random.key(0))[0]
    return jax.jit(jax.grad(fn))(p)

  # Shared: the one BERT is the text encoder and the fusion encoder by construction (no second
  # tree). Not shared: the text pass never touches the fusion BERT and the fusion pass never the
  # text one.
  g_itc, g_mlm = grads(separate, p2, "itc"), grads(separate, p2, "mlm")
  assert float(optax_norm(g_itc["params"]["fusion_bert"])) == 0
  assert float(optax_norm(g_itc["params"]["text_bert"])) > 0
  assert float(optax_norm(g_mlm["params"]["text_bert"])) == 0
  assert float(optax_norm(g_mlm["params"]["fusion_bert"])) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.slow  # ~30 s (default run time).
def test_vectors_fusion_masking_and_patch_zeroing(tmp_path):
  system = system_lib.System(tiny_config(tmp_path))
  batch = make_batch(system)
  params = init(system, batch)
  model = system.model
  images, text, mask = batch["image"], batch["text"], batch["text_mask"]

  tokens = model.apply(params, images, method=fvil.FashionViL.image_tokens)
  assert tokens.shape == (B, GRID * GRID, 32)
  uni = model.apply(params, images, text, mask, method=fvil.FashionViL.unimodal)
  np.testing.assert_allclose(np.asarray(uni["image"]), np.asarray(tokens).mean(1), rtol=1e-5,
                             atol=1e-6)
  # Text vector = masked mean: ids at padded positions do not matter.
  garbage = np.where(mask, text, 77).astype(np.int32)
  uni2 = model.apply(params, images, garbage, mask, method=fvil.FashionViL.unimodal)
  np.testing.assert_allclose(np.asarray(uni2["text"]), np.asarray(uni["text"]), atol=1e-5)

  # MPFC zeroes the grid FEATURES of masked patches: the token is the projection's bias.
  pm = batch["patch_mask"]
  masked_tokens = model.apply(params, images, pm, method=fvil.FashionViL.image_tokens)
  bias = params["params"]["image_proj"]["bias"]
  np.testing.assert_allclose(np.asarray(masked_tokens)[pm],
                             np.broadcast_to(bias, (pm.sum(), 32)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(masked_tokens)[~pm], np.asarray(tokens)[~pm], atol=1e-6)

  # Dropped image keys (MVC) do not influence the kept positions' fusion outputs.
  keep = np.ones((B, GRID * GRID), bool)
  keep[:, 1] = False
  t2 = np.asarray(tokens).copy()
  t2[:, 1] += np.random.default_rng(1).normal(size=(B, 32))  # Not a constant: LN removes it.
  h1 = model.apply(params, text, mask, tokens, keep, method=fvil.FashionViL.fuse)
  h2 = model.apply(params, text, mask, t2, keep, method=fvil.FashionViL.fuse)
  kept = np.concatenate([np.ones(L, bool), keep[0]])
  np.testing.assert_allclose(np.asarray(h1)[:, kept], np.asarray(h2)[:, kept], atol=1e-5)
  assert np.abs(np.asarray(h1)[:, L + 1] - np.asarray(h2)[:, L + 1]).max() > 1e-3
  # ...while an attended one does.
  h3 = model.apply(params, text, mask, t2, None, method=fvil.FashionViL.fuse)
  assert np.abs(np.asarray(h3)[:, 0] - np.asarray(h1)[:, 0]).max() > 1e-4

  # Two-tower embeddings are unit vectors; the logit scale is s^2.
  e = system.embed_images(params, images)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=1), 1.0, rtol=1e-5)
  t = system.embed_texts(params, text)
  np.testing.assert_allclose(np.asarray(t), np.asarray(uni["text"]) / np.linalg.norm(
      np.asarray(uni["text"]), axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
  assert float(system.logit_scale(params)) == pytest.approx(16.0)


def test_weighted_sum_mode_adds_every_task(tmp_path):
  c = tiny_config(tmp_path, itc=2.0, pac=0.5)
  c.objective.mode = "sum"
  system = system_lib.System(c)
  batch = make_batch(system)
  params = init(system, batch)
  loss, m = system.loss(params, batch, jax.random.key(1), train=False)
  want = 2.0 * m["itc/loss"] + 0.5 * m["pac/loss"]
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.optimizer, "freeze", ()), "add 'batch_stats/.*' to optimizer.freeze"),
    (lambda c: setattr(c.data, "attributes", ""), "PAC task needs data.attributes"),
    (lambda c: setattr(c.data, "vq_codes", ""), "MPFC task needs cached VQ codes"),
    (lambda c: setattr(c.data.patch_mask, "grid", 3), "data.patch_mask.grid=3 gives 9"),
    (lambda c: setattr(c.data, "views", 1), "MVC task needs data.views=2"),
    (lambda c: setattr(c.objective, "mode", "mean"), "objective.mode='mean'"),
    (lambda c: setattr(c.data.tokenizer, "kind", "clip"), "tokenizer.kind='bert'"),
])
def test_config_errors_name_the_bad_value(tmp_path, change, message):
  c = tiny_config(tmp_path)
  change(c)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")
                     .replace("*", r"\*")):
    system_lib.System(c)


@pytest.mark.slow
def test_pretraining_step_on_8_devices_equals_one_device_for_every_task(tmp_path):
  """Loss and gradients of the sampled-task loss on a (2, 2, 2) mesh == one device, per task."""
  c = tiny_config(tmp_path)
  system = system_lib.System(c)
  batch = make_batch(system, seed=3)

  # One step key per task: the step keys the trainer would use that draw each task.
  keys, seen = [], set()
  for step in range(200):
    key = jax.random.fold_in(jax.random.key(0), step)
    task = int(fl.sample_task(jax.random.split(key)[0], system.probs))
    if task not in seen:
      seen.add(task)
      keys.append((system.tasks[task], key))
  assert len(keys) == 6

  def loss_and_grads(p, b, key):
    return jax.value_and_grad(lambda q: system.loss(q, b, key), has_aux=True)(p)

  mesh = mesh_lib.create_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding_lib.logical_rules(None)
  shapes = state_lib.abstract_params(system, mesh, rules, seed=0)
  init_fn = lambda: nn.unbox(system.init(jax.random.key(0), system.dummy_batch(B)))
  params1 = jax.jit(init_fn)()
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    params8 = jax.jit(init_fn, out_shardings=shapes.shardings)()
  assert any(len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.size < x.size
             for x in jax.tree.leaves(params8))
  batch8 = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp"))))
            for k, v in batch.items()}

  def sharded(p, b, key):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return loss_and_grads(p, b, key)

  f1, f8 = jax.jit(loss_and_grads), jax.jit(sharded)
  for task, key in keys:
    (l1, m1), g1 = f1(params1, batch, key)
    (l8, m8), g8 = f8(params8, batch8, key)
    assert float(m1[f"task/{task}"]) == 1.0 == float(m8[f"task/{task}"])
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-5, atol=1e-5, err_msg=task)
    for k in m1:
      np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-5,
                                 err_msg=f"{task}: {k}")
    flat1 = jax.tree_util.tree_leaves_with_path(jax.device_get(g1))
    flat8 = jax.tree.leaves(jax.device_get(g8))
    assert float(optax_norm(g1)) > 0, task
    for (path, a), b_ in zip(flat1, flat8):
      np.testing.assert_allclose(b_, a, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{task}: {jax.tree_util.keystr(path)}")


@pytest.mark.slow  # Two pretraining step compiles of all six tasks.
def test_encode_chunks_step_equals_unchunked(tmp_path):
  """model.encode_chunks=2 (row-chunks, rematerialised) == 1: loss, metrics and gradients of
  all six tasks summed (objective.mode='sum'; MVC's two views set the peak at 4k, ITM makes two
  chunked passes), each task's loss compared too, within 1e-5 in float32. Dropout is off: with
  it, each chunk draws its own masks (same distribution, other numbers)."""
  c = tiny_config(tmp_path, **fashionvil_config.TASKS)
  c.objective.mode = "sum"
  c.model.bert.dropout_rate = 0.0
  plain = system_lib.System(c)
  c.model.encode_chunks = 2
  chunked = system_lib.System(c)
  batch = make_batch(plain, seed=5)
  params = init(plain, batch)

  def loss_and_grads(system):
    fn = lambda p: system.loss(p, batch, jax.random.key(2), train=True)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (l1, m1), g1 = loss_and_grads(plain)
  (l2, m2), g2 = loss_and_grads(chunked)
  np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5, atol=1e-5)
  assert set(m1) == set(m2) and {f"{t}/loss" for t in plain.tasks} <= set(m1)
  for k in m1:
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-5, err_msg=k)
  flat1 = jax.tree_util.tree_leaves_with_path(jax.device_get(g1))
  flat2 = jax.tree.leaves(jax.device_get(g2))
  assert float(optax_norm(g1)) > 0
  for (path, a), b in zip(flat1, flat2):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_encode_chunks_must_divide_the_batch(tmp_path):
  c = tiny_config(tmp_path, itc=1.0)
  c.model.encode_chunks = 3
  system = system_lib.System(c)
  batch = make_batch(system)
  params = init(system, batch)
  with pytest.raises(ValueError, match="num_chunks=3 does not divide the batch of 8 rows"):
    system.loss(params, batch, jax.random.key(0), train=False)
