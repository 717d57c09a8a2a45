"""FAISS backends of the product index (IVF-Flat, IVF-PQ, HNSW) against our exact search.

- Each kind at generous parameters returns ExactIndex's top-k on an easy clustered set (recall
  1.0, same scores); at a stingy setting of its search knob, recall is lower (the knob matters).
- A product index saved with a FAISS index reads back with the same answers and a meta.json
  that records the kind, every parameter and the model's identity; a query model with another
  params fingerprint is refused (StaleIndexError) as with the exact index.
- Bad kinds, parameter names and values raise errors naming them; without faiss, building or
  loading a FAISS index says which extra installs it.
"""

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from fashion_jax.search import encoders
from fashion_jax.search import index as index_lib
from fashion_jax.search import products

faiss = pytest.importorskip("faiss")

K = 10


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
  """faiss on one OpenMP thread: the data are tiny, and on a loaded 2-core machine the OpenMP
  barriers of two threads make an IVF-PQ build ~15x slower (measured: 0.9 s -> 17 s)."""
  before = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(before)


def mixture(n, q, dim=32, clusters=20, sigma=0.5, seed=0):
  """Unit vectors normalize(c + sigma g / sqrt(dim)) around `clusters` random unit centres."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)

  def draw(m):
    x = centres[rng.integers(0, clusters, m)] + sigma * rng.normal(size=(m, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return draw(n), draw(q)


@pytest.fixture(scope="module")
def data():
  items, queries = mixture(4000, 100)
  scores, ids = index_lib.ExactIndex(items).search(queries, K)
  return items, queries, scores, ids


# kind -> (build params, generous search params, stingy search params).
CASES = {
    "ivf_flat": (dict(nlist=32, nprobe=4), dict(nprobe=32), dict(nprobe=1)),
    "ivf_pq": (dict(nlist=32, nprobe=4, m=8, nbits=6, refine=10), dict(nprobe=32, refine=40),
               dict(nprobe=1, refine=0)),
    "hnsw": (dict(M=8, efConstruction=32, efSearch=16), dict(efSearch=1000), dict(efSearch=1)),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_generous_setting_is_exact_and_the_knob_matters(data, kind):
  items, queries, exact_scores, exact_ids = data
  build, generous, stingy = CASES[kind]
  index = index_lib.build_index(items, kind, **build)
  assert len(index) == len(items) and index.dim == items.shape[1]
  scores, ids = index.search(queries, K, **generous)
  assert index_lib.recall_at_k(ids, exact_ids) == 1.0
  np.testing.assert_array_equal(ids, exact_ids)
  np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
  low = index_lib.recall_at_k(index.search(queries, K, **stingy)[1], exact_ids)
  default = index_lib.recall_at_k(index.search(queries, K)[1], exact_ids)
  assert low < 0.95 and low < default, (low, default)
  # A query-time override leaves the index's defaults alone.
  assert index.params == index_lib.resolve_params(kind, build, len(items), items.shape[1])


def test_refine_reranks_the_pq_candidates_exactly(data):
  """refine=r returns the k best, by the exact inner product (float64 numpy reference), of the
  r * k candidates the PQ index alone returns; so recall cannot fall as r grows, and an r that
  covers the probed lists is exact."""
  items, queries, _, exact_ids = data
  index = index_lib.build_index(items, "ivf_pq", nlist=32, nprobe=8, m=4, nbits=6, refine=64)
  base = faiss.downcast_index(index.faiss_index.base_index)
  recalls = []
  for r in (1, 4, 16, 64):
    scores, ids = index.search(queries, K, refine=r)
    _, cand = base.search(queries, r * K, params=faiss.SearchParametersIVF(nprobe=8))
    exact = np.einsum("qd,qcd->qc", queries.astype(np.float64), items[cand].astype(np.float64))
    exact = np.where(cand < 0, -np.inf, exact)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :K]
    want_ids = np.take_along_axis(cand, best, 1)
    # Same sets (ties in float32 may order equal scores differently), same scores, best first.
    assert [set(a) for a in ids.tolist()] == [set(a) for a in want_ids.tolist()], r
    np.testing.assert_allclose(scores, np.take_along_axis(exact, best, 1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    recalls.append(index_lib.recall_at_k(ids, exact_ids))
  assert recalls == sorted(recalls) and recalls[0] < 0.95 <= recalls[-1], recalls


def fake_encoder(vectors: np.ndarray, fingerprint: str) -> encoders.Encoder:
  """An Encoder whose text 'i' embeds to vectors[i] (no model: the index is under test)."""
  return encoders.Encoder(
      name="fake", system="fake", image_size=8, data_config=ml_collections.ConfigDict(),
      embed_images=lambda x: vectors[: len(x)],
      embed_texts=lambda texts: vectors[[int(t) for t in texts]],
      identity={"path": "/runs/fake", "step": 7, "fingerprint": fingerprint})


@pytest.mark.parametrize("kind", ["ivf_pq", "hnsw"])
def test_product_index_round_trip_records_kind_params_and_model(data, kind, tmp_path):
  items, queries, _, exact_ids = data
  build = CASES[kind][0]
  enc = fake_encoder(queries, "abc123")
  meta = {"model": enc.name, "dataset": "d", "split": "test", "dim": items.shape[1],
          "model_identity": enc.identity}
  pindex = products.ProductIndex(index_lib.build_index(items, kind, **build),
                                 [{"product_id": str(i)} for i in range(len(items))], meta)
  directory = str(tmp_path / "idx")
  (tmp_path / "idx").mkdir()
  (tmp_path / "idx" / "index.npz").write_bytes(b"stale file of an older exact build")
  pindex.save(directory)
  assert sorted(os.listdir(directory)) == ["index.faiss", "meta.json", "products.json"]
  with open(os.path.join(directory, "meta.json")) as f:
    saved = json.load(f)
  assert saved["kind"] == kind
  assert saved["index_params"] == index_lib.resolve_params(kind, build, len(items),
                                                          items.shape[1])
  assert saved["model_identity"] == enc.identity
  back = products.ProductIndex.load(directory)
  assert isinstance(back.index, index_lib.FaissIndex) and back.index.params == pindex.index.params
  texts = [str(i) for i in range(len(queries))]
  knob = CASES[kind][2]
  for kw in ({}, knob):  # Default and query-time search parameters.
    a = pindex.search_text(enc, texts, K, **kw)
    b = back.search_text(enc, texts, K, **kw)
    assert [[(h.row, h.score) for h in hits] for hits in a] == [
        [(h.row, h.score) for h in hits] for hits in b]
  rows = [[h.row for h in hits] for hits in back.search_text(enc, texts, K, **knob)]
  assert index_lib.recall_at_k(np.array(rows), exact_ids) < 0.95
  # Another model's query embeddings are refused, as for the exact index.
  other = fake_encoder(queries, "def456")
  with pytest.raises(products.StaleIndexError, match="def456"):
    back.search_text(other, texts[:1], K)


def test_bad_kind_parameter_and_value_name_it(data):
  items, queries, _, _ = data
  with pytest.raises(ValueError, match="Unknown index kind 'hnsw2'"):
    index_lib.build_index(items, "hnsw2")
  with pytest.raises(ValueError, match=r"hnsw index has no index parameter\(s\) \['nprobe'\]"):
    index_lib.build_index(items, "hnsw", nprobe=4)
  with pytest.raises(ValueError, match=r"no index parameter\(s\) \['nlist'\]"):
    index_lib.build_index(items, "exact", nlist=4)
  with pytest.raises(ValueError, match="nlist=0 must be in"):
    index_lib.build_index(items, "ivf_flat", nlist=0)
  with pytest.raises(ValueError, match="m=5 must divide the dimension 32"):
    index_lib.build_index(items, "ivf_pq", nlist=8, m=5)
  with pytest.raises(ValueError, match="nprobe=9 must be in"):
    index_lib.build_index(items, "ivf_flat", nlist=8, nprobe=9)
  with pytest.raises(ValueError, match="M=1.5 must be an integer"):
    index_lib.build_index(items, "hnsw", M=1.5)
  with pytest.raises(ValueError, match="row 3 has norm 2.0"):
    index_lib.build_index(np.concatenate([items[:3], 2 * items[3:6]]), "hnsw")
  ivf = index_lib.build_index(items, "ivf_flat", nlist=8)
  with pytest.raises(ValueError, match=r"no search parameter\(s\) \['efSearch'\]"):
    ivf.search(queries, 3, efSearch=10)
  with pytest.raises(ValueError, match="nprobe=9 must be in"):
    ivf.search(queries, 3, nprobe=9)
  with pytest.raises(ValueError, match=r"exact index has no search parameter\(s\) \['nprobe'\]"):
    index_lib.ExactIndex(items).search(queries, 3, nprobe=2)
  pq = index_lib.build_index(items, "ivf_pq", nlist=8, m=8, nbits=4)
  with pytest.raises(ValueError, match="refine=3 needs an ivf_pq index built with refine"):
    pq.search(queries, 3, refine=3)


def test_missing_faiss_names_the_extra(data, tmp_path, monkeypatch):
  items, _, _, _ = data
  pindex = products.ProductIndex(index_lib.build_index(items, "ivf_flat", nlist=8),
                                 [{"product_id": str(i)} for i in range(len(items))], {})
  pindex.save(str(tmp_path))
  monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError.
  for attempt in (lambda: index_lib.build_index(items, "hnsw"),
                  lambda: products.ProductIndex.load(str(tmp_path))):
    with pytest.raises(ImportError, match=r"pip install -e \.\[search\]"):
      attempt()
  assert len(index_lib.build_index(items, "exact")) == len(items)  # Exact needs no faiss.
