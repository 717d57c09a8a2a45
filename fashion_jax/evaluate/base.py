"""The evaluator interface the trainer and launch/evaluate.py call.

`config.evals` maps a name to a ConfigDict with `type` (a module of fashion_jax.evaluate that
defines `Evaluator`), `every` (steps; 0 = only at the end / standalone) and its own keyword
arguments. The trainer builds `Evaluator(system=..., config=config, mesh=mesh, **kwargs)` and
calls `run(params)`, which returns flat metrics whose names always carry the split and the
protocol, e.g. `test/full/t2i_R@1`, `holdout_brand/sample100/i2t_R@10`, `test/zeroshot/subcategory_f1`.
"""

from typing import Any, Protocol


class Evaluator(Protocol):

  def run(self, params: Any) -> dict[str, float]:
    ...
