r"""Fine-tune and evaluate FashionViL on its downstream tasks; print one row of metrics.

All tasks from one pretrained workdir (each in <workdir>/<task>, resumable):
    python -m launch.fashionvil_downstream --pretrained=runs/fashionvil_smoke \
        --workdir=runs/fvil_ds --data_dir=/tmp/tfds [--variant=smoke] \
        [--tasks=retrieval,tgir,scr,ocir] [--steps=N]
    --pretrained= (empty) fine-tunes from the seeded random init: the "no pretraining" row.
One task with full config control:
    python -m launch.fashionvil_downstream --config=configs/fashionvil_downstream.py:tgir_smoke \
        --workdir=runs/fvil_tgir --config.init.checkpoint=runs/fashionvil_smoke \
        --config.data.data_dir=/tmp/tfds

The downstream `model` section, image size and tokenizer are copied from the pretrained run's
config.json, so one command serves every pretraining ablation (task subsets, no sharing).
The row (ablation-table columns; our definitions, in percent):
  ITR / TIR  mean of R@1, R@5, R@10, image->text / text->image, test split, sample-100 protocol
  ITR_full / TIR_full  the same under the full-candidate protocol
  TGIR       FashionIQ mean ((mean R@10 + mean R@50) / 2 over dress, shirt, toptee), validation
  SCR / CR   accuracy (and macro-F1 in the JSON), test split
  OCIR       mean of R@10, R@30, R@50 within the blank's category, test split
  Meta-sum   ITR + TIR + TGIR + SCR + OCIR over the tasks run
Written to <workdir>/row.json (with every metric) and printed as a table row.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import cli


COLUMNS = ("ITR", "TIR", "ITR_full", "TIR_full", "TGIR", "SCR", "CR", "OCIR", "Meta-sum")


def adopt_pretrained(config, pretrained: str):
  """Sets init.checkpoint and copies model / image_size / tokenizer from the pretrained run."""
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  config.init.checkpoint = pretrained
  if pretrained:
    pre = loop.load_workdir_config(pretrained)
    if pre.system not in ("fashionvil", "fashionvil_downstream"):
      raise ValueError(f"--pretrained={pretrained!r} is a {pre.system!r} run, not FashionViL.")
    config.model = pre.model
    config.data.image_size = pre.data.image_size
    config.data.tokenizer = pre.data.tokenizer
  return config


def task_config(task: str, variant: str, pretrained: str, data_dir: str = "",
                steps: int | None = None):
  """The config of one task: configs/fashionvil_downstream.py:<task>_<variant>, adapted."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "fashionvil_downstream.py")
  spec = importlib.util.spec_from_file_location("_fashionvil_downstream_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"{task}_{variant}")
  config.data.data_dir = data_dir
  if steps is not None:
    config.total_steps = steps
    config.checkpoint.every_steps = steps
    config.optimizer.schedule.warmup_steps = max(steps // 10, 1)
  return adopt_pretrained(config, pretrained)


def evaluate(config, workdir: str) -> dict[str, float]:
  """Runs config.evals on the newest checkpoint of `workdir` (a finished run)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  from fashion_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = config_check.with_defaults(config)
  params, _, mesh = loop.load_params(config, workdir)
  system = systems.get_system(config)
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(config.sharding_rules)):
    for spec in config.evals.values():
      module = importlib.import_module(config_check.evaluator_module_name(spec.type))
      kwargs = {k: v for k, v in spec.items() if k not in ("type", "every")}
      out.update(module.Evaluator(system=system, config=config, mesh=mesh, **kwargs).run(params))
  return {k: float(v) for k, v in out.items()}


def run_task(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) and evaluates one task; returns the final evaluation metrics.

  A workdir that already holds the final checkpoint is only evaluated (so rerunning the driver
  after an interruption rebuilds the whole row).
  """
  from fashion_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is not None:
    metrics = run_task(_CONFIG.value, _WORKDIR.value)
    label = _CONFIG.value.init.checkpoint or "none"
  else:
    if _PRETRAINED.value is None:
      raise app.UsageError("give --pretrained=WORKDIR (or --pretrained= for none) or --config.")
    values, metrics = run_all(_PRETRAINED.value, _WORKDIR.value, _TASKS.value, _VARIANT.value,
                              _DATA_DIR.value, _STEPS.value)
    label = _PRETRAINED.value or "none"
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  print(loop.format_table(metrics))
  print(format_row(label, row(metrics)), flush=True)


if __name__ == "__main__":
  # Flags are defined only when run as a script: the tests import this module for its
  # functions next to other launch modules, and absl refuses a flag defined twice.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "One task's config (optional).",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (one subfolder per task).")
  _PRETRAINED = flags.DEFINE_string("pretrained", None,
                                    "Pretrained FashionViL workdir; '' = no pretraining.")
  _VARIANT = flags.DEFINE_enum("variant", "smoke", ["smoke", "base"], "Config variant.")
  _TASKS = flags.DEFINE_list("tasks", ["retrieval", "tgir", "scr", "ocir"], "Tasks to run.")
  _DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir of every task's data.")
  _STEPS = flags.DEFINE_integer("steps", None, "Override total_steps of every task.")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
