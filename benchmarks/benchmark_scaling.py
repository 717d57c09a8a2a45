r"""Weak scaling of the FashionCLIP smoke train step on 1, 2, 4, 8 fake CPU devices, and the plan.

COMMAND
  python -m benchmarks.benchmark_scaling                      # 1,2,4,8 devices, 32 per device
  python -m benchmarks.benchmark_scaling --devices=1,2 --plan_devices=   # quicker, no plan rows

Each device count runs in its own child process (the fake device count is fixed per process by
XLA_FLAGS=--xla_force_host_platform_device_count=N). Weak scaling: the global batch is
`--per_device` x N. A child reports:
  samples/s  the trainer's jitted step (benchmarks/benchmark.py `bench_system`: pipelined
             steps, median of 3 rounds of --repeats) on a mesh of --strategy over N devices;
  collectives  per kind (all-gather, reduce-scatter, all-reduce, collective-permute,
             all-to-all), the count and the operand bytes per device of the compiled step
             (`benchmark.collective_bytes` parses compiled.as_text(); static count, no scan here).
The plan rows (--plan_devices, default 64,256) compile the same step ahead of time for that many
fake devices (fashion_jax/train/plan.py: `compile_step`, nothing allocated) and report its
collectives, per-chip peak memory and the planner's predicted samples/s at --mfu of --chip's peak
(analytic FLOPs / (N x peak x MFU)).

Fake CPU devices share this machine's cores, so samples/s cannot grow with N: flat is the best
case, and it measures the partitioning overhead (smaller per-device matmuls, the collectives
as memory copies). The collective bytes are the useful column: they are what an accelerator
mesh would move per step.
"""

import argparse
import json
import os
import subprocess
import sys

import jax

from benchmarks import benchmark
from benchmarks import benchmark_retrieval
from fashion_jax import configs
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.train import plan

GiB = 1024 ** 3


def child(args) -> dict:
  """One device count: a timed step (or, with --plan, an ahead-of-time compile)."""
  n = jax.device_count()
  if n != args.child_devices:
    raise RuntimeError(f"expected {args.child_devices} devices, got {n}")
  batch = args.per_device * n
  if not args.plan:
    row = benchmark.bench_system("fashionclip", "smoke", tuple(args.set), batch, args.warmup,
                                 args.repeats, 0.0, strategy=args.strategy)
    return {k: row[k] for k in ("devices", "batch_size", "step_s", "step_s_all",
                                "samples_per_s", "compile_s", "collectives", "strategy")}
  config = configs.get(f"{benchmark.SYSTEMS['fashionclip']}:smoke", list(args.set))
  config.batch_size = batch
  config.mesh = plan.strategy_mesh(args.strategy, n, 1)
  mesh = mesh_lib.create_mesh(config.mesh)
  compiled, _, _, system = plan.compile_step(config, mesh)
  peak_tflops = plan.CHIPS[args.chip][0]
  flops = plan.analytic_flops(system, batch)
  step_s = flops / (n * peak_tflops * 1e12 * args.mfu)
  return dict(devices=n, batch_size=batch, strategy=args.strategy, predicted_step_s=step_s,
              predicted_samples_per_s=batch / step_s, chip=args.chip, mfu=args.mfu,
              peak_gib=plan.memory_row(compiled)["peak_bytes"] / GiB,
              collectives=benchmark.collective_bytes(compiled.as_text()))


def run_child(devices: int, args, plan_row: bool) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "benchmarks.benchmark_scaling", f"--child_devices={devices}",
         f"--per_device={args.per_device}", f"--strategy={args.strategy}",
         f"--warmup={args.warmup}", f"--repeats={args.repeats}", f"--chip={args.chip}",
         f"--mfu={args.mfu}"] + [f"--set={s}" for s in args.set] + (["--plan"] if plan_row
                                                                      else [])
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _coll(row: dict) -> str:
  c = row["collectives"]
  parts = [f"{k} {v['count']} / {v['operand_bytes'] / 2**20:.2f}" for k, v in c.items()
           if v["count"]]
  return "; ".join(parts) or "none"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8", help="measured device counts")
  p.add_argument("--plan_devices", default="64,256", help="planned device counts ('' = none)")
  p.add_argument("--per_device", type=int, default=32, help="rows per device (weak scaling)")
  p.add_argument("--strategy", default="fsdp", choices=("dp", "fsdp"),
                 help="mesh: dp = data=N, fsdp = fsdp=N (the pod recipe's)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--chip", default="TPU v4", help="the plan's chip (plan.CHIPS)")
  p.add_argument("--mfu", type=float, default=0.4, help="the plan's assumed MFU")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--child_devices", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child_devices:
    print(json.dumps(child(args)))
    return

  load_before = os.getloadavg()
  measured = [run_child(int(n), args, False) for n in args.devices.split(",") if n]
  planned = [run_child(int(n), args, True) for n in args.plan_devices.split(",") if n]
  load_after = os.getloadavg()
  print(f"Weak scaling of the FashionCLIP smoke train step, {args.per_device} rows per device, "
        f"strategy {args.strategy}")
  print(f"Machine: {benchmark_retrieval.machine()} (fake devices share these cores: samples/s "
        "is flat at best)")
  print("Load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}"
        .format(*load_before, *load_after))
  print("Collectives: kind count / operand MiB per device per step (compiled HLO, static)")
  print()
  print("| devices | global batch | step ms | samples/s | vs 1 device | collective MiB/step "
        "| collectives |")
  print("|---|---|---|---|---|---|---|")
  base = measured[0]["samples_per_s"] / measured[0]["devices"] if measured else None
  for r in measured:
    total = sum(v["operand_bytes"] for v in r["collectives"].values()) / 2**20
    print(f"| {r['devices']} | {r['batch_size']} | {r['step_s'] * 1e3:.1f} | "
          f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / (base * r['devices']):.2f} | "
          f"{total:.2f} | {_coll(r)} |")
  for r in planned:
    total = sum(v["operand_bytes"] for v in r["collectives"].values()) / 2**20
    print(f"| {r['devices']} (plan, {r['chip']} at {r['mfu']:.0%} MFU) | {r['batch_size']} | "
          f"{r['predicted_step_s'] * 1e3:.3g} | {r['predicted_samples_per_s']:,.0f} | - | "
          f"{total:.2f} | {_coll(r)}; peak {r['peak_gib']:.3f} GiB/chip |")
  print()
  print("'vs 1 device' = samples/s / (N x one device's samples/s): 1.00 is perfect weak scaling.")


if __name__ == "__main__":
  main()
