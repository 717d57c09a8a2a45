"""Multi-process (multi-host) start-up and bounded failure detection.

Start-up: `initialize` calls `jax.distributed.initialize`; it must run before the first JAX
computation of the process (launch/train.py calls it right after flag parsing) and is switched
on by `config.distributed`. The coordinator address, the number of processes and this process's
id come, in order of precedence, from the arguments (launch/train.py's
`--coordinator_address/--num_processes/--process_id`), then from the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; when none is given at all, JAX
auto-detects the cluster:
  * Cloud TPU VMs (pods, multislice): from the TPU metadata; every host sees its local chips.
  * SLURM (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID set by
    `srun`): coordinator = first node of the step, port derived from the job id (or
    JAX_COORDINATOR_PORT). JAX then assumes ONE PROCESS PER GPU and makes GPU number
    SLURM_LOCALID the process's only device; for one process per node export
    JAX_LOCAL_DEVICE_IDS=0,1,...,7 (launch/slurm_gpu.sbatch shows both).
  * Open MPI (mpirun) and Kubernetes JobSet, likewise.
CPU processes (the multi-process test) exchange collectives through gloo over TCP: on jax 0.10.2
`jax_cpu_collectives_implementation` already defaults to 'gloo', so nothing is set here.

Failure detection (measured numbers: README "Multi-host"):
  * A process that dies (kill -9, OOM, lost host): the coordination service (on process 0)
    stops receiving its heartbeats and after `heartbeat_timeout_s` terminates every other
    process (SIGABRT, exit status 134) with "Terminating process because the JAX distributed
    service detected fatal errors ... The following tasks are unhealthy (stopped sending
    heartbeats)". When process 0 itself dies the others see its socket close and terminate
    at once with "... the leader task was preempted/died".
  * A process missing at start-up: `initialize` on the others raises after
    `initialization_timeout_s`.
  * A process that raises: at exit it waits up to `shutdown_timeout_s` at JAX's shutdown
    barrier for the others, then every process terminates ("Shutdown barrier has failed").
  * A process that is alive but never finishes a step (a collective whose peer hangs in its
    input pipeline, a deadlock): heartbeats keep flowing, so only a watchdog can tell.
    `Watchdog` exits the process with WATCHDOG_EXIT_CODE and a message naming the last
    progress when nothing has progressed for `timeout_s`; its exit then stops the peers as a
    death does.
"""

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

from absl import logging
import jax

_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}

# Exit status of a process stopped by the watchdog (distinct from Python's 1 and SIGABRT's 134).
WATCHDOG_EXIT_CODE = 75


def initialize(enabled: bool, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100,
               shutdown_timeout_s: int = 300) -> bool:
  """Calls `jax.distributed.initialize` if `enabled`; returns whether it did.

  Args:
    enabled: `config.distributed`.
    coordinator_address: 'host:port' of process 0 (None: environment or auto-detection).
    num_processes: the number of processes.
    process_id: this process's index in [0, num_processes).
    initialization_timeout_s: how long to wait for all processes to connect.
    heartbeat_timeout_s: a process silent this long is declared dead and the others stop.
    shutdown_timeout_s: how long a finishing (or failing) process waits for the others.

  Raises:
    ValueError naming the values when only some of the three settings are given (a partial
    set would make JAX fall back to auto-detection and wait for absent peers), or when a
    timeout is not positive.
  """
  if not enabled:
    return False
  timeouts = {"initialization_timeout_s": initialization_timeout_s,
              "heartbeat_timeout_s": heartbeat_timeout_s, "shutdown_timeout_s": shutdown_timeout_s}
  for name, value in timeouts.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive number of seconds.")
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
  if set_keys and not 0 <= given["process_id"] < given["num_processes"]:
    raise ValueError(f"process_id={given['process_id']} is not in [0, num_processes="
                     f"{given['num_processes']}).")
  jax.distributed.initialize(
      **{k: v for k, v in given.items() if v is not None},
      initialization_timeout=initialization_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s,
      shutdown_timeout_seconds=shutdown_timeout_s)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices; heartbeat "
               "timeout %d s, shutdown timeout %d s.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), heartbeat_timeout_s,
               shutdown_timeout_s)
  return True


def _exit_now(message: str) -> None:
  """Logs `message`, dumps every thread's Python stack to stderr, exits WATCHDOG_EXIT_CODE."""
  logging.error("%s", message)
  print(message, file=sys.stderr, flush=True)
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(WATCHDOG_EXIT_CODE)  # pylint: disable=protected-access


class Watchdog:
  """Stops the process when no progress is reported for `timeout_s` seconds.

  The trainer calls `kick(what)` after every step, evaluation and checkpoint save. The clock
  starts at the first kick, so the first step's compilation is not timed (a peer that dies
  meanwhile is caught by the heartbeat instead); afterwards `timeout_s` must exceed the
  slowest of a step, an evaluation and a save. On expiry `on_timeout(message)` is called from
  the watchdog's thread; the default logs the message (naming the process, the last progress
  and the silent time), dumps all Python stacks and exits with WATCHDOG_EXIT_CODE without
  running atexit handlers (JAX's shutdown barrier would wait for the hung peer).

  Use as a context manager; `timeout_s <= 0` disables it (kick does nothing).
  """

  def __init__(self, timeout_s: float, *,
               on_timeout: Callable[[str], None] = _exit_now):
    self.timeout_s = float(timeout_s)
    self._on_timeout = on_timeout
    self._cond = threading.Condition()
    self._last = None          # (monotonic time, description) of the newest kick.
    self._closed = False
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="fashion_jax-watchdog",
                                      daemon=True)
      self._thread.start()

  def kick(self, what: str) -> None:
    """Reports progress (`what`, e.g. 'step 12', names it in the timeout message)."""
    if self._thread is None:
      return
    with self._cond:
      self._last = (time.monotonic(), what)
      self._cond.notify()

  def close(self) -> None:
    if self._thread is None:
      return
    with self._cond:
      self._closed = True
      self._cond.notify()
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _watch(self):
    message = None
    with self._cond:
      while not self._closed:
        if self._last is None:
          self._cond.wait()
          continue
        since, what = self._last
        left = since + self.timeout_s - time.monotonic()
        if left > 0:
          self._cond.wait(left)
          continue
        message = (f"Watchdog: process {jax.process_index()} of {jax.process_count()} made no "
                   f"progress for {self.timeout_s:g} s after {what}: another process is "
                   f"probably hung or dead (a collective never completed). Stopping this "
                   f"process with exit status {WATCHDOG_EXIT_CODE}; restart the job to resume "
                   f"from the newest checkpoint.")
        self._closed = True
        break
    if message is not None:
      self._on_timeout(message)
