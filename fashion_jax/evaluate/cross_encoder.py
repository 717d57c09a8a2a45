"""Cross-encoder retrieval (FashionBERT): every (text, image) pair is one forward pass.

A cross-encoder has no embedding space: the score of a pair is the alignment head's
s(t, i) = logit_1 - logit_0 of the joint sequence [CLS, t, SEP, patches(i)]. Retrieval therefore
costs one BERT pass per candidate pair; this module makes those passes as cheap as the protocol
allows:

  * the frozen patch features of every image of the split are computed ONCE (CNN over the
    patches, `system.patch_features`) and the token ids kept; both become device tables
    (replicated over the mesh, [N, P, F] and [N, L]);
  * pairs are scored in batches of `pair_batch` (text index, image index); the index vectors are
    sharded over the mesh's batch axes and each device gathers its rows from the tables, so a
    pair batch is one jitted call with no host work and no image decoding; one shape for every
    batch (the last is padded), hence one compilation.

Protocols (names carry the protocol, as in retrieval.py):
  `sample<K>` (FashionBERT's): up to `num_queries` queries, each ranked against its positive and
    K negatives of the same sub-category (`retrieval.sample_candidates`: category, then anything,
    when the sub-category is short; the fill fractions are reported), both directions, pessimistic
    ties (`retrieval.candidate_ranks`). Metrics `{split}/sample<K>/{t2i,i2t}_{R@k,...}`, SumR.
  Alignment (TIA) on the same pairs: `align_acc` = accuracy of the head's argmax (score > 0) on a
    balanced set, each query's positive pair and its first same-sub-category negative (the
    paper's 1:1 alignment classification); `align_auc` = ROC-AUC of the score over EVERY scored
    pair of both directions (positives = column 0), threshold-free. `pairs_per_s` = scored
    pairs / wall time of the scoring loop (compilation excluded by a warm-up batch).
  `rerank`: the top-k of a two-tower model (e.g. FashionCLIP) over the WHOLE gallery, re-scored
    by the cross-encoder (`rerank_ranks`): ranks inside the top-k come from the cross-encoder,
    ranks beyond it stay the two-tower's. Metrics `{split}/full/...` (two-tower alone) and
    `{split}/full_rerank<k>/...`, both directions, so the gain is read off one table.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import scipy.stats

from fashion_jax.evaluate import base
from fashion_jax.evaluate import common
from fashion_jax.evaluate import retrieval
from fashion_jax.parallel import axes
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax import configs
from fashion_jax import systems


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve = P(score of a random positive > a random negative), ties 1/2.

  Computed from average ranks (Mann-Whitney U): (sum of positive ranks - n+(n+ + 1)/2) / (n+ n-).
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels, bool).reshape(-1)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"ROC-AUC needs positives and negatives; got {n_pos} and {n_neg}.")
  ranks = scipy.stats.rankdata(scores)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class _Towers:
  """Adapter for common.Embedder: 'images' -> patch features, 'texts' -> the token ids."""

  def __init__(self, system):
    self.system = system

  def embed_images(self, params, images):
    return self.system.patch_features(params, images)

  def embed_texts(self, params, tokens):
    return tokens


class PairScorer:
  """Scores (text, image) index pairs with a cross-encoder system, batched and sharded.

  `system` needs `patch_features(params, images) -> [B, P, F]` and
  `score_pairs(params, ids, text_mask, features) -> [B]` (systems/fashionbert.py).
  """

  def __init__(self, system, mesh: Mesh | None = None, *, pair_batch: int = 1024,
               pad_token_id: int = 0):
    if pair_batch < 1:
      raise ValueError(f"pair_batch={pair_batch} must be positive.")
    self.system, self.mesh, self.pad_token_id = system, mesh, pad_token_id
    if mesh is None:
      self.shards, self._pairs_sharding, self._replicated = 1, None, None
    else:
      batch_axes = tuple(a for a in axes.BATCH_AXES if a in mesh.axis_names)
      self.shards = math.prod(mesh.shape[a] for a in batch_axes)
      self._pairs_sharding = NamedSharding(mesh, P(batch_axes))
      self._replicated = NamedSharding(mesh, P())
    self.pair_batch = -(-pair_batch // self.shards) * self.shards
    pad = pad_token_id

    def score(params, tokens, features, text_idx, image_idx):
      ids = tokens[text_idx]
      return system.score_pairs(params, ids, ids != pad, features[image_idx])

    self._score = jax.jit(score, out_shardings=self._replicated)

  def _global(self, x: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def tables(self, tokens: np.ndarray, features: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Host [N, L] ids and [N, P, F] features (the same on every process) -> device tables."""
    return (self._global(np.asarray(tokens, np.int32), self._replicated),
            self._global(np.asarray(features, np.float32), self._replicated))

  def score(self, params, tables, text_idx: np.ndarray, image_idx: np.ndarray
            ) -> tuple[np.ndarray, float]:
    """Scores pairs (tokens[text_idx[j]], features[image_idx[j]]) -> (float32 [M], seconds).

    The seconds are the wall time of the scoring loop after one warm-up batch (compilation).
    """
    text_idx = np.asarray(text_idx, np.int32).reshape(-1)
    image_idx = np.asarray(image_idx, np.int32).reshape(-1)
    if text_idx.shape != image_idx.shape or text_idx.size == 0:
      raise ValueError(f"text_idx {text_idx.shape} and image_idx {image_idx.shape} must be "
                       "equal, non-empty [M].")
    tokens, features = tables
    m, b = text_idx.size, self.pair_batch
    b = min(b, -(-m // self.shards) * self.shards)
    n = -(-m // b)
    pad = n * b - m
    t = np.concatenate([text_idx, np.zeros(pad, np.int32)]).reshape(n, b)
    i = np.concatenate([image_idx, np.zeros(pad, np.int32)]).reshape(n, b)
    jax.block_until_ready(self._score(params, tokens, features,
                                      self._global(t[0], self._pairs_sharding),
                                      self._global(i[0], self._pairs_sharding)))
    start = time.perf_counter()
    outs = [self._score(params, tokens, features, self._global(t[j], self._pairs_sharding),
                        self._global(i[j], self._pairs_sharding)) for j in range(n)]
    outs = [np.asarray(jax.device_get(o)) for o in outs]
    seconds = time.perf_counter() - start
    return np.concatenate(outs)[:m].astype(np.float32), seconds


def sample_protocol_metrics(scorer: PairScorer, params, tables, candidates: np.ndarray, *,
                            ks: Sequence[int] = retrieval.DEFAULT_KS) -> dict[str, float]:
  """Cross-encoder sample-K retrieval + alignment metrics on one candidate draw.

  candidates int [Q, C] (column 0 = the query item, retrieval.sample_candidates); text q ranks
  images candidates[q], image q ranks texts candidates[q].
  """
  q, c = candidates.shape
  query = np.repeat(candidates[:, :1], c, axis=1)
  s_t2i, sec1 = scorer.score(params, tables, query, candidates)
  s_i2t, sec2 = scorer.score(params, tables, candidates, query)
  s_t2i, s_i2t = s_t2i.reshape(q, c), s_i2t.reshape(q, c)
  out = retrieval.both_directions(
      retrieval.rank_metrics(retrieval.candidate_ranks(s_t2i), ks),
      retrieval.rank_metrics(retrieval.candidate_ranks(s_i2t), ks))
  balanced = np.concatenate([s_t2i[:, 0] > 0, s_t2i[:, 1] <= 0])
  out["align_acc"] = float(balanced.mean())
  labels = np.zeros((q, c), bool)
  labels[:, 0] = True
  out["align_auc"] = roc_auc(np.concatenate([s_t2i, s_i2t]), np.concatenate([labels, labels]))
  out["pairs_per_s"] = 2 * q * c / (sec1 + sec2)
  return out


def rerank_ranks(two_tower_ranks: np.ndarray, topk_idx: np.ndarray, xenc_scores: np.ndarray,
                 positive: np.ndarray) -> np.ndarray:
  """Ranks after re-scoring each query's two-tower top-k with a cross-encoder.

  Args:
    two_tower_ranks: int [Q] rank of each query's positive in the two-tower's full ranking.
    topk_idx: int [Q, k] the two-tower's top-k gallery items.
    xenc_scores: float [Q, k] cross-encoder scores of those pairs.
    positive: int [Q] the positive gallery item of each query.

  Returns:
    int [Q]: 1 + #{top-k items with a cross-encoder score >= the positive's} (pessimistic ties)
    when the positive is in the top-k, else the two-tower rank (the list below k is unchanged).
  """
  hit = topk_idx == positive[:, None]
  inside = hit.any(1)
  pos_score = np.where(hit, xenc_scores, np.inf).min(1)
  ahead = ((xenc_scores >= pos_score[:, None]) & ~hit).sum(1)
  return np.where(inside, 1 + ahead, two_tower_ranks).astype(np.int64)


def load_two_tower(spec: str, workdir: str, data_overrides: Mapping[str, Any] | None = None):
  """(system, host params) of a trained two-tower run: its config spec ('name[:arg]' or
  'path/to/config.py[:arg]', fashion_jax.configs.get) and its workdir's newest checkpoint."""
  config = configs.get(spec)
  for k, v in (data_overrides or {}).items():
    config.data[k] = v
  params, _ = checkpoint_restore.read_params(workdir)
  return systems.get_system(config), params


class Evaluator:
  """Cross-encoder sample-K retrieval, alignment accuracy / AUC and optional two-tower re-ranking.

  Built by the trainer as `Evaluator(system=..., config=..., mesh=..., **config.evals[name])`.
  Each product contributes one image (first view) and one text, text i <-> image i.

  Args:
    split, batch_size, dataset_fn: which split and how it is read (common.eval_batches).
    num_queries, num_negatives, repeats, seed, group_field, fallback_field, ks: the sample
      protocol (retrieval.sample100_metrics's meaning; FashionBERT: 1000 queries, 100 negatives
      of the same sub-category, one draw). Metrics are averaged over the repeats.
    pair_batch: pairs per jitted call (rounded up to a multiple of the batch shards).
    rerank: None or {config: 'configs/fashionclip.py:smoke', workdir: ..., k: 10}: re-rank the
      two-tower model's full-gallery top-k (its data.data_dir is taken from this config).
  """

  @classmethod
  def data_needs(cls, **kwargs) -> list[base.DataNeed]:
    """The split with its group fields and num_negatives + 1 products (base.DataNeed)."""
    a = base.arguments(cls, kwargs)
    fields = tuple(f for f in (a["group_field"], a["fallback_field"]) if f)
    return [base.DataNeed(a["split"], fields=fields, min_examples=a["num_negatives"] + 1,
                          why=f"the sample{a['num_negatives']} protocol")]

  def __init__(self, system, config, mesh: Mesh | None = None, *, split: str = "test",
               num_queries: int = 1000, num_negatives: int = 100, repeats: int = 1,
               seed: int = 0, ks: Sequence[int] = retrieval.DEFAULT_KS, batch_size: int = 64,
               pair_batch: int = 1024, group_field: str = "subcategory",
               fallback_field: str | None = "category", rerank: Mapping[str, Any] | None = None,
               dataset_fn: Callable[..., Iterable[Mapping[str, np.ndarray]]] | None = None):
    if repeats < 1:
      raise ValueError(f"repeats={repeats} must be >= 1.")
    if rerank is not None:
      unknown = sorted(set(rerank) - {"config", "workdir", "k"})
      if unknown or not rerank.get("config") or not rerank.get("workdir"):
        raise ValueError(f"rerank={dict(rerank)} needs 'config' and 'workdir' (and optional "
                         f"'k'); unknown keys {unknown}.")
    self.system, self.config, self.mesh = system, config, mesh
    self.split, self.num_queries, self.num_negatives = split, num_queries, num_negatives
    self.repeats, self.seed, self.ks, self.batch_size = repeats, seed, tuple(ks), batch_size
    self.group_field, self.fallback_field = group_field, fallback_field
    self.rerank = dict(rerank) if rerank is not None else None
    self.dataset_fn = dataset_fn
    self.embedder = common.Embedder(_Towers(system), mesh)
    self.scorer = PairScorer(system, mesh, pair_batch=pair_batch,
                             pad_token_id=system.tokenizer.pad_token_id)

  def load_split(self, params) -> dict[str, np.ndarray]:
    """{'text': int [N, L], 'image': features [N, P, F], group fields, 'index'} of the split."""
    fields = tuple(f for f in (self.group_field, self.fallback_field) if f)
    return self.embedder.embed_split(
        params, common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                    fields=fields, dataset_fn=self.dataset_fn), fields=fields)

  def run(self, params) -> dict[str, float]:
    data = self.load_split(params)
    tables = self.scorer.tables(data["text"], data["image"])
    protocol = f"sample{self.num_negatives}"
    runs = []
    for r in range(self.repeats):
      cands, stats = retrieval.sample_candidates(
          data[self.group_field], data[self.fallback_field] if self.fallback_field else None,
          num_queries=self.num_queries, num_negatives=self.num_negatives,
          rng=np.random.default_rng([self.seed, r]))
      runs.append({**sample_protocol_metrics(self.scorer, params, tables, cands, ks=self.ks),
                   **stats})
    out = {f"{self.split}/{protocol}/{k}": float(np.mean([m[k] for m in runs]))
           for k in runs[0]}
    out[f"{self.split}/{protocol}/num_items"] = float(data["text"].shape[0])
    if self.rerank is not None:
      out.update(self._rerank(params, tables))
    return out

  def _rerank(self, params, tables) -> dict[str, float]:
    k = int(self.rerank.get("k", 10))
    tt_system, tt_params = load_two_tower(
        self.rerank["config"], self.rerank["workdir"],
        {"data_dir": self.config.data.data_dir, "name": self.config.data.name})
    tt = common.Embedder(tt_system, self.mesh).embed_split(
        tt_params, common.eval_batches(tt_system.config, self.split, batch_size=self.batch_size,
                                       dataset_fn=self.dataset_fn))
    n = tt["text"].shape[0]
    if n != tables[0].shape[0]:
      raise ValueError(f"The two-tower split has {n} items, the cross-encoder's "
                       f"{tables[0].shape[0]}.")
    if not 1 <= k <= n:
      raise ValueError(f"rerank k={k} must be in [1, {n}].")
    r_t2i, r_i2t = retrieval.full_ranks(tt["text"], tt["image"], mesh=self.mesh)
    r_t2i, r_i2t = r_t2i[:, 0], r_i2t[:, 0]
    positive = np.arange(n)
    out = {}
    full = retrieval.both_directions(
        retrieval.rank_metrics(r_t2i, self.ks), retrieval.rank_metrics(r_i2t, self.ks))
    out.update({f"{self.split}/full/{key}": v for key, v in full.items()})
    _, top_t2i = retrieval.topk_retrieve(tt["text"], tt["image"], k)
    _, top_i2t = retrieval.topk_retrieve(tt["image"], tt["text"], k)
    query = np.repeat(positive[:, None], k, axis=1)
    s_t2i, _ = self.scorer.score(params, tables, query, top_t2i)
    s_i2t, _ = self.scorer.score(params, tables, top_i2t, query)
    new_t2i = rerank_ranks(r_t2i, top_t2i, s_t2i.reshape(n, k), positive)
    new_i2t = rerank_ranks(r_i2t, top_i2t, s_i2t.reshape(n, k), positive)
    reranked = retrieval.both_directions(
        retrieval.rank_metrics(new_t2i, self.ks), retrieval.rank_metrics(new_i2t, self.ks))
    out.update({f"{self.split}/full_rerank{k}/{key}": v for key, v in reranked.items()})
    return out
