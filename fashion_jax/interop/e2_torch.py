"""E2 <-> PyTorch: a small torch module of ours reproducing the Flax forward, and its files.

Export directory (`export_e2`):
  model.safetensors   every parameter; the CLIP part under transformers CLIPModel's keys
                      (`vision_model.encoder.layers.N...`, `text_projection.weight`, ...), the
                      E2 additions under `e2.`:
                        e2.selection_tokens                         [S, D]
                        e2.fusion.J.{query,key,value}.{weight,bias} Linear(D, D) (weight = W^T)
                        e2.entity_norms.NAME.{weight,bias}          LayerNorm(D)
                        e2.entity_projections.NAME.weight           Linear(D, P, bias=False)
  e2_config.json      E2Config.to_dict() (the CLIP architecture inside)
  clip/               the plain CLIP part as a transformers CLIPModel directory
                      (hf_clip.save_clip): loadable by CLIPModel.from_pretrained, without E2

`E2Torch.from_pretrained(dir)` rebuilds the module (transformers CLIP towers, eager attention,
plus our fusion blocks and entity heads) and loads the safetensors strictly; `load_e2(dir)` reads
the same files back into Flax params. `E2Torch.forward` follows models/e2.py exactly, at
evaluation (deterministic argmax selection, no Gumbel noise): pixel_values are CLIP-normalised
float [B, 3, H, W] (transformers' layout), ids [B, L], tag_ids [B, E, L].
"""

import functools
import json
import pathlib
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.models import e2 as e2_lib

CONFIG_FILE = "e2_config.json"
WEIGHTS_FILE = "model.safetensors"


def _new_entries(config: e2_lib.E2Config):
  """(torch key, Flax path under params['vision'], 'linear' | 'same') of each E2 addition."""
  yield "e2.selection_tokens", ("selection_tokens",), "same"
  for j in range(len(config.fusion_after)):
    for name in ("query", "key", "value"):
      yield f"e2.fusion.{j}.{name}.weight", (f"fusion_{j}", name, "kernel"), "linear"
      yield f"e2.fusion.{j}.{name}.bias", (f"fusion_{j}", name, "bias"), "same"
  for e in config.entities:
    yield f"e2.entity_norms.{e}.weight", (f"entity_{e}_norm", "scale"), "same"
    yield f"e2.entity_norms.{e}.bias", (f"entity_{e}_norm", "bias"), "same"
    yield f"e2.entity_projections.{e}.weight", (f"entity_{e}_projection", "kernel"), "linear"


def params_to_state(config: e2_lib.E2Config, params: Any) -> dict[str, np.ndarray]:
  """Flax E2 params (boxed or not, possibly sharded) -> the flat torch state dict (numpy)."""
  host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), nn.unbox(params))
  state = hf_clip.params_to_hf_state(config.clip, e2_lib.clip_part(host))
  vision = host["vision"]
  for key, path, kind in _new_entries(config):
    x = vision
    for p in path:
      if p not in x:
        raise hf_io.CheckpointMismatchError(f"E2 params lack vision/{'/'.join(path)} for {key}.")
      x = x[p]
    state[key] = np.ascontiguousarray(x.T if kind == "linear" else x)
  extra = sorted(k for k in vision if e2_lib.is_new_param(k)
                 and not any(p[0] == k for _, p, _ in _new_entries(config)))
  if extra:
    raise hf_io.CheckpointMismatchError(f"E2 params hold {extra}, which this config lacks.")
  return state


def state_to_params(config: e2_lib.E2Config, state: dict[str, np.ndarray]) -> dict:
  """The flat state dict -> Flax E2 params (numpy), strict about keys and shapes."""
  clip_state = {k: v for k, v in state.items() if not k.startswith("e2.")}
  params = hf_clip.hf_state_to_params(config.clip, clip_state)
  expected = {}
  d, p = config.clip.vision.width, config.clip.projection_dim
  for key, path, kind in _new_entries(config):
    if path[0] == "selection_tokens":
      expected[key] = (config.num_selection_tokens, d)
    elif kind == "linear":
      expected[key] = (p, d) if "projection" in path[0] else (d, d)
    else:
      expected[key] = (d,)
  hf_io.check_state(expected, {k: v for k, v in state.items() if k.startswith("e2.")},
                    what="E2 additions")
  for key, path, kind in _new_entries(config):
    node = params["vision"]
    for q in path[:-1]:
      node = node.setdefault(q, {})
    x = np.asarray(state[key], np.float32)
    node[path[-1]] = np.ascontiguousarray(x.T if kind == "linear" else x)
  return params


def export_e2(out_dir: str, config: e2_lib.E2Config, params: Any, tokenizer: Optional[Any] = None,
              overwrite: bool = False) -> pathlib.Path:
  """Writes the export directory described in the module docstring."""
  state = params_to_state(config, params)  # Validate before touching the directory.
  out = hf_io.prepare_export_dir(out_dir, overwrite)
  hf_io.save_safetensors(state, str(out / WEIGHTS_FILE))
  (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
  hf_clip.save_clip(str(out / "clip"), config.clip, e2_lib.clip_part(nn.unbox(params)),
                    tokenizer=tokenizer, overwrite=overwrite)
  return out


def load_e2(path: str) -> tuple[e2_lib.E2Config, dict]:
  """(E2Config, Flax params) from an export directory."""
  root = pathlib.Path(path)
  if not (root / CONFIG_FILE).exists():
    raise FileNotFoundError(f"{root / CONFIG_FILE} not found: not an E2 export directory.")
  config = e2_lib.E2Config.from_dict(json.loads((root / CONFIG_FILE).read_text()))
  return config, state_to_params(config, hf_io.read_safetensors(root / WEIGHTS_FILE))


@functools.lru_cache(maxsize=None)
def _torch_module_class():
  """E2Torch, defined lazily so that importing this file does not import torch."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  class FusionTorch(torch.nn.Module):

    def __init__(self, width):
      super().__init__()
      self.query = torch.nn.Linear(width, width)
      self.key = torch.nn.Linear(width, width)
      self.value = torch.nn.Linear(width, width)

    def forward(self, sel, patches):
      sim = self.query(sel) @ self.key(patches).transpose(1, 2) / (sel.shape[-1] ** 0.5)
      w = torch.nn.functional.one_hot(sim.argmax(-1), patches.shape[1]).to(sel.dtype)
      return (w @ self.value(patches) + sel) / 2, w

  class E2Torch(torch.nn.Module):
    """E2 in torch (evaluation forward). Attributes mirror CLIPModel + `e2` (the additions)."""

    def __init__(self, config: e2_lib.E2Config):
      super().__init__()
      self.config = config
      hf_config = config.clip.to_hf()
      clip = transformers.CLIPModel._from_config(hf_config, attn_implementation="eager")  # pylint: disable=protected-access
      self.text_model = clip.text_model
      self.vision_model = clip.vision_model
      self.visual_projection = clip.visual_projection
      self.text_projection = clip.text_projection
      self.logit_scale = clip.logit_scale
      d, p = config.clip.vision.width, config.clip.projection_dim
      eps = config.clip.vision.layer_norm_eps
      self.e2 = torch.nn.Module()
      self.e2.selection_tokens = torch.nn.Parameter(torch.zeros(config.num_selection_tokens, d))
      self.e2.fusion = torch.nn.ModuleList([FusionTorch(d) for _ in config.fusion_after])
      self.e2.entity_norms = torch.nn.ModuleDict(
          {e: torch.nn.LayerNorm(d, eps=eps) for e in config.entities})
      self.e2.entity_projections = torch.nn.ModuleDict(
          {e: torch.nn.Linear(d, p, bias=False) for e in config.entities})

    @classmethod
    def from_pretrained(cls, path: str) -> "E2Torch":
      root = pathlib.Path(path)
      config = e2_lib.E2Config.from_dict(json.loads((root / CONFIG_FILE).read_text()))
      state = hf_io.read_safetensors(root / WEIGHTS_FILE, framework="pt")
      model = cls(config)
      buffers = {k for k, _ in model.named_buffers()}
      missing, unexpected = model.load_state_dict(state, strict=False)
      missing = [k for k in missing if k not in buffers]
      if missing or unexpected:
        raise hf_io.CheckpointMismatchError(
            f"{root / WEIGHTS_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]}.")
      return model.eval()

    def encode_image(self, pixel_values):
      """-> {'embedding' [B, P], 'entity_embeddings' [B, E, P], 'tokens', 'selections'}."""
      cfg = self.config
      vm = self.vision_model
      x = vm.embeddings(pixel_values)  # [B, 1 + N, D]: CLS + patches + positions.
      b, n = x.shape[0], x.shape[1] - 1
      s = cfg.num_selection_tokens
      if s:
        x = torch.cat([x, self.e2.selection_tokens[None].expand(b, -1, -1)], dim=1)
      x = vm.pre_layrnorm(x)
      done, selections = 0, []
      for j, after in enumerate(cfg.fusion_after):
        for layer in vm.encoder.layers[done:after]:
          x = layer(x, None)
        done = after
        sel, w = self.e2.fusion[j](x[:, x.shape[1] - s:], x[:, 1:1 + n])
        selections.append(w)
        x = torch.cat([x[:, :1], sel] if j == len(cfg.fusion_after) - 1
                      else [x[:, :1 + n], sel], dim=1)
      for layer in vm.encoder.layers[done:]:
        x = layer(x, None)
      out = {"tokens": x,
             "embedding": self.visual_projection(vm.post_layernorm(x[:, 0]))}
      if s:
        sel_out = x[:, x.shape[1] - s:]
        out["entity_embeddings"] = torch.stack([
            self.e2.entity_projections[e](self.e2.entity_norms[e](
                sel_out[:, start:stop].mean(1))) for e, start, stop in cfg.entity_slices()],
                                               dim=1)
      if selections:
        out["selections"] = torch.stack(selections)
      return out

    def encode_text(self, input_ids):
      """[..., L] -> [..., P] (not normalised)."""
      flat = input_ids.reshape(-1, input_ids.shape[-1])
      pooled = self.text_model(input_ids=flat).pooler_output
      return self.text_projection(pooled).reshape(*input_ids.shape[:-1], -1)

    def forward(self, pixel_values, input_ids, tag_ids=None):
      """The Flax E2Model's outputs (L2-normalised embeddings, logit scale exp(param))."""
      norm = lambda t: t / t.norm(dim=-1, keepdim=True)
      v = self.encode_image(pixel_values)
      out = {"image_embeds": norm(v["embedding"]), "text_embeds": norm(self.encode_text(input_ids)),
             "logit_scale": self.logit_scale.exp()}
      if "entity_embeddings" in v:
        out["entity_image_embeds"] = norm(v["entity_embeddings"])
      if tag_ids is not None:
        out["entity_text_embeds"] = norm(self.encode_text(tag_ids))
      return out

  return E2Torch


def __getattr__(name):
  if name == "E2Torch":
    return _torch_module_class()
  raise AttributeError(name)
