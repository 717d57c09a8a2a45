"""data.resize_on='device': the host ships decoded crops, the train step resizes them.

Reference: the host path (tf.image.resize bilinear, TF's ResizeBilinear kernel) of the same
pipeline and seed, and TF's kernel directly on random crops. The device resize may round a value
within float rounding of a .5 boundary the other way (a multiply-add contracted), so pixels may
differ by 1 on a few positions; everything else in the batch is bitwise the same.
"""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf
from PIL import Image

from fashion_jax.data import device_crop
from fashion_jax.data import features
from fashion_jax.data import pipeline
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib
from tests.test_pipeline import data_dir  # pylint: disable=unused-import  (module fixture)
from tests.test_pipeline import make_config

# At most this fraction of pixels may differ (by 1) from TF's host resize.
MAX_TIE_FRACTION = 1e-3


def tf_resize(crop, flip, size):
  """The host path's image from an uint8 crop: flip, TF bilinear resize, +0.5 and truncate."""
  if flip:
    crop = crop[:, ::-1]
  x = tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear",
                      antialias=False)
  return tf.cast(x + 0.5, tf.uint8).numpy()


def padded(crop, pad):
  out = np.zeros((pad, pad, 3), np.uint8)
  out[:crop.shape[0], :crop.shape[1]] = crop
  return out


def assert_close_images(got, want):
  diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
  assert diff.max() <= 1, f"max pixel difference {diff.max()}"
  assert (diff > 0).mean() <= MAX_TIE_FRACTION, f"{(diff > 0).mean():.2%} of pixels differ"


@pytest.mark.parametrize("size", [24, 224])
def test_resize_crop_equals_tf_bilinear(size):
  rng = np.random.default_rng(size)
  pad = features.default_crop_pad(size)
  crops, windows, want = [], [], []
  # Up- and down-scaling, thin crops, single pixels, and the whole padded square.
  shapes = [(1, 1), (1, pad), (pad, 2), (pad, pad), (size, size)] + [
      tuple(rng.integers(1, pad + 1, 2)) for _ in range(11)]
  for k, (h, w) in enumerate(shapes):
    crop = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    flip = k % 2
    crops.append(padded(crop, pad))
    windows.append((h, w, flip))
    want.append(tf_resize(crop, flip, size))
  got = jax.jit(jax.vmap(device_crop.resize_crop, in_axes=(0, 0, None)), static_argnums=2)(
      np.stack(crops), np.asarray(windows, np.int32), size)
  assert got.dtype == jnp.uint8 and got.shape == (len(shapes), size, size, 3)
  assert_close_images(np.asarray(got), np.stack(want))


def test_whole_window_maps_to_itself_exactly():
  """The host's fallback ships a resized S x S image with window (S, S, 0): kept bit for bit."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  got = device_crop.resize_crop(padded(image, 32), np.array([24, 24, 0], np.int32), 24)
  np.testing.assert_array_equal(np.asarray(got), image)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_crop_window_is_the_host_crop_or_the_host_image(fmt):
  """random_crop_window ships exactly the host path's decoded crop (same draw, same decode) and
  its mirror bit, or, when the crop exceeds the pad, the host path's finished image."""
  rng = np.random.default_rng(0)
  pixels = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
      (96, 72), Image.BILINEAR))
  encoded = tf.io.encode_jpeg(pixels, quality=95) if fmt == "jpeg" else tf.io.encode_png(pixels)
  seen = set()
  for i in range(24):
    key = tf.constant([5, i], tf.int64)
    image, window = pipeline.random_crop_window(encoded, key, 32, (0.1, 1.0), True, 64)
    # The host path's own decode and mirror draw (a private helper: the reference).
    crop, mirror = pipeline._decode_crop(  # pylint: disable=protected-access
        encoded, key, (0.1, 1.0), True)
    h, w = crop.shape[:2]
    if h <= 64 and w <= 64:
      np.testing.assert_array_equal(image.numpy(), crop.numpy())
      assert window.numpy().tolist() == [h, w, int(mirror)]
      seen.add(("shipped", int(mirror)))
    else:
      np.testing.assert_array_equal(
          image.numpy(), pipeline.random_resized_crop(encoded, key, 32, (0.1, 1.0), True))
      assert window.numpy().tolist() == [32, 32, 0]
      seen.add(("resized", None))
  assert seen == {("shipped", 0), ("shipped", 1), ("resized", None)}, seen


def test_two_halves_equal_random_crop_window_per_row():
  """The pipeline's halves (crop_window_fitting per example, replace_unfit per batch on the host)
  give every row random_crop_window's answer, for JPEGs and PNGs whose crops fit the pad or
  do not."""
  rng = np.random.default_rng(1)
  pad, size, scale = 48, 32, (0.1, 1.0)
  encoded = []
  for i in range(12):
    hw = (40, 44) if i % 2 else (72, 96)  # Small sources always fit the pad; large ones may not.
    pixels = np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
        hw[::-1], Image.BILINEAR))
    encoded.append(tf.io.encode_png(pixels) if i % 3 == 0 else tf.io.encode_jpeg(pixels))
  keys = [tf.constant([9, i], tf.int64) for i in range(len(encoded))]
  halves = [pipeline.crop_window_fitting(e, k, scale, True, pad) for e, k in zip(encoded, keys)]
  fits = tf.stack([f for _, _, f in halves])
  assert 0 < int(tf.reduce_sum(tf.cast(fits, tf.int32))) < len(encoded)  # Both halves run.
  # As the host step gets them from tf.data: read-only numpy arrays, b'' for the rows that fit.
  batch = [np.stack([padded(c.numpy(), pad) for c, _, _ in halves]),
           np.stack([w.numpy() for _, w, _ in halves])]
  for a in batch:
    a.flags.writeable = False
  images, windows = pipeline.replace_unfit(
      *batch, fits.numpy(),
      np.array([b"" if f else e.numpy() for (_, _, f), e in zip(halves, encoded)], object),
      np.stack([k.numpy() for k in keys]), size, scale, True, pad)
  for i, (e, k) in enumerate(zip(encoded, keys)):
    image, window = pipeline.random_crop_window(e, k, size, scale, True, pad)
    np.testing.assert_array_equal(images[i], padded(image.numpy(), pad), err_msg=str(i))
    np.testing.assert_array_equal(windows[i], window.numpy(), err_msg=str(i))
  fit = [i for i in range(len(encoded)) if fits[i]]  # A batch that fits is returned as it is.
  same = pipeline.replace_unfit(batch[0][fit], batch[1][fit], np.ones(len(fit), bool),
                                np.array([b""] * len(fit), object), np.zeros((len(fit), 2)),
                                size, scale, True, pad)
  np.testing.assert_array_equal(same[0], batch[0][fit])


@pytest.mark.parametrize("subsampling,mode,progressive", [
    (0, "RGB", False), (1, "RGB", True), (2, "RGB", False), (2, "L", False)])
def test_aligned_decode_holds_the_crop_bitwise(subsampling, mode, progressive):
  """crop_window_aligned decodes from a multiple of 16 at or left of the crop window's x; its
  columns from dx on are crop_window_fitting's crop bitwise, for libjpeg's iMCU widths of 8
  (4:4:4, grayscale) and 16 (4:2:2, 4:2:0)."""
  rng = np.random.default_rng(subsampling)
  pixels = np.asarray(Image.fromarray(rng.integers(0, 255, (9, 11, 3), dtype=np.uint8)).resize(
      (150, 100), Image.BICUBIC)) + rng.integers(0, 40, (100, 150, 3)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buf, "JPEG", subsampling=subsampling,
                                             progressive=progressive, quality=90)
  encoded = tf.constant(buf.getvalue())
  moved = 0
  for i in range(12):
    key = tf.constant([5, i], tf.int64)
    crop, window, fits = pipeline.crop_window_fitting(encoded, key, (0.05, 1.0), True, 128)
    wide, window16, fits16, dx = pipeline.crop_window_aligned(encoded, key, (0.05, 1.0), True,
                                                              128, 16)
    assert bool(fits) == bool(fits16) and window.numpy().tolist() == window16.numpy().tolist()
    assert wide.shape[1] == crop.shape[1] + int(dx) and 0 <= int(dx) < 16
    np.testing.assert_array_equal(wide.numpy()[:, int(dx):], crop.numpy(), err_msg=str(i))
    moved += int(dx) > 0
  assert moved > 0  # Some windows were moved.


def test_device_batches_equal_host_batches(data_dir):
  """Same seed and steps: finish_images(device batch) == host batch; other keys bitwise."""
  host_cfg = make_config(data_dir)  # views=2, flip, crop_scale (0.3, 1), 40 x 48 sources.
  dev_cfg = make_config(data_dir, resize_on="device")
  size, pad = host_cfg.data.image_size, features.default_crop_pad(host_cfg.data.image_size)
  finish = jax.jit(lambda b: device_crop.finish_images(b, size))
  host_it = pipeline.make_train_iterator(host_cfg)
  dev_it = pipeline.make_train_iterator(dev_cfg)
  shipped = fallback = 0
  for _ in range(4):
    h, d = next(host_it), next(dev_it)
    assert set(d) == set(h) | {"image_window", "image2_window"}
    for name in ("image", "image2"):
      crops, window = d[name], d[name + "_window"]
      assert crops.shape == (8, pad, pad, 3) and window.shape == (8, 3)
      for c, (hh, ww, flip) in zip(crops, window):
        assert not c[hh:].any() and not c[:, ww:].any(), "padding must be zeros"
        fallback += bool((hh, ww, flip) == (size, size, 0))
        shipped += bool(hh <= pad and ww <= pad and (hh, ww) != (size, size))
    out = jax.device_get(finish({k: d[k] for k in ("image", "image2", "image_window",
                                                   "image2_window")}))
    assert set(out) == {"image", "image2"}
    for name in ("image", "image2"):
      assert out[name].shape == h[name].shape
      assert_close_images(out[name], h[name])
    for k in h:
      if k not in ("image", "image2"):
        np.testing.assert_array_equal(d[k], h[k], err_msg=k)
  # Crops of the 40 x 48 sources are up to 48 wide, the pad is 32: both paths ran.
  assert shipped > 0 and fallback > 0, (shipped, fallback)


class System:
  """A one-weight system whose loss reads the image: to check what the train step feeds it."""

  def __init__(self, config):
    self.size = int(config.data.image_size)

  def dummy_batch(self, batch_size):
    return {"image": np.zeros((batch_size, self.size, self.size, 3), np.uint8)}

  def init(self, rng, batch):
    del rng, batch
    return {"params": {"w": jnp.ones((3,), jnp.float32)}}

  def loss(self, params, batch, rng, train=True):
    del rng, train
    image = batch["image"]
    if image.shape[1:] != (self.size, self.size, 3):
      raise ValueError(f"the loss got image {image.shape}")
    x = image.astype(jnp.float32) / 255.0
    pred = jnp.einsum("bhwc,c->b", x, params["params"]["w"]) / (self.size * self.size)
    return jnp.mean(jnp.square(pred - 1.0)), {"image_sum": jnp.sum(x) * 255.0}


def train_one_step(config, batch):
  config = config_check.with_defaults(config)
  mesh = mesh_lib.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  rules = sharding_lib.logical_rules(config.sharding_rules)
  system = System(config)
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params, 4)
  _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, config.seed, shapes)
  state = state_lib.create_train_state(system, tx, mesh, rules, config.seed, state_sh, shapes)
  step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh,
                                  batch_transform=device_crop.batch_transform(config.data))
  state, metrics = step(state, sharding_lib.global_batch(batch, mesh))
  return jax.device_get(metrics), jax.device_get(state.params)


def test_train_step_resizes_before_the_loss_on_8_devices(data_dir):
  """The jitted, sharded step finishes the crops: the loss sees [b, S, S, 3] images whose pixel
  sum is the host pipeline's within the rounding ties, and the update is the host's."""
  assert jax.device_count() == 8
  base = dict(batch_size=8, views=1)
  cfgs = {where: make_config(data_dir, resize_on=where, **base) for where in ("host", "device")}
  for c in cfgs.values():
    c.system = "tests.test_device_crop"
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=0.1, weight_decay=0.0, clip_norm=0.0, schedule=dict(kind="constant",
                                                                warmup_steps=0)))
  keep = ("image", "image_window")
  batches = {w: {k: v for k, v in next(pipeline.make_train_iterator(c)).items() if k in keep}
             for w, c in cfgs.items()}
  out = {w: train_one_step(cfgs[w], batches[w]) for w in cfgs}
  host_sum = float(batches["host"]["image"].astype(np.float64).sum())
  ties = MAX_TIE_FRACTION * batches["host"]["image"].size
  assert abs(float(out["host"][0]["train/image_sum"]) - host_sum) < 1e-3 * host_sum
  assert abs(float(out["device"][0]["train/image_sum"]) - host_sum) <= ties + 1e-3 * host_sum
  np.testing.assert_allclose(out["device"][1]["params"]["w"], out["host"][1]["params"]["w"],
                             rtol=1e-4)
  assert not np.allclose(out["host"][1]["params"]["w"], 1.0), "the step must move the weight"


def test_bad_device_resize_settings(data_dir):
  with pytest.raises(ValueError, match=r"resize_on='gpu' must be one of \['host', 'device'\]"):
    pipeline.make_train_iterator(make_config(data_dir, resize_on="gpu"))
  with pytest.raises(ValueError, match=r"crop_pad=16 must be >= config.data.image_size=24"):
    pipeline.make_train_iterator(make_config(data_dir, resize_on="device", crop_pad=16))
  with pytest.raises(ValueError, match=r"crop_pad='256' must be an integer"):
    features.feature_spec(make_config(data_dir, resize_on="device", crop_pad="256"))
  with pytest.raises(ValueError, match=r"batch has 'image2_window' but no 'image2'"):
    device_crop.finish_images({"image": np.zeros((2, 32, 32, 3), np.uint8),
                               "image2_window": np.zeros((2, 3), np.int32)}, 24)
  with pytest.raises(ValueError, match=r"'image_window' must be int \[b, 3\]"):
    device_crop.finish_images({"image": np.zeros((2, 32, 32, 3), np.uint8),
                               "image_window": np.zeros((2, 2), np.int32)}, 24)


def test_feature_spec_declares_the_shipped_crops(data_dir):
  spec = features.feature_spec(make_config(data_dir, resize_on="device", crop_pad=40))
  assert spec["image"].shape == (40, 40, 3) and spec["image2"].shape == (40, 40, 3)
  assert spec["image_window"] == features.Spec(np.dtype(np.int32), (3,))
  host = features.feature_spec(make_config(data_dir))
  assert host["image"].shape == (24, 24, 3) and "image_window" not in host
