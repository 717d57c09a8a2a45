r"""Recipe strength: the FashionCLIP recipe (launch.train) against a minimal JAX CLIP, at equal
samples seen, on the synthetic catalog and on a catalog drawn independently (issue 18, item 7).

Per catalog, each arm trains on `train` and is ranked on `test` with the full-candidate protocol
(fashion_jax.evaluate.retrieval: every test product a candidate, text i <-> image i):
  minimal        experiments/minimal_clip.py (word vocabulary, no crop, batch 128)
  <name>         launch.train --config=configs/fashionclip.py:<variant> with the arm's overrides,
                 total_steps = samples / batch_size (samples seen = steps x batch, exactly)
Periodic validation is moved to the end (every=0) so that the arms spend their time training.

  python -m experiments.other_catalog --out=/tmp/rs/other_catalog
  python -m launch.build_data --dataset=synthetic_catalog/smoke --data_dir=/tmp/rs/tfds
  python -m launch.build_data --dataset=image_text_folder/other \
      --manual_dir=/tmp/rs/other_catalog --data_dir=/tmp/rs/tfds
  python -m experiments.recipe_strength --data_dir=/tmp/rs/tfds --workdir=/tmp/rs/runs \
      --samples=12800 --arms=minimal,smoke,own
Results go to <workdir>/<catalog>__<arm>__seed<seed>.json (files without the seed suffix are seed
0); the table prints, per catalog and arm, the mean over seeds and the min-max when there are
several.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

from configs import fashionclip
from experiments import minimal_clip
from fashion_jax.data import tokenizers

CATALOGS = {"synthetic": "synthetic_catalog/smoke", "other": "image_text_folder/other"}
# Arms: (config variant, batch size, extra --config overrides).
ARMS = {
    "smoke": ("smoke", 64, []),
    "smoke_b128": ("smoke", 128, []),
    "smoke_nocrop": ("smoke", 64, ["--config.data.augment.crop_scale=(1.0,1.0)"]),
    "own": ("own", None, []),
    "own_shipped_vocab": ("own", None, ["--config.data.tokenizer.path="]),
    # The own recipe with a random view per example (its default before the view ablation).
    "own_random_view": ("own", None, ["--config.data.view=random"]),
    "own_b128": ("own", 128, []),
}
KEYS = ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10", "SumR")


def read_events(workdir: str, prefix: str = "test/full/") -> dict[str, float]:
  """The last value of every scalar under `prefix` in the run's TensorBoard events."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy; only for the events)
  out = {}
  for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for e in tf.compat.v1.train.summary_iterator(f):
      for v in e.summary.value:
        if v.tag.startswith(prefix):
          val = v.simple_value if v.HasField("simple_value") else float(
              tf.make_ndarray(v.tensor))
          out[v.tag[len(prefix):]] = val
  return out


def run_framework(catalog: str, arm: str, data_dir: str, workdir: str, samples: int,
                  seed: int) -> dict:
  variant, batch, extra = ARMS[arm]
  if batch is None:  # The variant's own batch size.
    batch = fashionclip.get_config(variant).batch_size
  # The own variant's tokenizer: a CLIP BPE learnt on the catalog's train texts.
  if variant == "own" and not any("tokenizer.path" in e for e in extra):
    vocab = os.path.join(workdir, f"vocab_{catalog}")
    if not os.path.isfile(os.path.join(vocab, "vocab.json")):
      tokenizers.build_catalog_bpe(tokenizers.dataset_texts(CATALOGS[catalog], data_dir), vocab)
    extra = extra + [f"--config.data.tokenizer.path={vocab}"]
  if samples % batch:
    raise ValueError(f"samples={samples} is not a multiple of arm {arm!r}'s batch {batch}.")
  steps = samples // batch
  run_dir = os.path.join(workdir, f"{catalog}__{arm}__seed{seed}")  # A fresh run per seed.
  cmd = [sys.executable, "-m", "launch.train", f"--config=configs/fashionclip.py:{variant}",
         f"--workdir={run_dir}", f"--config.data.name={CATALOGS[catalog]}",
         f"--config.data.data_dir={data_dir}", f"--config.batch_size={batch}",
         f"--config.total_steps={steps}", f"--config.seed={seed}",
         "--config.evals.retrieval_validation.every=0",
         f"--config.checkpoint.every_steps={steps}", "--alsologtostderr=false", *extra]
  with open(run_dir + ".log", "w") as log:
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  res = read_events(run_dir)
  res.update(samples_seen=steps * batch, steps=steps, batch=batch, command=" ".join(cmd[1:]))
  return res


def mark_survival(boxes: np.ndarray, crop_scale=(0.7, 1.0), size: int = 64, draws: int = 64,
                  seed: int = 0) -> float:
  """Fraction of the pipeline's random crops (area crop_scale, aspect 3/4..4/3, the same
  tf.image.stateless_sample_distorted_bounding_box call) that keep a whole mark.

  boxes: float [N, 4] (ymin, xmin, ymax, xmax) of each product's mark, fractions of the image.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy; only for the crops)
  kept = []
  for k in range(draws):
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        [size, size, 3], tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=[seed, k],
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=tuple(crop_scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
    y0, x0 = int(begin[0]) / size, int(begin[1]) / size
    y1, x1 = y0 + int(extent[0]) / size, x0 + int(extent[1]) / size
    kept.append((boxes[:, 0] >= y0) & (boxes[:, 1] >= x0) & (boxes[:, 2] <= y1)
                & (boxes[:, 3] <= x1))
  return float(np.mean(kept))


def token_stats(texts: list[str], tok) -> dict[str, float]:
  """Tokens per word and the fraction of distinct words split into several tokens."""
  words = sorted({w for t in texts for w in minimal_clip.WORD.findall(t.lower())})
  pieces = [len(tok.hf.tokenize(w)) for w in words]
  total = sum(len(tok.hf.tokenize(t)) for t in texts)
  return dict(words=len(words), split_frac=float(np.mean([p > 1 for p in pieces])),
              tokens_per_text=total / len(texts))


def stats(data_dir: str, workdir: str) -> dict:
  """Per catalog: token_stats of the train texts with the shipped and the catalog vocabulary
  (<workdir>/vocab_<catalog>, built if absent), and mark_survival of the brand mark under the
  smoke crop (0.7, 1.0) and the own recipe's (1, 1)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = {}
  for catalog, name in CATALOGS.items():
    texts = tokenizers.dataset_texts(name, data_dir)
    vocab = os.path.join(workdir, f"vocab_{catalog}")
    if not os.path.isfile(os.path.join(vocab, "vocab.json")):
      tokenizers.build_catalog_bpe(texts, vocab)
    out[catalog] = dict(
        shipped=token_stats(texts, tokenizers.get_tokenizer("clip", "", 64)),
        catalog=token_stats(texts, tokenizers.get_tokenizer("clip", vocab, 64)))
    if catalog == "synthetic":  # The front view's logo_box feature.
      ds = tfds.builder(name, data_dir=data_dir).as_dataset(
          split="train", decoders={"images": tfds.decode.SkipDecoding()})
      rows = [(ex["logo_box"], len(ex["images"])) for ex in ds.as_numpy_iterator()]
      boxes = np.array([[float(v) for v in b.decode().split()] for b, _ in rows])
      out[catalog]["mean_views"] = float(np.mean([n for _, n in rows]))
    else:  # other_catalog: the 3x3 mark of 3 px cells at 84..93 of 96 px.
      boxes = np.array([[84 / 96, 84 / 96, 93 / 96, 93 / 96]])
    for scale in ((0.7, 1.0), (1.0, 1.0)):
      out[catalog][f"mark_kept_crop{scale[0]}"] = mark_survival(boxes, scale)
  return out


def _result_key(path: str) -> tuple[str, str, int]:
  """(catalog, arm, seed) of a result file; files without a seed suffix are seed 0."""
  parts = os.path.basename(path)[:-len(".json")].split("__")
  seed = int(parts.pop()[len("seed"):]) if parts[-1].startswith("seed") else 0
  return parts[0], parts[1], seed


def table(workdir: str) -> str:
  """Per (catalog, arm): the mean over seeds of each metric, its min-max when n > 1."""
  runs = {}
  for f in sorted(glob.glob(os.path.join(workdir, "*__*.json"))):
    catalog, arm, seed = _result_key(f)
    runs.setdefault((catalog, arm), {})[seed] = json.load(open(f))
  rows = ["| catalog | arm | seeds | samples | batch | " + " | ".join(KEYS) + " |",
          "|---|---|---|---|---|" + "---|" * len(KEYS)]
  for (catalog, arm), by_seed in sorted(runs.items()):
    first = next(iter(by_seed.values()))
    cells = []
    for k in KEYS:
      vals = np.array([r.get(k, np.nan) for r in by_seed.values()])
      cells.append(f"{vals.mean():.3f}" + (f" ({vals.min():.3f}-{vals.max():.3f})"
                                           if len(vals) > 1 else ""))
    rows.append(f"| {catalog} | {arm} | {','.join(map(str, sorted(by_seed)))} | "
                f"{first['samples_seen']} | {first['batch']} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--samples", type=int, default=12800)
  p.add_argument("--catalogs", default="synthetic,other")
  p.add_argument("--arms", default="minimal,smoke,own")
  p.add_argument("--seeds", default="0", help="comma-separated; each arm runs once per seed")
  p.add_argument("--table_only", action="store_true")
  p.add_argument("--stats", action="store_true",
                 help="only the tokenisation and crop statistics (no training)")
  a = p.parse_args(argv)
  os.makedirs(a.workdir, exist_ok=True)
  if a.stats:
    print(json.dumps(stats(a.data_dir, a.workdir), indent=1))
    return
  if not a.table_only:
    arms = a.arms.split(",")
    for arm in arms:
      if arm != "minimal" and arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; expected minimal or one of {sorted(ARMS)}.")
    for seed in [int(s) for s in a.seeds.split(",")]:
      for catalog in a.catalogs.split(","):
        for arm in arms:
          out = os.path.join(a.workdir, f"{catalog}__{arm}__seed{seed}.json")
          if arm == "minimal":
            res = minimal_clip.train_and_eval(CATALOGS[catalog], a.data_dir, samples=a.samples,
                                              seed=seed)
          else:
            res = run_framework(catalog, arm, a.data_dir, a.workdir, a.samples, seed)
          res["seed"] = seed
          with open(out, "w") as f:
            json.dump(res, f, indent=1)
          print(catalog, arm, seed, {k: round(res.get(k, np.nan), 3) for k in KEYS}, flush=True)
  print(table(a.workdir))


if __name__ == "__main__":
  main()
