r"""E2 vs FashionCLIP fine-tuning on the synthetic catalog: every arm, one command, the tables.

    python -m launch.build_data --dataset=synthetic_catalog/smoke --data_dir=/tmp/e2_tfds
    nice -n 10 python -m experiments.e2_compare --root=/tmp/e2_runs --data_dir=/tmp/e2_tfds

The protocol (the README's "E2 vs FashionCLIP fine-tuning" section):
  1. `fc_pre`: configs/fashionclip.py:smoke, 400 steps (warmup 40), seed 0: the ONE starting point
     of every arm.
  2. Each arm, batch 64, seed 0, data.max_len 64 (fc_pre's text length):
       CLIP-FT: configs/e2.py:smoke,ablation=clip,stage=2 from fc_pre, 300 steps (warmup 30);
       E2 and its ablations: stage 1 (configs/e2.py:smoke,stage=1,<option>; only the E2
       additions train, lr 5e-4) from fc_pre, 150 steps (warmup 15), then stage 2 (stage=2, all
       parameters, lr 5e-5) from stage 1's workdir, 150 steps (warmup 15).
     Training runs no evaluator (they do not touch the train state, data order or rng).
  3. Each arm's final checkpoint is evaluated by launch.evaluate with the evals of
     configs/e2.py:<the arm's last-stage argument> (retrieval on test and holdout_brand, full
     and sample100; linear probes per entity; per-entity retrieval, evaluate/entity_retrieval.py)
     -> <workdir>/e2_compare_eval.json.
  4. The markdown tables are printed from those files (also with --phase=table alone).

Every step is skipped when its output exists (a finished stage = a checkpoint at its last step;
an evaluation = its json), so rerunning the command resumes, and a workdir trained earlier with
the same recipe is evaluated, not retrained. `--arms` picks and orders arms (default: all, in
the order of ARMS: CLIP-FT, E2, no_brand, tokens=1, tokens=4, the other entities, no fusion,
no regional loss); `--phase` = all | train | eval | table (eval skips, with a message, arms
whose training has not finished, so a second process can evaluate while the first trains).
Each stage and evaluation is a child process (a fresh JAX per run; tf.data iterators are never
torn down inside a long-lived process).
"""

import ast
import json
import math
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string("root", "/tmp/e2_runs", "Directory holding every workdir.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/e2_tfds", "TFDS dir of synthetic_catalog/smoke.")
_ARMS = flags.DEFINE_list("arms", None, "Arms to run, in this order; default: all of ARMS.")
_PHASE = flags.DEFINE_enum("phase", "all", ["all", "train", "eval", "table"], "What to do.")
_TRAIN_ONE = flags.DEFINE_string("train_one", None, "Internal: train one stage (a dict literal).")

PRE = dict(config="configs/fashionclip.py:smoke", workdir="fc_pre", init="", steps=400,
           warmup=40)
E2_STAGE_STEPS, E2_WARMUP = 150, 15


def _e2(key, label, option=""):
  opt = f",{option}" if option else ""
  return dict(key=key, label=label, stages=[
      dict(config=f"configs/e2.py:smoke,stage=1{opt}", workdir=f"{key}_s1", init="fc_pre",
           steps=E2_STAGE_STEPS, warmup=E2_WARMUP),
      dict(config=f"configs/e2.py:smoke,stage=2{opt}", workdir=f"{key}_s2", init=f"{key}_s1",
           steps=E2_STAGE_STEPS, warmup=E2_WARMUP)])


# Priority order: what the comparison needs first.
ARMS = [
    dict(key="clip_ft", label="CLIP-FT", stages=[
        dict(config="configs/e2.py:smoke,ablation=clip,stage=2", workdir="clip_ft",
             init="fc_pre", steps=2 * E2_STAGE_STEPS, warmup=2 * E2_WARMUP)]),
    _e2("e2", "E2"),
    _e2("nobrand", "E2, no brand", "ablation=no_brand"),
    _e2("tok1", "E2, 1 token per entity", "tokens=1"),
    _e2("tok4", "E2, 4 tokens per entity", "tokens=4"),
    _e2("noseason", "E2, no season", "ablation=no_season"),
    _e2("nosubcat", "E2, no subcategory", "ablation=no_subcategory"),
    _e2("nocomp", "E2, no composition", "ablation=no_composition"),
    _e2("nofus", "E2, no fusion blocks", "ablation=no_fusion"),
    _e2("noreg", "E2, no regional loss", "ablation=no_regional"),
]
ENTITIES = ("brand", "season", "subcategory", "composition")
EVAL_FILE = "e2_compare_eval.json"


# --------------------------------------------------------------------------------------------
# One training stage (child process).
# --------------------------------------------------------------------------------------------
def _train_one(spec: dict) -> None:
  import importlib.util  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  path, _, arg = spec["config"].partition(":")
  mod_spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.data_dir = spec["data_dir"]
  c.data.max_len = 64
  c.batch_size = 64
  c.seed = 0
  c.total_steps = spec["steps"]
  c.optimizer.schedule.warmup_steps = spec["warmup"]
  c.checkpoint.every_steps = spec["steps"]
  c.log_every_steps = 50
  c.checkpoint.best_metric = None
  c.evals = {}
  if spec["init"]:
    c.init.checkpoint = spec["init"]
  res = loop.train_and_evaluate(c, spec["workdir"])
  print("FINISHED", spec["workdir"], json.dumps(res.metrics, sort_keys=True), flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def _latest_step(workdir: str) -> int | None:
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return None
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()]
  return max(steps) if steps else None


def _run_logged(cmd: list[str], log: str) -> None:
  t0 = time.time()
  print(f"[e2_compare] {' '.join(cmd)}  > {log}", flush=True)
  with open(log, "w") as f:
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise RuntimeError(f"{cmd} failed with exit code {rc}; see {log}.")
  print(f"[e2_compare]   done in {time.time() - t0:.0f} s", flush=True)


def _train_stage(stage: dict, root: str, data_dir: str) -> None:
  workdir = os.path.join(root, stage["workdir"])
  if _latest_step(workdir) == stage["steps"]:
    print(f"[e2_compare] {workdir}: step {stage['steps']} exists, not retrained.", flush=True)
    return
  spec = dict(stage, workdir=workdir, data_dir=data_dir,
              init=os.path.join(root, stage["init"]) if stage["init"] else "")
  _run_logged([sys.executable, "-m", "experiments.e2_compare", f"--train_one={spec!r}"],
              workdir + ".log")


def _evaluate(arm: dict, root: str, data_dir: str) -> None:
  last = arm["stages"][-1]
  workdir = os.path.join(root, last["workdir"])
  out = os.path.join(workdir, EVAL_FILE)
  if os.path.exists(out):
    print(f"[e2_compare] {out} exists.", flush=True)
    return
  step = _latest_step(workdir)
  if step != last["steps"]:  # Only with --phase=eval: phase 'all' trains first.
    print(f"[e2_compare] {workdir} has checkpoint {step}, not {last['steps']}: not trained "
          "yet, not evaluated.", flush=True)
    return
  _run_logged([sys.executable, "-m", "launch.evaluate", f"--config={last['config']}",
               f"--workdir={workdir}", f"--step={step}", f"--output={out}",
               f"--config.data.data_dir={data_dir}", "--config.data.max_len=64"],
              os.path.join(root, f"{arm['key']}_eval.log"))


# --------------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------------
def _binomial_se(p: float, n: float) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def tables(results: list[tuple[str, dict[str, float]]]) -> str:
  """Markdown tables from [(label, flat eval metrics)].

  Table 1: global retrieval and per-entity linear probes (probe accuracy +- its binomial
  standard error sqrt(p (1 - p) / n) over the n test items).
  Table 2: per-entity retrieval on test (evaluate/entity_retrieval.py): tag text -> images mAP
  and image -> tag text R@1, "head / global": with E2's entity head and with the global image
  embedding; below it, per entity, the chance levels and the largest standard error in the
  column.
  Table 3: the same on holdout_brand (brands never seen in training).
  """
  def f(m, k, d=3):
    return f"{m[k]:.{d}f}" if k in m else "-"

  cols1 = [("test full t2i R@1", "test/full/t2i_R@1"), ("test full i2t R@1", "test/full/i2t_R@1"),
           ("test full SumR", "test/full/SumR"), ("test sample100 SumR", "test/sample100/SumR"),
           ("holdout_brand full SumR", "holdout_brand/full/SumR"),
           ("holdout_brand sample100 SumR", "holdout_brand/sample100/SumR")]
  lines = ["| run | " + " | ".join(c for c, _ in cols1) + " | "
           + " | ".join(f"probe {e}" for e in ENTITIES) + " |",
           "|---" * (1 + len(cols1) + len(ENTITIES)) + "|"]
  for label, m in results:
    cells = [f(m, k) for _, k in cols1]
    for e in ENTITIES:
      k = f"test/linear_probe/{e}_acc"
      n = m.get("test/full/num_items", 0.0)
      cells.append(f"{m[k]:.3f} ± {_binomial_se(m[k], n):.3f}" if k in m else "-")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  out = ["\n".join(lines)]
  for split in ("test", "holdout_brand"):
    ents = [e for e in ENTITIES if any(f"{split}/entity_{e}/global_t2i_mAP" in m
                                       for _, m in results)]
    if not ents:
      continue
    header = ["run"] + [f"{e} {what} (head / global)" for e in ents
                        for what in ("t2i mAP", "i2t R@1")]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    ses = {}
    for label, m in results:
      cells = [label]
      for e in ents:
        for metric in ("t2i_mAP", "i2t_R@1"):
          p = f"{split}/entity_{e}/"
          cells.append(f"{f(m, p + 'head_' + metric)} / {f(m, p + 'global_' + metric)}"
                       .replace("- / -", "-"))
          for kind in ("head", "global"):
            if p + f"{kind}_{metric}_se" in m:
              key = (e, metric)
              ses[key] = max(ses.get(key, 0.0), m[p + f"{kind}_{metric}_se"])
      lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for e in ents:
      for _, m in results:
        p = f"{split}/entity_{e}/"
        if p + "num_values" in m:
          notes.append(f"{e}: {int(m[p + 'num_values'])} values over {int(m[p + 'num_items'])} "
                       f"items, chance mAP {m[p + 'chance_t2i_mAP']:.3f} / R@1 "
                       f"{m[p + 'chance_i2t_R@1']:.3f}, largest standard error mAP "
                       f"{ses.get((e, 't2i_mAP'), float('nan')):.3f} / R@1 "
                       f"{ses.get((e, 'i2t_R@1'), float('nan')):.3f}")
          break
    out.append(f"Per-entity retrieval, {split} (head = the entity's E2 head, '-' where the run "
               f"has none; global = the global image embedding):\n\n" + "\n".join(lines)
               + "\n\n" + "; ".join(notes) + ".")
  return "\n\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TRAIN_ONE.value:
    _train_one(ast.literal_eval(_TRAIN_ONE.value))
    return
  root, data_dir = os.path.abspath(_ROOT.value), os.path.abspath(_DATA_DIR.value)
  by_key = {a["key"]: a for a in ARMS}
  keys = _ARMS.value or [a["key"] for a in ARMS]
  unknown = [k for k in keys if k not in by_key]
  if unknown:
    raise app.UsageError(f"--arms: unknown arm(s) {unknown}; choose from {list(by_key)}.")
  arms = [by_key[k] for k in keys]
  os.makedirs(root, exist_ok=True)
  if _PHASE.value in ("all", "train", "eval"):
    for arm in arms:
      if _PHASE.value in ("all", "train"):
        _train_stage(PRE, root, data_dir)
        for stage in arm["stages"]:
          _train_stage(stage, root, data_dir)
      if _PHASE.value in ("all", "eval"):
        _evaluate(arm, root, data_dir)
  results = []
  for arm in arms:
    path = os.path.join(root, arm["stages"][-1]["workdir"], EVAL_FILE)
    if os.path.exists(path):
      with open(path) as f:
        results.append((arm["label"], json.load(f)["results"]))
  if results:
    print(tables(results), flush=True)
  else:
    print("[e2_compare] no evaluated arm yet.", flush=True)


if __name__ == "__main__":
  app.run(main)
