"""Embedding a split with a two-tower system, shared by every evaluator.

Flow: host-local numpy batches of the eval pipeline (`image` uint8 [b, S, S, 3], `text` int32
[b, L], `valid` bool [b], `index` int32 [b], plus requested raw string fields) -> global
jax.Arrays sharded over the mesh's batch axes (`jax.make_array_from_process_local_data`) ->
jitted `system.embed_images` / `system.embed_texts` -> the whole global batch on every host
(`multihost_utils.process_allgather` when there are several processes) -> padding rows dropped by
`valid` -> rows sorted by the dataset `index`, so the result does not depend on the mesh or the
number of processes.

The pipeline pads every process's last batch to the same size (`valid` False), so all processes
run the same number of steps with the same shapes.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from fashion_jax.parallel import axes
from fashion_jax.data import pipeline
from fashion_jax.data import tokenizers

Batches = Iterable[Mapping[str, np.ndarray]]


def eval_batches(config, split: str, *, batch_size: int, fields: Sequence[str] = (),
                 dataset_fn: Callable[..., Batches] | None = None,
                 single_process: bool = False) -> Batches:
  """The eval batches of `split`: `dataset_fn` or fashion_jax.data.pipeline.make_eval_dataset.

  Each process reads its own shard (the pipeline's default process_index/process_count), or,
  with single_process, every process reads the whole split from its start (the same rows
  everywhere: for evaluators that look at a few examples).
  """
  if dataset_fn is None:
    dataset_fn = pipeline.make_eval_dataset
  kwargs = dict(process_index=0, process_count=1) if single_process else {}
  return dataset_fn(config, split, batch_size=batch_size, fields=tuple(fields), **kwargs)


def _gather_strings(values: np.ndarray) -> np.ndarray:
  """Host-local [b] python strings -> [b * process_count] in process order (utf-8 via uint8)."""
  if jax.process_count() == 1:
    return np.asarray(values, dtype=object)
  enc = [str(v).encode("utf-8") for v in values]
  width = int(np.max(multihost_utils.process_allgather(
      np.asarray(max([len(e) for e in enc] + [1]), np.int32))))
  buf = np.zeros((len(enc), width), np.uint8)
  for i, e in enumerate(enc):
    buf[i, :len(e)] = np.frombuffer(e, np.uint8)
  allb = np.asarray(multihost_utils.process_allgather(buf, tiled=True))
  return np.asarray([bytes(row).rstrip(b"\0").decode("utf-8") for row in allb], dtype=object)


class Embedder:
  """Jitted towers of one system on one mesh (compiled once, reused by every run).

  Attributes:
    shards: number of batch shards (product of the mesh's batch axes; 1 without a mesh). Every
      global batch must be a multiple of it.
  """

  def __init__(self, system, mesh: Mesh | None = None):
    self.system = system
    self.mesh = mesh
    self._jitted = {}
    if mesh is None:
      self.shards = 1
      self._sharding = None
    else:
      batch_axes = tuple(a for a in axes.BATCH_AXES if a in mesh.axis_names)
      self.shards = math.prod(mesh.shape[a] for a in batch_axes)
      self._sharding = NamedSharding(mesh, P(batch_axes))

  def _tower(self, name: str):
    """The jitted system.<name>, compiled on first use (an image-only probe needs no text tower)."""
    if name not in self._jitted:
      self._jitted[name] = jax.jit(getattr(self.system, name))
    return self._jitted[name]

  # -- host <-> device ----------------------------------------------------------------------------
  def _check(self, global_batch: int, what: str):
    if global_batch % self.shards:
      raise ValueError(f"{what}: global batch {global_batch} is not divisible by the "
                       f"{self.shards} batch shards of the mesh {dict(self.mesh.shape)}; pick "
                       "an eval batch_size that is.")

  def _local_to_global(self, x: np.ndarray) -> jax.Array:
    """A process-local slice of the global batch -> global array."""
    if self._sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_process_local_data(self._sharding, x)

  def _replicated_to_global(self, x: np.ndarray) -> jax.Array:
    """Host data identical on every process (prompts, occluded images) -> global array."""
    if self._sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, self._sharding, lambda idx: x[idx])

  @staticmethod
  def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  # -- embedding --------------------------------------------------------------------------------
  def embed_split(self, params, batches: Batches, *, images: bool = True, texts: bool = True,
                  fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Embeds every valid row of `batches`.

    Returns:
      {'image': float32 [N, D] (if images), 'text': float32 [N, D] (if texts), 'index': [N],
       each field: object [N] of str}, rows sorted by 'index'.
    """
    out = {"image": [], "text": [], "index": []}
    strings = {f: [] for f in fields}
    for step, batch in enumerate(batches):
      missing = [k for k in ("valid", "index") + tuple(fields) + ("image",) * images
                 + ("text",) * texts if k not in batch]
      if missing:
        raise KeyError(f"eval batch {step} lacks {missing}; it has {sorted(batch)}.")
      local = int(np.shape(batch["valid"])[0])
      self._check(local * jax.process_count(), f"eval batch {step}")
      if images:
        out["image"].append(self._to_host(self._tower("embed_images")(
            params, self._local_to_global(np.asarray(batch["image"])))))
      if texts:
        out["text"].append(self._to_host(self._tower("embed_texts")(
            params, self._local_to_global(np.asarray(batch["text"], np.int32)))))
      valid = self._to_host(self._local_to_global(np.asarray(batch["valid"], bool)))
      index = self._to_host(self._local_to_global(np.asarray(batch["index"], np.int32)))
      out["index"].append(np.where(valid, index, -1))
      if fields:
        # Strings travel host-side (process order) with their own copy of the index.
        idx_h = _gather_strings(np.asarray(batch["index"]).astype(str))
        valid_h = np.asarray(multihost_utils.process_allgather(
            np.asarray(batch["valid"], bool), tiled=True)) if jax.process_count() > 1 else \
            np.asarray(batch["valid"], bool)
        for f in fields:
          vals = _gather_strings(np.asarray(batch[f], dtype=object))
          strings[f].append({int(i): v for i, v, ok in zip(idx_h, vals, valid_h) if ok})
    if not out["index"]:
      raise ValueError("the eval dataset yielded no batch.")
    index = np.concatenate(out["index"])
    keep = index >= 0
    order = np.argsort(index[keep], kind="stable")
    result = {"index": index[keep][order]}
    if len(np.unique(result["index"])) != len(result["index"]):
      raise ValueError("the eval dataset yielded the same 'index' twice; each example must "
                       "appear once over all processes.")
    for k in ("image", "text"):
      if out[k]:
        result[k] = np.concatenate(out[k])[keep][order]
    for f in fields:
      lookup = {}
      for d in strings[f]:
        lookup.update(d)
      result[f] = np.asarray([lookup[int(i)] for i in result["index"]], dtype=object)
    return result

  def _embed_array(self, fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    n = x.shape[0]
    if n == 0:
      raise ValueError("nothing to embed (0 rows).")
    batch_size = -(-min(batch_size, n) // self.shards) * self.shards
    outs = []
    for start in range(0, n, batch_size):
      chunk = x[start:start + batch_size]
      pad = batch_size - chunk.shape[0]
      if pad:  # One shape -> one compilation.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      outs.append(self._to_host(fn(params, self._replicated_to_global(chunk)))[:batch_size - pad])
    return np.concatenate(outs)

  def embed_tokens(self, params, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """int32 [N, L] token ids (the same on every process) -> float32 [N, D]."""
    return self._embed_array(self._tower("embed_texts"), params, np.asarray(tokens, np.int32),
                             batch_size)

  def embed_images(self, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] (the same on every process) -> float32 [N, D]."""
    return self._embed_array(self._tower("embed_images"), params, np.asarray(images), batch_size)


def tokenizer_from_config(config) -> Callable[[list[str]], np.ndarray]:
  """config.data.tokenizer (kind, path) and config.data.max_len -> callable(list[str]) -> int32
  [N, max_len], via fashion_jax.data.tokenizers.get_tokenizer."""
  tok = config.data.tokenizer
  return tokenizers.get_tokenizer(tok.kind, tok.get("path"), config.data.max_len)
