"""Deterministic fault injection at named points of training, for the reliability tests.

    FASHION_JAX_FAULT="<action>:<point>@<step>[,<action>:<point>@<step>...]"

Unset (always, outside tests) every hook is a dictionary lookup that does nothing. Set, the
process injects the fault the first time it reaches `<point>` of global step `<step>`, so a test
can kill a run at an exact place instead of racing a timer.

Points (where the trainer calls `inject`):
  batch    loop.py: the batch of step N was taken from the iterator; the step has not run.
  step     loop.py: step N ran (state in memory is N); no evaluation or save of N yet.
  save     checkpoint.py: save of checkpoint N called; orbax has not started writing.
  write    checkpoint.py, orbax's background commit: every array of checkpoint N is in the
           temporary directory `N.orbax-checkpoint-tmp`; it has not been renamed to `N` (the
           moment a kill leaves a complete-looking but unfinalised checkpoint behind).
  saved    loop.py: checkpoint N is finalised on disk; step N+1 has not started.
  resave   checkpoint.py: the final checkpoint N, saved before its evaluations, was renamed aside
           to be saved again with their metrics; the new save has not started.
  restore  loop.py: checkpoint N was restored at start-up; no step has run.

Actions:
  kill       SIGKILL this process (kill -9: no handler, no cleanup, no flush).
  term       SIGTERM this process (a preemption notice; the trainer's handler runs).
  oserror    raise OSError(ENOSPC) at the point (a disk-full write error without a full disk).
  fill_disk  fill the filesystem holding the checkpoints (a file `<workdir>/checkpoints/disk_filler`
             takes every free byte) and continue: the next writes fail with a real ENOSPC.
"""

import errno
import os
import signal

from absl import logging

ENV = "FASHION_JAX_FAULT"
ACTIONS = ("kill", "term", "oserror", "fill_disk")
POINTS = ("batch", "step", "save", "write", "saved", "resave", "restore")


def _parse(spec: str) -> dict[tuple[str, int], str]:
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    try:
      action, rest = item.split(":", 1)
      point, step = rest.split("@", 1)
      step = int(step)
    except ValueError:
      raise ValueError(f"{ENV}={spec!r}: {item!r} is not <action>:<point>@<step>.") from None
    if action not in ACTIONS or point not in POINTS:
      raise ValueError(f"{ENV}={spec!r}: {item!r} needs an action in {ACTIONS} and a point in "
                       f"{POINTS}.")
    out[(point, step)] = action
  return out


_done: set[tuple[str, int]] = set()


def armed(point: str, step: int) -> bool:
  """Whether a fault is pending at (`point`, `step`) in this process."""
  spec = os.environ.get(ENV)
  return bool(spec) and (point, step) in _parse(spec) and (point, step) not in _done


def inject(point: str, step: int, *, workdir: str | None = None) -> None:
  """Injects the fault configured for (`point`, `step`), once per process; else nothing."""
  if not armed(point, step):
    return
  _done.add((point, step))
  action = _parse(os.environ[ENV])[(point, step)]
  logging.warning("Fault injection (%s=%s): %s at %s of step %d.", ENV, os.environ[ENV],
                  action, point, step)
  if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  elif action == "term":
    os.kill(os.getpid(), signal.SIGTERM)
  elif action == "oserror":
    raise OSError(errno.ENOSPC, f"No space left on device (injected at {point} of step {step})")
  elif action == "fill_disk":
    if workdir is None:
      raise ValueError(f"fill_disk at {point} needs the workdir.")
    _fill_disk(os.path.join(workdir, "checkpoints", "disk_filler"))


def _fill_disk(path: str) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
  try:
    for size in (1 << 20, 1 << 12, 1):  # Big blocks, then whatever partial block still fits.
      block = b"\0" * size
      try:
        while True:
          os.write(fd, block)
      except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
          raise
  finally:
    os.close(fd)
