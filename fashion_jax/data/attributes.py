"""Pseudo-attributes for FashionViL's PAC task: mined from the corpus, matched per product.

Mining (deterministic, `mine`): over the texts of the training split (title + description):
  1. normalise: lowercase; words = maximal runs of [a-z0-9%'-] (punctuation splits words);
  2. candidates = word n-grams, 1 <= n <= max_n, that neither start nor end with a stop word
     (STOP_WORDS: function words and generic catalog words) and are not all digits;
  3. document frequency df(g) = number of products whose text contains g (counted once each);
  4. keep min_df <= df(g) <= max_df_frac * #products (rare strings are noise, ubiquitous ones
     carry no information about a product);
  5. drop a shorter n-gram that occurs exactly as often as a longer kept n-gram containing it
     (df(short) == df(long), short a contiguous part of long): it would duplicate that label;
  6. rank by (-df, n-gram) and keep the first max_attributes.
FashionViL mined 2232 such labels from FashionGen; the reference does not publish the procedure,
so this one is ours: frequency + stop-list filtering is what the paper describes ("extracted from
the fashion corpus") and it is reproducible from the data alone.

Matching (`Matcher`): a product's attributes are the vocabulary n-grams that occur in its text
(same normalisation), a multi-hot bool [A] vector; PAC turns it into uniform soft labels.

The vocabulary file (one `ngram<TAB>df` per line, in rank order; `save_vocabulary`,
`load_vocabulary`) is made from a built dataset by fashion_jax/prepare/attributes.py:
`python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir=W` writes it to
W/prepared/attributes.txt and launch.train fills data.attributes with it. This module is the
pure part (text in, vocabulary and multi-hot vectors out); it reads no dataset.
"""

import collections
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9%][a-z0-9%'\-]*")

STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for from by with without into onto over under as is are
was were be been it its this that these those their there here has have had will can
not no yes very more most less least so too also just than then such both each every all any
some other another one two three four five six seven eight nine ten
which who whom whose what when where why how while
item items product products piece pieces style styled styles look looks made make makes
great perfect ideal new classic features featuring feature detail details designed design
you your we our us he she his her they them i me my
""".split())


def words(text: str) -> list[str]:
  """Normalised words of `text` (lowercase, see the module docstring)."""
  return _WORD.findall(text.lower())


def ngrams(ws: Sequence[str], max_n: int) -> set[str]:
  """Distinct candidate n-grams (1..max_n) of a word list, stop-word and digit filtered."""
  out = set()
  for n in range(1, max_n + 1):
    for i in range(len(ws) - n + 1):
      g = ws[i:i + n]
      if g[0] in STOP_WORDS or g[-1] in STOP_WORDS or all(w.isdigit() for w in g):
        continue
      out.add(" ".join(g))
  return out


def mine(texts: Iterable[str], *, max_n: int = 3, min_df: int = 5, max_df_frac: float = 0.5,
         max_attributes: int = 2232) -> list[tuple[str, int]]:
  """[(n-gram, df)] in rank order: the pseudo-attribute vocabulary of `texts`."""
  if max_n < 1 or min_df < 1 or not 0 < max_df_frac <= 1 or max_attributes < 1:
    raise ValueError(f"Bad mining parameters max_n={max_n}, min_df={min_df}, "
                     f"max_df_frac={max_df_frac}, max_attributes={max_attributes}.")
  df = collections.Counter()
  num = 0
  for text in texts:
    num += 1
    df.update(ngrams(words(text), max_n))
  if num == 0:
    raise ValueError("No texts to mine pseudo-attributes from.")
  kept = {g: c for g, c in df.items() if min_df <= c <= max_df_frac * num}
  # Step 5: a shorter n-gram that only ever appears inside one longer kept n-gram.
  subsumed = set()
  for g, c in kept.items():
    parts = g.split(" ")
    for n in range(1, len(parts)):
      for i in range(len(parts) - n + 1):
        sub = " ".join(parts[i:i + n])
        if kept.get(sub) == c:
          subsumed.add(sub)
  ranked = sorted(((g, c) for g, c in kept.items() if g not in subsumed),
                  key=lambda gc: (-gc[1], gc[0]))
  return ranked[:max_attributes]


def save_vocabulary(vocab: Sequence[tuple[str, int]], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for g, c in vocab:
      f.write(f"{g}\t{c}\n")
  return path


def load_vocabulary(path: str) -> list[str]:
  """The n-grams of a vocabulary file, in order. FileNotFoundError / ValueError name the path."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Pseudo-attribute vocabulary {path!r} (config.data.attributes) does not exist; "
        "`python -m launch.prepare --config=CONFIG --workdir=WORKDIR` mines one into "
        "WORKDIR/prepared/ and launch.train fills data.attributes with it (or mine one alone: "
        "`python -m fashion_jax.prepare.attributes --dataset=NAME --out=PATH`).")
  with open(path, encoding="utf-8") as f:
    vocab = [line.rstrip("\n").split("\t")[0] for line in f if line.strip()]
  if not vocab:
    raise ValueError(f"Pseudo-attribute vocabulary {path!r} is empty.")
  if len(set(vocab)) != len(vocab):
    raise ValueError(f"Pseudo-attribute vocabulary {path!r} repeats an entry.")
  return vocab


class Matcher:
  """texts -> multi-hot bool [N, A] of the vocabulary n-grams each text contains."""

  def __init__(self, vocab: Sequence[str]):
    self.vocab = list(vocab)
    self.index = {g: i for i, g in enumerate(self.vocab)}
    self.max_n = max(len(g.split(" ")) for g in self.vocab)

  def __call__(self, texts: Iterable) -> np.ndarray:
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
    out = np.zeros((len(texts), len(self.vocab)), bool)
    for row, text in enumerate(texts):
      ws = words(text)
      for n in range(1, self.max_n + 1):
        for i in range(len(ws) - n + 1):
          j = self.index.get(" ".join(ws[i:i + n]))
          if j is not None:
            out[row, j] = True
    return out
