"""An asyncio micro-batcher: concurrent requests share one model call.

Requests are submitted as (kind, payload) from the event loop. A collector task takes the first
waiting request, then keeps collecting for at most `max_wait_ms` or until `max_batch` requests
are held; the batch is split by kind, and each group goes to `run_batch(kind, payloads)` in ONE
worker thread (the model is never called from two threads at once, and the event loop stays free
to answer /healthz and to queue the next batch meanwhile). While a batch runs, new requests queue
up, so under load batches fill without any waiting.

`run_batch` returns one result per payload, in order. If it raises, each payload of the group is
retried alone, so that one bad request fails only itself (with its own exception).

`bucket(n, max_batch)`: the batch sizes a model sees are padded to powers of two (<= max_batch)
by the caller, so the jitted towers compile log2(max_batch) + 1 shapes, not max_batch.
"""

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def bucket(n: int, max_batch: int) -> int:
  """The smallest power of two >= n, capped at max(n, max_batch)."""
  if n < 1:
    raise ValueError(f"batch size n={n} must be >= 1.")
  b = 1
  while b < n:
    b *= 2
  return max(n, min(b, max_batch))


@dataclasses.dataclass
class Stats:
  """Counters: requests submitted, batches run (model calls), the largest batch."""
  requests: int = 0
  batches: int = 0
  largest: int = 0

  def as_dict(self) -> dict[str, float]:
    return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest,
            "mean_batch": self.requests / self.batches if self.batches else 0.0}


class MicroBatcher:
  """Collects concurrent requests into batches (module docstring).

  Args:
    run_batch: (kind, list of payloads) -> list of results (same length, same order); runs in
      the worker thread.
    max_batch: most requests per batch (>= 1).
    max_wait_ms: longest a request waits for others before its batch starts (>= 0).
  """

  def __init__(self, run_batch: Callable[[str, list[Any]], Sequence[Any]], *, max_batch: int = 16,
               max_wait_ms: float = 5.0):
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch} must be >= 1.")
    if max_wait_ms < 0:
      raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0.")
    self.run_batch = run_batch
    self.max_batch = int(max_batch)
    self.max_wait = max_wait_ms / 1000.0
    self.stats = Stats()
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None

  def start(self) -> None:
    """Starts the collector on the running event loop."""
    self._queue = asyncio.Queue()
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    self._task = asyncio.get_running_loop().create_task(self._collect())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
      self._task = None
    if self._executor is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None

  async def submit(self, kind: str, payload: Any) -> Any:
    """Queues one request; returns its result or raises its exception."""
    if self._queue is None:
      raise RuntimeError("MicroBatcher.submit before start().")
    future = asyncio.get_running_loop().create_future()
    self.stats.requests += 1
    await self._queue.put((kind, payload, future))
    return await future

  async def _gather(self) -> list[tuple[str, Any, asyncio.Future]]:
    batch = [await self._queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.max_wait
    while len(batch) < self.max_batch:
      if not self._queue.empty():
        batch.append(self._queue.get_nowait())
        continue
      remaining = deadline - loop.time()
      if remaining <= 0:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
      except asyncio.TimeoutError:
        break
    return batch

  async def _collect(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._gather()
      groups: dict[str, list[tuple[Any, asyncio.Future]]] = {}
      for kind, payload, future in batch:
        if not future.done():  # A caller that gave up (timeout, disconnect) is skipped.
          groups.setdefault(kind, []).append((payload, future))
      for kind, items in groups.items():
        payloads = [p for p, _ in items]
        self.stats.batches += 1
        self.stats.largest = max(self.stats.largest, len(items))
        try:
          results = await loop.run_in_executor(self._executor, self.run_batch, kind, payloads)
          if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} "
                               "requests.")
          outcomes = [(r, None) for r in results]
        except Exception as e:  # pylint: disable=broad-except
          # Alone, so that each request gets its own error.
          outcomes = [(None, e)] if len(items) == 1 else []
          for p in payloads if len(items) > 1 else ():
            self.stats.batches += 1
            try:
              outcomes.append(((await loop.run_in_executor(
                  self._executor, self.run_batch, kind, [p]))[0], None))
            except Exception as err:  # pylint: disable=broad-except
              outcomes.append((None, err))
        for (_, future), (result, error) in zip(items, outcomes):
          if future.done():
            continue
          if error is not None:
            future.set_exception(error)
          else:
            future.set_result(result)
