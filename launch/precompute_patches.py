r"""Precompute FashionBERT's frozen patch features of a split once, for training in place of images.

COMMAND
  python -m launch.precompute_patches --config=configs/fashionbert.py:smoke \
      --config.data.data_dir=/tmp/fb_tfds --split=train --out=/tmp/fb_patches_train.npz
  python -m launch.train --config=configs/fashionbert.py:smoke --workdir=runs/fb_cached \
      --config.data.data_dir=/tmp/fb_tfds --config.data.patch_features=/tmp/fb_patches_train.npz \
      --config.data.augment.crop_scale="(1.0, 1.0)"

FashionBERT's patch network is frozen (the paper extracts ResNet-50 features of the 8 x 8 patches
once). This job runs exactly that network over every view of every product of `--split`:
  view      every stored view, decoded whole and resized to data.image_size with the training
            pipeline's own crop function (pipeline.random_resized_crop, crop_scale (1, 1), no
            flip), so a cached view is bit-for-bit the image the pipeline would feed;
  features  system.patch_features: the image cut into model.grid^2 patches, ImageNet-normalised,
            the CNN's pooled output per patch, float32 [P, F]; stored as --dtype (float16 halves
            the file; float32 keeps the cached path numerically identical to the live one).
With model.cnn_variant='pixels' (configs/fashionbert.py:smoke) there is no CNN: the features
are the patches' pooled pixels, which cost nothing to compute live; caching them still works
(same file format) and keeps the cached and live paths interchangeable.
The CNN's weights are the ones the trainer would start from: init.hf_resnet_dir when set
(e.g. ResNet-50), else the random init of the trainer's parameter key (train/state.py:
split(key(seed))[0]); or, with --workdir, the CNN of that run's newest checkpoint. Since the CNN
never trains, all three give the run's features.

Output npz (the format pipeline.make_train_iterator reads with data.patch_features=PATH):
  product_id [N] str, features [N, V, P, F] (views beyond a product's own count are zeros),
  num_views [N] int32, grid, image_size, feature_dim (int32 scalars).
The training pipeline picks the feature row of the same random view it picks for `image`
(data.augment must then be crop_scale (1, 1) without flip, which the pipeline checks).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from launch import cli



def cnn_variables(system, config, workdir: str = ""):
  """Variables holding the patch CNN the trainer would use (see the module docstring)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if workdir:
    from fashion_jax.train import loop  # pylint: disable=g-import-not-at-top
    _, params, _ = loop.load_trained(workdir)
    return params
  pretrained = system.pretrained_params()
  if pretrained is not None:
    return pretrained
  params_key = jax.random.split(jax.random.key(config.seed))[0]  # train/state.py's params key.
  return jax.device_get(nn.unbox(jax.jit(system.init)(params_key, system.dummy_batch(1))))


def precompute(system, variables, config, split: str, *, batch_size: int = 64,
               dtype: str = "float16") -> dict:
  """Patch features of every view of `split` -> the npz arrays (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fashion_jax.data import schema  # pylint: disable=g-import-not-at-top

  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  size = int(config.data.image_size)
  builder = pipeline._builder(config.data)  # pylint: disable=protected-access
  if split not in builder.info.splits:
    raise ValueError(f"{config.data.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}.")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={schema.IMAGES: tfds.decode.SkipDecoding()})

  def views(ex):
    whole = tf.map_fn(
        lambda e: pipeline.random_resized_crop(e, tf.constant([0, 0], tf.int64), size,
                                               (1.0, 1.0), False),
        ex[schema.IMAGES], fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    return ex["product_id"], whole

  encode = jax.jit(system.patch_features)
  ids, num_views, chunks, pending = [], [], [], []

  def flush():
    if pending:
      x = np.stack(pending)
      pad = np.zeros(((-len(x)) % batch_size,) + x.shape[1:], np.uint8)
      chunks.append(np.asarray(encode(variables, np.concatenate([x, pad])))[:len(x)])
      pending.clear()

  for pid, imgs in ds.map(views, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).as_numpy_iterator():
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fashion_jax import systems  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if config.system != "fashionbert":
    raise app.UsageError(f"--config is a {config.system!r} config; patch features are "
                         "FashionBERT's (configs/fashionbert.py).")
  system = systems.get_system(config)
  variables = cnn_variables(system, config, _WORKDIR.value)
  out = precompute(system, variables, config, _SPLIT.value, batch_size=_BATCH.value,
                   dtype=_DTYPE.value)
  np.savez(_OUT.value, **out)
  print(f"{_OUT.value}: {len(out['product_id'])} products, features {out['features'].shape} "
        f"{out['features'].dtype}")


if __name__ == "__main__":
  # Flags are defined only when run as a script: the tests import this module for its
  # functions next to other launch modules, and absl refuses a flag defined twice.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/fashionbert.py[:variant].",
                                            lock_config=True)
  _SPLIT = flags.DEFINE_string("split", "train", "Split to encode.")
  _OUT = flags.DEFINE_string("out", None, "Output .npz path.")
  _WORKDIR = flags.DEFINE_string("workdir", "", "Take the CNN from this run's newest checkpoint.")
  _DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Stored dtype.")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Views per forward pass.")
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main)
