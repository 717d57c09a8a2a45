"""Non-gradient state (running statistics, EMA codebooks) through the trainer's step.

The toy system with `model.running_mean` keeps an EMA of the batch mean of `a` in
`batch_stats/mean_a` (tests/toy_system.py). Checked here: the EMA after N steps equals a float64
numpy recurrence over the same batches (so neither the gradient nor AdamW's weight decay touched
it), the learned params still train, an 8-device data-parallel run equals one device, and a
system that returns state for the wrong collections is refused with its names.
"""

import jax
import numpy as np
import pytest

from tests import toy_system


def _config(**model):
  c = toy_system.get_config()
  c.model.running_mean = True
  c.optimizer.weight_decay = 0.5   # large, so an EMA decayed by the optimizer would show
  for k, v in model.items():
    c.model[k] = v
  return c


def test_running_mean_follows_numpy_ema_and_params_train():
  config = _config()
  steps = 5
  losses, params, _ = toy_system.run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, steps)
  ema = np.zeros(config.model.dim_a, np.float64)
  for k in range(steps):
    a = toy_system.global_batch_at(config, k)["a"].astype(np.float64)
    ema = 0.9 * ema + 0.1 * a.mean(axis=0)
  np.testing.assert_allclose(params["batch_stats"]["mean_a"], ema, rtol=1e-5, atol=1e-6)
  assert losses[-1] < losses[0]


def test_running_mean_sharded_equals_single_device():
  config = _config()
  one_losses, one, _ = toy_system.run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, 3)
  eight_losses, eight, _ = toy_system.run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1}, 3)
  np.testing.assert_allclose(one_losses, eight_losses, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_averages_micro_batch_states():
  config = _config(objective="regression")
  config.optimizer.schedule.warmup_steps = 0
  _, params, _ = toy_system.run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, 1,
                                      grad_accum_steps=2)
  a = toy_system.global_batch_at(config, 0)["a"].astype(np.float64)
  # Micro-batch i holds rows i, 2 + i, ...; each proposes 0.1 * its mean from a zero EMA.
  expected = 0.5 * (0.1 * a[0::2].mean(0) + 0.1 * a[1::2].mean(0))
  np.testing.assert_allclose(params["batch_stats"]["mean_a"], expected, rtol=1e-5, atol=1e-6)


def test_state_for_wrong_collections_is_refused(monkeypatch):
  original = toy_system.System.loss

  def bad_loss(self, params, batch, rng, train=True):
    loss, (metrics, state) = original(self, params, batch, rng, train)
    return loss, (metrics, {"ema": state["batch_stats"]})

  monkeypatch.setattr(toy_system.System, "loss", bad_loss)
  config = _config()
  config.optimizer.schedule.warmup_steps = 0
  with pytest.raises(ValueError, match=r"returned state for \['ema'\].*\['batch_stats'\]"):
    toy_system.run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, 1)
