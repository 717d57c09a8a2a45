"""Linear probe on frozen image embeddings (FashionCLIP Table 3, CLIP's linear-probe protocol).

A multinomial logistic regression p(y | x) = softmax(W x + b) is fitted on the L2-normalised
image embeddings x [N, D] of the TRAIN split and scored on the eval split. Choice: sklearn's
LogisticRegression (L-BFGS, L2 penalty C^-1 ||W||^2 / 2), the solver CLIP used for its probes; the
problem is convex and small (N x D floats on the host), so a jax solver would buy nothing.
The inverse regularisation C is picked from `cs` by weighted-F1 on a seeded `val_fraction` of the
train embeddings, then the probe is refitted on all of them with that C.
Eval labels the train split never saw are counted as errors (the probe cannot predict them).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.evaluate import zeroshot


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, *, cs: Sequence[float] = (0.1, 1, 10, 100),
              val_fraction: float = 0.2, max_iter: int = 1000, seed: int = 0
              ) -> tuple[LogisticRegression, float]:
  """Fits the probe; returns (model refitted on all of x_train, chosen C).

  Args:
    x_train: float [N, D]; y_train: [N] labels (any dtype).
    cs: candidate C values; one value skips the validation split.
    val_fraction: share of x_train held out to choose C.
  """
  x_train = np.asarray(x_train, np.float64)
  y_train = np.asarray(y_train)
  if len(np.unique(y_train)) < 2:
    raise ValueError(f"the linear probe needs >= 2 classes in the train labels, got "
                     f"{np.unique(y_train).tolist()}.")
  if not cs or min(cs) <= 0:
    raise ValueError(f"cs={list(cs)} must be non-empty and positive.")
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction} must be in (0, 1).")
  best_c = cs[0]
  if len(cs) > 1:
    perm = np.random.default_rng(seed).permutation(len(y_train))
    n_val = max(1, int(round(val_fraction * len(y_train))))
    val, tr = perm[:n_val], perm[n_val:]
    scores = []
    for c in cs:
      model = LogisticRegression(C=c, max_iter=max_iter).fit(x_train[tr], y_train[tr])
      scores.append(zeroshot.weighted_f1(y_train[val], model.predict(x_train[val])))
    best_c = cs[int(np.argmax(scores))]
  return LogisticRegression(C=best_c, max_iter=max_iter).fit(x_train, y_train), float(best_c)


def probe_metrics(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Accuracy and weighted F1 of `model` on (x [N, D], y [N])."""
  pred = model.predict(np.asarray(x, np.float64))
  y = np.asarray(y)
  return {"acc": float(np.mean(pred == y)), "f1": zeroshot.weighted_f1(y, pred)}


class Evaluator:
  """Linear probe: fit on `train_split`, report on `split`.

  Metric names: `{split}/linear_probe/{field}_acc`, `_f1`, `_C` (chosen C), `_num_train`.
  Examples whose field is '' (unknown) are left out of both splits.
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """Both splits, each with the field non-empty somewhere (base.DataNeed)."""
    a = base.arguments(cls, kwargs)
    f = a["field"]
    return [base.DataNeed(a["train_split"], arg="train_split", fields=(f,), labelled=(f,)),
            base.DataNeed(a["split"], fields=(f,), labelled=(f,))]

  def __init__(self, system, config, mesh=None, *, split: str = "test",
               train_split: str = "train", field: str = "subcategory",
               cs: Sequence[float] = (0.1, 1, 10, 100), val_fraction: float = 0.2,
               max_iter: int = 1000, seed: int = 0, batch_size: int = 64,
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None):
    self.system, self.config = system, config
    self.split, self.train_split, self.field = split, train_split, field
    self.cs, self.val_fraction = tuple(cs), val_fraction
    self.max_iter, self.seed = max_iter, seed
    self.batch_size, self.dataset_fn = batch_size, dataset_fn
    self.embedder = common.Embedder(system, mesh)

  def _embed(self, params, split):
    data = self.embedder.embed_split(
        params, common.eval_batches(self.config, split, batch_size=self.batch_size,
                                    fields=(self.field,), dataset_fn=self.dataset_fn),
        texts=False, fields=(self.field,))
    known = data[self.field] != ""
    return data["image"][known], data[self.field][known].astype(str)

  def run(self, params) -> dict[str, float]:
    x_tr, y_tr = self._embed(params, self.train_split)
    x_te, y_te = self._embed(params, self.split)
    model, c = fit_probe(x_tr, y_tr, cs=self.cs, val_fraction=self.val_fraction,
                         max_iter=self.max_iter, seed=self.seed)
    prefix = f"{self.split}/linear_probe/{self.field}"
    out = {f"{prefix}_{k}": v for k, v in probe_metrics(model, x_te, y_te).items()}
    out[f"{prefix}_C"] = c
    out[f"{prefix}_num_train"] = float(len(y_tr))
    return out
