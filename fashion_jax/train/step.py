"""The jitted train step: loss, gradients (optionally accumulated), optimizer update.

    step(state, batch) -> (state', metrics)

`batch`: a dict of global arrays [B, ...] split over the batch axes (data, fsdp). `state` is
donated. The per-step key is `fold_in(wrap_key_data(state.rng), state.step)` (then
`fold_in(., i)` for micro-batch i).

Gradient accumulation (grad_accum_steps = A > 1): micro-batch i takes rows {i, A+i, 2A+i, ...}
(a reshape and transpose: no rows move between devices); a `lax.scan` sums loss, metrics and
gradients, then divides by A. For a mean of per-example losses this is the full-batch gradient up
to rounding; for a batch-contrastive loss (InfoNCE, sigmoid) it is NOT: each micro-batch sees only
B/A - 1 negatives (the standard semantics; accumulation exists to save memory).

Metrics (float32 scalars, prefixed 'train/'): the system's, plus `loss`, `grad_norm` (global L2
norm of the raw gradients), `param_norm` (after the update) and `lr` (the base schedule, before
per-group multipliers).

Non-gradient state (BatchNorm statistics, an EMA codebook): a system may declare
`mutable_collections = ('batch_stats', ...)`; its `loss` then returns
`(loss, (metrics, new_state))`. Those collections get zero gradients and are overwritten with
`new_state` after the update (so weight decay never reaches them); with accumulation the A new
states are averaged.

Skipping non-finite steps (nan_policy='skip'): with
    ok = isfinite(loss) & isfinite(grad_norm) & isfinite(||params'||)
the step returns `where(ok, new, old)` for params and optimizer state, inside the same jitted
computation, so a NaN batch never poisons Adam's moments. The step counter still advances (the
batch was consumed). `train/skipped` is 1.0 for a skipped step; `param_norm` is that of the params
kept; the other metrics are the attempted step's, so the trainer can name the non-finite one.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from fashion_jax.parallel import axes
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train.state import TrainState


def split_micro_batches(batch: dict[str, jax.Array], accum: int, mesh: jax.sharding.Mesh
                        ) -> dict[str, jax.Array]:
  """[B, ...] -> [A, B/A, ...], micro-batch i = rows i, A+i, ...; axis 1 over the batch axes."""

  def one(x):
    micro = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, axes.BATCH_AXES)))

  return jax.tree.map(one, batch)


def make_train_step(system, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, rules, state_shardings: TrainState,
                    grad_accum_steps: int = 1, skip_non_finite: bool = False,
                    batch_transform: Callable[[dict], dict] | None = None
                    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """The jitted step (see the module docstring).

  batch_transform: applied to the batch inside the jitted step, before anything reads it (the
  input's device-side stage, e.g. data/device_crop.py's resize of shipped crops); None = none.
  """

  mutable = tuple(getattr(system, "mutable_collections", ()) or ())

  def zero_mutable(tree):
    if not mutable:
      return tree
    return {**tree, **{c: jax.tree.map(jnp.zeros_like, tree[c]) for c in mutable}}

  def loss_and_grads(params, batch, rng):
    def loss_fn(p):
      return system.loss(p, batch, rng, train=True)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics, new_state = aux if mutable else (aux, {})
    if set(new_state) != set(mutable):
      raise ValueError(f"{type(system).__name__}.loss returned state for {sorted(new_state)} but "
                       f"mutable_collections is {list(mutable)}")
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return jnp.asarray(loss, jnp.float32), metrics, zero_mutable(grads), new_state

  def step(state: TrainState, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      if batch_transform is not None:
        batch = batch_transform(batch)
      if grad_accum_steps == 1:
        loss, metrics, grads, new_state = loss_and_grads(state.params, batch, rng)
      else:
        micro = split_micro_batches(batch, grad_accum_steps, mesh)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(loss_and_grads, state.params, first, rng))
        zeros = (zeros[0], zeros[1],
                 jax.lax.with_sharding_constraint(zeros[2], state_shardings.params), zeros[3])

        def body(carry, xs):
          mb, i = xs
          out = loss_and_grads(state.params, mb, jax.random.fold_in(rng, i))
          return jax.tree.map(jnp.add, carry, out), None

        total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
        loss, metrics, grads, new_state = jax.tree.map(lambda x: x / grad_accum_steps, total)

      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      if mutable:
        params = {**params, **{c: jax.tree.map(lambda n, o: n.astype(o.dtype), new_state[c],
                                               params[c]) for c in mutable}}
      metrics = {f"train/{k}": v for k, v in metrics.items()}
      grad_norm = optax.global_norm(grads).astype(jnp.float32)
      param_norm = optax.global_norm(params).astype(jnp.float32)
      if skip_non_finite:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        keep = lambda new, old: jnp.where(ok, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        param_norm = optax.global_norm(params).astype(jnp.float32)
        metrics["train/skipped"] = 1.0 - ok.astype(jnp.float32)
      metrics.update({
          "train/loss": loss,
          "train/grad_norm": grad_norm,
          "train/param_norm": param_norm,
          "train/lr": jnp.asarray(schedule(state.step), jnp.float32),
      })
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
