"""Whole-word MLM masking and BEiT block masking against their specifications."""

import numpy as np
import pytest
from scipy import ndimage

from fashion_jax.data import masking
from fashion_jax.data import tokenizers


@pytest.fixture(scope="module")
def bert():
  return tokenizers.get_tokenizer("bert", "", 32)


def _batch(bert, n=64):
  words = ["red", "striped", "yarrowby", "zephyrine", "clutch", "unfathomable", "polka-dot",
           "cotton", "wool-blend", "quvelix", "shirt", "with", "a", "contrast", "trim"]
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n)]
  return bert(texts)


def _mask(bert, ids, rng, prob=0.15):
  return masking.whole_word_mask(rng, ids, is_special=bert.is_special,
                                 is_continuation=bert.is_continuation,
                                 mask_id=bert.mask_token_id, prob=prob)


def test_whole_word_rates_match_80_10_10(bert):
  ids = _batch(bert)
  maskable = ~bert.is_special[ids]
  rng = np.random.default_rng(1)
  selected = masked = kept = randomised = total = 0
  for _ in range(300):
    out, labels = _mask(bert, ids, rng)
    sel = labels != masking.IGNORE
    selected += sel.sum()
    total += maskable.sum()
    masked += (sel & (out == bert.mask_token_id)).sum()
    kept += (sel & (out == ids)).sum()
    randomised += (sel & (out != ids) & (out != bert.mask_token_id)).sum()
    np.testing.assert_array_equal(out[~sel], ids[~sel])  # Unselected tokens never change.
    np.testing.assert_array_equal(labels[sel], ids[sel])
  assert abs(selected / total - 0.15) < 0.01
  assert abs(masked / selected - 0.8) < 0.015
  # Random replacements that happen to draw the original id count as kept (p ~ 1/3500).
  assert abs(kept / selected - 0.1) < 0.01
  assert abs(randomised / selected - 0.1) < 0.01


def test_whole_words_masked_together_and_specials_never(bert):
  ids = _batch(bert)
  assert bert.is_continuation[ids].any(), "fixture must contain multi-piece words"
  rng = np.random.default_rng(2)
  for _ in range(50):
    out, labels = _mask(bert, ids, rng, prob=0.4)
    sel = labels != masking.IGNORE
    assert not (sel & bert.is_special[ids]).any()
    # Random replacements are never special tokens.
    replaced = sel & (out != ids) & (out != bert.mask_token_id)
    assert not bert.is_special[out[replaced]].any()
    # A `##` piece is selected iff the token before it (same word) is.
    cont = bert.is_continuation[ids[:, 1:]] & ~bert.is_special[ids[:, :-1]]
    np.testing.assert_array_equal(sel[:, 1:][cont], sel[:, :-1][cont])


def test_whole_word_mask_is_deterministic_and_validates(bert):
  ids = _batch(bert, 8)
  a = _mask(bert, ids, np.random.default_rng(5))
  b = _mask(bert, ids, np.random.default_rng(5))
  c = _mask(bert, ids, np.random.default_rng(6))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[1], c[1])
  with pytest.raises(ValueError, match="outside"):
    _mask(bert, ids + bert.vocab_size, np.random.default_rng(0))
  with pytest.raises(ValueError, match="prob=1.5"):
    _mask(bert, ids, np.random.default_rng(0), prob=1.5)


@pytest.mark.parametrize("grid,count,min_block", [(7, 8, 4), (14, 75, 16), (8, 5, 1), (7, 3, 4),
                                                  (4, 16, 4)])
def test_block_mask_exact_count_and_contiguous_blocks(grid, count, min_block):
  rng = np.random.default_rng(grid * 100 + count)
  components = []
  for _ in range(200):
    mask = masking.block_mask(rng, grid, count, min_block=min_block)
    assert mask.shape == (grid, grid) and mask.sum() == count
    labels, num = ndimage.label(mask)  # 4-connectivity.
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.min() >= min(min_block, count)
    components.append(num)
  if 2 * min_block <= count <= grid * grid // 4:  # Room for separate blocks.
    assert max(components) > 1


def test_single_block_is_a_full_rectangle():
  # count = min_block = max_block = 4: one block, a solid 2x2, 1x4 or 4x1 rectangle (with
  # enough attempts that the neighbour-growing fallback is practically never needed).
  rng = np.random.default_rng(0)
  shapes = set()
  for _ in range(300):
    mask = masking.block_mask(rng, 7, 4, min_block=4, max_block=4, attempts=100)
    rows, cols = np.nonzero(mask)
    h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert h * w == 4, mask.astype(int)
    shapes.add((h, w))
  assert shapes == {(2, 2), (1, 4), (4, 1)}


def test_block_masks_batch_and_errors():
  rng = np.random.default_rng(0)
  masks = masking.block_masks(rng, 16, 7, 8)
  assert masks.shape == (16, 49) and masks.dtype == bool
  np.testing.assert_array_equal(masks.sum(1), 8)
  assert len({m.tobytes() for m in masks}) > 8
  again = masking.block_masks(np.random.default_rng(0), 16, 7, 8)
  np.testing.assert_array_equal(masks, again)
  with pytest.raises(ValueError, match="count=50"):
    masking.block_mask(rng, 7, 50)
  with pytest.raises(ValueError, match="max_block=2"):
    masking.block_mask(rng, 7, 8, min_block=4, max_block=2)
