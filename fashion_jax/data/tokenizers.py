"""Text tokenizers: CLIP byte-level BPE and BERT WordPiece, offline.

The package ships two small vocabularies trained on fashion text (assets/clip_bpe/,
assets/bert_wordpiece/), rebuilt deterministically by

  python -m fashion_jax.data.tokenizers --build_assets

from a corpus of generic fashion sentences written here plus the synthetic catalog's train texts
(fashion_jax.data.catalog). The `tokenizers` library normalises and pre-tokenises exactly as the
HF tokenizers do at run time; the merges are learnt by `learn_merges` (deterministic tie-breaking,
unlike the library's trainers), so the same command always writes the same files.

Real vocabularies (e.g. a local copy of openai/clip-vit-base-patch32 or bert-base-uncased) load
from a local HF directory given as `path`; nothing is ever downloaded.

CLIP BPE (assets/clip_bpe/): the algorithm of OpenAI's CLIP tokenizer: NFC, whitespace
collapsed, lowercased; words split by CLIP's regex; bytes mapped to printable unicode (GPT-2's
byte-to-unicode table); the last symbol of each word carries `</w>`; merges applied by rank.
vocab.json is laid out like CLIP's: 256 byte symbols, the same 256 with `</w>`, one token per
merge in merge order, then `<|startoftext|>` and `<|endoftext|>` (the two largest ids). Every byte
and every byte+`</w>` is in the vocab, so any text tokenises without an unknown token.

EOS pooling: HF CLIPTextTransformer pools at argmax(input_ids) when config.eos_token_id == 2
(legacy) and otherwise at the first position of eos_token_id. For the shipped vocab the EOS id is
the largest id and is not 2, so HF takes the second branch; since pad == eos and EOS is the
largest id, argmax(ids) also lands on the first EOS: both rules pick the same position. An
exported CLIPTextConfig must carry eos_token_id = bos+1 of this vocab (tokenizer.eos_token_id),
not HF's default 49407.

open_clip text cleaning: a tokenizer loaded from an open_clip checkpoint directory (one with
open_clip_config.json, e.g. Marqo-FashionCLIP saved locally) cleans every text as that checkpoint
was trained (text_cfg.tokenizer_kwargs.clean: 'lower' | 'whitespace' | 'canonicalize', defaulted
as open_clip does; interop/open_clip.clean_text) before tokenising, in training, evaluation and
the API alike. Other directories and the shipped vocabularies clean nothing beyond the
tokenizer's own normaliser.

BERT WordPiece (assets/bert_wordpiece/): lowercase, accents stripped, `##` continuation prefix,
special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. Characters outside its alphabet become
[UNK] (WordPiece's rule); printable ASCII is always in the alphabet.
"""

import argparse
import collections
import functools
import heapq
import importlib
import json
import os
import pathlib
import random

import numpy as np

from fashion_jax.data import schema
from fashion_jax.interop import open_clip

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
CLIP_DIR = ASSETS_DIR / "clip_bpe"
BERT_DIR = ASSETS_DIR / "bert_wordpiece"

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT_REGEX = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                    r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KINDS = ("clip", "bert", "siglip")


# ------------------------------------------------------------------------------------------------
# The corpus the shipped vocabularies are trained on.
# ------------------------------------------------------------------------------------------------

_WORDS = dict(
    colour=(
        "black white grey gray charcoal navy blue light-blue sky-blue royal-blue teal turquoise "
        "green olive khaki sage mint emerald forest-green yellow mustard gold orange rust "
        "red burgundy wine maroon pink blush rose fuchsia magenta purple lilac lavender violet "
        "plum brown tan camel beige cream ivory ecru off-white nude taupe chocolate cognac "
        "silver bronze copper multicolour multicolor neon pastel dark light bright pale deep "
        "washed faded stone sand coral peach mauve indigo denim-blue"),
    garment=(
        "top tops t-shirt tee tank camisole blouse shirt shirts polo henley sweater jumper "
        "cardigan hoodie sweatshirt turtleneck vest waistcoat bodysuit crop-top tunic dress "
        "dresses gown maxi midi mini slip-dress shirtdress sundress skirt skirts pencil-skirt "
        "pleated-skirt trousers pants jeans chinos joggers leggings shorts culottes overalls "
        "jumpsuit playsuit romper suit blazer jacket jackets coat coats parka trench-coat "
        "bomber puffer raincoat anorak poncho cape shoes sneakers trainers boots ankle-boots "
        "chelsea-boots loafers oxfords brogues derbies pumps heels stilettos sandals mules "
        "espadrilles flats ballerinas slippers clogs wedges platforms bag bags handbag tote "
        "clutch backpack satchel shoulder-bag crossbody pouch wallet purse duffle briefcase "
        "hat hats cap beanie beret fedora bucket-hat baseball-cap scarf scarves gloves belt "
        "belts tie bow-tie socks tights sunglasses glasses watch jewellery jewelry necklace "
        "bracelet earrings ring rings brooch keyring lingerie bra briefs boxers swimsuit "
        "bikini swim-shorts pyjamas robe activewear sportswear outerwear knitwear footwear "
        "accessories accessory"),
    material=(
        "cotton organic-cotton linen silk satin wool merino cashmere alpaca mohair angora "
        "polyester nylon polyamide viscose rayon lyocell tencel modal elastane spandex lycra "
        "acrylic leather suede nubuck patent-leather faux-leather vegan-leather shearling "
        "fur faux-fur denim chambray corduroy velvet velour tweed flannel fleece jersey "
        "canvas twill poplin chiffon crepe georgette organza tulle lace mesh neoprene "
        "down feather rubber cork straw raffia jute bamboo hemp recycled blend"),
    pattern=(
        "solid plain striped stripes pinstripe breton checked checks check plaid tartan "
        "gingham houndstooth herringbone dotted dots polka-dot floral flowers paisley "
        "animal-print leopard zebra snake camouflage camo geometric abstract graphic print "
        "printed logo monogram embroidered embroidery jacquard quilted ribbed cable-knit "
        "colour-block colourblock tie-dye ombre sequinned beaded metallic glitter"),
    detail=(
        "short-sleeve short-sleeved long-sleeve long-sleeved sleeveless three-quarter "
        "cap-sleeve puff-sleeve raglan crew-neck crewneck v-neck round-neck scoop-neck "
        "turtleneck mock-neck boat-neck square-neck halter off-shoulder one-shoulder "
        "collar collared mandarin-collar button-down spread-collar hood hooded zip zipper "
        "zipped half-zip full-zip buttons button-fastening press-studs drawstring "
        "elasticated waistband high-waisted mid-rise low-rise belted pockets patch-pocket "
        "flap-pocket chest-pocket side-pockets pleats pleated ruffles ruffled frills "
        "wrap slit split hem raw-hem cuffs rolled-cuffs lining lined unlined padded "
        "stitching contrast-stitching topstitching panel panels yoke darts seams seamless "
        "heel heels heel-height block-heel kitten-heel stiletto-heel flat-sole platform-sole "
        "rubber-sole leather-sole toe pointed-toe round-toe square-toe open-toe peep-toe "
        "lace-up laces buckle buckles strap straps ankle-strap slingback adjustable-strap "
        "chain-strap top-handle handles removable detachable magnetic-closure clasp "
        "brim wide-brim peak visor label tag patch badge logo-patch eyelets studs rivets"),
    fit=(
        "slim slim-fit skinny regular regular-fit relaxed loose oversized boxy cropped "
        "tailored fitted straight straight-leg wide-leg flared bootcut tapered baggy "
        "stretch stretchy structured soft lightweight heavyweight warm breathable "
        "waterproof water-repellent windproof insulated thermal quick-dry casual formal "
        "smart classic vintage retro modern minimalist elegant chic sporty preppy "
        "bohemian boho edgy streetwear urban romantic feminine masculine androgynous "
        "luxury premium essential basic everyday timeless statement trendy seasonal"),
    other=(
        "men women unisex mens womens men's women's kids girls boys adult size sizes small "
        "medium large extra xs s m l xl xxl one-size petite tall plus fits true to size "
        "model wears is cm inches tall wearing height length width depth long short "
        "knee-length ankle-length floor-length full-length above below mid calf thigh "
        "spring summer autumn fall winter ss fw season collection new arrival limited "
        "edition exclusive made in italy france portugal spain china india turkey "
        "machine wash hand wash dry clean only do not tumble iron cool care washable "
        "composition fabric material shell lining trim body sleeves"),
    function=(
        "a an the and or with without in on of for to from by at as is are this that "
        "these those it its features featuring has have comes come designed crafted cut "
        "made finished detailed trimmed shaped set styled perfect ideal great easy "
        "pair pairs wear worn layer layering over under day night office weekend travel "
        "party beach holiday evening work everyday occasion look outfit wardrobe piece "
        "style styles your you our we can will be all any one two three four five each "
        "both front back side inside outside top bottom left right upper lower centre center "
        "throughout along around across between through up down off out very more most "
        "extra fully partially slightly subtle bold tonal contrasting matching signature"),
)

_TEMPLATES = (
    "{fit} {colour} {material} {garment}",
    "{colour} {pattern} {garment} in {material}",
    "{garment} with {detail}. {fit} fit",
    "this {garment} features {detail} and {detail}",
    "{material} {garment} with {pattern} pattern. {detail}. {colour}",
    "{colour} and {colour} {garment}. made in {material}",
    "{fit} {garment} crafted from {material}. {other}",
    "{pattern} {material} {garment} with {detail}. {function} {other}",
    "{other} {colour} {garment}",
    "{garment}. composition: {percent}% {material}, {percent2}% {material}",
    "{garment} in {colour}. {detail}. {detail}. {fit}",
    "season {season}. {garment} by {brand}",
)

_SYLLABLES = ("ka lo mi ra ve no sa te lu ze ri do fa be ni to ma ko su pe la vi re "
              "an el or is um ar en os ix").split()


def generic_fashion_corpus(num_sentences: int = 60000, seed: int = 0) -> list[str]:
  """Deterministic fashion sentences: every vocabulary word, then templated product texts."""
  rng = random.Random(seed)
  pools = {k: v.split() for k, v in _WORDS.items()}
  out = []
  for words in pools.values():  # Every word at least a few times, hyphenated or spaced.
    for w in words:
      out.extend([w, w.replace("-", " "), w.capitalize()])
  for _ in range(num_sentences):
    template = rng.choice(_TEMPLATES)
    fields = {k: rng.choice(v).replace("-", rng.choice(["-", " "])) for k, v in pools.items()}
    pct = rng.randrange(5, 96)
    fields.update(percent=pct, percent2=100 - pct,
                  season=f"{rng.choice(['SS', 'FW'])}{rng.randrange(2010, 2026)}",
                  brand="".join(rng.choice(_SYLLABLES) for _ in range(rng.randrange(2, 4))))
    text = template.format(**fields)
    if rng.random() < 0.3:
      text = text.capitalize()
    out.append(text)
  return out


def catalog_corpus(num_products: int = 5000) -> list[str]:
  """Texts of the synthetic catalog's first `num_products` TRAIN products (title, description,
  tags); empty until fashion_jax.data.catalog exists. Held-out brands and sub-categories are
  left out on purpose: like a real vocabulary meeting new names, they fall back to sub-words."""
  try:
    catalog = importlib.import_module("fashion_jax.data.catalog")
  except ModuleNotFoundError as e:
    if e.name != "fashion_jax.data.catalog":
      raise
    return []
  texts = []
  for i in range(num_products):
    spec = catalog.sample_spec("train", i, seed=0)
    texts.extend(catalog.describe(spec, seed=0))
    fields = catalog.spec_fields(spec)
    texts.extend(fields[k] for k in schema.TAG_FIELDS if fields.get(k))
  return texts


def corpus() -> list[str]:
  return generic_fashion_corpus() + catalog_corpus()


# ------------------------------------------------------------------------------------------------
# Building the shipped vocabularies.
# ------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP table mapping each byte to a printable unicode character.

  Printable latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + k) in order.
  Returned in CLIP's vocab order (the printable ones first).
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def learn_merges(word_counts: dict[str, int], split, join, num_merges: int,
                 min_frequency: int = 2) -> list[tuple[str, str]]:
  """Byte-pair merges learnt from word counts, deterministically.

  split(word) -> initial symbols; join(a, b) -> the merged symbol. Each step merges the most
  frequent adjacent pair (counted over word frequencies); ties go to the lexicographically
  smallest pair, so the result depends only on the counts (the `tokenizers` trainers break ties
  through hash-map order, which changes from run to run). Stops after num_merges merges or when
  no pair occurs min_frequency times.
  """
  words = [list(split(w)) for w in sorted(word_counts)]
  freqs = [word_counts[w] for w in sorted(word_counts)]
  counts = collections.Counter()
  where = collections.defaultdict(set)
  for i, (syms, f) in enumerate(zip(words, freqs)):
    for pair in zip(syms, syms[1:]):
      counts[pair] += f
      where[pair].add(i)
  heap = [(-c, pair) for pair, c in counts.items()]
  heapq.heapify(heap)
  merges = []
  while heap and len(merges) < num_merges:
    neg, pair = heapq.heappop(heap)
    if -neg != counts.get(pair, 0):
      continue  # Stale entry; the current count was pushed when it changed.
    if -neg < min_frequency:
      break
    merges.append(pair)
    merged = join(*pair)
    changed = set()
    for i in sorted(where.pop(pair)):
      syms, f = words[i], freqs[i]
      for p in zip(syms, syms[1:]):
        counts[p] -= f
        changed.add(p)
      out, k = [], 0
      while k < len(syms):
        if k + 1 < len(syms) and (syms[k], syms[k + 1]) == pair:
          out.append(merged)
          k += 2
        else:
          out.append(syms[k])
          k += 1
      words[i] = out
      for p in zip(out, out[1:]):
        counts[p] += f
        where[p].add(i)
        changed.add(p)
    for p in changed:
      if counts[p] > 0:
        heapq.heappush(heap, (-counts[p], p))
      else:
        counts.pop(p, None)
        where.pop(p, None)
  return merges


def _clip_backend():
  """A `tokenizers.Tokenizer` with CLIP's normaliser and pre-tokeniser (no model needed)."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  return tok


def _word_counts(texts, normalizer, pre_tokenizer, chunk: int = 2000) -> dict[str, int]:
  """Word -> count after normalisation and pre-tokenisation. Texts are processed `chunk` at a
  time joined by spaces: both pre-tokenisers split at whitespace, so no word spans two texts."""
  counts = collections.Counter()
  for start in range(0, len(texts), chunk):
    joined = normalizer.normalize_str(" ".join(texts[start:start + chunk]))
    counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(joined))
  return counts


def build_clip_bpe(texts: list[str], out_dir, vocab_size: int = 8192) -> int:
  """Learns CLIP-style BPE on `texts`; writes vocab.json, merges.txt and HF configs.

  Returns the vocab size (<= vocab_size: learning stops when no pair occurs twice).
  """
  base = list(bytes_to_unicode().values())
  base = base + [c + "</w>" for c in base]
  if vocab_size <= len(base) + 2:
    raise ValueError(f"CLIP vocab_size={vocab_size} must exceed 514 (512 byte symbols + 2).")
  backend = _clip_backend()
  counts = _word_counts(texts, backend.normalizer, backend.pre_tokenizer)
  vocab = {tok: i for i, tok in enumerate(base)}
  merges = []
  # Each merge adds at most one token; learn enough, keep merges while the vocab has room.
  for a, b in learn_merges(counts, lambda w: list(w[:-1]) + [w[-1] + "</w>"],
                           lambda a, b: a + b, vocab_size - len(base) - 2):
    vocab.setdefault(a + b, len(vocab))
    merges.append((a, b))
  vocab[CLIP_BOS] = len(vocab)
  vocab[CLIP_EOS] = len(vocab)

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
                                      encoding="utf-8")
  (out_dir / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  specials = dict(bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS, pad_token=CLIP_EOS)
  (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
  (out_dir / "tokenizer_config.json").write_text(json.dumps(
      dict(tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True,
           clean_up_tokenization_spaces=False, **specials), indent=2) + "\n")
  return len(vocab)


def build_bert_wordpiece(texts: list[str], out_dir, vocab_size: int = 8192) -> int:
  """Learns an uncased WordPiece vocab on `texts` (BPE merges with `##` pieces, the way HF's
  WordPiece trainer does); writes vocab.txt and HF configs.

  vocab.txt = BERT_SPECIALS, the alphabet (printable ASCII + every corpus character, each also as
  a `##` piece), then one token per merge.
  """
  from tokenizers import normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=True, lowercase=True)
  counts = _word_counts(texts, normalizer, pre_tokenizers.BertPreTokenizer())
  chars = sorted(set("".join(counts)) | {chr(c) for c in range(33, 127)})
  vocab = list(BERT_SPECIALS) + chars + ["##" + c for c in chars]
  if vocab_size <= len(vocab):
    raise ValueError(f"BERT vocab_size={vocab_size} must exceed the alphabet ({len(vocab)}).")
  seen = set(vocab)
  join = lambda a, b: a + b[2:]  # b is always a '##' piece.
  for a, b in learn_merges(counts, lambda w: [w[0]] + ["##" + c for c in w[1:]], join,
                           vocab_size - len(vocab)):
    if join(a, b) not in seen:
      seen.add(join(a, b))
      vocab.append(join(a, b))
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
  specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                  mask_token="[MASK]")
  (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
  (out_dir / "tokenizer_config.json").write_text(json.dumps(
      dict(tokenizer_class="BertTokenizer", model_max_length=512, do_lower_case=True,
           strip_accents=True, tokenize_chinese_chars=True, clean_up_tokenization_spaces=False,
           **specials), indent=2) + "\n")
  return len(vocab)


def dataset_texts(name: str, data_dir: str = "", split: str = "train",
                  fields: tuple[str, ...] = ("title", "description")) -> list[str]:
  """Every non-blank `fields` text of a built TFDS product dataset's `split` (images skipped).

  KeyError names a field the dataset lacks; ValueError a split it lacks.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: TensorFlow)
  builder = tfds.builder(name, data_dir=data_dir or None)
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  missing = [f for f in fields if f not in builder.info.features]
  if missing:
    raise KeyError(f"Fields {missing} are not in {name}; it has "
                   f"{sorted(builder.info.features)}.")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={schema.IMAGES: tfds.decode.SkipDecoding()})
  texts = []
  for ex in ds.map(lambda ex: {f: ex[f] for f in fields}).as_numpy_iterator():
    texts.extend(t for t in (ex[f].decode("utf-8", "replace").strip() for f in fields) if t)
  return texts


def build_catalog_bpe(texts: list[str], out_dir, vocab_size: int = 8192) -> int:
  """A CLIP BPE vocabulary for a user's own catalog: learnt on the catalog's train `texts` plus
  the generic fashion corpus (so words outside the catalog still split into fashion sub-words).

  Why: the shipped vocabulary never saw a shop's brand and product names; it splits each into
  several byte pieces, which a small text tower trained from scratch must learn to compose.
  Learnt on the catalog, every word that occurs twice becomes ONE token, as in a word-level
  vocabulary, while any other text still tokenises (byte fallback) and the vocabulary stays a
  CLIP one (exports as a CLIPTokenizer). Load it with kind='clip', path=out_dir. Returns the
  vocab size.
  """
  if not texts:
    raise ValueError("build_catalog_bpe: no texts (is the catalog's train split empty?).")
  return build_clip_bpe(list(texts) + generic_fashion_corpus(), out_dir, vocab_size)


def build_assets(out_dir=ASSETS_DIR, clip_vocab_size: int = 8192, bert_vocab_size: int = 8192):
  """Builds both shipped vocabularies into out_dir/{clip_bpe,bert_wordpiece}."""
  texts = corpus()
  out_dir = pathlib.Path(out_dir)
  n_clip = build_clip_bpe(texts, out_dir / "clip_bpe", clip_vocab_size)
  n_bert = build_bert_wordpiece(texts, out_dir / "bert_wordpiece", bert_vocab_size)
  return dict(texts=len(texts), clip_vocab=n_clip, bert_vocab=n_bert)


# ------------------------------------------------------------------------------------------------
# The tokenizer the pipelines call.
# ------------------------------------------------------------------------------------------------


class Tokenizer:
  """Fixed-length batch tokenizer around a transformers fast tokenizer.

  __call__(texts) -> int32 [N, max_len]:
    clip: <|startoftext|> tokens... <|endoftext|> then <|endoftext|> padding (HF's pad for CLIP).
    bert: [CLS] tokens... [SEP] then [PAD] (id pad_token_id).
  clean: None, or an open_clip cleaning applied to every text first (module docstring).
  Over-long text keeps its first max_len - 2 tokens and still ends with EOS/[SEP] (HF's
  truncation, and what OpenAI's clip.tokenize(truncate=True) does).
  """

  def __init__(self, kind: str, hf, max_len: int, clean: str | None = None):
    if kind not in KINDS:
      raise ValueError(f"Unknown tokenizer kind {kind!r}; expected one of {KINDS}.")
    if max_len < 2:
      raise ValueError(f"max_len={max_len} leaves no room for the two special tokens.")
    if clean is not None and clean not in open_clip.CLEAN_KINDS:
      raise ValueError(f"Unknown text cleaning clean={clean!r}; expected None or one of "
                       f"{open_clip.CLEAN_KINDS}.")
    self.kind, self.hf, self.max_len, self.clean = kind, hf, int(max_len), clean
    self.vocab_size = len(hf)
    bert = kind == "bert"
    self.eos_token_id = hf.sep_token_id if bert else hf.eos_token_id
    # SigLIP has no BOS, and is padded with its EOS (how it was trained: the text tower pools
    # the LAST position, so every padded row must end in EOS whatever the tokenizer's own pad).
    self.pad_token_id = self.eos_token_id if kind == "siglip" else hf.pad_token_id
    self.bos_token_id = hf.cls_token_id if bert else hf.bos_token_id
    self.mask_token_id = hf.mask_token_id if bert else None
    self.special_ids = np.array(sorted(set(hf.all_special_ids)), np.int32)
    if (self.pad_token_id is None or self.eos_token_id is None
        or (self.bos_token_id is None and kind != "siglip")):
      raise ValueError(f"Tokenizer {hf.name_or_path!r} lacks a pad/bos/eos token.")
    # is_continuation[id]: WordPiece piece that continues the previous word (`##...`).
    tokens = hf.convert_ids_to_tokens(list(range(self.vocab_size)))
    self.is_continuation = np.array(
        [kind == "bert" and t is not None and t.startswith("##") for t in tokens], bool)
    self.is_special = np.zeros(self.vocab_size, bool)
    self.is_special[self.special_ids] = True

  def __call__(self, texts, *, with_mask: bool = False):
    """list of str (or utf-8 bytes) [N] -> ids int32 [N, max_len] (, mask bool [N, max_len])."""
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
    if self.clean is not None:
      texts = [open_clip.clean_text(self.clean, t) for t in texts]
    if not texts:
      ids = np.zeros((0, self.max_len), np.int32)
      return (ids, ids.astype(bool)) if with_mask else ids
    if self.kind == "siglip":  # Padded here with EOS (see __init__), not with hf's pad.
      rows = self.hf(texts, truncation=True, max_length=self.max_len,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]
      ids = np.full((len(rows), self.max_len), self.pad_token_id, np.int32)
      mask = np.zeros(ids.shape, bool)
      for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
      return (ids, mask) if with_mask else ids
    enc = self.hf(texts, padding="max_length", truncation=True, max_length=self.max_len,
                  return_attention_mask=with_mask, return_token_type_ids=False)
    ids = np.asarray(enc["input_ids"], np.int32)
    if with_mask:
      return ids, np.asarray(enc["attention_mask"], bool)
    return ids


def _load_hf(kind: str, path: str):
  import transformers  # pylint: disable=g-import-not-at-top
  if kind == "siglip" and not path:
    raise ValueError("data.tokenizer.kind='siglip' ships no vocabulary: set data.tokenizer.path "
                     "to the SigLIP checkpoint's directory (its spiece.model).")
  path = path or str(CLIP_DIR if kind == "clip" else BERT_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"Tokenizer path {path!r} is not a local directory (nothing is downloaded): give a "
        "directory holding vocab.json+merges.txt (clip), vocab.txt (bert) or spiece.model / "
        "tokenizer.json (siglip).")
  if kind == "siglip":  # SiglipTokenizer's spiece.model, else the directory's tokenizer.json.
    if os.path.isfile(os.path.join(path, "spiece.model")):
      return transformers.SiglipTokenizer.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
  cls = transformers.CLIPTokenizerFast if kind == "clip" else transformers.BertTokenizerFast
  return cls.from_pretrained(path)


def open_clip_cleaning(path: str) -> str | None:
  """The text cleaning of the open_clip checkpoint directory `path`, None if `path` is not one.

  open_clip's rule (open_clip.text_clean_of); ValueError names a bad tokenizer_kwargs.clean.
  """
  if not path or not open_clip.is_open_clip_dir(path):
    return None
  model_cfg, _ = open_clip.read_config(pathlib.Path(path))
  return open_clip.text_clean_of(model_cfg["text_cfg"],
                                 f"{pathlib.Path(path) / open_clip.CONFIG_FILE}: model_cfg")


@functools.lru_cache(maxsize=16)
def get_tokenizer(kind: str, path: str = "", max_len: int = 77) -> Tokenizer:
  """The `kind` ('clip' | 'bert' | 'siglip') tokenizer from `path` ('' = the shipped vocabulary;
  siglip has none). An open_clip checkpoint directory's cleaning is applied (open_clip_cleaning).
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown tokenizer kind {kind!r}; expected one of {KINDS}.")
  return Tokenizer(kind, _load_hf(kind, path), max_len, clean=open_clip_cleaning(path))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--build_assets", action="store_true", help="rebuild the shipped vocabs")
  parser.add_argument("--out_dir", default=str(ASSETS_DIR))
  parser.add_argument("--clip_vocab_size", type=int, default=8192)
  parser.add_argument("--bert_vocab_size", type=int, default=8192)
  parser.add_argument("--catalog_vocab", default="",
                      help="write a CLIP BPE learnt on --dataset's train texts to this folder")
  parser.add_argument("--dataset", default="", help="a built TFDS product dataset")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--fields", default="title,description")
  args = parser.parse_args(argv)
  if args.catalog_vocab:
    if not args.dataset:
      parser.error("--catalog_vocab needs --dataset (e.g. image_text_folder/myshop)")
    texts = dataset_texts(args.dataset, args.data_dir, "train", tuple(args.fields.split(",")))
    n = build_catalog_bpe(texts, args.catalog_vocab, args.clip_vocab_size)
    print(dict(texts=len(texts), clip_vocab=n, out_dir=args.catalog_vocab))
  elif args.build_assets:
    print(build_assets(args.out_dir, args.clip_vocab_size, args.bert_vocab_size))
  else:
    parser.error("nothing to do: pass --build_assets or --catalog_vocab")


if __name__ == "__main__":
  main()
