"""FashionViL export: transformers BertModel + ResNetModel + a small torch module of ours.

Export directory (`export_fashionvil(...)`):
  bert/          the text/fusion BERT as a transformers BertModel (config.json,
                 model.safetensors, tokenizer files when given; interop/hf_bert.export_hf_bert),
                 loadable on its own: `BertModel(ids, mask).last_hidden_state` is FashionViL's
                 text pass, its masked mean the text vector;
  fusion_bert/   only for the no-sharing ablation: the fusion BERT, same layout;
  cnn/           the ResNet trunk as a transformers ResNetModel (inference-mode BatchNorm);
  fashionvil.safetensors   the parts neither has a place for, torch layout (Linear weight [out,
                 in] = Flax kernel^T):
                   image_proj.{weight [D, C], bias [D]}, visual_position [N, D], visual_type [D],
                   itm_head.{weight [2, D], bias}, mpfc.transform.{weight, bias},
                   mpfc.norm.{weight, bias}, mpfc.out.{weight [K, D], bias [K]},
                   pac_weight [D, A] (when A > 0), itc_scale [], mvc_scale [],
                   cls.predictions.{transform.dense.*, transform.LayerNorm.*, bias}: the fusion
                   BERT's MLM head under transformers' BertOnlyMLMHead keys (its decoder is tied
                   to the word embeddings, as ours);
  fashionvil.json          {num_patches, image_size, num_codes, num_attributes, shared}.

`FashionViLTorch` reproduces the Flax forward (models/fashionvil.py), at evaluation (no dropout):
  u = image_proj(flatten_hw(ResNetModel(normalise(images)).last_hidden_state))     [B, N, D]
  v = mean_n u;  w = masked mean of text_bert(ids, mask).last_hidden_state        [B, D]
  fusion: e = [word + position + type_0 ; u + visual_position + visual_type], then the fusion
  BERT's embedding LayerNorm, its encoder with an additive key mask [B, 1, 1, L + N] (eager
  attention) and its pooler for ITM; heads as in Flax (ITC/PAC cosines, MPFC MLP, tied MLM).
BertModel's own forward cannot take the image tokens (it adds its positions to every input
embedding), so the fusion pass runs BertModel's embeddings LayerNorm, encoder and pooler directly.
Only the ResNet image encoder is exported (the ViT option has no transformers counterpart here).
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
from fashion_jax.models import fashionvil as fvil
from fashion_jax.models import resnet as resnet_lib

META_FILE = "fashionvil.json"
EXTRA_FILE = "fashionvil.safetensors"
# (torch name, Flax module name) of the Dense layers outside the BERTs and the CNN.
_DENSE = (("image_proj", "image_proj"), ("itm_head", "itm_head"),
          ("mpfc.transform", "mpfc_transform"), ("mpfc.out", "mpfc_out"))


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, np.float32))


def extra_state(params, model: fvil.FashionViL) -> dict[str, np.ndarray]:
  """The 'params' collection's arrays outside the BERTs and the CNN, in torch layout."""
  p = params
  out = {}
  for torch_name, flax_name in _DENSE:
    out[f"{torch_name}.weight"] = _f32(p[flax_name]["kernel"].T)
    out[f"{torch_name}.bias"] = _f32(p[flax_name]["bias"])
  out["mpfc.norm.weight"] = _f32(p["mpfc_norm"]["scale"])
  out["mpfc.norm.bias"] = _f32(p["mpfc_norm"]["bias"])
  for name in ("visual_position", "visual_type", "itc_scale", "mvc_scale") + (
      ("pac_weight",) if model.num_attributes else ()):
    out[name] = _f32(p[name])
  fusion_name = "text_bert" if model.fusion_bert is None else "fusion_bert"
  fusion = model.text_bert if model.fusion_bert is None else model.fusion_bert
  mlm = hf_bert.export_bert_state(p[fusion_name], fusion, "BertForMaskedLM")
  out.update({k: v for k, v in mlm.items() if k.startswith("cls.")})
  return out


def export_fashionvil(variables, model: fvil.FashionViL, out_dir: Union[str, os.PathLike], *,
                      image_size: int, tokenizer=None, overwrite: bool = False) -> pathlib.Path:
  """Writes the export directory described in the module docstring.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of `model` (System.init's tree).
    model: the FashionViL module (a ResNet image encoder, unscanned BERTs with pooler).
    out_dir: target directory (empty or absent unless overwrite).
    image_size: the side S of the images the model was trained on.
    tokenizer: optional tokenizer (object with save_pretrained, or a directory) saved in bert/.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  if not isinstance(model.image_encoder, resnet_lib.ResNet):
    raise ValueError(f"Only a ResNet image encoder is exported, got "
                     f"{type(model.image_encoder).__name__}.")
  berts = {"bert": ("text_bert", model.text_bert)}
  if model.fusion_bert is not None:
    berts["fusion_bert"] = ("fusion_bert", model.fusion_bert)
  for _, bert in berts.values():
    if bert.scan:
      raise ValueError("Export an unscanned BERT (scan=False); convert with "
                       "models.layers.unstack_layers first.")
  variables = jax.device_get(nn.unbox(flax.core.unfreeze(variables)))
  params = variables["params"]
  extra = extra_state(params, model)  # Validate before touching the directory.
  out = hf_io.prepare_export_dir(str(out_dir), overwrite)
  for sub, (name, bert) in berts.items():
    hf_bert.export_hf_bert(params[name], bert, out / sub,
                           tokenizer=tokenizer if sub == "bert" else None,
                           architecture="BertModel", overwrite=overwrite)
  cnn = model.image_encoder
  hf_io.prepare_export_dir(str(out / "cnn"), overwrite)
  transformers.ResNetConfig(**hf_resnet.hf_config_dict(cnn)).save_pretrained(
      str(out / "cnn"))
  cnn_vars = {"params": params["image_encoder"],
              "batch_stats": variables["batch_stats"]["image_encoder"]}
  hf_io.save_safetensors(hf_resnet.export_resnet_state(cnn_vars, cnn),
                         out / "cnn" / "model.safetensors")
  hf_io.save_safetensors(extra, out / EXTRA_FILE)
  meta = dict(num_patches=model.num_patches, image_size=int(image_size),
              num_codes=model.num_codes, num_attributes=model.num_attributes,
              shared=model.fusion_bert is None)
  (out / META_FILE).write_text(json.dumps(meta, indent=2))
  return out


def load_fashionvil_torch(export_dir: Union[str, os.PathLike]):
  """An export directory -> FashionViLTorch in eval mode (float32), loaded strictly."""
  import transformers  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(export_dir)
  meta = json.loads((d / META_FILE).read_text())
  for sub in ("bert", "cnn") + (() if meta["shared"] else ("fusion_bert",)):
    hf_io.check_model_dir(d / sub)  # A truncated file names itself (transformers' error does not).
  state = hf_io.read_safetensors(d / EXTRA_FILE, framework="pt")
  load = lambda sub: transformers.BertModel.from_pretrained(str(d / sub),
                                                            attn_implementation="eager")
  text_bert = load("bert")
  fusion_bert = None if meta["shared"] else load("fusion_bert")
  cnn = transformers.ResNetModel.from_pretrained(str(d / "cnn"))
  module = FashionViLTorch(text_bert, fusion_bert, cnn, num_patches=meta["num_patches"],
                           num_codes=meta["num_codes"], num_attributes=meta["num_attributes"])
  missing, unexpected = module.load_state_dict(state, strict=False)
  tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
  missing = [k for k in missing
             if not k.startswith(("text_bert.", "fusion_bert.", "cnn.")) and k not in tied]
  if missing or unexpected:
    raise hf_io.CheckpointMismatchError(f"{EXTRA_FILE}: missing {missing}, unexpected "
                                        f"{unexpected}.")
  return module.eval()


def _torch_module_class():
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.bert import modeling_bert  # pylint: disable=g-import-not-at-top
  functional = torch.nn.functional

  def normalise(x):
    return x / torch.clamp(torch.linalg.norm(x, dim=-1, keepdim=True), min=1e-12)

  def masked_mean(x, mask):
    m = mask.float()[..., None]
    return (x * m).sum(1) / torch.clamp(m.sum(1), min=1.0)

  class _FashionViLTorch(torch.nn.Module):
    """The Flax FashionViL forward in torch (see the module docstring)."""

    def __init__(self, text_bert, fusion_bert, cnn, *, num_patches: int, num_codes: int,
                 num_attributes: int):
      super().__init__()
      self.text_bert, self.cnn = text_bert, cnn
      self.fusion_bert = fusion_bert
      fusion = self.fusion
      d, c = fusion.config.hidden_size, cnn.config.hidden_sizes[-1]
      self.num_patches = num_patches
      self.image_proj = torch.nn.Linear(c, d)
      self.visual_position = torch.nn.Parameter(torch.zeros(num_patches, d))
      self.visual_type = torch.nn.Parameter(torch.zeros(d))
      self.itm_head = torch.nn.Linear(d, 2)
      self.mpfc = torch.nn.Module()
      self.mpfc.transform = torch.nn.Linear(d, d)
      self.mpfc.norm = torch.nn.LayerNorm(d, eps=fusion.config.layer_norm_eps)
      self.mpfc.out = torch.nn.Linear(d, num_codes)
      self.pac_weight = (torch.nn.Parameter(torch.zeros(d, num_attributes))
                         if num_attributes else None)
      self.itc_scale = torch.nn.Parameter(torch.zeros(()))
      self.mvc_scale = torch.nn.Parameter(torch.zeros(()))
      self.cls = modeling_bert.BertOnlyMLMHead(fusion.config)
      self.cls.predictions.decoder.weight = fusion.embeddings.word_embeddings.weight
      self.cls.predictions.decoder.bias = self.cls.predictions.bias
      self.register_buffer("mean", torch.tensor(fvil.IMAGENET_MEAN).view(1, 3, 1, 1),
                           persistent=False)
      self.register_buffer("std", torch.tensor(fvil.IMAGENET_STD).view(1, 3, 1, 1),
                           persistent=False)

    @property
    def fusion(self):
      return self.text_bert if self.fusion_bert is None else self.fusion_bert

    # --- unimodal passes ------------------------------------------------------------------------
    def image_tokens(self, images, patch_mask=None):
      """uint8 [B, S, S, 3] (, bool [B, N], True = zero the patch) -> u [B, N, D]."""
      x = (images.float().permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std
      grid = self.cnn(pixel_values=x).last_hidden_state                  # [B, C, h, w]
      feats = grid.flatten(2).transpose(1, 2)                              # [B, h w, C]
      if feats.shape[1] != self.num_patches:
        raise ValueError(f"{tuple(images.shape)} images give {feats.shape[1]} patches, the "
                         f"model has {self.num_patches}.")
      if patch_mask is not None:
        feats = feats.masked_fill(patch_mask[..., None].bool(), 0.0)
      return self.image_proj(feats)

    def text_hidden(self, ids, mask):
      """ids, mask [B, L] -> [B, L, D]: BertModel's own forward."""
      return self.text_bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def encode_images(self, images):
      """uint8 [B, S, S, 3] -> L2-normalised image vectors [B, D] (the ITC embeddings)."""
      return normalise(self.image_tokens(images).mean(1))

    def encode_texts(self, ids, mask):
      """ids, mask [B, L] -> L2-normalised text vectors [B, D]."""
      return normalise(masked_mean(self.text_hidden(ids, mask), mask))

    # --- fusion ---------------------------------------------------------------------------------
    def fuse(self, ids, text_mask, tokens, image_keep=None):
      """[text ; image tokens] -> fusion hidden [B, L + N, D]; image_keep [B, N] masks keys."""
      bert = self.fusion
      emb = bert.embeddings
      b, length = ids.shape
      pos = torch.arange(length, device=ids.device)[None]
      e_txt = (emb.word_embeddings(ids) + emb.position_embeddings(pos)
               + emb.token_type_embeddings(torch.zeros_like(ids)))
      e_img = tokens + self.visual_position[None] + self.visual_type
      x = emb.dropout(emb.LayerNorm(torch.cat([e_txt, e_img], dim=1)))
      if image_keep is None:
        image_keep = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=ids.device)
      keys = torch.cat([text_mask.bool(), image_keep.bool()], dim=1)
      additive = (~keys)[:, None, None, :].float() * torch.finfo(torch.float32).min
      return bert.encoder(x, attention_mask=additive).last_hidden_state

    def itm_logits(self, hidden):
      return self.itm_head(self.fusion.pooler(hidden))

    def mlm_logits(self, text_hidden):
      return self.cls(text_hidden)

    def mpfc_logits(self, image_hidden):
      h = self.mpfc.norm(functional.gelu(self.mpfc.transform(image_hidden)))
      return self.mpfc.out(h)

    def pac_logits(self, x):
      if self.pac_weight is None:
        raise ValueError("num_attributes=0: this model has no PAC head.")
      w = self.pac_weight / torch.clamp(torch.linalg.norm(self.pac_weight, dim=0, keepdim=True),
                                        min=1e-12)
      return normalise(x) @ w

    def forward(self, images, ids, mask, patch_mask=None, image_keep=None):
      """-> {'image', 'text' [B, D] (unnormalised vectors), 'hidden' [B, L + N, D], 'fused'
      [B, D] (mean over kept image positions), 'itm' [B, 2], 'mlm' [B, L, V], 'mpfc' [B, N, K],
      'pac' [B, A] of the image vector (A > 0)}. patch_mask zeroes patches in the fusion pass
      only (MPFC); the unimodal image vector always sees the whole image."""
      u = self.image_tokens(images)
      out = {"image": u.mean(1), "text": masked_mean(self.text_hidden(ids, mask), mask)}
      tokens = u if patch_mask is None else self.image_tokens(images, patch_mask)
      hidden = self.fuse(ids, mask, tokens, image_keep)
      length = ids.shape[1]
      keep = (torch.ones(hidden.shape[0], self.num_patches, dtype=torch.bool)
              if image_keep is None else image_keep)
      out.update(hidden=hidden, fused=masked_mean(hidden[:, length:], keep),
                 itm=self.itm_logits(hidden), mlm=self.mlm_logits(hidden[:, :length]),
                 mpfc=self.mpfc_logits(hidden[:, length:]))
      if self.pac_weight is not None:
        out["pac"] = self.pac_logits(out["image"])
      return out

  return _FashionViLTorch


def FashionViLTorch(text_bert, fusion_bert, cnn, **kwargs):  # pylint: disable=invalid-name
  """Builds the torch module (torch is imported lazily: the library does not require it).

  text_bert / fusion_bert: transformers BertModel (fusion_bert None = shared); cnn: ResNetModel.
  """
  return _torch_module_class()(text_bert, fusion_bert, cnn, **kwargs)
