"""Category and sub-category recognition (FashionViL's CR / SCR): accuracy and macro-F1.

Each example of `split` (the product pipeline's eval batches: first view, resize + centre crop,
text = data.text_fields) is classified by system.classify(image, text) into one class per label
field (objective.label_fields); labels index the train split's vocabulary
(data/downstream.label_vocabulary). Examples whose value is '' are left out; values the train
split never saw stay in as errors (the model cannot predict them).

  acc       = mean(pred == y)
  macro_f1  = mean over the classes present in y or pred of F1_k = 2 TP_k / (2 TP_k + FP_k +
              FN_k), unweighted (sklearn f1_score(average='macro'); FashionViL's "MacroF").

Metrics: `{split}/cls/{field}_acc`, `{field}_macro_f1`, `{field}_num_examples`.
"""

from collections.abc import Sequence

import numpy as np

from fashion_jax.data import downstream as data_lib
from fashion_jax.evaluate import base
from fashion_jax.evaluate import batched
from fashion_jax.evaluate import common
from fashion_jax.evaluate import zeroshot


def macro_f1(y_true, y_pred) -> float:
  """Unweighted mean of per-class F1 over the classes in y_true or y_pred (1-D, any dtype)."""
  return float(np.mean(zeroshot.per_class_f1(y_true, y_pred)[0]))


class Evaluator:
  """(Sub)category recognition on one split (see the module docstring)."""

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split, with the label fields when given (else the system's: known only once built)."""
    a = base.arguments(cls, kwargs)
    fields = tuple(a["fields"] or ())
    return [base.DataNeed(a["split"], fields=fields, labelled=fields)]

  def __init__(self, system, config, mesh=None, *, split: str = "test",
               fields: Sequence[str] | None = None, batch_size: int = 64, dataset_fn=None):
    self.system, self.config, self.split = system, config, split
    self.fields = tuple(fields) if fields is not None else tuple(system.label_fields)
    unknown = [f for f in self.fields if f not in system.label_fields]
    if unknown or not self.fields:
      raise ValueError(f"fields={list(self.fields)} must be a non-empty subset of the "
                       f"system's objective.label_fields {list(system.label_fields)}.")
    self.apply = batched.BatchedApply(mesh, batch_size)
    self.batch_size, self.dataset_fn = batch_size, dataset_fn

  def run(self, params) -> dict[str, float]:
    columns = [self.system.label_fields.index(f) for f in self.fields]
    preds = {f: [] for f in self.fields}
    truth = {f: [] for f in self.fields}
    batches = common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                  fields=self.fields, dataset_fn=self.dataset_fn,
                                  single_process=True)
    for batch in batches:
      valid = np.asarray(batch["valid"], bool)
      if not valid.any():
        continue
      logits = self.apply.run(self.system.classify, params, batch["image"][valid],
                              batch["text"][valid], batch["text_mask"][valid])
      for f, col in zip(self.fields, columns):
        preds[f].append(np.argmax(logits[col], axis=-1))
        truth[f].append(np.asarray(batch[f], dtype=object)[valid])
    out = {}
    for f in self.fields:
      y_raw = np.concatenate(truth[f])
      known = y_raw != ""
      y = data_lib.labels_of(y_raw[known], self.system.vocabularies[f])
      pred = np.concatenate(preds[f])[known]
      prefix = f"{self.split}/cls/{f}"
      out[f"{prefix}_acc"] = float(np.mean(pred == y))
      out[f"{prefix}_macro_f1"] = macro_f1(y, pred)
      out[f"{prefix}_num_examples"] = float(len(y))
    return out
