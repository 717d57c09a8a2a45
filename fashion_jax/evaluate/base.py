"""The evaluator interface the trainer, launch/evaluate.py and the downstream driver call.

`config.evals` maps a name to a ConfigDict with `type` (a module of fashion_jax.evaluate that
defines `Evaluator`), `every` (steps; 0 = only at the end / standalone), `optional` (default
False: see below) and its own keyword arguments. The trainer builds
`Evaluator(system=..., config=config, mesh=mesh, **kwargs)` and calls `run(params)`, which returns
flat metrics whose names always carry the split and the protocol, e.g. `test/full/t2i_R@1`,
`holdout_brand/sample100/i2t_R@10`, `test/zeroshot/subcategory_f1`. `evaluate.from_config`
builds them all, the one place they are built.

Data an evaluation needs is checked when the config is checked, before anything compiles
(train/config_check.check_eval_data): an Evaluator class may define the classmethod
`data_needs(**kwargs) -> list[DataNeed]` (the same keyword arguments as its constructor); each
need is compared with config.data's dataset (evaluate/data_check.py). An evaluation that cannot
run there (a missing split or field, a label field that is empty in the whole split, a split too
small for the protocol) is a ConfigError naming the evaluation, the split and what the dataset
has; with `optional=True` it is dropped instead, with a logged note, so one config serves
datasets with and without, e.g., the synthetic catalog's probe splits.
"""

import inspect
from typing import Any, NamedTuple, Protocol


class Evaluator(Protocol):

  def run(self, params: Any) -> dict[str, float]:
    ...


class DataNeed(NamedTuple):
  """What an evaluation reads from config.data's dataset (module docstring).

  split: the split read; `arg` is the evaluator argument that names it (for messages).
  fields: text fields read (each must be a feature of the dataset).
  labelled: fields of which at least one example of the split must have a non-empty value.
  min_examples: a split with fewer examples is an error; `why` says what needs them.
  warn_below: a split with fewer examples is a logged warning; `why` says what suffers.
  """
  split: str
  arg: str = "split"
  fields: tuple[str, ...] = ()
  labelled: tuple[str, ...] = ()
  min_examples: int = 1
  warn_below: int = 0
  why: str = ""


# Keys of a config.evals entry read by the caller; every other key goes to the Evaluator.
SPEC_KEYS = ("type", "every", "optional")


def module_name(eval_type: str) -> str:
  """'retrieval' -> 'fashion_jax.evaluate.retrieval'; a dotted name is a full module path."""
  return eval_type if "." in eval_type else f"fashion_jax.evaluate.{eval_type}"


def evaluator_kwargs(spec: Any) -> dict[str, Any]:
  """The Evaluator's keyword arguments of a config.evals entry (every key but SPEC_KEYS)."""
  return {k: v for k, v in spec.items() if k not in SPEC_KEYS}


def arguments(evaluator_cls, kwargs: dict[str, Any]) -> dict[str, Any]:
  """The constructor arguments of `evaluator_cls` that `kwargs` give, defaults filled in.

  Raises TypeError naming an argument the constructor does not take.
  """
  sig = inspect.signature(evaluator_cls.__init__)
  bound = sig.bind_partial(None, **kwargs)  # `self`; system/config/mesh are not needed.
  bound.apply_defaults()
  out = dict(bound.arguments)
  out.pop(next(iter(sig.parameters)), None)
  return out
