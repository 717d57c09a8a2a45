"""A jitted function of (params, *arrays) applied to host arrays in fixed-size batches.

For evaluators whose model call takes several inputs (TGIR: reference image + caption; category
recognition: image + text), which common.Embedder's single-input towers do not cover. The host
arrays are the same on every process (each process reads the whole, small, evaluation split);
each batch is placed on the mesh's batch axes (`jax.make_array_from_callback`), padded to one
shape (one compilation) by repeating its last row, and the outputs are gathered back to numpy
with the padding dropped.
"""

from collections.abc import Callable
import math

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fashion_jax.parallel import axes


class BatchedApply:
  """`run(fn, params, *arrays)` -> fn's outputs (a pytree of numpy arrays) over all rows."""

  def __init__(self, mesh: Mesh | None = None, batch_size: int = 64):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    self.mesh = mesh
    self._jitted = {}
    if mesh is None:
      self.shards, self._sharding = 1, None
    else:
      batch_axes = tuple(a for a in axes.BATCH_AXES if a in mesh.axis_names)
      self.shards = math.prod(mesh.shape[a] for a in batch_axes)
      self._sharding = NamedSharding(mesh, P(batch_axes))
    self.batch_size = -(-batch_size // self.shards) * self.shards

  def _put(self, x: np.ndarray) -> jax.Array:
    if self._sharding is None:
      return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, self._sharding, lambda idx: x[idx])

  @staticmethod
  def _get(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def run(self, fn: Callable, params, *arrays: np.ndarray):
    """fn(params, *batches) over every row of `arrays` (equal leading sizes N >= 1)."""
    n = arrays[0].shape[0]
    if n == 0 or any(a.shape[0] != n for a in arrays):
      raise ValueError(f"arrays need equal, non-zero leading sizes; got "
                       f"{[a.shape[0] for a in arrays]}.")
    if fn not in self._jitted:  # Bound methods of one object compare (and hash) equal.
      self._jitted[fn] = jax.jit(fn)
    jitted = self._jitted[fn]
    bs = self.batch_size  # Always this shape: one compilation per fn.
    outs = []
    for start in range(0, n, bs):
      chunk = [a[start:start + bs] for a in arrays]
      pad = bs - chunk[0].shape[0]
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
      out = jitted(params, *[self._put(c) for c in chunk])
      outs.append(jax.tree.map(lambda y, p=pad: self._get(y)[:bs - p], out))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)
