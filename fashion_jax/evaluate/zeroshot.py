"""Zero-shot classification with prompt templates (FashionCLIP's product classification).

The prompts and the class embeddings come from evaluate/prompts.py, the one definition shared
with `FashionCLIP.zero_shot_classify` (api.py) and the zero-shot figure: each label gets one text
per template (prompts.TEMPLATES by default), whose embeddings are averaged and re-normalised
(CLIP's prompt ensembling):
    c_k = normalize( sum_t normalize(embed_text(template_t.format(label_k))) )      [C, D]
An image is scored against every label as
    logits[n, k] = logit_scale * <normalize(image_n), c_k>                           [N, C]
and predicted as argmax_k. Deliberate difference from the reference FashionCLIP package, whose
zero-shot scoring normalises only one side of the dot product and drops the logit scale: we use
cosines of BOTH-sides L2-normalised embeddings and apply the model's logit scale. The scale does
not move the argmax (accuracy, F1) but it sets the predicted probabilities, hence the reported
negative log-likelihood, which is what a trained temperature is for.

Metrics: accuracy, weighted macro-F1 (FashionCLIP's "weighted macro F1", with the semantics of
sklearn's f1_score(average='weighted'): per-class F1 over the classes present in y_true or
y_pred, averaged with weights = true-class support; a class never predicted has F1 0), and the
mean negative log-likelihood of the true label under softmax(logits).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.evaluate import data_check
from fashion_jax.evaluate import prompts

DEFAULT_TEMPLATES = prompts.TEMPLATES


def per_class_f1(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
  """F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) (0 when the denominator is 0) and the support of k
  in y_true, over the classes present in y_true or y_pred (1-D label arrays, any dtype)."""
  y_true = np.asarray(y_true)
  y_pred = np.asarray(y_pred)
  if y_true.shape != y_pred.shape or y_true.ndim != 1 or y_true.size == 0:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D, "
                     "non-empty.")
  classes, inv = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
  t, p = inv[:len(y_true)], inv[len(y_true):]
  c = len(classes)
  tp = np.bincount(t[t == p], minlength=c).astype(np.float64)
  support = np.bincount(t, minlength=c).astype(np.float64)
  predicted = np.bincount(p, minlength=c).astype(np.float64)
  denom = support + predicted  # = 2 TP + FP + FN
  return np.divide(2 * tp, denom, out=np.zeros(c), where=denom > 0), support


def weighted_f1(y_true, y_pred) -> float:
  """sklearn f1_score(y_true, y_pred, average='weighted'): per_class_f1 weighted by support."""
  f1, support = per_class_f1(y_true, y_pred)
  return float(np.sum(f1 * support) / support.sum())


def classification_metrics(y_true: np.ndarray, logits: np.ndarray) -> dict[str, float]:
  """int [N] labels and float [N, C] logits -> {'acc', 'f1', 'nll'}."""
  logits = np.asarray(logits, np.float64)
  y_true = np.asarray(y_true)
  pred = logits.argmax(1)
  z = logits - logits.max(1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  return {"acc": float(np.mean(pred == y_true)),
          "f1": weighted_f1(y_true, pred),
          "nll": float(-np.mean(log_p[np.arange(len(y_true)), y_true]))}


def class_embeddings(embed_tokens: Callable[[np.ndarray], np.ndarray],
                     tokenize: Callable[[list[str]], np.ndarray], labels: Sequence[str],
                     templates: str | Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
  """Prompt-ensembled label embeddings, float32 [C, D] (prompts.class_embeddings).

  Args:
    embed_tokens: int32 [N, L] -> [N, D] (a system's text tower).
    tokenize: list[str] -> int32 [N, L].
    labels: the C label names.
    templates: format strings with exactly one '{}'.
  """
  return prompts.class_embeddings(lambda texts: embed_tokens(np.asarray(tokenize(texts))),
                                  labels, templates)


zeroshot_logits = prompts.logits


class Evaluator:
  """Zero-shot classification of a split's images into the values of one field.

  Metric names: `{split}/zeroshot/{field}_acc`, `_f1` (weighted macro-F1), `_nll`,
  `_num_classes`, `_num_examples`. Examples whose field is '' (unknown) are left out.

  Args (besides system/config/mesh):
    split, field: what to classify ('subcategory', 'category', ...).
    labels: the label set; None = the distinct non-empty values of the field in the split. With an
      explicit set every example's label must be in it.
    templates: prompt templates (averaged, see module docstring); default prompts.TEMPLATES,
      the prompts FashionCLIP.zero_shot_classify uses.
    batch_size: eval batch size per process.
    dataset_fn: replaces fashion_jax.data.pipeline.make_eval_dataset (tests).
    tokenizer: callable(list[str]) -> int32 [N, L]; None = config.data.tokenizer.
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split with the field, non-empty in at least one example (base.DataNeed)."""
    a = base.arguments(cls, kwargs)
    return [base.DataNeed(a["split"], fields=(a["field"],), labelled=(a["field"],),
                          why=f"zero-shot classification by {a['field']!r}")]

  def __init__(self, system, config, mesh=None, *, split: str = "test",
               field: str = "subcategory", labels: Sequence[str] | None = None,
               templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64,
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None,
               tokenizer: Callable[[list[str]], np.ndarray] | None = None):
    self.system, self.config = system, config
    self.split, self.field = split, field
    self.labels = list(labels) if labels is not None else None
    self.templates = prompts.check_templates(templates)
    self.batch_size = batch_size
    self.dataset_fn = dataset_fn
    self.tokenizer = tokenizer if tokenizer is not None else common.tokenizer_from_config(config)
    self.embedder = common.Embedder(system, mesh)

  def run(self, params) -> dict[str, float]:
    data = self.embedder.embed_split(
        params, common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                    fields=(self.field,), dataset_fn=self.dataset_fn),
        texts=False, fields=(self.field,))
    values = data[self.field]
    known = values != ""
    if not known.any():
      raise ValueError(self._no_labels(len(values)))
    labels = self.labels if self.labels is not None else sorted(set(values[known].tolist()))
    lookup = {l: k for k, l in enumerate(labels)}
    missing = sorted(set(values[known].tolist()) - set(lookup))
    if missing:
      raise ValueError(f"{self.split}/{self.field} has values {missing[:5]} outside the "
                       f"zero-shot labels {labels[:10]}.")
    y = np.asarray([lookup[v] for v in values[known]], np.int64)
    logits = prompts.logits(data["image"][known], self.class_embeddings(params, labels),
                            np.asarray(self.system.logit_scale(params)))
    m = classification_metrics(y, logits)
    prefix = f"{self.split}/zeroshot/{self.field}"
    out = {f"{prefix}_{k}": v for k, v in m.items()}
    out[f"{prefix}_num_classes"] = float(len(labels))
    out[f"{prefix}_num_examples"] = float(len(y))
    return out

  def class_embeddings(self, params, labels: Sequence[str]) -> np.ndarray:
    """float32 [C, D]: prompts.class_embeddings of `labels` with this evaluator's templates."""
    return prompts.class_embeddings(
        lambda texts: self.embedder.embed_tokens(params, np.asarray(self.tokenizer(texts))),
        labels, self.templates)

  def _no_labels(self, n: int) -> str:
    """The error for a split whose field is '' everywhere, naming the dataset's fields."""
    fields = ""
    if self.dataset_fn is None and self.config is not None and "data" in self.config:
      data = self.config.data
      found = data_check.fields_with_values(data.name, data.get("data_dir", ""), self.split)
      fields = f"; the fields with values in {data.name}:{self.split} are {found}"
    return (f"zero-shot on split {self.split!r}: field {self.field!r} is empty in all {n} "
            f"examples, so there is no label to classify into{fields}. Set the evaluation's "
            "`field` to one of them.")
