r"""Where the CPU train step's time goes, and what each lever buys, side by side in one process.

The step is benchmarks/benchmark_model.py's (CLIP B/32, 224 px, context 77, float32, batch 8,
forward + backward + AdamW, donated state). Two modes:

  # Levers A/B, interleaved rounds in ONE process (same load for every row), torch included:
  python -m benchmarks.profile_cpu_step --rounds=3 --steps=3
  # XLA compiler options as extra A/B rows (NAME:KEY=VALUE[;KEY=VALUE...], repeatable):
  python -m benchmarks.profile_cpu_step --no-torch --rows=default --xla_option \
      'xnn_dot:xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT'
  # Account of one configuration from a jax.profiler trace (XLA CPU thunks by kind):
  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python -m benchmarks.profile_cpu_step --trace
  #   ... --trace_phase=forward | fwd+bwd: the same account of the loss alone, or with gradients
  # The step split into its phases, ours and torch's, interleaved in one process:
  python -m benchmarks.profile_cpu_step --split --rounds=3 --steps=3

Rows of the A/B mode (each a separately jitted step; its median over all rounds, min-max):
  conv_patch:   the patch embedding as the strided nn.Conv it was before (the reference);
  default:      the current model (patch embedding as reshape + matmul, vit.PatchEmbed);
  xla_attn:     attention_impl='xla' (jax.nn.dot_product_attention) instead of 'einsum';
  --xla_option: the default model compiled with those XLA options (`compile(compiler_options=)`,
                the DebugOptions field names of XLA_FLAGS without the dashes; enum values by
                their full names). Its parameters after the first step must equal the default
                row's (without --rows=default, the first option row's) within 1e-5, or the run
                stops: an option may change speed, not numbers;
  torch:        transformers' CLIPModel, eager, torch.optim.AdamW (benchmark_model.bench_torch).
--rows picks the built-in rows to run (default: all three). Rounds interleave the rows
(A B C T, A B C T, ...) so a load change hits all of them; the ratios are the useful numbers on a
shared machine. os.getloadavg() is printed before/after.

Rows of the split mode (each framework's own code; the same model, batch and AdamW settings):
  forward:      the loss alone (ours: a jitted forward + loss; torch: the training-mode forward
                + loss, building its autograd graph as a train step does);
  fwd+bwd:      the loss and every parameter's gradient (no optimizer);
  adamw:        the optimizer update alone, on gradients computed before the clock starts
                (ours: optax.adamw jitted with the state donated; torch: torch.optim.AdamW's
                default, which on a CPU is the per-tensor loop, and fused=True beside it);
  step:         the whole train step (benchmark_model's).

The trace account sums the duration of every XLA CPU thunk event on the Eigen worker threads
(per step, divided by the number of worker threads: the share of the 2 cores' time), grouped
by the thunk's fusion kind (name without its '.N' suffix) and by what it computes:
  matmul (ynn_fusion / dot: YNNPACK and Eigen dots), adamw (the optimizer's loop fusions, the
  ones whose operands are Adam's mu/nu or that update a parameter), copies/transposes, other.
Then every dot by form (operand shapes and contracting dims, read from the compiled HLO): count,
FLOPs and event time per step, and how much of the dots' time has two or more running at once
(XLA runs independent thunks concurrently, one per worker thread).
"""

import argparse
import collections
import functools
import glob
import os
import re
import statistics
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import benchmark_model as bm
from fashion_jax.losses.contrastive import info_nce
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import vit as vit_lib


class ConvPatchEmbed(nn.Module):
  """The previous stem: nn.Conv(stride = kernel = p, VALID) + reshape (vit.PatchEmbed's twin)."""
  features: int
  patch_size: int
  use_bias: bool = False
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    y = nn.Conv(self.features, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    return y.reshape(x.shape[0], -1, self.features)


def make_loss(config, images, ids):
  """(loss_fn(params) -> scalar, initial params, AdamW): the pieces of the benchmark's step."""
  model = clip_lib.CLIPModel(config)
  params = nn.unbox(jax.jit(functools.partial(clip_lib.init_params, config))(
      jax.random.PRNGKey(0)))
  tx = optax.adamw(bm.LR, b1=bm.BETAS[0], b2=bm.BETAS[1], eps=bm.EPS,
                   weight_decay=bm.WEIGHT_DECAY)
  images, ids = jnp.asarray(images), jnp.asarray(ids)

  def loss_fn(p):
    out = model.apply({"params": p}, images, ids, deterministic=False)
    return info_nce(out["image_embeds"], out["text_embeds"], out["logit_scale"])[0]
  return loss_fn, params, tx


def parse_xla_option(spec: str) -> tuple[str, dict[str, bool | int | str]]:
  """'NAME:KEY=VALUE[;KEY=VALUE...]' -> (NAME, compiler options); 'true'/'false' become bools
  and integers ints, the rest stays a string (XLA parses enums by name)."""
  name, sep, body = spec.partition(":")
  if not sep or not name or not body:
    raise ValueError(f"--xla_option {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE...]")
  opts = {}
  for item in body.split(";"):
    key, eq, value = item.partition("=")
    if not eq or not key.startswith("xla_"):
      raise ValueError(f"--xla_option {spec!r}: {item!r} is not xla_<option>=<value>")
    low = value.lower()
    opts[key] = (low == "true" if low in ("true", "false")
                 else int(value) if re.fullmatch(r"-?\d+", value) else value)
  return name, opts


def make_step(config, images, ids, conv_patch=False, compiler_options=None):
  """(jitted donated step(state) -> state, initial state) for `config`; with compiler_options,
  compiled ahead of time with those XLA options."""
  loss_fn, params, tx = make_loss(config, images, ids)
  if conv_patch:
    params["vision"]["patch_embed"] = {"conv": params["vision"]["patch_embed"]}

  def train_step(state):
    p, o = state
    grads = jax.grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  step = jax.jit(train_step, donate_argnums=0)
  if compiler_options:
    return (step.lower((params, tx.init(params))).compile(compiler_options=compiler_options),
            (params, tx.init(params)))
  if conv_patch:  # Trace with the stem swapped; the jitted function is traced only here.
    original = vit_lib.PatchEmbed
    vit_lib.PatchEmbed = ConvPatchEmbed
    try:
      step = step.lower((params, tx.init(params))).compile()
    finally:
      vit_lib.PatchEmbed = original
  return step, (params, tx.init(params))


def ab(args):
  base = clip_lib.clip_config(args.variant)
  images, ids = bm.make_batch(base, args.batch)
  builtin = {"conv_patch": dict(conv_patch=True), "default": {},
             "xla_attn": dict(config=base.replace(attention_impl="xla"))}
  unknown = sorted(set(args.rows) - set(builtin))
  if unknown:
    raise ValueError(f"--rows {unknown}: not one of {sorted(builtin)}")
  rows = {name: builtin[name] for name in args.rows}
  for name, opts in map(parse_xla_option, args.xla_option):
    if name in rows:
      raise ValueError(f"--xla_option row name {name!r} is taken")
    rows[name] = dict(compiler_options=opts)
  steps, states, times = {}, {}, collections.defaultdict(list)
  first = {}
  for name, kw in rows.items():
    steps[name], states[name] = make_step(kw.get("config", base), images, ids,
                                          kw.get("conv_patch", False), kw.get("compiler_options"))
    states[name] = jax.block_until_ready(steps[name](states[name]))  # Compile + warm up.
    if "config" not in kw and not kw.get("conv_patch"):
      first[name] = jax.tree.leaves(states[name][0])
  ref_name, ref_leaves = next(iter(first.items()), (None, None))
  for name, leaves in first.items():  # Same model and inputs: an option must not move a number.
    if name == ref_name:
      continue
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves, ref_leaves))
    print(f"{name}: max |param - {ref_name}'s| after one step: {diff:.2e}")
    if diff > 1e-5:
      raise SystemExit(f"{name} changes the numbers (max parameter difference {diff:.2e})")
  torch_step = None
  if args.torch:
    torch_step = bm.torch_step_fn(base, images, ids)
    torch_step()
  print(f"loadavg before: {os.getloadavg()}", flush=True)
  for r in range(args.rounds):
    for name in rows:
      for _ in range(args.steps):
        t0 = time.perf_counter()
        states[name] = jax.block_until_ready(steps[name](states[name]))
        times[name].append(time.perf_counter() - t0)
    if torch_step is not None:
      for _ in range(args.steps):
        t0 = time.perf_counter()
        torch_step()
        times["torch"].append(time.perf_counter() - t0)
    print(f"round {r}: " + ", ".join(f"{k} {statistics.median(v[-args.steps:]) * 1e3:.0f} ms"
                                      for k, v in times.items()), flush=True)
  print(f"loadavg after: {os.getloadavg()}")
  ref = statistics.median(times["torch"]) if "torch" in times else None
  print(f"{'row':12s} {'median ms':>10s} {'min-max ms':>16s} {'torch/row':>10s}")
  for name, ts in times.items():
    med = statistics.median(ts)
    ratio = f"{ref / med:.2f}x" if ref else "-"
    print(f"{name:12s} {med * 1e3:10.0f} {min(ts) * 1e3:7.0f}-{max(ts) * 1e3:<8.0f} {ratio:>10s}")


def split(args):
  """Times forward, forward + backward, the AdamW update and the step, ours and torch's."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = clip_lib.clip_config(args.variant)
  images, ids = bm.make_batch(config, args.batch)
  loss_fn, params, tx = make_loss(config, images, ids)
  fwd, grad = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))
  grads = jax.block_until_ready(grad(params))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt_state = [jax.tree.map(jnp.copy, params), tx.init(params)]

  def jax_adamw():
    opt_state[:] = update(*opt_state, grads)
    jax.block_until_ready(opt_state[0])

  step, state = bm.jax_step_fn(config, images, ids)[:2]
  step_state = [state]

  def jax_step():
    step_state[0] = step(step_state[0])

  torch.manual_seed(0)
  tm = transformers.CLIPModel(config.to_hf()).train()
  mean = torch.tensor(vit_lib.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(vit_lib.CLIP_STD).view(1, 3, 1, 1)
  pixels_u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
  input_ids = torch.from_numpy(ids).long()

  def torch_loss():
    pixels = (pixels_u8.float() / 255.0 - mean) / std
    return tm(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss

  def torch_fwd_bwd():
    tm.zero_grad(set_to_none=True)
    torch_loss().backward()

  torch_fwd_bwd()  # Gradients in place for the optimizer rows.
  opts = {kw: torch.optim.AdamW(tm.parameters(), lr=bm.LR, betas=bm.BETAS, eps=bm.EPS,
                                weight_decay=bm.WEIGHT_DECAY, **dict(kw))
          for kw in ((), (("fused", True),))}
  torch_step = bm.torch_step_fn(config, images, ids)
  rows = {
      ("forward", "ours"): lambda: jax.block_until_ready(fwd(params)),
      ("forward", "torch"): torch_loss,
      ("fwd+bwd", "ours"): lambda: jax.block_until_ready(grad(params)),
      ("fwd+bwd", "torch"): torch_fwd_bwd,
      ("adamw", "ours"): jax_adamw,
      ("adamw", "torch"): opts[()].step,
      ("adamw", "torch fused=True"): opts[(("fused", True),)].step,
      ("step", "ours"): jax_step,
      ("step", "torch"): torch_step,
  }
  for fn in rows.values():  # Compile and warm up.
    fn()
  times = collections.defaultdict(list)
  print(f"loadavg before: {os.getloadavg()}", flush=True)
  for _ in range(args.rounds):
    for key, fn in rows.items():
      for _ in range(args.steps):
        t0 = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - t0)
  print(f"loadavg after: {os.getloadavg()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
  print(f"{'phase':10s} {'framework':18s} {'median ms':>10s} {'min-max ms':>14s} "
        f"{'torch/ours':>10s}")
  for (phase, who), ts in times.items():
    med = statistics.median(ts)
    ratio = statistics.median(times[(phase, "torch")]) / statistics.median(times[(phase, "ours")])
    print(f"{phase:10s} {who:18s} {med * 1e3:10.0f} {min(ts) * 1e3:6.0f}-{max(ts) * 1e3:<7.0f} "
          f"{(f'{ratio:.2f}x' if who == 'ours' else ''):>10s}")


def categorize(name: str, hlo_line: str) -> str:
  if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
    return "matmul"
  if re.search(r"__(mu|nu)__", hlo_line) or name.startswith("multiply_add_fusion"):
    return "adamw"
  if re.search(r"copy|transpose", name):
    return "copy/transpose"
  if name.startswith("convolution"):
    return "convolution"
  return "other (LayerNorm, softmax, GELU, bias, residual, loss, scatter)"


_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = ")


def hlo_computations(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """Of a compiled module's text: (instruction -> its line, computation -> its instructions).
  XLA names instructions uniquely across a module, so one map resolves any operand."""
  lines, comps, current = {}, {}, None
  for line in text.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      current = comps.setdefault(head.group(1), [])
      continue
    m = _INSTR.match(line)
    if m:
      lines[m.group(1)] = line
      if current is not None:
        current.append(m.group(1))
  return lines, comps


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def dot_flops(line: str, lines: dict[str, str]) -> tuple[int, str] | None:
  """(2 x output elements x contracted size, form) of a `dot` line, its operands' shapes read
  from their own lines; form = 'lhs x rhs, contracting (l; r)[, batch]'."""
  m = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), (.*)", line)
  if not m:
    return None
  shapes = []
  for operand in m.group(2, 3):
    s = re.search(r"= \w+\[([\d,]*)\]", lines.get(operand, ""))
    if not s:
      return None
    shapes.append(_dims(s.group(1)))
  contract = [_dims(re.search(side + r"_contracting_dims=\{([\d,]*)\}", m.group(4)).group(1))
              for side in ("lhs", "rhs")]
  k = int(np.prod([shapes[0][d] for d in contract[0]]))
  form = (f"{shapes[0]} x {shapes[1]}, contracting ({contract[0]}; {contract[1]})"
          + (", batch" if "lhs_batch_dims" in m.group(4) else ""))
  return 2 * int(np.prod(_dims(m.group(1)))) * k, form


def thunk_dots(name: str, lines: dict[str, str], comps: dict[str, list[str]]):
  """[(flops, form)] of the dots a thunk runs: a plain dot, or those of the fusion it calls."""
  line = lines.get(name, "")
  called = re.search(r"calls=%([\w.\-]+)", line)
  body = [name] if " dot(" in line else comps.get(called.group(1), []) if called else []
  return [d for d in (dot_flops(lines[i], lines) for i in body if " dot(" in lines[i]) if d]


def concurrency(intervals: list[tuple[int, int]]) -> tuple[int, int]:
  """(time covered by at least one interval, time covered by two or more), in their units."""
  edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
  covered = overlapped = active = 0
  last = None
  for t, delta in edges:
    if last is not None:
      covered += (t - last) * (active >= 1)
      overlapped += (t - last) * (active >= 2)
    active += delta
    last = t
  return covered, overlapped


def trace(args):
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  config = clip_lib.clip_config(args.variant)
  images, ids = bm.make_batch(config, args.batch)
  if args.trace_phase == "step":
    step, state = make_step(config, images, ids)
  else:  # The loss, or the loss and its gradients, of the params.
    loss_fn, state, _ = make_loss(config, images, ids)
    fn = jax.jit(loss_fn if args.trace_phase == "forward" else jax.grad(loss_fn))

    def step(p):  # Same contract as the step's: state in, state out, after the work is done.
      jax.block_until_ready(fn(p))
      return p
    step.lower = fn.lower
  state = jax.block_until_ready(step(state))
  hlo, comps = hlo_computations(step.lower(state).compile().as_text())
  out = tempfile.mkdtemp(prefix="cpu_step_trace_")
  print(f"loadavg before: {os.getloadavg()}", flush=True)
  jax.profiler.start_trace(out)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state = jax.block_until_ready(step(state))
  wall = (time.perf_counter() - t0) / args.steps
  jax.profiler.stop_trace()
  print(f"loadavg after: {os.getloadavg()}; {wall * 1e3:.0f} ms/step while tracing; trace {out}")
  pb = glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True)[-1]
  by_kind, by_cat, threads = collections.Counter(), collections.Counter(), set()
  by_form = collections.defaultdict(lambda: [0, 0, 0])  # form -> [events, flops, ns]
  dot_spans, dot_cache = [], {}
  for plane in _profile_data.ProfileData.from_file(pb).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      threads.add(line.name)
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          continue
        name = ev.name.removeprefix("end: ")
        by_kind[re.sub(r"\.\d+$", "", name)] += ev.duration_ns
        by_cat[categorize(name, hlo.get(name, ""))] += ev.duration_ns
        if ev.name.startswith("end: "):
          continue
        if name not in dot_cache:
          dot_cache[name] = thunk_dots(name, hlo, comps)
        for i, (flops, form) in enumerate(dot_cache[name]):
          row = by_form[form]
          row[0] += 1
          row[1] += flops
          row[2] += ev.duration_ns if i == 0 else 0
        if dot_cache[name]:
          dot_spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  per_step = lambda ns: ns / 1e6 / args.steps / max(len(threads), 1)
  total = sum(by_cat.values())
  print(f"\n{len(threads)} worker threads; ms per step = thread time / threads")
  print(f"{'category':64s} {'ms/step':>8s} {'share':>6s}")
  for k, v in by_cat.most_common():
    print(f"{k:64s} {per_step(v):8.0f} {v / total:6.1%}")
  print(f"{'(sum of thunks)':64s} {per_step(total):8.0f}")
  print(f"\n{'thunk kind':40s} {'ms/step':>8s} {'share':>6s}")
  for k, v in by_kind.most_common(args.top):
    print(f"{k:40s} {per_step(v):8.0f} {v / total:6.1%}")
  # Each dot thunk's event lasts as long as the thunk runs on its thread, whatever other threads
  # it uses; an event rate above the machine's peak means the work outlives the event.
  covered, overlapped = concurrency(dot_spans)
  n = args.steps
  print("\ndots by form (per call; GFLOP/s = FLOPs / event time):")
  print(f"{'form':78s} {'n':>4s} {'GFLOP':>7s} {'event ms':>9s} {'GFLOP/s':>8s}")
  for form, (count, flops, ns) in sorted(by_form.items(), key=lambda kv: -kv[1][2]):
    rate = f"{flops / ns:8.0f}" if ns * 1e4 > flops else f"{'>10,000':>8s}"  # Outlives its event.
    print(f"{form[:78]:78s} {count / n:4.0f} {flops / 1e9 / n:7.2f} {ns / 1e6 / n:9.1f} {rate}")
  total_flops = sum(flops for _, flops, _ in by_form.values())
  print(f"dot events cover {covered / 1e6 / n:.0f} ms of each {wall * 1e3:.0f} ms call "
        f"({wall * 1e3 - covered / 1e6 / n:.0f} ms with no dot running); two or more dots run "
        f"at once for {overlapped / max(covered, 1):.0%} of that; {total_flops / 1e9 / n:.1f} "
        f"GFLOP of dots per call, {total_flops / max(covered, 1):.0f} GFLOP/s over their time")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="B/32", help="clip_config variant ('tiny': a smoke run)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--rows", type=lambda s: s.split(","), default=["conv_patch", "default",
                      "xla_attn"], help="A/B: comma-separated built-in rows")
  parser.add_argument("--xla_option", action="append", default=[],
                      help="A/B: an extra row NAME:KEY=VALUE[;KEY=VALUE...] of XLA options")
  parser.add_argument("--trace", action="store_true", help="profile account instead of A/B")
  parser.add_argument("--trace_phase", default="step", choices=("step", "forward", "fwd+bwd"),
                      help="--trace: the whole step, the loss alone, or the loss and gradients")
  parser.add_argument("--split", action="store_true",
                      help="forward / fwd+bwd / AdamW / step, ours and torch's, instead of A/B")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args(argv)
  print(bm.machine_info())
  (trace if args.trace else split if args.split else ab)(args)


if __name__ == "__main__":
  main()
