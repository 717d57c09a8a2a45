"""transformers ResNetModel / ResNetForImageClassification <-> fashion_jax.models.resnet.ResNet.

HF key layout (microsoft/resnet-50), optionally under a `resnet.` prefix:
  embedder.embedder.{convolution.weight, normalization.{weight,bias,running_mean,running_var}}
  encoder.stages.S.layers.J.layer.K.{convolution.weight, normalization.*}
  encoder.stages.S.layers.J.shortcut.{convolution.weight, normalization.*}
Ours: params/stem_conv/kernel, params/stem_bn/{scale,bias}, batch_stats/stem_bn/{mean,var},
stage{S}_block{J}/{conv_K, bn_K, proj_conv, proj_bn}.

Conv weights go OIHW -> HWIO; BN weight/bias -> scale/bias (params) and running_mean/running_var
-> mean/var (batch_stats), copied bit-exactly. `num_batches_tracked` (a counter only used when
torch's momentum is None) and an image-classification head (`classifier.*`) are dropped
explicitly and logged; anything else that does not map is an error naming the key and shapes.
"""

import logging
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.interop import hf_io
from fashion_jax.models import resnet as resnet_lib

_BN_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def resnet_from_hf_config(config: Mapping[str, Any], **overrides) -> resnet_lib.ResNet:
  """Our ResNet with the architecture of an HF ResNetConfig dict (dtype etc. via overrides)."""
  if config.get("model_type") != "resnet":
    raise hf_io.CheckpointMismatchError(
        f"Expected an HF ResNet checkpoint (model_type 'resnet'), got model_type "
        f"{config.get('model_type')!r}.")
  act = config.get("hidden_act", "relu")
  if act != "relu":
    raise hf_io.CheckpointMismatchError(f"Only hidden_act 'relu' is modelled, got {act!r}.")
  kw = dict(
      depths=tuple(config.get("depths", (3, 4, 6, 3))),
      widths=tuple(config.get("hidden_sizes", (256, 512, 1024, 2048))),
      stem_width=int(config.get("embedding_size", 64)),
      block=config.get("layer_type", "bottleneck"),
      downsample_in_first_stage=bool(config.get("downsample_in_first_stage", False)),
      downsample_in_bottleneck=bool(config.get("downsample_in_bottleneck", False)))
  kw.update(overrides)
  return resnet_lib.ResNet(**kw)


def hf_config_dict(model: resnet_lib.ResNet) -> dict:
  """transformers.ResNetConfig fields of `model` (the inverse of `resnet_from_hf_config`)."""
  return dict(model_type="resnet", architectures=["ResNetModel"], num_channels=3,
              embedding_size=model.stem_width, hidden_sizes=list(model.widths),
              depths=list(model.depths), layer_type=model.block, hidden_act="relu",
              downsample_in_first_stage=model.downsample_in_first_stage,
              downsample_in_bottleneck=model.downsample_in_bottleneck)


def _hf_module_name(path: tuple[str, ...]) -> str:
  """('stage1_block2', 'bn_0') -> 'encoder.stages.1.layers.2.layer.0.normalization'."""
  if path == ("stem_conv",):
    return "embedder.embedder.convolution"
  if path == ("stem_bn",):
    return "embedder.embedder.normalization"
  m = re.fullmatch(r"stage(\d+)_block(\d+)", path[0]) if len(path) == 2 else None
  if m is None:
    raise ValueError(f"Unexpected ResNet module path {'/'.join(path)}")
  base = f"encoder.stages.{m[1]}.layers.{m[2]}"
  sub = {"proj_conv": "shortcut.convolution", "proj_bn": "shortcut.normalization"}.get(path[1])
  if sub is None:
    k = re.fullmatch(r"(conv|bn)_(\d+)", path[1])
    if k is None:
      raise ValueError(f"Unexpected ResNet module path {'/'.join(path)}")
    sub = f"layer.{k[2]}." + ("convolution" if k[1] == "conv" else "normalization")
  return f"{base}.{sub}"


def _leaf_map(variables) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF key -> (our flat path (collection, *modules, leaf), is_conv_kernel)."""
  out = {}
  for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)):
    collection, *modules, leaf = path
    hf_mod = _hf_module_name(tuple(modules))
    if leaf == "kernel":
      out[f"{hf_mod}.weight"] = (path, True)
    else:
      out[f"{hf_mod}.{_BN_LEAVES[(collection, leaf)]}"] = (path, False)
  return out


def _abstract_variables(model: resnet_lib.ResNet, num_channels: int):
  x = jax.ShapeDtypeStruct((1, 32, 32, num_channels), jnp.float32)
  return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape))))


def convert_hf_resnet_state(state: Mapping[str, np.ndarray], model: resnet_lib.ResNet,
                            num_channels: int = 3) -> dict:
  """Flat HF state (no prefix) -> {'params': ..., 'batch_stats': ...} for `model` (strict)."""
  abstract = _abstract_variables(model, num_channels)
  leaf_map = _leaf_map(abstract)
  flat_abstract = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  expected = {}
  for key, (path, is_conv) in leaf_map.items():
    shape = flat_abstract[path].shape
    expected[key] = (shape[3], shape[2], shape[0], shape[1]) if is_conv else shape
  hf_io.check_state(expected, state, what="HF ResNetModel -> fashion_jax ResNet")
  flat = {}
  for key, (path, is_conv) in leaf_map.items():
    v = np.asarray(state[key], np.float32)
    flat[path] = np.transpose(v, (2, 3, 1, 0)) if is_conv else v
  return flax.traverse_util.unflatten_dict(flat)


def export_resnet_state(variables, model: resnet_lib.ResNet) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} of `model` -> flat HF ResNetModel state dict (HWIO -> OIHW).

  Includes `num_batches_tracked` = 0 for every BN, as HF's state dict has it.
  """
  del model  # The layout is fully determined by the variable tree.
  flat_vars = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  state = {}
  for key, (path, is_conv) in _leaf_map(variables).items():
    v = np.asarray(flat_vars[path], np.float32)
    state[key] = np.ascontiguousarray(np.transpose(v, (3, 2, 0, 1)) if is_conv else v)
    if key.endswith(".running_mean"):
      state[key.replace(".running_mean", ".num_batches_tracked")] = np.zeros((), np.int64)
  return state


def load_hf_resnet(path_or_id: str, **overrides) -> tuple[resnet_lib.ResNet, dict]:
  """Imports an HF ResNetModel or ResNetForImageClassification directory.

  Returns (model, variables) with variables = {'params': ..., 'batch_stats': ...}; apply with
  `model.apply(variables, images_nhwc)` (inference-mode BatchNorm).
  """
  config, state = hf_io.load_hf_checkpoint(path_or_id)
  model = resnet_from_hf_config(config, **overrides)
  if any(k.startswith("resnet.") for k in state):
    dropped = sorted(k for k in state if not k.startswith("resnet."))
    heads = sorted({k.split(".")[0] for k in dropped})
    if any(not k.startswith("classifier.") for k in dropped):
      bad = [k for k in dropped if not k.startswith("classifier.")]
      raise hf_io.CheckpointMismatchError(
          f"HF ResNet checkpoint: unexpected keys outside 'resnet.' and 'classifier.': {bad[:5]}")
    if heads:
      logging.info("HF ResNet import: ignoring head(s) not modelled: %s", ", ".join(heads))
    state = {k[len("resnet."):]: v for k, v in state.items() if k.startswith("resnet.")}
  # BN step counters are not parameters: dropped explicitly.
  state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  variables = convert_hf_resnet_state(state, model, int(config.get("num_channels", 3)))
  return model, variables
