r"""Training-pipeline throughput per CPU core: our tf.data path vs a plain PIL + numpy loop.

COMMAND
  python -m launch.benchmark_pipeline [--num_images=512] [--batch=64] [--repeats=3]

The work: decode a 256 px JPEG, random resized crop (area 0.08-1, aspect 3/4-4/3) to 224,
random flip, normalise with CLIP's mean/std, batch. Rows (images/s on ONE core):

  pil_numpy_loop   the way the reference PyTorch repos load data (torchvision-style
                   RandomResizedCrop on a PIL image, ToTensor + Normalize as numpy float32,
                   stacked into a batch), one process.
  jpeg_decode_only tf.io.decode_jpeg of the whole image: the ceiling of any full-decode path.
  tfdata_naive     tf.data, full decode_jpeg -> crop -> resize -> float normalise, one thread.
  ours_normalised  our crop (pipeline.crop_resize_float: decode ONLY the crop window with
                   decode_and_crop_jpeg + integer DCT, flip the small uint8 crop, bilinear
                   resize) then normalise on the host: float32 out, the same output as the PIL
                   loop. The like-for-like comparison.
  ours_uint8       what the training pipeline ships (pipeline.random_resized_crop): the same
                   crop, rounded to uint8, normalised later on the device.
  device_normalise pipeline.normalize_on_device (jitted jax) on those uint8 batches, run on
                   this CPU's XLA backend (on a TPU/GPU it fuses into the first layer).
  uint8_plus_dev   ours_uint8 then device_normalise on the same core:
                   1 / (1/ours_uint8 + 1/device_normalise).

"One core": tf.data runs with options.threading.private_threadpool_size = 1 and
max_intra_op_parallelism = 1 (and TF's inter/intra-op pools at 1), jax with one intra-op
thread; the PIL loop is a single Python process. Each row reports the median of `repeats` timed
passes over the same files (page cache warm). The machine is shared, so figures move by 10-20%
between runs; the ratio is the number to read.

Images come from the synthetic catalog renderer at 256 px when fashion_jax.data.render exists,
else from random smooth textures; they are written as JPEG (quality 90) under /tmp.
"""

import argparse
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE, SOURCE = 224, 256
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def write_images(out_dir: pathlib.Path, n: int) -> tuple[list[str], str]:
  """n 256 px JPEGs; returns their paths and where the pixels came from."""
  out_dir.mkdir(parents=True, exist_ok=True)
  try:
    from fashion_jax.data import catalog, render  # pylint: disable=g-import-not-at-top,unused-import
    source = "synthetic catalog renderer"
    def image(i):
      return catalog.make_product(catalog.sample_spec("train", i), image_size=SOURCE)["images"][0]
  except ModuleNotFoundError:
    source = "random smooth textures"
    rng = np.random.default_rng(0)
    def image(i):
      del i
      small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
      big = Image.fromarray(small).resize((SOURCE, SOURCE), Image.BICUBIC)
      noise = rng.normal(0, 12, (SOURCE, SOURCE, 3))
      return np.clip(np.asarray(big, np.float32) + noise, 0, 255).astype(np.uint8)
  paths = []
  for i in range(n):
    path = out_dir / f"{i:05d}.jpg"
    if not path.exists():
      Image.fromarray(image(i)).save(path, quality=90)
    paths.append(str(path))
  return paths, source


# ------------------------------------------------------------------------------------------------
# The reference: PIL + numpy, as torchvision transforms do it.
# ------------------------------------------------------------------------------------------------


def _crop_params(rng, width, height):
  """torchvision RandomResizedCrop.get_params, written for numpy (10 tries, then centre crop)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*SCALE)
    aspect = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  side = min(width, height)
  return (height - side) // 2, (width - side) // 2, side, side


def pil_numpy_loop(paths, batch, rng):
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  out = []
  for start in range(0, len(paths) - batch + 1, batch):
    items = []
    for path in paths[start:start + batch]:
      image = Image.open(path).convert("RGB")
      top, left, h, w = _crop_params(rng, *image.size)
      image = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
      if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
      x = np.asarray(image, np.float32) / 255.0  # ToTensor
      items.append(((x - mean) / std).transpose(2, 0, 1))  # Normalize, CHW
    out.append(np.stack(items))
  return out


# ------------------------------------------------------------------------------------------------
# tf.data paths.
# ------------------------------------------------------------------------------------------------


def _one_core(ds):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return ds.with_options(options)


def tf_dataset(paths, batch, kind):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mean = tf.constant(pipeline.CLIP_MEAN) * 255.0
  std = tf.constant(pipeline.CLIP_STD) * 255.0
  # x * scale + offset with constants pre-tiled to [S, S, 3]: Eigen broadcasting of a size-3
  # axis runs about 2x slower than a same-shape elementwise op.
  clip_mean, clip_std = np.array(pipeline.CLIP_MEAN), np.array(pipeline.CLIP_STD)
  scale = tf.constant(np.broadcast_to(1.0 / (255.0 * clip_std), (SIZE, SIZE, 3)), tf.float32)
  offset = tf.constant(np.broadcast_to(-clip_mean / clip_std, (SIZE, SIZE, 3)), tf.float32)
  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()

  def naive(i, path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=[0, i],
        min_object_covered=0.0, aspect_ratio_range=RATIO, area_range=SCALE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.image.resize(tf.slice(image, begin, extent), [SIZE, SIZE])
    image = tf.image.stateless_random_flip_left_right(image, seed=[1, i])
    return image * scale + offset

  def ours(i, path):
    return pipeline.random_resized_crop(
        tf.io.read_file(path), tf.stack([tf.constant(0, tf.int64), i]), SIZE, SCALE, True)

  def ours_normalised(i, path):
    image = pipeline.crop_resize_float(
        tf.io.read_file(path), tf.stack([tf.constant(0, tf.int64), i]), SIZE, SCALE, True)
    return image * scale + offset

  def decode_only(i, path):
    del i
    return tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

  fn = dict(naive=naive, ours=ours, ours_normalised=ours_normalised, decode=decode_only)[kind]
  return _one_core(ds.map(fn).batch(batch, drop_remainder=True))


def timed(fns: dict, repeats: int) -> dict:
  """Median seconds of each fn over `repeats` rounds; the rows alternate within a round so that
  load from other processes on a shared machine hits every row alike. Round 0 is warm-up."""
  times = {name: [] for name in fns}
  for round_ in range(repeats + 1):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      if round_:
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description="tf.data vs PIL per-core images/s")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--image_dir", default="/tmp/fashion_jax_bench_jpeg256")
  args = parser.parse_args(argv)
  if args.num_images < args.batch:
    raise ValueError(f"--num_images={args.num_images} < --batch={args.batch}")

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  paths, source = write_images(pathlib.Path(args.image_dir), args.num_images)
  n = (len(paths) // args.batch) * args.batch
  datasets = {name: tf_dataset(paths, args.batch, kind) for name, kind in [
      ("jpeg_decode_only", "decode"), ("tfdata_naive", "naive"),
      ("ours_normalised", "ours_normalised"), ("ours_uint8", "ours")]}
  batches = [b.numpy() for b in datasets["ours_uint8"]]
  normalise = jax.jit(pipeline.normalize_on_device)

  def run_norm():
    for b in batches:
      normalise(b).block_until_ready()

  fns = dict(pil_numpy_loop=lambda: pil_numpy_loop(paths, args.batch, np.random.default_rng(0)))
  fns.update({name: (lambda ds=ds: [None for _ in ds]) for name, ds in datasets.items()})
  fns["device_normalise"] = run_norm
  rows = {name: n / seconds for name, seconds in timed(fns, args.repeats).items()}
  rows["uint8_plus_dev"] = 1.0 / (1.0 / rows["ours_uint8"] + 1.0 / rows["device_normalise"])

  print(f"machine: {cpu_model()}, {os.cpu_count()} cores visible "
        f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}")
  print(f"tensorflow {tf.__version__}, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{n} JPEGs {SOURCE}px ({source}), crop -> {SIZE}, batch {args.batch}, "
        f"median of {args.repeats}")
  base = rows["pil_numpy_loop"]
  print(f"{'path':<18} {'img/s/core':>11} {'x PIL loop':>11}")
  for name, rate in rows.items():
    print(f"{name:<18} {rate:>11.0f} {rate / base:>11.2f}")


if __name__ == "__main__":
  main()
