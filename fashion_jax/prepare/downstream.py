"""FashionViL's downstream tasks from one pretrained run: fine-tune, evaluate, one row of metrics.

The library of experiments/fashionvil_downstream.py (the command, with the flags) and of
experiments/fashionvil_ablation.py. Each task's config is configs/fashionvil_downstream.py:
<task>_<variant> (`task_config`), whose `model` section, image size and tokenizer are copied from
the pretrained run's config.json (`adopt_pretrained`), so one call serves every pretraining
ablation (task subsets, no sharing). `run_task` trains with the normal trainer (resumable) and
evaluates; a task whose workdir already holds its final checkpoint is only evaluated.

The row (`row`; ablation-table columns, our definitions, in percent):
  ITR / TIR  mean of R@1, R@5, R@10, image->text / text->image, test split, sample-100 protocol
  ITR_full / TIR_full  the same under the full-candidate protocol
  TGIR       FashionIQ mean ((mean R@10 + mean R@50) / 2 over dress, shirt, toptee), validation
  SCR / CR   accuracy (and macro-F1 in the JSON), test split
  OCIR       mean of R@10, R@30, R@50 within the blank's category, test split
  Meta-sum   ITR + TIR + TGIR + SCR + OCIR over the tasks run
`run_all` writes it with every metric to <workdir>/row.json.

Here rather than in train/ (which knows no fashion) or systems/ (which the trainer imports): it
drives the trainer, the systems and the evaluators, like the rest of this package.
"""

import json
import os

import flax.linen as nn
import jax

from configs import fashionvil_downstream as downstream_configs
from fashion_jax import evaluate as evaluate_lib
from fashion_jax import systems
from fashion_jax.checkpoint import manager as checkpoint
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.parallel import sharding
from fashion_jax.train import config_check
from fashion_jax.train import loop
from fashion_jax.train import restore

COLUMNS = ("ITR", "TIR", "ITR_full", "TIR_full", "TGIR", "SCR", "CR", "OCIR", "Meta-sum")


def adopt_pretrained(config, pretrained: str):
  """Sets init.checkpoint and copies model / image_size / tokenizer from the pretrained run."""
  config.init.checkpoint = pretrained
  if pretrained:
    pre = checkpoint_restore.load_workdir_config(pretrained)
    if pre.system not in ("fashionvil", "fashionvil_downstream"):
      raise ValueError(f"--pretrained={pretrained!r} is a {pre.system!r} run, not FashionViL.")
    config.model = pre.model
    config.data.image_size = pre.data.image_size
    config.data.tokenizer = pre.data.tokenizer
  return config


def task_config(task: str, variant: str, pretrained: str, data_dir: str = "",
                steps: int | None = None):
  """The config of one task: configs/fashionvil_downstream.py:<task>_<variant>, adapted."""
  config = downstream_configs.get_config(f"{task}_{variant}")
  config.data.data_dir = data_dir
  if steps is not None:
    config.total_steps = steps
    config.checkpoint.every_steps = steps
    config.optimizer.schedule.warmup_steps = max(steps // 10, 1)
  return adopt_pretrained(config, pretrained)


def evaluate(config, workdir: str) -> dict[str, float]:
  """Runs config.evals on the newest checkpoint of `workdir` (a finished run)."""
  config = config_check.with_defaults(config)
  params, _, mesh = restore.load_params(config, workdir)
  system = systems.get_system(config)
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(config.sharding_rules)):
    for evaluator in evaluate_lib.from_config(config, system, mesh).values():
      out.update(evaluator.run(params))
  return {k: float(v) for k, v in out.items()}


def run_task(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) and evaluates one task; returns the final evaluation metrics.

  A workdir that already holds the final checkpoint is only evaluated (so rerunning the driver
  after an interruption rebuilds the whole row).
  """
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
      done = ckpt.latest_step() == config.total_steps
    finally:
      ckpt.close()
    if done:
      return evaluate(config, workdir)
  result = loop.train_and_evaluate(config, workdir)  # config.input: data/downstream.py
  return {k: v for k, v in result.metrics.items() if not k.startswith("train/")}


def row(metrics: dict[str, float]) -> dict[str, float]:
  """The ablation-table columns (module docstring) from the evaluators' metrics."""
  out = {}

  def mean_of(keys):
    if all(k in metrics for k in keys):
      return 100.0 * sum(metrics[k] for k in keys) / len(keys)
    return None

  for name, protocol, direction in (("ITR", "sample100", "i2t"), ("TIR", "sample100", "t2i"),
                                    ("ITR_full", "full", "i2t"), ("TIR_full", "full", "t2i")):
    v = mean_of([f"test/{protocol}/{direction}_R@{k}" for k in (1, 5, 10)])
    if v is not None:
      out[name] = v
  for name, key in (("TGIR", "validation/tgir/mean"), ("SCR", "test/cls/subcategory_acc"),
                    ("CR", "test/cls/category_acc")):
    if key in metrics:
      out[name] = 100.0 * metrics[key]
  v = mean_of([f"test/ocir/R@{k}" for k in (10, 30, 50)])
  if v is not None:
    out["OCIR"] = v
  out["Meta-sum"] = sum(out[k] for k in ("ITR", "TIR", "TGIR", "SCR", "OCIR") if k in out)
  return out


def format_row(label: str, values: dict[str, float]) -> str:
  cols = [c for c in COLUMNS if c in values]
  header = "| pretrained | " + " | ".join(cols) + " |"
  line = "| " + label + " | " + " | ".join(f"{values[c]:.2f}" for c in cols) + " |"
  return "\n".join([header, "|" + "---|" * (len(cols) + 1), line])


def run_all(pretrained: str, workdir: str, tasks, variant: str = "smoke", data_dir: str = "",
            steps: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
  """Runs every task in <workdir>/<task>; returns (row, all metrics) and writes row.json."""
  metrics = {}
  for task in tasks:
    config = task_config(task, variant, pretrained, data_dir, steps)
    metrics.update(run_task(config, os.path.join(workdir, task)))
  values = row(metrics)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "row.json"), "w") as f:
    json.dump({"pretrained": pretrained, "variant": variant, "tasks": list(tasks),
               "row": values, "metrics": metrics}, f, indent=2, sort_keys=True)
  return values, metrics
