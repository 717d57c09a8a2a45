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


def _place_pretrained(pretrained: Any, abstract_params: Any, shardings: Any) -> Any:
  """Host arrays of `pretrained` put on the shards of `shardings`, after a strict check.

  The tree must have exactly the structure and shapes the system's init would create: a
  missing, extra or differently shaped parameter is an error naming its path and both shapes.
  """
  want = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  got = {jax.tree_util.keystr(k): v for k, v in
         jax.tree_util.tree_flatten_with_path(nn.unbox(pretrained))[0]}
  problems = [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in got]
  problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in got.items() if k not in want]
  problems += [f"{k}: pretrained {tuple(got[k].shape)} != model {tuple(v.shape)}"
               for k, v in want.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
  if problems:
    raise ValueError("Pretrained params do not match the model: " + "; ".join(problems[:10]))
  return jax.tree.map(lambda x, a, sh: jax.device_put(jax.numpy.asarray(x, a.dtype), sh),
                      nn.unbox(pretrained), abstract_params, shardings)


def create_train_state(system, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       rules, seed: int, shardings: TrainState,
                       shapes: Shapes | None = None) -> TrainState:
  """The initial state, each array created on its own shards by one jitted init.

  A system whose `pretrained_params()` returns a tree (e.g. FashionCLIP from an HF CLIP
  directory) starts from those values instead of a random init; the optimizer state is then
  initialised from them, on their shards. `shapes` (from `abstract_params`) is needed then.
  """
  pretrained = getattr(system, "pretrained_params", lambda: None)()
  if pretrained is None:
    return jax.jit(lambda: _init_state(system, tx, mesh, rules, seed), out_shardings=shardings)()
  if shapes is None:
    raise ValueError("create_train_state needs `shapes` to place pretrained params.")
  params = _place_pretrained(pretrained, shapes.params, shardings.params)
  train_key = _keys(seed)[1]

  def init(p):
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                      opt_state=tx.init(p), rng=jax.random.key_data(train_key))
  return jax.jit(init, out_shardings=shardings)(params)
