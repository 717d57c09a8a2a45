"""FashionViL's six pretext objectives and its task sampling, as pure functions.

Every function here takes model outputs (no parameters) and returns a scalar loss and a dict of
scalar metrics, computed over the GLOBAL batch: under jit with a batch sharded over the mesh's
batch axes, every reduction and every cross-row gather below (the [B, B] similarity matrices,
the hardest-negative pick, the gather of the negative text) is a global computation, so the
result equals the single-device one (tests/test_fashionvil_losses.py runs both on 8 devices).

Notation: B batch, L text length, N image tokens, D width, V vocabulary, C VQ codes, A pseudo-
attributes. CE(z, y) = -log softmax(z)_y. Every loss is computed in float32.

  ITC   v, w [B, D] unimodal image/text vectors, s a learnable scalar (FashionViL's
        NormalizationLayer, init 4): S = s^2 v^ w^T (x^ = x / |x|),
        L = 1/2 [ mean_i CE(S_i., i) + mean_j CE(S_.j, j) ].
  MVC   the same InfoNCE between the unimodal vector of view A and the fused vector of view B +
        text (its own scale): L = 1/2 [ InfoNCE(v_A, f_B) + InfoNCE(f_B, v_A) ].
  MLM   z [B, L, V] fusion logits at text positions, y [B, L] original ids at masked positions
        and -1 elsewhere: L = sum_{y_ij >= 0} CE(z_ij, y_ij) / #{y_ij >= 0}. Normalised by the
        number of targets in the whole batch (a row may have none); 0 when there is no target.
  MPFC  z [B, N, C] fusion logits at image positions, c [B, N] VQ codes of the unmasked image,
        m [B, N] block mask: L = sum_{m_ij} CE(z_ij, c_ij) / #{m_ij}.
  ITM   S the ITC similarity (no gradient), per image i the hardest negative text
        n_i = argmax_{j != i, t_j != t_i} S_ij (diagonal and texts identical to t_i excluded);
        with probability 1/2 text i is replaced by text n_i (label 0, else label 1);
        L = mean_i CE(itm_logits_i, label_i) on the fusion of (image i, chosen text).
  PAC   a [B, A] multi-hot pseudo-attributes, q = a / sum(a) (uniform soft labels), z = cos(x, W)
        (unscaled cosine classifier, shared by image and text vectors):
        L = sum_{x in {v, w}} sum_{i: |a_i| > 0} -sum_k q_ik log softmax(z_i)_k / #{i: |a_i| > 0}.
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from fashion_jax.losses import contrastive

TASKS = ("itc", "mlm", "mpfc", "itm", "mvc", "pac")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) along the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def scaled_cosine_logits(a: jax.Array, b: jax.Array, s: jax.Array) -> jax.Array:
  """[B, D], [B', D], scalar s -> s^2 cos(a_i, b_j) [B, B'] (both sides normalised, then * s)."""
  return (s * l2_normalize(a)) @ (s * l2_normalize(b)).T


def itc_loss(image: jax.Array, text: jax.Array, s: jax.Array) -> tuple[jax.Array, dict]:
  """ITC (and MVC): symmetric InfoNCE with logits s^2 cos (see the module docstring).

  Args:
    image: [B, D] image vectors (not normalised).
    text: [B, D] text (or fused) vectors.
    s: scalar learnable scale; logits are s^2 cos.
  Returns:
    loss, {'i2t_acc', 't2i_acc'} (in-batch top-1).
  """
  s = jnp.asarray(s, jnp.float32)
  loss, m = contrastive.info_nce(s * l2_normalize(image), s * l2_normalize(text), 1.0)
  return loss, {"i2t_acc": m["a2b_acc"], "t2i_acc": m["b2a_acc"]}


def masked_ce(logits: jax.Array, targets: jax.Array, where: jax.Array
              ) -> tuple[jax.Array, dict]:
  """sum_{where} CE(logits, targets) / #where over the whole batch (0 when #where = 0).

  Args:
    logits: [..., K] float.
    targets: [...] int (any value where `where` is False).
    where: [...] bool, the positions that carry a target.
  Returns:
    loss, {'acc': top-1 accuracy over the targets, 'num_targets': #where}.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(where, targets, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  w = where.astype(jnp.float32)
  n = jnp.sum(w)
  denom = jnp.maximum(n, 1.0)
  loss = jnp.sum(nll * w) / denom
  acc = jnp.sum((jnp.argmax(logp, axis=-1) == safe) * w) / denom
  return loss, {"acc": acc, "num_targets": n}


def mlm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """MLM: logits [B, L, V] at the text positions, labels [B, L] (-1 = no target)."""
  return masked_ce(logits, labels, labels >= 0)


def mpfc_loss(logits: jax.Array, codes: jax.Array, patch_mask: jax.Array
              ) -> tuple[jax.Array, dict]:
  """MPFC: logits [B, N, C] at image positions, codes [B, N] VQ targets, patch_mask [B, N]."""
  if logits.shape[:2] != codes.shape or codes.shape != patch_mask.shape:
    raise ValueError(f"MPFC shapes disagree: logits {logits.shape}, codes {codes.shape}, "
                     f"patch_mask {patch_mask.shape}.")
  return masked_ce(logits, codes, patch_mask.astype(bool))


def hardest_negatives(sim: jax.Array, text: jax.Array | None = None) -> jax.Array:
  """Per row i, argmax_j sim[i, j] over j != i (and, with `text`, texts unequal to text i).

  Args:
    sim: [B, B] image-text similarities (row = image, column = text).
    text: optional int [B, L] token ids; a column whose ids equal row i's text is not a
      negative of row i (two products with the same description are not a mismatch). The
      reference (MMF FashionViL) only excludes the diagonal; with a catalog where texts repeat,
      its "negative" can be the positive's own text under a label of 0.
  Returns:
    int32 [B] column index of each row's hardest negative. A row whose every other column is
    excluded gets its own index (its pair then stays positive, see itm_pairs).
  """
  b = sim.shape[0]
  exclude = jnp.eye(b, dtype=bool)
  if text is not None:
    exclude |= jnp.all(text[:, None, :] == text[None, :, :], axis=-1)
  masked = jnp.where(exclude, -jnp.inf, sim.astype(jnp.float32))
  neg = jnp.argmax(masked, axis=1).astype(jnp.int32)
  has_negative = jnp.any(~exclude, axis=1)
  return jnp.where(has_negative, neg, jnp.arange(b, dtype=jnp.int32))


def itm_pairs(sim: jax.Array, uniform: jax.Array, text: jax.Array | None = None,
              neg_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Which text each image is fused with for ITM, and the label.

  Args:
    sim: [B, B] ITC similarities (gradients are stopped here).
    uniform: [B] U(0, 1) draws; row i takes its hardest negative when uniform_i < neg_prob.
    text: optional [B, L] ids (see hardest_negatives).
    neg_prob: probability of swapping in the negative (0.5 in FashionViL).
  Returns:
    text_index int32 [B] (i or n_i), label int32 [B] (1 = matched pair, 0 = swapped).
  """
  neg = hardest_negatives(jax.lax.stop_gradient(sim), text)
  idx = jnp.arange(sim.shape[0], dtype=jnp.int32)
  swap = (uniform < neg_prob) & (neg != idx)
  return jnp.where(swap, neg, idx), jnp.where(swap, 0, 1).astype(jnp.int32)


def itm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """ITM: mean_i CE(logits_i [2], label_i); also the share of positives in the batch."""
  loss, m = masked_ce(logits, labels, jnp.ones(labels.shape, bool))
  return loss, {"acc": m["acc"], "pos_frac": jnp.mean(labels.astype(jnp.float32))}


def cosine_logits(x: jax.Array, weight: jax.Array) -> jax.Array:
  """PAC's classifier: cos(x_i, w_k) = x^_i . w^_k, x [B, D], weight [D, A] -> [B, A]."""
  return l2_normalize(x) @ l2_normalize(weight.T).T


def soft_label_ce(logits: jax.Array, attributes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """-sum_k q_k log softmax(z)_k with q = a / sum(a), averaged over rows with an attribute.

  Returns (loss, number of rows with at least one attribute).
  """
  a = attributes.astype(jnp.float32)
  count = jnp.sum(a, axis=-1)
  has = count > 0
  q = a / jnp.maximum(count, 1.0)[:, None]
  nll = -jnp.sum(q * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
  n = jnp.sum(has.astype(jnp.float32))
  return jnp.sum(jnp.where(has, nll, 0.0)) / jnp.maximum(n, 1.0), n


def pac_loss(image_logits: jax.Array, text_logits: jax.Array, attributes: jax.Array
             ) -> tuple[jax.Array, dict]:
  """PAC: soft-label CE of the image and the text cosine logits [B, A], summed (paper's formula).

  attributes: [B, A] multi-hot (bool or 0/1). Rows without any attribute add nothing.
  """
  li, n = soft_label_ce(image_logits, attributes)
  lt, _ = soft_label_ce(text_logits, attributes)
  return li + lt, {"image_loss": li, "text_loss": lt, "rows_with_attributes": n}


# ------------------------------------------------------------------------------------------------
# Task sampling.
# ------------------------------------------------------------------------------------------------


def task_probabilities(tasks: Mapping[str, float]) -> tuple[tuple[str, ...], jax.Array]:
  """Config {task: weight} -> (names in TASKS order with weight > 0, normalised probabilities).

  Raises ValueError naming an unknown task or a negative / all-zero weight.
  """
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ValueError(f"Unknown FashionViL task(s) {unknown}; known: {list(TASKS)}.")
  bad = {k: v for k, v in tasks.items() if not float(v) >= 0}
  if bad:
    raise ValueError(f"Task weights must be >= 0, got {bad}.")
  names = tuple(t for t in TASKS if float(tasks.get(t, 0.0)) > 0)
  if not names:
    raise ValueError(f"All task weights are zero: {dict(tasks)}.")
  w = jnp.asarray([float(tasks[t]) for t in names], jnp.float32)
  return names, w / jnp.sum(w)


def sample_task(rng: jax.Array, probs: jax.Array) -> jax.Array:
  """One task index ~ Categorical(probs) from `rng`.

  The trainer's per-step key is fold_in(seed key, step), identical on every host and device,
  so every host draws the same task: no communication is needed to agree on it.
  """
  return jax.random.categorical(rng, jnp.log(probs)).astype(jnp.int32)


def sampled_task_loss(index: jax.Array, branches: Sequence[Callable[[], tuple[jax.Array, dict]]]
                      ) -> tuple[jax.Array, dict]:
  """Runs only branch `index` (lax.switch): every branch is compiled, one executes per step.

  Each branch returns (loss, metrics) with the SAME metric keys (tasks that did not run report
  zeros), so the switch has one output structure and jit compiles one program for all tasks.
  """
  return jax.lax.switch(index, list(branches))


def drop_tokens(rng: jax.Array, droppable: jax.Array, frac: float) -> jax.Array:
  """MVC's attention dropping: per row, exactly floor(frac * #droppable) droppable positions.

  Args:
    rng: key; the draw is a function of the key and the GLOBAL shape only (threefry is
      partitionable), so every mesh drops the same positions.
    droppable: [B, L] bool, positions that may be dropped.
    frac: fraction to drop (0.25 in FashionViL).
  Returns:
    keep [B, L] bool: False on the dropped positions, True elsewhere (non-droppable included).
  """
  if not 0.0 <= frac < 1.0:
    raise ValueError(f"Drop fraction {frac} must be in [0, 1).")
  noise = jnp.where(droppable, jax.random.uniform(rng, droppable.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  k = jnp.floor(frac * jnp.sum(droppable, axis=1)).astype(rank.dtype)
  return ~(rank < k[:, None])
