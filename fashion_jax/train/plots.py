r"""A PNG summary of a training run: learning curves and evaluation metrics over steps.

    python -m fashion_jax.train.plots --workdir=runs/fashionclip_smoke   # -> <workdir>/summary.png

Reads the scalars the trainer writes through clu's metric writers (TensorBoard event files in
the workdir, `events.out.tfevents.*`; clu stores scalars as tensor summaries) and draws one
panel per group:
  * train/loss (with its exponential moving average, alpha = 0.3, when there are > 10 points);
  * the other train/* scalars (accuracies, logit scale, lr, norms), one panel each;
  * evaluation metrics over steps: for each '<split>/<protocol>' the R@K / HITS@K / acc / F1
    scalars in [0, 1] that were logged at two or more steps, one panel per split/protocol;
  * evaluation scalars logged only once (the end-of-run table) are listed as text.
launch/train.py calls `write_summary(workdir)` at the end of every run (chief process only).
"""

import collections
import glob
import math
import os

import numpy as np

_CURVE_METRICS = ("R@1", "R@5", "R@10", "HITS@1", "HITS@5", "HITS@10", "acc", "f1", "MRR")


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)] sorted by step} from every event file in `workdir` (not recursive).

  A step written twice (a resumed run) keeps the last value read.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"No TensorBoard event files (events.out.tfevents.*) in {workdir}.")
  out = collections.defaultdict(dict)
  for path in files:
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
      for ev in acc.Scalars(tag):
        out[tag][ev.step] = float(ev.value)
    for tag in tags.get("tensors", []):
      for ev in acc.Tensors(tag):
        arr = _tensor_value(ev.tensor_proto)
        if arr is not None:
          out[tag][ev.step] = arr
  return {t: sorted(v.items()) for t, v in out.items() if v}


def _tensor_value(proto) -> float | None:
  """A scalar float tensor proto -> float; anything else (hparams, strings) -> None."""
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  try:
    arr = tensor_util.make_ndarray(proto)
  except (TypeError, ValueError):
    return None
  if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def _ema(values: np.ndarray, alpha: float = 0.3) -> np.ndarray:
  out = np.empty_like(values)
  acc = values[0]
  for i, v in enumerate(values):
    acc = alpha * v + (1 - alpha) * acc
    out[i] = acc
  return out


def _panels(scalars):
  """[(title, [(label, steps, values)])] and the once-logged eval scalars {tag: value}."""
  panels = []
  if "train/loss" in scalars:
    steps, vals = map(np.asarray, zip(*scalars["train/loss"]))
    lines = [("loss", steps, vals)]
    if len(vals) > 10:
      lines.append(("EMA 0.3", steps, _ema(vals)))
    panels.append(("train/loss", lines))
  for tag in sorted(t for t in scalars if t.startswith("train/") and t != "train/loss"):
    steps, vals = map(np.asarray, zip(*scalars[tag]))
    panels.append((tag, [(tag.split("/", 1)[1], steps, vals)]))
  groups = collections.defaultdict(list)
  once = {}
  for tag, series in sorted(scalars.items()):
    if tag.startswith("train/") or "/" not in tag:
      continue
    group, _, metric = tag.rpartition("/")
    if len(series) >= 2 and metric.split("_")[-1] in _CURVE_METRICS:
      steps, vals = map(np.asarray, zip(*series))
      groups[group].append((metric, steps, vals))
    elif len(series) == 1 and metric.split("_")[-1] in _CURVE_METRICS:
      once[tag] = series[0][1]
  for group, lines in sorted(groups.items()):
    # HITS@K duplicates R@K when each query has one positive (our evaluators): drawn once.
    names = {m for m, _, _ in lines}
    lines = [l for l in lines if not (l[0].replace("HITS@", "R@") != l[0]
                                      and l[0].replace("HITS@", "R@") in names)]
    panels.append((group, lines))
  return panels, once


def write_summary(workdir: str, out: str | None = None, *, title: str | None = None) -> str:
  """Draws the summary PNG of `workdir` (module docstring) to `out` (default
  <workdir>/summary.png) and returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  scalars = read_scalars(workdir)
  panels, once = _panels(scalars)
  if not panels:
    raise ValueError(f"{workdir}: the event files hold no train/ or evaluation scalars.")
  cols = min(3, len(panels) + bool(once))
  rows = math.ceil((len(panels) + bool(once)) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
  for ax, (name, lines) in zip(axes.flat, panels):
    for label, steps, vals in lines:
      ax.plot(steps, vals, label=label, lw=1.4, marker="o" if len(steps) < 12 else None, ms=3)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend(fontsize=6, ncol=2)
  if once:
    ax = axes.flat[len(panels)]
    ax.axis("off")
    picked = [t for t in once if t.endswith(("t2i_R@10", "i2t_R@10", "_acc"))] or list(once)
    text = "\n".join(f"{t}: {once[t]:.3f}" for t in sorted(picked)[:18])
    ax.text(0, 1, "end of run\n" + text, va="top", family="monospace", fontsize=7)
  for ax in list(axes.flat)[len(panels) + bool(once):]:
    ax.axis("off")
  fig.suptitle(title or os.path.basename(os.path.normpath(workdir)), fontsize=10)
  fig.tight_layout()
  out = out or os.path.join(workdir, "summary.png")
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def main(argv=None):
  # argparse, not absl flags: launch/train.py imports this module and owns --workdir.
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="Training workdir (event files).")
  parser.add_argument("--out", default=None, help="PNG path (default <workdir>/summary.png).")
  args = parser.parse_args(argv)
  print("wrote", write_summary(args.workdir, args.out))


if __name__ == "__main__":
  main()
