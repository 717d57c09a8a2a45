"""Retrieval metrics vs a brute-force float64 numpy reference; sample-100 sampler; the evaluator."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest

from fashion_jax.evaluate import retrieval


# ------------------------------------------------------------------------------------------------
# Independent reference: sort the whole gallery of each query (float64), read the positions.
# ------------------------------------------------------------------------------------------------
def reference_ranks(queries, gallery, positives):
  """Ranks by a full lexicographic sort per query: score desc; on ties negatives first
  (pessimistic), then positives in their listed order. positives: list of lists."""
  s = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
  width = max(len(p) for p in positives)
  ranks = np.full((len(positives), width), -1, np.int64)
  for q, pos in enumerate(positives):
    slot = np.full(s.shape[1], -1)  # -1: negative (sorts before positives on a tie)
    slot[list(pos)] = np.arange(len(pos))
    order = np.lexsort((slot, -s[q]))
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    for p, g in enumerate(pos):
      ranks[q, p] = where[g] + 1
  return ranks


def reference_metrics(ranks, ks=(1, 5, 10)):
  out = {}
  best = np.array([r[r > 0].min() for r in ranks], np.float64)
  for k in ks:
    out[f"R@{k}"] = np.mean([np.sum((r > 0) & (r <= k)) / np.sum(r > 0) for r in ranks])
    out[f"HITS@{k}"] = np.mean(best <= k)
  out["MRR"] = np.mean(1 / best)
  return out


def planted(n, d, noise, seed):
  """Texts and images with image i a noisy copy of text i, both L2-normalised."""
  rng = np.random.default_rng(seed)
  t = rng.standard_normal((n, d))
  i = t + noise * rng.standard_normal((n, d))
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  i /= np.linalg.norm(i, axis=1, keepdims=True)
  return t.astype(np.float32), i.astype(np.float32)


def inverse(positives, num_gallery):
  inv = [[] for _ in range(num_gallery)]
  for q, pos in enumerate(positives):
    for g in pos:
      inv[g].append(q)
  return inv


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1000, 1000), (16, 16), (7, 13), (32, 5)])
def test_full_ranks_match_bruteforce_with_duplicates(query_chunk, gallery_chunk):
  t, i = planted(150, 24, noise=1.5, seed=0)
  # Exact ties: duplicated vectors in other chunks (image 3 == image 90 == image 140, text 5 ==
  # text 77), and an image that equals its text.
  i[90] = i[3]
  i[140] = i[3]
  t[77] = t[5]
  i[20] = t[20]
  pos = [[q] for q in range(150)]
  ranks_t2i, ranks_i2t = retrieval.full_ranks(t, i, None, query_chunk=query_chunk,
                                              gallery_chunk=gallery_chunk)
  np.testing.assert_array_equal(ranks_t2i, reference_ranks(t, i, pos))
  np.testing.assert_array_equal(ranks_i2t, reference_ranks(i, t, pos))
  # The duplicate of a positive is counted against the query (pessimistic ties).
  assert ranks_t2i[3, 0] >= 3 and ranks_t2i[90, 0] >= 3


@pytest.mark.parametrize("chunks", [(64, 64), (5, 9)])
def test_exact_ties_quantized(chunks):
  # Entries in {-1, 0, 1}: every dot product is an exact small integer, so ties are plentiful
  # and identical in float32 and float64.
  rng = np.random.default_rng(1)
  t = rng.integers(-1, 2, (60, 4)).astype(np.float32)
  i = rng.integers(-1, 2, (60, 4)).astype(np.float32)
  pos = [[q] for q in range(60)]
  r_t2i, r_i2t = retrieval.full_ranks(t, i, None, query_chunk=chunks[0], gallery_chunk=chunks[1])
  np.testing.assert_array_equal(r_t2i, reference_ranks(t, i, pos))
  np.testing.assert_array_equal(r_i2t, reference_ranks(i, t, pos))


def test_collapsed_model_gets_worst_rank():
  # All embeddings equal: pessimistic ties put every positive last; optimistic ties would
  # report a perfect R@1.
  e = np.ones((30, 8), np.float32)
  m = retrieval.full_candidate_metrics(e, e, query_chunk=8, gallery_chunk=8)
  assert m["t2i_R@1"] == 0.0 and m["i2t_R@10"] == 0.0
  assert m["t2i_MRR"] == pytest.approx(1 / 30)
  assert m["t2i_MedR"] == 30


def test_multiple_positives_ranks_and_metrics():
  rng = np.random.default_rng(2)
  nq, ng, d = 40, 90, 16
  q = rng.standard_normal((nq, d)).astype(np.float32)
  g = rng.standard_normal((ng, d)).astype(np.float32)
  positives = [sorted(rng.choice(ng, rng.integers(1, 4), replace=False).tolist())
               for _ in range(nq)]
  # Make some positives strong and one a duplicate of another positive (a tie among positives).
  for a, pos in enumerate(positives):
    g[pos[0]] = q[a] + 0.3 * rng.standard_normal(d)
  positives[0] = positives[0][:1] + [ng - 1]
  g[ng - 1] = g[positives[0][0]]
  ranks_q, ranks_g = retrieval.full_ranks(q, g, positives, query_chunk=16, gallery_chunk=32)
  ref_q = reference_ranks(q, g, positives)
  np.testing.assert_array_equal(ranks_q[:, :ref_q.shape[1]], ref_q)
  assert (ranks_q[:, ref_q.shape[1]:] == -1).all()
  inv = inverse(positives, ng)
  has = [k for k in range(ng) if inv[k]]
  ref_g = reference_ranks(g[has], q, [inv[k] for k in has])
  got_g = ranks_g[has]
  np.testing.assert_array_equal(got_g[:, :ref_g.shape[1]], ref_g)
  assert (ranks_g[[k for k in range(ng) if not inv[k]]] == -1).all()
  # Tie between two positives of query 0: ranked one after the other, not both first.
  assert sorted(ranks_q[0, :2].tolist())[1] == sorted(ranks_q[0, :2].tolist())[0] + 1
  got = retrieval.rank_metrics(ranks_q)
  ref = reference_metrics(ref_q)
  for k, v in ref.items():
    assert got[k] == pytest.approx(v, abs=1e-12), k
  # With several positives recall differs from the hit rate.
  assert got["R@1"] < got["HITS@1"]


def test_one_positive_metrics_against_reference():
  t, i = planted(200, 32, noise=1.2, seed=3)
  m = retrieval.full_candidate_metrics(t, i, query_chunk=64, gallery_chunk=48)
  pos = [[k] for k in range(200)]
  ref_t2i = reference_metrics(reference_ranks(t, i, pos))
  ref_i2t = reference_metrics(reference_ranks(i, t, pos))
  for k in ("R@1", "R@5", "R@10", "MRR"):
    assert m[f"t2i_{k}"] == pytest.approx(ref_t2i[k], abs=1e-12)
    assert m[f"i2t_{k}"] == pytest.approx(ref_i2t[k], abs=1e-12)
  assert m["t2i_R@5"] == m["t2i_HITS@5"]
  assert m["SumR"] == pytest.approx(sum(ref[f"R@{k}"] for ref in (ref_t2i, ref_i2t)
                                        for k in (1, 5, 10)))
  assert 0.05 < m["t2i_R@1"] < 0.95  # The planted signal is neither trivial nor absent.


def test_sharded_equals_unsharded():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  t, i = planted(203, 16, noise=1.0, seed=4)
  i[100] = i[7]
  a = retrieval.full_ranks(t, i, None, query_chunk=16, gallery_chunk=32)
  b = retrieval.full_ranks(t, i, None, query_chunk=16, gallery_chunk=32, mesh=mesh)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("k,gallery_block", [(7, 131072), (7, 25), (23, 10)])
def test_topk_matches_stable_sort(k, gallery_block):
  # One block; blocks of 30 (25 rounded up to the chunk) with a ragged last one; blocks smaller
  # than k.
  rng = np.random.default_rng(5)
  q = rng.integers(-2, 3, (37, 6)).astype(np.float32)  # Many exact ties.
  g = rng.integers(-2, 3, (101, 6)).astype(np.float32)
  vals, idx = retrieval.topk_retrieve(q, g, k, query_chunk=16, gallery_chunk=10,
                                      gallery_block=gallery_block)
  s = q.astype(np.float64) @ g.T.astype(np.float64)
  ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(idx, ref)
  np.testing.assert_array_equal(vals, np.take_along_axis(s, ref, 1))


def test_topk_never_puts_the_whole_gallery_on_the_device(monkeypatch):
  # A 1M-item gallery must stay on the host: only blocks of gallery_block rows go to the device.
  put_rows = []
  real_put = jax.device_put

  def spy(x, *args, **kw):
    put_rows.append(np.shape(x)[0])
    return real_put(x, *args, **kw)

  monkeypatch.setattr(retrieval.jax, "device_put", spy)
  rng = np.random.default_rng(0)
  g = rng.normal(size=(1000, 8)).astype(np.float32)
  retrieval.topk_retrieve(g[:5], g, 3, gallery_chunk=50, gallery_block=200)
  assert max(put_rows) == 200, put_rows


def test_bad_inputs_raise():
  e = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="4 queries and 5 gallery"):
    retrieval.full_ranks(e, np.zeros((5, 3), np.float32))
  with pytest.raises(ValueError, match="positive index 9 outside"):
    retrieval.full_ranks(e, e, [[0], [1], [9], [3]])
  with pytest.raises(ValueError, match="query 1 has no positive"):
    retrieval.full_ranks(e, e, np.array([[0], [-1], [2], [3]]))
  with pytest.raises(ValueError, match="K=0"):
    retrieval.rank_metrics(np.array([1, 2]), ks=(0,))
  bad = e.copy()
  bad[2, 1] = np.nan
  bad[3, 0] = np.inf
  with pytest.raises(ValueError, match="gallery has 2 rows with NaN or inf .the first is row 2"):
    retrieval.full_ranks(e, bad)


# ------------------------------------------------------------------------------------------------
# Sample-100.
# ------------------------------------------------------------------------------------------------
def make_groups(rng, n):
  subcats = np.array([f"sub{k}" for k in rng.integers(0, 6, n)], dtype=object)
  cats = np.array([f"cat{int(s[3:]) // 2}" for s in subcats], dtype=object)
  return subcats, cats


def test_sampler_negatives_from_same_subcategory_never_positive():
  rng = np.random.default_rng(6)
  subcats, cats = make_groups(rng, 900)  # ~150 per sub-category: no fallback needed.
  cands, stats = retrieval.sample_candidates(subcats, cats, num_queries=300, num_negatives=100,
                                             rng=0)
  assert cands.shape == (300, 101)
  assert len(np.unique(cands[:, 0])) == 300  # Distinct queries.
  for row in cands:
    q, negs = row[0], row[1:]
    assert q not in negs
    assert len(np.unique(negs)) == 100
    assert (subcats[negs] == subcats[q]).all()
  assert stats == {"num_queries": 300.0, "fill_fallback_frac": 0.0, "fill_any_frac": 0.0}
  # Seeded: the same seed gives the same draw, another seed another.
  again, _ = retrieval.sample_candidates(subcats, cats, num_queries=300, rng=0)
  other, _ = retrieval.sample_candidates(subcats, cats, num_queries=300, rng=1)
  np.testing.assert_array_equal(cands, again)
  assert not np.array_equal(cands, other)


def test_sampler_fallback_order_and_counts():
  # sub-category 'small' has 5 items, its category 'c' 20 more, the rest elsewhere.
  subcats = np.array(["small"] * 5 + ["other"] * 20 + ["far"] * 200, dtype=object)
  cats = np.array(["c"] * 25 + ["d"] * 200, dtype=object)
  subcats[30] = ""  # Unknown sub-category: straight to the fallback.
  cands, stats = retrieval.sample_candidates(subcats, cats, num_queries=225, num_negatives=30,
                                             rng=7)
  for row in cands:
    q, negs = row[0], row[1:]
    assert q not in negs and len(np.unique(negs)) == 30
    if subcats[q] == "small":
      same = negs[subcats[negs] == "small"]
      assert len(same) == 4  # All other members of the sub-category ...
      assert (cats[negs] == "c").sum() == 24  # ... then all of the category ...
      assert (cats[negs] == "d").sum() == 6  # ... then anywhere.
    if subcats[q] == "other":  # 19 others in sub-category, 5 more in category, 6 anywhere.
      assert (subcats[negs] == "other").sum() == 19
  n_small = (subcats[cands[:, 0]] == "small").sum()
  n_other = (subcats[cands[:, 0]] == "other").sum()
  assert stats["fill_fallback_frac"] == pytest.approx((n_small + n_other + 1) / 225)
  assert stats["fill_any_frac"] == pytest.approx((n_small + n_other) / 225)
  with pytest.raises(ValueError, match="num_negatives=300 needs a split of at least 301"):
    retrieval.sample_candidates(subcats, cats, num_negatives=300)


def test_sample_metrics_against_reference():
  rng = np.random.default_rng(8)
  t, i = planted(400, 16, noise=1.5, seed=8)
  i[10] = i[11]  # A tie.
  subcats, cats = make_groups(rng, 400)
  cands, _ = retrieval.sample_candidates(subcats, cats, num_queries=120, num_negatives=40, rng=3)
  m = retrieval.sample_metrics(t, i, cands)
  for direction, (qe, ge) in {"t2i": (t, i), "i2t": (i, t)}.items():
    ranks = []
    for row in cands:
      ranks.append(reference_ranks(qe[row[:1]], ge[row], [[0]])[0, 0])
    ref = reference_metrics(np.asarray(ranks)[:, None])
    for k in ("R@1", "R@5", "R@10", "MRR"):
      assert m[f"{direction}_{k}"] == pytest.approx(ref[k], abs=1e-12)
  # Fewer candidates than the full gallery: sample recall >= full recall for this model.
  full = retrieval.full_candidate_metrics(t, i, query_chunk=128, gallery_chunk=128)
  assert m["t2i_R@1"] >= full["t2i_R@1"]


def test_sample100_repeats_average_draws():
  rng = np.random.default_rng(9)
  t, i = planted(300, 16, noise=1.5, seed=9)
  subcats, cats = make_groups(rng, 300)
  avg = retrieval.sample100_metrics(t, i, subcats, cats, num_queries=50, num_negatives=20,
                                    repeats=3, seed=4)
  draws = [retrieval.sample_metrics(t, i, retrieval.sample_candidates(
      subcats, cats, num_queries=50, num_negatives=20, rng=np.random.default_rng([4, r]))[0])
           for r in range(3)]
  assert avg["t2i_R@1"] == pytest.approx(np.mean([d["t2i_R@1"] for d in draws]))
  assert avg["num_queries"] == 50.0


# ------------------------------------------------------------------------------------------------
# The evaluator on a fake two-tower system and an injected dataset.
# ------------------------------------------------------------------------------------------------
class FakeTwoTower:
  """image -> normalised random projection of its pixels; text -> mean of token vectors."""

  def __init__(self, table, proj):
    self.table, self.proj = table, proj

  def embed_images(self, params, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0 @ params["proj"]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_texts(self, params, tokens):
    x = params["table"][tokens].mean(1)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def logit_scale(self, params):
    return jnp.float32(100.0)


def fake_split(n, seed=0):
  """Products whose text tokens are related to their pixels through the fake towers."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
  text = rng.integers(0, 50, (n, 5)).astype(np.int32)
  subcats, cats = make_groups(rng, n)
  return {"image": images, "text": text, "subcategory": subcats, "category": cats,
          "index": np.arange(n, dtype=np.int32)}


def fake_dataset_fn(data):
  """make_eval_dataset stand-in: batches in shuffled order, the last one padded."""

  def fn(config, split, *, batch_size, fields=()):
    del config
    assert split == "test"
    n = len(data["index"])
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, batch_size):
      rows = order[start:start + batch_size]
      pad = batch_size - len(rows)
      rows_p = np.concatenate([rows, np.repeat(rows[:1], pad)])
      batch = {k: data[k][rows_p] for k in ("image", "text", "index") + tuple(fields)}
      batch["valid"] = np.arange(batch_size) < len(rows)
      yield batch

  return fn


def test_evaluator_names_and_values():
  data = fake_split(230)
  rng = np.random.default_rng(0)
  params = {"proj": jnp.asarray(rng.standard_normal((48, 8)), jnp.float32),
            "table": jnp.asarray(rng.standard_normal((50, 8)), jnp.float32)}
  system = FakeTwoTower(None, None)
  ev = retrieval.Evaluator(system, config=None, split="test", batch_size=32, chunk=64,
                           num_queries=100, num_negatives=50, repeats=2,
                           dataset_fn=fake_dataset_fn(data))
  m = ev.run(params)
  img = np.asarray(system.embed_images(params, jnp.asarray(data["image"])))
  txt = np.asarray(system.embed_texts(params, jnp.asarray(data["text"])))
  full = retrieval.full_candidate_metrics(txt, img)
  samp = retrieval.sample100_metrics(txt, img, data["subcategory"], data["category"],
                                     num_queries=100, num_negatives=50, repeats=2)
  assert m["test/full/num_items"] == 230 and m["test/sample50/num_items"] == 230
  for k in ("t2i_R@1", "i2t_R@10", "t2i_MRR", "SumR"):
    assert m[f"test/full/{k}"] == pytest.approx(full[k], abs=1e-6)
    assert m[f"test/sample50/{k}"] == pytest.approx(samp[k], abs=1e-6)
  assert "test/sample50/fill_fallback_frac" in m
  with pytest.raises(ValueError, match="Unknown retrieval protocol"):
    retrieval.Evaluator(system, config=None, protocols=("full", "sample1000"))


def test_evaluator_on_mesh_matches_and_perfect_system_scores_one():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  data = fake_split(100)

  class Perfect(FakeTwoTower):
    """Both towers decode the product index planted in pixel [0, 0, 0] / token 0."""

    def embed_images(self, params, images):
      return params["table"][images[:, 0, 0, 0].astype(jnp.int32)]

    def embed_texts(self, params, tokens):
      return params["table"][tokens[:, 0]]

  data["image"][:, 0, 0, 0] = np.arange(100)
  data["text"][:, 0] = np.arange(100)
  table = np.random.default_rng(0).standard_normal((100, 8))
  params = {"table": jnp.asarray(table / np.linalg.norm(table, axis=1, keepdims=True),
                                 jnp.float32)}
  kw = dict(split="test", batch_size=16, chunk=16, num_queries=40, num_negatives=20, repeats=1,
            dataset_fn=fake_dataset_fn(data))
  m = retrieval.Evaluator(Perfect(None, None), None, mesh, **kw).run(params)
  assert m["test/full/t2i_R@1"] == 1.0 and m["test/full/i2t_R@1"] == 1.0
  assert m["test/sample20/t2i_R@1"] == 1.0
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    retrieval.Evaluator(Perfect(None, None), None, mesh, **{**kw, "batch_size": 12}).run(params)


# ------------------------------------------------------------------------------------------------
# The real input pipeline (fashion_jax.data.pipeline over a TFDS dataset built here).
# ------------------------------------------------------------------------------------------------
def test_evaluators_on_the_real_pipeline(tmp_path):
  import ml_collections
  from PIL import Image
  import tensorflow_datasets as tfds
  from fashion_jax.data.builders import image_text_folder
  from fashion_jax.evaluate import zeroshot

  colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
  rows = ["product_id,image,title,subcategory,category,split"]
  (tmp_path / "shop" / "img").mkdir(parents=True)
  for k in range(21):
    name = list(colours)[k % 3]
    img = np.full((20, 20, 3), colours[name], np.uint8)
    img[k % 20, :, :] = 255  # Every product's image differs.
    Image.fromarray(img).save(tmp_path / "shop" / "img" / f"p{k}.png")
    rows.append(f"p{k},img/p{k}.png,{name} shirt number {k},{name}s,tops,test")
  (tmp_path / "shop" / "catalog.csv").write_text("\n".join(rows) + "\n")
  builder = image_text_folder.ImageTextFolder(config="evaltest", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / "shop")))

  config = ml_collections.ConfigDict(dict(data=dict(
      name="image_text_folder/evaltest", data_dir=str(tmp_path / "tfds"), image_size=16,
      text_fields=("title",), tokenizer=dict(kind="clip", path=""), max_len=12)))

  class ColourSystem(FakeTwoTower):
    """Image -> its mean colour; text -> mean of random token vectors (3-d)."""

    def embed_images(self, params, images):
      x = images.astype(jnp.float32).mean((1, 2)) + 1.0
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  rng = np.random.default_rng(0)
  params = {"table": jnp.asarray(rng.standard_normal((50000, 3)), jnp.float32)}
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2, 1), ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)
  kw = dict(split="test", batch_size=8, chunk=8, num_queries=10, num_negatives=6, repeats=2)
  m1 = retrieval.Evaluator(ColourSystem(None, None), config, None, **kw).run(params)
  m8 = retrieval.Evaluator(ColourSystem(None, None), config, mesh, **kw).run(params)
  assert m1["test/full/num_items"] == 21  # 3 batches of 8, the last padded: padding dropped.
  assert m1 == pytest.approx(m8)
  assert m1["test/sample6/fill_fallback_frac"] == 0.0  # 7 per sub-category: 6 negatives fit.
  zs = zeroshot.Evaluator(ColourSystem(None, None), config, mesh, batch_size=8,
                          labels=["reds", "greens", "blues"]).run(params)
  assert zs["test/zeroshot/subcategory_num_examples"] == 21
  assert 0 <= zs["test/zeroshot/subcategory_f1"] <= 1
