"""transformers CLIPModel <-> FashionCLIP (fashion_jax.models.clip) params, both directions.

  load_clip(path_or_id, **runtime) -> (CLIPConfig, params)
      A local HF CLIPModel directory (model.safetensors, or pytorch_model.bin read with
      weights_only=True) or, where the network allows, a hub id. Strict: another architecture,
      a missing key or a wrong shape raises CheckpointMismatchError naming the key and both
      shapes. `runtime` = dtype / scan / remat_policy; with scan=True the layers come stacked.
  save_clip(out_dir, config, params, tokenizer=None, overwrite=False) -> Path
      Writes config.json, model.safetensors, preprocessor_config.json (CLIPImageProcessor:
      bicubic resize of the short side, centre crop, CLIP mean/std) and, given a transformers
      tokenizer, its files, so CLIPModel.from_pretrained and CLIPProcessor.from_pretrained load
      the directory. Refuses a non-empty directory unless overwrite=True.
  hf_state_to_params(config, state) / params_to_hf_state(config, params): the pure conversions.

`params` is the 'params' collection of CLIPModel (plain nested dicts; LogicallyPartitioned
boxes and sharded jax.Arrays are accepted on export and gathered to the host).

Layout rules (HF -> Flax):
  Linear weight [out, in]            -> Dense kernel [in, out] (transpose)
  q/k/v_proj weight [H*Dh, D]        -> DenseGeneral kernel [D, H, Dh]; bias [H*Dh] -> [H, Dh]
  out_proj weight [D, H*Dh]          -> DenseGeneral kernel [H, Dh, D]
  patch_embedding weight OIHW        -> Conv kernel HWIO
  LayerNorm weight / bias            -> scale / bias
  Embedding weight, class_embedding (a bare [D] tensor), position_embedding, logit_scale: as is.
HF spells the vision pre-LayerNorm 'pre_layrnorm' (sic); we keep its spelling in the key map.
"""

import functools
import pathlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from fashion_jax.interop import hf_io
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import layers

# Buffers transformers may store that are not parameters.
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# kind -> (HF array -> Flax array given the Flax shape, Flax array -> HF array).
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "same": (lambda a, s: a.reshape(s), lambda a: a),
    "linear": (lambda a, s: a.T, lambda a: a.T),
    "qkv_kernel": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T),
    "qkv_bias": (lambda a, s: a.reshape(s), lambda a: a.reshape(-1)),
    "out_kernel": (lambda a, s: a.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T),
    "conv": (lambda a, s: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    "scalar": (lambda a, s: a.reshape(s), lambda a: a.reshape(1)),  # HF [1] <-> our [].
}


def encoder_map(hf: str, fx: tuple[str, ...], num_layers: int):
  for i in range(num_layers):
    h, f = f"{hf}.layers.{i}", fx + (f"layers_{i}",)
    for hf_name, fx_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      yield f"{h}.self_attn.{hf_name}.weight", f + ("attn", fx_name, "kernel"), "qkv_kernel"
      yield f"{h}.self_attn.{hf_name}.bias", f + ("attn", fx_name, "bias"), "qkv_bias"
    yield f"{h}.self_attn.out_proj.weight", f + ("attn", "out", "kernel"), "out_kernel"
    yield f"{h}.self_attn.out_proj.bias", f + ("attn", "out", "bias"), "same"
    for n in ("1", "2"):
      yield f"{h}.layer_norm{n}.weight", f + (f"norm{n}", "scale"), "same"
      yield f"{h}.layer_norm{n}.bias", f + (f"norm{n}", "bias"), "same"
      yield f"{h}.mlp.fc{n}.weight", f + ("mlp", f"fc{n}", "kernel"), "linear"
      yield f"{h}.mlp.fc{n}.bias", f + ("mlp", f"fc{n}", "bias"), "same"


def ln(hf: str, fx: tuple[str, ...]):
  yield f"{hf}.weight", fx + ("scale",), "same"
  yield f"{hf}.bias", fx + ("bias",), "same"


def key_map(config: clip_lib.CLIPConfig) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF state_dict key, Flax param path in the per-layer layout, transform kind) for each param."""
  v, t = ("vision_model", ("vision",)), ("text_model", ("text",))
  entries = [
      ("logit_scale", ("logit_scale",), "same"),
      ("visual_projection.weight", ("vision", "projection", "kernel"), "linear"),
      ("text_projection.weight", ("text", "projection", "kernel"), "linear"),
      ("vision_model.embeddings.class_embedding", ("vision", "class_embedding"), "same"),
      ("vision_model.embeddings.patch_embedding.weight", ("vision", "patch_embed", "kernel"),
       "conv"),
      ("vision_model.embeddings.position_embedding.weight", ("vision", "pos_embedding"), "same"),
      ("text_model.embeddings.token_embedding.weight", ("text", "token_embedding", "embedding"),
       "same"),
      ("text_model.embeddings.position_embedding.weight", ("text", "pos_embedding"), "same"),
  ]
  entries += ln(f"{v[0]}.pre_layrnorm", v[1] + ("pre_norm",))
  entries += ln(f"{v[0]}.post_layernorm", v[1] + ("post_norm",))
  entries += ln(f"{t[0]}.final_layer_norm", t[1] + ("final_norm",))
  entries += encoder_map(f"{v[0]}.encoder", v[1] + ("encoder",), config.vision.num_layers)
  entries += encoder_map(f"{t[0]}.encoder", t[1] + ("encoder",), config.text.num_layers)
  return entries


def flax_shapes(init_params: Callable, config: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape in the per-layer layout of `init_params(config, rng)`'s model,
  from eval_shape (nothing allocated)."""
  shapes = jax.eval_shape(functools.partial(init_params, config.replace(scan=False)),
                          jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0]
  return {tuple(k.key for k in path): tuple(x.shape) for path, x in flat}


@functools.lru_cache(maxsize=16)
def _flax_shapes(config: clip_lib.CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  return flax_shapes(clip_lib.init_params, config)


KeyMap = list[tuple[str, tuple[str, ...], str]]  # (HF key, Flax path, TRANSFORMS kind)


def state_to_params(entries: KeyMap, shapes: dict, state: dict[str, np.ndarray],
                    scan: bool) -> dict:
  """HF state (checked by the caller) -> our params (numpy float32), per `entries`; the layer
  layout follows `scan`. Shared by every transformers model whose keys map one to one."""
  params: dict = {}
  for hf, path, kind in entries:
    arr = np.asarray(state[hf], np.float32)
    _set(params, path, np.array(TRANSFORMS[kind][0](arr, shapes[path]), np.float32, order="C"))
  return layers.stack_layers(params) if scan else params


def params_to_state(entries: KeyMap, shapes: dict, params: Any, what: str
                    ) -> dict[str, np.ndarray]:
  """Our params (boxed or not, per-layer or scanned, possibly sharded) -> HF state, per
  `entries`. Params outside the map, missing ones or a wrong shape raise CheckpointMismatchError
  naming them (`what`: the transformers class that could not hold them losslessly)."""
  host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), nn.unbox(params))
  host = layers.unstack_layers(host)
  flat = {tuple(k.key for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(host)[0]}
  expected = {path for _, path, _ in entries}
  extra = sorted("/".join(p) for p in set(flat) - expected)
  missing = sorted("/".join(p) for p in expected - set(flat))
  if extra or missing:
    raise hf_io.CheckpointMismatchError(
        f"These params are not a plain model of this config, so transformers' {what} cannot "
        f"hold them losslessly: unexpected {extra[:10]}, missing {missing[:10]}.")
  state = {}
  for hf, path, kind in entries:
    if flat[path].shape != shapes[path]:
      raise hf_io.CheckpointMismatchError(
          f"param {'/'.join(path)}: shape {flat[path].shape} != expected {shapes[path]} "
          f"(for HF key {hf!r}).")
    state[hf] = np.array(TRANSFORMS[kind][1](flat[path]), np.float32, order="C")
  return state


def _hf_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  return TRANSFORMS[kind][1](np.empty(flax_shape, np.float32)).shape


def expected_hf_shapes(config: clip_lib.CLIPConfig) -> dict[str, tuple[int, ...]]:
  """HF state_dict key -> shape for a CLIPModel of this architecture."""
  fx = _flax_shapes(config)
  return {hf: _hf_shape(kind, fx[path]) for hf, path, kind in key_map(config)}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def hf_state_to_params(config: clip_lib.CLIPConfig, state: dict[str, np.ndarray]) -> dict:
  """A transformers CLIPModel state dict (numpy) -> our params (numpy float32).

  Raises CheckpointMismatchError (key and both shapes) unless the state is exactly this
  architecture. The layout follows config.scan.
  """
  hf_io.check_state(expected_hf_shapes(config), state, what="transformers CLIPModel",
                    ignore_unexpected=_IGNORED)
  return state_to_params(key_map(config), _flax_shapes(config), state, config.scan)


def params_to_hf_state(config: clip_lib.CLIPConfig, params: Any) -> dict[str, np.ndarray]:
  """Our params (boxed or not, per-layer or scanned, possibly sharded) -> HF state dict."""
  config.to_hf_dict()  # Refuses what CLIPModel cannot represent before any work.
  return params_to_state(key_map(config), _flax_shapes(config), params, "CLIPModel")


def load_clip(path_or_id: str, **runtime) -> tuple[clip_lib.CLIPConfig, dict]:
  """(CLIPConfig, params) from an HF CLIPModel directory or hub id; see the module docstring."""
  hf_config, state = hf_io.load_hf_checkpoint(path_or_id)
  try:
    config = clip_lib.CLIPConfig.from_hf(hf_config, **runtime)
  except (KeyError, ValueError) as e:
    raise hf_io.CheckpointMismatchError(
        f"{path_or_id}: not a transformers CLIPModel checkpoint ({type(e).__name__}: {e}).") from e
  return config, hf_state_to_params(config, state)


def image_processor(config: clip_lib.CLIPConfig):
  """The transformers CLIP image processor matching this model's input size.

  The PIL backend is used (torchvision is not a dependency); it saves as image_processor_type
  'CLIPImageProcessor', so AutoImageProcessor picks the preferred backend where one exists.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  s = config.vision.image_size
  return transformers.CLIPImageProcessorPil(
      size={"shortest_edge": s}, crop_size={"height": s, "width": s},
      image_mean=list(config.vision.image_mean), image_std=list(config.vision.image_std))


def save_clip(out_dir: str, config: clip_lib.CLIPConfig, params: Any,
              tokenizer: Optional[Any] = None, overwrite: bool = False,
              matryoshka_dims: Sequence[int] = ()) -> pathlib.Path:
  """Writes a transformers CLIPModel directory; see the module docstring.

  matryoshka_dims: the widths a Matryoshka model was trained at (0 = full), recorded as the
  config.json key `matryoshka_dims` (transformers keeps unknown keys; `api.load` and the search
  index read it). Empty: no key.
  """
  state = params_to_hf_state(config, params)  # Validate before touching the directory.
  out = hf_io.prepare_export_dir(out_dir, overwrite)
  hf_config = config.to_hf()
  hf_config.architectures = ["CLIPModel"]
  hf_config.dtype = "float32"
  if matryoshka_dims:
    hf_config.matryoshka_dims = [int(d) for d in matryoshka_dims]
  hf_config.save_pretrained(str(out))
  # Not hf_io.save_safetensors: its np.ascontiguousarray turns the 0-d logit_scale into [1],
  # which CLIPModel.from_pretrained rejects. Our arrays are already contiguous (order="C").
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
  image_processor(config).save_pretrained(str(out))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  # A stale file from an overwritten export (e.g. an old pytorch_model.bin) would shadow ours.
  for name in hf_io.WEIGHT_FILES:
    if name != "model.safetensors" and (out / name).exists():
      (out / name).unlink()
  return out
