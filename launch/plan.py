r"""Command line of the ahead-of-time memory and speed planner (fashion_jax/train/plan.py).

COMMANDS (docs/pod.md table):
  python -m launch.plan --config=configs/fashionclip.py:pod --devices=64 \
      --set model.variant='"L/14"' --set model.encode_chunks=4 --set model.loss_blocks=8 \
      --chip="TPU v4" --hbm_gib=16 --mfu=0.4 --jsonl=/tmp/plan.jsonl
  python -m launch.plan --render=/tmp/plan.jsonl          # markdown table of every row

The process re-executes itself with XLA_FLAGS=--xla_force_host_platform_device_count=N (JAX
reads it once, at backend start, which the imports below do not trigger), so call it from a fresh
shell, not from a running JAX program.
"""

import argparse
import json
import os
import sys

from fashion_jax import configs
from fashion_jax.train import plan as plan_lib

def _ensure_devices(n: int) -> None:
  """Re-executes this program with N fake CPU devices unless it already has them."""
  flag = f"--xla_force_host_platform_device_count={n}"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag in flags.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([f for f in flags.split()
                                 if not f.startswith("--xla_force_host_platform_device_count")]
                                + [flag]))
  os.execve(sys.executable, [sys.executable, "-m", "launch.plan"] + sys.argv[1:], env)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", help="path.py:variant")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, VALUE a python literal (repeatable)")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: config's)")
  parser.add_argument("--strategies", default=",".join(plan_lib.STRATEGIES))
  parser.add_argument("--tensor", type=int, default=4, help="tensor axis of fsdp_tensor")
  parser.add_argument("--chip", default="TPU v4", choices=sorted(plan_lib.CHIPS))
  parser.add_argument("--peak_tflops", type=float, default=0.0, help="overrides --chip's peak")
  parser.add_argument("--hbm_gib", type=float, default=0.0, help="budget (default: --chip's)")
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--name", default="", help="model column (default: system + variant)")
  parser.add_argument("--jsonl", default="", help="append one JSON row per strategy")
  parser.add_argument("--render", default="", help="print the markdown table of a JSONL file")
  args = parser.parse_args(argv)

  if args.render:
    with open(args.render) as f:
      print(plan_lib.render([json.loads(line) for line in f if line.strip()]))
    return
  if not args.config:
    parser.error("--config is required (or --render).")
  _ensure_devices(args.devices)
  config = configs.get(args.config, args.set)
  if args.batch:
    config.batch_size = args.batch
  peak, hbm = plan_lib.CHIPS[args.chip]
  peak = args.peak_tflops or peak
  hbm = args.hbm_gib or hbm
  name = args.name or f"{config.system} {config.model.get('variant', '')}".strip()
  rows = []
  for strategy in args.strategies.split(","):
    try:
      row = plan_lib.plan(config, strategy, args.devices, args.tensor, peak, args.mfu, name)
    except Exception as e:  # pylint: disable=broad-except
      # An OOM-free CPU compile rarely fails; report the failure as a row instead of dying.
      print(f"{strategy}: compile failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
      continue
    row.update(chip=args.chip, hbm_gib=hbm)
    rows.append(row)
    print(plan_lib.render([row]).splitlines()[-1], flush=True)
    if args.jsonl:
      with open(args.jsonl, "a") as f:
        f.write(json.dumps(row) + "\n")
  print(f"\n{args.chip}: {peak:.0f} TFLOP/s peak, MFU {args.mfu:.0%}, budget {hbm:g} GiB/chip; "
        f"memory = XLA CPU AOT compile for {args.devices} devices")
  print(plan_lib.render(rows))


if __name__ == "__main__":
  main()
