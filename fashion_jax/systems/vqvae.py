r"""The VQ tokenizer of FashionViL's MPFC as a system: trained by the trainer, then frozen.

Train (any trainer config; configs/vqvae.py), then cache the codes MPFC needs:
  python -m launch.train --config=configs/vqvae.py:smoke --workdir=runs/vqvae_smoke
  python -m fashion_jax.systems.vqvae --config=configs/vqvae.py:smoke --workdir=runs/vqvae_smoke \
      --out=runs/vqvae_smoke/codes.npz [--picture=runs/vqvae_smoke/recon.png]

Config keys this system reads: model.widths, model.num_res, model.code_dim, model.num_codes,
model.beta, model.codebook ('ema' | 'gradient'), model.ema_decay, model.restart_below,
model.grid (the code grid g; must equal data.image_size / 2^(len(widths) - 1) and the
FashionViL run's patch grid), data.image_size.

Params: the model's variables, {'params': ...} and, with the EMA codebook, 'vq_ema':
{count [K], sum [K, E]}, declared in `mutable_collections`: the trainer writes the state the
loss returns after each step (fashion_jax/train/step.py), so it is sharded, checkpointed and
restored with the parameters.

Loss and metrics (models/vqvae.py): loss = recon + beta commit (+ codebook for 'gradient');
metrics recon_mse (in [-1, 1] pixel units), codebook (the quantisation error), commit, the
batch's code perplexity / dead share, and with EMA `restarted` (codes re-seated this step).

Cached codes (`cache_codes`): every view of every product of a split, decoded and resized
EXACTLY as the training pipeline does with crop_scale (1, 1) and no flip (the whole view,
bilinear, rounded to uint8: pipeline.random_resized_crop), encoded by the frozen tokenizer.
Saved as npz: product_id [P] (str), codes int16 [P, V, g*g] (V = most views of a product;
-1 for views a product lacks), num_views int32 [P]. The pipeline looks the codes up by
product_id and view (data.vq_codes), so MPFC targets are computed once, not every step.

`Evaluator` (config.evals type 'fashion_jax.systems.vqvae'): on a split's first views (the eval
pipeline's resize + centre crop), `{split}/vq/recon_mse`, `psnr` (dB, peak-to-peak 2),
`perplexity` and `dead_frac` of the code histogram over the whole split.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.models import vqvae as vqvae_lib

CONFIG_KEYS = ("model", "data", "init", "objective")


class System:
  """The VQ-VAE tokenizer as a fashion_jax system (see systems/base.py)."""

  def __init__(self, config):
    self.config = config
    m = config.model
    self.model = vqvae_lib.VQVAE(widths=tuple(m.widths), num_res=int(m.num_res),
                                 code_dim=int(m.code_dim), num_codes=int(m.num_codes),
                                 beta=float(m.beta), codebook=m.get("codebook", "ema"),
                                 ema_decay=float(m.get("ema_decay", 0.99)),
                                 restart_below=float(m.get("restart_below", 0.0)))
    self.mutable_collections = ("vq_ema",) if self.model.codebook == "ema" else ()
    size, down = int(config.data.image_size), 2 ** (len(m.widths) - 1)
    if size % down or size // down != int(m.grid):
      raise ValueError(f"model.grid={m.grid} but data.image_size={size} with "
                       f"{len(m.widths) - 1} downsamplings (model.widths) gives a "
                       f"{size / down:g} x {size / down:g} code grid.")
    self.grid = int(m.grid)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s = self.config.data.image_size
    return {"image": np.zeros((batch_size, s, s, 3), np.uint8)}

  def init(self, rng, batch):
    """The variables dict: {'params': ...} (+ 'vq_ema' for the EMA codebook)."""
    return dict(self.model.init(rng, batch["image"]))

  def loss(self, params, batch, rng, train: bool = True):
    """(loss, metrics), or (loss, (metrics, {'vq_ema': new state})) when training with EMA."""
    del rng  # Quantisation and restarts are deterministic.
    update = train and bool(self.mutable_collections)
    if update:
      out, new_state = self.model.apply(params, batch["image"], update_codebook=True,
                                        mutable=list(self.mutable_collections))
    else:
      out = self.model.apply(params, batch["image"])
    usage = vqvae_lib.code_usage(out["codes"], self.model.num_codes)
    metrics = {k: out[k] for k in ("recon_mse", "codebook", "commit")}
    metrics.update({f"batch_{k}": v for k, v in usage.items()})
    if not update:
      return out["loss"], metrics
    metrics["restarted"] = out["restarted"]
    return out["loss"], (metrics, dict(new_state))

  def encode(self, params, images: jax.Array) -> jax.Array:
    """uint8 [B, S, S, 3] -> codes int32 [B, g * g]."""
    return self.model.apply(params, images, method=vqvae_lib.VQVAE.encode)

  def reconstruct(self, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 [B, S, S, 3] -> (reconstruction uint8 [B, S, S, 3], codes [B, g * g])."""
    codes = self.encode(params, images)
    rec = self.model.apply(params, codes, self.grid, method=vqvae_lib.VQVAE.decode_codes)
    return jnp.clip(jnp.round((rec + 1.0) * 127.5), 0, 255).astype(jnp.uint8), codes


class Evaluator:
  """Reconstruction error and codebook usage on one split (see the module docstring)."""

  def __init__(self, system, config, mesh=None, *, split: str = "validation",
               batch_size: int = 64, dataset_fn=None):
    del mesh  # A small convolutional model: evaluated on the default device.
    self.system, self.config, self.split = system, config, split
    self.batch_size, self.dataset_fn = batch_size, dataset_fn

  def run(self, params) -> dict[str, float]:
    from fashion_jax.evaluate import common  # pylint: disable=g-import-not-at-top
    params = jax.device_get(params)
    f = jax.jit(lambda p, x: self.system.model.apply(p, x))
    se, n, codes = 0.0, 0, []
    for batch in common.eval_batches(self.config, self.split, batch_size=self.batch_size,
                                     dataset_fn=self.dataset_fn, single_process=True):
      valid = np.asarray(batch["valid"])
      out = jax.device_get(f(params, batch["image"]))
      x = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
      se += float(np.sum(np.square(out["recon"] - x)[valid]))
      n += int(valid.sum()) * x[0].size
      codes.append(np.asarray(out["codes"])[valid])
    if not n:
      raise ValueError(f"Split {self.split!r} is empty.")
    mse = se / n
    usage = vqvae_lib.code_usage(jnp.asarray(np.concatenate(codes)), self.system.model.num_codes)
    prefix = f"{self.split}/vq/"
    return {prefix + "recon_mse": mse, prefix + "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
            prefix + "perplexity": float(usage["perplexity"]),
            prefix + "dead_frac": float(usage["dead_frac"])}


def cache_codes(system, params, config, out_path: str, split: str = "train",
                batch_size: int = 64) -> dict[str, np.ndarray]:
  """Encodes every view of every product of `split`; writes and returns the npz arrays."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import schema  # pylint: disable=g-import-not-at-top
  builder = pipeline._builder(config.data)  # pylint: disable=protected-access
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={schema.IMAGES: tfds.decode.SkipDecoding()})
  size = int(config.data.image_size)
  encode = jax.jit(lambda p, x: system.encode(p, x))
  params = jax.device_get(params)

  def views(ex):
    crops = tf.map_fn(
        lambda e: pipeline.random_resized_crop(e, tf.constant([0, 0], tf.int64), size,
                                               (1.0, 1.0), False),
        ex[schema.IMAGES], fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    return ex["product_id"], crops

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

  for pid, crops in ds.map(views, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).as_numpy_iterator():
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
  from fashion_jax.evaluate import common  # pylint: disable=g-import-not-at-top
  batch = next(iter(common.eval_batches(config, split, batch_size=num, single_process=True)))
  return np.asarray(batch["image"])[:num]


def picture(rows: list[np.ndarray], labels: list[str] | None = None) -> np.ndarray:
  """Image rows [n, S, S, 3] (originals first, then reconstructions) -> one uint8 sheet.

  With labels, a white margin on the left names each row (PIL's default font).
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
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
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = first_images(config, split, num)
  rec, _ = system.reconstruct(jax.device_get(params), images)
  Image.fromarray(picture([images, np.asarray(rec)])).save(path)
  return path


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  config = f.config
  params, step, _ = loop.load_params(config, f.workdir)
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
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The VQ tokenizer's config file[:arg].")
  flags.DEFINE_string("workdir", None, "The tokenizer's training workdir.")
  flags.DEFINE_string("out", None, "Output .npz of cached codes.")
  flags.DEFINE_string("split", "train", "Split whose products get codes.")
  flags.DEFINE_string("picture", "", "Optional PNG of originals above reconstructions.")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(main)
