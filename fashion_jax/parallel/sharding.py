"""Logical -> mesh axis rules, parameter/state shardings, and host batches -> global arrays.

Parameters carry logical axis names (`embed`, `mlp`, ... of `axes.py`) through
`nn.with_logical_partitioning`; `config.sharding_rules` (None = `axes.DEFAULT_RULES`) maps each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). The one place where
logical names become mesh axes is `param_shardings`.

Uneven dimensions (decided here): a parameter dimension whose size is not divisible by the
product of its mesh axes is NOT an error. We drop mesh axes from the end of that dimension's
assignment until it divides (ultimately replicating the dimension) and log one line per such
parameter. Rationale: small parameters (a 3-wide bias, a scalar logit scale, a 77-token position
table on an 8-way fsdp axis) are common and cheap to replicate, while a hard error would make
every mesh change a model change. The log line names the parameter so a big replicated weight
is noticed.

Batches: each host feeds its `batch_size // process_count` rows; `global_batch` assembles the
global `jax.Array` whose leading axis is split over `axes.BATCH_AXES` = (data, fsdp).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from fashion_jax.parallel import axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def path_str(path) -> str:
  """A jax key path as the '/'-joined string regexes match, e.g. 'params/img/Dense_0/kernel'."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flat_by_path(tree: Any) -> dict[str, Any]:
  """{path_str(path): leaf} of every leaf of `tree`."""
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def fill_from_host(boxed: Any, src: Mapping[str, np.ndarray]) -> Any:
  """Replaces every leaf of `boxed` whose path_str is in `src` by that host array, cast to the
  leaf's dtype; other leaves are kept. Used inside a system's traced init (pretrained weights):
  each array enters through `jax.pure_callback`, so `jit(init, out_shardings=...)` builds every
  shard where it lives and nothing is materialised on one device. LogicallyPartitioned boxes
  keep their axis names.
  """

  def load(path, leaf):
    name = path_str(path)
    if name not in src:
      return leaf
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    arr = np.asarray(src[name], value.dtype)
    new = jax.pure_callback(lambda: arr, jax.ShapeDtypeStruct(arr.shape, arr.dtype))
    return leaf.replace_boxed(new) if isinstance(leaf, nn.Partitioned) else new

  return jax.tree_util.tree_map_with_path(
      load, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_rules(rules: Sequence[Sequence[Any]] | None) -> Rules:
  """Validates `config.sharding_rules` and returns it as a tuple of (logical, mesh axes) pairs.

  Args:
    rules: None (use axes.DEFAULT_RULES) or a sequence of pairs (logical name, mesh axis |
      tuple of mesh axes | None).

  Raises:
    ValueError naming the bad entry: not a pair, or a mesh axis outside axes.MESH_AXES.
  """
  if rules is None:
    return tuple(axes.DEFAULT_RULES)
  out = []
  for entry in rules:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"config.sharding_rules entry {entry!r} is not a (logical_name, "
                       f"mesh_axes) pair.")
    name, target = entry
    if isinstance(target, (list, tuple)):
      target = tuple(target)
      bad = [t for t in target if t not in axes.MESH_AXES]
    else:
      bad = [] if target is None or target in axes.MESH_AXES else [target]
    if bad:
      raise ValueError(f"config.sharding_rules maps {name!r} to unknown mesh axis {bad[0]!r}; "
                       f"the mesh axes are {axes.MESH_AXES}.")
    out.append((name, target))
  return tuple(out)


def _fit_spec(shape: tuple[int, ...], spec: P, mesh: jax.sharding.Mesh, name: str) -> P:
  """Drops mesh axes from dimensions they do not divide (see the module docstring)."""
  fitted = []
  for dim, (size, assignment) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    mesh_axes = () if assignment is None else (
        (assignment,) if isinstance(assignment, str) else tuple(assignment))
    kept = list(mesh_axes)
    while kept and size % math.prod(mesh.shape[a] for a in kept):
      kept.pop()
    if len(kept) < len(mesh_axes):
      logging.info("Sharding: %s dim %d (size %d) is not divisible by mesh axes %s; sharding it "
                   "over %s instead.", name, dim, size, mesh_axes, tuple(kept) or "nothing")
    fitted.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def param_shardings(abstract_params: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for the (unboxed) params, from the logical names of the boxed abstract params.

  Args:
    abstract_params: `jax.eval_shape(system.init, ...)`: ShapeDtypeStructs, some wrapped in
      flax `LogicallyPartitioned` boxes. Unboxed leaves are replicated.
    mesh: the mesh.
    rules: logical -> mesh rules (`logical_rules`).

  Returns:
    A pytree with the structure of `nn.unbox(abstract_params)` holding NamedShardings.

  Raises:
    ValueError naming the parameter and the logical axis when a name has no rule (a typo would
    otherwise silently replicate a large weight).
  """
  known = {name for name, _ in rules}
  logical_specs = nn.get_partition_spec(abstract_params)
  unboxed = nn.unbox(abstract_params)

  def one(path, leaf, logical_spec):
    name = path_str(path)
    for logical in tuple(logical_spec):
      if logical is not None and logical not in known:
        raise ValueError(f"Parameter {name} uses logical axis {logical!r}, which no rule in "
                         f"config.sharding_rules maps (known: {sorted(known)}).")
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules)
    return NamedSharding(mesh, _fit_spec(leaf.shape, mesh_spec, mesh, name))

  return jax.tree_util.tree_map_with_path(
      one, unboxed, logical_specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(abstract_state: Any, abstract_params: Any, param_sh: Any,
                    mesh: jax.sharding.Mesh) -> Any:
  """Shardings for a train-state pytree whose subtrees repeat the parameter tree.

  The params and the optimizer states (Adam's mu and nu, possibly inside
  `optax.multi_transform` / `masked` wrappers) hold copies of (parts of) the parameter tree at
  some prefix path. A state leaf whose key path ENDS with a parameter's key path and has that
  parameter's shape gets the parameter's sharding; every other leaf (step counters, rng keys,
  scalars) is replicated.

  Args:
    abstract_state: pytree of ShapeDtypeStructs.
    abstract_params: the unboxed abstract params.
    param_sh: their shardings (`param_shardings`).
    mesh: the mesh.
  """
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                              jax.tree_util.tree_leaves(param_sh)):
    by_path[tuple(path)] = (tuple(leaf.shape), sh)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      match = by_path.get(path[start:])
      if match is not None and match[0] == tuple(leaf.shape):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, other axes replicated."""
  return NamedSharding(mesh, P(axes.BATCH_AXES))


def global_batch(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch [B / process_count, ...] -> global jax.Arrays [B, ...].

  Each process passes its own rows; row order in the global array is process 0's rows, then
  process 1's, ... (`jax.make_array_from_process_local_data`). No host-to-host transfer happens.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f"Batch field {key!r} is a scalar; every field needs a leading batch axis.")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
