"""The device mesh, built from the config's named axes.

`config.mesh` is a mapping over the axes of `axes.MESH_AXES` = (data, fsdp, tensor), e.g.
`{data: -1, fsdp: 2, tensor: 1}`. A size of -1 (at most one axis) takes whatever is left of the
device count. Without a -1 the product of the sizes must divide the device count; a product
smaller than the count uses the first `product` devices (single-process only, logged), which is
how tests compare a 1-device run with an 8-device run in the same process.

All mesh axes are `AxisType.Auto`: the compiler (GSPMD/Shardy) propagates shardings from the
parameter/batch shardings and the `with_logical_constraint` hints inside the models. We do not use
`Explicit` axes (jax.make_mesh's default) because explicit sharding-in-types would reject the
einsums of the models whose contracting dimension is sharded over fsdp, which Auto handles by
inserting the all-gathers FSDP needs.
"""

from collections.abc import Mapping, Sequence
import math

from absl import logging
import jax
from jax.experimental import mesh_utils
import numpy as np

from fashion_jax.parallel import axes


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves the -1 entry of `mesh_config` against `num_devices`.

  Args:
    mesh_config: axis name -> size; names must be in axes.MESH_AXES; missing axes are 1.
    num_devices: the number of devices available.

  Returns:
    {axis: size} for every axis of axes.MESH_AXES, in that order.

  Raises:
    ValueError naming the offending values: an unknown axis, a size that is neither -1 nor
    positive, more than one -1, or a product that does not divide the device count.
  """
  mesh_config = dict(mesh_config)
  unknown = sorted(set(mesh_config) - set(axes.MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axis {unknown[0]!r} in config.mesh={mesh_config}; "
                     f"the mesh axes are {axes.MESH_AXES}.")
  sizes = {a: mesh_config.get(a, 1) for a in axes.MESH_AXES}
  for a, s in sizes.items():
    if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or (s < 1 and s != -1):
      raise ValueError(f"config.mesh.{a}={s!r} must be a positive int or -1 (fill).")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh={sizes} has -1 on several axes {fill}; at most one may fill.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % fixed:
    raise ValueError(
        f"config.mesh={sizes}: the product of the fixed axes ({fixed}) does not divide the "
        f"{num_devices} devices.")
  if fill:
    sizes[fill[0]] = num_devices // fixed
  return sizes


def create_mesh(mesh_config: Mapping[str, int],
                devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A `Mesh` with axes (data, fsdp, tensor) sized by `mesh_config`, all `AxisType.Auto`.

  Args:
    mesh_config: see `mesh_shape`.
    devices: defaults to all devices of all processes (`jax.devices()`).

  Returns:
    The mesh. `mesh_utils.create_device_mesh` orders the devices so that the innermost axes
    (tensor, then fsdp) land on the fastest interconnect of the physical topology.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in axes.MESH_AXES)
  n = math.prod(shape)
  if n < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"config.mesh={sizes} covers {n} of {len(devices)} devices; with "
                       f"{jax.process_count()} processes the mesh must use every device.")
    logging.warning("config.mesh=%s uses %d of the %d devices.", sizes, n, len(devices))
    devices = devices[:n]
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):  # Unusual topologies: plain order.
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(device_array, axes.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(axes.MESH_AXES))


def batch_axes_size(mesh: jax.sharding.Mesh) -> int:
  """Number of batch shards: the product of the mesh's BATCH_AXES sizes (data * fsdp)."""
  return math.prod(mesh.shape[a] for a in axes.BATCH_AXES)
