"""Masking for the masked-modelling objectives: whole-word MLM and BEiT-style patch blocks.

Pure numpy, every random draw from an explicit `np.random.Generator`, so the pipeline can key the
generator by (seed, step) and a resumed run masks exactly as the uninterrupted one did.

Whole-word MLM (BERT's whole-word masking, as FashionViL uses with 15%):
  a word = a token that does not start with `##` plus the `##` pieces that follow it. Each word
  is selected independently with probability `prob`, so E[masked tokens / maskable tokens] = prob
  exactly. (Google's create_pretraining_data instead fills a per-sequence budget round(prob * n)
  and skips words that overflow it, which masks slightly fewer than `prob` of the tokens of
  multi-piece words; we prefer the unbiased rate. A short row may get no target: losses must
  normalise by the number of targets in the whole batch, not per row.)
  Each selected token independently becomes [MASK] (80%), a random non-special token (10%) or
  stays (10%), as in BERT. Special tokens ([CLS], [SEP], [PAD], [MASK]) are never selected and
  never drawn as random replacements.
  labels = the original id at selected positions, IGNORE (-1) elsewhere.

Block masking of patches (BEiT's MaskingGenerator, which FashionViL's MPFC uses with 8 of 7x7):
  repeat: draw a target area uniformly in [min_block, min(max_block, remaining)], a log-uniform
  aspect ratio in `aspect`, h = round(sqrt(area * r)), w = round(sqrt(area / r)), a random
  position; accept the block if it covers at least min_block patches and adds between 1 and
  `remaining` new ones (10 attempts; BEiT also accepts rounded blocks below min_block).
  BEiT stops when no block fits and may then mask FEWER than `count` patches; we guarantee
  exactly `count`: once the remaining budget is below `min_block` (or no block fits) we grow the
  existing mask by random 4-neighbours of masked patches, so every connected masked region still
  holds at least min(min_block, count) patches.
"""

import math

import numpy as np

IGNORE = -1


def whole_word_mask(rng: np.random.Generator, ids: np.ndarray, *, is_special: np.ndarray,
                    is_continuation: np.ndarray, mask_id: int, prob: float = 0.15,
                    mask_frac: float = 0.8, random_frac: float = 0.1):
  """Whole-word MLM masking of a batch of token ids.

  Args:
    rng: numpy Generator (the only source of randomness).
    ids: int [N, L] token ids.
    is_special: bool [V], True for ids never masked (CLS, SEP, PAD, MASK, ...).
    is_continuation: bool [V], True for `##` pieces that continue the previous token's word.
    mask_id: id of [MASK].
    prob: probability that a word is selected.
    mask_frac, random_frac: of the selected tokens, the fraction replaced by [MASK] and by a
      random non-special token; the rest keep their id.

  Returns:
    masked_ids int32 [N, L], labels int32 [N, L] (original id where selected, IGNORE elsewhere).
  """
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f"ids must be [N, L], got shape {ids.shape}.")
  if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
    raise ValueError(f"Bad masking rates prob={prob}, mask_frac={mask_frac}, "
                     f"random_frac={random_frac}.")
  vocab_size = is_special.shape[0]
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"Token ids outside [0, {vocab_size}): min {ids.min()}, max {ids.max()}.")
  n, length = ids.shape
  special = is_special[ids]
  # A word starts at every non-special token that is not a continuation, and after a special.
  prev_special = np.concatenate([np.ones((n, 1), bool), special[:, :-1]], axis=1)
  starts = ~special & (~is_continuation[ids] | prev_special)
  # Position of the start of each token's word: running max of start positions.
  start_pos = np.maximum.accumulate(np.where(starts, np.arange(length)[None], 0), axis=1)
  word_draw = rng.random((n, length))
  selected = ~special & (np.take_along_axis(word_draw, start_pos, axis=1) < prob)

  action = rng.random((n, length))
  candidates = np.flatnonzero(~is_special)
  random_ids = candidates[rng.integers(0, len(candidates), size=(n, length))]
  masked = np.where(selected & (action < mask_frac), mask_id, ids)
  masked = np.where(selected & (action >= mask_frac) & (action < mask_frac + random_frac),
                    random_ids, masked)
  labels = np.where(selected, ids, IGNORE)
  return masked.astype(np.int32), labels.astype(np.int32)


def block_mask(rng: np.random.Generator, grid: int, count: int, *, min_block: int = 4,
               max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               attempts: int = 10) -> np.ndarray:
  """BEiT block mask of exactly `count` patches of a grid x grid image: bool [grid, grid]."""
  if grid < 1 or not 0 <= count <= grid * grid:
    raise ValueError(f"Cannot mask count={count} patches of a {grid}x{grid} grid.")
  if min_block < 1 or (max_block is not None and max_block < min_block):
    raise ValueError(f"Bad block sizes min_block={min_block}, max_block={max_block}.")
  if not 0 < aspect[0] <= aspect[1]:
    raise ValueError(f"Bad aspect range {aspect}.")
  max_block = count if max_block is None else max_block
  min_block = min(min_block, count)
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  mask = np.zeros((grid, grid), bool)
  done = 0
  while count - done >= min_block and count > 0:
    remaining = count - done
    hi = min(max_block, remaining)
    added = 0
    for _ in range(attempts):
      area = rng.uniform(min_block, hi)
      ratio = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(area * ratio)))
      w = int(round(math.sqrt(area / ratio)))
      if not (0 < h <= grid and 0 < w <= grid) or h * w < min_block:
        continue
      top = int(rng.integers(0, grid - h + 1))
      left = int(rng.integers(0, grid - w + 1))
      new = h * w - int(mask[top:top + h, left:left + w].sum())
      if 0 < new <= remaining:
        mask[top:top + h, left:left + w] = True
        added = new
        break
    if not added:
      break
    done += added
  # Top up to exactly `count` with random 4-neighbours of the mask (random cells if empty).
  while done < count:
    grown = np.zeros_like(mask)
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    frontier = np.flatnonzero(grown & ~mask)
    if not len(frontier):
      frontier = np.flatnonzero(~mask)
    mask.flat[frontier[rng.integers(len(frontier))]] = True
    done += 1
  return mask


def block_masks(rng: np.random.Generator, batch: int, grid: int, count: int, **kwargs
                ) -> np.ndarray:
  """`batch` independent block masks, flattened row-major: bool [batch, grid * grid]."""
  out = np.zeros((batch, grid * grid), bool)
  for i in range(batch):
    out[i] = block_mask(rng, grid, count, **kwargs).reshape(-1)
  return out
