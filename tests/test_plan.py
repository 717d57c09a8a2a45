"""launch/plan.py: analytic FLOPs vs XLA, planned memory vs real arrays, blockwise InfoNCE.

* The analytic FLOPs equal the cost analysis of an UNROLLED compile within a few % (XLA also
  counts the optimizer and elementwise work), while a scanned compile counts the layer body
  once: the reason the planner does not use XLA's count for scanned models.
* The planner's per-device argument/output bytes equal the bytes of the real train state,
  batch and step outputs on device 0 of an 8-device mesh, and its temporaries equal those of the
  trainer's jitted step compiled on those arrays; the command-line planner (which re-executes
  itself with N fake devices) reports the same numbers.
* Blockwise InfoNCE == dense InfoNCE (loss, metrics, gradients) within 1e-6, also with the
  batch sharded over 8 devices, and chunked encoding == direct encoding.
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import fashionclip as fashionclip_config
from configs import fashionsiglip as fashionsiglip_config
from fashion_jax.losses import contrastive
from fashion_jax.models import flops as flops_lib
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.systems import fashionclip
from fashion_jax.train import state as state_lib
from fashion_jax.train import plan
from tests import numerics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=64, num_layers=2, num_heads=2, mlp_dim=256, patch_size=8)


def tiny_config(scan=False, batch=32):
  c = fashionclip_config.get_config("smoke")
  c.data.image_size, c.data.max_len = 32, 16
  c.model.projection_dim = 64
  c.model.vision = dict(TINY)
  c.model.text = {k: v for k, v in TINY.items() if k != "patch_size"}
  c.model.scan = scan
  c.batch_size = batch
  return c


def test_analytic_flops_match_unrolled_compile_and_scan_undercounts():
  mesh = mesh_lib.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  unrolled, _, _, system = plan.compile_step(tiny_config(scan=False), mesh)
  analytic = plan.analytic_flops(system, 32)
  xla = plan.xla_flops(unrolled)
  assert abs(xla - analytic) / analytic < 0.05, (xla, analytic)
  scanned, _, _, _ = plan.compile_step(tiny_config(scan=True), mesh)
  # Two layers per tower, body counted once: about half the matmul FLOPs are missing.
  assert plan.xla_flops(scanned) < 0.6 * analytic


def test_pooled_last_layer_flops_match_unrolled_compile():
  """model.pooled_last_layer: the analytic count drops the last layers' skipped work (2 layers
  per tower here: about a third of the matmuls) and still matches XLA's count of the step."""
  mesh = mesh_lib.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  config = tiny_config(scan=False)
  config.model.pooled_last_layer = True
  compiled, _, _, system = plan.compile_step(config, mesh)
  assert system.model_config.pooled_last_layer
  assert plan.levers(config) == "float32 pooled_last_layer"
  analytic = plan.analytic_flops(system, 32)
  full = plan.analytic_flops(types.SimpleNamespace(
      model_config=dataclasses.replace(system.model_config, pooled_last_layer=False),
      objective=getattr(system, "objective", None), config=system.config), 32)
  assert analytic < 0.8 * full, (analytic, full)
  xla = plan.xla_flops(compiled)
  assert abs(xla - analytic) / analytic < 0.05, (xla, analytic)


@pytest.mark.slow  # An unrolled SigLIP step compile (minutes on a loaded machine).
def test_siglip_analytic_flops_match_unrolled_compile():
  """SigLIP towers (no class token, attention-pool head, last-token text head with a bias, the
  sigmoid loss): the analytic count equals an unrolled compile's cost analysis within 5%, and
  CLIP's formula (class token, vision projection, no pool head) would not be the same count."""
  c = fashionsiglip_config.get_config("smoke")
  c.data.image_size, c.data.max_len = 32, 16
  c.model.vision = dict(TINY, patch_size=8)
  c.model.text = {k: v for k, v in TINY.items() if k != "patch_size"}
  c.model.scan = False
  c.model.matryoshka_dims, c.loss.matryoshka_weights = (), ()
  c.data.fields, c.loss.field_weights = (), ()
  c.batch_size = 32
  mesh = mesh_lib.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  compiled, _, _, system = plan.compile_step(c, mesh)
  analytic = plan.analytic_flops(system, 32)
  xla = plan.xla_flops(compiled)
  assert abs(xla - analytic) / analytic < 0.05, (xla, analytic)
  cfg = system.model_config
  assert analytic == flops_lib.siglip_train_flops_per_step(cfg, 32, c.data.max_len)
  # The pool head alone: 2 w^2 (q) + 4 n w^2 (k, v) + 2 w^2 (out) + 4 n w (attention) + 4 w m.
  v = cfg.vision
  n, w = v.num_patches, v.width
  head = 2 * w * w + 4 * n * w * w + 2 * w * w + 4 * n * w + 4 * w * v.mlp_dim
  assert flops_lib.attention_pool_flops(w, v.mlp_dim, n) == head


@pytest.mark.parametrize("accum", [1, 2])
def test_field_dedup_flops_count_the_rows_encoded(accum):
  """With model.field_dedup U the text tower encodes U field rows per micro-batch instead of
  B * F: the count drops by 3 (U - B F) text rows' FLOPs; the [B, B] logits are unchanged."""
  c = fashionsiglip_config.get_config("smoke")  # 5 fields.
  c.data.max_len = 16
  c.batch_size, c.grad_accum_steps = 32, accum
  from_config = lambda: fashionclip.System(c)
  c.model.field_dedup = 0  # The recipe's 128 would apply to these 160 rows too.
  off = plan.analytic_flops(from_config(), 32)
  c.model.field_dedup = 64
  system = from_config()
  t, p = system.model_config.text, system.model_config.projection_dim
  row = flops_lib.tower_flops(t.width, t.num_layers, t.mlp_dim, 16) + 2 * t.width * p
  encoded = 64 * accum  # U rows per micro-batch of 32 / accum products (160 / accum rows).
  assert plan.analytic_flops(system, 32) == pytest.approx(off - 3 * (32 * 5 - encoded) * row,
                                                          rel=1e-12)


def _device0_bytes(tree):
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


@pytest.mark.slow
def test_planned_memory_equals_real_arrays_on_8_devices(tmp_path):
  config = tiny_config(scan=True)
  config.model.remat_policy = "nothing_saveable"
  row = plan.plan(config, "fsdp_tensor", devices=8, tensor=2, peak_tflops=100.0, mfu=0.5,
                  name="tiny")
  assert row["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}

  # The trainer's path on real arrays.
  from fashion_jax.train import config_check, optimizer as optimizer_lib, step as step_lib
  from fashion_jax.systems import fashionclip
  config = config_check.with_defaults(config)
  config.mesh = dict(data=1, fsdp=4, tensor=2)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:8])
  rules = sharding_lib.logical_rules(None)
  system = fashionclip.System(config)
  shapes = state_lib.abstract_params(system, mesh, rules, 0)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params,
                                              config.total_steps)
  _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, 0, shapes)
  state = state_lib.create_train_state(system, tx, mesh, rules, 0, state_sh, shapes)
  step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh)
  batch = sharding_lib.global_batch(system.dummy_batch(32), mesh)
  real = plan.memory_row(step.lower(state, batch).compile())
  assert row["argument_bytes"] == _device0_bytes((state, batch)) == real["argument_bytes"]
  assert row["temp_bytes"] == real["temp_bytes"]
  out = step(state, batch)
  assert row["output_bytes"] == real["output_bytes"]
  # XLA also counts the output tuple's index table: one 8-byte pointer per output buffer.
  assert 0 <= row["output_bytes"] - _device0_bytes(out) <= 8 * len(jax.tree.leaves(out))
  # Sharding works: each device holds a fraction of the params (fsdp x tensor = 8 ways,
  # small or indivisible leaves replicated).
  total = sum(x.nbytes for x in jax.tree.leaves(out[0].params))
  assert _device0_bytes(out[0].params) < 0.3 * total

  # The command-line planner (re-executed with 8 fake devices) gives the same row.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, "-m", "launch.plan", "--config=configs/fashionclip.py:smoke",
         "--devices=8", "--tensor=2", "--strategies=fsdp_tensor", "--name=tiny",
         f"--jsonl={tmp_path / 'plan.jsonl'}", "--set", "data.image_size=32",
         "--set", "data.max_len=16",
         "--set", "model.projection_dim=64", "--set", f"model.vision={TINY!r}",
         "--set", f"model.text={ {k: v for k, v in TINY.items() if k != 'patch_size'}!r}",
         "--set", "model.scan=True", "--set", "model.remat_policy='nothing_saveable'",
         "--set", "batch_size=32"]
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-2000:]
  cli = json.loads((tmp_path / "plan.jsonl").read_text())
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "flops_per_step", "params"):
    assert cli[key] == row[key], key


def test_strategy_meshes_and_errors():
  assert plan.strategy_mesh("dp", 64, 4) == dict(data=64, fsdp=1, tensor=1)
  assert plan.strategy_mesh("fsdp_tensor", 64, 4) == dict(data=1, fsdp=16, tensor=4)
  with pytest.raises(ValueError, match="--tensor=3 must be >= 2 and divide --devices=64"):
    plan.strategy_mesh("fsdp_tensor", 64, 3)
  with pytest.raises(ValueError, match="Unknown strategy 'zero3'"):
    plan.strategy_mesh("zero3", 64, 4)


# --- blockwise InfoNCE and chunked encoding -------------------------------------------------

def _pairs(n, d=16, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, d)).astype(np.float32)
  b = (a + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
  return a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)


def _value_and_grads(a, b, scale, blocks):
  return jax.jit(jax.value_and_grad(
      lambda a, b, s: contrastive.info_nce(a, b, s, blocks), argnums=(0, 1, 2), has_aux=True))(
          a, b, scale)


def test_blockwise_info_nce_equals_dense_with_gradients():
  a, b = _pairs(48)
  scale = jnp.float32(20.0)
  (loss, m), grads = _value_and_grads(a, b, scale, 1)
  assert 0.2 < float(m["a2b_acc"]) < 1.0  # Not trivial: some rows are misranked.
  for blocks in (2, 3, 8, 48):
    (loss_k, m_k), grads_k = _value_and_grads(a, b, scale, blocks)
    # Up to float32 rounding of sums over the 48 rows (tests/numerics.py).
    numerics.assert_rounding_close(loss_k, loss, 48, what=f"loss, {blocks} blocks")
    for key in m:
      np.testing.assert_allclose(m_k[key], m[key])
    numerics.assert_rounding_close(grads_k, grads, 48, what=f"grads, {blocks} blocks")


def test_blockwise_info_nce_sharded_over_8_devices_equals_one_device():
  a, b = _pairs(64, seed=1)
  mesh = mesh_lib.create_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices()[:8])
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  (loss, _), grads = _value_and_grads(a, b, jnp.float32(10.0), 1)
  rules = sharding_lib.logical_rules(None)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    (loss_s, _), grads_s = _value_and_grads(jax.device_put(a, sh), jax.device_put(b, sh),
                                            jnp.float32(10.0), 4)
  numerics.assert_rounding_close(loss_s, loss, 64, what="loss")
  numerics.assert_rounding_close(grads_s, grads, 64, what="grads")


def test_map_in_chunks_equals_direct_call_and_checks_sizes():
  a, b = _pairs(24, d=8)
  w = np.random.default_rng(2).normal(size=(8, 8)).astype(np.float32)
  enc = lambda x, w: jnp.tanh(x @ w)

  def loss(w, chunks):
    za = contrastive.map_in_chunks(lambda x: enc(x, w), a, num_chunks=chunks)
    return contrastive.info_nce(za, b, 5.0)[0]

  g1 = jax.grad(loss)(w, 1)
  for chunks in (2, 4, 24):
    numerics.assert_rounding_close(jax.grad(loss)(w, chunks), g1, 24, what=f"{chunks} chunks")
  numerics.assert_rounding_close(
      contrastive.map_in_chunks(lambda x: enc(x, w), a, num_chunks=3), enc(a, w), 8)
  with pytest.raises(ValueError, match="num_chunks=5 does not divide the batch of 24"):
    contrastive.map_in_chunks(lambda x: x, a, num_chunks=5)
  with pytest.raises(ValueError, match="num_blocks=0 must be a positive int"):
    contrastive.info_nce(a, b, 1.0, 0)
