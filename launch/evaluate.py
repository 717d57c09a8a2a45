r"""Evaluate a checkpoint: `python -m launch.evaluate --workdir=DIR [--config=FILE[:ARG]] [--step=N]`.

    python -m launch.evaluate --workdir=runs/fashionclip_smoke
    python -m launch.evaluate --config=configs/fashionclip.py:smoke --workdir=runs/fc --step=800 \
        --config.mesh.data=1 --config.mesh.fsdp=-1

Restores the params of the newest (or --step) checkpoint of --workdir onto the config's mesh
(any mesh: orbax reshards), runs every evaluator of `config.evals` (their `every` is ignored),
prints one table whose rows are (split, protocol) and whose columns are the metrics, and writes
the flat results to --output (default `<workdir>/eval_<step>.json`). Without --config the
workdir's config.json (written by training) is used; --evals=a,b restricts to some evaluators.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

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
  import importlib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  from fashion_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import config_check  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  config = config_check.with_defaults(
      _CONFIG.value if _CONFIG.value is not None else loop.load_workdir_config(workdir))
  names = _EVALS.value or list(config.evals.keys())
  unknown = [n for n in names if n not in config.evals]
  if unknown:
    raise app.UsageError(f"--evals names {unknown} not in config.evals {list(config.evals)}.")
  if not names:
    raise app.UsageError("config.evals is empty: nothing to evaluate.")
  params, step, mesh = loop.load_params(config, workdir, step=_STEP.value)
  system = systems.get_system(config)
  rules = sharding.logical_rules(config.sharding_rules)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for name in names:
      spec = config.evals[name]
      module = importlib.import_module(config_check.evaluator_module_name(spec.type))
      kwargs = {k: v for k, v in spec.items() if k not in ("type", "every")}
      evaluator = module.Evaluator(system=system, config=config, mesh=mesh, **kwargs)
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
  app.run(main)
