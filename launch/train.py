r"""Train a system from a config: `python -m launch.train --config=FILE[:ARG] --workdir=DIR`.

    python -m launch.train --config=configs/fashionclip.py:smoke --workdir=/tmp/fclip \
        --config.optimizer.lr=1e-4 --config.total_steps=500

Rerunning the same command resumes from the newest checkpoint in --workdir. SIGTERM saves a
checkpoint and exits 0. An override of a key that does not exist ends in one line naming the key
and the closest one that does (fashion_jax/cli.py: "did you mean 'lr'?"); values that exist but are
invalid, and evaluations the dataset cannot serve, are rejected by fashion_jax.train.config_check
before anything compiles.

Derived artefacts (FashionViL's pseudo-attributes and VQ codes, FashionBERT's cached patch
features): `python -m launch.prepare` with the same --config and --workdir makes them into
<workdir>/prepared/; this command fills the config keys from <workdir>/prepared/manifest.json
(fashion_jax/prepare/manifest.py `apply`; config.json records the filled paths). A needed one that
is missing ends in one line naming that launch.prepare command.

Multi-host: set `config.distributed=True` (or --config.distributed=True) and either run under a
cluster JAX auto-detects (Cloud TPU, SLURM, Open MPI) or give --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID).
Every process runs the same command with the same --workdir (a shared filesystem: orbax
checkpoints are written and read by all processes; config.json, TensorBoard events and this
script's summary come from process 0 only). Launchers: launch/tpu_pod.sh, launch/slurm_gpu.sbatch.

Bounded failure (fashion_jax/parallel/distributed.py): a dead process stops the others after
--heartbeat_timeout_s; a missing one fails start-up after --initialization_timeout_s; a failing
one waits --shutdown_timeout_s for the others at exit; a step (with its evaluations and save)
that makes no progress for --step_timeout_s stops the process with status 75.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fashion_jax import cli
from fashion_jax import configs
from fashion_jax.data import registry
from fashion_jax.prepare import manifest

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_s", 300, "Multi-host: seconds to wait for every process to connect.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "Multi-host: a process silent this long is declared dead and "
    "every other process terminates.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s", 300, "Multi-host: seconds a finishing or failing process waits for the "
    "others before terminating.")
_STEP_TIMEOUT = flags.DEFINE_integer(
    "step_timeout_s", 1800, "Multi-host: stop (exit status 75) when a step, with its evaluations "
    "and checkpoint save, makes no progress for this long (a hung collective); 0 = off. The "
    "first step (compilation) is not timed.")
flags.mark_flags_as_required(["config", "workdir"])


def prepared_config(config, workdir: str, argv, program: str = "launch.train"):
  """`config` with the artefacts of launch.prepare filled in (fashion_jax/prepare/manifest.py).

  A needed artefact that is missing, or was made for another dataset or config, ends in one
  line naming the launch.prepare command with this command's --config and --workdir flags (as
  does a dataset that is not built, with the launch.build_data command).
  """
  try:
    return manifest.apply(config, workdir, command=manifest.prepare_command(argv, workdir))
  except (manifest.PrepareError, FileNotFoundError) as e:
    raise cli.one_line_exit(program, e) from None


def main(argv, *, iterator_factory=None):
  """Entry point; `iterator_factory` lets a test or a user script supply its own input."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The prepared artefacts are looked up first (the dataset's files only, no device), so a
  # missing one is named before anything starts.
  config = prepared_config(_CONFIG.value, _WORKDIR.value, sys.argv)
  from fashion_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  multihost = distributed.initialize(
      bool(config.get("distributed", False)), coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      initialization_timeout_s=_INIT_TIMEOUT.value, heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
      shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value)
  import jax  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  with distributed.Watchdog(_STEP_TIMEOUT.value if multihost else 0) as watchdog:
    try:
      result = loop.train_and_evaluate(config, _WORKDIR.value, iterator_factory=iterator_factory,
                                       on_progress=watchdog.kick)
    # A bad value, named before anything compiled, or a dataset not built yet: one line.
    except (configs.ConfigError, registry.DatasetNotBuiltError) as e:
      raise cli.one_line_exit("launch.train", e) from None
  if jax.process_index() != 0:
    return
  step = int(result.state.step)
  if result.preempted:
    logging.warning("Preempted at step %d; checkpoint saved. Rerun the command to resume.", step)
  train = {k: v for k, v in result.metrics.items() if k.startswith("train/")}
  evals = {k: v for k, v in result.metrics.items() if not k.startswith("train/")}
  print(f"Finished at step {step}" + (" (preempted)" if result.preempted else "") + ": " +
        ", ".join(f"{k}={v:.4g}" for k, v in sorted(train.items())), flush=True)
  if evals:
    print(loop.format_table(evals), flush=True)
  if jax.process_index() == 0:  # Learning curves + eval metrics over steps, as one PNG.
    from fashion_jax.train import plots  # pylint: disable=g-import-not-at-top
    try:
      print("summary plot:", plots.write_summary(_WORKDIR.value), flush=True)
    except (FileNotFoundError, ValueError) as e:  # No event files / no scalars: say so, exit 0.
      logging.warning("No summary plot: %s", e)

if __name__ == "__main__":
  cli.run(main)
