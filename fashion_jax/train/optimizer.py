"""The optimizer, assembled from `config.optimizer`.

    optimizer = {
      name: 'adamw',
      lr: 5e-5,                  # peak learning rate
      b1: 0.9, b2: 0.999, eps: 1e-8,
      weight_decay: 0.1,         # decoupled, multiplied by the (group) learning rate, like
                                 # torch.optim.AdamW and optax.adamw
      clip_norm: 1.0,            # global-norm clipping over the trainable params; None/0 = off
      schedule: {kind: 'cosine' | 'step' | 'constant', warmup_steps: 100,
                 decay_steps: None,    # cosine: length of the cosine phase (None = to the end)
                 end_lr_factor: 0.0,   # cosine: final lr = lr * end_lr_factor
                 boundaries: (), factor: 0.1},   # step: lr *= factor at each boundary step
      lr_mults: [(regex, mult), ...],  # first matching regex sets the param's lr multiplier
      freeze: [regex, ...],            # matching params never change and carry no Adam state
      wd_exclude: [regex, ...],        # matching params get no weight decay
      param_bounds: [(regex, lo, hi), ...],  # matching params are projected into [lo, hi]
    }

Regexes are matched with `re.fullmatch` against the '/'-joined parameter path, e.g.
`img/encoder/block_3/attn/query/kernel` (paths as in `fashion_jax.parallel.sharding.path_str`;
the top-level 'params' collection name is included when the system's params carry it). A
`freeze` or `lr_mults` regex that matches no parameter is an error (a typo would otherwise
silently train everything). `wd_exclude` defaults to DEFAULT_WD_EXCLUDE, which spares biases,
every `*scale` (LayerNorm/RMSNorm scales and CLIP's logit_scale) and anything inside a module
whose name contains 'norm' or 'ln'.

Bounds (`param_bounds`, default DEFAULT_PARAM_BOUNDS): after every update, each trainable param
whose path fully matches a regex (the first that matches) is projected into [lo, hi] (None =
unbounded on that side), leaf by leaf: the update becomes clip(p + u, lo, hi) - p where p + u
leaves the box and stays u elsewhere, so in-range steps are bit-identical to the unbounded
optimizer. The default is open_clip's `logit_scale.clamp_(0, log(100))` after optimizer.step:
CLIP's `logit_scale` (FashionCLIP, E2; it stores the LOG of the scale) stays in [0, log 100],
while the models use exp(logit_scale) unclamped, as open_clip and transformers do. (Clamping
the forward value instead, min(exp(s), 100), has zero gradient once s > log 100, so s can
never come back down; a projection keeps the gradient.) A bounds regex that matches no
parameter is allowed, like wd_exclude's (FashionViL and FashionBERT have no logit_scale; their
ITC scales s enter as s^2 with no clamp). Frozen params are never projected. Exactness: p + (b
- p) == b in float32 whenever p lies within a factor of 2 of the bound b it crossed (Sterbenz),
which covers every step from an in-range param; a param loaded more than 2x outside (e.g. s =
1000) lands within p's float32 rounding (|p| 2^-24) of the bound, and exactly on it (or inside)
after the next step. The projection
wraps the whole chain, so the optimizer state has the same structure as without it.

Schedules (t = optimizer step, counted from 0; W = warmup_steps; lr = peak):
  warmup (all kinds):  lr * t / W                           for t < W
  constant:            lr
  cosine:              lr * (e + (1 - e) * (1 + cos(pi * min(t - W, D) / D)) / 2),
                       D = decay_steps or total_steps - W, e = end_lr_factor
  step:                lr * factor ** #{b in boundaries : t >= b}   (boundaries in absolute steps)

Assembly, in order:
  1. freeze: zero the gradients of frozen params (so they add nothing to the global norm);
  2. clip_by_global_norm(clip_norm) over the remaining gradients;
  3. optax.multi_transform over the param groups: 'frozen' -> set_to_zero (no state), and one
     AdamW per distinct lr multiplier m with learning rate m * schedule(t);
  4. the projection of the bounded params (stateless, around the chain).
"""

from collections.abc import Mapping, Sequence
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fashion_jax.parallel.sharding import path_str

DEFAULT_WD_EXCLUDE = (r".*bias", r".*scale", r".*(norm|Norm|ln)[^/]*/.*")

# open_clip's clamp of CLIP's logit scale (stored as its log) after every optimizer step.
DEFAULT_PARAM_BOUNDS = ((r"(.*/)?logit_scale", 0.0, math.log(100.0)),)

FROZEN = "frozen"


def make_schedule(schedule: Mapping[str, Any], lr: float, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule (see the module docstring for the formulas)."""
  kind = schedule.get("kind", "cosine")
  warmup = int(schedule.get("warmup_steps", 0) or 0)
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f"optimizer.schedule.warmup_steps={warmup} must lie in [0, total_steps="
                     f"{total_steps}].")
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = schedule.get("decay_steps")
    if decay is None:
      decay = max(total_steps - warmup, 1)
    elif decay <= 0:
      raise ValueError(f"optimizer.schedule.decay_steps={decay} must be positive.")
    end = float(schedule.get("end_lr_factor", 0.0))
    main = optax.cosine_decay_schedule(lr, decay_steps=int(decay), alpha=end)
  elif kind == "step":
    boundaries = [int(b) for b in schedule.get("boundaries", ())]
    if sorted(boundaries) != boundaries or any(b < warmup for b in boundaries):
      raise ValueError(f"optimizer.schedule.boundaries={boundaries} must be increasing and not "
                       f"before warmup_steps={warmup}.")
    factor = float(schedule.get("factor", 0.1))
    main = optax.piecewise_constant_schedule(
        lr, {b - warmup: factor for b in boundaries})
  else:
    raise ValueError(f"optimizer.schedule.kind={kind!r} is not one of 'cosine', 'step', "
                     f"'constant'.")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def _compile(patterns: Sequence[str], what: str) -> list[re.Pattern]:
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"optimizer.{what}: bad regex {p!r}: {e}") from e
  return out


def param_groups(params: Any, optimizer_config: Mapping[str, Any]) -> tuple[Any, dict[str, float]]:
  """Labels every param with its group: 'frozen' or 'lr_x<mult>'.

  Args:
    params: a pytree of arrays or ShapeDtypeStructs (unboxed).
    optimizer_config: with `freeze` and `lr_mults`.

  Returns:
    (labels pytree of str with the structure of params, {label: lr multiplier}).

  Raises:
    ValueError naming a `freeze`/`lr_mults` regex that matches no parameter.
  """
  freeze = _compile(optimizer_config.get("freeze", ()) or (), "freeze")
  mults = []
  for entry in optimizer_config.get("lr_mults", ()) or ():
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f"optimizer.lr_mults entry {entry!r} is not a (regex, multiplier) pair.")
    mults.append((_compile([entry[0]], "lr_mults")[0], float(entry[1])))
  used = set()
  groups = {}

  def label(path, _):
    name = path_str(path)
    for r in freeze:
      if r.fullmatch(name):
        used.add(("freeze", r.pattern))
        return FROZEN
    mult = 1.0
    for r, m in mults:
      if r.fullmatch(name):
        used.add(("lr_mults", r.pattern))
        mult = m
        break
    if mult == 0.0:
      return FROZEN
    key = f"lr_x{mult:g}"
    groups[key] = mult
    return key

  labels = jax.tree_util.tree_map_with_path(label, params)
  for what, regexes in (("freeze", freeze), ("lr_mults", [r for r, _ in mults])):
    for r in regexes:
      if (what, r.pattern) not in used:
        names = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ValueError(f"optimizer.{what} regex {r.pattern!r} matches no parameter (full "
                         f"match against paths such as {names[:4]}).")
  return labels, groups


def weight_decay_mask(params: Any, wd_exclude: Sequence[str] | None) -> Any:
  """Pytree of bools: True where weight decay applies (path matches no wd_exclude regex).

  `params` may contain optax MaskedNode subtrees (inside multi_transform); they are kept.
  """
  regexes = _compile(DEFAULT_WD_EXCLUDE if wd_exclude is None else wd_exclude, "wd_exclude")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(r.fullmatch(path_str(path)) for r in regexes), params)


def param_bounds(params: Any, bounds: Sequence[Any] | None, labels: Any = None
                 ) -> dict[str, tuple[float | None, float | None]]:
  """{param path: (lo, hi)} for every param that a `param_bounds` entry bounds.

  Args:
    params: a pytree of arrays or ShapeDtypeStructs (only paths are used).
    bounds: [(regex, lo, hi), ...] (None = DEFAULT_PARAM_BOUNDS); the first regex that fully
      matches a path wins; lo / hi None = unbounded on that side.
    labels: the param_groups labels; params labelled 'frozen' are left out.

  Raises:
    ValueError naming a malformed entry or one with lo > hi.
  """
  entries = []
  for entry in DEFAULT_PARAM_BOUNDS if bounds is None else bounds:
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
      raise ValueError(f"optimizer.param_bounds entry {entry!r} is not a (regex, lo, hi) "
                       f"triple.")
    regex = _compile([entry[0]], "param_bounds")[0]
    lo, hi = (None if v is None else float(v) for v in entry[1:])
    if lo is not None and hi is not None and lo > hi:
      raise ValueError(f"optimizer.param_bounds entry {entry[0]!r}: lo={lo} > hi={hi}.")
    entries.append((regex, lo, hi))
  label_of = {}
  if labels is not None:
    label_of = {path_str(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    name = path_str(path)
    if label_of.get(name) == FROZEN:
      continue
    for regex, lo, hi in entries:
      if regex.fullmatch(name):
        if lo is not None or hi is not None:
          out[name] = (lo, hi)
        break
  return out


def project_into_bounds(inner: optax.GradientTransformation,
                        bounds: Mapping[str, tuple[float | None, float | None]]
                        ) -> optax.GradientTransformation:
  """`inner`, then updates that keep each bounded param inside its [lo, hi] (module docstring).

  Same init and state as `inner`; update() needs `params`.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("optimizer.param_bounds: the update needs the params (tx.update(grads, "
                       "state, params)).")
    updates, state = inner.update(updates, state, params)

    def one(path, u, p):
      name = path_str(path)
      if name not in bounds:
        return u
      lo, hi = bounds[name]
      new = p + u
      clipped = jnp.clip(new, lo, hi)
      return jnp.where(clipped == new, u, (clipped - p).astype(u.dtype))

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformation(inner.init, update_fn)


def make_optimizer(optimizer_config: Mapping[str, Any], params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup/decay schedule, global-norm clipping, lr multipliers, freezing, bounds.

  Args:
    optimizer_config: `config.optimizer` (module docstring).
    params: unboxed params or their ShapeDtypeStructs (only paths are used).
    total_steps: total training steps (for the cosine schedule).

  Returns:
    (the optax transformation, the base lr schedule (multiplier 1) for logging).
  """
  name = optimizer_config.get("name", "adamw")
  if name != "adamw":
    raise ValueError(f"optimizer.name={name!r}: only 'adamw' is implemented.")
  lr = float(optimizer_config["lr"])
  schedule = make_schedule(optimizer_config.get("schedule", {}), lr, total_steps)
  labels, groups = param_groups(params, optimizer_config)
  wd = float(optimizer_config.get("weight_decay", 0.0) or 0.0)
  wd_exclude = optimizer_config.get("wd_exclude", None)

  def group_tx(mult):
    return optax.adamw(
        learning_rate=lambda t: mult * schedule(t),
        b1=float(optimizer_config.get("b1", 0.9)), b2=float(optimizer_config.get("b2", 0.999)),
        eps=float(optimizer_config.get("eps", 1e-8)), weight_decay=wd,
        mask=lambda p: weight_decay_mask(p, wd_exclude))

  transforms = {key: group_tx(mult) for key, mult in groups.items()}
  transforms[FROZEN] = optax.set_to_zero()
  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  chain = [optax.masked(optax.set_to_zero(), frozen_mask)]
  clip = optimizer_config.get("clip_norm", None)
  if clip:
    chain.append(optax.clip_by_global_norm(float(clip)))
  chain.append(optax.multi_transform(transforms, labels))
  tx = optax.chain(*chain)
  bounds = param_bounds(params, optimizer_config.get("param_bounds", None), labels)
  if bounds:
    tx = project_into_bounds(tx, bounds)
  return tx, schedule
