r"""Load test of the search service: many concurrent clients against `python -m launch.serve`.

    python -m launch.search build --model=runs/fashionclip_smoke \
        --dataset=synthetic_catalog/smoke --split=test --index_dir=runs/search_test
    python -m benchmarks.load_serve --index_dir=runs/search_test --num_queries=1000 \
        --concurrency=16 --out=/tmp/load_serve.json

Starts the server in a subprocess on a free localhost port (or uses --url), waits for /readyz,
sends --warmup_queries unmeasured queries, then --num_queries from --concurrency concurrent
clients (asyncio + httpx, one connection each, each client sending its next query when the
last one is answered: a closed loop). Queries: the indexed products' titles as text queries,
--image_fraction of them image uploads (a product's thumbnail as PNG), --filter_fraction of
them with a filter on one tag (--filter_field, a random value of it).

Measured: latency per query (send to full response), p50 / p90 / p99 / max; QPS = queries /
wall seconds of the measured phase; errors = responses other than 200 plus transport failures
(goal: none); the server's resident memory (RSS, psutil) when ready, after the warm-up and after
the load; the server's batching (requests per model call, from /api/stats). The client runs on
the same machine as the server: on a small machine it takes a share of the CPU.
"""

import asyncio
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags
import httpx
import numpy as np
import psutil
from PIL import Image

_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Product index to serve.")
_MODEL = flags.DEFINE_string("model", None, "Model (default: the index's).")
_URL = flags.DEFINE_string("url", None, "An already running server (then --index_dir is only "
                           "read for the queries, and no RSS is measured).")
_N = flags.DEFINE_integer("num_queries", 1000, "Measured queries.")
_WARMUP = flags.DEFINE_integer("warmup_queries", 48, "Unmeasured queries first.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Concurrent clients.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_IMAGE = flags.DEFINE_float("image_fraction", 0.1, "Share of image-upload queries.")
_FILTER = flags.DEFINE_float("filter_fraction", 0.25, "Share of queries with a tag filter.")
_FILTER_FIELD = flags.DEFINE_string("filter_field", "brand", "Tag field the filters use.")
_SERVER_ARGS = flags.DEFINE_list("server_args", [], "Extra launch.serve flags, e.g. "
                                 "max_wait_ms=2,max_batch=8 (without --).")
_SEED = flags.DEFINE_integer("seed", 0, "Query mix seed.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def make_queries(index_dir: str, info: dict, n: int, seed: int) -> list[dict]:
  """n query specs: {'kind', 'text' | 'png', 'filters'} (module docstring)."""
  rng = random.Random(seed)
  with open(os.path.join(index_dir, "products.json")) as f:
    items = json.load(f)
  thumbs_path = os.path.join(index_dir, "thumbs.npy")
  thumbs = np.load(thumbs_path, mmap_mode="r") if os.path.exists(thumbs_path) else None
  values = info["filters"].get(_FILTER_FIELD.value, [])
  queries = []
  for _ in range(n):
    row = rng.randrange(len(items))
    filters = ({_FILTER_FIELD.value: rng.choice(values)}
               if values and rng.random() < _FILTER.value else {})
    if thumbs is not None and rng.random() < _IMAGE.value:
      queries.append({"kind": "image", "png": _png(np.asarray(thumbs[row])), "filters": filters})
    else:
      queries.append({"kind": "text", "text": items[row].get("title") or items[row]["product_id"],
                      "filters": filters})
  return queries


async def _one(client: httpx.AsyncClient, q: dict) -> tuple[float, int | str, str]:
  t0 = time.perf_counter()
  try:
    if q["kind"] == "text":
      r = await client.post("/api/search/text",
                            json={"text": q["text"], "k": _K.value, "filters": q["filters"]})
    else:
      r = await client.post("/api/search/image", files={"image": ("q.png", q["png"], "image/png")},
                            data={"k": str(_K.value), "filters": json.dumps(q["filters"])})
    r.read()
    status = r.status_code
  except httpx.HTTPError as e:
    status = type(e).__name__
  return time.perf_counter() - t0, status, q["kind"]


async def run_load(url: str, queries: list[dict], concurrency: int) -> tuple[list, float]:
  """Closed-loop clients; -> ([(seconds, status, kind)], wall seconds)."""
  pending = list(reversed(queries))
  results = []

  async def worker():
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=1)) as client:
      while pending:
        results.append(await _one(client, pending.pop()))

  t0 = time.perf_counter()
  await asyncio.gather(*(worker() for _ in range(concurrency)))
  return results, time.perf_counter() - t0


def _rss(proc: psutil.Process | None) -> float | None:
  return None if proc is None else round(proc.memory_info().rss / 2**20, 1)


def main(argv):
  del argv
  if not _INDEX_DIR.value:
    raise app.UsageError("--index_dir is required (the queries are its products).")
  load_before = os.getloadavg()
  server, ps, started = None, None, time.perf_counter()
  url = _URL.value
  if url is None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "launch.serve", f"--index_dir={_INDEX_DIR.value}",
           f"--port={port}"] + ([f"--model={_MODEL.value}"] if _MODEL.value else []) + [
               f"--{a}" for a in _SERVER_ARGS.value]
    server = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    ps = psutil.Process(server.pid)
  try:
    while True:
      if server is not None and server.poll() is not None:
        raise SystemExit(f"the server exited with {server.returncode}")
      try:
        r = httpx.get(f"{url}/readyz", timeout=5)
        if r.status_code == 200:
          break
        if r.json().get("status") == "failed":
          raise SystemExit(f"the server failed to load: {r.json()['error']}")
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    ready_s = time.perf_counter() - started
    info = httpx.get(f"{url}/api/info").json()
    rss_ready = _rss(ps)
    queries = make_queries(_INDEX_DIR.value, info, _WARMUP.value + _N.value, _SEED.value)
    asyncio.run(run_load(url, queries[:_WARMUP.value], _CONCURRENCY.value))
    rss_before = _rss(ps)
    stats0 = httpx.get(f"{url}/api/stats").json()
    results, wall = asyncio.run(run_load(url, queries[_WARMUP.value:], _CONCURRENCY.value))
    stats1 = httpx.get(f"{url}/api/stats").json()
    rss_after = _rss(ps)
  finally:
    if server is not None:
      server.terminate()
      server.wait(30)
  lat = np.array([s for s, _, _ in results]) * 1000
  errors = [st for _, st, _ in results if st != 200]
  by_kind = {kind: round(float(np.percentile([s * 1000 for s, _, k in results if k == kind], 50)),
                         1) for kind in sorted({k for _, _, k in results})}
  batches = stats1["batches"] - stats0["batches"]
  out = {
      "num_queries": len(results), "concurrency": _CONCURRENCY.value, "k": _K.value,
      "num_products": info["num_products"], "model": info["model"], "system": info["system"],
      "index_kind": info["index_kind"], "qps": round(len(results) / wall, 1),
      "wall_s": round(wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
      "p90_ms": round(float(np.percentile(lat, 90)), 1),
      "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1),
      "p50_ms_by_kind": by_kind, "errors": len(errors),
      "error_kinds": sorted({str(e) for e in errors}),
      "requests_per_model_call": round((stats1["requests"] - stats0["requests"]) / batches, 2)
      if batches else None,
      "rss_mib_ready": rss_ready, "rss_mib_before_load": rss_before,
      "rss_mib_after_load": rss_after,
      "server_ready_s": round(ready_s, 1), "server_args": _SERVER_ARGS.value,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
      "loadavg_before": [round(x, 2) for x in load_before],
      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
  print(json.dumps(out, indent=1))
  print(f"| {out['num_queries']} | {out['concurrency']} | {out['qps']} | {out['p50_ms']} | "
        f"{out['p99_ms']} | {out['errors']} | {out['requests_per_model_call']} | "
        f"{out['rss_mib_before_load']} -> {out['rss_mib_after_load']} |")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
