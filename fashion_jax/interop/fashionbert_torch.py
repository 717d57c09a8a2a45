"""FashionBERT export: transformers BertModel (+ ResNetModel) + a small torch module of ours.

Export directory (`export_fashionbert(...)`):
  bert/        transformers BertModel (config.json, model.safetensors; encoder, embeddings,
               pooler) written by interop/hf_bert.export_hf_bert, loadable on its own;
  cnn/         transformers ResNetModel (config.json, model.safetensors) of the patch CNN;
               absent for a model with pooled-pixel patches (model.cnn_variant='pixels', the
               smoke configs' default), whose patch features have no parameters;
  fashionbert.safetensors   the parts BertModel has no place for, torch layout:
               patch_proj.{weight [D, F], bias [D]}, patch_position.weight [P, D],
               mpm_head.{weight [F, D], bias [F]}, align_head.{weight [2, D], bias [2]},
               mlm.{transform.weight, transform.bias, norm.weight, norm.bias, bias}
               (the MLM decoder is tied to bert's word embeddings);
  fashionbert.json          {grid, image_size, feature_dim, act, layer_norm_eps, pixel_pool}
               (pixel_pool is null when cnn/ holds the patch network).

`FashionBertTorch` reproduces the Flax forward (models/fashionbert.py) from those files:
  features = ResNetModel(normalise(patches)).pooler_output        [B, P, F]
             or, without cnn/, each normalised patch average-pooled to q x q cells, flattened
             in (row, col, channel) order (F = 3 q^2, q = pixel_pool)
  e_txt = word + position + token_type[0];  e_img = patch_proj(f) + patch_position + token_type[1]
  h = BertModel.encoder(Dropout(LayerNorm([e_txt ; e_img])), additive key mask)
  align = align_head(BertModel.pooler(h)), mlm / mpm heads as in Flax.
BertModel's own forward cannot take the image tokens (it adds its positions to every input
embedding), so the module runs BertModel's embeddings LayerNorm, encoder and pooler directly,
with eager attention and an additive [B, 1, 1, L] mask (BERT's extended mask).
"""

import json
import os
import pathlib
from typing import Union

import flax
import flax.linen as nn
import jax
import numpy as np

from fashion_jax.interop import hf_bert
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_resnet
from fashion_jax.models import fashionbert as fb_lib


def extra_state(params, model: fb_lib.FashionBert) -> dict[str, np.ndarray]:
  """The non-BertModel, non-CNN arrays of `params` (the 'params' collection) in torch layout."""
  p = jax.device_get(nn.unbox(flax.core.unfreeze(params)))
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {
      "patch_proj.weight": f32(p["patch_proj"]["kernel"].T),
      "patch_proj.bias": f32(p["patch_proj"]["bias"]),
      "patch_position.weight": f32(p["patch_position"]["embedding"]),
      "mpm_head.weight": f32(p["mpm_head"]["kernel"].T),
      "mpm_head.bias": f32(p["mpm_head"]["bias"]),
      "align_head.weight": f32(p["align_head"]["kernel"].T),
      "align_head.bias": f32(p["align_head"]["bias"]),
      "mlm.transform.weight": f32(p["bert"]["mlm_transform"]["kernel"].T),
      "mlm.transform.bias": f32(p["bert"]["mlm_transform"]["bias"]),
      "mlm.norm.weight": f32(p["bert"]["mlm_norm"]["scale"]),
      "mlm.norm.bias": f32(p["bert"]["mlm_norm"]["bias"]),
      "mlm.bias": f32(p["bert"]["mlm_bias"]),
  }
  del model
  return out


def export_fashionbert(variables, model: fb_lib.FashionBert, out_dir: Union[str, os.PathLike],
                       *, image_size: int, tokenizer=None, overwrite: bool = False
                       ) -> pathlib.Path:
  """Writes the export directory described in the module docstring.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of `model` (System.init's tree).
    model: the FashionBert module.
    out_dir: target directory (empty or absent unless overwrite).
    image_size: the side S of the images the model was trained on (S % grid == 0).
    tokenizer: optional tokenizer (object with save_pretrained, or a directory) saved in bert/.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  if image_size % model.grid:
    raise ValueError(f"image_size={image_size} is not divisible by grid={model.grid}.")
  if model.cnn is None and (image_size // model.grid) % model.pixel_pool:
    raise ValueError(f"pixel_pool={model.pixel_pool} must divide the patch side "
                     f"{image_size // model.grid}.")
  if model.bert.scan:
    raise ValueError("Export an unscanned model (model.scan=False); convert with "
                     "models.layers.unstack_layers first.")
  variables = jax.device_get(nn.unbox(flax.core.unfreeze(variables)))
  extra = extra_state(variables["params"], model)  # Validate before touching the directory.
  out = hf_io.prepare_export_dir(str(out_dir), overwrite)
  hf_bert.export_hf_bert(variables["params"]["bert"], model.bert, out / "bert",
                         tokenizer=tokenizer, architecture="BertModel", overwrite=overwrite)
  if model.cnn is not None:
    cnn_vars = {"params": variables["params"]["cnn"],
                "batch_stats": variables["batch_stats"]["cnn"]}
    hf_io.prepare_export_dir(str(out / "cnn"), overwrite)
    transformers.ResNetConfig(**hf_resnet.hf_config_dict(model.cnn)).save_pretrained(
        str(out / "cnn"))
    hf_io.save_safetensors(hf_resnet.export_resnet_state(cnn_vars, model.cnn),
                           out / "cnn" / "model.safetensors")
  hf_io.save_safetensors(extra, out / "fashionbert.safetensors")
  meta = dict(grid=model.grid, image_size=image_size, feature_dim=model.feature_dim,
              act=model.bert.act, layer_norm_eps=model.bert.layer_norm_eps,
              pixel_pool=None if model.cnn is not None else model.pixel_pool)
  (out / "fashionbert.json").write_text(json.dumps(meta, indent=2))
  return out


def load_fashionbert_torch(export_dir: Union[str, os.PathLike]):
  """An export directory -> FashionBertTorch in eval mode (float32)."""
  import transformers  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(export_dir)
  meta = json.loads((d / "fashionbert.json").read_text())
  meta.setdefault("pixel_pool", None)  # Exports written before the pooled-pixel path.
  pixels = meta["pixel_pool"] is not None
  for sub in ("bert",) + (() if pixels else ("cnn",)):
    hf_io.check_model_dir(d / sub)  # A truncated file names itself (transformers' error does not).
  state = hf_io.read_safetensors(d / "fashionbert.safetensors", framework="pt")
  bert = transformers.BertModel.from_pretrained(str(d / "bert"), attn_implementation="eager")
  cnn = None if pixels else transformers.ResNetModel.from_pretrained(str(d / "cnn"))
  module = FashionBertTorch(bert, cnn, **meta)
  missing, unexpected = module.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.startswith(("bert.", "cnn."))]
  if missing or unexpected:
    raise hf_io.CheckpointMismatchError(
        f"fashionbert.safetensors: missing {missing}, unexpected {unexpected}.")
  return module.eval()


def _torch_module_class():
  import torch  # pylint: disable=g-import-not-at-top

  class _FashionBertTorch(torch.nn.Module):
    """The Flax FashionBert forward in torch (see the module docstring)."""

    def __init__(self, bert, cnn, *, grid: int, image_size: int, feature_dim: int, act: str,
                 layer_norm_eps: float, pixel_pool: int | None = None):
      super().__init__()
      d = bert.config.hidden_size
      if (cnn is None) != (pixel_pool is not None):
        raise ValueError("Pass exactly one of cnn (a ResNetModel) and pixel_pool (pooled pixels).")
      self.bert, self.cnn, self.pixel_pool = bert, cnn, pixel_pool
      self.grid, self.image_size, self.feature_dim = grid, image_size, feature_dim
      self.patch_proj = torch.nn.Linear(feature_dim, d)
      self.patch_position = torch.nn.Embedding(grid * grid, d)
      self.mpm_head = torch.nn.Linear(d, feature_dim)
      self.align_head = torch.nn.Linear(d, 2)
      self.mlm = torch.nn.Module()
      self.mlm.transform = torch.nn.Linear(d, d)
      self.mlm.norm = torch.nn.LayerNorm(d, eps=layer_norm_eps)
      self.mlm.bias = torch.nn.Parameter(torch.zeros(bert.config.vocab_size))
      self.act = {"gelu": torch.nn.functional.gelu,
                  "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                  "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[act]
      self.register_buffer("mean", torch.tensor(fb_lib.IMAGENET_MEAN).view(1, 3, 1, 1),
                           persistent=False)
      self.register_buffer("std", torch.tensor(fb_lib.IMAGENET_STD).view(1, 3, 1, 1),
                           persistent=False)

    def patch_features(self, images):
      """uint8 [B, S, S, 3] -> [B, P, F]."""
      b, s = images.shape[0], images.shape[1]
      g, p = self.grid, s // self.grid
      x = images.float().permute(0, 3, 1, 2) / 255.0
      x = (x - self.mean) / self.std                                       # [B, 3, S, S]
      x = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, 3, p, p)
      if self.cnn is None:  # q x q cell means, flattened (row, col, channel) as in Flax.
        q = self.pixel_pool
        cells = x.reshape(b * g * g, 3, q, p // q, q, p // q).mean(dim=(3, 5))  # [B P, 3, q, q]
        return cells.permute(0, 2, 3, 1).reshape(b, g * g, 3 * q * q)
      pooled = self.cnn(pixel_values=x).pooler_output                    # [B P, F, 1, 1]
      return pooled.reshape(b, g * g, -1)

    def forward(self, input_ids, attention_mask, images=None, features=None, patch_mask=None):
      """-> dict(hidden [B, L+P, D], align_logits [B, 2], features [B, P, F])."""
      if features is None:
        features = self.patch_features(images)
      if patch_mask is not None:
        features = features.masked_fill(patch_mask[..., None], 0.0)
      emb = self.bert.embeddings
      b, l = input_ids.shape
      pos = torch.arange(l, device=input_ids.device)[None]
      e_txt = (emb.word_embeddings(input_ids) + emb.position_embeddings(pos)
               + emb.token_type_embeddings(torch.zeros_like(input_ids)))
      n = features.shape[1]
      seg = emb.token_type_embeddings(torch.ones(1, 1, dtype=torch.long))
      e_img = (self.patch_proj(features) + self.patch_position(torch.arange(n)[None]) + seg)
      x = emb.dropout(emb.LayerNorm(torch.cat([e_txt, e_img], dim=1)))
      mask = torch.cat([attention_mask.bool(), torch.ones(b, n, dtype=torch.bool)], dim=1)
      additive = (~mask)[:, None, None, :].float() * torch.finfo(torch.float32).min
      hidden = self.bert.encoder(x, attention_mask=additive).last_hidden_state
      align = self.align_head(self.bert.pooler(hidden))
      return {"hidden": hidden, "align_logits": align, "features": features}

    def mlm_logits(self, hidden):
      h = self.mlm.norm(self.act(self.mlm.transform(hidden)))
      return h @ self.bert.embeddings.word_embeddings.weight.T + self.mlm.bias

    def mpm_predict(self, hidden):
      return self.mpm_head(hidden)

  return _FashionBertTorch


def FashionBertTorch(bert, cnn, **kwargs):  # pylint: disable=invalid-name
  """Builds the torch module (torch is imported lazily: the library does not require it)."""
  return _torch_module_class()(bert, cnn, **kwargs)
