r"""model.field_dedup and its alternatives, timed side by side on real multi-field batches.

The loss and gradient of configs/fashionsiglip.py:smoke (64 products, title + description and
five attribute fields, Matryoshka 32/64/128; the optimizer update left out: it is the same in
every row) on batches from the real input pipeline, for each row:

  off            model.field_dedup=0: all B x F = 320 field texts encoded
  dedup          model.field_dedup=128, as shipped (contrastive.encode_distinct: the distinct
                 texts encoded in 128 rows; a lax.cond falls back to the full encode, which is
                 rematerialised)
  cond_no_remat  the same lax.cond with a plain fallback branch: under autodiff its
                 activations are carried out of the forward (zero-filled) on every step
  no_fallback    the distinct rows encoded with no lax.cond at all: the floor of the idea, and
                 wrong for a batch with more than 128 distinct texts (measurement only)

Rows are compiled first, then timed in interleaved rounds (each round: every row over the same
--batches batches), in one process; the load average is printed before and after. Every row's
loss must equal the `off` row's (rtol 1e-5), or the command stops.

COMMAND
  python -m launch.build_data --dataset=synthetic_catalog/smoke
  python -m benchmarks.field_dedup --rounds=3 --batches=4
"""

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax import configs
from fashion_jax import systems
from fashion_jax.data import pipeline
from fashion_jax.losses import contrastive

CONFIG = "configs/fashionsiglip.py:smoke"
SHIPPED = contrastive.encode_distinct


def _distinct(ids, max_distinct):
  n = ids.shape[0]
  rows, inverse, counts = jnp.unique(ids, axis=0, size=n, return_inverse=True,
                                     return_counts=True)
  return rows[:max_distinct], inverse.reshape(n), jnp.sum(counts > 0) <= max_distinct


def cond_no_remat(encode, ids, max_distinct):
  rows, inverse, fits = _distinct(ids, max_distinct)
  out = jax.lax.cond(fits, lambda: jax.tree.map(lambda e: e[inverse], encode(rows)),
                     lambda: encode(ids))
  return out, jnp.int32(0), jnp.logical_not(fits)


def no_fallback(encode, ids, max_distinct):
  rows, inverse, _ = _distinct(ids, max_distinct)
  return jax.tree.map(lambda e: e[inverse], encode(rows)), jnp.int32(0), jnp.bool_(False)


ROWS = (("off", 0, SHIPPED), ("dedup", 128, SHIPPED), ("cond_no_remat", 128, cond_no_remat),
        ("no_fallback", 128, no_fallback))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--data_dir", default="", help="the built synthetic_catalog/smoke")
  args = parser.parse_args()
  print(f"load average before: {os.getloadavg()}", flush=True)
  base = configs.get(CONFIG)
  base.data.data_dir = args.data_dir
  it = pipeline.make_train_iterator(base)
  host = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(args.batches)]
  ft = host[0]["field_text"]
  print(f"field texts per batch: {ft.shape[0] * ft.shape[1]}; distinct: "
        f"{[len(np.unique(b['field_text'].reshape(-1, ft.shape[-1]), axis=0)) for b in host]}")
  compiled = {}
  for name, dedup, impl in ROWS:
    config = configs.get(CONFIG)
    config.model.field_dedup = dedup
    system = systems.get_system(config)
    batches = [{k: jnp.asarray(b[k]) for k in system.required_features(config)} for b in host]
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(2)))
    contrastive.encode_distinct = impl  # Read by system.loss while it is traced, just below.
    try:
      fn = jax.jit(jax.value_and_grad(lambda p, b, s=system: s.loss(p, b, None), has_aux=True))
      fn = fn.lower(params, batches[0]).compile()
    finally:
      contrastive.encode_distinct = SHIPPED
    (loss, _), _ = fn(params, batches[0])
    compiled[name] = (fn, params, batches, float(loss))
  want = compiled["off"][3]
  for name, (_, _, _, loss) in compiled.items():
    if not np.isclose(loss, want, rtol=1e-5):
      raise SystemExit(f"row {name}: loss {loss} differs from the off row's {want}")
  times = {name: [] for name in compiled}
  for _ in range(args.rounds):
    for name, (fn, params, batches, _) in compiled.items():
      t0 = time.perf_counter()
      for b in batches:
        out = fn(params, b)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / len(batches) * 1e3)
  off = statistics.median(times["off"])
  print("| row | loss + gradient ms (median, min-max) | off / row |")
  print("|---|---|---|")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"| {name} | {med:,.0f} ({min(ts):,.0f}-{max(ts):,.0f}) | {off / med:.2f}x |")
  print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
  main()
