"""Optimizer assembly: schedules, lr multipliers, freezing, weight-decay mask, grad accumulation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fashion_jax.parallel.sharding import path_str
from fashion_jax.train import optimizer as optimizer_lib
from tests import toy_system


def _closed_form(kind, t, lr, warmup, total, end=0.0, decay=None, boundaries=(), factor=0.1):
  if t < warmup:
    return lr * t / warmup
  if kind == "constant":
    return lr
  if kind == "cosine":
    d = decay or (total - warmup)
    return lr * (end + (1 - end) * (1 + math.cos(math.pi * min(t - warmup, d) / d)) / 2)
  return lr * factor ** sum(t >= b for b in boundaries)


@pytest.mark.parametrize("schedule", [
    {"kind": "cosine", "warmup_steps": 3},
    {"kind": "cosine", "warmup_steps": 0, "end_lr_factor": 0.1},
    {"kind": "cosine", "warmup_steps": 4, "decay_steps": 6, "end_lr_factor": 0.2},
    {"kind": "step", "warmup_steps": 2, "boundaries": (5, 9), "factor": 0.5},
    {"kind": "constant", "warmup_steps": 5},
])
def test_schedules_match_closed_forms(schedule):
  lr, total = 0.3, 16
  fn = optimizer_lib.make_schedule(schedule, lr, total)
  kw = {"end": schedule.get("end_lr_factor", 0.0), "decay": schedule.get("decay_steps"),
        "boundaries": schedule.get("boundaries", ()), "factor": schedule.get("factor", 0.1)}
  got = [float(fn(t)) for t in range(total + 4)]
  want = [_closed_form(schedule["kind"], t, lr, schedule["warmup_steps"], total, **kw)
          for t in range(total + 4)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_schedule_errors():
  with pytest.raises(ValueError, match="kind='linear'"):
    optimizer_lib.make_schedule({"kind": "linear"}, 0.1, 10)
  with pytest.raises(ValueError, match=r"warmup_steps=20"):
    optimizer_lib.make_schedule({"kind": "cosine", "warmup_steps": 20}, 0.1, 10)
  with pytest.raises(ValueError, match=r"boundaries=\[8, 4\]"):
    optimizer_lib.make_schedule({"kind": "step", "boundaries": (8, 4)}, 0.1, 10)


def _params():
  return {"params": {
      "enc": {"dense": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.ones((4,))},
              "LayerNorm_0": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}},
      "head": {"kernel": jnp.full((4, 2), 0.5)},
      "logit_scale": jnp.asarray(2.3)}}


def _opt_config(**kw):
  c = ml_collections.ConfigDict({"lr": 0.1, "weight_decay": 0.0, "clip_norm": None,
                                 "schedule": {"kind": "constant", "warmup_steps": 0},
                                 "lr_mults": (), "freeze": (), "wd_exclude": None})
  c.update(kw)
  return c


def _one_update(config, grad_value):
  params = _params()
  tx, _ = optimizer_lib.make_optimizer(config, params, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  delta = {path_str(p): np.asarray(n - o) for (p, n), o in
           zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(params))}
  return delta, state


def test_lr_multipliers_and_freezing():
  config = _opt_config(freeze=(r"params/enc/LayerNorm_0/.*",),
                       lr_mults=((r"params/head/.*", 0.1), (r".*logit_scale", 2.0)))
  delta, state = _one_update(config, grad_value=3.0)
  # Adam's first step moves each weight by lr * mult * g / (|g| + eps) = lr * mult.
  np.testing.assert_allclose(delta["params/enc/dense/kernel"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(delta["params/enc/dense/bias"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(delta["params/head/kernel"], -0.01, rtol=1e-5)
  np.testing.assert_allclose(delta["params/logit_scale"], -0.2, rtol=1e-5)
  assert np.all(delta["params/enc/LayerNorm_0/scale"] == 0)
  assert np.all(delta["params/enc/LayerNorm_0/bias"] == 0)
  # Frozen params carry no Adam moments.
  adam_states = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                 if isinstance(s, optax.ScaleByAdamState)]
  moment_paths = {path_str(p) for s in adam_states
                  for p, _ in jax.tree_util.tree_leaves_with_path(s.mu)}
  assert "params/enc/dense/kernel" in moment_paths and "params/head/kernel" in moment_paths
  assert not any("LayerNorm_0" in p for p in moment_paths)
  assert len(adam_states) == 3  # One AdamW per lr multiplier: x1, x0.1, x2.


def test_zero_multiplier_freezes():
  delta, _ = _one_update(_opt_config(lr_mults=((r"params/head/.*", 0.0),)), grad_value=1.0)
  assert np.all(delta["params/head/kernel"] == 0)
  np.testing.assert_allclose(delta["params/enc/dense/kernel"], -0.1, rtol=1e-5)


@pytest.mark.parametrize("key", ["freeze", "lr_mults"])
def test_regex_matching_nothing_is_an_error(key):
  value = ("params/nope/.*",) if key == "freeze" else (("params/nope/.*", 0.5),)
  with pytest.raises(ValueError, match=rf"optimizer.{key} regex 'params/nope/\.\*' matches no"):
    optimizer_lib.make_optimizer(_opt_config(**{key: value}), _params(), 10)


def test_weight_decay_mask_spares_biases_norms_and_scales():
  # Zero gradients: Adam's update is 0, so the only change is the decay -lr * wd * p.
  delta, _ = _one_update(_opt_config(weight_decay=0.5), grad_value=0.0)
  np.testing.assert_allclose(delta["params/enc/dense/kernel"], -0.1 * 0.5 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(delta["params/head/kernel"], -0.1 * 0.5 * 0.5, rtol=1e-5)
  for spared in ("params/enc/dense/bias", "params/enc/LayerNorm_0/scale",
                 "params/enc/LayerNorm_0/bias", "params/logit_scale"):
    assert np.all(delta[spared] == 0), spared
  names = {"img/Dense_0/kernel": True, "img/Dense_0/bias": False, "txt/ln_final/weight": False,
           "txt/final_norm/gamma": False, "logit_scale": False, "txt/token_embedding": True}
  params = {k: jnp.zeros(()) for k in names}
  mask = optimizer_lib.weight_decay_mask(params, None)
  assert mask == names
  # A custom exclusion list replaces the default.
  assert optimizer_lib.weight_decay_mask(params, (r"img/.*",))["logit_scale"] is True


@pytest.mark.parametrize("g_a,clipped", [((0.3, 0.4), (0.3, 0.4)), ((3.0, 4.0), (0.6, 0.8))])
def test_clipping_over_trainable_grads_only(g_a, clipped):
  """Clip to global norm 1 over the trainable grads; huge frozen grads must not count.

  With eps = 1e-3 Adam's first step -lr * g / (|g| + eps) reveals the clipped g.
  """
  params = {"a": jnp.zeros((2,)), "frozen": jnp.zeros((2,))}
  tx, _ = optimizer_lib.make_optimizer(
      _opt_config(freeze=("frozen",), clip_norm=1.0, eps=1e-3), params, 10)
  grads = {"a": jnp.asarray(g_a), "frozen": jnp.asarray([1e6, 1e6])}
  updates, _ = tx.update(grads, tx.init(params), params)
  clipped = np.asarray(clipped)
  np.testing.assert_allclose(updates["a"], -0.1 * clipped / (clipped + 1e-3), rtol=1e-5)
  assert np.all(np.asarray(updates["frozen"]) == 0)


def test_grad_accumulation_equals_full_batch():
  config = toy_system.get_config()
  config.model.objective = "regression"  # A per-example mean: accumulation is exact.
  config.optimizer.lr = 0.01
  config.optimizer.schedule.warmup_steps = 0
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  full_losses, full_params, _ = toy_system.run_steps(config, mesh, num_steps=2)
  acc_losses, acc_params, _ = toy_system.run_steps(config, mesh, num_steps=2,
                                                   grad_accum_steps=4)
  np.testing.assert_allclose(acc_losses, full_losses, atol=1e-6, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(acc_params),
                          jax.tree.leaves(full_params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
  assert full_losses[1] < full_losses[0]  # The steps did update the params.
