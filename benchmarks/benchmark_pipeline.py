r"""Training-pipeline throughput per CPU core: our tf.data path vs a plain PIL + numpy loop.

COMMAND
  python -m benchmarks.benchmark_pipeline [--num_images=512] [--batch=64] [--repeats=3]
      [--feed_samples_per_s=22104]

The work: decode a 256 px JPEG, random resized crop (area 0.08-1, aspect 3/4-4/3) to 224,
random flip, normalise with CLIP's mean/std, batch. Rows (images/s on ONE core):

  pil_numpy_loop   the way the reference PyTorch repos load data (torchvision-style
                   RandomResizedCrop on a PIL image, ToTensor + Normalize as numpy float32,
                   stacked into a batch), one process.
  jpeg_decode_only tf.io.decode_jpeg of the whole image: the ceiling of any full-decode path.
  crop_decode_only profile row: our crop window sampling + decode_and_crop_jpeg alone (no
                   resize, no flip; only the crop's shape is batched, so no batch copy). Its gap
                   to ours_uint8 is the bilinear resize, the flip and the rounding.
  tfdata_naive     tf.data, full decode_jpeg -> crop -> resize -> float normalise, one thread.
  ours_normalised  our crop (pipeline.crop_resize_float: decode ONLY the crop window with
                   decode_and_crop_jpeg + integer DCT, flip the small uint8 crop, bilinear
                   resize) then normalise on the host: float32 out, the same output as the PIL
                   loop. The like-for-like comparison.
  ours_uint8       what the training pipeline ships (pipeline.random_resized_crop): the same
                   crop, rounded to uint8, normalised later on the device.
  ours_window      what it ships with data.resize_on='device', as the pipeline makes it: per
                   example pipeline.crop_window_fitting (no control flow), padded_batch, then
                   per batch pipeline.replace_unfit (numpy, as the host step runs it). The
                   same decoded crop, unflipped, zero-padded to 256 x 256, and its (h, w,
                   flip); the train step resizes it (data/device_crop.py).
  dev_normalise_b64  pipeline.normalize_on_device (jitted jax) on this CPU's XLA backend, one
                   call per 64-image batch. Its 38 MB float32 output exceeds glibc's mmap
                   threshold, so every call page-faults fresh memory: the slow, pessimistic case.
  dev_normalise_b8   the same on 8-image slices (one device's share of the batch on an 8-device
                   mesh): buffers are recycled, the arithmetic cost shows. Inside a real train
                   step XLA fuses the normalise into the patch embedding / first conv, and on a
                   TPU/GPU it runs on the accelerator, not a host core.
  uint8+dev_bN     ours_uint8 then dev_normalise_bN on the same core:
                   1 / (1/ours_uint8 + 1/dev_normalise_bN).
  parse_tfds       profile row (per example, not per image): the product dataset below read
                   with TFDS's as_dataset, which parses one record per call, with TFDS's
                   in-memory cache of parsed examples off. TFDS caches only datasets under
                   250 MiB; real ones take this path every epoch. The train pipeline read its
                   records this way before pipeline.example_stream.
  parse_batched    profile row: the same records read by pipeline.example_stream (the train
                   pipeline's fields), parsed 64 records per call.
  train_pipeline   the whole training pipeline (pipeline.make_train_iterator) over a TFDS
                   product dataset holding the same JPEG files (one view each) and catalog texts:
                   TFRecord reading and parsing (from disk every epoch, as for any dataset), text
                   join, product hashes, the same crop, batching, and the host step (CLIP
                   tokenizer, max_len 77). Steady state: every text was seen in the warm-up
                   epoch, so the token cache (features.TokenCache) serves them.
  train_no_cache   the same with data.token_cache=0: every batch tokenized, as before the token
                   cache and as the first epoch still is.
  train_device_resize  train_pipeline with data.resize_on='device': the host's whole share
                   when the accelerator resizes.
  dev_resize_b8    data/device_crop.finish_images (jitted jax) on this CPU's XLA backend, per
                   8-image slice of the ours_window batches: the work moved to the device,
                   shown for scale (on a GPU/TPU it runs inside the train step, not on a host
                   core).

"x ceiling" divides by jpeg_decode_only of the same run. The last lines turn the train_pipeline
rate into the cores one host needs to feed `--feed_samples_per_s` (default: 8 H100s at the
FashionCLIP B/16 bf16 cuDNN batch-512 step of docs/benchmarks.md, 8 x 2,763 samples/s).

"One core": tf.data runs with options.threading.private_threadpool_size = 1 and
max_intra_op_parallelism = 1 (and TF's inter/intra-op pools at 1), jax with one intra-op
thread; the PIL loop is a single Python process. Each row reports the median of `repeats` timed
passes over the same files (page cache warm) in two units: images per wall-clock second and
images per CPU-second of this process (all its threads). On a shared machine the wall-clock rate
drops with other people's load while the CPU-second rate does not, so "per core" and the ratio
("x PIL loop") are taken from CPU-seconds; a wall rate above the CPU-second rate reveals more
than one busy thread (XLA:CPU does that for the device normalise; CPU-seconds still count it).

Images (--source): synthetic catalog renders at 256 px (default), or smooth colour noise plus
grain ('textures': more detail, slower to decode); written as JPEG (quality 90) under /tmp.
"""

import argparse
import gc
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

# After the environment above (TF's log level, XLA's one-thread flag) is set.
from fashion_jax.data import catalog  # pylint: disable=wrong-import-position
from fashion_jax.data import device_crop  # pylint: disable=wrong-import-position
from fashion_jax.data import pipeline  # pylint: disable=wrong-import-position
from fashion_jax.data import render  # pylint: disable=wrong-import-position
from fashion_jax.data import schema  # pylint: disable=wrong-import-position

SIZE, SOURCE = 224, 256
# docs/benchmarks.md "Accelerator efficiency": B/16 bf16, cuDNN attention, batch 512, one H100.
H100_SAMPLES_PER_S = 2763
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def write_images(out_dir: pathlib.Path, n: int, source: str) -> list[str]:
  """n 256 px JPEGs (quality 90) of `source`: 'catalog' renders or noisy 'textures'."""
  out_dir = out_dir / source
  out_dir.mkdir(parents=True, exist_ok=True)
  if source == "catalog":
    def image(i):
      return render.make_product(catalog.sample_spec("train", i), image_size=SOURCE)["images"][0]
  else:
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
  return paths


def products_dir(image_dir, source: str) -> pathlib.Path:
  """Where product_dataset keeps the TFDS build of `source`'s images (ab_pipeline reuses it)."""
  return pathlib.Path(image_dir) / source / "tfds"


def product_dataset(paths: list[str], data_dir: pathlib.Path):
  """A TFDS product dataset (data/schema.py) of `paths` (one view each, the files' own bytes)
  with the synthetic catalog's texts, built once in data_dir; returns its builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PipelineBenchProducts(tfds.core.GeneratorBasedBuilder):
    """Products i = 0..n-1: texts of catalog.sample_spec('train', i), image paths[i]."""
    VERSION = tfds.core.Version(f"1.0.{len(paths)}")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=schema.product_features())

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      names = schema.product_features().keys()
      for i, path in enumerate(paths):
        spec = catalog.sample_spec("train", i)
        title, description = catalog.describe(spec)
        example = dict(catalog.spec_fields(spec), title=title, description=description,
                       images=[pathlib.Path(path).read_bytes()])
        yield f"{i:05d}", {k: example[k] for k in names}

  builder = PipelineBenchProducts(data_dir=str(data_dir))
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def parse_datasets(builder, batch):
  """The parse_tfds and parse_batched rows: the train split's records read and parsed, batched."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  skip = {schema.IMAGES: tfds.decode.SkipDecoding()}
  n = builder.info.splits["train"].num_examples
  per_example = builder.as_dataset(
      split="train", shuffle_files=False, decoders=skip,
      read_config=tfds.ReadConfig(add_tfds_id=False, try_autocache=False))
  fields = (schema.IMAGES, "product_id", "subcategory", "title", "description")
  batched = pipeline.example_stream(builder, "train", fields, seed=0, process_index=0,
                                    shuffle_buffer=1, start=0, decoders=skip).take(n)
  return {"parse_tfds": _one_core(per_example.batch(batch)),
          "parse_batched": _one_core(batched.batch(batch))}


def train_config(name, data_dir, num_images, batch, token_cache, resize_on="host"):
  """The train rows' config: views=1, the benchmark's crop and flip, CLIP tokenizer at 77."""
  return ml_collections.ConfigDict(dict(seed=0, batch_size=batch, data=dict(
      name=name, data_dir=str(data_dir), train_split="train", image_size=SIZE,
      text_fields=("title", "description"), tokenizer=dict(kind="clip", path=""), max_len=77,
      views=1, augment=dict(crop_scale=SCALE, flip=True), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=num_images, prefetch=2,
      token_cache=token_cache, resize_on=resize_on)))


def train_pipeline(name, data_dir, num_images, batch, token_cache, resize_on="host"):
  """fn(epochs) -> consumes `epochs` epochs of make_train_iterator batches (`train_config`) on
  one core, from a fresh iterator that is closed afterwards (so no prefetching runs on while
  other rows are timed). The iterators share one dataset, hence one token cache: warm after the
  first call."""
  config = train_config(name, data_dir, num_images, batch, token_cache, resize_on)
  with pipeline.make_train_iterator(config, process_index=0, process_count=1) as made:
    dataset, host_step = _one_core(made.dataset), made.host_step

  def consume(epochs):
    with pipeline.TrainIterator(dataset, 0, num_images, batch, host_step) as it:
      for _ in range(epochs * (num_images // batch)):
        next(it)
    gc.collect()
  return consume


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

  def ours_window(i, path):
    encoded, key = tf.io.read_file(path), tf.stack([tf.constant(0, tf.int64), i])
    crop, window, fits = pipeline.crop_window_fitting(encoded, key, SCALE, True, SOURCE)
    return crop, window, fits, tf.where(fits, "", encoded), key

  def ours_normalised(i, path):
    image = pipeline.crop_resize_float(
        tf.io.read_file(path), tf.stack([tf.constant(0, tf.int64), i]), SIZE, SCALE, True)
    return image * scale + offset

  def decode_only(i, path):
    del i
    return tf.io.decode_jpeg(tf.io.read_file(path), channels=3)

  def crop_decode(i, path):
    encoded = tf.io.read_file(path)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=tf.stack([tf.constant(0, tf.int64), i]), min_object_covered=0.0,
        aspect_ratio_range=RATIO, area_range=SCALE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.image.decode_and_crop_jpeg(
        encoded, tf.stack([begin[0], begin[1], extent[0], extent[1]]), channels=3,
        dct_method="INTEGER_FAST")
    return tf.shape(crop)  # Crops differ in size: nothing to batch but their shapes.

  fn = dict(naive=naive, ours=ours, ours_window=ours_window, ours_normalised=ours_normalised,
            decode=decode_only, crop_decode=crop_decode)[kind]
  if kind == "ours_window":  # As the train pipeline batches the crops: into zero slots.
    return _one_core(ds.map(fn).padded_batch(
        batch, padded_shapes=([SOURCE, SOURCE, 3], [3], [], [], [2]), drop_remainder=True))
  return _one_core(ds.map(fn).batch(batch, drop_remainder=True))


def window_batches(ds):
  """The ours_window row's batches, finished as the train pipeline's host step does: numpy
  (crops, windows) after pipeline.replace_unfit."""
  for crops, windows, fits, encoded, keys in ds.as_numpy_iterator():
    yield pipeline.replace_unfit(crops, windows, fits, encoded, keys, SIZE, SCALE, True, SOURCE)


def timed(fns: dict, repeats: int) -> dict:
  """{name: (median wall seconds, median process CPU seconds)} of each fn over `repeats` rounds.

  Rows alternate within a round so that load from other processes hits every row alike; round
  0 is warm-up. CPU seconds count every thread of this process (TF's pools included).
  """
  times = {name: [] for name in fns}
  for round_ in range(repeats + 1):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      if round_:
        times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
  return {name: tuple(statistics.median(x) for x in zip(*t)) for name, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description="tf.data vs PIL per-core images/s")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=6,
                      help="tf.data and train rows: timed as (1 + epochs passes) - (1 pass)")
  parser.add_argument("--feed_samples_per_s", type=float, default=8 * H100_SAMPLES_PER_S,
                      help="samples/s one host must feed (default: 8 H100s, FashionCLIP B/16 "
                      "bf16 cuDNN batch 512)")
  parser.add_argument("--image_dir", default="/tmp/fashion_jax_bench_jpeg256")
  parser.add_argument("--source", choices=("catalog", "textures"), default="catalog",
                      help="synthetic catalog renders, or smooth colour noise + grain (JPEGs "
                      "that are slower to decode, like busy photos)")
  args = parser.parse_args(argv)
  if args.num_images < args.batch:
    raise ValueError(f"--num_images={args.num_images} < --batch={args.batch}")

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  import jax  # pylint: disable=g-import-not-at-top

  load0 = os.getloadavg()
  paths = write_images(pathlib.Path(args.image_dir), args.num_images, args.source)
  n = (len(paths) // args.batch) * args.batch
  datasets = {name: tf_dataset(paths, args.batch, kind) for name, kind in [
      ("jpeg_decode_only", "decode"), ("crop_decode_only", "crop_decode"),
      ("tfdata_naive", "naive"),
      ("ours_normalised", "ours_normalised"), ("ours_uint8", "ours"),
      ("ours_window", "ours_window")]}
  products_root = products_dir(args.image_dir, args.source)
  products = product_dataset(paths, products_root)
  datasets.update(parse_datasets(products, args.batch))
  batches = [b.numpy() for b in datasets["ours_uint8"]]
  shards = [s for b in batches for s in np.split(b, args.batch // 8)]
  normalise = jax.jit(pipeline.normalize_on_device)
  windows = [(c[k:k + 8], w[k:k + 8]) for c, w in window_batches(datasets["ours_window"])
             for k in range(0, args.batch, 8)]
  finish = jax.jit(lambda c, w: device_crop.finish_images(
      {"image": c, "image_window": w}, SIZE)["image"])

  def run_finish():
    for c, w in windows:
      finish(c, w).block_until_ready()

  def run_norm(arrays):
    for a in arrays:
      normalise(a).block_until_ready()

  fns = dict(pil_numpy_loop=lambda: pil_numpy_loop(paths, args.batch, np.random.default_rng(0)))
  # Every tf.data row, like the train rows below, is timed as (1 + E passes - 1 pass) from a fresh
  # iterator: the steady state, without the iterator's start-up (which weighs more on the rows
  # with bigger graphs, and would flatter the ceiling).
  for name, ds in datasets.items():
    passes = window_batches if name == "ours_window" else iter
    fns[f"{name}@1"] = lambda ds=ds, f=passes: [None for _ in f(ds)]
    fns[f"{name}@E"] = lambda ds=ds, f=passes: [None for _ in f(ds.repeat(1 + args.epochs))]
  fns["dev_normalise_b64"] = lambda: run_norm(batches)
  fns["dev_normalise_b8"] = lambda: run_norm(shards)
  fns["dev_resize_b8"] = run_finish
  # Each train row runs 1 and 1 + E epochs from a fresh iterator; the difference (E epochs) is the
  # steady-state work, without the start-up (shuffle buffer fill) and the run-ahead thrown away.
  train_rows = (("train_pipeline", 1 << 19, "host"), ("train_no_cache", 0, "host"),
                ("train_device_resize", 1 << 19, "device"))
  for row, cache, where in train_rows:
    consume = train_pipeline(products.name, products_root, n, args.batch, cache, where)
    fns[f"{row}@1"] = lambda c=consume: c(1)
    fns[f"{row}@E"] = lambda c=consume: c(1 + args.epochs)
  times = timed(fns, args.repeats)
  rows = {name: (n / wall, n / cpu) for name, (wall, cpu) in times.items() if "@" not in name}
  for row in list(datasets) + [row for row, _, _ in train_rows]:
    rows[row] = tuple(args.epochs * n / (b - a)
                      for a, b in zip(times[f"{row}@1"], times[f"{row}@E"]))
  for b in ("b64", "b8"):
    rows[f"uint8+dev_{b}"] = tuple(1.0 / (1.0 / a + 1.0 / d) for a, d in zip(
        rows["ours_uint8"], rows[f"dev_normalise_{b}"]))
  order = ["pil_numpy_loop", *datasets, *(row for row, _, _ in train_rows)]
  rows = {k: rows[k] for k in order + [k for k in rows if k not in order]}

  load = os.getloadavg()
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores visible "
        f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}")
  print(f"tensorflow {tf.__version__}, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"{n} JPEGs {SOURCE}px ({args.source}), crop -> {SIZE}, batch {args.batch}, "
        f"median of {args.repeats}")
  print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  base, ceiling = rows["pil_numpy_loop"][1], rows["jpeg_decode_only"][1]
  print(f"{'path':<18} {'img/s wall':>11} {'img/cpu-s':>10} {'x PIL loop':>11} "
        f"{'x ceiling':>10}")
  for row, (wall_rate, cpu_rate) in rows.items():
    print(f"{row:<18} {wall_rate:>11.0f} {cpu_rate:>10.0f} {cpu_rate / base:>11.2f} "
          f"{cpu_rate / ceiling:>10.2f}")
  per_core = rows["train_pipeline"][1]
  print(f"feeding {args.feed_samples_per_s:,.0f} samples/s (default: 8 x {H100_SAMPLES_PER_S:,} "
        f"samples/s, B/16 bf16 cuDNN batch 512 on an H100) at train_pipeline's "
        f"{per_core:,.0f} img/cpu-s takes {args.feed_samples_per_s / per_core:.1f} cores "
        f"({args.feed_samples_per_s / rows['train_no_cache'][1]:.1f} without the token cache, "
        f"{args.feed_samples_per_s / ceiling:.1f} at the decode ceiling); with "
        f"data.resize_on='device' (train_device_resize) "
        f"{args.feed_samples_per_s / rows['train_device_resize'][1]:.1f}")


if __name__ == "__main__":
  main()
