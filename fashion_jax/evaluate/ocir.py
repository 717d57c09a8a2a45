"""Outfit complementary item retrieval on Polyvore-format data: R@10 / R@30 / R@50.

Protocol (CSA-Net, as FashionViL reports it): each fill-in-the-blank question of `split`
(data.fitb) is a query: its outfit items (images + semantic categories) with the blank's
category b = the category of the right answer. The gallery is EVERY item of the split (data.name,
the `_items` config) whose category is b, minus the query's own items; the right answer's rank
under the category-conditioned outfit score (losses/fashionvil_downstream.ocir_scores) is
pessimistic (ties count against it, as evaluate/retrieval.py). R@K = mean over questions of
[rank <= K]; since every question counts once, each category weighs by its number of questions
(the "category-frequency weighted" average of the per-category recalls).
Also the plain FITB accuracy (the right answer scores strictly above the question's 3 others
under the same score; a tie is a miss).

Metrics: `{split}/ocir/R@10`, `R@30`, `R@50`, `fitb_acc`, `num_queries`, `mean_gallery`
(average gallery size, so a recall is read against the gallery it had).
"""

from collections.abc import Sequence

import jax
import numpy as np

from fashion_jax.data import downstream as data_lib
from fashion_jax.evaluate import batched
from fashion_jax.evaluate import common
from fashion_jax.evaluate import tgir as tgir_eval
from fashion_jax.losses import fashionvil_downstream as losses


def _read_fitb(b, split) -> list[dict]:
  ds = b.as_dataset(split=split, shuffle_files=False)
  out = []
  for ex in ds.as_numpy_iterator():
    out.append({"question": [x.decode() for x in ex["question_item_ids"]],
                "question_categories": [x.decode() for x in ex["question_categories"]],
                "answers": [x.decode() for x in ex["answer_item_ids"]],
                "answer_index": int(ex["answer_index"])})
  return out


class Evaluator:
  """OCIR + FITB on one split of Polyvore-format data (see the module docstring)."""

  def __init__(self, system, config, mesh=None, *, split: str = "test",
               ks: Sequence[int] = (10, 30, 50), batch_size: int = 64, dataset_fn=None):
    if getattr(system, "task", None) != "ocir":
      raise ValueError("the ocir evaluator needs a fashionvil_downstream system with "
                       "objective.task='ocir'.")
    self.system, self.config, self.split, self.ks = system, config, split, tuple(ks)
    self.embedder = common.Embedder(system, mesh)
    self.batch_size, self.dataset_fn = batch_size, dataset_fn
    self.fitb = data_lib.builder(config.data.fitb, config.data.data_dir)
    self._score = jax.jit(losses.ocir_scores_one_category)

  def run(self, params) -> dict[str, float]:
    data = self.embedder.embed_split(
        params, common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                    fields=("product_id", "category"),
                                    dataset_fn=self.dataset_fn),
        texts=False, fields=("product_id", "category"))
    emb, ids = data["image"], list(data["product_id"])
    vocab = self.system.categories
    cats = data_lib.category_index(data["category"], vocab)
    row = {a: i for i, a in enumerate(ids)}
    table = np.asarray(jax.device_get(self.system.ocir_table(params)))
    questions = _read_fitb(self.fitb, self.split)
    if not questions:
      raise ValueError(f"{self.config.data.fitb}:{self.split} has no questions.")
    m = max(len(q["question"]) for q in questions)
    by_cat = {}
    for q in questions:
      rows = [row[a] for a in q["question"]]
      answer = row[q["answers"][q["answer_index"]]]
      by_cat.setdefault(int(cats[answer]), []).append((rows, answer, [row[a] for a in q["answers"]]))
    ranks, fitb_hits, gallery_sizes = [], [], []
    for c, qs in sorted(by_cat.items()):
      gallery = np.flatnonzero(cats == c)
      items = np.zeros((len(qs), m, emb.shape[1]), np.float32)
      item_cats = np.zeros((len(qs), m), np.int32)
      item_mask = np.zeros((len(qs), m), bool)
      for i, (rows, _, _) in enumerate(qs):
        items[i, :len(rows)] = emb[rows]
        item_cats[i, :len(rows)] = cats[rows]
        item_mask[i, :len(rows)] = True
      # One matrix for the gallery and the four answers (answers of other categories included).
      answer_rows = np.asarray([a for _, _, answers in qs for a in answers])
      cand = np.concatenate([gallery, answer_rows])
      scores = np.asarray(self._score(items, item_cats, item_mask, emb[cand], c, table))
      g = len(gallery)
      pos = {r: j for j, r in enumerate(gallery)}
      target = np.asarray([pos[a] for _, a, _ in qs])
      own = np.zeros((len(qs), g), bool)
      for i, (rows, _, _) in enumerate(qs):
        own[i, [pos[r] for r in rows if r in pos]] = True
      gs = np.where(own, -np.inf, scores[:, :g])
      ranks.append(tgir_eval.target_ranks(gs, target))
      gallery_sizes += (g - own.sum(1)).tolist()
      start = g
      for i, (_, a, answers) in enumerate(qs):
        s = scores[i, start:start + len(answers)]
        start += len(answers)
        j = answers.index(a)  # A hit needs a strictly higher score than every wrong answer.
        fitb_hits.append(bool(np.all(np.delete(s, j) < s[j])))
    ranks = np.concatenate(ranks)
    prefix = f"{self.split}/ocir"
    out = {f"{prefix}/{k}": v for k, v in tgir_eval.recall_at(ranks, self.ks).items()}
    out[f"{prefix}/fitb_acc"] = float(np.mean(fitb_hits))
    out[f"{prefix}/num_queries"] = float(len(ranks))
    out[f"{prefix}/mean_gallery"] = float(np.mean(gallery_sizes))
    return out
