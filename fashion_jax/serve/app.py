"""The search service: a FastAPI app over a ProductIndex and its model (docs/serve.md).

`create_app(loader, config)`: `loader() -> (ProductIndex, Encoder)` runs once, in a thread
started at startup (/healthz answers at once; /readyz is 503 until loaded and compiled).
Queries go through one `batching.MicroBatcher`. Filters are applied by over-fetching, with an
exhaustive second pass when too few results match (`Engine.fetch_k`, the `search` handler), so
a filtered query returns the top min(k, m) of the m matching products. Bad input is a 4xx JSON
{"error", "status"} naming the value (`BadRequest`).
"""

import asyncio
import contextlib
import dataclasses
import functools
import importlib.resources
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging
import numpy as np
from PIL import Image

from fashion_jax.search import encoders as encoders_lib
from fashion_jax.search import products as products_lib
from fashion_jax.serve import batching

try:
  import fastapi
  from fastapi import responses
  from fastapi import exceptions as fastapi_exceptions
  from starlette import exceptions as starlette_exceptions
except ImportError as e:  # pragma: no cover - depends on the environment.
  raise ImportError("The search service needs FastAPI and uvicorn: pip install -e .[serve]"
                    ) from e

KINDS = ("text", "image", "composed")
# Product fields never offered as filters: one value per product, or free text.
NOT_FILTERS = ("product_id", "title", "description")
K_TIER_BASE = 16  # Engine.k_tier.


@dataclasses.dataclass
class ServeConfig:
  """Limits and batching of the service.

  max_upload_bytes: largest request body (an image upload); larger -> 413.
  max_image_pixels: largest decoded image (width x height); larger -> 413 (decompression bombs).
  max_k: largest k a request may ask for; default_k: k when a request gives none.
  max_batch, max_wait_ms: the micro-batcher's (batching.MicroBatcher).
  request_timeout_s: a query waiting longer is answered 503.
  max_text_chars: longest query text.
  max_filter_values: a field with more distinct values than this is not offered as a filter.
    Nor is a field that separates no products: empty everywhere (a column the catalog lacks),
    or one value on every product. An empty value is never offered (a product without it
    matches no value).
  warmup: compile every batch shape of the towers before reporting ready.
  """
  max_upload_bytes: int = 10 * 2**20
  max_image_pixels: int = 40_000_000
  max_k: int = 100
  default_k: int = 12
  max_batch: int = 16
  max_wait_ms: float = 5.0
  request_timeout_s: float = 60.0
  max_text_chars: int = 1000
  max_filter_values: int = 500
  warmup: bool = True


class BadRequest(Exception):
  """A client error: HTTP `status` with `message` (the JSON response's "error")."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


class BodyTooLarge(BadRequest):
  def __init__(self, limit: int, size: int | None = None):
    got = "more" if size is None else f"{size:,} bytes"
    super().__init__(413, f"request body of {got} exceeds the upload limit of {limit:,} bytes "
                          "(--max_upload_mb).")


@dataclasses.dataclass
class Query:
  """One request as the batcher's worker sees it: text and/or uint8 [H, W, 3] image, and the
  number of index results to fetch."""
  text: str | None
  image: np.ndarray | None
  fetch_k: int


def decode_image(data: bytes, filename: str, max_pixels: int) -> np.ndarray:
  """Uploaded bytes -> uint8 [H, W, 3] RGB; BadRequest 400 for an empty or unreadable file, 413
  for more than max_pixels pixels (checked from the header, before decoding)."""
  if not data:
    raise BadRequest(400, f"the uploaded image {filename!r} is empty (0 bytes).")
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      if w * h > max_pixels:
        raise BadRequest(413, f"the uploaded image {filename!r} has {w}x{h} = {w * h:,} pixels, "
                              f"over the limit of {max_pixels:,}.")
      return np.asarray(im.convert("RGB"), np.uint8)
  except BadRequest:
    raise
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds.
    raise BadRequest(400, f"the upload {filename!r} is not an image that can be read "
                          f"(PNG, JPEG, WebP, ...): {type(e).__name__}: {e}") from e


class Engine:
  """The loaded index and model, the filter tables, and the batched search (sync code, run in
  the batcher's worker thread)."""

  def __init__(self, index: products_lib.ProductIndex, encoder: encoders_lib.Encoder,
               config: ServeConfig):
    self.index = index
    self.encoder = encoder
    self.config = config
    self.n = len(index)
    fields = [f for f in index.products[0] if f not in NOT_FILTERS] if self.n else []
    self.filters: dict[str, dict[str, np.ndarray]] = {}
    for f in fields:
      values = np.asarray([p.get(f, "") for p in index.products], dtype=object)
      distinct = sorted(set(values.tolist()) - {""})
      separates = len(distinct) >= 2 or (distinct and "" in values)
      if separates and len(distinct) <= config.max_filter_values:
        self.filters[f] = {v: values == v for v in distinct}

  # -- requests --------------------------------------------------------------------------------
  def check_k(self, raw: Any) -> int:
    """k from JSON (int) or a form (str) -> int in [1, min(max_k, N)] (above N: capped)."""
    if raw is None or raw == "":
      return min(self.config.default_k, self.n)
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
      raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
      raise BadRequest(400, f"k={raw!r} is not an integer (the number of results).")
    if raw < 1:
      raise BadRequest(400, f"k={raw} must be >= 1 (the number of results).")
    if raw > self.config.max_k:
      raise BadRequest(400, f"k={raw} exceeds this server's limit of {self.config.max_k} "
                            "results (--max_k).")
    return min(raw, self.n)

  def check_text(self, text: Any) -> str:
    if text is None:
      raise BadRequest(400, "the query has no 'text'.")
    if not isinstance(text, str):
      raise BadRequest(400, f"'text' must be a string, got {text!r}.")
    if len(text) > self.config.max_text_chars:
      raise BadRequest(400, f"the query text has {len(text)} characters, over the limit of "
                            f"{self.config.max_text_chars}.")
    try:
      return products_lib.check_query_texts([text])[0]
    except (TypeError, ValueError) as e:
      raise BadRequest(400, str(e)) from e

  def match(self, filters: Any) -> tuple[dict[str, list[str]], np.ndarray | None]:
    """{field: value or [values]} -> (normalised filters, bool [N] mask or None when none)."""
    if filters is None or filters == "":
      return {}, None
    if isinstance(filters, str):
      try:
        filters = json.loads(filters)
      except json.JSONDecodeError as e:
        raise BadRequest(400, f"'filters' is not JSON ({e}): {filters[:200]!r}.") from e
    if not isinstance(filters, dict):
      raise BadRequest(400, "'filters' must be an object {field: value or [values]}, got "
                            f"{filters!r}.")
    mask, clean = None, {}
    for field, want in filters.items():
      if field not in self.filters:
        raise BadRequest(400, f"unknown filter field {field!r}; this index filters by "
                              f"{sorted(self.filters)}.")
      values = [want] if isinstance(want, str) else want
      if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadRequest(400, f"filter {field!r} must be a string or a list of strings, got "
                              f"{want!r}.")
      if not values:
        continue
      table = self.filters[field]
      unknown = [v for v in values if v not in table]
      if unknown:
        known = sorted(table)
        more = f" (and {len(known) - 20} more)" if len(known) > 20 else ""
        raise BadRequest(400, f"{field}={unknown[0]!r} matches no product; values of {field!r}: "
                              f"{known[:20]}{more}.")
      field_mask = np.logical_or.reduce([table[v] for v in values])
      mask = field_mask if mask is None else mask & field_mask
      clean[field] = values
    return clean, mask

  def fetch_k(self, k: int, matching: int) -> int:
    """Results asked of the index on the first pass: k when every product matches, else
    min(N, 2 ceil(k N / m)) for m matching (twice the expected need if they were spread
    evenly). When fewer than min(k, m) of them match, the handler asks for all N."""
    if matching >= self.n:
      return k
    return min(self.n, 2 * math.ceil(k * self.n / matching))

  def k_tier(self, k: int) -> int:
    """The k the index is asked for: k rounded up to 16 * 4^j, capped at N. The exact index
    compiles one top-k program per (batch, k); the tiers keep them few (all compiled by
    `warm_up`), and a longer list answers a shorter request unchanged (the best k first)."""
    tier = K_TIER_BASE
    while tier < k:
      tier *= 4
    return min(tier, self.n)

  # -- the batcher's worker ------------------------------------------------------------------
  def run_batch(self, kind: str, queries: list[Query]) -> list[list[products_lib.Hit]]:
    """One ProductIndex.search_* call for all `queries` (padded to a power-of-two batch, the
    largest fetch_k rounded up to its tier)."""
    n = len(queries)
    padded = queries + [queries[-1]] * (batching.bucket(n, self.config.max_batch) - n)
    k = self.k_tier(max(q.fetch_k for q in queries))
    if kind == "text":
      hits = self.index.search_text(self.encoder, [q.text for q in padded], k)
    elif kind == "image":
      hits = self.index.search_image(self.encoder, [q.image for q in padded], k)
    elif kind == "composed":
      hits = self.index.search_composed(self.encoder, [q.image for q in padded],
                                        [q.text for q in padded], k)
    else:
      raise ValueError(f"unknown query kind {kind!r}; one of {KINDS}.")
    return hits[:n]

  def warm_up(self) -> None:
    """Compiles the towers at every batch size the batcher can send (powers of two)."""
    grey = np.full((self.encoder.image_size, self.encoder.image_size, 3), 128, np.uint8)
    sizes = sorted({batching.bucket(b, self.config.max_batch)
                    for b in range(1, self.config.max_batch + 1)})
    tiers = sorted({self.k_tier(K_TIER_BASE * 4**j) for j in range(16)})  # All, up to N.
    dim = self.encoder.embed_texts(["warm up"]).shape[1]
    for size in sizes:
      queries = [Query("warm up", grey, 1)] * size
      self.run_batch("text", queries)
      self.run_batch("image", queries)
      if self.encoder.supports_composed:
        self.run_batch("composed", queries)
      for tier in tiers:  # The top-k programs of the other tiers (any finite queries do).
        self.index.search(np.full((size, dim), 1.0 / np.sqrt(dim), np.float32), tier)

  # -- what the page shows ---------------------------------------------------------------------
  def info(self) -> dict[str, Any]:
    meta = self.index.meta
    return {
        "num_products": self.n, "model": self.encoder.name, "system": self.encoder.system,
        "index_kind": meta.get("kind"), "dataset": meta.get("dataset"),
        "split": meta.get("split"), "dim": meta.get("dim"),
        "model_dim": meta.get("model_dim", meta.get("dim")),
        "supports_composed": self.encoder.supports_composed,
        "has_thumbnails": self.index.thumbs is not None,
        "fields": sorted(self.index.products[0]) if self.n else [],
        "filters": {f: sorted(t) for f, t in self.filters.items()},
        "default_k": min(self.config.default_k, self.n), "max_k": self.config.max_k,
        "max_upload_bytes": self.config.max_upload_bytes}

  def hit_json(self, rank: int, hit: products_lib.Hit) -> dict[str, Any]:
    return {"rank": rank, "row": hit.row, "id": hit.product.get("product_id", str(hit.row)),
            "score": hit.score, "product": hit.product,
            "thumbnail": f"/thumbs/{hit.row}.png" if self.index.thumbs is not None else None}

  @functools.lru_cache(maxsize=4096)
  def thumbnail_png(self, row: int) -> bytes:
    if self.index.thumbs is None:
      raise BadRequest(404, "this index stores no thumbnails (it was built with "
                            "--thumb_size=0); rebuild it with --thumb_size=64.")
    if not 0 <= row < self.n:
      raise BadRequest(404, f"no product row {row}; rows are 0..{self.n - 1}.")
    out = io.BytesIO()
    Image.fromarray(np.asarray(self.index.thumbs[row], np.uint8)).save(out, format="PNG")
    return out.getvalue()


class _BodyLimit:
  """ASGI middleware: a body over `limit` bytes is refused with 413, from its Content-Length
  before any of it is read, or as soon as the bytes read pass the limit (no Content-Length)."""

  def __init__(self, app, limit: int):
    self.app = app
    self.limit = limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope.get("headers") or []).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > self.limit:
      error = BodyTooLarge(self.limit, int(length))
      response = responses.JSONResponse({"error": error.message, "status": 413}, status_code=413,
                                        headers={"Connection": "close"})
      return await response(scope, receive, send)
    seen = 0

    async def limited():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.limit:
          raise BodyTooLarge(self.limit)
      return message

    return await self.app(scope, limited, send)


def _error(status: int, message: str) -> responses.JSONResponse:
  return responses.JSONResponse({"error": message, "status": status}, status_code=status)


def page_html() -> str:
  """The search page (fashion_jax/serve/static/index.html)."""
  return (importlib.resources.files("fashion_jax.serve") / "static" / "index.html").read_text()


def create_app(loader: Callable[[], tuple[products_lib.ProductIndex, encoders_lib.Encoder]],
               config: ServeConfig | None = None) -> fastapi.FastAPI:
  """The ASGI app (module docstring). `loader` runs once, in a thread, at startup."""
  config = config or ServeConfig()
  state: dict[str, Any] = {"engine": None, "error": None, "since": time.time()}

  def run_batch(kind, queries):
    return state["engine"].run_batch(kind, queries)

  batcher = batching.MicroBatcher(run_batch, max_batch=config.max_batch,
                                  max_wait_ms=config.max_wait_ms)

  def load():
    try:
      index, encoder = loader()
      index.check_model(encoder)  # A stale index is a load failure, not a per-query error.
      engine = Engine(index, encoder, config)
      if config.warmup and engine.n:
        t0 = time.perf_counter()
        engine.warm_up()
        logging.info("Compiled the towers in %.1f s.", time.perf_counter() - t0)
      state["engine"] = engine
      logging.info("Ready: %d products, model %s.", engine.n, encoder.name)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("Loading the model and index failed.")
      state["error"] = f"{type(e).__name__}: {e}"

  @contextlib.asynccontextmanager
  async def lifespan(_):
    batcher.start()
    threading.Thread(target=load, name="load-model", daemon=True).start()
    yield
    await batcher.stop()

  app = fastapi.FastAPI(title="fashion_jax product search", lifespan=lifespan, docs_url="/docs",
                        redoc_url=None)
  app.state.batcher = batcher
  app.state.serve = state
  app.add_middleware(_BodyLimit, limit=config.max_upload_bytes)
  page = page_html()

  @app.exception_handler(BadRequest)
  async def _bad_request(_, e: BadRequest):
    return _error(e.status, e.message)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http(_, e):
    return _error(e.status_code, str(e.detail))

  @app.exception_handler(Exception)
  async def _internal(_, e: Exception):  # A bug: still a JSON answer, with the reason logged.
    logging.exception("Internal error.")
    return _error(500, f"internal error: {type(e).__name__}: {e}")

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def _invalid(_, e):
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}"
             for err in e.errors()]
    return _error(422, "; ".join(parts))

  def engine() -> Engine:
    if state["engine"] is None:
      if state["error"]:
        raise BadRequest(503, f"the model or index failed to load: {state['error']}")
      raise BadRequest(503, "the model and index are still loading; retry shortly (/readyz).")
    return state["engine"]

  async def search(kind: str, text: Any, image: np.ndarray | None, k: Any,
                   filters: Any) -> dict[str, Any]:
    eng = engine()
    t0 = time.perf_counter()
    k = eng.check_k(k)
    if kind != "image":
      text = eng.check_text(text)
    if kind == "composed" and not eng.encoder.supports_composed:
      raise BadRequest(400, f"the {eng.encoder.system} model at {eng.encoder.name} has no "
                            "text-modified image query (TGIR); query by text or by image, or "
                            "serve a FashionViL run.")
    clean, mask = eng.match(filters)
    matching = eng.n if mask is None else int(mask.sum())
    want, passes, fetch, fetched, kept = min(k, matching), 0, 0, 0, []
    while len(kept) < want and (passes == 0 or (passes == 1 and fetched < eng.n)):
      fetch = eng.fetch_k(k, matching) if passes == 0 else eng.n
      try:
        hits = await asyncio.wait_for(batcher.submit(kind, Query(text, image, fetch)),
                                      config.request_timeout_s)
      except asyncio.TimeoutError as e:
        raise BadRequest(503, f"the query took over {config.request_timeout_s} s "
                              "(server overloaded); retry.") from e
      except ValueError as e:  # The search library's bad-input errors.
        raise BadRequest(400, str(e)) from e
      kept = [h for h in hits if mask is None or mask[h.row]][:k]
      passes, fetched = passes + 1, len(hits)
    return {"kind": kind, "text": text if kind != "image" else None, "k": k, "filters": clean,
            "matching": matching, "fetched": fetched, "passes": passes,
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
            "results": [eng.hit_json(i + 1, h) for i, h in enumerate(kept)]}

  async def read_form(request: fastapi.Request) -> Any:
    try:
      return await request.form(max_files=1, max_fields=16)
    except BadRequest:
      raise
    except Exception as e:  # pylint: disable=broad-except  # multipart's parse errors.
      raise BadRequest(400, "the body is not a multipart/form-data form with an 'image' file "
                            f"({type(e).__name__}: {e}).") from e

  async def form_image(form) -> np.ndarray:
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
      raise BadRequest(400, "the form has no 'image' file field.")
    data = await upload.read()
    return await asyncio.get_running_loop().run_in_executor(
        None, decode_image, data, upload.filename or "image", config.max_image_pixels)

  @app.get("/", response_class=responses.HTMLResponse)
  async def index_page():
    return page

  @app.get("/healthz")
  async def healthz():
    return {"status": "alive", "uptime_s": round(time.time() - state["since"], 1)}

  @app.get("/readyz")
  async def readyz():
    if state["engine"] is not None:
      return {"status": "ready", "num_products": state["engine"].n}
    if state["error"]:
      return responses.JSONResponse({"status": "failed", "error": state["error"]}, 503)
    return responses.JSONResponse({"status": "loading"}, 503)

  @app.get("/api/info")
  async def info():
    return engine().info()

  @app.get("/api/stats")
  async def stats():
    return batcher.stats.as_dict()

  @app.post("/api/search/text")
  async def search_text(request: fastapi.Request):
    engine()
    try:
      body = await request.json()
    except BadRequest:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise BadRequest(400, 'the body must be JSON {"text": ..., "k": ..., "filters": {...}} '
                            f"({type(e).__name__}: {e}).") from e
    if not isinstance(body, dict):
      raise BadRequest(400, f"the body must be a JSON object, got {body!r:.200}.")
    unknown = sorted(set(body) - {"text", "k", "filters"})
    if unknown:
      raise BadRequest(400, f"unknown keys {unknown}; a text query takes text, k, filters.")
    return await search("text", body.get("text"), None, body.get("k"), body.get("filters"))

  @app.post("/api/search/image")
  async def search_image(request: fastapi.Request):
    engine()
    form = await read_form(request)
    image = await form_image(form)
    return await search("image", None, image, form.get("k"), form.get("filters"))

  @app.post("/api/search/composed")
  async def search_composed(request: fastapi.Request):
    engine()
    form = await read_form(request)
    image = await form_image(form)
    return await search("composed", form.get("text"), image, form.get("k"), form.get("filters"))

  @app.get("/thumbs/{row}.png")
  async def thumbnail(row: int):
    png = engine().thumbnail_png(row)
    return responses.Response(png, media_type="image/png",
                              headers={"Cache-Control": "public, max-age=86400"})

  return app
