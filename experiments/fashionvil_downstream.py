r"""Fine-tune and evaluate FashionViL on its downstream tasks; print one row of metrics.

All tasks from one pretrained workdir (each in <workdir>/<task>, resumable):
    python -m experiments.fashionvil_downstream --pretrained=runs/fashionvil_smoke \
        --workdir=runs/fvil_ds --data_dir=/tmp/tfds [--variant=smoke] \
        [--tasks=retrieval,tgir,scr,ocir] [--steps=N]
    --pretrained= (empty) fine-tunes from the seeded random init: the "no pretraining" row.
One task with full config control:
    python -m experiments.fashionvil_downstream \
        --config=configs/fashionvil_downstream.py:tgir_smoke \
        --workdir=runs/fvil_tgir --config.init.checkpoint=runs/fashionvil_smoke \
        --config.data.data_dir=/tmp/tfds

The library (task configs, the row's columns and their definitions, row.json) is
fashion_jax/prepare/downstream.py. The row is written to <workdir>/row.json (with every metric)
and printed as a table row.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fashion_jax import cli
from fashion_jax.prepare import downstream
from fashion_jax.train import loop

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is not None:
    metrics = downstream.run_task(_CONFIG.value, _WORKDIR.value)
    label = _CONFIG.value.init.checkpoint or "none"
  else:
    if _PRETRAINED.value is None:
      raise app.UsageError("give --pretrained=WORKDIR (or --pretrained= for none) or --config.")
    _, metrics = downstream.run_all(_PRETRAINED.value, _WORKDIR.value, _TASKS.value,
                                    _VARIANT.value, _DATA_DIR.value, _STEPS.value)
    label = _PRETRAINED.value or "none"
  print(loop.format_table(metrics))
  print(downstream.format_row(label, downstream.row(metrics)), flush=True)


if __name__ == "__main__":
  cli.run(main)
