r"""FashionBERT's frozen patch features of the train split, computed once (a prepared artefact).

Asked for with data.patch_features='prepared' (FashionBERT trains on live patches otherwise),
on both commands, with whole unflipped views (the pipeline checks the augmentation):
  python -m launch.prepare --config=configs/fashionbert.py:smoke --workdir=runs/fb_cached \
      --config.data.patch_features=prepared --config.data.augment.crop_scale="(1.0, 1.0)"
  python -m launch.train --config=configs/fashionbert.py:smoke --workdir=runs/fb_cached \
      --config.data.patch_features=prepared --config.data.augment.crop_scale="(1.0, 1.0)"
launch.prepare writes <workdir>/prepared/patch_features.npz (`make`) and launch.train fills
data.patch_features with it.

FashionBERT's patch network is frozen (the paper extracts ResNet-50 features of the 8 x 8 patches
once). `precompute` runs exactly that network over every view of every product of a split:
  view      every stored view, decoded whole and resized to data.image_size with the training
            pipeline's own crop function (pipeline.random_resized_crop, crop_scale (1, 1), no
            flip), so a cached view is bit-for-bit the image the pipeline would feed;
  features  system.patch_features: the image cut into model.grid^2 patches, ImageNet-normalised,
            the CNN's pooled output per patch, float32 [P, F]; stored as `dtype` (float16 halves
            the file, the default of launch.prepare --patch_dtype; float32 keeps the cached path
            numerically identical to the live one).
With model.cnn_variant='pixels' (configs/fashionbert.py:smoke) there is no CNN: the features
are the patches' pooled pixels, which cost nothing to compute live; caching them still works
(same file format) and keeps the cached and live paths interchangeable.
The CNN's weights (`cnn_variables`) are the ones the trainer would start from: init.hf_resnet_dir
when set (e.g. ResNet-50), else the random init of the trainer's parameter key (train/state.py:
split(key(seed))[0]); or, with a run's workdir, the CNN of its newest checkpoint. Since the CNN
never trains, all three give the run's features.

Output npz (the format pipeline.make_train_iterator reads with data.patch_features=PATH):
  product_id [N] str, features [N, V, P, F] (views beyond a product's own count are zeros),
  num_views [N] int32, grid, image_size, feature_dim (int32 scalars).
The training pipeline picks the feature row of the same random view it picks for `image`.
"""

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fashion_jax import systems
from fashion_jax.data import pipeline
from fashion_jax.prepare import manifest
from fashion_jax.train import restore


def cnn_variables(system, config, workdir: str = ""):
  """Variables holding the patch CNN the trainer would use (see the module docstring)."""
  if workdir:
    _, params, _ = restore.load_trained(workdir)
    return params
  pretrained = system.pretrained_params()
  if pretrained is not None:
    return pretrained
  params_key = jax.random.split(jax.random.key(config.seed))[0]  # train/state.py's params key.
  return jax.device_get(nn.unbox(jax.jit(system.init)(params_key, system.dummy_batch(1))))


def precompute(system, variables, config, split: str, *, batch_size: int = 64,
               dtype: str = "float16") -> dict:
  """Patch features of every view of `split` -> the npz arrays (see the module docstring)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  size = int(config.data.image_size)
  encode = jax.jit(system.patch_features)
  ids, num_views, chunks, pending = [], [], [], []

  def flush():
    if pending:
      x = np.stack(pending)
      pad = np.zeros(((-len(x)) % batch_size,) + x.shape[1:], np.uint8)
      chunks.append(np.asarray(encode(variables, np.concatenate([x, pad])))[:len(x)])
      pending.clear()

  for pid, imgs in pipeline.whole_views(config.data, split):
    ids.append(pid.decode("utf-8"))
    num_views.append(len(imgs))
    for img in imgs:
      pending.append(img)
      if len(pending) == batch_size:
        flush()
  flush()
  if not ids:
    raise ValueError(f"Split {split!r} of {config.data.name} is empty.")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{config.data.name}:{split} repeats product ids; features are looked up "
                     "by id.")
  flat = np.concatenate(chunks).astype(dtype)                          # [sum(V), P, F]
  features = np.zeros((len(ids), max(num_views)) + flat.shape[1:], dtype)
  offsets = np.concatenate([[0], np.cumsum(num_views)])
  for p, v in enumerate(num_views):
    features[p, :v] = flat[offsets[p]:offsets[p + 1]]
  return dict(product_id=np.asarray(ids), features=features,
              num_views=np.asarray(num_views, np.int32),
              grid=np.asarray(system.model.grid, np.int32), image_size=np.asarray(size, np.int32),
              feature_dim=np.asarray(flat.shape[-1], np.int32))


def make(config: ml_collections.ConfigDict, out: str, *, batch_size: int = 64,
         dtype: str = "float16") -> dict:
  """The prepared artefact: the train split's features into `out` (module docstring).

  Returns the manifest's `summary` and `options` (dtype).
  """
  if config.system != "fashionbert":
    raise manifest.PrepareError(
        f"data.patch_features='prepared' in a {config.system!r} config: cached patch features "
        "are FashionBERT's (configs/fashionbert.py).")
  system = systems.get_system(config)
  out_arrays = precompute(system, cnn_variables(system, config), config,
                          config.data.get("train_split", "train"), batch_size=batch_size,
                          dtype=dtype)
  tmp = out[:-len(".npz")] + ".tmp.npz" if out.endswith(".npz") else out + ".tmp.npz"
  np.savez(tmp, **out_arrays)
  os.replace(tmp, out)
  return dict(summary=(f"{len(out_arrays['product_id'])} products, features "
                       f"{out_arrays['features'].shape} {out_arrays['features'].dtype}"),
              options=dict(dtype=dtype))
