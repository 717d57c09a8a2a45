r"""Train-step throughput of the FashionCLIP model: ours (JAX) vs transformers' torch CLIPModel.

One step = forward of both towers on a batch of (image, text) pairs, CLIP's symmetric InfoNCE
with the learnt logit scale, backward, and an AdamW update of every parameter. Both frameworks
get identical inputs, model config, loss and optimizer hyper-parameters, on the same machine in
the same run; each run's step time is the median over its timed steps, and --repeats runs
alternate the two frameworks (a load change hits both): the report gives the median over the
runs, their min-max, and the ratio of the medians, with os.getloadavg() before and after.

COMMANDS
  # CPU, the README comparison (float32, B/32, 224 px, context 77, batch 8), idle machine:
  python -m benchmarks.benchmark_model --repeats=5
  # CPU, the same with each tower's last layer computed for the pooled token only, timed in
  # the same run beside the full last layer and torch:
  python -m benchmarks.benchmark_model --repeats=5 --pooled_last_layer=both
  # GPU: B/16 bfloat16 throughput and model FLOPs utilisation (ours only):
  python -m benchmarks.benchmark_model --variant=B/16 --dtype=bfloat16 --batch=256 --no-torch
  # GPU, cuDNN attention with the tokens padded once per tower instead of per attention call:
  python -m benchmarks.benchmark_model --variant=B/16 --dtype=bfloat16 --batch=256 --no-torch \
      --repeats=1 --attention_impl=cudnn --seq_pad_multiple=8

MFU = analytic model FLOPs per step / step time / peak FLOPs of the device. Model FLOPs count
the matmuls of forward (2 m n k each) x 3 for forward + backward, rematerialisation excluded
(the usual convention); they are computed from the config, not from XLA's cost analysis (which
counts a scanned body once). Peak: a table of dense bf16/fp32 peaks by device kind, or
--peak_tflops. With --pooled_last_layer the FLOPs are those computed (flops.py counts the last
layers' pooled-token work only), so MFU does not credit the skipped work.
"""

import argparse
import functools
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fashion_jax.losses.contrastive import info_nce
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import flops as flops_lib
from fashion_jax.models import vit as vit_lib

LR, WEIGHT_DECAY, BETAS, EPS = 1e-5, 0.1, (0.9, 0.98), 1e-6

def machine_info() -> str:
  dev = jax.devices()[0]
  lines = [f"host: {platform.node()} {platform.platform()} python {platform.python_version()}",
           f"cpu: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
           f"affinity={len(os.sched_getaffinity(0))}",
           f"jax {jax.__version__} backend={jax.default_backend()} devices={len(jax.devices())} "
           f"kind={dev.device_kind!r}"]
  return "\n".join(lines)


def make_batch(config, batch, seed=0):
  rs = np.random.RandomState(seed)
  s, length = config.vision.image_size, config.text.max_len
  images = rs.randint(0, 256, (batch, s, s, 3)).astype(np.uint8)
  # BOS, random ids below the EOS id, one EOS at a random position in [5, L).
  ids = rs.randint(0, config.text.eos_token_id, (batch, length)).astype(np.int32)
  ids[:, 0] = config.text.bos_token_id
  ids[np.arange(batch), rs.randint(5, length, batch)] = config.text.eos_token_id
  return images, ids


def time_steps(step, state, warmup, steps):
  for _ in range(warmup):
    state = step(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state = step(state)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), state


def jax_step_fn(config, images, ids):
  """(step(state) -> state, initial state, first-step seconds incl. compile): our jitted step."""
  model = clip_lib.CLIPModel(config)
  params = jax.jit(functools.partial(clip_lib.init_params, config))(jax.random.PRNGKey(0))
  params = nn.unbox(params)
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
  opt_state = tx.init(params)
  images, ids = jnp.asarray(images), jnp.asarray(ids)

  def loss_fn(p):
    out = model.apply({"params": p}, images, ids, deterministic=False)
    return info_nce(out["image_embeds"], out["text_embeds"], out["logit_scale"])[0]

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state):
    p, o = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  def step(state):
    p, o, _ = train_step(state[:2])
    jax.block_until_ready(p)
    return p, o

  t0 = time.perf_counter()
  state = step((params, opt_state))
  return step, state, time.perf_counter() - t0


def bench_jax(config, images, ids, warmup, steps):
  step, state, compile_s = jax_step_fn(config, images, ids)
  sec, _ = time_steps(step, state, max(warmup - 1, 0), steps)
  return sec, compile_s


def torch_step_fn(config, images, ids):
  """A no-argument function running one transformers CLIPModel train step (eager torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.CLIPModel(config.to_hf()).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                          weight_decay=WEIGHT_DECAY)
  mean = torch.tensor(vit_lib.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(vit_lib.CLIP_STD).view(1, 3, 1, 1)
  pixels_u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
  input_ids = torch.from_numpy(ids).long()

  def step():
    opt.zero_grad(set_to_none=True)
    pixels = (pixels_u8.float() / 255.0 - mean) / std  # Same on-step normalisation as ours.
    loss = model(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    opt.step()

  return step


def bench_torch(config, images, ids, warmup, steps):
  import torch  # pylint: disable=g-import-not-at-top
  torch_step = torch_step_fn(config, images, ids)

  def step(state):
    torch_step()
    return state

  sec, _ = time_steps(step, None, warmup, steps)
  return sec, torch.get_num_threads(), torch.__version__


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="B/32")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3,
                      help="alternating fashion_jax / torch runs; medians and min-max over them")
  parser.add_argument("--scan", action="store_true", help="nn.scan over layers")
  parser.add_argument("--remat", default="none", help="'none' or a jax.checkpoint_policies name")
  parser.add_argument("--attention_impl", default="einsum", help="layers.ATTENTION_IMPLS")
  parser.add_argument("--seq_pad_multiple", type=int, default=0,
                      help="pad each tower's tokens once to a multiple of this (0: never)")
  parser.add_argument("--pooled_last_layer", default="off", choices=["off", "on", "both"],
                      help="CLIPConfig.pooled_last_layer for our step; 'both' times the two "
                           "side by side (alternating with torch)")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU when its kind is not in the table")
  args = parser.parse_args(argv)

  pooled = {"off": (False,), "on": (True,), "both": (False, True)}[args.pooled_last_layer]
  configs = {p: clip_lib.clip_config(args.variant, dtype=args.dtype, scan=args.scan,
                                     remat_policy=args.remat, attention_impl=args.attention_impl,
                                     seq_pad_multiple=args.seq_pad_multiple, pooled_last_layer=p)
             for p in pooled}
  config = configs[pooled[0]]
  images, ids = make_batch(config, args.batch)
  print(machine_info())
  print(f"model: CLIP {args.variant} ({clip_lib.count_params(config):,} params), "
        f"{config.vision.image_size} px, context {config.text.max_len}, batch {args.batch}, "
        f"compute {args.dtype}, scan={args.scan}, remat={args.remat}, attention "
        f"{args.attention_impl}, seq_pad_multiple={args.seq_pad_multiple}; AdamW lr={LR} "
        f"wd={WEIGHT_DECAY}; warmup {args.warmup}, timed {args.steps} (median)")

  if args.torch and args.dtype != "float32":
    raise SystemExit("The torch comparison runs float32 only; pass --no-torch for bfloat16.")
  print(f"loadavg before: {os.getloadavg()}", flush=True)
  ours = {}  # pooled_last_layer -> [step, state, first-step seconds, step times]
  for p in pooled:
    step, state, compile_s = jax_step_fn(configs[p], images, ids)
    ours[p] = [step, state, compile_s, []]
  name = lambda p: "fashion_jax" + (" pooled_last_layer" if p else "")
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch_step = torch_step_fn(config, images, ids)
  torch_s = []
  for r in range(args.repeats):  # Alternate the frameworks: a load change hits both.
    parts = []
    for p, run in ours.items():
      sec, run[1] = time_steps(run[0], run[1], args.warmup if r else max(args.warmup - 1, 0),
                               args.steps)
      run[3].append(sec)
      parts.append(f"{name(p)} {sec * 1e3:.0f} ms/step")
    if args.torch:
      tsec, _ = time_steps(lambda s: torch_step() or s, None, args.warmup, args.steps)
      torch_s.append(tsec)
      parts.append(f"torch {tsec * 1e3:.0f} ms/step")
      parts += [f"ratio {name(p)} {tsec / run[3][-1]:.2f}x" for p, run in ours.items()]
    print(f"repeat {r}: " + ", ".join(parts), flush=True)
  print(f"loadavg after: {os.getloadavg()}")
  spread = lambda xs: f"median of {len(xs)} runs, min-max {min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f}"
  peak = flops_lib.peak_flops(args.dtype, args.peak_tflops)
  for p, (_, _, compile_s, times) in ours.items():
    sec = statistics.median(times)
    flops = flops_lib.clip_train_flops_per_step(configs[p], args.batch, config.text.max_len)
    mfu = f"{flops / sec / peak:.1%}" if peak else "n/a (unknown peak; pass --peak_tflops)"
    print(f"{name(p)} (jit): {1 / sec:.3f} steps/s, {args.batch / sec:.1f} examples/s, "
          f"{sec * 1e3:.0f} ms/step ({spread(times)}; first step incl. compile "
          f"{compile_s:.1f} s); model FLOPs/step {flops / 1e12:.3f} TFLOP, "
          f"{flops / sec / 1e12:.2f} TFLOP/s, MFU {mfu}")
  if args.torch:
    tsec = statistics.median(torch_s)
    print(f"torch {torch.__version__} transformers CLIPModel (eager, "
          f"{torch.get_num_threads()} threads): "
          f"{1 / tsec:.3f} steps/s, {tsec * 1e3:.0f} ms/step ({spread(torch_s)})")
    for p, (_, _, _, times) in ours.items():
      ratios = [t / j for t, j in zip(torch_s, times)]
      print(f"ratio {name(p)} / torch (steps/s): {tsec / statistics.median(times):.2f}x (ratio "
            f"of the medians; per repeat {min(ratios):.2f}-{max(ratios):.2f}x)")
  if len(ours) == 2:
    full, cut = ours[False][3], ours[True][3]
    ratios = [a / b for a, b in zip(full, cut)]
    print(f"pooled_last_layer speed-up: {statistics.median(full) / statistics.median(cut):.3f}x "
          f"(per repeat {min(ratios):.3f}-{max(ratios):.3f}x)")

if __name__ == "__main__":
  main()
