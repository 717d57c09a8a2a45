"""benchmarks.benchmark.collective_bytes: operand bytes of the collectives of a compiled program."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from benchmarks import benchmark


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
