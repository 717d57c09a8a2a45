r"""Train a system from a config: `python -m launch.train --config=FILE[:ARG] --workdir=DIR`.

    python -m launch.train --config=configs/fashionclip.py:smoke --workdir=/tmp/fclip \
        --config.optimizer.lr=1e-4 --config.total_steps=500

Rerunning the same command resumes from the newest checkpoint in --workdir. SIGTERM saves a
checkpoint and exits 0. Overrides of keys that do not exist are rejected by ml_collections'
config_flags with an error naming the key; values that exist but are invalid are rejected by
fashion_jax.train.config_check before anything compiles.

Multi-host: set `config.distributed=True` (or --config.distributed=True) and either run under a
cluster JAX auto-detects (Cloud TPU, SLURM, Open MPI) or give --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID).
Every process runs the same command with the same --workdir (a shared filesystem).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, *, iterator_factory=None):
  """Entry point; `iterator_factory` lets a test or a user script supply its own input."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Heavy imports here, so that flag errors come back in a fraction of a second.
  from fashion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  distributed.initialize(bool(config.get("distributed", False)),
                         coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(config, _WORKDIR.value, iterator_factory=iterator_factory)
  step = int(result.state.step)
  if result.preempted:
    logging.warning("Preempted at step %d; checkpoint saved. Rerun the command to resume.", step)
  train = {k: v for k, v in result.metrics.items() if k.startswith("train/")}
  evals = {k: v for k, v in result.metrics.items() if not k.startswith("train/")}
  print(f"Finished at step {step}" + (" (preempted)" if result.preempted else "") + ": " +
        ", ".join(f"{k}={v:.4g}" for k, v in sorted(train.items())), flush=True)
  if evals:
    print(loop.format_table(evals), flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # Learning curves + eval metrics over steps, as one PNG.
    from fashion_jax.train import plots  # pylint: disable=g-import-not-at-top
    try:
      print("summary plot:", plots.write_summary(_WORKDIR.value), flush=True)
    except (FileNotFoundError, ValueError) as e:  # No event files / no scalars: say so, exit 0.
      logging.warning("No summary plot: %s", e)

if __name__ == "__main__":
  app.run(main)
