"""Zero-shot classification (prompt ensembling, logit scale, weighted F1) and the linear probe."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from fashion_jax.evaluate import linear_probe
from fashion_jax.evaluate import zeroshot

LABELS = ["shirt", "dress", "shoes", "bag"]
VOCAB = {w: k for k, w in enumerate(["<pad>", "a", "photo", "of", "an", "image"] + LABELS)}
D = 16


def tokenize(texts, max_len=6):
  out = np.zeros((len(texts), max_len), np.int32)
  for i, t in enumerate(texts):
    ids = [VOCAB[w] for w in t.split()][:max_len]
    out[i, :len(ids)] = ids
  return out


class WordSystem:
  """Text = sum of word vectors (label words dominate); image = class vector in pixel [0,0,0].

  embed_texts is deliberately NOT normalised, with label vectors of very different norms, so a
  scorer that forgot to normalise the text side would be fooled.
  """

  def embed_images(self, params, images):
    x = params["img"][images[:, 0, 0, 0].astype(jnp.int32)]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def embed_texts(self, params, tokens):
    return params["words"][tokens].sum(1)

  def logit_scale(self, params):
    return params["scale"]


def word_params(seed=0):
  rng = np.random.default_rng(seed)
  words = 0.05 * rng.standard_normal((len(VOCAB), D))
  words[0] = 0
  norms = [1.0, 10.0, 1.0, 1.0]  # 'dress' has a huge norm.
  for k, l in enumerate(LABELS):
    words[VOCAB[l], k] = norms[k]
  img = np.zeros((len(LABELS), D))
  img[np.arange(len(LABELS)), np.arange(len(LABELS))] = 1.0
  # Class 0 images lean a bit towards 'dress' too: an unnormalised text side would call them dress.
  img[0, 1] = 0.3
  return {"words": jnp.asarray(words, jnp.float32), "img": jnp.asarray(img, jnp.float32),
          "scale": jnp.float32(50.0)}


def test_weighted_f1_matches_sklearn():
  rng = np.random.default_rng(0)
  for trial in range(5):
    y = rng.integers(0, 6, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 8, 200))  # Classes 6, 7 only predicted.
    assert zeroshot.weighted_f1(y, p) == pytest.approx(
        f1_score(y, p, average="weighted", zero_division=0), abs=1e-12), trial
  ys = np.array(["a", "b", "b", "c", "c", "c"])
  ps = np.array(["a", "c", "b", "c", "a", "d"])
  assert zeroshot.weighted_f1(ys, ps) == pytest.approx(
      f1_score(ys, ps, average="weighted", zero_division=0))
  with pytest.raises(ValueError, match="must be equal 1-D"):
    zeroshot.weighted_f1([1, 2], [1])


def test_classification_metrics_and_scale():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((50, 5))
  y = rng.integers(0, 5, 50)
  m = zeroshot.classification_metrics(y, logits)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  assert m["nll"] == pytest.approx(-np.mean(np.log(p[np.arange(50), y])))
  assert m["acc"] == pytest.approx(np.mean(logits.argmax(1) == y))
  m10 = zeroshot.classification_metrics(y, 10 * logits)
  assert m10["acc"] == m["acc"] and m10["nll"] != pytest.approx(m["nll"])


def test_class_embeddings_prompt_ensemble():
  params = word_params()
  system = WordSystem()
  templates = ["a photo of a {}", "an image of a {}"]
  embed = lambda t: np.asarray(system.embed_texts(params, jnp.asarray(t)))
  got = zeroshot.class_embeddings(embed, tokenize, LABELS, templates)
  ref = 0
  for t in templates:
    e = embed(tokenize([t.format(l) for l in LABELS])).astype(np.float64)
    ref = ref + e / np.linalg.norm(e, axis=1, keepdims=True)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    zeroshot.class_embeddings(embed, tokenize, LABELS, ["a photo"])


def fake_dataset_fn(splits):
  def fn(config, split, *, batch_size, fields=()):
    del config
    data = splits[split]
    n = len(data["index"])
    for start in range(0, n, batch_size):
      rows = np.arange(start, min(n, start + batch_size))
      rows_p = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
      batch = {k: data[k][rows_p] for k in ("image", "text", "index") + tuple(fields)}
      batch["valid"] = np.arange(batch_size) < len(rows)
      yield batch
  return fn


def test_zeroshot_evaluator_known_answer():
  # 40 images: true class k = i % 4; images 0..7 are drawn with the pixel of another class
  # (k + 1) % 4, so the right prediction for them is that class: 32 of 40 correct.
  n = 40
  true = np.arange(n) % 4
  shown = true.copy()
  shown[:8] = (true[:8] + 1) % 4
  images = np.zeros((n, 2, 2, 3), np.uint8)
  images[:, 0, 0, 0] = shown
  data = {"image": images, "text": np.zeros((n, 6), np.int32), "index": np.arange(n),
          "subcategory": np.array([LABELS[k] for k in true], dtype=object)}
  data["subcategory"][39] = ""  # Unknown label: left out.
  ev = zeroshot.Evaluator(WordSystem(), config=None, split="test", field="subcategory",
                          labels=LABELS, templates=["a photo of a {}", "an image of a {}"],
                          batch_size=16, dataset_fn=fake_dataset_fn({"test": data}),
                          tokenizer=tokenize)
  m = ev.run(word_params())
  keep = np.arange(39)
  assert m["test/zeroshot/subcategory_num_examples"] == 39
  assert m["test/zeroshot/subcategory_acc"] == pytest.approx(np.mean(shown[keep] == true[keep]))
  assert m["test/zeroshot/subcategory_f1"] == pytest.approx(
      f1_score(true[keep], shown[keep], average="weighted"))
  # Labels come from the data when not given; a value outside an explicit set is an error.
  ev2 = zeroshot.Evaluator(WordSystem(), None, batch_size=16, tokenizer=tokenize,
                           dataset_fn=fake_dataset_fn({"test": data}))
  assert ev2.run(word_params())["test/zeroshot/subcategory_num_classes"] == 4
  ev3 = zeroshot.Evaluator(WordSystem(), None, labels=LABELS[:3], batch_size=16,
                           tokenizer=tokenize, dataset_fn=fake_dataset_fn({"test": data}))
  with pytest.raises(ValueError, match=r"values \['bag'\] outside"):
    ev3.run(word_params())


def test_zeroshot_normalises_both_sides():
  # Class-0 images: cos to 'shirt' 0.96, to 'dress' 0.29; but the 'dress' text vector is 10x
  # longer, so a one-side-normalised dot product would answer 'dress'.
  params = word_params()
  system = WordSystem()
  img = np.asarray(system.embed_images(params, jnp.zeros((1, 2, 2, 3), jnp.uint8)))
  raw_text = np.asarray(system.embed_texts(params, tokenize(["a photo of a " + l for l in LABELS])))
  assert (img @ raw_text.T).argmax() == 1  # The reference package's mistake.
  cls = zeroshot.class_embeddings(lambda t: np.asarray(system.embed_texts(params, t)), tokenize,
                                  LABELS)
  logits = zeroshot.zeroshot_logits(img, cls, 50.0)
  assert logits.argmax() == 0
  np.testing.assert_allclose(logits / 50.0, (img / np.linalg.norm(img)) @ cls.T, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Linear probe.
# ------------------------------------------------------------------------------------------------
def blobs(n, d=12, classes=5, seed=0, spread=0.6):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(123).standard_normal((classes, d))
  y = rng.integers(0, classes, n)
  x = centers[y] + spread * rng.standard_normal((n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_fit_probe_matches_sklearn_and_learns():
  x_tr, y_tr = blobs(300, seed=0)
  x_te, y_te = blobs(200, seed=1)
  model, c = linear_probe.fit_probe(x_tr, y_tr, cs=(10.0,))
  ref = LogisticRegression(C=10.0, max_iter=1000).fit(x_tr.astype(np.float64), y_tr)
  np.testing.assert_array_equal(model.predict(x_te.astype(np.float64)), ref.predict(x_te))
  m = linear_probe.probe_metrics(model, x_te, y_te)
  assert c == 10.0 and m["acc"] > 0.8
  # A probe on shuffled labels is near chance: the metric moves with the signal.
  shuffled, _ = linear_probe.fit_probe(x_tr, np.random.default_rng(2).permutation(y_tr), cs=(10.,))
  assert linear_probe.probe_metrics(shuffled, x_te, y_te)["acc"] < 0.5
  # C chosen on the validation share: too strong a penalty loses.
  _, c = linear_probe.fit_probe(x_tr, y_tr, cs=(1e-4, 100.0))
  assert c == 100.0
  with pytest.raises(ValueError, match="needs >= 2 classes"):
    linear_probe.fit_probe(x_tr, np.zeros(300))


def test_linear_probe_evaluator():
  classes = 4
  def split(n, seed):
    x, y = blobs(n, d=3, classes=classes, seed=seed, spread=0.3)
    # The fake image tower reads the 3-d feature from the pixels (scaled to uint8).
    images = np.zeros((n, 1, 1, 3), np.uint8)
    images[:, 0, 0, :] = np.round((x + 1) * 127).astype(np.uint8)
    return {"image": images, "text": np.zeros((n, 2), np.int32), "index": np.arange(n),
            "category": np.array([f"c{k}" for k in y], dtype=object)}, y

  class PixelSystem:
    def embed_images(self, params, images):
      x = images[:, 0, 0, :].astype(jnp.float32) / 127.0 - 1.0
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  train, _ = split(200, 0)
  test, y_te = split(100, 1)
  test["category"][0] = "c_new"  # Unseen in train: must count as an error.
  ev = linear_probe.Evaluator(PixelSystem(), None, field="category", cs=(1.0, 100.0),
                              batch_size=32,
                              dataset_fn=fake_dataset_fn({"train": train, "test": test}))
  m = ev.run({})
  assert m["test/linear_probe/category_num_train"] == 200
  assert m["test/linear_probe/category_C"] in (1.0, 100.0)
  assert 0.8 < m["test/linear_probe/category_acc"] <= 0.99
