r"""FashionSigLIP comparisons on the synthetic catalog: every row and seed, one command, tables.

    python -m launch.build_data --dataset=synthetic_catalog/smoke --data_dir=/tmp/fsiglip_tfds
    nice -n 10 python -m experiments.fashionsiglip_compare --root=/tmp/fsiglip_cmp \
        --data_dir=/tmp/fsiglip_tfds --seeds=0,1 --steps=600 --parallel=2 \
        --out=/tmp/fsiglip_cmp/tables.md

The protocol (docs/results/fashionsiglip.md, "Comparisons"):
  1. Each row is configs/fashionsiglip.py:smoke with the overrides of ROWS (each one key away
     from the recipe, as its docstring lists), trained from scratch for --steps steps (the
     recipe's 600 by default; the recipe's 50 warmup steps scaled by steps / 600) with
     config.seed = each of --seeds.
     Every row sees the same batches in the same order for a given seed (the input pipeline is
     keyed by the seed only), so rows differ by their objective only.
  2. Training runs the evaluations the tables report, once, at the last step (they do not
     touch the train state, the data order or the rng): full-candidate retrieval on test and on
     the holdout splits (holdout_brand, holdout_category, improbable), and per-field query
     retrieval on test (one query per distinct colour / brand / category / sub-category value
     against every test image, evaluate/retrieval.py protocol 'field'). The recipe's periodic
     validation retrieval (it picks the best checkpoint, which the tables do not use) and its
     sample-100 / zero-shot evaluations are left out to save CPU time. Every Matryoshka width
     the run trains is evaluated (`...@d32`, the full width unsuffixed).
  3. The final metrics go to <root>/<row>_s<seed>.json (with the wall time and the load
     average); an existing json is not retrained, so rerunning the command resumes, and
     `--phase=table` only prints the tables from the jsons there.
  4. The tables give, per metric, the mean over seeds and [min, max]; the verdict column says
     "within noise" when the two rows' seed ranges overlap.
Each run is a child process (a fresh JAX per run); at most --parallel run at once, each with
single-threaded XLA CPU kernels (XLA_FLAGS, unless set): on a shared machine several small
processes share the cores better than several thread pools do. This changes no result beyond
float32 summation order.
"""

import ast
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string("root", "/tmp/fsiglip_cmp", "Directory holding every run.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/fsiglip_tfds",
                                "TFDS dir of synthetic_catalog/smoke.")
_ROWS = flags.DEFINE_list("rows", None, "Rows to run, in this order; default: all of ROWS.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "config.seed of each repetition.")
_STEPS = flags.DEFINE_integer("steps", 600, "config.total_steps of every run (all rows equal).")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Trainings at once.")
_PHASE = flags.DEFINE_enum("phase", "all", ["all", "table"], "Train missing runs, or tables only.")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown tables to this file.")
_RETRIES = flags.DEFINE_integer("retries", 2, "Restarts of a run that fails (e.g. killed by the "
                                "kernel's OOM killer on a shared machine).")
_TRAIN_ONE = flags.DEFINE_string("train_one", None, "Internal: train one run (a dict literal).")

CONFIG = "configs/fashionsiglip.py:smoke"
# The recipe's Matryoshka widths: 32, 64 and the full width (0), which is 128 for smoke.
FULL_WIDTH = 128
WIDTHS = (32, 64, FULL_WIDTH)

# key, label, overrides of config keys (each shown as --config.KEY=VALUE in the tables).
ROWS = [
    dict(key="recipe", label="recipe: sigmoid, multi-field, Matryoshka 32/64/128",
         overrides={}),
    dict(key="infonce", label="InfoNCE instead of sigmoid",
         overrides={"loss.kind": "infonce", "model.loss_blocks": 1}),
    dict(key="single_text", label="single text (title + description), no fields",
         overrides={"data.fields": (), "loss.field_weights": ()}),
    dict(key="bias_siglip", label="SigLIP's bias init -10 instead of log(1/64)",
         overrides={"loss.bias_init": -10.0}),
    dict(key="value_positives", label="field terms: equal field values are positives",
         overrides={"loss.field_positives": "value"}),
    dict(key="full_alone", label="no Matryoshka: the full width 128 alone",
         overrides={"model.matryoshka_dims": (), "loss.matryoshka_weights": ()}),
    dict(key="d64_alone", label="width 64 alone (the loss on the 64-prefix only)",
         overrides={"model.matryoshka_dims": (64,), "loss.matryoshka_weights": (1.0,)}),
    dict(key="d32_alone", label="width 32 alone (the loss on the 32-prefix only)",
         overrides={"model.matryoshka_dims": (32,), "loss.matryoshka_weights": (1.0,)}),
]
HOLDOUTS = ("holdout_brand", "holdout_category", "improbable")
QUERY_FIELDS = ("primary_color", "brand", "category", "subcategory")


def _evals() -> dict:
  """The evaluations the tables report (module docstring, step 2), all at the last step."""
  evals = {f"retrieval_{s}": dict(type="retrieval", split=s, protocols=("full",), every=0)
           for s in ("test",) + HOLDOUTS}
  evals.update({f"retrieval_test_{f}": dict(type="retrieval", split="test", protocols=("field",),
                                            query_field=f, every=0)
                for f in QUERY_FIELDS})
  return evals


def warmup_steps(steps: int) -> int:
  """The recipe's 50 warmup steps of 600, scaled to `steps` (at least 1)."""
  return max(1, round(50 * steps / 600))


def command(row: dict, seed: int, steps: int, workdir: str = "runs/ROW",
            data_dir: str = "DATA_DIR") -> str:
  """The launch.train command a user runs for `row` (the driver runs the same config inside
  a child process, with the evaluations of `_evals` instead of the recipe's)."""
  parts = ["python -m launch.train", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", f"--config.seed={seed}",
           f"--config.total_steps={steps}",
           f"--config.optimizer.schedule.warmup_steps={warmup_steps(steps)}"]
  for k, v in row["overrides"].items():
    parts.append(f"--config.{k}='{v!r}'" if isinstance(v, tuple) else f"--config.{k}={v}")
  return " ".join(parts)


# --------------------------------------------------------------------------------------------
# One training run (child process).
# --------------------------------------------------------------------------------------------
def _train_one(spec: dict) -> None:
  import importlib.util  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  path, _, arg = CONFIG.partition(":")
  mod_spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  for key, value in spec["overrides"].items():
    section, name = key.split(".")
    c[section][name] = value
  c.data.data_dir = spec["data_dir"]
  c.seed = spec["seed"]
  c.total_steps = spec["steps"]
  # The recipe's warmup (50 of 600 steps) scaled with the steps, so a shorter run keeps the
  # schedule's shape.
  c.optimizer.schedule.warmup_steps = warmup_steps(spec["steps"])
  c.checkpoint.every_steps = spec["steps"]
  c.checkpoint.best_metric = None
  c.evals = _evals()
  load0, t0 = os.getloadavg(), time.time()
  res = loop.train_and_evaluate(c, spec["workdir"])
  out = dict(spec=spec, metrics={k: float(v) for k, v in res.metrics.items()},
             wall_s=time.time() - t0, loadavg_before=load0, loadavg_after=os.getloadavg())
  with open(spec["result"] + ".tmp", "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
  os.replace(spec["result"] + ".tmp", spec["result"])
  print("FINISHED", spec["workdir"], flush=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def _result_path(root: str, key: str, seed: int) -> str:
  return os.path.join(root, f"{key}_s{seed}.json")


def _running_elsewhere(workdir: str) -> int | None:
  """The pid of a live process (e.g. an earlier driver's child) training `workdir`, if any."""
  needle = f"'workdir': {workdir!r}".encode()
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if needle in f.read():
          return int(pid)
    except OSError:
      continue
  return None


def _train_all(rows: list[dict], seeds: list[int], root: str, data_dir: str, steps: int,
               parallel: int, retries: int) -> None:
  """Runs every missing (row, seed), at most `parallel` at once, seed-major order; a failed run
  is restarted from scratch up to `retries` times, then reported at the end."""
  todo = []
  for seed in seeds:
    for row in rows:
      result = _result_path(root, row["key"], seed)
      if os.path.exists(result):
        with open(result) as f:
          done = json.load(f)["spec"]
        if done["steps"] != steps:
          raise ValueError(f"{result} was trained for {done['steps']} steps, not --steps="
                           f"{steps}: use another --root (rows must have equal steps).")
        continue
      workdir = os.path.join(root, f"{row['key']}_s{seed}")
      todo.append(dict(key=row["key"], overrides=row["overrides"], seed=seed, steps=steps,
                       data_dir=data_dir, workdir=workdir, result=result))
  running, failed, tries = [], [], {}
  while todo or running:
    while todo and len(running) < parallel:
      spec = todo.pop(0)
      pid = _running_elsewhere(spec["workdir"])
      if pid is not None:  # Wait for it instead of starting a second copy.
        print(f"[fashionsiglip_compare] {spec['key']} seed {spec['seed']} is running (pid "
              f"{pid}): waiting for it.", flush=True)
        running.append((pid, None, spec, time.time()))
        continue
      if os.path.isdir(spec["workdir"]):  # An interrupted run: start it again from scratch.
        subprocess.check_call(["rm", "-rf", spec["workdir"]])
      log = spec["workdir"] + ".log"
      print(f"[fashionsiglip_compare] {spec['key']} seed {spec['seed']} > {log} "
            f"(load {os.getloadavg()})", flush=True)
      f = open(log, "w")  # pylint: disable=consider-using-with
      env = dict(os.environ)
      env.setdefault("XLA_FLAGS",
                     "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
      p = subprocess.Popen([sys.executable, "-m", "experiments.fashionsiglip_compare",
                            f"--train_one={spec!r}"], stdout=f, stderr=subprocess.STDOUT,
                           env=env)
      running.append((p, f, spec, time.time()))
    time.sleep(5)
    for item in list(running):
      p, f, spec, t0 = item
      if f is None:  # Another driver's child: done when its pid is gone.
        if os.path.exists(f"/proc/{p}"):
          continue
        code = 0
      else:
        if p.poll() is None:
          continue
        f.close()
        code = p.returncode
      running.remove(item)
      name = f"{spec['key']} seed {spec['seed']}"
      if code or not os.path.exists(spec["result"]):
        tries[name] = tries.get(name, 0) + 1
        print(f"[fashionsiglip_compare]   {name} failed (exit {code}, try {tries[name]}); see "
              f"{spec['workdir']}.log", flush=True)
        if tries[name] <= retries:
          todo.insert(0, spec)
        else:
          failed.append(name)
        continue
      print(f"[fashionsiglip_compare]   {name} done in {time.time() - t0:.0f} s (load "
            f"{os.getloadavg()})", flush=True)
  if failed:
    raise RuntimeError(f"Runs that failed {retries + 1} times: {failed}; their logs are in "
                       f"{root}.")


# --------------------------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------------------------
def _sfx(width: int) -> str:
  return "" if width == FULL_WIDTH else f"@d{width}"


def _values(runs: list[dict], key: str) -> list[float]:
  return [r[key] for r in runs if key in r]


def _cell(vals: list[float]) -> str:
  if not vals:
    return "-"
  mean = sum(vals) / len(vals)
  if len(vals) == 1:
    return f"{mean:.3f}"
  return f"{mean:.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def verdict(a: list[float], b: list[float], name_a: str, name_b: str) -> str:
  """'within noise' when the [min, max] ranges over seeds overlap, else which is higher; with
  fewer than 2 seeds on either side there is no noise estimate and no verdict."""
  if not a or not b:
    return "-"
  if len(a) < 2 or len(b) < 2:
    return f"no verdict (1 seed; {name_a if sum(a) / len(a) > sum(b) / len(b) else name_b} " \
           "higher)"
  if min(a) <= max(b) and min(b) <= max(a):
    return "within noise"
  return f"{name_a} higher" if min(a) > max(b) else f"{name_b} higher"


def _table(header: list[str], lines: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(line) + " |" for line in lines]
  return "\n".join(out)


def tables(results: dict[str, list[dict]], seeds: list[int], steps: int) -> str:
  """Markdown tables from {row key: [flat metrics of each seed]} (module docstring)."""
  by_key = {r["key"]: r for r in ROWS}
  n = max((len(v) for v in results.values()), default=0)
  parts = [f"Every cell: mean over {n} seed(s) {seeds} [min, max]; {steps} steps, batch 64, "
           f"synthetic_catalog/smoke. Full-candidate retrieval: every product of the split is "
           f"a candidate.", "Commands (one key away from the recipe):", ""]
  for key in results:
    parts.append(f"- `{key}`: `{command(by_key[key], seeds[0], steps)}`")
  parts.append("")

  # 1. Full-candidate retrieval on test, at the full width, and SumR on the holdouts.
  metrics = [("test t2i R@1", "test/full/t2i_R@1"), ("test t2i R@10", "test/full/t2i_R@10"),
             ("test i2t R@1", "test/full/i2t_R@1"), ("test i2t R@10", "test/full/i2t_R@10"),
             ("test SumR", "test/full/SumR")]
  metrics += [(f"{h} SumR", f"{h}/full/SumR") for h in HOLDOUTS]
  full_rows = [k for k in ("recipe", "infonce", "single_text", "bias_siglip", "value_positives",
                           "full_alone") if k in results]
  parts.append("Full-candidate retrieval at the full width (128), split per column:\n")
  parts.append(_table(["row"] + [m for m, _ in metrics],
                      [[by_key[k]["label"]] + [_cell(_values(results[k], key))
                                               for _, key in metrics] for k in full_rows]))
  # 2. Field queries on test.
  fmetrics = [(f"{f} {m}", f"test/field_{f}/{m}") for f in QUERY_FIELDS for m in ("P@10", "MRR")]
  parts.append("\nPer-field query retrieval on test (one query per distinct value of the "
               "field against every test image; full width):\n")
  parts.append(_table(["row"] + [m for m, _ in fmetrics],
                      [[by_key[k]["label"]] + [_cell(_values(results[k], key))
                                               for _, key in fmetrics] for k in full_rows]))
  # 3. Verdicts of the two comparisons at the full width.
  vlines = []
  for other, name in (("infonce", "InfoNCE"), ("single_text", "single text"),
                      ("bias_siglip", "bias init -10"),
                      ("value_positives", "value positives")):
    if "recipe" not in results or other not in results:
      continue
    for label, key in metrics + fmetrics:
      a, b = _values(results["recipe"], key), _values(results[other], key)
      vlines.append([f"recipe vs {name}", label, _cell(a), _cell(b),
                     verdict(a, b, "recipe", name)])
  if vlines:
    parts.append("\nVerdicts (ranges over seeds overlap = within noise):\n")
    parts.append(_table(["comparison", "metric", "recipe", "other", "verdict"], vlines))
  # 4. Matryoshka: each prefix of the recipe against the model trained at that width alone.
  alone = {32: "d32_alone", 64: "d64_alone", FULL_WIDTH: "full_alone"}
  mlines = []
  for width in WIDTHS:
    if "recipe" not in results or alone[width] not in results:
      continue
    for label, key in ([("test SumR", "test/full/SumR"), ("test t2i R@10", "test/full/t2i_R@10")]
                       + [(f"{h} SumR", f"{h}/full/SumR") for h in HOLDOUTS]
                       + [(f"{f} MRR", f"test/field_{f}/MRR") for f in QUERY_FIELDS]):
      a = _values(results["recipe"], key + _sfx(width))
      b = _values(results[alone[width]], key + _sfx(width))
      mlines.append([str(width), label, _cell(a), _cell(b),
                     verdict(a, b, "Matryoshka prefix", "alone")])
  if mlines:
    parts.append("\nMatryoshka: the recipe's prefix of each width (re-normalised) against a "
                 "model whose loss sees only that width:\n")
    parts.append(_table(["width", "metric", "Matryoshka prefix", "trained alone", "verdict"],
                        mlines))
  return "\n".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TRAIN_ONE.value:
    _train_one(ast.literal_eval(_TRAIN_ONE.value))
    return
  root, data_dir = os.path.abspath(_ROOT.value), os.path.abspath(_DATA_DIR.value)
  by_key = {r["key"]: r for r in ROWS}
  keys = _ROWS.value or [r["key"] for r in ROWS]
  unknown = [k for k in keys if k not in by_key]
  if unknown:
    raise app.UsageError(f"--rows: unknown row(s) {unknown}; choose from {list(by_key)}.")
  seeds = [int(s) for s in _SEEDS.value]
  if _PARALLEL.value < 1:
    raise app.UsageError(f"--parallel={_PARALLEL.value} must be >= 1.")
  os.makedirs(root, exist_ok=True)
  if _PHASE.value == "all":
    _train_all([by_key[k] for k in keys], seeds, root, data_dir, _STEPS.value, _PARALLEL.value,
               _RETRIES.value)
  results = {}
  for k in keys:
    runs = []
    for s in seeds:
      path = _result_path(root, k, s)
      if os.path.exists(path):
        with open(path) as f:
          runs.append(json.load(f)["metrics"])
    if runs:
      results[k] = runs
  text = tables(results, seeds, _STEPS.value) if results else "[fashionsiglip_compare] no run yet."
  print(text, flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
