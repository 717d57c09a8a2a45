r"""FashionViL's MPFC targets: the frozen VQ tokenizer's codes of every train view, cached once.

As a prepared artefact (`make`, called by launch.prepare for a FashionViL config with
objective.tasks.mpfc > 0):
  1. the tokenizer config (`tokenizer_config`): the configs/vqvae.py variant whose downsampling
     (data.image_size / model.grid) equals the FashionViL config's (data.image_size /
     data.patch_mask.grid): smoke (64 px -> 4 x 4) for fashionvil.py:smoke, base (224 px ->
     7 x 7) for base; given the FashionViL config's data.name, data_dir, train_split, image_size,
     model.grid = data.patch_mask.grid and model.num_codes (the MPFC head's classes), then the
     caller's overrides (e.g. total_steps). Another variant or file: `spec`.
  2. trained into <workdir>/prepared/vqvae by the normal trainer (train/loop.py): a rerun
     resumes from its newest checkpoint, a finished one (newest checkpoint = total_steps) is not
     trained again, a preempted one raises `Interrupted` (rerun to resume);
  3. its newest checkpoint encodes every view of every train product (`cache_codes`) into
     <workdir>/prepared/vq_codes.npz; launch.train fills data.vq_codes with it.

Cached codes (`cache_codes`): every view of every product of a split, decoded and resized
EXACTLY as the training pipeline does with crop_scale (1, 1) and no flip (the whole view,
bilinear, rounded to uint8: pipeline.random_resized_crop), encoded by the frozen tokenizer.
Saved as npz: product_id [P] (str), codes int16 [P, V, g*g] (V = most views of a product; -1 for
views a product lacks), num_views int32 [P], grid, image_size. The pipeline looks the codes up
by product_id and view (data.vq_codes), so MPFC targets are computed once, not every step.

From a tokenizer trained alone (launch.train --config=configs/vqvae.py:...), with a picture of
originals above their reconstructions:
  python -m fashion_jax.prepare.vq_codes --config=configs/vqvae.py:smoke \
      --workdir=runs/vqvae_smoke --out=runs/vqvae_smoke/codes.npz \
      [--picture=runs/vqvae_smoke/recon.png]
"""

import os
from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from configs import vqvae as vqvae_configs
from fashion_jax import configs as configs_lib
from fashion_jax import systems
from fashion_jax.checkpoint import manager as checkpoint
from fashion_jax.data import pipeline
from fashion_jax.evaluate import common
from fashion_jax.models import vqvae as vqvae_lib
from fashion_jax.prepare import manifest
from fashion_jax.train import loop
from fashion_jax.train import restore

TOKENIZER_DIR = "vqvae"  # Under <workdir>/prepared/.


class Interrupted(RuntimeError):
  """The tokenizer's training was preempted (SIGTERM); its checkpoint is saved: rerun."""


def cache_codes(system, params, config, out_path: str, split: str = "train",
                batch_size: int = 64) -> dict[str, np.ndarray]:
  """Encodes every view of every product of `split`; writes and returns the npz arrays."""
  size = int(config.data.image_size)
  encode = jax.jit(lambda p, x: system.encode(p, x))
  params = jax.device_get(params)

  ids, per_product = [], []
  pending, owners = [], []

  def flush():
    if not pending:
      return
    x = np.stack(pending)
    pad = (-len(x)) % batch_size
    codes = np.asarray(encode(params, np.concatenate([x, np.zeros((pad,) + x.shape[1:],
                                                                   np.uint8)])))[:len(x)]
    for (p, v), c in zip(owners, codes):
      per_product[p][v] = c
    pending.clear()
    owners.clear()

  for pid, crops in pipeline.whole_views(config.data, split):
    ids.append(pid.decode("utf-8"))
    per_product.append([None] * len(crops))
    for v, crop in enumerate(crops):
      pending.append(crop)
      owners.append((len(ids) - 1, v))
      if len(pending) == batch_size:
        flush()
  flush()
  if not ids:
    raise ValueError(f"Split {split!r} of {config.data.name} is empty.")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{config.data.name}:{split} repeats product ids; codes are looked up by id.")
  max_views = max(len(v) for v in per_product)
  n = system.grid ** 2
  codes = np.full((len(ids), max_views, n), -1, np.int16)
  for p, vs in enumerate(per_product):
    for v, c in enumerate(vs):
      codes[p, v] = c
  out = dict(product_id=np.asarray(ids), codes=codes,
             num_views=np.asarray([len(v) for v in per_product], np.int32),
             grid=np.asarray(system.grid, np.int32), image_size=np.asarray(size, np.int32))
  np.savez(out_path, **out)
  return out


def first_images(config, split: str = "validation", num: int = 8) -> np.ndarray:
  """The first `num` eval images (resize + centre crop) of `split`: uint8 [num, S, S, 3]."""
  batch = next(iter(common.eval_batches(config, split, batch_size=num, single_process=True)))
  return np.asarray(batch["image"])[:num]


def picture(rows: list[np.ndarray], labels: list[str] | None = None) -> np.ndarray:
  """Image rows [n, S, S, 3] (originals first, then reconstructions) -> one uint8 sheet.

  With labels, a white margin on the left names each row (PIL's default font).
  """
  sheet = np.concatenate([np.concatenate(list(np.asarray(r)), 1) for r in rows], 0)
  if not labels:
    return sheet
  if len(labels) != len(rows):
    raise ValueError(f"{len(labels)} labels for {len(rows)} rows.")
  s, margin = rows[0].shape[1], 8 + 7 * max(len(l) for l in labels)
  canvas = Image.new("RGB", (margin + sheet.shape[1], sheet.shape[0]), "white")
  canvas.paste(Image.fromarray(sheet), (margin, 0))
  draw = ImageDraw.Draw(canvas)
  for i, label in enumerate(labels):
    draw.text((4, i * s + s // 2 - 6), label, fill="black")
  return np.asarray(canvas)


def save_picture(system, params, config, path: str, split: str = "validation", num: int = 8):
  """A PNG: `num` originals (top row) above their reconstructions from codes (bottom row)."""
  images = first_images(config, split, num)
  rec, _ = system.reconstruct(jax.device_get(params), images)
  Image.fromarray(picture([images, np.asarray(rec)])).save(path)
  return path


# ------------------------------------------------------------------------------------------------
# The prepared artefact: the tokenizer trained for a FashionViL config, then its codes.
# ------------------------------------------------------------------------------------------------


def _downsampling(image_size: int, grid: int) -> float:
  return image_size / grid if grid else float("inf")


def tokenizer_config(config: ml_collections.ConfigDict, spec: str = "",
                     overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The VQ tokenizer config for the FashionViL `config` (module docstring, step 1).

  Args:
    config: the FashionViL config (data.name, data_dir, train_split, image_size,
      patch_mask.grid; model.num_codes).
    spec: a config spec for fashion_jax.configs.get ('vqvae:base', 'path.py:arg'); '' = the
      configs/vqvae.py variant whose image_size / grid equals the FashionViL config's.
    overrides: 'KEY=VALUE' items applied last (fashion_jax.configs.apply_override).

  Raises:
    manifest.PrepareError: no variant matches (naming each variant's downsampling and the flags
      that pick one), or an override changes a key that must equal the FashionViL config's.
  """
  data = config.data
  size, grid = int(data.image_size), int(data.patch_mask.grid)
  if not spec:
    want = _downsampling(size, grid)
    found = {v: vqvae_configs.get_config(v) for v in vqvae_configs.VARIANTS}
    matches = [v for v, c in found.items()
               if _downsampling(c.data.image_size, c.model.grid) == want]
    if not matches:
      have = ", ".join(f"{v}: {c.data.image_size} px -> {c.model.grid} x {c.model.grid} "
                       f"(/{_downsampling(c.data.image_size, c.model.grid):g})"
                       for v, c in found.items())
      raise manifest.PrepareError(
          f"No configs/vqvae.py variant downsamples like data.image_size={size} / "
          f"data.patch_mask.grid={grid} (/{want:g}); the variants: {have}. Pick one and give it "
          "encoder widths with the right number of stride-2 stages, e.g. --vqvae_config=vqvae:"
          "smoke --vqvae=model.widths=(...) (launch.prepare).")
    spec = f"vqvae:{matches[0]}"
  vq = configs_lib.get(spec)
  with vq.unlocked():
    vq.data.name = data.name
    vq.data.data_dir = data.get("data_dir", "")
    vq.data.train_split = data.get("train_split", "train")
    vq.data.image_size = size
    vq.model.grid = grid
    vq.model.num_codes = int(config.model.num_codes)
  fixed = {"data.name": vq.data.name, "data.data_dir": vq.data.data_dir,
           "data.train_split": vq.data.train_split, "data.image_size": size, "model.grid": grid,
           "model.num_codes": vq.model.num_codes}
  for item in overrides:
    configs_lib.apply_override(vq, item)
  for key, value in fixed.items():
    section, leaf = key.split(".")
    if vq[section][leaf] != value:
      raise manifest.PrepareError(
          f"Tokenizer override {key}={vq[section][leaf]!r}: the VQ codes must be made for the "
          f"FashionViL config's {key}={value!r} (data.patch_mask.grid for model.grid, "
          "model.num_codes for the MPFC classes).")
  return vq


def trained_step(workdir: str) -> int | None:
  """The newest checkpoint step of a tokenizer run, or None (read-only)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def make(config: ml_collections.ConfigDict, out: str, *, tokenizer_dir: str, spec: str = "",
         overrides: Sequence[str] = (), batch_size: int = 64) -> dict:
  """The prepared artefact (module docstring): trains or resumes the tokenizer, caches codes.

  Returns the manifest's `summary` and `options` (tokenizer spec, overrides, workdir, step).
  Raises Interrupted when the tokenizer's training was preempted.
  """
  vq = tokenizer_config(config, spec, overrides)
  total = int(vq.total_steps)
  if trained_step(tokenizer_dir) != total:
    result = loop.train_and_evaluate(vq, tokenizer_dir)
    if result.preempted:
      raise Interrupted(f"The VQ tokenizer's training in {tokenizer_dir} was preempted at step "
                        f"{int(result.state.step)} of {total}; its checkpoint is saved: rerun "
                        "launch.prepare to resume.")
  params, step, _ = restore.load_params(vq, tokenizer_dir)
  system = systems.get_system(vq)
  tmp = out[:-len(".npz")] + ".tmp.npz" if out.endswith(".npz") else out + ".tmp.npz"
  arrays = cache_codes(system, params, vq, tmp, split=vq.data.train_split,
                       batch_size=batch_size)
  os.replace(tmp, out)
  usage = vqvae_lib.code_usage(jnp.asarray(arrays["codes"][arrays["codes"] >= 0]),
                               system.model.num_codes)
  summary = (f"codes of {len(arrays['product_id'])} products ({int(arrays['num_views'].sum())} "
             f"views) from tokenizer checkpoint {step}; perplexity "
             f"{float(usage['perplexity']):.1f}, dead codes {float(usage['dead_frac']):.1%}")
  return dict(summary=summary, options=dict(tokenizer=spec or "matching configs/vqvae.py variant",
                                            tokenizer_overrides=list(overrides),
                                            tokenizer_workdir=os.path.abspath(tokenizer_dir),
                                            tokenizer_step=int(step)))


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  params, step, _ = restore.load_params(config, f.workdir)
  system = systems.get_system(config)
  out = cache_codes(system, params, config, f.out, split=f.split)
  usage = vqvae_lib.code_usage(jnp.asarray(out["codes"][out["codes"] >= 0]),
                               system.model.num_codes)
  print(f"Cached codes of {len(out['product_id'])} products ({int(out['num_views'].sum())} "
        f"views) from checkpoint {step} -> {f.out}; perplexity "
        f"{float(usage['perplexity']):.1f}, dead codes {float(usage['dead_frac']):.1%}")
  if f.picture:
    print("Picture:", save_picture(system, params, config, f.picture))


if __name__ == "__main__":
  # Flags are defined only when run as a script: launch.prepare imports this module and defines
  # its own --config and --workdir (absl refuses a flag defined twice).
  config_flags.DEFINE_config_file("config", None, "The VQ tokenizer's config file[:arg].")
  flags.DEFINE_string("workdir", None, "The tokenizer's training workdir.")
  flags.DEFINE_string("out", None, "Output .npz of cached codes.")
  flags.DEFINE_string("split", "train", "Split whose products get codes.")
  flags.DEFINE_string("picture", "", "Optional PNG of originals above reconstructions.")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(main)
