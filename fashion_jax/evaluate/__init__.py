"""Evaluators: one module per kind, each defining `Evaluator` (base.py states the interface).

`from_config(config, system, mesh, names=None)` builds the Evaluators of `config.evals` (all of
them, or `names`), found by module name like big_vision's: `type='retrieval'` is
fashion_jax.evaluate.retrieval, a dotted type is a full module path (`tests.toy_system`).
"""

from collections.abc import Iterable
import importlib
from typing import Any

from fashion_jax.evaluate import base


def from_config(config: Any, system: Any, mesh: Any,
                names: Iterable[str] | None = None) -> dict[str, base.Evaluator]:
  """name -> Evaluator(system=, config=, mesh=, **kwargs) of each entry of config.evals."""
  out = {}
  for name in (list(config.evals) if names is None else list(names)):
    spec = config.evals[name]
    evaluator_cls = importlib.import_module(base.module_name(spec["type"])).Evaluator
    out[name] = evaluator_cls(system=system, config=config, mesh=mesh,
                              **base.evaluator_kwargs(spec))
  return out
