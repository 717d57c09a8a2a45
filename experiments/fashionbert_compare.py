r"""FashionBERT: adaptive vs fixed loss weights at equal compute, one command, one markdown table.

COMMAND
  python -m launch.build_data --dataset=synthetic_catalog/smoke --data_dir=/tmp/fb_tfds
  python -m experiments.fashionbert_compare --data_dir=/tmp/fb_tfds --root=/tmp/fb_compare

Arms (same config, seed, data order, steps and evaluation; only the loss combination differs):
  adaptive_through  FashionBERT's adaptive weights with gradients through w (the reference's TF
                    graph; losses/weighting.py)
  adaptive_stop     the same weights treated as constants of the step (our default)
  equal             fixed w = 1/3 each
Each arm trains configs/fashionbert.py:smoke with the SCHEDULE below (the frozen patch
features, pooled pixels in smoke, precomputed once by fashion_jax/prepare/patches.py and read by
the pipeline, so the arms spend their compute on the BERT) and ends with the config's cross-encoder evaluation on the test split:
sample-100 (each query against its positive and 100 negatives of the same sub-category, both
directions, pessimistic ties), alignment accuracy on a balanced positive/negative set, ROC-AUC
over every scored pair, and pairs/s of the scoring loop. Arms run one after the other by default
(`--parallel` runs them at once: faster on an idle many-core host, but then the pairs/s of the
three share the machine).

Output: <root>/<arm>/ (the run's workdir) and <root>/<arm>/result.json; the table on stdout and
in <root>/table.md. Rerunning reuses finished arms (delete <root>/<arm> to redo one).
A run may be stopped early with SIGTERM (the trainer saves a checkpoint and exits 0); then
`--eval_only [--eval_queries=Q]` evaluates every arm's newest checkpoint the same way and prints
the table with each arm's step.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from fashion_jax.prepare import patches as patches_lib
from fashion_jax.train import loop
from fashion_jax.train import restore

ARMS = {
    "adaptive_through": dict(weighting="adaptive", weight_grad="through"),
    "adaptive_stop": dict(weighting="adaptive", weight_grad="stop"),
    "equal": dict(weighting="equal", weight_grad="stop"),
}

# The smoke schedule of the comparison (see configs/fashionbert.py:smoke for why these sizes).
SCHEDULE = {
    "model.grid": 4, "data.patch_mask.grid": 4, "data.patch_mask.count": 2,
    "data.max_len": 32, "objective.mlm_max_predictions": 8,
    "total_steps": 1000, "batch_size": 64,
    "optimizer.lr": 1e-3, "optimizer.schedule.warmup_steps": 50,
    "log_every_steps": 50,
}


def _set(config, dotted: str, value):
  node = config
  *path, last = dotted.split(".")
  for p in path:
    node = node[p]
  node[last] = value


def arm_config(arm: str, data_dir: str, patches: str, overrides: dict):
  """configs/fashionbert.py:smoke + SCHEDULE + the arm's weighting (+ user overrides)."""
  from configs import fashionbert as fb_config  # pylint: disable=g-import-not-at-top
  config = fb_config.get_config("smoke")
  config.data.data_dir = data_dir
  for k, v in {**SCHEDULE, **overrides}.items():
    _set(config, k, v)
  if patches:
    config.data.patch_features = patches
    config.data.augment = dict(crop_scale=(1.0, 1.0), flip=False)
  config.objective.update(ARMS[arm])
  config.checkpoint.every_steps = config.total_steps
  return config


def run_arm(arm: str, args, overrides: dict) -> dict:
  """Trains and evaluates one arm in this process; writes and returns its result.json."""
  config = arm_config(arm, args.data_dir, args.patches, overrides)
  workdir = os.path.join(args.root, arm)
  start = time.time()
  result = loop.train_and_evaluate(config, workdir)
  out = {"arm": arm, **ARMS[arm], "steps": int(config.total_steps),
         "wall_s": time.time() - start, "metrics": result.metrics,
         "overrides": {**SCHEDULE, **overrides}}
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def evaluate_arm(arm: str, args) -> dict:
  """Cross-encoder test evaluation of an arm's newest checkpoint (a run stopped early by
  SIGTERM, which saves one); writes and returns its result.json."""
  from fashion_jax.evaluate import cross_encoder  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.root, arm)
  system, params, step = restore.load_trained(workdir)
  start = time.time()
  evaluator = cross_encoder.Evaluator(system, system.config, None, split="test",
                                      num_queries=args.eval_queries, num_negatives=100,
                                      pair_batch=512)
  metrics = evaluator.run(params)
  out = {"arm": arm, **ARMS[arm], "steps": int(step), "eval_wall_s": time.time() - start,
         "wall_s": float("nan"), "metrics": metrics, "eval_queries": args.eval_queries}
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def table(results: list[dict]) -> str:
  """Markdown table of the arms' test sample-100 metrics."""
  cols = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "align_acc",
          "align_auc", "pairs_per_s"]
  head = ("| arm | weights | grad through w | steps | " + " | ".join(cols)
          + " | train TIA acc (last log) | wall s |")
  lines = [head, "|" + "---|" * (len(cols) + 6)]
  for r in results:
    m = r["metrics"]
    vals = []
    for c in cols:
      key = f"test/sample100/{c}"
      v = m.get(key, float("nan"))
      vals.append(f"{v:.0f}" if c == "pairs_per_s" else f"{100 * v:.1f}" if "R@" in c
                  else f"{v:.3f}")
    lines.append(f"| {r['arm']} | {r['weighting']} | "
                 f"{'yes' if r['weighting'] == 'adaptive' and r['weight_grad'] == 'through' else 'no'}"
                 f" | {r['steps']} | " + " | ".join(vals) + f" | {m.get('train/tia_acc', float('nan')):.3f} | "
                 f"{r['wall_s']:.0f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data_dir", required=True, help="TFDS dir holding synthetic_catalog/smoke.")
  ap.add_argument("--root", required=True, help="Output root (one workdir per arm).")
  ap.add_argument("--arms", default=",".join(ARMS), help=f"Comma list of {list(ARMS)}.")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="Extra config override for every arm (python literal), e.g. "
                  "--set total_steps=300.")
  ap.add_argument("--no_cache", action="store_true",
                  help="Run the patch CNN in every step instead of precomputed features.")
  ap.add_argument("--parallel", action="store_true", help="Run the arms at the same time.")
  ap.add_argument("--eval_only", action="store_true",
                  help="Only evaluate the arms' newest checkpoints (e.g. runs stopped early "
                  "with SIGTERM) with --eval_queries queries, then print the table.")
  ap.add_argument("--eval_queries", type=int, default=200)
  ap.add_argument("--only", default="", help=argparse.SUPPRESS)   # child mode: one arm
  ap.add_argument("--patches", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  import ast  # pylint: disable=g-import-not-at-top
  overrides = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE.")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  if args.only:
    if args.eval_only:
      evaluate_arm(args.only, args)
    else:
      run_arm(args.only, args, overrides)
    return
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}.")
  os.makedirs(args.root, exist_ok=True)

  patches = ""
  if args.eval_only:
    procs = []
    for arm in arms:
      p = subprocess.Popen(
          [sys.executable, "-m", "experiments.fashionbert_compare", "--data_dir", args.data_dir,
           "--root", args.root, "--eval_only", "--eval_queries", str(args.eval_queries),
           "--only", arm], stdout=open(os.path.join(args.root, f"{arm}.eval.log"), "w"),
          stderr=subprocess.STDOUT)
      procs.append((arm, p))
      if not args.parallel:
        p.wait()
  elif not args.no_cache:
    patches = os.path.join(args.root, "patches_train.npz")
    if not os.path.exists(patches):
      from fashion_jax import systems  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top
      config = arm_config(arms[0], args.data_dir, "", overrides)
      system = systems.get_system(config)
      out = patches_lib.precompute(
          system, patches_lib.cnn_variables(system, config), config,
          config.data.train_split, dtype="float32")
      np.savez(patches + ".tmp.npz", **out)
      os.replace(patches + ".tmp.npz", patches)
      print(f"precomputed {patches}: {out['features'].shape}", flush=True)

  todo = [a for a in arms if not os.path.exists(os.path.join(args.root, a, "result.json"))]
  if args.eval_only:
    todo = []
  else:
    procs = []
  base = [sys.executable, "-m", "experiments.fashionbert_compare", "--data_dir", args.data_dir,
          "--root", args.root, "--patches", patches] + [f"--set={s}" for s in args.set]
  for arm in todo:
    log = open(os.path.join(args.root, f"{arm}.log"), "w")
    p = subprocess.Popen(base + ["--only", arm], stdout=log, stderr=subprocess.STDOUT)
    procs.append((arm, p))
    if not args.parallel:
      p.wait()
  failed = [arm for arm, p in procs if p.wait() != 0]
  if failed:
    raise SystemExit(f"arms {failed} failed; see {args.root}/<arm>.log")
  results = []
  for arm in arms:
    with open(os.path.join(args.root, arm, "result.json")) as f:
      results.append(json.load(f))
  text = table(results)
  with open(os.path.join(args.root, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
