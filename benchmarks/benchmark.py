r"""Measured train-step time, samples/s and model FLOPs utilisation of every system.

For each system the trainer's own step is built (train/state.py + train/step.py: the config's
optimizer, donation, sharding rules) on a data-parallel mesh over the devices present, fed a
fixed batch of the system's shapes (`dummy_batch` with its uint8 and float arrays and its token
ids made random by `random_batch`: GEMMs on zeros run faster than on real data, and all-zero ids
make the embedding gradient a contended scatter), compiled, run `--warmup` times, then timed two
ways (`time_step`): pipelined (3 rounds of `--repeats` steps dispatched back to back and waited
for once, as the trainer runs: it fetches metrics only every log_every_steps) gives "step ms",
samples/s and MFU; blocking (each step waited for) is shown beside it, the difference being the
host's dispatch of the next step. XLA_FLAGS in the environment is recorded per row.

--profile_dir=DIR also traces `--profile_steps` more steps with jax.profiler into DIR/<system>
and adds benchmarks/profile_account.py's account of the device time (kernel categories, idle time,
top kernels, the GEMM kernels' achieved TFLOP/s) to the row and the printout.

FLOPs per step: analytic model FLOPs for CLIP-family systems (fashion_jax/models/flops.py:
matmuls, forward x 3); otherwise XLA's cost analysis of the compiled step, which is exact for
the unscanned configs benchmarked here but also counts elementwise and optimizer work.
MFU = FLOPs per step / step time / (devices x peak). Peak: --peak_tflops, else the device
kind's dense peak (fashion_jax/models/flops.py PEAK_TFLOPS: GPU/TPU), else on a CPU the measured
float32 throughput of a large matmul on one device (`--peak_tflops=0` keeps that), so the same
command runs unchanged on a GPU.

COMMANDS
  python -m benchmarks.benchmark --json=/tmp/bench.json --markdown=/tmp/bench.md   # CPU, smoke
  python -m benchmarks.benchmark --systems=fashionclip --variant=base --batch=256 \
      --set model.dtype='"bfloat16"'                                          # a GPU
  benchmarks/gpu_mfu.sh   # the H100 runs in docs/benchmarks.md "Accelerator efficiency" (variants + profiles)
"""

import argparse
import functools
import json
import math
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax import systems
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib
from benchmarks import benchmark_model
from benchmarks import profile_account
from fashion_jax import configs
from fashion_jax.models import flops as flops_lib
from fashion_jax.train import plan

SYSTEMS = {  # system -> config file; the variant is --variant (default smoke).
    "fashionclip": "configs/fashionclip.py",
    "fashionsiglip": "configs/fashionsiglip.py",  # The FashionCLIP system, family 'siglip'.
    "e2": "configs/e2.py",
    "fashionvil": "configs/fashionvil.py",
    "fashionbert": "configs/fashionbert.py",
}


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"\s*(?:ROOT\s+)?%?([^\s=]+) = (\(.*?\)|\S+) ([a-z][a-z0-9\-]*)\((.*?)\)")


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (an array shape or a tuple of them; layouts ignored)."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective kind: {'count', 'operand_bytes'} summed over a compiled HLO module's text.

  `compiled.as_text()` prints operands by name only, so every instruction's result shape is
  read first and an operand's bytes are its producer's result bytes (parameters included).
  Async pairs count once, at their `-start`. Static count: an op in a while body (scan) counts
  once, whatever the trip count. Bytes are per device (SPMD: one device's program).
  """
  shapes, ops = {}, []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, operands = m.groups()
    shapes[name] = shape
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      ops.append((kind, [o.strip().lstrip("%") for o in operands.split(",") if o.strip()]))
  out = {k: {"count": 0, "operand_bytes": 0} for k in COLLECTIVES}
  for kind, operands in ops:
    out[kind]["count"] += 1
    out[kind]["operand_bytes"] += sum(_shape_bytes(shapes.get(o.split(" ")[-1].lstrip("%"),
                                                              "")) for o in operands)
  return out


@functools.lru_cache(maxsize=None)  # One measurement per process: every row shares the peak.
def measured_matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
  """float32 TFLOP/s of an [n, n] @ [n, n] matmul on device 0 (median of `repeats`)."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e12


def device_peak(dtype: str, override_tflops: float) -> tuple[float, str]:
  """(peak TFLOP/s per device, where it comes from)."""
  if override_tflops:
    return override_tflops, "given"
  peak = flops_lib.peak_flops(dtype, 0.0)
  if peak:
    return peak / 1e12, f"{jax.devices()[0].device_kind} table"
  return measured_matmul_tflops(), "measured f32 matmul"


def _fill_system_files(config, workdir: str) -> None:
  """FashionViL's PAC and MPFC need a vocabulary / code file path: only their sizes matter."""
  data = config.data
  if "attributes" in data and not data.attributes:
    path = os.path.join(workdir, "attributes.txt")
    with open(path, "w") as f:
      f.write("".join(f"attribute{i}\n" for i in range(64)))
    data.attributes = path
  if "vq_codes" in data and not data.vq_codes:
    data.vq_codes = "unused-by-the-step.npz"


FIELD_VALUES = 16  # Distinct values per multi-field field in a benchmark batch.


def random_batch(batch: dict, vocab_size: int = 0, seed: int = 0) -> dict:
  """`batch` with uint8 arrays uniform in [0, 255], float arrays standard normal and the token
  ids 'text' uniform in [0, vocab_size) when vocab_size is given; a multi-field batch's
  'field_text' [B, F, L] takes each product's field f from FIELD_VALUES random token rows of
  that field, as catalog attributes repeat (a batch of 64 synthetic products has 7 to 38
  distinct values per field), so model.field_dedup encodes what it would in training; and
  'field_mask' all present.

  Random ids matter beyond the GEMMs: all-zero ids make the token embedding's gradient a
  scatter-add of every token into one row, which serialises on the GPU (10% of a B/16 step).
  """
  rs = np.random.RandomState(seed)
  out = {}
  for k, x in batch.items():
    if k == "text" and vocab_size and np.issubdtype(x.dtype, np.integer):
      x = rs.randint(0, vocab_size, x.shape).astype(x.dtype)
    elif k == "field_text" and vocab_size:
      b, f, length = x.shape
      values = rs.randint(0, vocab_size, (f, FIELD_VALUES, length))
      x = values[np.arange(f), rs.randint(0, FIELD_VALUES, (b, f))].astype(x.dtype)
    elif k == "field_mask":  # Every product has every field (dummy_batch's are all missing).
      x = np.ones_like(x)
    elif x.dtype == np.uint8:
      x = rs.randint(0, 256, x.shape).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
      x = rs.randn(*x.shape).astype(x.dtype)
    out[k] = x
  return out


def time_step(step, state, batch, warmup: int, repeats: int, rounds: int = 3):
  """Times `step` (a compiled step that donates its state) two ways.

  Returns (blocking, pipelined, first call's time, the last state), times in s:
    blocking:  `repeats` single steps, each ended by block_until_ready (latency: includes the
               host's dispatch of the next step, ~10 ms for a B/16 step on the H100);
    pipelined: `rounds` x (`repeats` steps dispatched back to back, then one block), per step:
               what the trainer sees, since it fetches metrics only every log_every_steps.
  """
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  blocking = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    blocking.append(time.perf_counter() - t0)
  pipelined = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(repeats):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    pipelined.append((time.perf_counter() - t0) / repeats)
  return blocking, pipelined, first, state


def bench_system(name: str, variant: str, overrides: list[str], batch_size: int, warmup: int,
                 repeats: int, peak_tflops: float, profile_dir: str = "",
                 profile_steps: int = 3, strategy: str = "dp") -> dict:
  """One benchmark row. strategy: the mesh over all devices, 'dp' (data=N, the default) or
  'fsdp' (fsdp=N: params, gradients and Adam state sharded; plan.strategy_mesh)."""
  config = configs.get(f"{SYSTEMS[name]}:{variant}", overrides)
  with tempfile.TemporaryDirectory() as tmp:
    _fill_system_files(config, tmp)
    if batch_size:
      config.batch_size = batch_size
    n = len(jax.devices())
    config.mesh = plan.strategy_mesh(strategy, n, 1)
    mesh = mesh_lib.create_mesh(config.mesh)
    full = config_check.with_defaults(config)
    rules = sharding_lib.logical_rules(full.sharding_rules)
    system = systems.get_system(full)
    shapes = state_lib.abstract_params(system, mesh, rules, full.seed)
    tx, schedule = optimizer_lib.make_optimizer(full.optimizer, shapes.params,
                                                full.total_steps or 1000)
    _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, full.seed, shapes)
    state = state_lib.create_train_state(system, tx, mesh, rules, full.seed, state_sh, shapes)
    step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh,
                                    full.grad_accum_steps)
    vocab = getattr(getattr(system, "tokenizer", None), "vocab_size", 0)
    batch = sharding_lib.global_batch(
        random_batch(system.dummy_batch(full.batch_size), vocab), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    blocking, times, first, state = time_step(compiled, state, batch, warmup, repeats)
    trace_dir = ""
    if profile_dir:  # Pipelined steps, as timed: one block at the end.
      trace_dir = os.path.join(profile_dir, name)
      with jax.profiler.trace(trace_dir):
        for _ in range(profile_steps):
          state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
  flops = plan.analytic_flops(system, full.batch_size)
  source = "analytic"
  if flops is None:
    flops, source = plan.xla_flops(compiled) * n, "xla"
  dtype = str(full.model.get("dtype", "float32"))
  peak, peak_source = device_peak(dtype, peak_tflops)
  sec = statistics.median(times)
  profile = None
  if trace_dir:
    profile = profile_account.account(trace_dir, profile_steps, sec,
                                      flops / n if source == "analytic" else None)
  return dict(system=name, variant=variant, levers=plan.levers(full), devices=n,
              device_kind=jax.devices()[0].device_kind, batch_size=int(full.batch_size),
              params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.params))),
              step_s=sec, step_s_all=times, blocking_step_s=statistics.median(blocking),
              blocking_step_s_all=blocking, compile_s=compile_s, first_step_s=first,
              samples_per_s=full.batch_size / sec, flops_per_step=flops, flops_source=source,
              tflops_per_s=flops / sec / 1e12, peak_tflops=peak, peak_source=peak_source,
              mfu=flops / sec / (n * peak * 1e12), warmup=warmup, repeats=repeats,
              xla_flags=os.environ.get("XLA_FLAGS", ""), profile=profile, strategy=strategy,
              collectives=collective_bytes(compiled.as_text()))


def markdown(rows: list[dict]) -> str:
  head = ["system", "variant", "levers", "params", "batch", "step ms", "blocking step ms",
          "samples/s", "TFLOP/step", "TFLOP/s", "peak TFLOP/s", "MFU"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([
        r["system"], r["variant"], r["levers"], f"{r['params'] / 1e6:.1f}M",
        str(r["batch_size"]), f"{r['step_s'] * 1e3:.1f}", f"{r['blocking_step_s'] * 1e3:.1f}",
        f"{r['samples_per_s']:.1f}",
        f"{r['flops_per_step'] / 1e12:.4g}" + ("" if r["flops_source"] == "analytic" else "*"),
        f"{r['tflops_per_s']:.3f}", f"{r['peak_tflops']:.3g}", f"{r['mfu']:.1%}"]) + " |")
  if rows:
    r = rows[0]
    lines.append(f"\nDevices: {r['devices']} x {r['device_kind']!r}; peak per device: "
                 f"{r['peak_source']}; step ms: pipelined (median of 3 rounds of "
                 f"{r['repeats']} steps dispatched back to back, as the trainer runs), blocking: "
                 f"median of {r['repeats']} steps each waited for; after {r['warmup']} warm-up "
                 "steps. * = XLA's FLOP count of the compiled step.")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--systems", default=",".join(SYSTEMS))
  parser.add_argument("--variant", default="smoke")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: config's)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak per device; 0 = detect (table, or a CPU matmul)")
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  parser.add_argument("--profile_dir", default="",
                      help="trace --profile_steps extra steps here and account for device time")
  parser.add_argument("--profile_steps", type=int, default=3)
  args = parser.parse_args(argv)
  if args.profile_dir and jax.default_backend() == "cpu":
    parser.error(f"--profile_dir={args.profile_dir!r}: the account reads a GPU/TPU's kernels and "
                 "this run has only CPU devices.")
  print(benchmark_model.machine_info(), flush=True)
  rows = []
  for name in args.systems.split(","):
    if name not in SYSTEMS:
      parser.error(f"--systems: unknown system {name!r}; known: {', '.join(SYSTEMS)}.")
    row = bench_system(name, args.variant, args.set, args.batch, args.warmup, args.repeats,
                       args.peak_tflops, args.profile_dir, args.profile_steps)
    rows.append(row)
    print(markdown([row]).splitlines()[2], flush=True)
    if row["profile"]:
      print(profile_account.markdown(row["profile"]), flush=True)
  table = markdown(rows)
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=benchmark_model.machine_info(), rows=rows), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(benchmark_model.machine_info() + "\n\n" + table + "\n")


if __name__ == "__main__":
  main()
