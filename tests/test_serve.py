"""The search service (fashion_jax/serve) through FastAPI's TestClient.

- On a tiny random transformers CLIP (tests/test_clip_parity's) over 24 products: text, image and
  filtered queries return the products a float64 numpy ranking of the stored vectors gives; a
  product's own image finds it first; thumbnails are the stored pixels; /api/info offers the tag
  fields as filters.
- Filters on an encoder with chosen embeddings: matching products ranked last are still found
  (the second, exhaustive pass), a combination matching nothing returns nothing.
- Concurrent queries are encoded in fewer model calls than requests, with the results of
  unbatched queries; composed (TGIR) queries go to the model's embed_composed, or are a 400.
- Bad input (empty text, bad k, unknown filter, non-image / huge upload, ...) is a 4xx naming the
  value; /healthz answers while /readyz is 503 until the model is loaded (or says why it failed).
"""

import concurrent.futures
import dataclasses
import io
import json
import re
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fastapi import testclient

from fashion_jax.search import encoders
from fashion_jax.search import index as index_lib
from fashion_jax.search import products
from fashion_jax.serve import app as serve_app
from fashion_jax.serve import batching
from tests.test_clip_parity import make_hf_clip, make_tokenizer

N = 24
BRANDS = ("Acme", "Borealis", "Corvid")
COLORS = ("red", "blue", "green", "black")
CATEGORIES = ("dress", "shoe")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=8, image_size=32, hidden_act="quick_gelu")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="gelu")


def catalog(n: int = N, seed: int = 0):
  """n products with tags and random 32 x 32 images (= their thumbnails)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
  items = []
  for i in range(n):
    brand, color, cat = BRANDS[i % 3], COLORS[(i // 3) % 4], CATEGORIES[(i // 12) % 2]
    items.append({"product_id": f"p{i:03d}", "title": f"{color} {cat} by {brand}",
                  "brand": brand, "color": color, "category": cat,
                  "description": f"a {color} {cat}"})
  return images, items


def save_index(directory, encoder, vectors, items, thumbs):
  meta = {"model": encoder.name, "system": encoder.system, "dataset": "test_catalog",
          "split": "test", "kind": "exact", "dim": int(vectors.shape[1]),
          "num_products": len(items), "image_size": encoder.image_size,
          "text_fields": ["title"], "fields": sorted(items[0]), "thumb_size": 32,
          "model_identity": encoder.identity}
  products.ProductIndex(index_lib.build_index(vectors), items, meta, thumbs).save(str(directory))
  return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(index_dir, model_dir): a tiny random CLIP and an index of its image embeddings."""
  root = tmp_path_factory.mktemp("serve")
  make_hf_clip(root / "hf", make_tokenizer(root / "tok"), VISION, TEXT, projection_dim=16, seed=5)
  encoder = encoders.load_encoder(str(root / "hf"), batch_size=16)
  images, items = catalog()
  save_index(root / "index", encoder, encoder.embed_images(images), items, images)
  return str(root / "index"), str(root / "hf")


def loader_of(index_dir, model_dir, wrap=None):
  def load():
    enc = encoders.load_encoder(model_dir, batch_size=16)
    return products.ProductIndex.load(index_dir), wrap(enc) if wrap else enc
  return load


def client_for(load, **config) -> testclient.TestClient:
  config.setdefault("warmup", False)
  return testclient.TestClient(serve_app.create_app(load, serve_app.ServeConfig(**config)))


def wait_ready(client, timeout=120.0):
  t0 = time.time()
  while time.time() - t0 < timeout:
    r = client.get("/readyz")
    if r.status_code == 200:
      return r
    assert r.json()["status"] == "loading", r.json()
    time.sleep(0.05)
  raise AssertionError("not ready")


def reference(vectors, query, rows=None, k=5):
  """float64 top-k rows of `rows` (default all) by inner product; ties -> lower row."""
  s = vectors.astype(np.float64) @ np.asarray(query, np.float64)
  rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
  order = rows[np.argsort(-s[rows], kind="stable")]
  return order[:k].tolist(), s


def png(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


@pytest.fixture(scope="module")
def served(tiny):
  index_dir, model_dir = tiny
  with client_for(loader_of(index_dir, model_dir), max_upload_bytes=200_000,
                  max_image_pixels=300 * 300, max_k=50) as client:
    wait_ready(client)
    yield client


def test_queries_and_filters_match_a_float64_ranking(tiny, served):
  index_dir, model_dir = tiny
  enc = encoders.load_encoder(model_dir)
  pindex = products.ProductIndex.load(index_dir)
  vectors = np.load(f"{index_dir}/index.npz")["vectors"]
  items = pindex.products
  text = "red dress by Acme"
  q = enc.embed_texts([text])[0]
  r = served.post("/api/search/text", json={"text": text, "k": 5})
  assert r.status_code == 200, r.json()
  body = r.json()
  want, s = reference(vectors, q, k=5)
  assert [h["row"] for h in body["results"]] == want
  assert [h["id"] for h in body["results"]] == [items[i]["product_id"] for i in want]
  np.testing.assert_allclose([h["score"] for h in body["results"]], s[want], atol=1e-5)
  assert body["results"][0]["product"] == items[want[0]]
  assert body["passes"] == 1 and body["matching"] == N
  # Filtered: brand in two values AND a colour; exactly the matching products' ranking.
  filters = {"brand": ["Borealis", "Corvid"], "color": "blue"}
  rows = [i for i, p in enumerate(items) if p["brand"] in filters["brand"]
          and p["color"] == "blue"]
  body = served.post("/api/search/text", json={"text": text, "k": 3, "filters": filters}).json()
  assert [h["row"] for h in body["results"]] == reference(vectors, q, rows, 3)[0]
  assert body["matching"] == len(rows) and body["filters"]["color"] == ["blue"]
  assert all(h["product"]["color"] == "blue" for h in body["results"])
  # k above the matching count: all of them.
  body = served.post("/api/search/text", json={"text": text, "k": 50, "filters": filters}).json()
  assert sorted(h["row"] for h in body["results"]) == rows
  # An image query with a product's own image (an uploaded PNG) finds that product first.
  thumbs = np.load(f"{index_dir}/thumbs.npy")
  r = served.post("/api/search/image", files={"image": ("q.png", png(thumbs[7]), "image/png")},
                  data={"k": "4", "filters": json.dumps({"category": "dress"})})
  assert r.status_code == 200, r.json()
  body = r.json()
  dress = [i for i, p in enumerate(items) if p["category"] == "dress"]
  want, s = reference(vectors, vectors[7], dress, 4)
  assert [h["row"] for h in body["results"]] == want and want[0] == 7
  assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
  # Thumbnails are the stored pixels; info offers the tag fields with their values.
  t = served.get(body["results"][1]["thumbnail"])
  assert t.headers["content-type"] == "image/png"
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(t.content))),
                                thumbs[body["results"][1]["row"]])
  info = served.get("/api/info").json()
  assert info["filters"] == {"brand": list(BRANDS), "category": list(CATEGORIES),
                             "color": sorted(COLORS)}
  assert info["num_products"] == N and info["supports_composed"] is False
  page = served.get("/")
  assert page.status_code == 200 and 'id="results"' in page.text and 'id="file"' in page.text


def test_filters_offer_only_fields_that_separate_products():
  """A column the catalog lacks (empty on every product), one value everywhere, and too many
  values are not filters; an empty value is never an option, but a field some products lack
  still filters the others."""
  items = [{"product_id": f"p{i}", "title": "t", "category": "", "season": "SS24",
            "brand": ["Acme", "Borealis"][i % 2], "colour": "red" if i < 2 else "",
            "sku_group": f"g{i}"} for i in range(6)]
  engine = serve_app.Engine(_Sized(items), None, serve_app.ServeConfig(max_filter_values=5))
  assert sorted(engine.filters) == ["brand", "colour"], sorted(engine.filters)
  assert sorted(engine.filters["colour"]) == ["red"]
  clean, mask = engine.match({"colour": "red", "brand": "Acme"})
  assert clean == {"colour": ["red"], "brand": ["Acme"]} and mask.tolist() == [
      True, False, False, False, False, False]
  with pytest.raises(serve_app.BadRequest, match="unknown filter field 'category'"):
    engine.match({"category": ""})


class _Sized:
  """The part of a ProductIndex the Engine's constructor reads."""

  def __init__(self, items):
    self.products = items

  def __len__(self):
    return len(self.products)


# ------------------------------------------------------------------------------------------------
# An encoder with chosen embeddings: text "angle:<deg>" -> the unit vector at that angle.
# ------------------------------------------------------------------------------------------------
def unit(deg):
  return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))], np.float32)


def geometric(calls=None):
  """An Encoder on the plane: texts 'angle:<deg>'; images: their mean red value as the angle;
  composed: the image's angle plus the text's."""
  def angle(t):  # Any other text (the warm-up's) is angle 0.
    return float(t.split(":")[1]) if t.startswith("angle:") else 0.0

  def texts(strings):
    if calls is not None:
      calls.append(len(strings))
    return np.stack([unit(angle(t)) for t in strings])

  def images(x):
    return np.stack([unit(float(im[..., 0].mean())) for im in np.asarray(x)])

  def composed(x, strings):
    return np.stack([unit(float(im[..., 0].mean()) + angle(t))
                     for im, t in zip(np.asarray(x), strings)])
  data = ml_collections.ConfigDict({"image_size": 8})
  return encoders.Encoder(name="geometric", system="plane", image_size=8, data_config=data,
                          embed_images=images, embed_texts=texts, embed_composed=composed,
                          identity={"path": "geometric", "step": None, "fingerprint": "f0"})


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
  """24 products at angles 0, 5, ..., 115 degrees; the last three are brand Corvid."""
  _, items = catalog()
  for i, p in enumerate(items):
    p["brand"] = "Corvid" if i >= N - 3 else ("Acme" if i % 2 else "Borealis")
  vectors = np.stack([unit(5 * i) for i in range(N)])
  thumbs = np.zeros((N, 8, 8, 3), np.uint8)
  directory = save_index(tmp_path_factory.mktemp("plane"), geometric(), vectors, items, thumbs)
  return directory, vectors


def test_filtered_matches_ranked_last_are_found_by_a_second_pass(plane):
  directory, vectors = plane
  load = lambda: (products.ProductIndex.load(directory), geometric())
  with client_for(load) as client:
    wait_ready(client)
    rows = [N - 3, N - 2, N - 1]
    body = client.post("/api/search/text", json={"text": "angle:0", "k": 1,
                                                 "filters": {"brand": "Corvid"}}).json()
    # First pass: 2 ceil(1 * 24 / 3) = 16 results, none Corvid; second pass: all 24.
    assert body["passes"] == 2 and body["fetched"] == N
    assert [h["row"] for h in body["results"]] == reference(vectors, unit(0), rows, 1)[0]
    assert [h["row"] for h in body["results"]] == [N - 3]
    # Matching products near the query: one pass of 16.
    body = client.post("/api/search/text", json={"text": "angle:120", "k": 1,
                                                 "filters": {"brand": "Corvid"}}).json()
    assert body["passes"] == 1 and body["fetched"] == 16
    assert [h["row"] for h in body["results"]] == [N - 1]
    # k above the first pass' share: 2 ceil(2 * 24 / 3) = 32 > 24, so one exhaustive pass.
    body = client.post("/api/search/text", json={"text": "angle:0", "k": 2,
                                                 "filters": {"brand": "Corvid"}}).json()
    assert body["passes"] == 1 and body["fetched"] == N
    assert [h["row"] for h in body["results"]] == [N - 3, N - 2]
    # Known values that never occur together: no result, and no model call.
    body = client.post("/api/search/text", json={"text": "angle:0", "k": 2, "filters": {
        "brand": "Corvid", "category": "dress"}}).json()
    assert body["results"] == [] and body["matching"] == 0 and body["passes"] == 0


def test_concurrent_queries_are_batched_with_unbatched_results(plane, tiny):
  # The geometric encoder counts its calls; 12 requests at once with a 300 ms collection window.
  directory, vectors = plane
  calls = []
  load = lambda: (products.ProductIndex.load(directory), geometric(calls))
  texts = [f"angle:{a}" for a in range(1, 120, 10)]  # Between products: no ties.
  with client_for(load, max_wait_ms=300, max_batch=16) as client:
    wait_ready(client)
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
      bodies = list(pool.map(lambda t: client.post(
          "/api/search/text", json={"text": t, "k": 3}).json(), texts))
    stats = client.get("/api/stats").json()
  assert len(calls) < len(texts) and stats["batches"] < len(texts), (calls, stats)
  assert sum(calls) >= len(texts) and stats["largest_batch"] > 1
  assert set(calls) <= {1, 2, 4, 8, 16}  # Padded to power-of-two shapes.
  # A query that fails inside the model fails alone: its batch is retried one by one.
  with client_for(load, max_wait_ms=300) as client:
    wait_ready(client)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      rs = list(pool.map(lambda t: client.post("/api/search/text", json={"text": t, "k": 1}),
                         ["angle:1", "angle:oops", "angle:51", "angle:101"]))
  assert [r.status_code for r in rs] == [200, 400, 200, 200]
  assert "could not convert string to float: 'oops'" in rs[1].json()["error"]
  assert [r.json()["results"][0]["row"] for r in rs if r.status_code == 200] == [0, 10, 20]
  pindex = products.ProductIndex.load(directory)
  for t, body in zip(texts, bodies):
    alone = pindex.search_text(geometric(), [t], 3)[0]
    assert [h["row"] for h in body["results"]] == [h.row for h in alone], t
    assert [h["score"] for h in body["results"]] == pytest.approx([h.score for h in alone])
  # The real model: batched results equal one-by-one ones (same ranking, scores to 1e-5).
  index_dir, model_dir = tiny
  count = []

  def counting(enc):
    def texts_fn(strings, f=enc.embed_texts):
      count.append(len(strings))
      return f(strings)
    return dataclasses.replace(enc, embed_texts=texts_fn)
  queries = ["red dress", "blue shoe by Corvid", "green", "black dress by Acme", "shoe", "dress"]
  with client_for(loader_of(index_dir, model_dir, counting), max_wait_ms=300) as client:
    wait_ready(client)
    with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
      bodies = list(pool.map(lambda t: client.post(
          "/api/search/text", json={"text": t, "k": 5}).json(), queries))
  assert len(count) < len(queries), count
  enc = encoders.load_encoder(model_dir)
  pindex = products.ProductIndex.load(index_dir)
  for t, body in zip(queries, bodies):
    alone = pindex.search_text(enc, [t], 5)[0]
    assert [h["row"] for h in body["results"]] == [h.row for h in alone], t
    np.testing.assert_allclose([h["score"] for h in body["results"]], [h.score for h in alone],
                               atol=1e-5)


def test_composed_queries_use_the_models_tgir_query_or_are_refused(plane, served):
  directory, vectors = plane
  load = lambda: (products.ProductIndex.load(directory), geometric())
  image = np.zeros((8, 8, 3), np.uint8)
  image[..., 0] = 40  # The reference image's angle: 40 degrees; the text adds 32 (no ties).
  with client_for(load) as client:
    wait_ready(client)
    r = client.post("/api/search/composed", files={"image": ("q.png", png(image), "image/png")},
                    data={"text": "angle:32", "k": "3"})
    assert r.status_code == 200, r.json()
    assert [h["row"] for h in r.json()["results"]] == reference(vectors, unit(72), k=3)[0]
    assert [h["row"] for h in r.json()["results"]] == [14, 15, 13]
  r = served.post("/api/search/composed", files={"image": ("q.png", png(image), "image/png")},
                  data={"text": "in red"})
  assert r.status_code == 400 and "no text-modified image query" in r.json()["error"]


def test_bad_input_is_a_clear_4xx(served):
  def text(body, status, match):
    r = served.post("/api/search/text", json=body)
    assert r.status_code == status and match in r.json()["error"], (body, r.json())

  text({"text": ""}, 400, "empty")
  text({"text": "   "}, 400, "empty")
  text({"k": 3}, 400, "no 'text'")
  text({"text": 5}, 400, "must be a string")
  text({"text": "x" * 1001}, 400, "1001 characters")
  text({"text": "dress", "k": 0}, 400, "k=0 must be >= 1")
  text({"text": "dress", "k": "abc"}, 400, "k='abc' is not an integer")
  text({"text": "dress", "k": 2.5}, 400, "k=2.5 is not an integer")
  text({"text": "dress", "k": 51}, 400, "k=51 exceeds this server's limit of 50")
  text({"text": "dress", "filters": {"size": "M"}}, 400, "unknown filter field 'size'")
  text({"text": "dress", "filters": {"title": "x"}}, 400, "unknown filter field 'title'")
  text({"text": "dress", "filters": {"brand": "Zed"}}, 400, "brand='Zed' matches no product")
  text({"text": "dress", "filters": {"brand": 3}}, 400, "a string or a list of strings")
  text({"text": "dress", "filters": ["brand"]}, 400, "must be an object")
  text({"text": "dress", "color": "red"}, 400, "unknown keys ['color']")
  r = served.post("/api/search/text", content=b"{not json", headers={
      "content-type": "application/json"})
  assert r.status_code == 400 and "must be JSON" in r.json()["error"]
  # k above the number of products (but within max_k) is capped, as in the CLI.
  assert len(served.post("/api/search/text", json={"text": "a", "k": 30}).json()["results"]) == N

  def upload(content, status, match, name="q.png", data=None, **kwargs):
    r = served.post("/api/search/image", files={"image": (name, content, "image/png")},
                    data=data or {}, **kwargs)
    assert r.status_code == status and match in r.json()["error"], r.json()

  upload(b"this is not an image", 400, "'notes.txt' is not an image", name="notes.txt")
  upload(b"", 400, "is empty")
  upload(png(np.zeros((301, 300, 3), np.uint8)), 413, "300x301 = 90,300 pixels")
  upload(png(np.zeros((8, 8, 3), np.uint8)), 400, "k='-'", data={"k": "-"})
  upload(png(np.zeros((8, 8, 3), np.uint8)), 400, "'filters' is not JSON",
         data={"filters": "{brand"})
  huge = np.random.default_rng(0).integers(0, 256, (300, 300, 3)).astype(np.uint8)
  # Refused from its Content-Length, before the body is read.
  r = served.post("/api/search/image", files={"image": ("q.png", png(huge), "image/png")})
  assert r.status_code == 413 and re.search(r"request body of \d{3},\d{3} bytes exceeds the "
                                            "upload limit of 200,000", r.json()["error"])
  # No Content-Length (a chunked body): refused while reading.
  def chunks():
    yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
           b"Content-Type: image/png\r\n\r\n")
    for _ in range(30):
      yield b"x" * 10_000
  r = served.post("/api/search/image", content=chunks(),
                  headers={"content-type": "multipart/form-data; boundary=b"})
  assert r.status_code == 413 and "of more exceeds the upload limit" in r.json()["error"]
  r = served.post("/api/search/image", data={"k": "3"})
  assert r.status_code == 400 and "no 'image' file" in r.json()["error"]
  r = served.post("/api/search/image", content=b"--", headers={"content-type": "text/plain"})
  assert r.status_code == 400, r.json()
  r = served.get(f"/thumbs/{N}.png")
  assert r.status_code == 404 and f"no product row {N}" in r.json()["error"]
  r = served.get("/thumbs/abc.png")
  assert r.status_code == 422 and "row" in r.json()["error"]


def test_ready_only_once_loaded_and_load_failures_are_reported(plane):
  directory, _ = plane
  release = threading.Event()

  def slow_load():
    release.wait(60)
    return products.ProductIndex.load(directory), geometric()
  with client_for(slow_load) as client:
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/api/search/text", json={"text": "angle:0"})
    assert r.status_code == 503 and "still loading" in r.json()["error"]
    release.set()
    assert wait_ready(client).json()["num_products"] == N
    assert client.post("/api/search/text", json={"text": "angle:0"}).status_code == 200
  # With warm-up: every power-of-two batch compiled before ready, then the same answers.
  calls = []
  warm = lambda: (products.ProductIndex.load(directory), geometric(calls))
  with client_for(warm, warmup=True, max_batch=8) as client:
    wait_ready(client)
    assert {1, 2, 4, 8} <= set(calls)
    body = client.post("/api/search/text", json={"text": "angle:12", "k": 2}).json()
    assert [h["row"] for h in body["results"]] == [2, 3]
  # Another model than the index's: not ready, and /readyz says why.
  other = lambda: (products.ProductIndex.load(directory),
                   dataclasses.replace(geometric(), identity={"path": "other", "step": 3,
                                                              "fingerprint": "f1"}))
  with client_for(other) as client:
    for _ in range(200):
      r = client.get("/readyz")
      if r.json()["status"] != "loading":
        break
      time.sleep(0.05)
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "StaleIndexError" in r.json()["error"]
    r = client.post("/api/search/text", json={"text": "angle:0"})
    assert r.status_code == 503 and "failed to load" in r.json()["error"]


def test_bucket_sizes():
  assert [batching.bucket(n, 16) for n in (1, 2, 3, 5, 9, 16, 20)] == [1, 2, 4, 8, 16, 16, 20]
  with pytest.raises(ValueError, match="n=0"):
    batching.bucket(0, 16)
