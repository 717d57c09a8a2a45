"""A model's towers as the search engine uses them: images, texts and (where the model has one)
a text-modified image query.

`load_encoder(path)` accepts
  * a fashion_jax training workdir (config.json + checkpoints/): any two-tower system (FashionCLIP,
    E2, FashionViL). Images and texts go through the SAME code as the retrieval evaluator:
    `evaluate.common.Embedder` over the system's jitted `embed_images` / `embed_texts`, texts
    tokenized by the run's `config.data.tokenizer` at `config.data.max_len`; so a search over a
    split and the evaluator's full-candidate ranking see identical embeddings;
  * a transformers CLIPModel directory (our `launch.export` output or any HF CLIP checkpoint):
    through `fashion_jax.api.FashionCLIP` (its own tokenizer and CLIPProcessor-style resizing).

Image inputs are uint8 [N, S, S, 3] at `encoder.image_size` (the catalog reader produces them);
`load_image(path, size)` gives the same for a user's query file (RGB, bicubic short side -> S,
centre crop: CLIPProcessor's geometry).

Text-modified image queries (TGIR: "this dress but in red"): supported when the system has
`embed_composed(params, images [B, S, S, 3], tokens [B, L]) -> [B, D]` in the gallery's
embedding space, or is a FashionViL run: its query is FashionViL's TGIR feature, the mean of the
fusion encoder's outputs over the image positions of [modification text ; reference image],
scored against the unimodal image vectors (the paper's TGIR head; meaningful after TGIR
fine-tuning); a FashionViL run fine-tuned on TGIR (system fashionvil_downstream) answers with its
trained TGIR head (`tgir_query`, the query evaluate/tgir.py scores). CLIP-style models have no such query and raise a ValueError naming the model.

Model identity (`Encoder.identity`): {'path' (absolute), 'step' (the checkpoint step of a
workdir, None for an exported directory), 'fingerprint'}, where the fingerprint is a short digest
of train/checkpoint.fingerprint over the params (exact per-array bit sums, the same on any mesh).
A product index records it when built (search/products.py) so that a query with another model
(a newer checkpoint, another run) is caught instead of silently ranking stale embeddings.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import restore
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax import api
from fashion_jax.evaluate import common


@dataclasses.dataclass
class Encoder:
  """Embedding functions of one model (module docstring).

  Attributes:
    name: the path it was loaded from.
    system: the system name ('fashionclip', 'e2', 'fashionvil', or 'hf_clip').
    image_size: S of the images it takes.
    data_config: the `config.data` the catalog reader uses for this model (image size, text
      fields, tokenizer).
    embed_images: uint8 [N, S, S, 3] -> float32 [N, D].
    embed_texts: list of N str -> float32 [N, D].
    embed_composed: (uint8 [N, S, S, 3], list of N str) -> float32 [N, D], or None.
    batch_size: rows per forward pass.
    identity: {'path', 'step', 'fingerprint'} of the loaded params (module docstring).
    matryoshka_dims: the widths the model was trained at (0 = full; () = trained without
      Matryoshka), or None where nothing records them; read by the index's `dim` check.
  """
  name: str
  system: str
  image_size: int
  data_config: ml_collections.ConfigDict
  embed_images: Callable[[np.ndarray], np.ndarray]
  embed_texts: Callable[[Sequence[str]], np.ndarray]
  embed_composed: Callable[[np.ndarray, Sequence[str]], np.ndarray] | None = None
  batch_size: int = 64
  identity: dict[str, Any] | None = None
  matryoshka_dims: tuple[int, ...] | None = None

  @property
  def supports_composed(self) -> bool:
    return self.embed_composed is not None

  def composed(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    if self.embed_composed is None:
      raise ValueError(f"The {self.system} model at {self.name} has no text-modified image "
                       "query (TGIR): use a FashionViL run or a system with embed_composed.")
    if len(images) != len(texts):
      raise ValueError(f"{len(images)} reference images but {len(texts)} modification texts.")
    return self.embed_composed(images, list(texts))


def params_fingerprint(params: Any) -> str:
  """16 hex digits: sha256 of checkpoint.fingerprint(params) (paths and per-array sums). Equal
  params give equal digests on any mesh; any changed value changes it (barring collisions)."""
  sums = checkpoint_lib.fingerprint(params)
  return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]


def model_identity(path: str, step: int | None, params: Any) -> dict[str, Any]:
  """The identity an index records and compares (module docstring)."""
  return {"path": os.path.abspath(path), "step": None if step is None else int(step),
          "fingerprint": params_fingerprint(params)}


def is_workdir(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          and os.path.exists(os.path.join(path, "config.json")))


def load_encoder(path: str, *, step: int | None = None, batch_size: int = 64) -> Encoder:
  """An Encoder from a training workdir or a transformers CLIPModel directory."""
  path = os.path.expanduser(str(path))
  if is_workdir(path):
    return _from_workdir(path, step=step, batch_size=batch_size)
  if os.path.exists(os.path.join(path, "config.json")):
    if step is not None:
      raise ValueError(f"step={step} only applies to a training workdir; {path} is an exported "
                       "model directory.")
    return _from_hf_dir(path, batch_size=batch_size)
  raise FileNotFoundError(f"{path} is neither a fashion_jax workdir (config.json + checkpoints/) "
                          "nor a transformers model directory (config.json).")


def _from_workdir(workdir: str, *, step, batch_size) -> Encoder:
  system, params, loaded_step = restore.load_trained(workdir, step=step)
  config = checkpoint_restore.load_workdir_config(workdir)
  if not all(hasattr(system, m) for m in ("embed_images", "embed_texts")):
    raise ValueError(f"{workdir} holds a {config.system!r} run, which is not a two-tower system "
                     "(no embed_images/embed_texts): it cannot build a vector index.")
  embedder = common.Embedder(system)
  tokenize = common.tokenizer_from_config(config)

  def images(x):
    return embedder.embed_images(params, np.asarray(x, np.uint8), batch_size)

  def texts(strings):
    return embedder.embed_tokens(params, tokenize(list(strings)), batch_size)

  composed = None
  if hasattr(system, "embed_composed"):
    fn = embedder._tower("embed_composed")  # pylint: disable=protected-access
    composed = lambda x, s: _batched2(lambda a, b: fn(params, a, b), np.asarray(x, np.uint8),
                                      tokenize(list(s)), batch_size)
  elif config.system == "fashionvil":
    composed = _fashionvil_composed(system, params, tokenize, batch_size)
  elif hasattr(system, "tgir_query"):  # A FashionViL run fine-tuned downstream (TGIR head).
    composed = _tgir_head_composed(system, params, tokenize, batch_size)
  return Encoder(name=workdir, system=str(config.system), image_size=int(config.data.image_size),
                 data_config=config.data, embed_images=images, embed_texts=texts,
                 embed_composed=composed, batch_size=batch_size,
                 identity=model_identity(workdir, loaded_step, params),
                 matryoshka_dims=tuple(getattr(system, "matryoshka_dims", ()) or ()))


def _batched2(fn, a: np.ndarray, b: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over aligned row chunks of a and b; the last chunk padded so one shape compiles."""
  n = a.shape[0]
  bs = min(batch_size, n)
  outs = []
  for i in range(0, n, bs):
    ca, cb = a[i:i + bs], b[i:i + bs]
    pad = bs - ca.shape[0]
    if pad:
      ca = np.concatenate([ca, np.repeat(ca[-1:], pad, 0)])
      cb = np.concatenate([cb, np.repeat(cb[-1:], pad, 0)])
    outs.append(np.asarray(fn(jnp.asarray(ca), jnp.asarray(cb)))[:bs - pad])
  return np.concatenate(outs)


def _fashionvil_composed(system, params, tokenize, batch_size):
  """FashionViL's TGIR query: mean fusion output over the image positions, L2-normalised like
  its unimodal vectors (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  pad_id = system.tokenizer.pad_token_id

  def query(module, images, ids):
    mask = ids != pad_id
    hidden = module.fuse(ids, mask, module.image_tokens(images))
    f = hidden[:, ids.shape[1]:].mean(axis=1)
    return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

  fn = jax.jit(lambda p, x, ids: system.model.apply(p, x, ids, method=query))
  return lambda x, s: _batched2(lambda a, b: fn(params, a, b), np.asarray(x, np.uint8),
                                tokenize(list(s)), batch_size)


def _tgir_head_composed(system, params, tokenize, batch_size):
  """The fine-tuned TGIR query of a downstream FashionViL run (`system.tgir_query`): exactly
  what evaluate/tgir.py scores against the gallery's image vectors."""
  import jax  # pylint: disable=g-import-not-at-top
  pad_id = system.tokenizer.pad_token_id
  fn = jax.jit(lambda p, x, ids: system.tgir_query(p, x, ids, ids != pad_id))
  return lambda x, s: _batched2(lambda a, b: fn(params, a, b), np.asarray(x, np.uint8),
                                tokenize(list(s)), batch_size)


def _from_hf_dir(path: str, *, batch_size) -> Encoder:
  fclip = api.load(path, batch_size=batch_size)
  size = int(fclip.config.vision.image_size)
  data = ml_collections.ConfigDict(dict(
      name="", data_dir="", image_size=size, text_fields=("title", "description"),
      tokenizer=dict(kind="clip", path=""), max_len=int(fclip.config.text.max_len)))
  return Encoder(name=path, system="hf_clip", image_size=size, data_config=data,
                 embed_images=lambda x: fclip.encode_images(np.asarray(x, np.uint8)),
                 embed_texts=lambda s: fclip.encode_text(list(s)), batch_size=batch_size,
                 identity=model_identity(path, None, fclip.params),
                 matryoshka_dims=fclip.matryoshka_dims)


def load_image(image: Any, size: int) -> np.ndarray:
  """A path / PIL image / uint8 array -> uint8 [size, size, 3] (CLIPProcessor's geometry)."""
  return api.resize_and_crop(api.FashionCLIP._to_pil(image), size)  # pylint: disable=protected-access
