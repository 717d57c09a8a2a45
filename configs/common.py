"""What every config repeats, written once: the trainer's sections and the probe splits.

Each function returns the plain dict a config assigns (`c.optimizer = common.adamw(...)`), so a
config file still reads top to bottom and every key stays overridable on the command line; each
config ends with `config_check.with_defaults(c)` (every trainer key present).
"""

# Splits of the synthetic catalog that probe generalisation (unseen brands / categories,
# improbable captions). Other catalogs (FashionGen, a shop's own image_text_folder) lack them:
# evaluations of them are `optional` (skipped with a note when the dataset has no such split).
PROBE_SPLITS = ("holdout_brand", "holdout_category", "improbable")

# Data parallel over every device (one host or a pod slice), and FSDP over the whole pod.
DATA_MESH = dict(data=-1, fsdp=1, tensor=1)
FSDP_MESH = dict(data=1, fsdp=-1, tensor=1)


def adamw(lr: float, weight_decay: float, *, warmup_steps: int, clip_norm: float | None = 1.0,
          betas: tuple[float, float] | None = None, eps: float | None = None,
          schedule: dict | None = None, **extra) -> dict:
  """The `optimizer` section: AdamW, `lr` peak, cosine decay after `warmup_steps` linear warmup
  (or `schedule`, e.g. dict(kind='step', boundaries=..., factor=...), which gets the warmup),
  global-norm clipping at `clip_norm` (None = off). `betas`/`eps` only when given (else optax's
  defaults, 0.9/0.999 and 1e-8). `extra`: freeze, lr_mults, param_bounds (train/optimizer.py)."""
  out = dict(name="adamw", lr=lr, weight_decay=weight_decay, clip_norm=clip_norm,
             schedule=dict(schedule or dict(kind="cosine"), warmup_steps=warmup_steps))
  if betas is not None:
    out.update(b1=betas[0], b2=betas[1])
  if eps is not None:
    out.update(eps=eps)
  out.update(extra)
  return out


def checkpoint(every_steps: int, keep: int, best_metric: str | None = None,
               best_mode: str = "max") -> dict:
  """The `checkpoint` section: save every `every_steps`, keep the newest `keep`, plus the best by
  `best_metric` (an evaluation metric name; None = no keep-best)."""
  return dict(every_steps=every_steps, keep=keep, best_metric=best_metric, best_mode=best_mode)


def retrieval(split: str, protocols: tuple[str, ...] = ("full",), every: int = 0,
              **kwargs) -> dict:
  """One `evals` entry: image-text retrieval on `split` (evaluate/retrieval.py); every=0 runs
  it at the end only."""
  return dict(type="retrieval", split=split, protocols=tuple(protocols), every=every, **kwargs)
