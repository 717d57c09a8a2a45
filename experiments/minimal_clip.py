r"""A minimal JAX CLIP: the baseline a framework recipe must beat (issue 18, item 7).

Self-contained on purpose (Flax + optax + the framework's data reader and retrieval metric):
  images  the split's FIRST view, resized whole (pipeline.make_eval_dataset: short side to S,
          centre crop); no augmentation, the same view every epoch.
  text    the config's text_fields joined as the pipeline joins them, lower-cased, split into
          words ([a-z0-9]+); a word vocabulary of every train word (ids: 0 pad, 1 unknown);
          first `max_words` words.
  towers  image: ViT (patch P, width W, `layers` pre-LN blocks, mean-pooled tokens, linear to D);
          text: word embeddings mean-pooled over the real words, then a 2-layer MLP to D.
  loss    symmetric InfoNCE, logits = exp(t) * cos, t learnable, init log(1/0.07), clamped to
          log(100) after each step; AdamW lr 1e-3 (cosine, 10% warmup), weight decay 0.1.
  batch   128 by default; steps = ceil(samples / batch); samples seen = steps * batch, counted
          exactly (epochs are reshuffled permutations, a batch may span two epochs).
Evaluation: the split's first view and joined text, ranked with
fashion_jax.evaluate.retrieval.full_candidate_metrics (every product of the split a candidate).

  python -m experiments.minimal_clip --dataset=synthetic_catalog/smoke --data_dir=/tmp/tfds \
      --samples=38400
"""

import argparse
import collections
import json
import math
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fashion_jax.data import pipeline
from fashion_jax.evaluate import retrieval

WORD = re.compile(r"[a-z0-9]+")


def read_split(name, data_dir, split, fields, image_size):
  """(uint8 images [N, S, S, 3], texts [N]) of `split`: first view, fields joined as the
  pipeline joins them (stripped of trailing spaces/periods, empty ones skipped, '. ')."""
  cfg = ml_collections.ConfigDict(dict(data=dict(
      name=name, data_dir=data_dir, image_size=image_size, text_fields=tuple(fields),
      tokenizer=dict(kind="clip", path=""), max_len=8)))
  images, texts = [], []
  for b in pipeline.make_eval_dataset(cfg, split, batch_size=256, fields=tuple(fields)):
    n = int(b["valid"].sum())
    images.append(b["image"][:n])
    for i in range(n):
      parts = [re.sub(r"[\s.]+$", "", b[f][i].strip()) for f in fields]
      texts.append(". ".join(p for p in parts if p))
  return np.concatenate(images), texts


class WordVocab:
  """Every word of the train texts; 0 = pad, 1 = unknown word."""

  def __init__(self, texts):
    counts = collections.Counter(w for t in texts for w in WORD.findall(t.lower()))
    self.index = {w: i + 2 for i, w in enumerate(sorted(counts))}

  def __len__(self):
    return len(self.index) + 2

  def __call__(self, texts, max_words):
    ids = np.zeros((len(texts), max_words), np.int32)
    for i, t in enumerate(texts):
      row = [self.index.get(w, 1) for w in WORD.findall(t.lower())][:max_words]
      ids[i, :len(row)] = row
    return ids


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
    h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(h))


class ImageTower(nn.Module):
  dim: int
  width: int
  layers: int
  heads: int
  patch: int

  @nn.compact
  def __call__(self, images):  # uint8 [B, S, S, 3] -> [B, dim], unit norm.
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, name="patch")(x)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    for i in range(self.layers):
      x = Block(self.width, self.heads, name=f"block{i}")(x)
    x = nn.Dense(self.dim, name="proj")(nn.LayerNorm()(x).mean(1))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class TextTower(nn.Module):
  vocab: int
  dim: int
  width: int

  @nn.compact
  def __call__(self, ids):  # int32 [B, L] -> [B, dim], unit norm; mean over real words.
    mask = (ids > 0)[..., None].astype(jnp.float32)
    e = nn.Embed(self.vocab, self.width, name="embed")(ids)
    x = (e * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    x = nn.Dense(self.dim, name="out")(nn.gelu(nn.Dense(self.width, name="mlp")(x)))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class MinimalCLIP(nn.Module):
  vocab: int
  dim: int = 128
  width: int = 128
  layers: int = 2
  heads: int = 4
  patch: int = 8

  def setup(self):
    self.image = ImageTower(self.dim, self.width, self.layers, self.heads, self.patch)
    self.text = TextTower(self.vocab, self.dim, self.width)
    self.log_scale = self.param("log_scale",
                                lambda _: jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def __call__(self, images, ids):
    return self.image(images), self.text(ids), self.log_scale

  def encode_image(self, images):
    return self.image(images)

  def encode_text(self, ids):
    return self.text(ids)


def infonce(img, txt, log_scale):
  logits = jnp.exp(log_scale) * img @ txt.T
  labels = jnp.arange(img.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def train_and_eval(name, data_dir, *, samples, batch=128, fields=("title", "description"),
                   image_size=64, max_words=48, lr=1e-3, seed=0, test_split="test", log=print):
  """Trains on `train` for ceil(samples / batch) steps; returns full-candidate test metrics plus
  samples_seen, steps, vocab size, train seconds."""
  tr_img, tr_txt = read_split(name, data_dir, "train", fields, image_size)
  te_img, te_txt = read_split(name, data_dir, test_split, fields, image_size)
  vocab = WordVocab(tr_txt)
  tr_ids, te_ids = vocab(tr_txt, max_words), vocab(te_txt, max_words)
  steps = math.ceil(samples / batch)
  model = MinimalCLIP(vocab=len(vocab))
  params = model.init(jax.random.PRNGKey(seed), tr_img[:2], tr_ids[:2])["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  opt = optax.adamw(sched, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1)
  state = opt.init(params)

  @jax.jit
  def step(params, state, images, ids):
    def loss_fn(p):
      return infonce(*model.apply({"params": p}, images, ids))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    params["log_scale"] = jnp.clip(params["log_scale"], 0.0, math.log(100.0))
    return params, state, loss

  rng = np.random.default_rng(seed)
  order, pos, t0 = rng.permutation(len(tr_txt)), 0, time.time()
  for s in range(steps):
    idx = []
    while len(idx) < batch:
      take = order[pos:pos + batch - len(idx)]
      idx.extend(take)
      pos += len(take)
      if pos == len(order):
        order, pos = rng.permutation(len(tr_txt)), 0
    idx = np.asarray(idx)
    params, state, loss = step(params, state, tr_img[idx], tr_ids[idx])
    if s % 50 == 0 or s == steps - 1:
      log(f"step {s} loss {float(loss):.4f}")
  seconds = time.time() - t0
  enc_i = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
  enc_t = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_text))
  img = np.concatenate([enc_i(params, te_img[i:i + 256]) for i in range(0, len(te_img), 256)])
  txt = np.concatenate([enc_t(params, te_ids[i:i + 256]) for i in range(0, len(te_ids), 256)])
  out = dict(retrieval.full_candidate_metrics(txt, img))
  out.update(samples_seen=steps * batch, steps=steps, batch=batch, vocab=len(vocab),
             train_seconds=seconds, num_test=len(te_txt))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", default="synthetic_catalog/smoke")
  p.add_argument("--data_dir", default="")
  p.add_argument("--samples", type=int, default=38400)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  res = train_and_eval(a.dataset, a.data_dir, samples=a.samples, batch=a.batch,
                       image_size=a.image_size, seed=a.seed)
  print(json.dumps(res, indent=1))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
