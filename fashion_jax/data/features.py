"""The features of a training batch, each declared once: name, dtype, shape, and how it is made.

Two kinds (data/pipeline.py's make_train_iterator composes both):

  ExampleFeature  made per example inside tf.data (image decode and crop, the product hashes,
                  the cached VQ codes / patch features of the view): declared here, computed in
                  the pipeline's per-example stage, whose output is checked against these
                  declarations when the dataset is built.
  HostFeature     made per batch in numpy on the host (tokenizer, masking, pseudo-attributes):
                  a small op (name, dtype, shape, fn(ctx) -> np.ndarray). The pipeline runs the
                  enabled ops in ONE host step per batch (pipeline.TrainIterator's thread, after
                  tf.data), each output checked against the dtype and shape its HostFeature
                  declares (`compute`), so a feature is added, removed or reshaped in one place.

`feature_spec(config)` lists every key of a train batch with its dtype and per-example shape,
from the config alone: no dataset, no tokenizer files, no TensorFlow (this module imports numpy
and masking.py only). Sizes that live in a prepared file (the A pseudo-attributes, the VQ code
grid, the patch-feature sizes) are None there. `catalog(data)` also lists the features a config
does NOT enable, each with the config key that turns it on (`enabled_by`): train/config_check.py
compares a system's `required_features` (systems/base.py) with the spec before anything compiles
and names that key.

Host ops and randomness. The ops of one batch share one numpy Generator (keyed by seed, host and
step in the pipeline) and run in registration order: text, text_mask, mlm_ids, mlm_labels,
patch_mask, tags, attributes, then field_text, field_mask (multi-field training; they draw
nothing), then the ops registered later (`register`). Each draws from the generator in turn, so
this order is part of the data: it is the order of the hand-written closures these ops replaced,
and every batch is bitwise what they made (tests/test_features.py).
A newly registered op runs after all of these, so it never changes their values. Ops that come
from one computation (the tokenizer's ids and mask, MLM's ids and labels) share it through
`Context.once`: the first of them computes (and draws), the second reads.

Adding a host feature is one declaration:

  features.register(features.HostFeature(
      "text_length", np.int32, (None,), lambda ctx: ctx.tokens()[1].sum(1).astype(np.int32)))

or, when it depends on the config, a factory `fn(data, tok, resources) -> [HostFeature, ...]`
(see the built-in ones below) registered the same way. `fn` must return exactly the declared
dtype and shape (checked on every batch; a mismatch is a ValueError naming the feature).
"""

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fashion_jax.data import masking

_PREPARE = ("`python -m launch.prepare --config=CONFIG --workdir=WORKDIR` makes it into "
            "WORKDIR/prepared/ and launch.train with the same flags fills the key")


def _np_dtype(dtype) -> np.dtype:
  """A numpy dtype from a numpy or TensorFlow dtype (tf.DType has `as_numpy_dtype`)."""
  return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


class Spec(NamedTuple):
  """dtype and per-example shape (None = a size read from a prepared file) of a feature."""
  dtype: np.dtype
  shape: tuple[int | None, ...]


class Context:
  """What a host op sees for one batch of b examples.

  Attributes:
    rng: the batch's numpy Generator; ops draw from it in registration order.
    texts: object [b] of utf-8 bytes, the joined text fields of each example.
    tags: object [b, T] of utf-8 bytes, the raw tag fields (T = 0 when tag_fields is empty).
    fields: object [b, F] of utf-8 bytes, the raw multi-field texts of `data.fields` (F = 0
      when it is empty).
    tokenizer: the run's tokenizers.Tokenizer.
    step: the global step of the batch.
  """

  def __init__(self, *, rng: np.random.Generator, texts: np.ndarray, tags: np.ndarray,
               tokenizer, step: int = 0, fields: np.ndarray | None = None):
    self.rng, self.texts, self.tags, self.tokenizer = rng, texts, tags, tokenizer
    self.fields = (np.zeros((len(texts), 0), object) if fields is None
                   else np.asarray(fields, dtype=object))
    self.step = int(step)
    self._memo = {}

  @property
  def batch_size(self) -> int:
    return len(self.texts)

  def once(self, key: str, compute: Callable[[], Any]) -> Any:
    """compute() the first time `key` is asked for in this batch, the same value afterwards."""
    if key not in self._memo:
      self._memo[key] = compute()
    return self._memo[key]

  def tokens(self) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [b, L], mask bool [b, L]) of `texts` (computed once per batch)."""
    return self.once("tokens", lambda: self.tokenizer(self.texts.tolist(), with_mask=True))


# Default of config.data.token_cache: at most this many distinct texts keep their token rows
# (L = 77: 385 bytes of rows plus the dict entry and key, ~0.66 KB per text with the arrays'
# doubling slack, so up to ~350 MB of host memory; a 50k-product catalog needs ~35 MB).
DEFAULT_TOKEN_CACHE = 1 << 19


class TokenCache:
  """A tokenizer that keeps the rows of the texts it has seen: tokenize once per text, not once
  per epoch.

  Same call contract as tokenizers.Tokenizer: texts (list of str or utf-8 bytes) [N] -> ids
  [N, L] (, mask [N, L]) of the tokenizer's dtypes, and bitwise the tokenizer's rows: each row
  depends on its own text only (padding to max_len, truncation per text), so a cached row is the
  one the tokenizer makes in any batch. Texts not seen yet are tokenized together in one call;
  the first `max_entries` distinct texts are kept (no eviction: a catalog's texts recur every
  epoch, and beyond the cap the tokenizer simply runs). max_entries=0 turns caching off.
  Attributes other than the call (mask_token_id, is_special, ...) are the tokenizer's.
  Thread-safe (tf.data may run the host step of two batches at once).
  """

  def __init__(self, tokenizer, max_entries: int = DEFAULT_TOKEN_CACHE):
    if int(max_entries) != max_entries or max_entries < 0:
      raise ValueError(f"TokenCache max_entries={max_entries} must be an integer >= 0 "
                       "(config.data.token_cache; 0 = off).")
    self.tokenizer, self.max_entries = tokenizer, int(max_entries)
    self._rows: dict[Any, int] = {}
    self._ids = self._mask = None  # [capacity, L], allocated on the first call.
    self._lock = threading.Lock()

  def __getattr__(self, name):
    if name == "tokenizer":  # Not set yet (e.g. while unpickling): no recursion.
      raise AttributeError(name)
    return getattr(self.tokenizer, name)

  def __len__(self) -> int:
    return len(self._rows)

  def _store(self, texts: list, ids: np.ndarray, mask: np.ndarray) -> None:
    """Keeps the rows of `texts` (new, distinct) while there is room."""
    keep = min(len(texts), self.max_entries - len(self._rows))
    if keep <= 0:
      return
    start = len(self._rows)
    if self._ids is None or start + keep > len(self._ids):
      capacity = min(self.max_entries, max(2 * (start + keep), 1024))
      grown_ids = np.zeros((capacity, ids.shape[1]), ids.dtype)
      grown_mask = np.zeros((capacity, mask.shape[1]), mask.dtype)
      if self._ids is not None:
        grown_ids[:start], grown_mask[:start] = self._ids[:start], self._mask[:start]
      self._ids, self._mask = grown_ids, grown_mask
    self._ids[start:start + keep], self._mask[start:start + keep] = ids[:keep], mask[:keep]
    for i, text in enumerate(texts[:keep]):
      self._rows[text] = start + i

  def __call__(self, texts, *, with_mask: bool = False):
    texts = list(texts)
    if not self.max_entries or not texts:
      return self.tokenizer(texts, with_mask=with_mask)
    with self._lock:
      rows = self._rows
      missing = list(dict.fromkeys(t for t in texts if t not in rows))
      fresh = {}
      if missing:
        ids, mask = self.tokenizer(missing, with_mask=True)
        self._store(missing, ids, mask)
        fresh = {t: i for i, t in enumerate(missing) if t not in rows}
      if not fresh:
        index = [rows[t] for t in texts]
        out_ids, out_mask = self._ids[index], self._mask[index]
      else:  # Some texts beyond max_entries: their rows come from this call only.
        out_ids = np.stack([ids[fresh[t]] if t in fresh else self._ids[rows[t]] for t in texts])
        out_mask = np.stack([mask[fresh[t]] if t in fresh else self._mask[rows[t]]
                             for t in texts])
    return (out_ids, out_mask) if with_mask else out_ids


@dataclasses.dataclass(frozen=True)
class HostFeature:
  """A batch feature made on the host in numpy.

  Attributes:
    name: the batch key.
    dtype: numpy (or TensorFlow) dtype of the array `fn` returns; stored as a numpy dtype.
    shape: the per-host batch's shape, as a function of the batch size b, or a tuple whose
      first entry is None (the batch axis). Other entries may be None (a size the declaration
      does not know, e.g. read from a file the op was not given).
    fn: Context -> np.ndarray of exactly `dtype` and that shape.
    enabled: whether the config turns the feature on (disabled ones are listed by `catalog`
      with `enabled_by`, never computed).
    enabled_by: the config key (and value) that turns it on, for error messages; '' = always on.
  """
  name: str
  dtype: Any
  shape: Callable[[int], tuple] | tuple
  fn: Callable[[Context], np.ndarray]
  enabled: bool = True
  enabled_by: str = ""

  def __post_init__(self):
    object.__setattr__(self, "dtype", _np_dtype(self.dtype))
    if not callable(self.shape) and (not self.shape or self.shape[0] is not None):
      raise ValueError(f"HostFeature {self.name!r}: shape={self.shape!r} must be a function of "
                       "the batch size or a tuple starting with None (the batch axis).")

  def batch_shape(self, batch_size: int) -> tuple[int | None, ...]:
    """The declared shape of a batch of `batch_size` examples."""
    if callable(self.shape):
      return tuple(self.shape(batch_size))
    return (batch_size,) + tuple(self.shape[1:])

  def spec(self) -> Spec:
    """dtype and per-example shape (the batch shape without its leading axis)."""
    return Spec(self.dtype, self.batch_shape(1)[1:])


@dataclasses.dataclass(frozen=True)
class ExampleFeature:
  """A batch feature made per example inside tf.data (data/pipeline.py's `example`).

  shape is per example; None marks a size read from a prepared file.
  """
  name: str
  dtype: Any
  shape: tuple[int | None, ...]
  enabled: bool = True
  enabled_by: str = ""

  def __post_init__(self):
    object.__setattr__(self, "dtype", _np_dtype(self.dtype))

  def spec(self) -> Spec:
    return Spec(self.dtype, tuple(self.shape))


# ------------------------------------------------------------------------------------------------
# Per-example features (computed in data/pipeline.py; declared here).
# ------------------------------------------------------------------------------------------------


WINDOW_SUFFIX = "_window"  # image_window: (h, w, flip) of a shipped crop (data/device_crop.py).
RESIZE_ON = ("host", "device")  # config.data.resize_on.


def default_crop_pad(image_size: int) -> int:
  """The shipped crop's side C when data.crop_pad is unset: S rounded up to a power of two.

  224 -> 256: a 256 px catalog's whole image (crop_scale up to 1) fits, at 1.3x the bytes of
  the resized image.
  """
  return 1 << (int(image_size) - 1).bit_length()


def resize_on(data) -> str:
  """config.data.resize_on ('host' when absent); ValueError naming any other value."""
  where = data.get("resize_on", "host") or "host"
  if where not in RESIZE_ON:
    raise ValueError(f"config.data.resize_on={where!r} must be one of {list(RESIZE_ON)}.")
  return where


def crop_pad(data) -> int:
  """config.data.crop_pad, or default_crop_pad(image_size); ValueError below image_size."""
  size = int(data.image_size)
  pad = data.get("crop_pad", 0) or default_crop_pad(size)
  if isinstance(pad, bool) or not isinstance(pad, int):
    raise ValueError(f"config.data.crop_pad={pad!r} must be an integer side in pixels (0 = "
                     f"the default, {default_crop_pad(size)} for image_size={size}).")
  if pad < size:
    raise ValueError(f"config.data.crop_pad={pad} must be >= config.data.image_size={size}: "
                     "the host ships crops it could not fit already resized to image_size.")
  return pad


def example_features(data) -> list[ExampleFeature]:
  """Every per-example feature of config.data, enabled or not, in the pipeline's order."""
  s = int(data.image_size)
  on_device = resize_on(data) == "device"
  c = crop_pad(data) if on_device else s  # The shipped side: a padded crop, or the image.
  two = int(data.views) == 2
  device_by = ("config.data.resize_on='device' (the crop's (h, w, flip); the train step "
               "resizes, data/device_crop.py)")
  return [
      ExampleFeature("image", np.uint8, (c, c, 3)),
      ExampleFeature("product_key", np.int32, ()),
      ExampleFeature("subcategory_key", np.int32, ()),
      ExampleFeature("image2", np.uint8, (c, c, 3), enabled=two,
                     enabled_by="config.data.views=2 (a second view of the product)"),
      ExampleFeature("image" + WINDOW_SUFFIX, np.int32, (3,), enabled=on_device,
                     enabled_by=device_by),
      ExampleFeature("image2" + WINDOW_SUFFIX, np.int32, (3,), enabled=on_device and two,
                     enabled_by=device_by + " with config.data.views=2"),
      ExampleFeature("pair_weight", np.float32, (), enabled=bool(data.get("pair_weight_field")),
                     enabled_by="config.data.pair_weight_field (a numeric schema field: the "
                     "per-pair relevance score, losses/pair_weights.py)"),
      ExampleFeature("vq_codes", np.int32, (None,), enabled=bool(data.get("vq_codes")),
                     enabled_by=f"config.data.vq_codes (cached VQ codes; {_PREPARE})"),
      ExampleFeature("patch_features", np.float32, (None, None),
                     enabled=bool(data.get("patch_features")),
                     enabled_by=f"config.data.patch_features (cached patch features; "
                     f"{_PREPARE})"),
  ]


# ------------------------------------------------------------------------------------------------
# Host ops. A factory (data, tok, resources) -> [HostFeature] declares its features for a
# config; tok is None when only declarations are wanted (feature_spec), and validations that need
# it are skipped then.
# ------------------------------------------------------------------------------------------------

Factory = Callable[[Any, Any, Mapping[str, Any]], Sequence[HostFeature]]
_OPS: dict[str, Factory | HostFeature] = {}


def register(op: Factory | HostFeature, *, name: str | None = None) -> str:
  """Adds a host op after every registered one; returns its registry name (for unregister).

  Iterators made afterwards (and feature_spec) include it; one already made keeps its ops.

  Args:
    op: a HostFeature (always on) or a factory (data, tok, resources) -> [HostFeature].
    name: registry name; default: the HostFeature's name or the factory's __name__.

  Raises:
    ValueError when the name is already registered.
  """
  name = name or (op.name if isinstance(op, HostFeature) else op.__name__)
  if name in _OPS:
    raise ValueError(f"A host feature op {name!r} is already registered; registered: "
                     f"{list(_OPS)}.")
  _OPS[name] = op
  return name


def unregister(name: str) -> None:
  """Removes the op registered as `name` (KeyError naming the registered ones if absent)."""
  if name not in _OPS:
    raise KeyError(f"No host feature op {name!r}; registered: {list(_OPS)}.")
  del _OPS[name]


def _max_len(data, tok) -> int:
  return int(tok.max_len if tok is not None else data.max_len)


def _text(data, tok, resources):
  """text int32 [b, L], text_mask bool [b, L]: the tokenizer (tokenizers.Tokenizer)."""
  del resources
  length = _max_len(data, tok)
  return [HostFeature("text", np.int32, (None, length), lambda ctx: ctx.tokens()[0]),
          HostFeature("text_mask", np.bool_, (None, length), lambda ctx: ctx.tokens()[1])]


def _mlm(data, tok, resources):
  """mlm_ids, mlm_labels int32 [b, L]: whole-word masking of `text` (masking.py)."""
  del resources
  prob = float(data.mlm_prob)
  enabled = prob > 0
  if enabled and tok is not None and tok.mask_token_id is None:
    raise ValueError(f"config.data.mlm_prob={prob} needs a tokenizer with a mask token; "
                     f"{data.tokenizer.kind!r} has none (use kind='bert').")

  def masked(ctx):
    tk = ctx.tokenizer
    return masking.whole_word_mask(ctx.rng, ctx.tokens()[0], is_special=tk.is_special,
                                   is_continuation=tk.is_continuation,
                                   mask_id=tk.mask_token_id, prob=prob)
  def part(i):  # One draw serves both: the first of the two computes it.
    return lambda ctx: ctx.once("mlm", lambda: masked(ctx))[i]
  length = _max_len(data, tok)
  how = "config.data.mlm_prob > 0 (with data.tokenizer.kind='bert')"
  return [HostFeature(name, np.int32, (None, length), part(i), enabled=enabled, enabled_by=how)
          for i, name in enumerate(("mlm_ids", "mlm_labels"))]


def _patch_mask(data, tok, resources):
  """patch_mask bool [b, g*g]: BEiT block masks (masking.block_masks), row-major."""
  del tok, resources
  grid, count = int(data.patch_mask.grid), int(data.patch_mask.count)
  kwargs = dict(min_block=int(data.patch_mask.get("min_block", 4)),
                max_block=data.patch_mask.get("max_block", None))
  if grid:  # Fail now, not inside tf.data.
    masking.block_mask(np.random.default_rng(0), grid, count, **kwargs)
  return [HostFeature(
      "patch_mask", np.bool_, (None, grid * grid),
      lambda ctx: masking.block_masks(ctx.rng, ctx.batch_size, grid, count, **kwargs),
      enabled=grid > 0, enabled_by="config.data.patch_mask.grid > 0 (and patch_mask.count)")]


def _tags(data, tok, resources):
  """tags int32 [b, T, L]: each of the T tag fields tokenized on its own (E2's entity texts)."""
  del resources
  fields = tuple(data.get("tag_fields", ()))
  length = _max_len(data, tok)

  def tokenize(ctx):
    b = ctx.batch_size
    return ctx.tokenizer(ctx.tags.reshape(-1).tolist()).reshape(b, len(fields), -1)
  return [HostFeature("tags", np.int32, (None, len(fields), length), tokenize,
                      enabled=bool(fields),
                      enabled_by="config.data.tag_fields (the schema fields of the tag texts, "
                      "e.g. ('brand', 'season'))")]


def _attributes(data, tok, resources):
  """attributes bool [b, A]: the pseudo-attributes each text contains (resources['matcher'], an
  attributes.Matcher of config.data.attributes; A is None without it)."""
  del tok
  matcher = resources.get("matcher")
  enabled = bool(data.get("attributes"))

  def match(ctx):
    if matcher is None:
      raise ValueError("host_features(...) was not given the matcher= of config.data.attributes.")
    return matcher(ctx.texts.tolist())
  size = None if matcher is None else len(matcher.vocab)
  return [HostFeature("attributes", np.bool_, (None, size), match, enabled=enabled,
                      enabled_by=f"config.data.attributes (a pseudo-attribute vocabulary; "
                      f"{_PREPARE})")]


def multi_fields(data) -> tuple[str, ...]:
  """config.data.fields as a validated tuple of names (() = multi-field training off).

  Raises:
    ValueError naming the value: not a sequence of non-empty strings, or a repeated name.
  """
  fields = data.get("fields", ()) or ()
  if isinstance(fields, str):
    raise ValueError(f"config.data.fields={fields!r} must be a tuple of field names, e.g. "
                     f"({fields!r},).")
  fields = tuple(fields)
  bad = [f for f in fields if not isinstance(f, str) or not f]
  if bad:
    raise ValueError(f"config.data.fields={fields!r}: {bad[0]!r} is not a field name.")
  if len(set(fields)) != len(fields):
    raise ValueError(f"config.data.fields={fields!r} repeats a field.")
  return fields


def field_present(raw: np.ndarray) -> np.ndarray:
  """bool array of the shape of `raw` (utf-8 bytes or str): True where the field has text.

  A field is missing when it is empty or only whitespace (the product schema writes '' for an
  unknown value).
  """
  flat = [(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip()
          for v in np.asarray(raw, dtype=object).reshape(-1)]
  return np.asarray([bool(v) for v in flat], bool).reshape(np.shape(raw))


def _fields(data, tok, resources):
  """field_text int32 [b, F, L] and field_mask bool [b, F]: each of the F = len(data.fields)
  multi-field texts tokenized on its own, and whether the product has it (`field_present`).

  A missing field is tokenized as '' (whatever the tokenizer makes of it) and MASKED: the
  multi-field loss (losses/multifield.py) leaves that product out of that field's term.
  """
  del resources
  fields = multi_fields(data)
  length = _max_len(data, tok)
  how = ("config.data.fields (the text fields of the multi-field loss, e.g. ('title', "
         "'primary_color'))")

  def tokenize(ctx):
    b = ctx.batch_size
    return ctx.tokenizer(ctx.fields.reshape(-1).tolist()).reshape(b, len(fields), -1)
  return [HostFeature("field_text", np.int32, (None, len(fields), length), tokenize,
                      enabled=bool(fields), enabled_by=how),
          HostFeature("field_mask", np.bool_, (None, len(fields)),
                      lambda ctx: field_present(ctx.fields), enabled=bool(fields),
                      enabled_by=how)]


# Registration order = the order the ops draw from the batch's Generator (module docstring).
for _factory in (_text, _mlm, _patch_mask, _tags, _attributes, _fields):
  register(_factory, name=_factory.__name__[1:])


def _declared(data, tok=None, **resources) -> list[HostFeature]:
  out = []
  for op in _OPS.values():
    out.extend([op] if isinstance(op, HostFeature) else op(data, tok, resources))
  return out


def host_features(data, tok=None, **resources) -> list[HostFeature]:
  """The enabled host ops of config.data, in the order they run (module docstring).

  Args:
    data: config.data.
    tok: the run's tokenizers.Tokenizer; None to only declare (shapes from data.max_len, and
      the checks that need the tokenizer skipped).
    **resources: objects the ops need, built by the caller: matcher (an attributes.Matcher of
      data.attributes; without it the attributes' size A is None and computing it fails).

  Raises:
    ValueError for a setting an op cannot run with (mlm_prob without a mask token, a
    patch_mask no block can fill, a duplicate feature name).
  """
  ops = [f for f in _declared(data, tok, **resources) if f.enabled]
  names = [f.name for f in ops]
  if len(set(names)) != len(names):
    raise ValueError(f"Host feature names repeat: {names}.")
  return ops


def compute(ops: Sequence[HostFeature], ctx: Context) -> list[np.ndarray]:
  """[op.fn(ctx) for op in ops], each checked against its declared dtype and shape."""
  out = []
  for op in ops:
    value = op.fn(ctx)
    want = op.batch_shape(ctx.batch_size)
    if (not isinstance(value, np.ndarray) or value.dtype != op.dtype
        or value.ndim != len(want)
        or any(w is not None and w != g for w, g in zip(want, value.shape))):
      got = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, np.ndarray)
             else type(value).__name__)
      raise ValueError(f"Host feature {op.name!r} returned {got}; it declares {op.dtype} "
                       f"{want}.")
    out.append(value)
  return out


# ------------------------------------------------------------------------------------------------
# The whole batch.
# ------------------------------------------------------------------------------------------------


def catalog(data) -> dict[str, str]:
  """name -> enabled_by of every declared feature (enabled or not; '' = always on)."""
  out = {f.name: f.enabled_by for f in example_features(data)}
  out.update({f.name: f.enabled_by for f in _declared(data)})
  return out


def feature_spec(config) -> dict[str, Spec]:
  """Every key of a train batch of `config` (data/pipeline.py) -> Spec(dtype, per-example shape).

  From the config alone (no dataset, files or TensorFlow); a batch of b examples has shape
  (b,) + shape. Raises ValueError for a data setting a host op cannot run with.
  """
  data = config.data
  spec = {f.name: f.spec() for f in example_features(data) if f.enabled}
  for op in host_features(data):
    if op.name in spec:
      raise ValueError(f"Host feature {op.name!r} repeats a per-example feature.")
    spec[op.name] = op.spec()
  return spec
