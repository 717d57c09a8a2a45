r"""The train pipeline of this tree side by side with the one at a git revision, in one process.

COMMAND
  python -m benchmarks.ab_pipeline --ref=296561a [--rounds=6] [--epochs=16]
      [--resize_on=device] [--threads=one] [--batch=64] [--num_images=512]

The reference is `fashion_jax/data/pipeline.py` as committed at --ref, loaded from `git show`
beside this tree's modules (so a reference whose pipeline needs other modules of its own time
fails to import: pick a revision whose only change is the pipeline's). Both build
make_train_iterator over benchmark_pipeline's product dataset (the same 256 px JPEGs and catalog
texts, `benchmark_pipeline.train_config`) and alternate round by round, so that load and the
VM's drift hit both alike. Each round takes a fresh iterator of each, skips its first batch
(the start-up: shuffle-buffer fill, function instantiation) and times the next
epochs x num_images / batch - 1 batches in CPU-seconds of this process.

--threads=one runs tf.data on one core (benchmark_pipeline's options: a private pool of one,
TF's pools at one) and reports images per CPU-second; --threads=all leaves tf.data's default
threading and also reports images per wall-second. Prints the load average before and after,
each round's rates and ratio, and the medians with min-max.
"""

import argparse
import gc
import importlib.util
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=wrong-import-position

from benchmarks import benchmark_pipeline as bp  # pylint: disable=wrong-import-position
from fashion_jax.data import pipeline  # pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parent.parent


def reference_module(ref: str, out_dir: str):
  """fashion_jax/data/pipeline.py at git revision `ref`, imported as a module of its own."""
  try:
    source = subprocess.run(["git", "show", f"{ref}:fashion_jax/data/pipeline.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"--ref={ref!r}: git show failed: {e.stderr.strip()}") from e
  path = pathlib.Path(out_dir) / "pipeline_ref.py"
  path.write_text(source)
  spec = importlib.util.spec_from_file_location("pipeline_ref", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["pipeline_ref"] = module
  spec.loader.exec_module(module)
  return module


def rounds_fn(module, config, num_images, batches, one_core):
  """fn() -> (images per wall-second, per CPU-second) of one fresh iterator of `module`, timed
  from its second batch over `batches` batches."""
  with module.make_train_iterator(config, process_index=0, process_count=1) as made:
    dataset, host_step = made.dataset, made.host_step
  if one_core:
    dataset = bp._one_core(dataset)  # pylint: disable=protected-access

  def run():
    with module.TrainIterator(dataset, 0, num_images, config.batch_size, host_step) as it:
      next(it)
      wall, cpu = time.perf_counter(), time.process_time()
      for _ in range(batches):
        next(it)
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.collect()
    n = batches * config.batch_size
    return n / wall, n / cpu
  return run


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ref", required=True, help="git revision of the reference pipeline")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--epochs", type=int, default=16)
  parser.add_argument("--resize_on", choices=("host", "device"), default="device")
  parser.add_argument("--threads", choices=("one", "all"), default="one")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--image_dir", default="/tmp/fashion_jax_bench_jpeg256")
  args = parser.parse_args(argv)
  if args.num_images < args.batch:
    raise SystemExit(f"--num_images={args.num_images} < --batch={args.batch}")

  one_core = args.threads == "one"
  if one_core:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
  load0 = os.getloadavg()
  paths = bp.write_images(pathlib.Path(args.image_dir), args.num_images, "catalog")
  data_dir = bp.products_dir(args.image_dir, "catalog")
  products = bp.product_dataset(paths, data_dir)
  n = (len(paths) // args.batch) * args.batch
  config = bp.train_config(products.name, data_dir, n, args.batch, 1 << 19, args.resize_on)
  batches = args.epochs * n // args.batch - 1
  with tempfile.TemporaryDirectory() as tmp:
    fns = {f"ref {args.ref}": rounds_fn(reference_module(args.ref, tmp), config, n, batches,
                                        one_core),
           "this tree": rounds_fn(pipeline, config, n, batches, one_core)}
    for fn in fns.values():  # Warm-up: the token cache, the page cache, first instantiations.
      fn()
    rates = {name: [] for name in fns}
    unit = 1 if one_core else 0  # Per CPU-second on one core; per wall-second on all.
    for r in range(args.rounds):
      for name, fn in fns.items():
        rates[name].append(fn())
      ref, new = (rates[name][-1][unit] for name in fns)
      print(f"round {r}: " + ", ".join(f"{name} {rates[name][-1][unit]:,.0f}" for name in fns) +
            f", ratio {new / ref:.3f}", flush=True)
  load = os.getloadavg()
  print(f"machine: {bp.cpu_model()}, {os.cpu_count()} cores; tf.data threads: {args.threads}; "
        f"resize_on={args.resize_on}, batch {args.batch}, {args.epochs} epochs x {n} images per "
        f"round, {args.rounds} rounds")
  print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  what = "img/cpu-s" if one_core else "img/s wall"
  for name, values in rates.items():
    v = [x[unit] for x in values]
    print(f"{name:<20} {what} median {statistics.median(v):,.0f} (min {min(v):,.0f}, max "
          f"{max(v):,.0f})")
  names = list(rates)
  ratios = [b[unit] / a[unit] for a, b in zip(rates[names[0]], rates[names[1]])]
  print(f"this tree / ref, per round: median {statistics.median(ratios):.3f} (min "
        f"{min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
  main()
