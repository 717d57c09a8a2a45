r"""A fifth system, written the way docs/architecture.md "Adding a system" says: outside the package.

Bag-of-patches SigLIP: the image is cut into p x p patches, each linearly embedded, mean-pooled
and projected; the text is the mean of its token embeddings (pads excluded), projected; both are
L2-normalised to [B, D]. The loss is SigLIP's sigmoid loss (losses/sigmoid.py) over the global
batch, with a learnable log-temperature t' (init log 10) and bias b (init -10).

It reuses the real input pipeline (synthetic_catalog, the CLIP tokenizer), the trainer and the
retrieval evaluator, and changes nothing in fashion_jax/train/, data/pipeline.py or evaluate/:
  python -m launch.train --config=tests/fifth_system.py --workdir=/tmp/fifth \
      --config.data.name=synthetic_catalog/tiny --config.data.data_dir=DIR
(`config.system` is this module's dotted path: the registry imports systems by name.)
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from fashion_jax.data import tokenizers
from fashion_jax.losses import sigmoid
from fashion_jax.train import config_check

CONFIG_KEYS = ("model", "data", "init", "objective")


class BagOfPatches(nn.Module):
  """Two mean-pooled towers; `encode_images`: uint8 [B, S, S, 3] -> [B, D]; `encode_texts`:
  int32 [B, L] -> [B, D] (tokens equal to pad_id are left out of the mean)."""
  vocab_size: int
  pad_id: int
  patch: int
  width: int
  embed: int

  def setup(self):
    self.patch_embed = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                               padding="VALID")
    self.token_embed = nn.Embed(self.vocab_size, self.width)
    self.image_proj = nn.Dense(self.embed, use_bias=False)
    self.text_proj = nn.Dense(self.embed, use_bias=False)
    self.log_temperature = self.param("log_temperature", nn.initializers.constant(
        sigmoid.INIT_LOG_TEMPERATURE), ())
    self.bias = self.param("bias", nn.initializers.constant(sigmoid.INIT_BIAS), ())

  def encode_images(self, images):
    x = self.patch_embed(images.astype(jnp.float32) / 127.5 - 1.0)
    z = self.image_proj(x.mean(axis=(1, 2)))
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def encode_texts(self, ids):
    keep = (ids != self.pad_id)[..., None].astype(jnp.float32)
    x = (self.token_embed(ids) * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
    z = self.text_proj(x)
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  def __call__(self, images, ids):
    return self.encode_images(images), self.encode_texts(ids), self.log_temperature, self.bias


class System:
  """The fifth system (systems/base.py's TwoTowerSystem)."""

  required_features = ("image", "text")  # Checked against the config before anything compiles.

  def __init__(self, config):
    self.config = config
    data = config.data
    self.tokenizer = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path,
                                              data.max_len)
    self.model = BagOfPatches(vocab_size=self.tokenizer.vocab_size,
                              pad_id=int(self.tokenizer.pad_token_id), patch=config.model.patch,
                              width=config.model.width, embed=config.model.embed)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.config.data.image_size, self.config.data.max_len
    return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
            "text": np.zeros((batch_size, l), np.int32)}

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def loss(self, params, batch, rng, train: bool = True):
    del rng, train
    img, txt, t, b = self.model.apply({"params": params}, batch["image"], batch["text"])
    loss, metrics = sigmoid.sigmoid_loss(img, txt, t, b)
    return loss, {"loss": loss, "temperature": metrics["temperature"]}

  def embed_images(self, params, images):
    return self.model.apply({"params": params}, images, method=self.model.encode_images)

  def embed_texts(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method=self.model.encode_texts)

  def logit_scale(self, params):
    return jnp.exp(params["log_temperature"])


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.system = "tests.fifth_system"
  c.seed = 0
  c.data = dict(
      name="synthetic_catalog/tiny", data_dir="", train_split="train", image_size=64,
      text_fields=("title", "description"), tokenizer=dict(kind="clip", path=""), max_len=32,
      views=1, augment=dict(crop_scale=(0.8, 1.0), flip=False), mlm_prob=0.0,
      patch_mask=dict(grid=0, count=0), shuffle_buffer=64, prefetch=2)
  c.model = dict(patch=8, width=32, embed=32)
  c.init = dict()
  c.objective = dict()
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.batch_size = 8
  c.total_steps = 6
  c.optimizer = dict(lr=3e-3, weight_decay=0.0, schedule=dict(kind="constant", warmup_steps=0))
  c.log_every_steps = 3
  c.checkpoint = dict(every_steps=3, keep=2)
  c.evals = dict(retrieval_test=dict(type="retrieval", split="test", protocols=("full",),
                                     every=0))
  return config_check.with_defaults(c)
