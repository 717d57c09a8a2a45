"""Per-entity retrieval: a tag value's text <-> the product images carrying that value.

E2 (NeurIPS 2024) learns one image embedding per tag entity (brand, season, sub-category,
composition) aligned with the CLIP text embedding of the entity's tag string. The paper reports
only whole-product retrieval; this evaluator measures the entity embeddings directly, and the
global embedding on the same task, so a system without entity heads (CLIP-FT) gets the
comparable number. The protocol, decided here:

  Items      the split's products whose `field` is known ('' = unknown is left out of queries,
             gallery and positives), one image each (the pipeline's first view). N items.
  Queries    the V distinct values v of `field` among the items. Query text = the value string
             itself, tokenised exactly as the pipeline tokenises the training tags
             (data.tokenizer, data.max_len) and, for a system with `crop_tags` (E2), cut to its
             objective.tag_max_len as in training. Embedded by system.embed_texts.
  Positives  text v <-> every item whose value is v (so every item is the positive of exactly one
             text).
  Gallery embeddings, each scored against the SAME text embeddings (dot products = cosines):
    'global'  the global image embedding (system.embed_images; every two-tower system);
    'head'    the entity's own head (system.embed_image_views()[:, 1 + e], E2's entity e), only
              when the system has that entity (`system.entities`); an ablated entity or CLIP-FT
              reports 'global' only.
  Directions (ranks: retrieval.full_ranks, PESSIMISTIC ties as everywhere in fashion_jax):
    t2i  value text -> all N images. With r_(1) < ... < r_(P) the ranks of v's P positives,
           AP_v = (1 / P) sum_j j / r_(j),   mAP = mean_v AP_v   (macro: each value counts once,
         a brand with 3 products as much as one with 30), t2i_mAP_se = std_v(AP_v) / sqrt(V)
         (ddof 1). Also HITS@1 (a positive ranked first) and MRR (first positive), per value.
    i2t  image -> the V value texts, one positive: R@K for K in ks (R@1 is zero-shot
         classification accuracy with the bare value strings as class texts, no prompt), MRR;
         micro over the N images; i2t_R@1_se = sqrt(p (1 - p) / N).
  Chance levels (a ranking drawn uniformly at random), reported per field:
    chance_t2i_mAP = mean_v E[AP_v],  E[AP] = H_N / N + (P - 1)(N - H_N) / (N (N - 1))
      (H_N the N-th harmonic number: E[1 / r] = H_N / N for one positive, and each other
      positive is ahead of it at rank r with probability (r - 1) / (N - 1));
    chance_i2t_R@1 = 1 / V.

Metric names: `{split}/entity_{field}/{global,head}_{t2i_mAP, t2i_mAP_se, t2i_HITS@1, t2i_MRR,
i2t_R@K, i2t_R@1_se, i2t_MRR}` and `{split}/entity_{field}/{num_values, num_items,
chance_t2i_mAP, chance_i2t_R@1}`. One pass embeds the split for every field.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.evaluate import retrieval

DEFAULT_KS = (1, 5)


def average_precision(ranks: np.ndarray) -> np.ndarray:
  """Per-query AP from per-positive ranks.

  Args:
    ranks: int [Q, P] 1-based ranks of each query's positives, -1 in absent slots; the present
      ranks of a query must be distinct (full_ranks guarantees it).

  Returns:
    float64 [Q]: AP_q = (1 / P_q) sum_j j / r_(j), r_(j) the j-th smallest present rank.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 2:
    raise ValueError(f"ranks must be [Q, P], got shape {ranks.shape}.")
  present = ranks > 0
  num_pos = present.sum(1)
  if (num_pos == 0).any():
    raise ValueError(f"query {int(np.argmax(num_pos == 0))} has no positive rank.")
  r = np.sort(np.where(present, ranks, np.iinfo(np.int64).max), axis=1).astype(np.float64)
  j = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)[None, :]
  prec = np.where(j <= num_pos[:, None], j / r, 0.0)
  return prec.sum(1) / num_pos


def chance_average_precision(num_positives, num_items: int) -> np.ndarray:
  """Expected AP of a uniformly random ranking of `num_items` with P positives (module
  docstring): H_N / N + (P - 1)(N - H_N) / (N (N - 1)). Returns float64, shaped like P."""
  p = np.asarray(num_positives, np.float64)
  n = float(num_items)
  if n < 1 or (p < 1).any() or (p > n).any():
    raise ValueError(f"need 1 <= P <= N; got P={p.tolist()}, N={num_items}.")
  h = float(np.sum(1.0 / np.arange(1, int(n) + 1)))
  other = (p - 1) * (n - h) / (n * (n - 1)) if n > 1 else 0.0 * p
  return h / n + other


def entity_metrics(value_emb: np.ndarray, image_emb: np.ndarray, labels: np.ndarray, *,
                   ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024, mesh=None
                   ) -> dict[str, float]:
  """Both directions of the per-entity protocol for one gallery embedding.

  Args:
    value_emb: [V, D] text embedding of each value.
    image_emb: [N, D] image embeddings.
    labels: int [N], the value index (in [0, V)) of each image; every value needs an image.
    ks, chunk, mesh: cut-offs of i2t R@K; block size and mesh of retrieval.full_ranks.

  Returns:
    {'t2i_mAP', 't2i_mAP_se', 't2i_HITS@1', 't2i_MRR', 'i2t_R@K'..., 'i2t_R@1_se', 'i2t_MRR'}.
  """
  labels = np.asarray(labels)
  v = value_emb.shape[0]
  if labels.shape != (image_emb.shape[0],) or labels.min() < 0 or labels.max() >= v:
    raise ValueError(f"labels {labels.shape} must be [{image_emb.shape[0]}] ints in [0, {v}).")
  positives = [np.flatnonzero(labels == i).tolist() for i in range(v)]
  r_t2i, r_i2t = retrieval.full_ranks(value_emb, image_emb, positives, query_chunk=chunk,
                                      gallery_chunk=chunk, mesh=mesh)
  ap = average_precision(r_t2i)
  t2i = retrieval.rank_metrics(r_t2i, (1,))
  i2t = retrieval.rank_metrics(r_i2t, ks)
  out = {"t2i_mAP": float(ap.mean()),
         "t2i_mAP_se": float(ap.std(ddof=1) / np.sqrt(v)) if v > 1 else 0.0,
         "t2i_HITS@1": t2i["HITS@1"], "t2i_MRR": t2i["MRR"]}
  out.update({f"i2t_R@{k}": i2t[f"R@{k}"] for k in ks})
  p1 = i2t["R@1"] if 1 in ks else float(np.mean(r_i2t[:, 0] == 1))
  out["i2t_R@1_se"] = float(np.sqrt(p1 * (1 - p1) / len(labels)))
  out["i2t_MRR"] = i2t["MRR"]
  return out


class _Views:
  """Adapter for common.Embedder: `embed_images` -> [B, 1 + E, P] (global, then entities)."""

  def __init__(self, system):
    self.embed_texts = system.embed_texts
    if hasattr(system, "embed_image_views"):
      self.embed_images = system.embed_image_views
    else:
      self.embed_images = lambda params, images: system.embed_images(params, images)[:, None]


class Evaluator:
  """Per-entity retrieval on one split for each of `fields` (module docstring).

  Built by the trainer as `Evaluator(system=, config=, mesh=, split=, fields=, ...)`.
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split, with every entity field non-empty somewhere (base.DataNeed)."""
    a = base.arguments(cls, kwargs)
    fields = (a["fields"],) if isinstance(a["fields"], str) else tuple(a["fields"])
    return [base.DataNeed(a["split"], fields=fields, labelled=fields, min_examples=2,
                          why="entity retrieval")]

  def __init__(self, system, config, mesh=None, *, split: str = "test",
               fields: Sequence[str] = ("brand",), ks: Sequence[int] = DEFAULT_KS,
               batch_size: int = 64, chunk: int = 1024,
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None):
    if isinstance(fields, str) or not fields:
      raise ValueError(f"fields={fields!r} must be a non-empty sequence of field names.")
    if not ks or min(ks) < 1:
      raise ValueError(f"ks={list(ks)} must be non-empty cut-offs >= 1.")
    self.system, self.config, self.mesh = system, config, mesh
    self.split, self.fields, self.ks = split, tuple(fields), tuple(ks)
    self.batch_size, self.chunk, self.dataset_fn = batch_size, chunk, dataset_fn
    self.entities = tuple(getattr(system, "entities", ()))
    self.embedder = common.Embedder(_Views(system), mesh)
    self.tokenize = common.tokenizer_from_config(config)

  def _query_tokens(self, values: Sequence[str]) -> np.ndarray:
    tokens = np.asarray(self.tokenize(list(values)), np.int32)
    crop = getattr(self.system, "crop_tags", None)
    return np.asarray(jax.device_get(crop(jnp.asarray(tokens)))) if crop else tokens

  def run(self, params) -> dict[str, float]:
    data = self.embedder.embed_split(
        params, common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                    fields=self.fields, dataset_fn=self.dataset_fn),
        texts=False, fields=self.fields)
    views = data["image"]  # [N, 1 + E, P]
    out = {}
    for field in self.fields:
      column = data[field].astype(str)
      known = column != ""
      if not known.any():
        raise ValueError(f"split {self.split!r} has no item with a known {field!r}: nothing "
                         "to retrieve.")
      values, labels = np.unique(column[known], return_inverse=True)
      value_emb = self.embedder.embed_tokens(params, self._query_tokens(values.tolist()))
      kinds = {"global": views[known, 0]}
      if field in self.entities:
        kinds["head"] = views[known, 1 + self.entities.index(field)]
      prefix = f"{self.split}/entity_{field}/"
      for kind, emb in kinds.items():
        m = entity_metrics(value_emb, emb, labels, ks=self.ks, chunk=self.chunk,
                           mesh=self.mesh)
        out.update({f"{prefix}{kind}_{k}": v for k, v in m.items()})
      counts = np.bincount(labels, minlength=len(values))
      out[f"{prefix}num_values"] = float(len(values))
      out[f"{prefix}num_items"] = float(len(labels))
      out[f"{prefix}chance_t2i_mAP"] = float(
          chance_average_precision(counts, len(labels)).mean())
      out[f"{prefix}chance_i2t_R@1"] = 1.0 / len(values)
    return out
