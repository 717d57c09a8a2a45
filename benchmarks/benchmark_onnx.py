r"""Benchmark: CPU latency of the exported ONNX towers (onnxruntime) against our jitted JAX.

COMMAND
  python -m benchmarks.benchmark_onnx                                   # clip_b32, siglip_b16
  python -m benchmarks.benchmark_onnx --models=clip_b32 --batches=1,32 --repeats=3 \
      --out=/tmp/onnx_bench.json

What is timed, per model, tower and batch size B: one forward of B rows, the median over
--repeats calls after one warm-up call (JAX compilation and onnxruntime's first-run setup are
excluded), reported as ms per call and ms per item (per call / B). JAX and onnxruntime calls
alternate, so on a shared machine both see the same load. Both sides get the same
work: JAX `encode_images` on float32 normalised NHWC pixels (the on-device uint8 normalisation
is skipped), onnxruntime image_encoder.onnx on the same pixels NCHW; JAX `encode_texts` on int32
ids [B, max_len], onnxruntime text_encoder.onnx on the same ids as int64. Both outputs are the
L2-normalised embeddings, and their largest difference is reported as a check.

Models (random init; latency does not depend on the values):
  clip_b32    FashionCLIP B/32 at 224 px, 77-token context, 49408-token vocabulary.
  siglip_b16  SigLIP B/16 at 224 px, 64-token context, 32000-token vocabulary.

onnxruntime uses its default thread count (one per core, --threads to set it); XLA's CPU
backend uses every core. Load averages are printed before and after: on a shared machine the
numbers are only comparable within one run. Output: a markdown table on stdout and one JSON
object (--out).
"""

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import numpy as np

MODELS = ("clip_b32", "siglip_b16")


def _model(name: str):
  """(config, flax module, export function) of a benchmark model."""
  from fashion_jax.interop import onnx_export  # pylint: disable=g-import-not-at-top
  from fashion_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.models import siglip as siglip_lib  # pylint: disable=g-import-not-at-top
  if name == "clip_b32":
    config = clip_lib.clip_config("B/32")
    return config, clip_lib.CLIPModel(config), clip_lib.init_params, onnx_export.export_clip
  if name == "siglip_b16":
    config = siglip_lib.siglip_config("B/16")
    return (config, siglip_lib.SiglipModel(config), siglip_lib.init_params,
            onnx_export.export_siglip)
  raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")


def _time_pair(fns, repeats: int) -> tuple[list[float], list[Any]]:
  """For each of `fns` (no-argument callables): (median seconds per call, its last output).

  One warm-up call each, then `repeats` rounds calling every fn once in turn, so that on a
  shared machine both sides of a comparison see the same load.
  """
  outs = [fn() for fn in fns]
  seconds = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      outs[i] = fn()
      seconds[i].append(time.perf_counter() - start)
  return [statistics.median(s) for s in seconds], outs


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated, of {MODELS}.")
  ap.add_argument("--batches", default="1,32", help="Comma-separated batch sizes.")
  ap.add_argument("--repeats", type=int, default=3, help="Timed calls per measurement.")
  ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = default).")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="Also write the JSON here.")
  args = ap.parse_args()
  models = [m for m in args.models.split(",") if m]
  batches = [int(b) for b in args.batches.split(",") if b]
  for m in models:
    if m not in MODELS:
      raise SystemExit(f"--models: unknown model {m!r}; expected some of {MODELS}.")
  if args.repeats < 1 or not batches or min(batches) < 1:
    raise SystemExit("--repeats and every --batches entry must be positive.")

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.interop import onnx_export  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  print(f"load average before: {load_before}", flush=True)
  rng = np.random.default_rng(args.seed)
  rows = []
  for name in models:
    config, model, init, export = _model(name)
    params = nn.unbox(jax.jit(functools.partial(init, config))(jax.random.PRNGKey(args.seed)))
    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      out = export(os.path.join(tmp, name), config, params)
      export_s = time.perf_counter() - start
      sizes = {f: os.path.getsize(out / f) for f in (onnx_export.IMAGE_FILE,
                                                     onnx_export.TEXT_FILE)}
      threads = args.threads or None
      sessions = {"image": onnx_export.load_session(out / onnx_export.IMAGE_FILE, threads),
                  "text": onnx_export.load_session(out / onnx_export.TEXT_FILE, threads)}
      # Params are an argument, not closed-over constants (XLA would fold 100s of MB).
      jax_fns = {
          "image": functools.partial(jax.jit(lambda p, x: model.apply(
              {"params": p}, x, method=model.encode_images)), params),
          "text": functools.partial(jax.jit(lambda p, x: model.apply(
              {"params": p}, x, method=model.encode_texts)), params)}
      s, length = config.vision.image_size, config.text.max_len
      for batch in batches:
        pixels = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
        ids = rng.integers(2, config.text.vocab_size - 2, (batch, length)).astype(np.int32)
        ids[:, -1] = config.text.eos_token_id
        inputs = {"image": (pixels, {"pixel_values": pixels.transpose(0, 3, 1, 2).copy()}),
                  "text": (ids, {"input_ids": ids.astype(np.int64)})}
        for tower in ("image", "text"):
          x_jax, feed = inputs[tower]
          (jax_s, ort_s), (jax_out, ort_out) = _time_pair(
              [lambda f=jax_fns[tower], x=x_jax: jax.block_until_ready(f(x)),
               lambda sess=sessions[tower], x=feed: sess.run(None, x)[0]], args.repeats)
          row = dict(model=name, tower=tower, batch=batch,
                     jax_ms=1e3 * jax_s, jax_ms_per_item=1e3 * jax_s / batch,
                     onnx_ms=1e3 * ort_s, onnx_ms_per_item=1e3 * ort_s / batch,
                     max_abs_diff=float(np.abs(np.asarray(jax_out) - ort_out).max()),
                     export_s=export_s, onnx_mb=sizes[onnx_export.IMAGE_FILE
                                                      if tower == "image"
                                                      else onnx_export.TEXT_FILE] / 2**20)
          rows.append(row)
          print(json.dumps(row), flush=True)
  load_after = os.getloadavg()
  print(f"load average after: {load_after}")
  print("\n| model | tower | batch | JAX ms/item | onnxruntime ms/item | onnx/JAX | max |diff| |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['tower']} | {r['batch']} | {r['jax_ms_per_item']:.1f} | "
          f"{r['onnx_ms_per_item']:.1f} | {r['onnx_ms'] / r['jax_ms']:.2f} | "
          f"{r['max_abs_diff']:.1e} |")
  result = {"benchmark": "onnx_vs_jax_cpu_latency", "host": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "repeats": args.repeats, "onnx_threads": args.threads or "default",
            "load_before": load_before, "load_after": load_after, "rows": rows}
  if args.out:
    with open(args.out, "w") as f:
      f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
