"""Product search: vector indexes against brute force, and search against the evaluator.

- ExactIndex returns numpy float64 brute-force top-k; IVFIndex with nprobe = nlist is exact, its
  recall@10 against exact grows with nprobe and is high on clustered data; save/load keeps the
  results; bad k / nprobe / shapes raise errors naming the value; spherical k-means finds
  well-separated clusters.
- On a tiny trained FashionCLIP run: each test product's text as a search query finds its
  product in the top K exactly as often as the retrieval evaluator's full-candidate t2i R@K
  (the two code paths agree); a colour query's results have that colour more often than chance
  is not asserted here (4 training steps), the notebook test does that.
- `python -m launch.search query` prints the results and writes a PNG contact sheet.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fashion_jax.search import index as index_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixture(n, q, dim=32, clusters=40, sigma=0.6, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)

  def draw(m):
    x = centres[rng.integers(0, clusters, m)] + sigma * rng.normal(size=(m, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return draw(n), draw(q)


@pytest.fixture(scope="module")
def data():
  return mixture(3000, 200)


def brute_force(items, queries, k):
  s = queries.astype(np.float64) @ items.astype(np.float64).T
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_exact_index_equals_float64_brute_force(data):
  items, queries = data
  scores, ids = index_lib.ExactIndex(items).search(queries, 10)
  np.testing.assert_array_equal(ids, brute_force(items, queries, 10))
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, ids, 1), atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()


def test_ivf_recall_grows_with_nprobe_and_all_lists_is_exact(data, tmp_path):
  items, queries = data
  ivf = index_lib.IVFIndex.build(items, num_lists=40, seed=0)
  assert ivf.list_sizes().sum() == len(items)
  assert sorted(ivf.item_ids.tolist()) == list(range(len(items)))
  exact = brute_force(items, queries, 10)
  recalls = [index_lib.recall_at_k(ivf.search(queries, 10, nprobe=p)[1], exact)
             for p in (1, 2, 4, 8, 40)]
  assert all(a <= b + 0.01 for a, b in zip(recalls, recalls[1:])), recalls
  assert recalls[0] < 1.0 and recalls[3] >= 0.95, recalls
  scores, ids = ivf.search(queries, 10, nprobe=40)
  np.testing.assert_array_equal(ids, exact)
  # Save / load: the same answers, default nprobe kept.
  ivf.nprobe = 4
  ivf.save(str(tmp_path / "ivf.npz"))
  back = index_lib.load_index(str(tmp_path / "ivf.npz"))
  assert isinstance(back, index_lib.IVFIndex) and back.nprobe == 4
  for a, b in zip(ivf.search(queries, 5), back.search(queries, 5)):
    np.testing.assert_array_equal(a, b)


def test_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(1)
  centres = np.eye(8, dtype=np.float32)[:5] * 1.0
  labels = rng.integers(0, 5, 500)
  x = centres[labels] + 0.05 * rng.normal(size=(500, 8)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  c = index_lib.spherical_kmeans(x, 5, seed=0)
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
  assign = np.argmax(x @ c.T, axis=1)
  # One list per true cluster: the partition is the same up to renaming.
  assert len({(a, l) for a, l in zip(assign, labels)}) == 5


def test_bad_inputs_name_the_value(data):
  items, queries = data
  exact = index_lib.ExactIndex(items[:50])
  with pytest.raises(ValueError, match="k=51"):
    exact.search(queries, 51)
  with pytest.raises(ValueError, match="dimension 7"):
    exact.search(queries[:, :7], 3)
  ivf = index_lib.IVFIndex.build(items[:200], num_lists=8)
  with pytest.raises(ValueError, match="nprobe=9"):
    ivf.search(queries, 3, nprobe=9)
  with pytest.raises(ValueError, match=r"ivf index has no search parameter\(s\) \['efSearch'\]"):
    ivf.search(queries, 3, efSearch=9)
  with pytest.raises(ValueError, match="num_lists=300"):
    index_lib.spherical_kmeans(items[:200], 300)
  with pytest.raises(ValueError, match="non-finite"):
    index_lib.ExactIndex(np.full((3, 4), np.nan))
  with pytest.raises(ValueError, match="Unknown index kind 'hnsw2'"):
    index_lib.build_index(items, "hnsw2")


# ------------------------------------------------------------------------------------------------
# On a trained model.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=g-import-not-at-top,unused-import
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  from tests.test_fashionclip_system import tiny_config  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_catalog/tiny", data_dir=data_dir).download_and_prepare()
  config = tiny_config()
  config.data.name = "synthetic_catalog/tiny"
  config.data.data_dir = data_dir
  config.data.image_size = 64
  config.batch_size = 8
  config.total_steps = 6
  config.log_every_steps = 3
  config.checkpoint.every_steps = 6
  # A Matryoshka model (prefix 4 of 16): the evaluator also reports `.../t2i_R@K@d4`.
  config.model.matryoshka_dims = (4, 0)
  config.evals = {"retrieval_test": dict(type="retrieval", split="test", protocols=("full",),
                                         ks=(1, 3), every=0)}
  workdir = str(tmp_path_factory.mktemp("run"))
  result = loop.train_and_evaluate(config, workdir)
  return workdir, data_dir, result.metrics


def test_text_search_agrees_with_the_evaluator(trained, tmp_path):
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  workdir, data_dir, metrics = trained
  enc = encoders.load_encoder(workdir)
  pindex = products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                        thumb_size=32)
  assert len(pindex) == metrics["test/full/num_items"] == 8
  assert pindex.thumbs.shape == (8, 32, 32, 3)
  for k in (1, 3):
    got = pindex.text_query_hits(enc, k=k)
    assert got[f"HITS@{k}"] == pytest.approx(metrics[f"test/full/t2i_R@{k}"], abs=1e-9), k
  # A sample of the products as queries (large catalogs): HITS over exactly those rows.
  rows = pindex.sample_rows(5, seed=3)
  assert len(set(rows.tolist())) == 5 and list(rows) == sorted(rows)
  own = [r in [h.row for h in pindex.search_text(enc, [t], 3)[0]]
         for r, t in zip(rows, pindex.query_texts(rows=rows))]
  assert pindex.text_query_hits(enc, k=3, rows=rows)["HITS@3"] == pytest.approx(np.mean(own))
  assert list(pindex.sample_rows(100)) == list(range(8))
  with pytest.raises(ValueError, match="got 0"):
    pindex.sample_rows(0)
  # Saved and loaded, the index answers the same; a product's own text ranks it by score.
  pindex.save(str(tmp_path / "idx"))
  back = products.ProductIndex.load(str(tmp_path / "idx"))
  text = products.join_text([back.products[2][f] for f in back.meta["text_fields"]])
  a = pindex.search_text(enc, [text], 8)[0]
  b = back.search_text(enc, [text], 8)[0]
  assert [h.row for h in a] == [h.row for h in b]
  assert [h.score for h in a] == sorted([h.score for h in a], reverse=True)
  with pytest.raises(ValueError, match="no text-modified image query"):
    pindex.search_composed(enc, [back.thumbs[0]], ["in red"], 3)


def test_matryoshka_index_ranks_as_the_evaluator_at_its_width(trained, tmp_path, caplog):
  """An index of the first 4 of 16 coordinates (re-normalised): its vectors are the float64
  formula's, text search gives the evaluator's width-4 R@K, the model's 16-wide query vectors
  are cut on the way in, and bad widths are named."""
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  workdir, data_dir, metrics = trained
  enc = encoders.load_encoder(workdir)
  assert enc.matryoshka_dims == (4, 0)
  full = products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir)
  small = products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                       dim=4)
  assert (full.dim, full.model_dim, small.dim, small.model_dim) == (16, 16, 4, 16)
  prefix = full.index.reconstruct().astype(np.float64)[:, :4]
  np.testing.assert_allclose(small.index.reconstruct(),
                             prefix / np.linalg.norm(prefix, axis=1, keepdims=True), atol=1e-6)
  for k in (1, 3):
    got = small.text_query_hits(enc, k=k)[f"HITS@{k}"]
    assert got == pytest.approx(metrics[f"test/full/t2i_R@{k}@d4"], abs=1e-9), k
  texts = small.query_texts()
  q = enc.embed_texts(texts)
  q4 = q.astype(np.float64)[:, :4]
  q4 /= np.linalg.norm(q4, axis=1, keepdims=True)
  want = np.argsort(-(q4 @ prefix.T / np.linalg.norm(prefix, axis=1)), axis=1, kind="stable")
  got = small.search(q, 8)  # 16-wide queries, cut by the index.
  assert [[h.row for h in hits] for hits in got] == want.tolist()
  assert [[h.row for h in hits] for hits in small.search(q4, 8)] == want.tolist()
  # An index made in memory without meta (the notebooks' per-entity indexes) has the width of
  # its vectors.
  bare = products.ProductIndex(small.index, small.products, {})
  assert (bare.dim, bare.model_dim) == (4, 4)
  assert [[h.row for h in hits] for hits in bare.search(q4, 8)] == want.tolist()
  with pytest.raises(ValueError, match=r"shape \(8, 7\): this index takes \[Q, 16 \(the "
                                       r"model's width, cut to the index's first 4\) or 4\]"):
    small.search(q[:, :7], 3)
  # Saved and loaded, queried through the model: the same rows.
  small.save(str(tmp_path / "idx4"))
  back = products.ProductIndex.load(str(tmp_path / "idx4"))
  assert (back.dim, back.model_dim) == (4, 16)
  assert ([h.row for h in back.search_text(enc, texts[:1], 8)[0]] == want[0].tolist())
  with pytest.raises(ValueError, match=r"dim=17 exceeds the width of .* embeddings \(16\)"):
    products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                 dim=17)
  with pytest.raises(ValueError, match=r"dim=-2: the index width must be an int >= 0"):
    products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                 dim=-2)
  caplog.set_level("WARNING")  # (build's own warning: the CLI test)
  products.index_vectors(full.index.reconstruct(), full.products, full.meta, dim=8,
                         trained=enc.matryoshka_dims)
  assert "dim=8 is not one of the widths" in caplog.text and "[4, 16]" in caplog.text


def test_funnel_rescores_the_small_index_shortlist_at_the_wider_width(trained, tmp_path,
                                                                     monkeypatch):
  """dim=4, rerank_dim=16: a shortlist of every product is exact width-16 search (the
  evaluator's full-width R@K); a shorter one re-orders the width-4 index's own shortlist by the
  width-16 cosine (float64 formulas); the rerank vectors survive save/load; bad widths and
  shortlists are named."""
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  workdir, data_dir, metrics = trained
  enc = encoders.load_encoder(workdir)
  build = functools.partial(products.build_product_index, enc, "synthetic_catalog/tiny", "test",
                            data_dir=data_dir)
  funnel = build(dim=4, rerank_dim=16)
  assert funnel.rerank.shape == (8, 16) and funnel.meta["rerank_dim"] == 16
  plain = build()
  full = plain.index.reconstruct().astype(np.float64)
  # The same cuts from the embeddings at hand (build's own code after the model has run).
  cut = functools.partial(products.index_vectors, plain.index.reconstruct(), plain.products,
                          plain.meta)
  small = funnel.index.reconstruct().astype(np.float64)
  for k in (1, 3):
    got = funnel.text_query_hits(enc, k=k, shortlist=8)[f"HITS@{k}"]
    assert got == pytest.approx(metrics[f"test/full/t2i_R@{k}"], abs=1e-9), k
  q = enc.embed_texts(funnel.query_texts()).astype(np.float64)
  q4 = q[:, :4] / np.linalg.norm(q[:, :4], axis=1, keepdims=True)
  wide = q @ full.T
  assert ([[h.row for h in hits] for hits in funnel.search(q, 8, shortlist=8)]
          == np.argsort(-wide, axis=1, kind="stable").tolist())
  short = np.argsort(-(q4 @ small.T), axis=1, kind="stable")[:, :3]   # The width-4 shortlist.
  want = [row[np.argsort(-wide[i, row], kind="stable")][:2].tolist()
          for i, row in enumerate(short)]
  got = funnel.search(q, 2, shortlist=3)
  assert [[h.row for h in hits] for hits in got] == want
  # Re-scored a few queries at a time (large query sets): the same hits and scores.
  monkeypatch.setattr(products, "RERANK_CHUNK_BYTES", 3 * 4 * 3 * 16)  # 3 queries per chunk.
  assert funnel.search(q, 2, shortlist=3) == got
  monkeypatch.undo()
  np.testing.assert_allclose([[h.score for h in hits] for hits in got],
                             np.take_along_axis(wide, np.asarray(want), axis=1), atol=1e-5)
  funnel.save(str(tmp_path / "funnel"))
  back = products.ProductIndex.load(str(tmp_path / "funnel"))
  assert [[h.row for h in hits] for hits in back.search(q, 2, shortlist=3)] == want
  back.save(str(tmp_path / "funnel"))  # Over the file its rerank vectors are mapped from.
  again = products.ProductIndex.load(str(tmp_path / "funnel"))
  np.testing.assert_array_equal(again.rerank, funnel.rerank)
  with pytest.raises(ValueError, match=r"re-scores at width 16, so it takes \[Q, 16\]"):
    funnel.search(q4, 2)
  with pytest.raises(ValueError, match=r"shortlist=0 must be an int >= 1"):
    funnel.search(q, 2, shortlist=0)
  with pytest.raises(ValueError, match=r"shortlist=5: this index has no rerank vectors"):
    cut(dim=4).search(q, 2, shortlist=5)
  for dim, rerank_dim in ((4, 4), (4, 17), (0, 16)):
    with pytest.raises(ValueError, match=rf"rerank_dim={rerank_dim}: a funnel re-scores at a "
                                         r"width above the index's dim"):
      cut(dim=dim, rerank_dim=rerank_dim)
  # Saving a plain index over the funnel's directory leaves no stale rerank vectors.
  cut(dim=4).save(str(tmp_path / "funnel"))
  assert products.ProductIndex.load(str(tmp_path / "funnel")).rerank is None


def test_search_cli_query_writes_a_sheet(trained, tmp_path):
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  workdir, data_dir, _ = trained
  enc = encoders.load_encoder(workdir)
  idx_dir = str(tmp_path / "idx")
  # A Matryoshka index (4 of 16): the CLI's query cuts its embedding as the index says.
  pindex = products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                        dim=4)
  pindex.save(idx_dir)
  text = products.join_text([pindex.products[0][f] for f in pindex.meta["text_fields"]])
  expected = pindex.search_text(enc, [text], 3)[0]
  out = str(tmp_path / "sheet.png")
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.search", "query", f"--index_dir={idx_dir}",
       f"--text={text}", "--k=3", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  listed = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("    ")]
  assert listed == [h.product["product_id"] for h in expected]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(out) as im:
    assert im.size[0] > 3 * 96
  with open(os.path.join(idx_dir, "meta.json")) as f:
    assert json.load(f)["num_products"] == 8


def test_fashionvil_tgir_query_is_the_mean_fused_image_positions(tmp_path):
  """The text-modified image query of a FashionViL run: normalize(mean_n fuse([t ; u])[L + n]),
  computed in batches (the last one padded) like the model's own methods give it."""
  from fashion_jax.models import fashionvil as fvil  # pylint: disable=g-import-not-at-top
  from fashion_jax.search import encoders  # pylint: disable=g-import-not-at-top
  from fashion_jax.systems import fashionvil as system_lib  # pylint: disable=g-import-not-at-top
  from tests import test_fashionvil as tf  # pylint: disable=g-import-not-at-top
  system = system_lib.System(tf.tiny_config(tmp_path))
  batch = tf.make_batch(system)
  params = tf.init(system, batch)
  images, text, mask = batch["image"], batch["text"], batch["text_mask"]
  assert system.tokenizer.pad_token_id == 0 and not np.any(text[~mask])
  tokens = system.model.apply(params, images, method=fvil.FashionViL.image_tokens)
  hidden = system.model.apply(params, text, mask, tokens, method=fvil.FashionViL.fuse)
  want = np.asarray(hidden)[:, text.shape[1]:].mean(1)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  rows = {f"q{i}": text[i] for i in range(len(text))}
  tokenize = lambda strings: np.stack([rows[s] for s in strings])
  composed = encoders._fashionvil_composed(system, params, tokenize, batch_size=3)  # pylint: disable=protected-access
  got = composed(images, [f"q{i}" for i in range(len(text))])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_search_cli_builds_a_faiss_index_and_overrides_its_knob(trained, tmp_path):
  """`build --kind=ivf_flat --params=... --dim=8` records the parameters and the width (8 of
  16, with the warning that the model was not trained at 8); `query --params=nprobe=...`
  overrides the search knob for one run (all lists: the exact index's answer); a parameter the
  kind does not have is refused before the model loads; `build --dim=4 --rerank_dim=16` makes
  a funnel whose `evaluate --shortlist=8` (every product) is exact full-width search."""
  pytest.importorskip("faiss")
  from fashion_jax.search import encoders, products  # pylint: disable=g-import-not-at-top
  workdir, data_dir, metrics = trained
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  idx_dir = str(tmp_path / "idx")

  def cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.search", *args, f"--index_dir={idx_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  proc = cli("build", f"--model={workdir}", "--dataset=synthetic_catalog/tiny",
             f"--data_dir={data_dir}", "--kind=hnsw", "--params=nprobe=2")
  assert proc.returncode != 0 and "['nprobe'] are not parameters of --kind=hnsw" in proc.stderr
  proc = cli("build", f"--model={workdir}", "--dataset=synthetic_catalog/tiny",
             f"--data_dir={data_dir}", "--kind=ivf_flat", "--dim=-1")
  assert proc.returncode != 0 and "--dim: dim=-1: the index width must be" in proc.stderr
  proc = cli("build", f"--model={workdir}", "--dataset=synthetic_catalog/tiny",
             f"--data_dir={data_dir}", "--dim=17")  # Known to be too wide once the model runs.
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: dim=17 exceeds the width")
  proc = cli("build", f"--model={workdir}", "--dataset=synthetic_catalog/tiny",
             f"--data_dir={data_dir}", "--kind=ivf_flat", "--params=nlist=2,nprobe=1", "--dim=8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "dim 8 of the model's 16" in proc.stdout
  assert "dim=8 is not one of the widths" in proc.stderr  # The model was trained at 4 and 16.
  with open(os.path.join(idx_dir, "meta.json")) as f:
    meta = json.load(f)
  assert meta["kind"] == "ivf_flat" and meta["index_params"] == {"nlist": 2, "nprobe": 1}
  assert (meta["dim"], meta["model_dim"]) == (8, 16)
  enc = encoders.load_encoder(workdir)
  exact = products.build_product_index(enc, "synthetic_catalog/tiny", "test", data_dir=data_dir,
                                       dim=8)
  text = products.join_text([exact.products[0][f] for f in exact.meta["text_fields"]])
  want = [h.product["product_id"] for h in exact.search_text(enc, [text], 8)[0]]
  proc = cli("query", f"--text={text}", "--k=8", "--params=nprobe=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("    ")] == want
  proc = cli("query", f"--text={text}", "--params=efSearch=5")
  assert proc.returncode != 0 and "['efSearch'] are not search parameters" in proc.stderr
  # A funnel: a width-4 IVF index re-scored at 16; a shortlist of all 8 products is exact
  # full-width search, so `evaluate` gives the evaluator's full-width t2i R@3.
  proc = cli("build", f"--model={workdir}", "--dataset=synthetic_catalog/tiny",
             f"--data_dir={data_dir}", "--kind=ivf_flat", "--params=nlist=2,nprobe=2", "--dim=4",
             "--rerank_dim=16")
  assert proc.returncode == 0 and "dim 4 of the model's 16, re-scored at 16" in proc.stdout, \
      proc.stderr[-2000:]
  proc = cli("evaluate", "--k=3", "--shortlist=8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert "dim 4 of 16, re-scored at 16 over a shortlist of 8" in out["protocol"]
  assert out["HITS@3"] == pytest.approx(metrics["test/full/t2i_R@3"], abs=1e-9)
