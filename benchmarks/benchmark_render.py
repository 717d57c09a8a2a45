r"""Single-process speed of the synthetic catalog: products/s per core at a given image size.

    python -m benchmarks.benchmark_render --image_size=64 --num=2000
    python -m benchmarks.benchmark_render --image_size=256 --num=200

Times, in one process (= one core), the stages of a product: sampling its spec, writing its text,
rendering its 2-4 views, and JPEG-encoding them as the TFDS builder does. Target: >= 500
products/s per core at 64 px for spec + text + render. The first products (which fill the pattern,
texture and glyph caches) are rendered before timing starts. Both wall-clock and process CPU
time are reported: on a shared machine the wall clock also counts time the process waited for a
core, the CPU time does not.
"""

import time

from absl import app
from absl import flags

from fashion_jax.data import catalog
from fashion_jax.data import render
from fashion_jax.data.builders import synthetic_catalog

_SIZE = flags.DEFINE_integer("image_size", 64, "Image size in pixels.")
_NUM = flags.DEFINE_integer("num", 2000, "Products to time.")
_SPLIT = flags.DEFINE_enum("split", "train", list(catalog.SPLITS), "Split to sample from.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  size, n = _SIZE.value, _NUM.value
  for i in range(50):  # warm the caches
    render.render_views(catalog.sample_spec(_SPLIT.value, i), size)

  stages = {}
  clock = lambda: (time.perf_counter(), time.process_time())

  def timed(name, fn):
    w, c = clock()
    out = fn()
    w2, c2 = clock()
    stages[name] = (w2 - w, c2 - c)
    return out

  specs = timed("spec", lambda: [catalog.sample_spec(_SPLIT.value, i) for i in range(n)])
  timed("text", lambda: [catalog.describe(s) for s in specs])
  images = timed("render", lambda: [render.render_views(s, size)[0] for s in specs])
  timed("jpeg", lambda: [synthetic_catalog.encode_jpeg(im) for v in images for im in v])

  n_views = sum(len(v) for v in images)
  print(f"{n} products ({n_views / n:.2f} views each) at {size} px, one process:")
  for name, (w, c) in stages.items():
    print(f"  {name:7s} {w / n * 1e3:7.3f} ms/product wall, {c / n * 1e3:7.3f} ms/product CPU")
  for label, keys in (("spec + text + render", ("spec", "text", "render")),
                      ("with JPEG encoding", tuple(stages))):
    w = sum(stages[k][0] for k in keys)
    c = sum(stages[k][1] for k in keys)
    print(f"products/s per core ({label}): {n / w:.0f} wall, {n / c:.0f} CPU")

if __name__ == "__main__":
  app.run(main)
