r"""Where a train step's device time goes, from a JAX profiler trace (an .xplane.pb file).

`benchmarks/benchmark.py --profile_dir=DIR` traces a few timed steps and calls `account` on the
trace; this module also re-reads a saved trace:

  python -m benchmarks.profile_account DIR_OR_XPLANE_PB --steps=3 [--step_ms=...] [--json=out.json]

The account reads the device planes (`/device:GPU:*`, `/device:TPU:*`) of the trace and, on each,
the kernels of every stream line. Per step it reports:
  - busy: the union of all kernel intervals (the time the device ran anything), and idle = the
    measured step time minus busy (launch gaps, host work, synchronisation);
  - each kernel category's summed time and share of the step (`categorize`): matrix products
    (cuBLAS/cuBLASLt/XLA-Triton GEMMs), fused attention (cuDNN), convolutions, reductions,
    elementwise fusions, copies/transposes, memcpy/memset, other;
  - the top kernels by time, with their HLO op when the trace records it.
With `matmul_flops` (the model's analytic matmul FLOPs per step), the GEMM kernels' achieved
TFLOP/s: MFU = (share of the step in GEMMs) x (GEMM rate / peak) + the rest's useful FLOPs,
which is the profile-based account README's "Accelerator efficiency" section gives.

Kernel names are the vendors' (e.g. cuBLAS `sm90_xmma_gemm_*` / `nvjet_*`, cuDNN
`cudnn_generated_*sdpa*`, XLA's `loop_*_fusion` / `input_*_fusion`); `categorize` matches them
with the patterns in CATEGORIES, first match wins. Sums over streams can exceed busy time when
streams overlap; the shares are of the measured step time.
"""

import argparse
import collections
import glob
import json
import os
import re
from typing import Iterable, Optional

# (category, pattern) in match order: attention and convolutions before GEMMs, because cuDNN's
# fused-attention and implicit-GEMM convolution kernels also contain 'gemm' / 'wgmma'.
CATEGORIES = (
    ("attention", r"sdpa|flash|fmha|fused_attention|_attention|cudnn::fusion"),
    ("convolution", r"convolution|fprop|dgrad|wgrad|implicit_gemm|conv2d|_conv_"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|hgmma|wgmma|\bdot|_dot|triton_.*dot|matmul"),
    ("memcpy", r"memcpy|memset"),
    ("copy/transpose", r"transpose|copy|concatenate|dynamic_update_slice|slice"),
    ("reduction", r"reduce|input_|scatter|softmax|norm"),
    ("elementwise", r"loop_|fusion|convert|multiply|add|select|broadcast"),
)
_COMPILED = tuple((name, re.compile(p, re.IGNORECASE)) for name, p in CATEGORIES)
_NOT_KERNEL_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "TensorFlow Ops",
                     "XLA TraceMe", "Launch Stats")


def categorize(kernel_name: str) -> str:
  for name, pattern in _COMPILED:
    if pattern.search(kernel_name):
      return name
  return "other"


def union_length(intervals: Iterable[tuple[int, int]]) -> int:
  """Total length covered by [start, end) intervals (overlaps counted once)."""
  total, cur_start, cur_end = 0, None, None
  for s, e in sorted(intervals):
    if cur_end is None or s > cur_end:
      if cur_end is not None:
        total += cur_end - cur_start
      cur_start, cur_end = s, e
    else:
      cur_end = max(cur_end, e)
  if cur_end is not None:
    total += cur_end - cur_start
  return total


def account_events(events: list[tuple[str, int, int, Optional[str]]], steps: int,
                   step_s: Optional[float] = None, matmul_flops: Optional[float] = None,
                   top: int = 25) -> dict:
  """The account of kernels (name, start_ns, duration_ns, hlo_op or None) over `steps` steps.

  step_s: the measured median step time (s); without it the traced window / steps is used.
  """
  if not events:
    raise ValueError("No device kernels in the trace: was it taken on a GPU/TPU, around steps?")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  window_ns = max(s + d for _, s, d, _ in events) - min(s for _, s, _, _ in events)
  step_ns = step_s * 1e9 if step_s else window_ns / steps
  busy_ns = union_length((s, s + d) for _, s, d, _ in events) / steps
  by_cat = collections.defaultdict(float)
  by_kernel = collections.defaultdict(lambda: [0.0, 0, None, None])
  for name, _, d, hlo in events:
    cat = categorize(name)
    by_cat[cat] += d / steps
    k = by_kernel[name]
    k[0] += d / steps
    k[1] += 1
    k[2], k[3] = cat, k[3] or hlo
  out = dict(
      steps=steps, step_ms=step_ns / 1e6, traced_window_ms_per_step=window_ns / steps / 1e6,
      busy_ms=busy_ns / 1e6, busy_share=busy_ns / step_ns,
      idle_ms=max(step_ns - busy_ns, 0.0) / 1e6, idle_share=max(step_ns - busy_ns, 0.0) / step_ns,
      kernels_per_step=len(events) / steps,
      categories={c: dict(ms=t / 1e6, share=t / step_ns)
                  for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      top_kernels=[dict(name=n[:160], category=v[2], ms=v[0] / 1e6, share=v[0] / step_ns,
                        calls_per_step=v[1] / steps, hlo_op=v[3])
                   for n, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]])
  if matmul_flops:
    gemm_ns = by_cat.get("matmul", 0.0) + by_cat.get("attention", 0.0) + by_cat.get(
        "convolution", 0.0)
    if gemm_ns:
      out["matmul_tflops_in_matmul_kernels"] = matmul_flops / (gemm_ns * 1e-9) / 1e12
  return out


def find_xplane(path: str) -> str:
  """`path` itself if it is a file, else the newest *.xplane.pb under it."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f"No *.xplane.pb under {path!r}.")
  return found[-1]


def device_events(xplane_path: str) -> list[tuple[str, int, int, Optional[str]]]:
  """(kernel name, start ns, duration ns, hlo_op) of every kernel on the device planes."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  data = ProfileData.from_file(xplane_path)
  events = []
  for plane in data.planes:
    if not re.match(r"/device:(GPU|TPU)", plane.name):
      continue
    for line in plane.lines:
      if any(line.name.startswith(p) for p in _NOT_KERNEL_LINES):
        continue
      for ev in line.events:
        hlo = None
        for key, value in ev.stats:
          if key == "hlo_op":
            hlo = str(value)
            break
        events.append((ev.name, int(ev.start_ns), int(ev.duration_ns), hlo))
  return events


def account(path: str, steps: int, step_s: Optional[float] = None,
            matmul_flops: Optional[float] = None) -> dict:
  xplane = find_xplane(path)
  out = account_events(device_events(xplane), steps, step_s, matmul_flops)
  out["trace"] = xplane
  return out


def markdown(acc: dict) -> str:
  lines = [f"step {acc['step_ms']:.2f} ms: device busy {acc['busy_ms']:.2f} ms "
           f"({acc['busy_share']:.1%}), idle {acc['idle_ms']:.2f} ms, "
           f"{acc['kernels_per_step']:.0f} kernels/step",
           "", "| kernels | ms/step | share of step |", "|---|---|---|"]
  for cat, v in acc["categories"].items():
    lines.append(f"| {cat} | {v['ms']:.2f} | {v['share']:.1%} |")
  if "matmul_tflops_in_matmul_kernels" in acc:
    lines.append(f"\nmodel matmul FLOPs / time in matmul+attention+conv kernels: "
                 f"{acc['matmul_tflops_in_matmul_kernels']:.0f} TFLOP/s")
  lines += ["", "| top kernel | category | ms/step | share | calls/step |", "|---|---|---|---|---|"]
  for k in acc["top_kernels"][:15]:
    lines.append(f"| `{k['name'][:90]}` | {k['category']} | {k['ms']:.3f} | {k['share']:.1%} | "
                 f"{k['calls_per_step']:.0f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("path", help="an .xplane.pb file or a folder holding one")
  parser.add_argument("--steps", type=int, required=True, help="steps in the trace")
  parser.add_argument("--step_ms", type=float, default=0.0, help="measured step time")
  parser.add_argument("--matmul_tflop", type=float, default=0.0,
                      help="model matmul TFLOP per step (for the GEMM rate)")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  acc = account(args.path, args.steps, args.step_ms / 1e3 or None, args.matmul_tflop * 1e12 or None)
  print(markdown(acc))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(acc, f, indent=1)


if __name__ == "__main__":
  main()
