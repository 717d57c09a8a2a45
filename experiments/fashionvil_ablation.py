r"""FashionViL's pretraining-task ablation table (the paper's Table 5) at smoke scale.

Every row pretrains configs/fashionvil.py:<variant> with the same steps and batch (equal compute
per row: same number of steps; a switched-off task is never sampled), only the task weights
(`objective.tasks.X=0`) or `model.share=False` changed, then runs the downstream driver
(experiments/fashionvil_downstream.py: retrieval, TGIR, SCR, OCIR fine-tuned with the same steps
each) on it. Rows:
  none              no pretraining (downstream from the seeded random init)
  itc mlm mpfc itm mvc pac   each task alone
  itc+mlm+mpfc      the three basic tasks
  +itm, +mvc        then ITM, then MVC added
  all               all six (= +PAC)
  no_share          all six, separate text and fusion BERTs (model.share=False)

The VQ codes (MPFC) and pseudo-attributes (PAC) are prepared once and shared by every row
(--vq_codes / --attributes name existing files; empty = `python -m launch.prepare` with the
variant's config and --workdir=<workdir>/prep, which mines the attributes, trains the VQ
tokenizer and caches its codes; the rows read the paths from <workdir>/prep/prepared/manifest.json).

    python -m experiments.fashionvil_ablation --workdir=/tmp/vil_abl --data_dir=/tmp/tfds \
        --pretrain_steps=60 --downstream_steps=40 [--rows=none,itc,...] [--parallel=2] \
        [--attributes=PATH --vq_codes=PATH]

Each step is a subprocess (`python -m launch.prepare`, `python -m launch.train`,
`python -m experiments.fashionvil_downstream`)
logging to <workdir>/<row>.{pre,ds}.log; finished steps are skipped on a rerun (a pretraining
workdir with its final checkpoint, a downstream workdir with row.json). The table (markdown,
percent; columns as fashion_jax/prepare/downstream.py defines them) is printed and written to
<workdir>/table.md; rows not run are listed under it.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from fashion_jax.prepare import manifest

ALL_TASKS = ("itc", "mlm", "mpfc", "itm", "mvc", "pac")
# row name -> (label, tasks switched on (None = no pretraining), model.share)
ROWS = {
    "none": ("no pretraining", None, True),
    "itc": ("ITC", ("itc",), True),
    "mlm": ("MLM", ("mlm",), True),
    "mpfc": ("MPFC", ("mpfc",), True),
    "itm": ("ITM", ("itm",), True),
    "mvc": ("MVC", ("mvc",), True),
    "pac": ("PAC", ("pac",), True),
    "itc_mlm_mpfc": ("ITC+MLM+MPFC", ("itc", "mlm", "mpfc"), True),
    "plus_itm": ("+ITM", ("itc", "mlm", "mpfc", "itm"), True),
    "plus_mvc": ("+MVC", ("itc", "mlm", "mpfc", "itm", "mvc"), True),
    "all": ("+PAC (all six)", ALL_TASKS, True),
    "no_share": ("all six, no sharing", ALL_TASKS, False),
}
TABLE_ORDER = ("none", "itc", "mlm", "mpfc", "itm", "mvc", "pac", "itc_mlm_mpfc", "plus_itm",
               "plus_mvc", "all", "no_share")
# Run order when the budget is short: the rows that carry the paper's findings first.
PRIORITY = ("none", "itc", "itc_mlm_mpfc", "plus_itm", "plus_mvc", "all", "no_share", "mlm",
            "mpfc", "itm", "mvc", "pac")
COLUMNS = ("ITR", "TIR", "ITR_full", "TIR_full", "TGIR", "SCR", "OCIR", "Meta-sum")

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of every row.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (catalog, FashionIQ, Polyvore).")
_VARIANT = flags.DEFINE_enum("variant", "smoke", ["smoke", "base"], "Config variant.")
_ROWS = flags.DEFINE_list("rows", list(PRIORITY), "Rows to run, in this order.")
_PRE_STEPS = flags.DEFINE_integer("pretrain_steps", 60, "Pretraining steps of every row.")
_PRE_BATCH = flags.DEFINE_integer("pretrain_batch", 32, "Pretraining batch of every row.")
_DS_STEPS = flags.DEFINE_integer("downstream_steps", 40, "Fine-tuning steps of every task.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Rows run at the same time (1 or 2).")
_ATTRIBUTES = flags.DEFINE_string("attributes", "", "Pseudo-attribute file ('' = build).")
_VQ_CODES = flags.DEFINE_string("vq_codes", "", "Cached VQ codes .npz ('' = build).")
_NICE = flags.DEFINE_integer("nice", 10, "nice level of the subprocesses.")
flags.mark_flags_as_required(["workdir"])


def _run(cmd: list[str], log: str) -> None:
  """Runs cmd (niced) with stdout+stderr to `log`; raises naming the log on failure."""
  cmd = ["nice", "-n", str(_NICE.value)] + cmd
  t0 = time.time()
  with open(log, "w") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=_repo())
  if rc:
    raise RuntimeError(f"{' '.join(cmd[3:6])} ... exited {rc}; see {log}")
  print(f"  done in {time.time() - t0:.0f} s: {log}", flush=True)


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(workdir: str, data_dir: str, variant: str) -> tuple[str, str]:
  """(attributes, vq_codes) paths: the flags' files, or launch.prepare's under <workdir>/prep."""
  attributes, codes = _ATTRIBUTES.value, _VQ_CODES.value
  prep = os.path.join(workdir, "prep")
  os.makedirs(prep, exist_ok=True)
  only = [n for n, given in (("attributes", attributes), ("vq_codes", codes)) if not given]
  if only:  # Skips what an earlier run made.
    _run([sys.executable, "-m", "launch.prepare", f"--config=configs/fashionvil.py:{variant}",
          f"--workdir={prep}", f"--config.data.data_dir={data_dir}", f"--only={','.join(only)}"],
         os.path.join(prep, "prepare.log"))
    entries = manifest.load(prep)["artefacts"]
    attributes = attributes or manifest.artefact_path(prep, entries["attributes"])
    codes = codes or manifest.artefact_path(prep, entries["vq_codes"])
  for what, path in (("attributes", attributes), ("vq_codes", codes)):
    if not os.path.exists(path):
      raise FileNotFoundError(f"--{what}={path!r} does not exist.")
  return attributes, codes


def pretrain_command(row: str, workdir: str, data_dir: str, variant: str, steps: int,
                     batch: int, attributes: str, codes: str) -> list[str]:
  """launch.train command line of one ablation row's pretraining."""
  _, tasks, share = ROWS[row]
  cmd = [sys.executable, "-m", "launch.train", f"--config=configs/fashionvil.py:{variant}",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.data.attributes={attributes}", f"--config.data.vq_codes={codes}",
         f"--config.total_steps={steps}", f"--config.batch_size={batch}",
         f"--config.checkpoint.every_steps={steps}",
         f"--config.optimizer.schedule.warmup_steps={max(steps // 10, 1)}",
         "--config.evals.retrieval_validation.every=0"]
  cmd += [f"--config.objective.tasks.{t}=0" for t in ALL_TASKS if t not in tasks]
  if not share:
    cmd.append("--config.model.share=False")
  return cmd


def run_row(row: str, attributes: str, codes: str) -> dict:
  """Pretrains (unless 'none') and fine-tunes one row; returns its row.json."""
  root, data_dir, variant = _WORKDIR.value, _DATA_DIR.value, _VARIANT.value
  pre = ""
  if ROWS[row][1] is not None:
    pre = os.path.join(root, f"pre_{row}")
    final = os.path.join(pre, "checkpoints", str(_PRE_STEPS.value))
    if not os.path.isdir(final):
      print(f"[{row}] pretraining {_PRE_STEPS.value} steps", flush=True)
      _run(pretrain_command(row, pre, data_dir, variant, _PRE_STEPS.value, _PRE_BATCH.value,
                            attributes, codes), os.path.join(root, f"{row}.pre.log"))
  ds = os.path.join(root, f"ds_{row}")
  out = os.path.join(ds, "row.json")
  if not os.path.exists(out):
    print(f"[{row}] downstream {_DS_STEPS.value} steps per task", flush=True)
    _run([sys.executable, "-m", "experiments.fashionvil_downstream", f"--pretrained={pre}",
          f"--workdir={ds}", f"--data_dir={data_dir}", f"--variant={variant}",
          f"--steps={_DS_STEPS.value}"], os.path.join(root, f"{row}.ds.log"))
  with open(out) as f:
    return json.load(f)


def table(results: dict[str, dict]) -> str:
  """Markdown table of the rows run (TABLE_ORDER), then the rows not run."""
  lines = ["| pretraining tasks | " + " | ".join(COLUMNS) + " |",
           "|" + "---|" * (len(COLUMNS) + 1)]
  for row in TABLE_ORDER:
    if row in results:
      values = results[row]["row"]
      cells = [f"{values[c]:.2f}" if c in values else "-" for c in COLUMNS]
      lines.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")
  missing = [ROWS[r][0] for r in TABLE_ORDER if r not in results]
  if missing:
    lines.append("")
    lines.append("Not run: " + ", ".join(missing) + ".")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  bad = [r for r in _ROWS.value if r not in ROWS]
  if bad:
    raise app.UsageError(f"--rows: unknown {bad}; use {list(ROWS)}.")
  if _PARALLEL.value not in (1, 2):
    raise app.UsageError(f"--parallel={_PARALLEL.value}; use 1 or 2 (memory).")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  attributes, codes = prepare(_WORKDIR.value, _DATA_DIR.value, _VARIANT.value)
  results, failed = {}, {}
  with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
    futures = {pool.submit(run_row, r, attributes, codes): r for r in _ROWS.value}
    for fut in concurrent.futures.as_completed(futures):
      row = futures[fut]
      try:
        results[row] = fut.result()
        print(f"[{row}] {json.dumps(results[row]['row'])}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed[row] = str(e)
        print(f"[{row}] FAILED: {e}", flush=True)
      text = table(results)
      with open(os.path.join(_WORKDIR.value, "table.md"), "w") as f:
        f.write(text + "\n")
  print(text)
  for row, err in failed.items():
    print(f"FAILED {row}: {err}")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
