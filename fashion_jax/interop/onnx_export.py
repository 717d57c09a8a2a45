"""ONNX export of the image and text towers of FashionCLIP and SigLIP (dynamic batch).

  export_clip / export_siglip(out_dir, config, params, tokenizer=None, overwrite=False, ...)
  export_system(system, params, out_dir, overwrite=False)     (launch.export --format=onnx)

Writes image_encoder.onnx (pixel_values float32 NCHW [batch, 3, S, S], normalised RGB),
text_encoder.onnx (input_ids int64 [batch, length]; CLIP 2 <= length <= max_len, SigLIP
length == max_len), preprocess.json (the contract: resize rule, mean / std, token ids, padding,
pooling, logit_scale, logit_bias) and, given a tokenizer, its files and the transformers image
processor. Both outputs [batch, D] are L2-NORMALISED (x / ||x||, as encode_images /
encode_texts), so similarity is a dot product. The full contract: docs/onnx.md.

Route: our params -> the transformers CLIPModel / SiglipModel they map to exactly (hf_clip /
hf_siglip, in memory) -> torch.onnx.export, dynamo exporter (torch.export + onnxscript), opset
OPSET, weights inside each file (a tower may not exceed 2 GB). jax2onnx matches as well but its
only release pins orbax-checkpoint<0.11.37, which cannot be installed beside our pin.
"""

import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_siglip
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import siglip as siglip_lib

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
ONNX_EXPORT_FILES = (IMAGE_FILE, TEXT_FILE, PREPROCESS_FILE)
FORMATS = ("hf", "onnx")  # launch.export --format.
PREPROCESS_VERSION = 1
OPSET = 20  # Pinned (torch 2.13's default), so a torch upgrade does not change the files.


def check_format(name: str) -> str:
  """`name` if it is an export format (FORMATS), else ValueError naming it and the choices."""
  if name not in FORMATS:
    raise ValueError(f"Unknown export format {name!r}; expected one of {list(FORMATS)}.")
  return name


def _normalized_tower(torch, encoder, projection, input_name: str):
  """A torch module: x -> projection(encoder(**{input_name: x}).pooler_output), L2-normalised
  as models.clip.l2_normalize (x / ||x||, no epsilon). projection None = identity."""

  class Tower(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.encoder = encoder
      self.projection = projection if projection is not None else torch.nn.Identity()

    def forward(self, x):
      e = self.projection(self.encoder(**{input_name: x}).pooler_output)
      return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)

  return Tower().eval()


def _load_torch(model_cls, hf_config, state: dict) -> Any:
  """`model_cls(hf_config)` (eval, float32) holding `state`; every weight must be taken."""
  import torch  # pylint: disable=g-import-not-at-top
  model = model_cls(hf_config).eval()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                 strict=False)
  missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
  if missing or result.unexpected_keys:  # Unreachable while the key maps are complete.
    raise hf_io.CheckpointMismatchError(
        f"{model_cls.__name__} did not take every weight: missing {missing[:10]}, unexpected "
        f"{result.unexpected_keys[:10]}.")
  return model


def _export_towers(out: pathlib.Path, image, text, image_size: int, text_len: int,
                   dynamic_length: bool, example_row: Sequence[int]) -> None:
  """Writes IMAGE_FILE and TEXT_FILE: torch.onnx.export (dynamo), batch (and length) dynamic.

  Example batches have 2 rows: torch.export specialises a dimension whose example size is 0/1.
  """
  import torch  # pylint: disable=g-import-not-at-top
  batch = torch.export.Dim("batch", min=1)
  ids = torch.tensor([list(example_row)] * 2, dtype=torch.long)
  text_dims = {0: batch}
  if dynamic_length and text_len > 2:  # torch.export refuses a Dim with min == max.
    text_dims[1] = torch.export.Dim("length", min=2, max=text_len)
  for module, example, path, names, dims in (
      (image, torch.zeros(2, 3, image_size, image_size), IMAGE_FILE,
       ("pixel_values", "image_embeds"), {0: batch}),
      (text, ids, TEXT_FILE, ("input_ids", "text_embeds"), text_dims)):
    with torch.no_grad():
      torch.onnx.export(module, (example,), str(out / path), input_names=[names[0]],
                        output_names=[names[1]], dynamic_shapes={"x": dims}, dynamo=True,
                        external_data=False, opset_version=OPSET, verbose=False)


def _contract(model: str, dim: int, vision, text, *, resize: str, text_length: dict[str, int],
              row: str, pooling: str, tokenizer: Optional[Any], logit_scale: float,
              logit_bias: Optional[float], extra: Optional[dict] = None) -> dict[str, Any]:
  """preprocess.json's content (module docstring)."""
  s = vision.image_size
  return {
      "version": PREPROCESS_VERSION,
      "model": model,
      "opset": OPSET,
      "embedding_dim": dim,
      "logit_scale": logit_scale,
      "logit_bias": logit_bias,
      "similarity": "logit_scale * image_embeds @ text_embeds.T"
                    + (" + logit_bias" if logit_bias is not None else "")
                    + " (both L2-normalised)",
      **(extra or {}),
      "image": {
          "file": IMAGE_FILE,
          "input": {"name": "pixel_values", "dtype": "float32", "layout": "NCHW",
                    "shape": ["batch", 3, s, s], "channels": "RGB"},
          "output": {"name": "image_embeds", "dtype": "float32", "shape": ["batch", dim],
                     "l2_normalized": True},
          "preprocessing": {"size": s, "resize": resize,
                            "formula": "(pixel / 255 - mean) / std, pixel uint8 RGB",
                            "mean": list(vision.image_mean), "std": list(vision.image_std)},
      },
      "text": {
          "file": TEXT_FILE,
          "input": {"name": "input_ids", "dtype": "int64", "shape": ["batch", "length"],
                    **text_length},
          "output": {"name": "text_embeds", "dtype": "float32", "shape": ["batch", dim],
                     "l2_normalized": True},
          "preprocessing": {
              "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
              "tokenizer_files": "this directory" if tokenizer is not None else None,
              "vocab_size": text.vocab_size, "bos_token_id": text.bos_token_id,
              "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
              "row": row, "pooling": pooling},
      },
  }


def _finish(out: pathlib.Path, contract: dict, tokenizer: Optional[Any], processor) -> None:
  (out / PREPROCESS_FILE).write_text(json.dumps(contract, indent=2) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
    processor.save_pretrained(str(out))


def export_clip(out_dir: str, config: clip_lib.CLIPConfig, params: Any,
                tokenizer: Optional[Any] = None, overwrite: bool = False,
                logit_bias: Optional[float] = None,
                matryoshka_dims: Sequence[int] = ()) -> pathlib.Path:
  """Writes a CLIP's two towers as ONNX to `out_dir`; see the module docstring.

  `params`: CLIPModel's 'params' (boxed or not, per-layer or scanned, host or device arrays).
  `tokenizer`: a transformers tokenizer, saved beside the models with CLIP's image processor.
  `logit_bias`: a sigmoid-trained CLIP's bias (recorded in preprocess.json). The params are
  checked before the directory is touched; the directory follows hf_io.prepare_export_dir (a
  non-empty one is refused unless overwrite, which replaces only files an export writes).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = _load_torch(transformers.CLIPModel, config.to_hf(),
                      hf_clip.params_to_hf_state(config, params))
  out = hf_io.prepare_export_dir(out_dir, overwrite)
  v, t = config.vision, config.text
  _export_towers(
      out, _normalized_tower(torch, model.vision_model, model.visual_projection, "pixel_values"),
      _normalized_tower(torch, model.text_model, model.text_projection, "input_ids"),
      v.image_size, t.max_len, dynamic_length=True,
      example_row=[t.bos_token_id, t.eos_token_id] + [t.pad_token_id] * (t.max_len - 2))
  pooling = ("argmax(input_ids) (legacy eos_token_id 2)" if t.eos_token_id == 2
             else f"first position of eos_token_id {t.eos_token_id}")
  contract = _contract(
      "clip", config.projection_dim, v, t,
      resize="RGB; bicubic resize of the short side to size, centre crop size x size "
             "(CLIPProcessor, fashion_jax.api.resize_and_crop)",
      text_length={"min_length": 2, "max_length": t.max_len},
      row="BOS, tokens, EOS, then optional right padding with pad_token_id (anything after the "
          "first EOS is ignored); truncate keeping EOS last; no left padding",
      pooling=pooling, tokenizer=tokenizer,
      logit_scale=float(torch.exp(model.logit_scale.detach().double())),
      logit_bias=None if logit_bias is None else float(logit_bias),
      extra={"matryoshka_dims": list(matryoshka_dims)} if matryoshka_dims else None)
  _finish(out, contract, tokenizer, hf_clip.image_processor(config) if tokenizer else None)
  return out


def export_siglip(out_dir: str, config: siglip_lib.SiglipConfig, params: Any,
                  tokenizer: Optional[Any] = None, overwrite: bool = False,
                  matryoshka_dims: Sequence[int] = ()) -> pathlib.Path:
  """Writes a SigLIP's two towers as ONNX to `out_dir`; as export_clip (module docstring).

  The text input has a fixed length, max_len: SigLIP pools the last position.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = _load_torch(transformers.SiglipModel, config.to_hf(),
                      hf_siglip.params_to_hf_state(config, params))
  out = hf_io.prepare_export_dir(out_dir, overwrite)
  v, t = config.vision, config.text
  pad = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
  _export_towers(
      out, _normalized_tower(torch, model.vision_model, None, "pixel_values"),
      _normalized_tower(torch, model.text_model, None, "input_ids"),
      v.image_size, t.max_len, dynamic_length=False,
      example_row=[t.eos_token_id] + [pad] * (t.max_len - 1))
  contract = _contract(
      "siglip", config.projection_dim, v, t,
      resize="RGB; bicubic resize to size x size, no crop (SiglipImageProcessor)",
      text_length={"min_length": t.max_len, "max_length": t.max_len},
      row=f"the tokenizer's ids (EOS last), right-padded with pad_token_id to exactly "
          f"{t.max_len} (padding='max_length'); truncate to {t.max_len}; no attention mask",
      pooling=f"the last position ({t.max_len - 1})", tokenizer=tokenizer,
      logit_scale=float(torch.exp(model.logit_scale.detach().double()).reshape(())),
      logit_bias=float(model.logit_bias.detach().double().reshape(())),
      extra={"matryoshka_dims": list(matryoshka_dims)} if matryoshka_dims else None)
  _finish(out, contract, tokenizer, hf_siglip.image_processor(config) if tokenizer else None)
  return out


def export_system(system: Any, params: Any, out_dir: str, overwrite: bool = False
                  ) -> pathlib.Path:
  """ONNX export of a trained system's towers (launch.export --format=onnx).

  Supported: a system whose model is exactly CLIPModel or SiglipModel (fashionclip, either
  model.family), with `model_config` and `tokenizer.hf`. A top-level `logit_bias` beside a
  CLIP's params (the sigmoid loss on CLIP) goes to preprocess.json. Other systems raise
  ValueError naming the system: a subclass (E2) has an image tower CLIPModel cannot hold.
  """
  model = getattr(system, "model", None)
  tok = getattr(getattr(system, "tokenizer", None), "hf", None)
  dims = tuple(getattr(system, "matryoshka_dims", ()) or ())
  if type(model) is siglip_lib.SiglipModel:  # pylint: disable=unidiomatic-typecheck
    return export_siglip(out_dir, system.model_config, params, tokenizer=tok,
                         overwrite=overwrite, matryoshka_dims=dims)
  if type(model) is clip_lib.CLIPModel:  # pylint: disable=unidiomatic-typecheck
    bias = None
    if "logit_bias" in params:
      bias = float(np.asarray(params["logit_bias"]))
      params = {k: v for k, v in params.items() if k != "logit_bias"}
    return export_clip(out_dir, system.model_config, params, tokenizer=tok, overwrite=overwrite,
                       logit_bias=bias, matryoshka_dims=dims)
  name = getattr(getattr(system, "config", None), "system", type(system).__module__)
  raise ValueError(f"System {name!r} has no ONNX export: --format=onnx covers the plain CLIP "
                   f"and SigLIP dual encoders (fashionclip); use --format=hf for {name!r}.")


def load_session(path: str, threads: Optional[int] = None):
  """An onnxruntime CPU InferenceSession of one exported tower (checks, benchmarks).

  `threads` sets intra_op_num_threads (None = onnxruntime's default, one per core).
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  if threads:
    opts.intra_op_num_threads = threads
  return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
