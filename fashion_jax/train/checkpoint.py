"""Checkpoints: orbax CheckpointManager over `<workdir>/checkpoints`.

Each checkpoint `<workdir>/checkpoints/<step>/` holds two items:
  state: the TrainState arrays (orbax's sharded array format; any mesh can restore it);
  data:  JSON {"step": step, "position": <the train iterator's `.position`>} so the input
         pipeline resumes where the saved state stopped consuming.

Retention: the newest `keep` checkpoints, plus (when `best_metric` is set) the single best one
by `best_metric` among the checkpoints saved with evaluation metrics (`best_mode` 'max'/'min').
Saves are asynchronous when `async` is set: `save` returns once the arrays are copied off the
devices; the write and the atomic rename of the temporary directory happen in the background.
A checkpoint whose write was interrupted (kill -9) stays a temporary directory, is never listed
as a step, and is deleted at the next start (`cleanup_tmp_directories`).

Restore onto any mesh: `restore` takes abstract arrays carrying the target shardings, and orbax
reads each shard where it belongs.
"""

from collections.abc import Mapping
import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
  """Save/restore of (TrainState, data position) with keep-last-N plus keep-best."""

  def __init__(self, workdir: str, *, keep: int, best_metric: str | None = None,
               best_mode: str = "max", use_async: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=use_async,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, data: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts saving `state` and the JSON-able `data` as checkpoint `step`.

    `metrics` (evaluation results) rank the checkpoint for keep-best.
    """
    self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                data=ocp.args.JsonSave(dict(data))),
        metrics=dict(metrics) if metrics else None, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state laid out as `abstract_state`'s shardings, data dict) of checkpoint `step`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
        data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"])

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the params of checkpoint `step` (no optimizer state is read), with the shardings
    of `abstract_params` (ShapeDtypeStructs carrying `.sharding`)."""
    item = {"params": abstract_params}
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    return out["state"]["params"]

  def state_metadata(self, step: int) -> Any:
    """The saved state as a nested dict of array metadata (.shape, .dtype); reads no arrays."""
    meta = self.manager.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
