r"""VQ tokenizer quality: reconstruction error and codebook usage of trained runs, and a picture.

    python -m experiments.vq_report --run=ema=runs/vqvae_smoke --run=gradient=runs/vqvae_grad \
        [--split=validation] [--picture=docs/vq_reconstructions.png] [--num=8]

For each `--run=NAME=WORKDIR` (a launch.train workdir of configs/vqvae.py), restores the newest
checkpoint and runs the VQ evaluator (fashion_jax/evaluate/vq.py `Evaluator`) on the
whole split: recon MSE in [-1, 1] pixel units, PSNR (dB, peak-to-peak 2), perplexity of the code
histogram exp(H) (of K codes; higher = more codes in use) and the share of dead codes (never
chosen on the split). Prints a markdown table. --picture writes a PNG: the split's first --num
images (top row), then each run's reconstruction from its codes, one row per run, labelled.
"""

from absl import app
from absl import flags

from fashion_jax.evaluate import vq as vq_eval
from fashion_jax.prepare import vq_codes
from fashion_jax.train import restore

_RUNS = flags.DEFINE_multi_string("run", None, "NAME=WORKDIR of a trained VQ tokenizer.")
_SPLIT = flags.DEFINE_string("split", "validation", "Split to measure.")
_PICTURE = flags.DEFINE_string("picture", "", "Optional PNG of originals and reconstructions.")
_NUM = flags.DEFINE_integer("num", 8, "Images in the picture.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the runs' data.data_dir.")
flags.mark_flags_as_required(["run"])


def report(runs: list[tuple[str, str]], split: str, picture_path: str = "", num: int = 8,
           data_dir: str | None = None) -> list[dict]:
  """Rows {name, codebook, step, recon_mse, psnr, perplexity, dead_frac}; writes the picture."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows, pics, labels, originals = [], [], [], None
  for name, workdir in runs:
    system, params, step = restore.load_trained(workdir)
    config = system.config
    if data_dir is not None:
      config.data.data_dir = data_dir
    m = vq_eval.Evaluator(system, config, split=split).run(params)
    prefix = f"{split}/vq/"
    rows.append(dict(name=name, codebook=system.model.codebook, step=step,
                     num_codes=system.model.num_codes,
                     **{k: m[prefix + k] for k in ("recon_mse", "psnr", "perplexity",
                                                   "dead_frac")}))
    if picture_path:
      images = vq_codes.first_images(config, split, num)
      if originals is not None and not np.array_equal(images, originals):
        raise ValueError(f"Run {name!r} reads other {split} images than the first run: the "
                         "picture compares runs of the same dataset and image size.")
      originals = images
      rec, _ = system.reconstruct(jax.device_get(params), images)
      pics.append(np.asarray(rec))
      labels.append(name)
  if picture_path:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    sheet = vq_codes.picture([originals] + pics, ["original"] + labels)
    Image.fromarray(sheet).save(picture_path, optimize=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runs = []
  for r in _RUNS.value:
    name, sep, workdir = r.partition("=")
    if not sep or not name or not workdir:
      raise app.UsageError(f"--run={r!r}: expected NAME=WORKDIR.")
    runs.append((name, workdir))
  rows = report(runs, _SPLIT.value, _PICTURE.value, _NUM.value, _DATA_DIR.value)
  print(f"VQ tokenizer on split {_SPLIT.value!r} (whole split; dead = never chosen there)")
  print("| run | codebook | steps | recon MSE | PSNR (dB) | perplexity | dead codes |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['codebook']} | {r['step']} | {r['recon_mse']:.4f} | "
          f"{r['psnr']:.2f} | {r['perplexity']:.1f} / {r['num_codes']} | "
          f"{r['dead_frac']:.1%} |")
  if _PICTURE.value:
    print(f"Picture: {_PICTURE.value}")


if __name__ == "__main__":
  app.run(main)
