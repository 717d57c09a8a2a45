"""The train state, created directly sharded over the mesh.

    TrainState(step: int32 [], params: pytree, opt_state: optax state, rng: uint32 key data)

`rng` is the raw key data of the training key (e.g. uint32 [2] for threefry), so checkpoints
hold plain arrays; the step uses `fold_in(wrap_key_data(rng), step)`, which makes the per-step
randomness a function of (seed, step) alone and therefore identical after a resume.

Creation never materialises the model on one device: the system's init is traced with
`jax.eval_shape` to get shapes and logical axis names, shardings are derived
(`parallel.sharding`), and `jax.jit(init, out_shardings=...)` builds each shard where it lives.
With `jax_threefry_partitionable` (JAX's default) the random values do not depend on the mesh,
so every mesh starts from the same parameters for the same seed.
"""

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import optax

from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


class Shapes(NamedTuple):
  """What `abstract_params` returns: everything known before any array exists."""
  boxed: Any        # eval_shape(init) with LogicallyPartitioned boxes.
  params: Any       # The same, unboxed: ShapeDtypeStructs.
  shardings: Any    # NamedShardings with the structure of `params`.


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  params_key, train_key = jax.random.split(jax.random.key(seed))
  return params_key, train_key


def _init_params(system, mesh, rules, key):
  batch = system.dummy_batch(mesh_lib.batch_axes_size(mesh))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    return system.init(key, batch)


def abstract_params(system, mesh: jax.sharding.Mesh, rules, seed: int) -> Shapes:
  """Shapes, logical names and shardings of the system's params (no computation)."""
  boxed = jax.eval_shape(lambda k: _init_params(system, mesh, rules, k), _keys(seed)[0])
  return Shapes(boxed, nn.unbox(boxed), sharding_lib.param_shardings(boxed, mesh, rules))


def _init_state(system, tx, mesh, rules, seed):
  params_key, train_key = _keys(seed)
  params = nn.unbox(_init_params(system, mesh, rules, params_key))
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(train_key))


def abstract_state(system, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules,
                   seed: int, shapes: Shapes) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs carrying shardings, TrainState of shardings)."""
  abstract = jax.eval_shape(lambda: _init_state(system, tx, mesh, rules, seed))
  shardings = sharding_lib.state_shardings(abstract, shapes.params, shapes.shardings, mesh)
  with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
  return with_sh, shardings


def create_train_state(system, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       rules, seed: int, shardings: TrainState) -> TrainState:
  """The initial state, each array created on its own shards by one jitted init."""
  return jax.jit(lambda: _init_state(system, tx, mesh, rules, seed), out_shardings=shardings)()
