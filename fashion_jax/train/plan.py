r"""Ahead-of-time memory and speed plan of a config's train step on N devices, on a CPU.

The train step the trainer would run (same system, optimizer, mesh, logical sharding rules,
donation, grad accumulation: train/state.py + train/step.py) is lowered with abstract shapes
(`jax.ShapeDtypeStruct`s carrying their shardings; nothing is allocated) for N fake CPU devices
and compiled by XLA's SPMD partitioner. Per strategy it reports:

  * per-device memory from `compiled.memory_analysis()`: arguments (params + optimizer state +
    the batch shard), output, temporaries, and peak = arguments + output - aliased + temporaries
    (donated state buffers are aliased by the output, so they count once);
  * FLOPs per step: analytic model FLOPs for CLIP and SigLIP systems (models/flops.py's
    matmul count, forward x 3, rematerialisation excluded), because XLA's cost_analysis counts
    a scanned layer body once; for other systems XLA's count of the compiled program (exact
    only when nothing is scanned; it also counts recomputation and elementwise work);
  * predicted step time = FLOPs / (N x chip peak x MFU) and samples/s at an assumed MFU.

Strategies: dp (mesh data=N: params replicated), fsdp (fsdp=N: params, gradients and Adam
state sharded over every device), fsdp_tensor (fsdp=N/T, tensor=T: wide dims of the MLP and
attention heads additionally split T ways; the batch is split N/T ways).

The CPU compiler is not the TPU/GPU compiler: its fusion and scheduling differ, so the
temporaries are an estimate of the accelerator's, not its measurement (argument and output
sizes are exact: they are the shapes and shardings).

COMMANDS (docs/pod.md table; the CLI is launch/plan.py):
  python -m launch.plan --config=configs/fashionclip.py:pod --devices=64 \
      --set model.variant='"L/14"' --set model.encode_chunks=4 --set model.loss_blocks=8 \
      --chip="TPU v4" --hbm_gib=16 --mfu=0.4 --jsonl=/tmp/plan.jsonl
  python -m launch.plan --render=/tmp/plan.jsonl          # markdown table of every row

The process re-executes itself with XLA_FLAGS=--xla_force_host_platform_device_count=N (JAX
reads it once, at backend start), so call it from a fresh shell, not from a running JAX program.
"""

import math
import time
from typing import Any

import jax

from fashion_jax import systems
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import flops as flops_lib
from fashion_jax.models import siglip as siglip_lib
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib

STRATEGIES = ("dp", "fsdp", "fsdp_tensor")
# Dense bf16 peak TFLOP/s and HBM GiB per chip. The 16 GiB budget of the README's target is
# passed with --hbm_gib (a TPU v4 chip has 32 GiB, a v5e 16 GiB).
CHIPS = {"TPU v4": (275.0, 32), "TPU v5e": (197.0, 16), "TPU v5p": (459.0, 95),
         "H100": (989.0, 80), "A100": (312.0, 40)}


def strategy_mesh(strategy: str, devices: int, tensor: int) -> dict[str, int]:
  """Mesh sizes {data, fsdp, tensor} of a named strategy."""
  if strategy == "dp":
    return dict(data=devices, fsdp=1, tensor=1)
  if strategy == "fsdp":
    return dict(data=1, fsdp=devices, tensor=1)
  if strategy == "fsdp_tensor":
    if tensor < 2 or devices % tensor:
      raise ValueError(f"--tensor={tensor} must be >= 2 and divide --devices={devices}.")
    return dict(data=1, fsdp=devices // tensor, tensor=tensor)
  raise ValueError(f"Unknown strategy {strategy!r}; expected one of {STRATEGIES}.")


def analytic_flops(system, batch_size: int) -> float | None:
  """Model FLOPs of one train step, or None when the system has no analytic count.

  FashionCLIP-family systems (`model_config` a CLIPConfig or a SiglipConfig): models/flops.py's
  matmul count of that family, forward x 3, with the objective's text rows (the text plus any
  field texts; with model.field_dedup U, the U rows the tower encodes) and Matryoshka logit
  widths. Others (E2's config wraps the CLIP one with
  selection tokens and fusion blocks; FashionViL, FashionBERT) get None: the caller falls back
  to XLA's count.
  """
  cfg = getattr(system, "model_config", None)
  if not isinstance(cfg, (clip_lib.CLIPConfig, siglip_lib.SiglipConfig)):
    return None
  obj = getattr(system, "objective", None)
  text_rows, dims, encoded = 1, (0,), None
  if obj is not None:
    text_rows = int(obj.text_weight > 0) + len(obj.fields)
    dims = tuple(obj.matryoshka_dims) or (0,)
    accum = int(system.config.get("grad_accum_steps", 1) or 1)
    if 0 < obj.field_dedup < batch_size // accum * len(obj.fields):
      # The distinct field texts, encoded once each, U rows per micro-batch.
      encoded = int(obj.text_weight > 0) + obj.field_dedup * accum / batch_size
  count = (flops_lib.clip_train_flops_per_step if isinstance(cfg, clip_lib.CLIPConfig)
           else flops_lib.siglip_train_flops_per_step)
  return count(cfg, batch_size, system.config.data.max_len, text_rows=text_rows,
               logit_dims=dims, encoded_text_rows=encoded)


def abstract_batch(system, batch_size: int, mesh) -> dict[str, Any]:
  """ShapeDtypeStructs of a global batch of `batch_size` rows, sharded like the trainer's."""
  small = system.dummy_batch(mesh_lib.batch_axes_size(mesh))  # Tiny: shapes only.
  sh = sharding_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sh)
          for k, v in small.items()}


def compile_step(config, mesh, batch_size: int | None = None):
  """(compiled train step, abstract state, abstract batch, system) of `config` on `mesh`."""
  config = config_check.with_defaults(config)
  batch_size = batch_size or config.batch_size
  rules = sharding_lib.logical_rules(config.sharding_rules)
  system = systems.get_system(config)
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params,
                                              config.total_steps or 1000)
  abstract, state_sh = state_lib.abstract_state(system, tx, mesh, rules, config.seed, shapes)
  step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh,
                                  config.grad_accum_steps)
  batch = abstract_batch(system, batch_size, mesh)
  return step.lower(abstract, batch).compile(), abstract, batch, system


def memory_row(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (see the module docstring for `peak`)."""
  m = compiled.memory_analysis()
  args, out = m.argument_size_in_bytes, m.output_size_in_bytes
  alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
  return dict(argument_bytes=int(args), output_bytes=int(out), alias_bytes=int(alias),
              temp_bytes=int(temp), peak_bytes=int(args + out - alias + temp))


def xla_flops(compiled) -> float:
  """XLA's flop count of a compiled program (one device's program under SPMD)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def levers(config) -> str:
  """The memory/speed switches of a config, as one short string for the table."""
  m = config.model
  parts = [f"{m.get('dtype', 'float32')}"]
  if m.get("scan"):
    parts.append("scan")
  if m.get("remat_policy", "none") != "none":
    parts.append(f"remat={m.remat_policy}")
  if m.get("attention_impl", "einsum") != "einsum":
    parts.append(f"attention={m.attention_impl}")
  if m.get("seq_pad_multiple", 0) > 1:
    parts.append(f"seq_pad_multiple={m.seq_pad_multiple}")
  if m.get("pooled_last_layer"):
    parts.append("pooled_last_layer")
  if m.get("encode_chunks", 1) > 1:
    parts.append(f"encode_chunks={m.encode_chunks}")
  if m.get("loss_blocks", 1) > 1:
    parts.append(f"loss_blocks={m.loss_blocks}")
  if config.get("grad_accum_steps", 1) > 1:
    parts.append(f"grad_accum={config.grad_accum_steps}")
  return " ".join(parts)


def plan(config, strategy: str, devices: int, tensor: int, peak_tflops: float, mfu: float,
         name: str) -> dict[str, Any]:
  """One table row: compile `config` under `strategy` on the first `devices` devices."""
  if len(jax.devices()) < devices:
    raise ValueError(f"{len(jax.devices())} devices present, the plan needs {devices}: run "
                     "launch.plan as a program (it sets the fake device count itself).")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mesh = strategy_mesh(strategy, devices, tensor)
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:devices])
  t0 = time.perf_counter()
  compiled, abstract, _, system = compile_step(config, mesh)
  compile_s = time.perf_counter() - t0
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  flops = analytic_flops(system, config.batch_size)
  source = "analytic"
  if flops is None:
    flops, source = xla_flops(compiled) * devices, "xla"
  step_s = flops / (devices * peak_tflops * 1e12 * mfu)
  row = dict(name=name, system=config.system, strategy=strategy, mesh=dict(mesh.shape),
             devices=devices, batch_size=int(config.batch_size),
             per_device_batch=config.batch_size / devices, params=int(n_params),
             levers=levers(config), flops_per_step=flops, flops_source=source,
             xla_flops_per_device=xla_flops(compiled), peak_tflops=peak_tflops, mfu=mfu,
             step_s=step_s, samples_per_s=config.batch_size / step_s,
             compile_s=round(compile_s, 1))
  row.update(memory_row(compiled))
  return row


GiB = 1024 ** 3


def _tflop(flops: float) -> str:
  t = flops / 1e12
  return f"{t:,.0f}" if t >= 100 else f"{t:.3g}"


def render(rows: list[dict[str, Any]], hbm_gib: float | None = None) -> str:
  """Markdown table of plan rows."""
  head = ["model", "global batch", "chips", "strategy (mesh)", "levers", "args GiB",
          "temp GiB", "peak GiB/chip", "fits", "TFLOP/step", "step s", "samples/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    budget = r.get("hbm_gib", hbm_gib)
    fits = "" if not budget else ("yes" if r["peak_bytes"] <= budget * GiB else "no")
    lines.append("| " + " | ".join([
        r["name"], f"{r['batch_size']:,}", str(r["devices"]), f"{r['strategy']} ({mesh})",
        r["levers"], f"{r['argument_bytes'] / GiB:.2f}", f"{r['temp_bytes'] / GiB:.2f}",
        f"{r['peak_bytes'] / GiB:.2f}", fits,
        _tflop(r["flops_per_step"]) + ("" if r["flops_source"] == "analytic" else "*"),
        f"{r['step_s']:.3g}", f"{r['samples_per_s']:,.0f}"]) + " |")
  return "\n".join(lines)
