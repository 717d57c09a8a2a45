"""VQ tokenizer: quantisation and loss vs numpy, straight-through gradients, training, usage.

The EMA codebook's update through the trainer (vs a float64 recurrence, 8 devices == 1) is in
tests/test_vqvae_ema.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import vqvae as vqvae_config
from fashion_jax.models import vqvae as vqvae_lib
from fashion_jax.systems import vqvae as system_lib


def tiny_model(num_codes=16, codebook="gradient"):
  return vqvae_lib.VQVAE(widths=(4, 8), num_res=1, code_dim=4, num_codes=num_codes, beta=0.25,
                         codebook=codebook)


def images(n=4, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("codebook", ["gradient", "ema"])
def test_quantisation_and_loss_match_numpy(codebook):
  model, x = tiny_model(codebook=codebook), images()
  params = nn.unbox(model.init(jax.random.key(0), x))
  out = model.apply(params, x)
  z = np.asarray(model.apply(params, x, method=lambda m, im: m.encoder(m.to_input(im))),
                 np.float64)
  book = np.asarray(params["params"]["codebook"] if codebook == "gradient" else
                    params["vq_ema"]["sum"], np.float64)
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  bn = book / np.linalg.norm(book, axis=-1, keepdims=True)
  codes = np.argmax(zn @ bn.T, axis=-1)
  np.testing.assert_array_equal(np.asarray(out["codes"]), codes.reshape(4, -1))
  zq = bn[codes]
  recon = np.asarray(model.apply(params, jnp.asarray(codes.reshape(4, -1)), 4,
                                 method=vqvae_lib.VQVAE.decode_codes), np.float64)
  np.testing.assert_allclose(np.asarray(out["recon"]), recon, atol=1e-5)
  xf = x.astype(np.float64) / 127.5 - 1.0
  # The codebook term is in the loss only for the gradient codebook.
  want = np.mean((recon - xf) ** 2) + (1.25 if codebook == "gradient" else 0.25) * np.mean(
      (zn - zq) ** 2)
  np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(out["codebook"]), np.mean((zn - zq) ** 2), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.apply(params, x, method=vqvae_lib.VQVAE.encode)),
                                codes.reshape(4, -1))


def test_straight_through_gradients():
  model, x = tiny_model(), images()
  params = nn.unbox(model.init(jax.random.key(0), x))["params"]

  def grad_of(term):
    return jax.grad(lambda p: model.apply({"params": p}, x)[term])(params)

  g_rec = grad_of("recon_mse")
  # Reconstruction trains the decoder AND the encoder (straight-through), never the codebook.
  assert float(optax.global_norm(g_rec["encoder"])) > 0
  assert float(optax.global_norm(g_rec["decoder"])) > 0
  assert float(jnp.abs(g_rec["codebook"]).max()) == 0
  g_book = grad_of("codebook")
  assert float(optax.global_norm(g_book["encoder"])) == 0
  assert float(optax.global_norm(g_book["codebook"])) > 0
  assert float(optax.global_norm(grad_of("commit")["codebook"])) == 0


def test_code_usage_matches_numpy():
  codes = np.array([[0, 0, 1, 3], [3, 3, 3, 0]])
  m = vqvae_lib.code_usage(jnp.asarray(codes), 6)
  p = np.bincount(codes.ravel(), minlength=6) / codes.size
  nz = p[p > 0]
  np.testing.assert_allclose(float(m["perplexity"]), np.exp(-(nz * np.log(nz)).sum()), rtol=1e-6)
  np.testing.assert_allclose(float(m["dead_frac"]), 3 / 6)


def system_config(image_size=16, **model):
  c = vqvae_config.get_config("smoke")
  c.data.image_size = image_size
  c.model.widths = (4, 8, 8)
  c.model.num_res = 1
  c.model.code_dim = 4
  c.model.num_codes = 32
  c.model.grid = image_size // 4
  c.model.update(model)
  return c


def test_grid_mismatch_is_an_error():
  with pytest.raises(ValueError, match="model.grid=5 but data.image_size=16"):
    system_lib.System(system_config(grid=5))


def test_bad_codebook_options_are_errors():
  with pytest.raises(ValueError, match="codebook='kmeans'"):
    system_lib.System(system_config(codebook="kmeans"))
  with pytest.raises(ValueError, match="restart_below is for the 'ema' codebook"):
    system_lib.System(system_config(codebook="gradient", restart_below=0.1))


def smooth_images(n=16, seed=0):
  """Images with a colour per quadrant, which a 4 x 4 code grid can describe."""
  base = np.random.default_rng(seed).integers(0, 256, (n, 2, 2, 3)).astype(np.uint8)
  return np.repeat(np.repeat(base, 8, 1), 8, 2)


@pytest.mark.parametrize("codebook", ["gradient", "ema"])
def test_training_lowers_reconstruction_error_and_keeps_codes_alive(codebook):
  from tests import toy_system  # pylint: disable=g-import-not-at-top
  c = system_config(codebook=codebook, restart_below=0.5 if codebook == "ema" else 0.0)
  c.batch_size = 16
  c.optimizer.lr = 3e-3
  c.optimizer.schedule.warmup_steps = 0
  batch = {"image": smooth_images()}
  system = system_lib.System(c)
  params = nn.unbox(system.init(jax.random.key(0), batch))
  first = float(system.loss(params, batch, None, train=False)[1]["recon_mse"])
  _, params, _ = toy_system.run_steps(c, {"data": 1, "fsdp": 1, "tensor": 1}, 120,
                                      batch_fn=lambda k: batch)
  _, m = system.loss(params, batch, None, train=False)
  assert float(m["recon_mse"]) < 0.5 * first
  assert float(m["batch_perplexity"]) > 2.0
  rec, codes = system.reconstruct(params, batch["image"])
  assert rec.dtype == jnp.uint8 and rec.shape == batch["image"].shape and codes.shape == (16, 16)
