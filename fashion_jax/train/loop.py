"""The train loop: `train_and_evaluate(config, workdir)`.

The trainer knows nothing about fashion. A system (`fashion_jax.systems.<config.system>`) gives
`dummy_batch`, `init` and `loss`; the input pipeline gives numpy batches; evaluators give
metrics. Everything else (mesh, sharding, optimizer, checkpoints, logging, preemption, NaN
guard) happens here, in one linear function.

Config keys owned by the trainer (defaults in `config_check.SCHEMA`):

  system: str                  module of fashion_jax.systems (or a dotted module path)
  seed: 0                      params init and per-step rng
  batch_size: int              GLOBAL batch; each host feeds batch_size // process_count
  total_steps: int | None      exactly one of total_steps / num_epochs; num_epochs needs the
  num_epochs: float | None       train iterator to expose `num_examples` (one epoch, all hosts)
  grad_accum_steps: 1          micro-batches per step (see train/step.py for the semantics)
  mesh: {data: -1, fsdp: 1, tensor: 1}       -1 fills the rest of the devices
  sharding_rules: None         None = parallel.axes.DEFAULT_RULES; else ((logical, mesh axes),..)
  optimizer: {name: 'adamw', lr (required), b1: 0.9, b2: 0.999, eps: 1e-8, weight_decay: 0.0,
              clip_norm: None, schedule: {kind: 'cosine', warmup_steps: 0, decay_steps: None,
              end_lr_factor: 0.0, boundaries: (), factor: 0.1}, lr_mults: (), freeze: (),
              wd_exclude: optimizer.DEFAULT_WD_EXCLUDE}          (train/optimizer.py)
  checkpoint: {every_steps: 1000, keep: 2, best_metric: None, best_mode: 'max', async: True}
  log_every_steps: 50          train metrics are averaged over these steps and written
  evals: {}                    name -> {type, every (0 = only at the end), optional (False),
                               **kwargs}; checked against the data before anything compiles
                               (config_check.check_eval_data): an optional evaluation the
                               dataset cannot serve is dropped with a note, another is an error
  nan_policy: 'stop'           'stop': raise NonFiniteError at the first non-finite train metric
                               (naming the step and the metric; the newest checkpoint is the
                               last good state). 'skip': a step whose loss, gradient norm or
                               updated parameters are non-finite leaves params and optimizer
                               state unchanged (train/step.py); a warning names the step and its
                               first non-finite metric, `train/skipped` is the fraction of
                               skipped steps per log window, and the other train metrics are
                               averaged over the applied steps only.
  profile: {start_step: 0, num_steps: 0}     num_steps > 0 profiles those steps to the workdir
  distributed: False           launch/train.py calls jax.distributed.initialize

A config file may leave out any key that has a default, but ml_collections' config_flags can
only override keys that exist: a config that ends with `return config_check.with_defaults(c)`
makes every trainer key overridable (`--config.grad_accum_steps=4`, `--config.distributed=True`).

Plug-ins:
  * Input: `iterator_factory(config, *, start_step, process_index, process_count)` returns an
    iterator of host-local numpy dict batches ([batch_size // process_count, ...]) starting at
    global step `start_step`, optionally with `.position` (JSON-able; saved in checkpoints and
    compared on resume: an iterator created with start_step=k must report the position the
    original iterator had after k batches), `.num_examples`, and `.close()` (called when training
    ends or the iterator is replaced, to stop background work). Default: the
    `make_train_iterator` of the module `config.input` (default 'fashion_jax.data.pipeline',
    the TFDS pipeline; checked with the config, before anything compiles).
  * Evaluation: for each `config.evals` entry, `fashion_jax.evaluate.<type>.Evaluator(system=,
    config=, mesh=, **kwargs)` (a dotted `type` is a full module path) is built once; `run(params)`
    returns flat float metrics named '<split>/<protocol>/<metric>', run every `every` steps and
    at the end, under the mesh and the logical rules. `checkpoint.best_metric` names one of them.

End of training: the final state is saved (and the save waited for) BEFORE the final
evaluations run, so an evaluation that raises, hangs or is killed cannot cost the trained state;
its error is raised after the checkpoint is on disk. With `checkpoint.best_metric` the final
checkpoint is then saved again with its metrics (the copy on disk moved aside, not deleted,
until the new save is final: Checkpointer.save_again_with_metrics), so keep-best
ranks it like every other one; at a preemption it is not (time is short), and it stays the newest
checkpoint. Rerunning a finished run (newest checkpoint = the last step) trains nothing and runs
the final evaluations again: the way to complete a run whose final evaluation failed.

Workdir layout: config.json (the full config with defaults), checkpoints/<step>/, TensorBoard
event files, profiles. A workdir whose checkpoints come from another system or model config is
refused with an error naming both; other differences (e.g. a changed lr) are logged and allowed,
unless they give the train state another tree (e.g. optimizer.clip_norm 1.0 -> 0): then
checkpoint.IncompatibleCheckpointError names the differing state paths and config keys, and
nothing is moved (config.json is rewritten only once the resume is accepted).

Resume: rerunning the same command continues from the newest complete checkpoint, with the
same batches and per-step rng, so the result equals an uninterrupted run (bitwise on CPU). A
newest checkpoint that cannot be read or fails its fingerprint check is named in a warning,
moved to `<workdir>/checkpoints_corrupt/` and the previous one is used (checkpoint/manager.py).
SIGTERM: the current step finishes, a checkpoint is saved, and the function returns with
`preempted=True` (launch/train.py then exits 0).
Checkpoint write failures (disk full, I/O errors): a periodic save that fails is a warning and
training continues (older checkpoints stay intact); if the final save (end of training or
preemption) fails, CheckpointWriteError is raised naming the step and the newest checkpoint.
Fault injection for the tests: faults.py (`FASHION_JAX_FAULT`, unset in real runs).
"""

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from fashion_jax import evaluate
from fashion_jax import faults
from fashion_jax import systems
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.data import device_crop
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import restore
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib

IteratorFactory = Callable[..., Iterator[dict[str, np.ndarray]]]

class NonFiniteError(FloatingPointError):
  """A train metric became NaN/inf; the message names the step and the metric."""


class TrainResult(NamedTuple):
  state: state_lib.TrainState
  metrics: dict[str, float]   # Last logged train metrics and last evaluation results.
  preempted: bool             # True when stopped by SIGTERM after saving.


def _default_iterator_factory(config, **kwargs):
  return config_check.input_factory(config.input)(config, **kwargs)


def _close(train_iter) -> None:
  """Stops an iterator's background work (pipeline.TrainIterator's host-step thread, a
  generator) now rather than at garbage collection; iterators without close() are left as is."""
  close = getattr(train_iter, "close", None)
  if callable(close):
    close()


def _total_steps(config, train_iter) -> int:
  if config.total_steps is not None:
    return int(config.total_steps)
  num_examples = getattr(train_iter, "num_examples", None)
  if not num_examples:
    raise config_check.ConfigError(
        f"config.num_epochs={config.num_epochs} needs the train iterator to expose "
        f"`num_examples`; {type(train_iter).__name__} does not. Set config.total_steps.")
  return max(1, math.ceil(config.num_epochs * num_examples / config.batch_size))


def _first_non_finite(history: list[tuple[int, dict[str, float]]]):
  for step, metrics in history:
    for key in ["train/loss"] + sorted(k for k in metrics if k != "train/loss"):
      if key in metrics and not np.isfinite(metrics[key]):
        return step, key, metrics[key]
  return None


def _flat_hparams(config) -> dict[str, Any]:
  out = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

  walk("", config.to_dict())
  return out


def format_table(results: dict[str, float]) -> str:
  """Evaluation results as text tables, one per protocol, one row per (split, protocol).

  Metric names are 'split/protocol/metric' (evaluate/base.py); each protocol's table has a
  column per metric that protocol reports, so retrieval and zero-shot numbers never share
  columns with different meanings.
  """
  by_protocol = {}
  for name, value in sorted(results.items()):
    parts = name.split("/", 2)
    split, protocol, metric = [""] * (3 - len(parts)) + parts
    by_protocol.setdefault(protocol, {}).setdefault(split, {})[metric] = value
  tables = []
  for protocol, rows in by_protocol.items():
    metrics = sorted({m for r in rows.values() for m in r})
    header = ["split", "protocol"] + metrics
    body = [[split, protocol] + [f"{r[m]:.4g}" if m in r else "" for m in metrics]
            for split, r in rows.items()]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    tables.append("\n".join(lines))
  return "\n\n".join(tables)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       iterator_factory: IteratorFactory | None = None,
                       on_progress: Callable[[str], None] | None = None) -> TrainResult:
  """Trains `config.system` as configured, resuming from `workdir` if it holds checkpoints.

  Args:
    config: the experiment config (module docstring lists the trainer's keys).
    workdir: output directory (config.json, checkpoints, TensorBoard logs).
    iterator_factory: the input (module docstring); None = the TFDS pipeline.
    on_progress: called with a description ('step 12 done') after every step, including its
      evaluations and checkpoint save (launch/train.py feeds a multi-host watchdog with it).

  Returns:
    TrainResult(state, metrics, preempted).

  Raises:
    config_check.ConfigError: a bad config or a foreign workdir, before anything compiles.
    NonFiniteError: a non-finite train metric; the newest checkpoint is the last good state.
  """
  # ----------------------------------------------------------------------------------------
  # Config: validated and completed before anything is traced or compiled.
  # ----------------------------------------------------------------------------------------
  config = config_check.with_defaults(config)
  config_check.check(config, num_devices=jax.device_count(), process_count=jax.process_count())
  if iterator_factory is None:  # The config's input: it must make what the system reads.
    config_check.check_train_features(config)
  config = config_check.check_eval_data(config)  # Drops optional evals the data cannot serve.
  system = systems.get_system(config)  # It checks its own keys: before anything is written.
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0

  # ----------------------------------------------------------------------------------------
  # Mesh, system, and the shapes/shardings of its params (jax.eval_shape: no arrays yet).
  # ----------------------------------------------------------------------------------------
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
               jax.process_count())
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  logging.info("Params: %d arrays, %d values.", len(jax.tree.leaves(shapes.params)),
               sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.params)))

  # ----------------------------------------------------------------------------------------
  # Checkpoints: refuse another experiment's workdir, find the step to resume from.
  # ----------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(
      workdir, keep=config.checkpoint.keep, best_metric=config.checkpoint.best_metric,
      best_mode=config.checkpoint.best_mode, use_async=config.checkpoint["async"])
  writer = None
  train_iter = None
  previous_sigterm = None
  try:
    # From here on SIGTERM (preemption) means: finish the step, save, return. With several
    # processes JAX's own SIGTERM notifier (installed by jax.distributed.initialize) must keep
    # the signal: `reached_preemption_sync_point` then makes EVERY process stop after the same
    # step, even when only one was signalled. A Python handler would replace it, and processes
    # that stopped at different steps would wait for each other in a collective.
    sigterm = {"received": False}
    def on_sigterm(signum, frame):
      del signum, frame
      logging.warning("SIGTERM: finishing the current step, saving a checkpoint, exiting.")
      sigterm["received"] = True
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    restore.check_workdir(workdir, config, ckpt, shapes.params)
    start_step = ckpt.latest_step() or 0

    # --------------------------------------------------------------------------------------
    # Input pipeline, from the step we resume at.
    # --------------------------------------------------------------------------------------
    factory = iterator_factory or _default_iterator_factory
    def make_iter(step):
      return factory(config, start_step=step, process_index=jax.process_index(),
                     process_count=jax.process_count())
    train_iter = make_iter(start_step)
    config_check.check_train_examples(config, getattr(train_iter, "num_examples", None))
    total_steps = _total_steps(config, train_iter)

    # --------------------------------------------------------------------------------------
    # Optimizer and train state: created directly sharded, or restored onto this mesh.
    # --------------------------------------------------------------------------------------
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params, total_steps)
    abstract, state_shardings = state_lib.abstract_state(system, tx, mesh, rules, config.seed,
                                                         shapes)
    restored = ckpt.restore_latest(abstract, config=config) if start_step else None
    if is_chief:  # Not before: an incompatible resume names the keys changed from config.json.
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    if restored is not None and restored[0] != start_step:
      # The newest checkpoint was unusable (warned, moved aside): the input restarts earlier.
      start_step = restored[0]
      _close(train_iter)
      train_iter = make_iter(start_step)
    if restored is not None:
      _, state, data = restored
      position = getattr(train_iter, "position", start_step)
      if data.get("position") is not None and restore.plain_json(position) != data["position"]:
        raise RuntimeError(
            f"The train iterator resumed at position {position!r} but checkpoint {start_step} "
            f"was saved at position {data['position']!r}: the input pipeline did not resume "
            f"exactly.")
      logging.info("Resumed from checkpoint %d of %s.", start_step, ckpt.directory)
      faults.inject("restore", start_step, workdir=workdir)
    else:
      start_step = 0
      state = state_lib.create_train_state(system, tx, mesh, rules, config.seed,
                                           state_shardings, shapes)

    # --------------------------------------------------------------------------------------
    # The jitted step, the evaluators, writers and periodic actions.
    # --------------------------------------------------------------------------------------
    train_step = step_lib.make_train_step(
        system, tx, schedule, mesh, rules, state_shardings, config.grad_accum_steps,
        skip_non_finite=config.nan_policy == "skip",
        batch_transform=device_crop.batch_transform(config.get("data") or {}))
    evaluators = {name: (config.evals[name].every, evaluator) for name, evaluator
                  in evaluate.from_config(config, system, mesh).items()}

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if start_step == 0:
      writer.write_hparams(_flat_hparams(config))
    actions = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                               every_steps=config.log_every_steps,
                                               every_secs=None)]
    if config.profile.num_steps > 0:
      actions.append(periodic_actions.Profile(
          logdir=workdir, num_profile_steps=config.profile.num_steps, profile_duration_ms=None,
          first_profile=config.profile.start_step, every_steps=None, every_secs=None))

    def run_evals(names, step):
      results = {}
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for name in names:
          t0 = time.time()
          try:
            out = {k: float(v) for k, v in evaluators[name][1].run(state.params).items()}
          except Exception:
            logging.error("Evaluation %r failed at step %d. The newest checkpoint in %s is "
                          "step %s; once the evaluation is fixed, rerunning the command resumes "
                          "from it (a finished run only evaluates).", name, step,
                          ckpt.directory, ckpt.latest_step())
            raise
          for key in out:
            if key in results:
              raise ValueError(f"Evaluator {name!r} returns metric {key!r} that another "
                               f"evaluator also returns.")
          results.update(out)
          logging.info("Eval %s at step %d took %.1fs.", name, step, time.time() - t0)
      best = config.checkpoint.best_metric
      if best and results and best not in results:
        raise config_check.ConfigError(
            f"config.checkpoint.best_metric={best!r} is not among the evaluation metrics "
            f"{sorted(results)}.")
      writer.write_scalars(step, results)
      return results

    def save(step, metrics=None):
      position = getattr(train_iter, "position", step)
      ckpt.save(step, state, {"step": step, "position": restore.plain_json(position)}, metrics)

    def resave_with_metrics(step, metrics):
      """Checkpoint `step`, saved before its evaluation, saved again with its metrics so that
      keep-best ranks it (Checkpointer.save_again_with_metrics: never absent from disk)."""
      position = getattr(train_iter, "position", step)
      ckpt.save_again_with_metrics(
          step, state, {"step": step, "position": restore.plain_json(position)}, metrics)

    # --------------------------------------------------------------------------------------
    # Train.
    # --------------------------------------------------------------------------------------
    history = []        # (step, host metrics) fetched, not yet written.
    skipped_upto, skipped_total = 0, 0   # history[:skipped_upto] was checked for skips.
    pending = []        # (step, device metrics) not yet fetched.
    last_metrics, eval_metrics = {}, {}
    step = start_step
    preempted = False
    if start_step >= total_steps and evaluators:
      # A finished run rerun (e.g. after its final evaluation failed): evaluate, do not train.
      logging.info("Checkpoint %d is the last step: running the final evaluations only.", step)
      eval_metrics = run_evals(list(evaluators), step)
    logging.info("Training steps %d..%d of %d.", start_step + 1, total_steps, total_steps)
    while step < total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        try:
          local = next(train_iter)
        except StopIteration:
          raise RuntimeError(f"The train iterator ended after {step} steps; total_steps="
                             f"{total_steps}.") from None
        faults.inject("batch", step + 1, workdir=workdir)
        state, metrics = train_step(state, sharding_lib.global_batch(local, mesh))
      step += 1
      faults.inject("step", step, workdir=workdir)
      pending.append((step, metrics))
      for action in actions:
        action(step)

      if jax.process_count() > 1:
        preempted = multihost_utils.reached_preemption_sync_point(step)
      else:
        preempted = sigterm["received"]
      last = step == total_steps
      eval_names = [n for n, (every, _) in evaluators.items()
                    if last or (every and step % every == 0)]
      save_now = last or preempted or step % config.checkpoint.every_steps == 0
      log_now = last or step % config.log_every_steps == 0

      # NaN guard: fetch before anything is logged, evaluated or saved.
      if log_now or save_now or eval_names:
        history += [(s, {k: float(v) for k, v in m.items()})
                    for s, m in jax.device_get(pending)]
        pending = []
        for s, m in history[skipped_upto:]:
          if m.get("train/skipped"):
            bad = _first_non_finite([(s, m)])
            skipped_total += 1
            logging.warning("Step %d skipped (nan_policy='skip'): non-finite %s=%s; params and "
                            "optimizer state were left unchanged (%d steps skipped so far).",
                            s, bad[1] if bad else "?", bad[2] if bad else "?", skipped_total)
        skipped_upto = len(history)
        bad = _first_non_finite([(s, m) for s, m in history if not m.get("train/skipped")])
        if bad:
          raise NonFiniteError(
              f"Non-finite {bad[1]}={bad[2]} at step {bad[0]}; stopping "
              f"(nan_policy={config.nan_policy!r}). The newest checkpoint (step "
              f"{ckpt.latest_step()}) in {ckpt.directory} is the last good state.")
      if log_now and history:
        applied = [m for _, m in history if not m.get("train/skipped")]
        last_metrics = {k: float(np.mean([m[k] for m in applied])) for k in history[-1][1]
                        if k != "train/skipped" and applied}
        if "train/skipped" in history[-1][1]:
          last_metrics["train/skipped"] = float(np.mean([m["train/skipped"] for _, m in history]))
          last_metrics["train/skipped_total"] = float(skipped_total)
        writer.write_scalars(step, last_metrics)
        history, skipped_upto = [], 0

      # ---- Checkpoint and evaluate. The final state (last step, preemption) is on disk before
      # its evaluations run (module docstring); other steps evaluate first and save with the
      # metrics, for keep-best.
      best = config.checkpoint.best_metric
      final = last or preempted
      if final:
        save(step)
        ckpt.wait()
      if eval_names:
        eval_metrics = run_evals(eval_names, step)
      if final and eval_names and best and not preempted:
        resave_with_metrics(step, eval_metrics)
      elif not final and (save_now or (eval_names and best)):
        save(step, eval_metrics if eval_names and best else None)
      if (final or save_now or (eval_names and best)) and faults.armed("saved", step):
        ckpt.wait()
        faults.inject("saved", step, workdir=workdir)
      if on_progress is not None:
        on_progress(f"step {step} done")
      if preempted:
        logging.warning("Preempted: checkpoint %d saved.", step)
        break

    ckpt.wait()
    if step > start_step and ckpt.latest_step() != step:
      raise checkpoint_lib.CheckpointWriteError(
          f"The final checkpoint (step {step}) could not be written to {ckpt.directory}: "
          f"{ckpt.failed_saves.get(step, 'unknown error')}. The newest checkpoint there is step "
          f"{ckpt.latest_step()}; free space (or fix the storage) and rerun to resume from it.")
    writer.flush()
    return TrainResult(state, {**last_metrics, **eval_metrics}, preempted)
  finally:
    _close(train_iter)
    ckpt.wait()
    ckpt.close()
    if writer is not None:
      writer.close()
    if previous_sigterm is not None:
      signal.signal(signal.SIGTERM, previous_sigterm)
