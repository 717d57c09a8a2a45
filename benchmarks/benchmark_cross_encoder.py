r"""Benchmark: pairs/s of FashionBERT's cross-encoder scoring (evaluate/cross_encoder.PairScorer).

COMMAND
  python -m benchmarks.benchmark_cross_encoder                          # smoke model, CPU
  python -m benchmarks.benchmark_cross_encoder --variant=base --pairs=16384 --pair_batch=2048 \
      --dtype=bfloat16 --out=/tmp/xenc_base.json                    # BERT-base, e.g. on a GPU

What is timed: the evaluator's own scoring loop, `PairScorer.score`, on M (text, image) index
pairs against device tables of N token rows [N, L] and N cached patch-feature rows [N, P, F]:
per batch of `pair_batch` pairs one jitted call that gathers the rows on each device and runs
the joint BERT ([CLS, text, SEP, P patches]) and the alignment head. The index vectors are
sharded over the batch axes of a mesh over ALL local devices (`--mesh_data=-1`), so the same
command measures one CPU, 8 fake CPU devices or a GPU/TPU host: nothing in it names a platform.
Compilation is excluded (PairScorer's warm-up batch); each repeat scores the same M pairs and the
reported rate is the median over `--repeats` (min and max are reported too).

The patch CNN is NOT in the loop: the evaluator computes each image's patch features once per
split (N images, not M pairs), which is the point of caching them. The one-off cost of that
pass is measured separately (`features_per_s`, images/s through the frozen CNN).

Model weights are random (a fresh init): the rate does not depend on the values. Output: one
JSON object on stdout and in --out (devices, platform, model sizes, pairs/s median/min/max,
seconds per repeat, images/s of the feature pass).
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="smoke", choices=("smoke", "base"),
                  help="configs/fashionbert.py variant (model sizes; base = BERT-base + "
                  "ResNet-50 features, F = 2048).")
  ap.add_argument("--grid", type=int, default=None,
                  help="Patches per side (default: config); the patch size in pixels is kept.")
  ap.add_argument("--max_len", type=int, default=None, help="Text tokens (default: config).")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--num_items", type=int, default=512, help="N rows in each table.")
  ap.add_argument("--pairs", type=int, default=4096, help="M pairs scored per repeat.")
  ap.add_argument("--pair_batch", type=int, default=512, help="Pairs per jitted call.")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--mesh_data", type=int, default=-1,
                  help="Devices on the data axis (-1 = all local devices).")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="Also write the JSON here.")
  args = ap.parse_args()
  for name in ("num_items", "pairs", "pair_batch", "repeats"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name}={getattr(args, name)} must be positive.")

  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from configs import fashionbert as fb_config  # pylint: disable=g-import-not-at-top
  from fashion_jax.evaluate import cross_encoder  # pylint: disable=g-import-not-at-top
  from fashion_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from fashion_jax.systems import fashionbert as fb_system  # pylint: disable=g-import-not-at-top

  config = fb_config.get_config(args.variant)
  config.model.dtype = args.dtype
  if args.grid is not None:
    patch_px = config.data.image_size // config.model.grid  # Keep the patch size in pixels.
    config.model.grid = config.data.patch_mask.grid = args.grid
    config.data.image_size = args.grid * patch_px
  if args.max_len is not None:
    config.data.max_len = args.max_len
  system = fb_system.System(config)
  mesh = mesh_lib.create_mesh({"data": args.mesh_data, "fsdp": 1, "tensor": 1})
  params = nn.unbox(jax.jit(system.init)(jax.random.key(args.seed), system.dummy_batch(1)))

  rng = np.random.default_rng(args.seed)
  n, l, s = args.num_items, config.data.max_len, config.data.image_size
  tok = system.tokenizer
  lengths = rng.integers(l // 2, l + 1, n)
  tokens = rng.integers(1000, tok.vocab_size, (n, l)).astype(np.int32)
  tokens[:, 0] = tok.bos_token_id
  tokens[np.arange(n), lengths - 1] = tok.eos_token_id
  tokens = np.where(np.arange(l)[None] < lengths[:, None], tokens, tok.pad_token_id)

  # The one-off feature pass (frozen CNN over every image's patches), images/s.
  images = rng.integers(0, 256, (min(n, 64), s, s, 3)).astype(np.uint8)
  feat_fn = jax.jit(system.patch_features)
  jax.block_until_ready(feat_fn(params, images))
  start = time.perf_counter()
  one = np.asarray(feat_fn(params, images))
  feat_seconds = time.perf_counter() - start
  features = np.concatenate([one] * -(-n // len(one)))[:n]
  features = features + rng.normal(0, 0.01, features.shape).astype(np.float32)

  scorer = cross_encoder.PairScorer(system, mesh, pair_batch=args.pair_batch,
                                    pad_token_id=tok.pad_token_id)
  tables = scorer.tables(tokens, features)
  text_idx = rng.integers(0, n, args.pairs)
  image_idx = rng.integers(0, n, args.pairs)
  seconds = []
  for _ in range(args.repeats):
    scores, sec = scorer.score(params, tables, text_idx, image_idx)
    if not np.all(np.isfinite(scores)):
      raise RuntimeError("non-finite pair scores")
    seconds.append(sec)
  rates = [args.pairs / x for x in seconds]
  devices = jax.devices()
  result = {
      "benchmark": "cross_encoder_pairs_per_s",
      "platform": devices[0].platform, "device_kind": devices[0].device_kind,
      "num_devices": len(devices), "mesh": dict(mesh.shape), "host": platform.processor() or
      platform.machine(),
      "variant": args.variant, "dtype": args.dtype,
      "bert": dict(hidden=system.model.bert.hidden_size, layers=system.model.bert.num_layers),
      "text_len": l, "patches": system.model.num_patches, "feature_dim": system.model.feature_dim,
      "sequence_len": l + system.model.num_patches,
      "pairs": args.pairs, "pair_batch": scorer.pair_batch, "repeats": args.repeats,
      "pairs_per_s_median": statistics.median(rates), "pairs_per_s_min": min(rates),
      "pairs_per_s_max": max(rates), "seconds": seconds,
      "features_images_per_s": len(images) / feat_seconds,
  }
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
