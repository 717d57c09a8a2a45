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

Block masking of patches (BEiT's MaskingGenerator, which FashionViL's MPFC uses with 8 of 7x7,
and FashionBERT's "5 random patches" as count=5, min_block=max_block=1):
  repeat: draw a target area uniformly in [min_block, min(max_block, remaining)], a log-uniform
  aspect ratio in `aspect`, h = round(sqrt(area * r)), w = round(sqrt(area / r)), a random
  position; accept the block if min_block <= h * w <= max_block (when max_block is given) and
  it adds between 1 and `remaining` new patches (10 attempts; BEiT also accepts rounded blocks
  below min_block). The area check is ours: BEiT bounds only the NEW patches of a block by
  max_block, so the rounding (a target area of 1 at aspect 3 gives a 2x1 block) and overlaps
  let blocks grow past max_block; with max_block=1 that clumped FashionBERT's 5 patches (two
  4-adjacent in ~89% of 8x8 masks against ~45% for 5 uniform patches). A max_block that no
  h x w within the grid and the aspect range can meet (e.g. min_block=max_block=5: only 1x5)
  is an error. With max_block=None and min_block > 1 (FashionViL's settings) the rule, and
  every mask drawn from a given seed, is unchanged.
  BEiT stops when no block fits and may then mask FEWER than `count` patches; we guarantee
  exactly `count` with a fallback that adds one patch at a time: a uniformly random unmasked
  patch when min(min_block, count) == 1 (a one-patch block, within any max_block; so
  min_block=max_block=1 masks a uniformly random `count`-subset), else a random 4-neighbour of
  the mask, so every connected masked region still holds at least min(min_block, count)
  patches. The fallback runs once the remaining budget is below min_block or no block fitted in
  `attempts` tries; only then can a region outgrow max_block (blocks that touch or overlap
  also merge into larger regions, as in BEiT). `draw_blocks` returns the blocks placed and the
  number of fallback patches with the mask.
"""

import functools
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


@functools.lru_cache(maxsize=64)
def _some_block_fits(grid: int, lo: int, hi: int, aspect: tuple[float, float]) -> bool:
  """Whether some h x w (h, w <= grid) has lo <= h * w <= hi and h / w within `aspect`."""
  return any(lo <= h * w <= hi and aspect[0] <= h / w <= aspect[1]
             for h in range(1, grid + 1) for w in range(1, grid + 1))


def block_mask(rng: np.random.Generator, grid: int, count: int, *, min_block: int = 4,
               max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               attempts: int = 10) -> np.ndarray:
  """BEiT block mask of exactly `count` patches of a grid x grid image: bool [grid, grid].

  Every block placed is an h x w rectangle with min_block <= h * w <= max_block (max_block None
  = no bound beyond `count`); see the module docstring for the draw and the fallback.
  Deterministic given the state of `rng`.

  Raises:
    ValueError for a count outside [0, grid^2], min_block < 1, max_block < min_block, a bad
    aspect range, or (max_block given) no h x w with area in [min_block, max_block] within the
    grid and the aspect range.
  """
  return draw_blocks(rng, grid, count, min_block=min_block, max_block=max_block, aspect=aspect,
                     attempts=attempts)[0]


def draw_blocks(rng: np.random.Generator, grid: int, count: int, *, min_block: int = 4,
                max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                attempts: int = 10) -> tuple[np.ndarray, list[tuple[int, int, int, int]], int]:
  """`block_mask` with its parts: (mask bool [grid, grid], the blocks placed as
  (top, left, h, w), the number of patches the fallback added). Same draws as block_mask."""
  if grid < 1 or not 0 <= count <= grid * grid:
    raise ValueError(f"Cannot mask count={count} patches of a {grid}x{grid} grid.")
  if min_block < 1 or (max_block is not None and max_block < min_block):
    raise ValueError(f"Bad block sizes min_block={min_block}, max_block={max_block}.")
  if not 0 < aspect[0] <= aspect[1]:
    raise ValueError(f"Bad aspect range {aspect}.")
  area_cap = max_block  # None: BEiT's rule, no bound on a block's area.
  if area_cap is not None and count and not _some_block_fits(
      grid, min(min_block, count), area_cap, tuple(aspect)):
    raise ValueError(f"No h x w block of a {grid}x{grid} grid has an area in [min_block="
                     f"{min_block}, max_block={max_block}] and an aspect ratio h/w in "
                     f"{tuple(round(a, 3) for a in aspect)}: widen max_block or the aspect range.")
  max_block = count if max_block is None else max_block
  min_block = min(min_block, count)
  log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
  mask = np.zeros((grid, grid), bool)
  blocks = []
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
      if area_cap is not None and h * w > area_cap:
        continue
      top = int(rng.integers(0, grid - h + 1))
      left = int(rng.integers(0, grid - w + 1))
      new = h * w - int(mask[top:top + h, left:left + w].sum())
      if 0 < new <= remaining:
        mask[top:top + h, left:left + w] = True
        blocks.append((top, left, h, w))
        added = new
        break
    if not added:
      break
    done += added
  # Top up to exactly `count`: random single patches when one-patch blocks are legal, else
  # random 4-neighbours of the mask (random cells if it is empty).
  topped_up = count - done
  while done < count:
    if min_block == 1:
      frontier = np.flatnonzero(~mask)
    else:
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
  return mask, blocks, topped_up


def block_masks(rng: np.random.Generator, batch: int, grid: int, count: int, **kwargs
                ) -> np.ndarray:
  """`batch` independent block masks, flattened row-major: bool [batch, grid * grid]."""
  out = np.zeros((batch, grid * grid), bool)
  for i in range(batch):
    out[i] = block_mask(rng, grid, count, **kwargs).reshape(-1)
  return out
