"""The EMA codebook through the trainer's non-gradient state path (train/step.py).

With the encoder frozen (optimizer.freeze), the codebook state after N trainer steps must equal
a float64 numpy recurrence over the same batches: cosine assignment against the current
codebook, N <- d N + (1 - d) n, m <- d m + (1 - d) s, then dead codes (N < restart_below)
re-seated on the worst-quantised vectors of the batch. Restarts are made to happen (decay 0.7,
threshold 0.5, 32 codes for 128 vectors). And 8 data-parallel devices train exactly like one.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from fashion_jax.systems import vqvae as system_lib
from tests import test_vqvae as tv
from tests import toy_system

DECAY, THRESHOLD = 0.7, 0.5


def config():
  c = tv.system_config(codebook="ema", ema_decay=DECAY, restart_below=THRESHOLD)
  c.batch_size = 8
  c.optimizer.schedule.warmup_steps = 0
  return c


def batch_at(k):
  return {"image": tv.images(8, 16, seed=100 + k)}


def numpy_ema(count, total, z, decay, threshold):
  """One EMA step in float64: count [K], total [K, E], z [M, E] (unnormalised encoder outputs)."""
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  cn = total / np.linalg.norm(total, axis=-1, keepdims=True)
  codes = np.argmax(zn @ cn.T, axis=-1)
  k = len(count)
  n = np.bincount(codes, minlength=k).astype(np.float64)
  s = np.zeros_like(total)
  np.add.at(s, codes, zn)
  count, total = decay * count + (1 - decay) * n, decay * total + (1 - decay) * s
  err = 1.0 - np.sum(zn * cn[codes], axis=-1)
  worst = np.argsort(-err, kind="stable")
  dead = np.flatnonzero(count < threshold)
  for r, code in enumerate(dead):
    count[code], total[code] = 1.0, zn[worst[r % len(zn)]]
  return count, total, len(dead)


def test_ema_codebook_follows_float64_recurrence_with_restarts():
  c = config()
  c.optimizer.freeze = ("params/.*",)  # Encoder fixed: z of a batch is known in advance.
  steps, one = 6, {"data": 1, "fsdp": 1, "tensor": 1}
  system = system_lib.System(c)
  _, init, _ = toy_system.run_steps(c, one, 0)  # The trainer's initial state.
  _, params, _ = toy_system.run_steps(c, one, steps, batch_fn=batch_at)
  for a, b in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(params["params"])):
    np.testing.assert_array_equal(a, b)  # Frozen: the same start as the trainer's.
  encoder = jax.jit(lambda p, x: system.model.apply(
      p, x, method=lambda m, im: m.encoder(m.to_input(im))))
  count = np.asarray(init["vq_ema"]["count"], np.float64)
  total = np.asarray(init["vq_ema"]["sum"], np.float64)
  restarts = 0
  for k in range(steps):
    z = np.asarray(encoder(init, batch_at(k)["image"]), np.float64).reshape(-1, 4)
    count, total, r = numpy_ema(count, total, z, DECAY, THRESHOLD)
    restarts += r
  assert restarts > 0
  np.testing.assert_allclose(params["vq_ema"]["count"], count, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["vq_ema"]["sum"], total, rtol=1e-5, atol=1e-6)


# Heavy (25 s): the slow job. The default run keeps the sharded mutable-state check
# (tests/test_mutable_state.py -k sharded).
@pytest.mark.slow
def test_ema_training_on_8_devices_equals_1_device():
  c = config()
  one_losses, one, _ = toy_system.run_steps(c, {"data": 1, "fsdp": 1, "tensor": 1}, 3,
                                            batch_fn=batch_at)
  eight_losses, eight, _ = toy_system.run_steps(c, {"data": 8, "fsdp": 1, "tensor": 1}, 3,
                                                batch_fn=batch_at)
  np.testing.assert_allclose(one_losses, eight_losses, rtol=1e-5, atol=1e-6)
  assert set(one) == {"params", "vq_ema"}
  for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  # The state really was written: the counts moved away from their init (all ones).
  assert not np.allclose(one["vq_ema"]["count"], 1.0)


def test_loss_returns_state_only_when_training():
  system = system_lib.System(config())
  params = nn.unbox(system.init(jax.random.key(0), batch_at(0)))
  loss, (metrics, state) = system.loss(params, batch_at(0), None, train=True)
  assert set(state) == {"vq_ema"} and "restarted" in metrics
  assert jax.tree.structure(state["vq_ema"]) == jax.tree.structure(params["vq_ema"])
  eval_loss, eval_metrics = system.loss(params, batch_at(0), None, train=False)
  np.testing.assert_allclose(float(loss), float(eval_loss), rtol=1e-6)
  assert "restarted" not in eval_metrics
