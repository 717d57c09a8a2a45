r"""How fast a CLIP train step could be on this CPU: the matmul floor beside ours and torch's step.

COMMAND
  python -m benchmarks.cpu_step_bound [--variant=B/32] [--batch=8] [--repeats=3]

Every matmul of one train step, timed alone with the fastest kernel this machine offers. A
forward matmul Y[g, m, n] = A[g, m, k] W[g, k, n] (g = 1 for a weight, batch x heads for the
attention's q k^T and probs v) costs three dots per step, all 2 g m k n FLOPs:

  fwd  A W          the forward;
  dA   dY W^T       the input gradient (contracts n);
  dW   A^T dY       the weight gradient (contracts m).

Each form is timed as XLA compiles it alone (jit of the einsum: XLA picks the kernel and any
layout copy) and as torch.matmul on transposed views (oneDNN / MKL take the transposes as flags),
and the faster median counts. Summed over the step's matmuls (config.vision/text: q, k, v, out,
fc1, fc2 per layer, the two attention products, the patch embedding, the projections; the
[B, B] logits are negligible), that is the MATMUL FLOOR: the step time of an implementation that
did its matmuls at isolated-kernel speed and everything else (LayerNorm, softmax, GELU, the
loss, AdamW) in no time. Shapes come from the config, as in models/flops.py, and the FLOPs the
floor covers are checked against flops.clip_train_flops_per_step.

Also printed, in the same process: the step times of ours and torch (benchmarks/benchmark_model's
steps, alternating, `--repeats` times), and

  best ratio = torch step / matmul floor

the torch / ours speed-up an implementation of the same model and FLOPs could reach at most on
this machine with these kernels. A fused q/k/v projection (one [m, w] x [w, 3w] dot) is also
timed, as the optimistic case of a layout that merges dots; the floor uses it when faster.
os.getloadavg() is printed before and after: run it on an idle machine.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import benchmark_model
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import flops as flops_lib

FORMS = {"fwd": "gmk,gkn->gmn", "dA": "gmn,gkn->gmk", "dW": "gmk,gmn->gkn"}


def step_matmuls(config, batch):
  """[(name, count per step, g, m, k, n)] of one forward; each also runs dA and dW."""
  out = []
  for tower, tokens in (("vision", config.vision.num_patches + 1),
                        ("text", config.text.max_len)):
    c = getattr(config, tower)
    m, w, heads = batch * tokens, c.width, c.num_heads
    d, layers = w // heads, c.num_layers
    out += [(f"{tower} q/k/v/out", 4 * layers, 1, m, w, w),
            (f"{tower} fc1", layers, 1, m, w, c.mlp_dim),
            (f"{tower} fc2", layers, 1, m, c.mlp_dim, w),
            (f"{tower} q k^T", layers, batch * heads, tokens, d, tokens),
            (f"{tower} probs v", layers, batch * heads, tokens, tokens, d),
            (f"{tower} projection", 1, 1, batch, w, config.projection_dim)]
  v = config.vision
  out.append(("vision patch embedding", 1, 1, batch * v.num_patches, v.patch_size ** 2 * 3,
              v.width))
  return out


def _median_time(fn, reps):
  fn()
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _operands(form, g, m, k, n, rng):
  """The form's two float32 operands; a weight's (g = 1) without the g axis, as in the step."""
  shapes = {"fwd": ((g, m, k), (g, k, n)), "dA": ((g, m, n), (g, k, n)),
            "dW": ((g, m, k), (g, m, n))}[form]
  return [rng.standard_normal(s[1:] if g == 1 else s, dtype=np.float32) for s in shapes]


def time_xla(form, g, m, k, n, reps, rng):
  a, b = (jnp.asarray(x) for x in _operands(form, g, m, k, n, rng))
  spec = FORMS[form].replace("g", "") if g == 1 else FORMS[form]
  f = jax.jit(lambda x, y: jnp.einsum(spec, x, y))
  return _median_time(lambda: f(a, b).block_until_ready(), reps)


def time_torch(form, g, m, k, n, reps, rng):
  import torch  # pylint: disable=g-import-not-at-top
  a, b = (torch.from_numpy(x) for x in _operands(form, g, m, k, n, rng))
  if form == "fwd":
    fn = lambda: torch.matmul(a, b)
  elif form == "dA":
    bt = b.transpose(-1, -2)
    fn = lambda: torch.matmul(a, bt)
  else:
    at = a.transpose(-1, -2)
    fn = lambda: torch.matmul(at, b)
  with torch.no_grad():
    return _median_time(fn, reps)


def floor(config, batch, reps, use_torch, rng):
  """(rows, floor seconds, FLOPs covered): rows = (name, form, count, GFLOP/s xla, torch)."""
  rows, total, flops = [], 0.0, 0.0
  for name, count, g, m, k, n in step_matmuls(config, batch):
    for form in FORMS:
      x = time_xla(form, g, m, k, n, reps, rng)
      t = time_torch(form, g, m, k, n, reps, rng) if use_torch else float("inf")
      f = 2.0 * g * m * k * n
      rows.append((name, form, count, f / x / 1e9, f / t / 1e9 if use_torch else 0.0))
      total += count * min(x, t)
      flops += count * f
  return rows, total, flops


def fused_qkv_saving(config, batch, reps, use_torch, rng):
  """Seconds per step saved by one [m, w] x [w, 3w] q/k/v dot (and its dA, dW) per layer."""
  saved = 0.0
  for tower, tokens in (("vision", config.vision.num_patches + 1),
                        ("text", config.text.max_len)):
    c = getattr(config, tower)
    m, w = batch * tokens, c.width
    for form in FORMS:
      best = lambda kk, nn: min(time_xla(form, 1, m, kk, nn, reps, rng),
                                time_torch(form, 1, m, kk, nn, reps, rng) if use_torch
                                else float("inf"))
      saved += c.num_layers * max(0.0, 3 * best(w, w) - best(w, 3 * w))
  return saved


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="B/32")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=20, help="timed calls per dot form")
  parser.add_argument("--repeats", type=int, default=3, help="alternating step timings")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  args = parser.parse_args(argv)
  config = clip_lib.clip_config(args.variant, dtype="float32")
  rng = np.random.default_rng(0)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}; CLIP {args.variant}, batch {args.batch}, float32")
  print(f"loadavg before: {os.getloadavg()}", flush=True)

  rows, floor_s, covered = floor(config, args.batch, args.reps, args.torch, rng)
  model = flops_lib.clip_train_flops_per_step(config, args.batch, config.text.max_len)
  print(f"{'matmul':26s} {'form':4s} {'x/step':>6s} {'XLA GF/s':>9s} {'torch GF/s':>10s}")
  for name, form, count, xla, tch in rows:
    print(f"{name:26s} {form:4s} {count:6d} {xla:9.1f} {tch:10.1f}")
  saving = fused_qkv_saving(config, args.batch, args.reps, args.torch, rng)
  print(f"matmul FLOPs covered {covered / 1e9:.1f} GFLOP of the model's {model / 1e9:.1f} "
        f"(flops.clip_train_flops_per_step; the rest is the logits)")
  print(f"matmul floor: {floor_s * 1e3:.0f} ms/step at {covered / floor_s / 1e9:.0f} GFLOP/s "
        f"({(floor_s - saving) * 1e3:.0f} ms with a fused q/k/v dot)", flush=True)

  images, ids = benchmark_model.make_batch(config, args.batch)
  jax_step, state, _ = benchmark_model.jax_step_fn(config, images, ids)
  torch_step = benchmark_model.torch_step_fn(config, images, ids) if args.torch else None
  ours, theirs = [], []
  for _ in range(args.repeats):
    sec, state = benchmark_model.time_steps(jax_step, state, 1, args.steps)
    ours.append(sec)
    if torch_step is not None:
      theirs.append(benchmark_model.time_steps(lambda s: torch_step() or s, None, 1,
                                               args.steps)[0])
  print(f"loadavg after: {os.getloadavg()}")
  best_floor = floor_s - saving
  ms = lambda xs: f"{statistics.median(xs) * 1e3:.0f} ms (min-max {min(xs) * 1e3:.0f}-" \
                  f"{max(xs) * 1e3:.0f})"
  print(f"fashion_jax step {ms(ours)}: {statistics.median(ours) / best_floor:.2f}x the floor")
  if theirs:
    t = statistics.median(theirs)
    print(f"torch step {ms(theirs)}: {t / best_floor:.2f}x the floor")
    print(f"ratio torch / fashion_jax {t / statistics.median(ours):.2f}x; best ratio any "
          f"implementation could reach here (torch step / matmul floor): {t / best_floor:.2f}x")


if __name__ == "__main__":
  main()
