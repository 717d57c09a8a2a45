"""Shipped CLIP BPE / BERT WordPiece vocabularies vs independent references and transformers."""

import collections
import json
import unicodedata

import numpy as np
import pytest
import regex
import transformers

from fashion_jax.data import tokenizers
from tests import test_siglip
from tests import torchvision_cpu

TEXTS = [
    "Red Polka-dot Silk Clutch",
    "Navy striped COTTON shirt, 100% cotton! Made in Zürich; don't tumble-dry.",
    "Quvelix's  oversized\twool-blend   coat\n(FW2017) -- 60% wool, 40% polyamide",
    "",
    "émoji 😀 and ñandú",
]


# ------------------------------------------------------------------------------------------------
# Independent references, written from the algorithms' descriptions.
# ------------------------------------------------------------------------------------------------


def clip_reference(text, vocab, ranks):
  """OpenAI CLIP BPE: normalise, regex-split, byte-encode, merge by rank, `</w>` on the end."""
  byte_chars = tokenizers.bytes_to_unicode()
  text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
  ids = []
  for word in regex.findall(tokenizers.CLIP_SPLIT_REGEX, text):
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    parts = chars[:-1] + [chars[-1] + "</w>"]
    while len(parts) > 1:
      pairs = [(ranks.get(p, np.inf), i) for i, p in enumerate(zip(parts, parts[1:]))]
      rank, _ = min(pairs)
      if rank == np.inf:
        break
      best = min(p for p in zip(parts, parts[1:]) if ranks.get(p) == rank)
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids.extend(vocab[p] for p in parts)
  return ids


def bert_reference(text, vocab):
  """Uncased BERT: strip accents, split on space/punctuation, greedy longest-match WordPiece."""
  text = "".join(c for c in unicodedata.normalize("NFD", text.lower())
                 if unicodedata.category(c) != "Mn")
  words = []
  for chunk in text.split():
    word = ""
    for c in chunk:
      cp = ord(c)
      punct = (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or
               unicodedata.category(c).startswith("P"))
      if punct:
        words += [word, c] if word else [c]
        word = ""
      else:
        word += c
    if word:
      words.append(word)
  ids = []
  for word in words:
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = ("##" if start else "") + word[start:end]
        if piece in vocab:
          break
        end -= 1
      if end == start:
        pieces = ["[UNK]"]
        break
      pieces.append(piece)
      start = end
    ids.extend(vocab[p] for p in pieces)
  return ids


@pytest.fixture(scope="module")
def clip_files():
  vocab = json.loads((tokenizers.CLIP_DIR / "vocab.json").read_text(encoding="utf-8"))
  lines = (tokenizers.CLIP_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
  assert lines[0].startswith("#version")
  ranks = {tuple(line.split(" ")): i for i, line in enumerate(lines[1:])}
  return vocab, ranks


def _pad(ids, max_len, bos, eos, pad):
  ids = [bos] + ids[:max_len - 2] + [eos]
  return ids + [pad] * (max_len - len(ids))


# ------------------------------------------------------------------------------------------------
# CLIP.
# ------------------------------------------------------------------------------------------------


def test_clip_vocab_layout(clip_files):
  vocab, ranks = clip_files
  inverse = sorted(vocab, key=vocab.get)
  assert sorted(vocab.values()) == list(range(len(vocab)))
  byte_chars = list(tokenizers.bytes_to_unicode().values())
  assert inverse[:256] == byte_chars
  assert inverse[256:512] == [c + "</w>" for c in byte_chars]
  assert inverse[-2:] == ["<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) <= 8192 and len(ranks) >= 2000  # A modest vocab of real merges.
  for a, b in ranks:
    assert a in vocab and b in vocab and a + b in vocab


def test_clip_matches_reference_and_transformers(clip_files):
  vocab, ranks = clip_files
  tok = tokenizers.get_tokenizer("clip", "", 77)
  ours = tok(TEXTS)
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
  expected = [_pad(clip_reference(t, vocab, ranks), 77, tok.bos_token_id, tok.eos_token_id,
                   tok.pad_token_id) for t in TEXTS]
  np.testing.assert_array_equal(ours, expected)
  for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
    hf = cls.from_pretrained(str(tokenizers.CLIP_DIR))
    got = hf(TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(got, ours)
  # Decoding gives the normalised text back (byte-level BPE is lossless up to normalisation).
  assert tok.hf.decode(ours[0], skip_special_tokens=True) == "red polka - dot silk clutch"


def test_clip_truncation_and_eos_pooling(clip_files):
  vocab, ranks = clip_files
  tok = tokenizers.get_tokenizer("clip", "", 16)
  long_text = " ".join(["zephyrine quvelix wool-blend 😀"] * 20)
  ids, mask = tok([long_text, "red shirt"], with_mask=True)
  ref = clip_reference(long_text, vocab, ranks)
  assert len(ref) > 14
  np.testing.assert_array_equal(ids[0], [tok.bos_token_id] + ref[:14] + [tok.eos_token_id])
  assert mask[0].all() and mask[1].sum() == 4
  assert ids.max() < tok.vocab_size
  # HF's CLIPTextTransformer pools at the first eos_token_id (eos != 2); with EOS the largest id
  # and pad == EOS, the legacy argmax(ids) rule picks the same position.
  assert tok.eos_token_id == tok.vocab_size - 1 and tok.eos_token_id != 2
  first_eos = np.argmax(ids == tok.eos_token_id, axis=1)
  np.testing.assert_array_equal(np.argmax(ids, axis=1), first_eos)
  np.testing.assert_array_equal(first_eos, [15, 3])


def test_clip_processor_round_trip(tmp_path):
  tok = tokenizers.get_tokenizer("clip", "", 77)
  processor = transformers.CLIPProcessor(
      tokenizer=tok.hf, image_processor=transformers.CLIPImageProcessor())
  processor.save_pretrained(tmp_path)
  loaded = transformers.CLIPProcessor.from_pretrained(tmp_path)
  got = loaded(text=TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(got, tok(TEXTS))
  again = tokenizers.get_tokenizer("clip", str(tmp_path), 77)  # A "real" local HF directory.
  np.testing.assert_array_equal(again(TEXTS), tok(TEXTS))


# ------------------------------------------------------------------------------------------------
# BERT.
# ------------------------------------------------------------------------------------------------


def test_bert_matches_reference_and_transformers():
  lines = (tokenizers.BERT_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
  vocab = {t: i for i, t in enumerate(lines)}
  tok = tokenizers.get_tokenizer("bert", "", 40)
  assert lines[:5] == list(tokenizers.BERT_SPECIALS)
  texts = TEXTS[:4]
  ours = tok(texts)
  expected = [_pad(bert_reference(t, vocab), 40, vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"])
              for t in texts]
  np.testing.assert_array_equal(ours, expected)
  hf = transformers.BertTokenizerFast.from_pretrained(str(tokenizers.BERT_DIR))
  assert len(hf) == len(lines)  # The file is really used (v5 BertTokenizer(vocab_file=) is not).
  got = hf(texts, padding="max_length", max_length=40, truncation=True)["input_ids"]
  np.testing.assert_array_equal(got, ours)
  assert tok.is_continuation[vocab["##s"]] and not tok.is_continuation[vocab["red"]]
  long_ids, mask = tok([" ".join(["unfathomable quvelix"] * 30)], with_mask=True)
  assert long_ids[0, 0] == vocab["[CLS]"] and long_ids[0, -1] == vocab["[SEP]"] and mask.all()


def test_local_bert_directory_is_loaded(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "shirt", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = tokenizers.get_tokenizer("bert", str(tmp_path), 6)
  assert tok.vocab_size == len(words)
  np.testing.assert_array_equal(tok(["red shirts blue"]), [[2, 5, 6, 7, 1, 3]])


def test_bad_arguments():
  with pytest.raises(ValueError, match="'gpt'"):
    tokenizers.get_tokenizer("gpt")
  with pytest.raises(FileNotFoundError, match="/nonexistent/dir"):
    tokenizers.get_tokenizer("clip", "/nonexistent/dir")
  with pytest.raises(ValueError, match="max_len=1"):
    tokenizers.get_tokenizer("bert", "", 1)


# ------------------------------------------------------------------------------------------------
# Building.
# ------------------------------------------------------------------------------------------------


def naive_merges(word_counts, num_merges, min_frequency=2):
  """Recount every pair at every step; most frequent first, ties to the smallest pair."""
  words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in word_counts.items()}
  merges = []
  for _ in range(num_merges):
    counts = collections.Counter()
    for w, c in words.items():
      for p in zip(w, w[1:]):
        counts[p] += c
    if not counts:
      break
    best = min(counts, key=lambda p: (-counts[p], p))
    if counts[best] < min_frequency:
      break
    merges.append(best)
    new = {}
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new[tuple(out)] = new.get(tuple(out), 0) + c
    words = new
  return merges


def test_learn_merges_matches_naive_bpe():
  rng = np.random.default_rng(0)
  letters = list("abcdeab")
  counts = collections.Counter(
      "".join(rng.choice(letters, rng.integers(1, 7))) for _ in range(400))
  fast = tokenizers.learn_merges(counts, lambda w: list(w[:-1]) + [w[-1] + "</w>"],
                                 lambda a, b: a + b, 60)
  assert fast == naive_merges(counts, 60)
  assert len(fast) > 20


def test_build_assets_reproduces_shipped_files(tmp_path):
  tokenizers.build_assets(tmp_path)
  for sub in ("clip_bpe", "bert_wordpiece"):
    for path in sorted((tokenizers.ASSETS_DIR / sub).iterdir()):
      rebuilt = (tmp_path / sub / path.name).read_bytes()
      assert rebuilt == path.read_bytes(), (
          f"{sub}/{path.name} is stale: run python -m fashion_jax.data.tokenizers --build_assets")


def test_siglip_pads_with_eos_and_needs_a_path(tmp_path):
  """kind='siglip' pads to max_len with the EOS id (SigLIP pools the last position), whatever the
  tokenizer's own pad id; the real tokens are transformers' own; no path is a clear error."""
  test_siglip.make_siglip_tokenizer(tmp_path / "spm")
  # A SigLIP tokenizer whose own pad is not its EOS: padding with hf's pad would be wrong.
  hf = transformers.SiglipTokenizer.from_pretrained(str(tmp_path / "spm"), pad_token="<pad>")
  hf.save_pretrained(str(tmp_path / "tok"))
  assert hf.pad_token_id != hf.eos_token_id
  tok = tokenizers.get_tokenizer("siglip", str(tmp_path / "tok"), 12)
  texts = ["red wool coat", "black leather ankle boots with a side zip and a block heel " * 3]
  ids, mask = tok(texts, with_mask=True)
  assert ids.shape == (2, 12) and tok.pad_token_id == hf.eos_token_id
  for row, m, text in zip(ids, mask, texts):
    want = hf(text, truncation=True, max_length=12)["input_ids"]
    assert list(row[:m.sum()]) == want and want[-1] == hf.eos_token_id
    assert (row[m.sum():] == hf.eos_token_id).all()
  assert mask[1].all()  # Truncated to 12, still ending in EOS.
  with pytest.raises(ValueError, match="kind='siglip' ships no vocabulary"):
    tokenizers.get_tokenizer("siglip", "", 12)


# ------------------------------------------------------------------------------------------------
# open_clip text cleaning.
# ------------------------------------------------------------------------------------------------


def _open_clip_dir(path, text_cfg):
  """The shipped CLIP vocab files plus an open_clip_config.json with `text_cfg` in `path`."""
  path.mkdir()
  for f in tokenizers.CLIP_DIR.iterdir():
    (path / f.name).write_bytes(f.read_bytes())
  (path / "open_clip_config.json").write_text(json.dumps(dict(model_cfg=dict(
      embed_dim=8, vision_cfg=dict(width=8), text_cfg=text_cfg))))
  return str(path)


# Dirty catalogue text, and what open_clip's three cleanings make of it (its tokenizer module:
# ftfy.fix_text, html.unescape twice, strip; whitespace collapse; 'canonicalize' also maps '_' to
# ' ', drops string.punctuation and lower-cases).
DIRTY = "  Navy &amp;amp; Red_stripe   SHIRT \u2013 \u201cslim\u201d fit!! "
CLEANED = dict(lower='navy & red_stripe shirt \u2013 "slim" fit!!',
               whitespace='Navy & Red_stripe SHIRT \u2013 "slim" fit!!',
               canonicalize="navy red stripe shirt \u2013 slim fit")


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_open_clip_dir_cleans_as_its_config_says(tmp_path, clean):
  path = _open_clip_dir(tmp_path / "oc", dict(tokenizer_kwargs=dict(clean=clean)))
  tok = tokenizers.get_tokenizer("clip", path, 24)
  assert tok.clean == clean
  plain = tokenizers.get_tokenizer("clip", str(tokenizers.CLIP_DIR), 24)
  assert plain.clean is None
  np.testing.assert_array_equal(tok([DIRTY, b"Red_shirt"]),
                                plain([CLEANED[clean], open_clip_clean(clean, "Red_shirt")]))
  if clean == "canonicalize":  # Punctuation and '&amp;amp;' gone: not the raw tokenisation.
    assert not np.array_equal(tok([DIRTY]), plain([DIRTY]))


def open_clip_clean(kind, s):
  """The cleanings for a plain ASCII word with '_' (no ftfy / html effects)."""
  s = " ".join(s.split())
  if kind == "canonicalize":
    return s.replace("_", " ").lower()
  return s.lower() if kind == "lower" else s


def test_open_clip_default_cleaning_and_bad_value(tmp_path):
  # open_clip's defaults: 'lower' for its CLIP BPE, 'whitespace' with an HF tokenizer.
  assert tokenizers.open_clip_cleaning(_open_clip_dir(tmp_path / "a", {})) == "lower"
  assert tokenizers.open_clip_cleaning(_open_clip_dir(
      tmp_path / "b", dict(hf_tokenizer_name="org/tok"))) == "whitespace"
  assert tokenizers.open_clip_cleaning(str(tokenizers.CLIP_DIR)) is None
  assert tokenizers.open_clip_cleaning("") is None
  bad = _open_clip_dir(tmp_path / "c", dict(tokenizer_kwargs=dict(clean="shout")))
  with pytest.raises(ValueError, match="'shout'"):
    tokenizers.get_tokenizer("clip", bad, 16)
  with pytest.raises(ValueError, match="clean='upper'"):
    tokenizers.Tokenizer("clip", tokenizers.get_tokenizer("clip").hf, 16, clean="upper")


def test_open_clip_cleaning_matches_open_clip():
  """Our cleanings equal open_clip's own get_clean_fn (skipped without open_clip)."""
  try:
    ocl = torchvision_cpu.import_open_clip()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"open_clip unavailable: {e}")
  for kind, expected in CLEANED.items():
    assert ocl.tokenizer.get_clean_fn(kind)(DIRTY) == expected


# ------------------------------------------------------------------------------------------------
# A vocabulary learnt on a user's own catalog.
# ------------------------------------------------------------------------------------------------


def test_catalog_bpe_makes_catalog_words_single_tokens(tmp_path):
  catalog = ["Qorvane saffron ribbed pendant", "Handmade locket by Qorvane, oxblood, petite.",
             "Zanmophel cobalt latticed sash"] * 2
  n = tokenizers.build_catalog_bpe(catalog, tmp_path / "v")
  vocab = json.loads((tmp_path / "v" / "vocab.json").read_text(encoding="utf-8"))
  ranks = {tuple(line.split()): i for i, line in enumerate(
      (tmp_path / "v" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:])}
  assert n == len(vocab)
  shipped = tokenizers.get_tokenizer("clip", "", 32)
  ours = tokenizers.get_tokenizer("clip", str(tmp_path / "v"), 32)
  hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path / "v"))
  texts = ["Qorvane oxblood locket", "Zanmophel sash", "an unseen Brandname 😀"]
  for text in texts:
    ids = clip_reference(text, vocab, ranks)  # The independent BPE.
    assert ours([text])[0].tolist() == _pad(ids, 32, ours.bos_token_id, ours.eos_token_id,
                                            ours.pad_token_id)
    assert hf(text)["input_ids"][1:-1] == ids
  for word in ("qorvane", "oxblood", "zanmophel"):  # One token here, byte pieces when shipped.
    assert len(ours.hf.tokenize(word)) == 1
    assert len(shipped.hf.tokenize(word)) > 1
  with pytest.raises(ValueError, match="no texts"):
    tokenizers.build_catalog_bpe([], tmp_path / "w")
