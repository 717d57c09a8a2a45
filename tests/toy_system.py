"""A tiny two-tower system, its data and its evaluator, for the trainer tests.

System: two linear towers (Dense -> LayerNorm -> Dense) map `a` [B, dim_a] and `b` [B, dim_b]
to L2-normalised embeddings z_a, z_b [B, embed]; loss over the GLOBAL batch:
  objective 'infonce':    L = (CE(s * z_a z_b^T, I) + CE(s * z_b z_a^T, I)) / 2, s = exp(logit_scale)
  objective 'regression': L = mean_i ||z_a_i - z_b_i||^2   (a per-example mean, for the
                          gradient-accumulation equivalence)
Params and activations carry the logical axis names of fashion_jax/parallel/axes.py.
With `model.running_mean = True`, `a` is centred BatchNorm-style: by the batch mean in training
(which also updates an EMA `batch_stats/mean_a` <- 0.9 mean_a + 0.1 batch mean, declared in
`mutable_collections`) and by the EMA at evaluation: the trainer's non-gradient state path.

Data (`make_iterator`): batch k of the global stream is drawn from
np.random.default_rng([data.seed, k]) (b = a W + noise with a fixed W, so there is signal);
each process gets its contiguous slice of rows. `data.nan_at_step` poisons batch
`nan_at_step - 1` (the one consumed by train step `nan_at_step`) with NaN.
`data.sleep_s` slows each batch down so subprocess tests can kill a run mid-way.

Evaluator (`type='tests.toy_system'`): loss and in-batch top-1 accuracy on a fixed
held-out batch, named 'val/toy/loss' and 'val/toy/acc'.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fashion_jax.parallel import sharding as sharding_lib

CONFIG_KEYS = ("model", "data")


def _dense(features, in_axis, out_axis, name):
  return nn.Dense(
      features, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (out_axis,)))


class Tower(nn.Module):
  hidden: int
  embed: int

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ("act_batch", "act_embed"))
    h = _dense(self.hidden, "embed", "mlp", "dense_in")(x)
    h = nn.with_logical_constraint(h, ("act_batch", "act_mlp"))
    h = nn.LayerNorm(
        name="norm",
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(h)
    z = _dense(self.embed, "mlp", "embed", "dense_out")(nn.gelu(h))
    z = nn.with_logical_constraint(z, ("act_batch", "act_embed"))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


class TwoTower(nn.Module):
  hidden: int
  embed: int
  running_mean: bool = False

  @nn.compact
  def __call__(self, a, b, train=False):
    if self.running_mean:
      mean_a = self.variable("batch_stats", "mean_a", jnp.zeros, a.shape[-1:], jnp.float32)
      if train:
        batch_mean = jnp.mean(a, axis=0)
        if not self.is_initializing():
          mean_a.value = 0.9 * mean_a.value + 0.1 * batch_mean
        a = a - batch_mean
      else:
        a = a - mean_a.value
    za = Tower(self.hidden, self.embed, name="tower_a")(a)
    zb = Tower(self.hidden, self.embed, name="tower_b")(b)
    logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(np.log(10.0)), ()),
        ())
    return za, zb, logit_scale


class System:
  """The toy system (see the module docstring)."""

  def __init__(self, config):
    self.config = config
    m = config.model
    self.module = TwoTower(hidden=m.hidden, embed=m.embed,
                           running_mean=m.get("running_mean", False))
    self.mutable_collections = ("batch_stats",) if self.module.running_mean else ()

  def dummy_batch(self, batch_size):
    m = self.config.model
    return {"a": np.zeros((batch_size, m.dim_a), np.float32),
            "b": np.zeros((batch_size, m.dim_b), np.float32)}

  def init(self, rng, batch):
    return self.module.init(rng, batch["a"], batch["b"])

  def loss(self, params, batch, rng, train=True):
    del rng
    if self.mutable_collections and train:
      (za, zb, logit_scale), new_state = self.module.apply(
          params, batch["a"], batch["b"], train=True, mutable=list(self.mutable_collections))
    else:
      za, zb, logit_scale = self.module.apply(params, batch["a"], batch["b"])
      new_state = None
    logits = jnp.exp(logit_scale) * za @ zb.T
    logits = nn.with_logical_constraint(logits, ("act_batch", None))
    labels = jnp.arange(za.shape[0])
    acc = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    if self.config.model.objective == "regression":
      loss = jnp.mean(jnp.sum(jnp.square(za - zb), axis=-1))
    else:
      loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    if new_state is not None:
      return loss, ({"acc": acc}, dict(new_state))
    return loss, {"acc": acc}


def global_batch_at(config, step: int, batch_size: int | None = None):
  """Global batch number `step` of the toy stream (numpy)."""
  m, d = config.model, config.data
  batch_size = batch_size or config.batch_size
  w = np.random.default_rng(1234).normal(size=(m.dim_a, m.dim_b)).astype(np.float32)
  rng = np.random.default_rng([d.seed, step])
  a = rng.normal(size=(batch_size, m.dim_a)).astype(np.float32)
  b = (a @ w + 0.3 * rng.normal(size=(batch_size, m.dim_b))).astype(np.float32)
  if step == d.nan_at_step - 1:
    a[:] = np.nan
  return {"a": a, "b": b}


class ToyIterator:
  """Resumable iterator over the toy stream; `position` = batches consumed since step 0."""

  def __init__(self, config, start_step, process_index, process_count):
    self.config = config
    self.position = start_step
    self.process_index, self.process_count = process_index, process_count
    self.num_examples = config.data.num_examples

  def __iter__(self):
    return self

  def __next__(self):
    if self.config.data.sleep_s:
      time.sleep(self.config.data.sleep_s)
    batch = global_batch_at(self.config, self.position)
    self.position += 1
    rows = self.config.batch_size // self.process_count
    return {k: v[self.process_index * rows:(self.process_index + 1) * rows]
            for k, v in batch.items()}


def make_iterator(config, *, start_step=0, process_index=None, process_count=None):
  """The iterator factory the trainer takes (same signature as the TFDS pipeline's)."""
  return ToyIterator(config, start_step, process_index or 0, process_count or 1)


class Evaluator:
  """Loss and accuracy on a fixed held-out batch (batch 10**9 of the stream)."""

  def __init__(self, *, system, config, mesh, batch_size=32):
    self.system, self.mesh = system, mesh
    self.batch = global_batch_at(config, 10**9, batch_size)
    self._loss = jax.jit(lambda p, b: system.loss(p, b, None, train=False))

  def run(self, params):
    batch = sharding_lib.global_batch(self.batch, self.mesh)
    loss, metrics = self._loss(params, batch)
    return {"val/toy/loss": float(loss), "val/toy/acc": float(metrics["acc"])}


def run_steps(config, mesh_config, num_steps, grad_accum_steps=1, batch_fn=None):
  """Trains `num_steps` steps on batches 0.. with the trainer's pieces.

  `batch_fn(step)` gives the global numpy batch of a step (default: the toy stream), so any
  system's config can be stepped on any mesh. Returns (losses per step, host params, final
  TrainState). No checkpoints, no loop.
  """
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  from fashion_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  config = config_check.with_defaults(config)
  mesh = mesh_lib.create_mesh(mesh_config)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  system = systems.get_system(config)
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params, num_steps)
  _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, config.seed, shapes)
  state = state_lib.create_train_state(system, tx, mesh, rules, config.seed, state_sh, shapes)
  train_step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh,
                                        grad_accum_steps)
  losses = []
  for k in range(num_steps):
    host = batch_fn(k) if batch_fn is not None else global_batch_at(config, k)
    batch = sharding_lib.global_batch(host, mesh)
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(state.params), state


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Toy training config; `arg` is unused (kept for the config_flags 'file.py:arg' syntax)."""
  del arg
  c = ml_collections.ConfigDict()
  c.system = "tests.toy_system"
  c.seed = 0
  c.batch_size = 16
  c.total_steps = 6
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.optimizer = ml_collections.ConfigDict({
      "lr": 0.05, "weight_decay": 0.01, "clip_norm": 1.0,
      "schedule": {"kind": "cosine", "warmup_steps": 2}})
  c.checkpoint = ml_collections.ConfigDict({"every_steps": 2, "keep": 2, "async": True})
  c.log_every_steps = 2
  c.model = ml_collections.ConfigDict({"dim_a": 16, "dim_b": 12, "hidden": 32, "embed": 16,
                                       "objective": "infonce"})
  c.data = ml_collections.ConfigDict({"seed": 0, "num_examples": 64, "nan_at_step": -1,
                                      "sleep_s": 0.0})
  # Every trainer key present, so that any of them can be overridden on the command line.
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  return config_check.with_defaults(c)


if __name__ == "__main__":
  # `python -m tests.toy_system --config=tests/toy_system.py --workdir=DIR`: launch.train's main
  # with the toy input, for the subprocess (kill -9 / SIGTERM) tests.
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import train  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(train.main, iterator_factory=make_iterator))
