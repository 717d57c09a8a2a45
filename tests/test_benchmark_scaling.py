"""benchmarks.benchmark.collective_bytes: operand bytes of the collectives of a compiled program;
benchmarks.cpu_step_bound: the matmuls it times; benchmarks.profile_cpu_step's option rows."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from benchmarks import benchmark
from benchmarks import cpu_step_bound
from benchmarks import profile_cpu_step
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import flops as flops_lib


def test_collective_bytes_of_known_programs():
  """A [64, 16] float32 array sharded 8 ways: gathering it whole is one all-gather of the
  [8, 16] shard (512 bytes per device); a sum over the sharded axis plus x^T x all-reduce the
  partial [16] and [16, 16] results (64 + 1024 bytes); a float64 numpy count of the same."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])
  x = jax.device_put(jnp.ones((64, 16), jnp.float32), NamedSharding(mesh, P("d")))
  rep = NamedSharding(mesh, P())
  gather = jax.jit(lambda x: x * 2, out_shardings=rep).lower(x).compile().as_text()
  reduce = jax.jit(lambda x: (x.sum(0), x.T @ x), out_shardings=rep).lower(x).compile().as_text()
  g = benchmark.collective_bytes(gather)
  r = benchmark.collective_bytes(reduce)
  shard_bytes = np.prod((64 // 8, 16)) * np.dtype(np.float32).itemsize
  assert g["all-gather"] == {"count": 1, "operand_bytes": int(shard_bytes)}
  assert sum(v["count"] for k, v in g.items() if k != "all-gather") == 0
  assert r["all-reduce"]["operand_bytes"] == (16 + 16 * 16) * 4
  assert r["all-gather"]["count"] == 0


def test_collective_bytes_of_text_without_collectives_is_zero():
  text = jax.jit(lambda a: a + 1).lower(jnp.ones(3)).compile().as_text()
  assert all(v == {"count": 0, "operand_bytes": 0}
             for v in benchmark.collective_bytes(text).values())


def test_cpu_step_bound_times_every_matmul_of_the_model():
  """The matmul floor's list of one step's dots (x3: forward, dA, dW) holds every model FLOP
  that models/flops.py counts but the [B, B] logits, for B/32 and B/16, at two batch sizes; and
  each timed dot form returns the einsum it names (float64 numpy reference)."""
  for variant in ("B/32", "B/16"):
    config = clip_lib.clip_config(variant, dtype="float32")
    for batch in (8, 3):
      listed = sum(3 * count * 2 * g * m * k * n
                   for _, count, g, m, k, n in cpu_step_bound.step_matmuls(config, batch))
      model = flops_lib.clip_train_flops_per_step(config, batch, config.text.max_len)
      logits = 3 * batch * 2 * batch * config.projection_dim
      assert listed == model - logits, (variant, batch)
  rng = np.random.default_rng(0)
  for form, spec in cpu_step_bound.FORMS.items():
    for g in (2, 1):  # Batched (attention) and a weight's 2-D dot.
      a, b = cpu_step_bound._operands(form, g, 5, 3, 4, rng)  # pylint: disable=protected-access
      got = jnp.einsum(spec if g > 1 else spec.replace("g", ""), a, b)
      a64 = a.astype(np.float64)
      want = {"fwd": lambda: a64 @ b, "dA": lambda: a64 @ b.swapaxes(-1, -2),
              "dW": lambda: a64.swapaxes(-1, -2) @ b}[form]()
      assert got.shape == want.shape == ((g,) if g > 1 else ()) + {
          "fwd": (5, 4), "dA": (5, 3), "dW": (3, 4)}[form], (form, g)
      assert np.allclose(got, want, atol=1e-5), (form, g)


def test_profile_cpu_step_xla_option_rows(capsys):
  """--xla_option rows: the spec parses to typed compiler options; a malformed spec, a key that
  is not an XLA option and an unknown built-in row are refused by name; a tiny A/B run compiles
  the option row, checks its first step's parameters against the default row's and times it."""
  assert profile_cpu_step.parse_xla_option(
      "x:xla_cpu_enable_fast_math=false;xla_cpu_prefer_vector_width=256;"
      "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED") == ("x", {
          "xla_cpu_enable_fast_math": False, "xla_cpu_prefer_vector_width": 256,
          "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})
  with pytest.raises(ValueError, match="expected NAME:KEY=VALUE"):
    profile_cpu_step.parse_xla_option("xla_cpu_enable_fast_math=false")
  with pytest.raises(ValueError, match="'fast_math=1' is not xla_<option>=<value>"):
    profile_cpu_step.parse_xla_option("x:fast_math=1")
  with pytest.raises(ValueError, match=r"--rows \['defualt'\]"):
    profile_cpu_step.main(["--variant=tiny", "--no-torch", "--rows=defualt"])
  profile_cpu_step.main(["--variant=tiny", "--no-torch", "--rows=default", "--rounds=1",
                         "--steps=1",
                         "--xla_option=w:xla_cpu_enable_concurrency_optimized_scheduler=true"])
  out = capsys.readouterr().out
  diff = re.search(r"^w: max \|param - default's\| after one step: (\S+)$", out, re.M)
  assert diff and float(diff.group(1)) <= 1e-5, out
  assert re.search(r"^w\s+\d+", out, re.M), out


def test_profile_cpu_step_reads_every_dot_of_a_compiled_program():
  """The trace account's dot table: the FLOPs read from the compiled HLO of a matmul, its
  transposed-operand gradient and a batched einsum equal 2 x m x n x k counted by hand, found
  through the thunks that run them (plain dots or the fusions calling them); and the overlap
  measure of known intervals."""
  def f(a, b, x, y):  # Squares: the gradients need each product's forward value.
    return jnp.sum((a @ b) ** 2) + jnp.sum(jnp.einsum("gmk,gnk->gmn", x, y) ** 2)
  shapes = [(24, 40), (40, 16), (3, 10, 8), (3, 12, 8)]
  args = [jnp.ones(s, jnp.float32) for s in shapes]
  fn = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))
  lines, comps = profile_cpu_step.hlo_computations(fn.lower(*args).compile().as_text())
  entry = next(c for name, c in comps.items() if name.startswith("main"))
  found = [d for name in entry for d in profile_cpu_step.thunk_dots(name, lines, comps)]
  # Each product three times: forward, and the gradient of each operand.
  want = 3 * 2 * 24 * 16 * 40 + 3 * 2 * 3 * 10 * 12 * 8
  assert sum(fl for fl, _ in found) == want, found
  assert len(found) == 6, found
  assert all(re.match(r"\[[\d, ]+\] x \[[\d, ]+\], contracting", form) for _, form in found)
  assert profile_cpu_step.concurrency([(0, 10), (5, 20), (30, 40)]) == (30, 5)
  assert profile_cpu_step.concurrency([]) == (0, 0)
