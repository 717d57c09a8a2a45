r"""Evaluate a checkpoint: `python -m launch.evaluate --workdir=DIR [--config=FILE[:ARG]] [--step=N]`.

    python -m launch.evaluate --workdir=runs/fashionclip_smoke
    python -m launch.evaluate --config=configs/fashionclip.py:smoke --workdir=runs/fc --step=800 \
        --config.mesh.data=1 --config.mesh.fsdp=-1

Restores the params of the newest (or --step) checkpoint of --workdir onto the config's mesh
(any mesh: orbax reshards), runs every evaluator of `config.evals` (their `every` is ignored),
prints one table whose rows are (split, protocol) and whose columns are the metrics, and writes
the flat results to --output (default `<workdir>/eval_<step>.json`). Without --config the
workdir's config.json (written by training) is used; --evals=a,b restricts to some evaluators.
Evaluations are checked against the dataset first (config_check.check_eval_data): an optional
one the dataset cannot serve is skipped with a note, unless --evals names it; then, like a
required one, it ends in one line naming the evaluation, its split and what the dataset has.
A --config.KEY override of a key that does not exist ends in one line with the closest key.
The workdir is opened read-only (a training run may own it: its in-flight saves are left alone).
A workdir without checkpoints (or without the --step) ends with one line saying what is there
and exit code 1. With --config, the run's prepared artefacts (launch.prepare: FashionViL's
pseudo-attributes and VQ codes, ...) are filled in from <workdir>/prepared/manifest.json, as
launch.train does; config.json already holds their paths.
"""

import json
import os
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from fashion_jax import cli
from fashion_jax import evaluate
from fashion_jax import systems
from fashion_jax.checkpoint import manager as checkpoint
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.parallel import sharding
from fashion_jax.prepare import manifest
from fashion_jax.train import config_check
from fashion_jax.train import loop
from fashion_jax.train import restore

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:arg]; default: <workdir>/config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_EVALS = flags.DEFINE_list("evals", None, "Names of config.evals to run; default: all.")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON; default <workdir>/eval_<step>.json.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")

  def fail(error):  # A missing/unreadable workdir: one line, exit code 1, no traceback.
    raise cli.one_line_exit("launch.evaluate", error) from None

  workdir = _WORKDIR.value
  try:
    config = config_check.with_defaults(
        _CONFIG.value if _CONFIG.value is not None
        else checkpoint_restore.load_workdir_config(workdir))
  except FileNotFoundError as e:
    fail(e)
  try:  # A --config of a run whose artefacts launch.prepare made: fill them in (read-only).
    config = manifest.apply(config, workdir,
                            command=manifest.prepare_command(sys.argv, workdir))
  except (manifest.PrepareError, FileNotFoundError) as e:
    fail(e)
  names = _EVALS.value or list(config.evals.keys())
  unknown = [n for n in names if n not in config.evals]
  if unknown:
    raise app.UsageError(f"--evals names {unknown} not in config.evals {list(config.evals)}.")
  if not names:
    raise app.UsageError("config.evals is empty: nothing to evaluate.")
  with config.unlocked():
    config.evals = {n: dict(config.evals[n], **({"optional": False} if _EVALS.value else {}))
                    for n in names}
  try:  # Before restoring anything: a split the dataset lacks is named in one line.
    config = config_check.check_eval_data(config)
  except (config_check.ConfigError, FileNotFoundError) as e:
    fail(e)
  names = list(config.evals)
  if not names:
    fail(f"every evaluation was skipped: {config.data.name} lacks what each reads (see the "
         "warnings above).")
  try:  # Read-only: a training process may own the workdir (checkpoint/manager.py: readers).
    params, step, mesh = restore.load_params(config, workdir, step=_STEP.value)
  except (FileNotFoundError, checkpoint.CorruptCheckpointError) as e:
    fail(e)
  system = systems.get_system(config)
  rules = sharding.logical_rules(config.sharding_rules)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for evaluator in evaluate.from_config(config, system, mesh, names).values():
      results.update({k: float(v) for k, v in evaluator.run(params).items()})
  if jax.process_index() == 0:
    print(f"Checkpoint {step} of {workdir}:")
    print(loop.format_table(results), flush=True)
    output = _OUTPUT.value or os.path.join(workdir, f"eval_{step}.json")
    with open(output, "w") as f:
      json.dump({"step": step, "workdir": os.path.abspath(workdir), "results": results}, f,
                indent=2, sort_keys=True)
    print(f"Wrote {output}")


if __name__ == "__main__":
  cli.run(main)
