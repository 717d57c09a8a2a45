"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when configured.

Must run before the first JAX computation of the process (launch/train.py calls it right after
flag parsing). `config.distributed` (bool) switches it on. The coordinator address, the number
of processes and this process's id come, in order of precedence, from the arguments (the
launchers' `--coordinator_address/--num_processes/--process_id` flags), then from the
environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; when none is
given at all, `jax.distributed.initialize()` auto-detects the cluster (Cloud TPU pods, SLURM,
Open MPI, Kubernetes JobSet).
"""

import os

from absl import logging
import jax

_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize(enabled: bool, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` if `enabled`; returns whether it did.

  Raises:
    ValueError naming the values when only some of the three settings are given (a partial
    set would make JAX fall back to auto-detection and hang waiting for absent peers).
  """
  if not enabled:
    return False
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  for key, env in _ENV.items():
    if given[key] is None and os.environ.get(env):
      given[key] = os.environ[env]
  if given["num_processes"] is not None:
    given["num_processes"] = int(given["num_processes"])
  if given["process_id"] is not None:
    given["process_id"] = int(given["process_id"])
  set_keys = [k for k, v in given.items() if v is not None]
  if set_keys and len(set_keys) != 3:
    raise ValueError(f"Distributed settings are incomplete: {given}; give all of "
                     f"coordinator_address, num_processes and process_id (flags or "
                     f"{', '.join(_ENV.values())}), or none for cluster auto-detection.")
  if set_keys:
    jax.distributed.initialize(**given)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
