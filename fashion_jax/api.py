"""A small public API for notebooks and scripts: CLIP / SigLIP embeddings and zero-shot scoring.

  model = load("path/or/hub_id")          # FashionCLIP or FashionSigLIP, by what the dir holds
  img = model.encode_images(["a.jpg", pil_image, uint8_array])  # [N, P] L2-normalised numpy
  txt = model.encode_text(["red dress", "black shoes"])         # [M, P] L2-normalised numpy
  small = model.encode_text(["red dress"], dim=64)              # [M, 64]: Matryoshka prefix
  probs = model.zero_shot_classify(images, ["dress", "shoe"])   # [N, K]
  cls = model.class_embeddings(["dress", "shoe"])               # [K, P], the prompts' average
  model.save_pretrained("out_dir")        # transformers CLIPModel / SiglipModel layout
  fclip = FashionCLIP.from_pretrained("path/to/hf_clip_dir")    # CLIP only, as before

What `load` (= DualEncoder.from_pretrained) reads, checked in this order:
  1. a fashion_jax training workdir (checkpoints/ + config.json): its newest checkpoint;
  2. an open_clip directory (open_clip_config.json; interop/open_clip.py converts it to the
     transformers layout): checked BEFORE config.json because a hub repo such as
     Marqo/marqo-fashionSigLIP also holds a custom-code config.json (model_type 'siglip' with
     `auto_map`) that is not a SiglipModel; remote code is never run;
  3. a transformers directory (config.json): model_type 'clip' -> FashionCLIP, 'siglip'
     -> FashionSigLIP; anything else (a custom-code config included) is a ValueError naming it.
A string that is no local directory is fetched from the HF hub where the network allows.
FashionCLIP.from_pretrained / FashionSigLIP.from_pretrained load only their own kind.

Images (`encode_images`): a list (or a single item) of file paths, PIL images or uint8 arrays
[H, W, 3] / [H, W] of any size, or a uint8 array [N, H, W, 3]. RGB, then resized to the model's
image_size S like its processor:
  CLIP ('shortest'): bicubic resize of the short side to S (long side int(S * long / short)),
    centre crop (transformers' CLIPProcessor);
  SigLIP ('squash'): bicubic resize to S x S, aspect ratio not kept, no crop
    (SiglipImageProcessor);
then /255 and the model's mean/std on the device (CLIP's statistics, 0.5 / 0.5 for SigLIP; an
open_clip directory's preprocess_cfg sets mean, std, interpolation and resize mode). A FLOAT
array is taken as already-preprocessed pixel values and must be 4-D, [N, 3, S, S] (the
processors' channels-first output) or [N, S, S, 3]; a dimension 1 of size 3 means channels-first.

Texts (`encode_text`) go through the checkpoint's own tokenizer (AutoTokenizer from the
directory; an open_clip directory without one names its hub tokenizer), truncated to the
model's context like the tokenizer does (BOS ... EOS kept):
  CLIP: padded to the context, and the attention mask is passed (causal; EOS pooling);
  SigLIP: padded to the context (64) with the tokenizer's pad id, which for SigLIP's
    tokenizer is the EOS id, and NO attention mask: the model pools the last token and was
    trained on such EOS-padded, unmasked text (transformers' docs: padding="max_length").
An open_clip directory's text cleaning ('canonicalize', 'lower', 'whitespace') is applied before
tokenizing (open_clip.clean_text).

Zero-shot scoring uses evaluate/prompts.py, the one definition the zero-shot evaluator and the
configs' zero-shot evaluations use too: each label's class embedding is the re-normalised average
of the normalised embeddings of its prompts (prompts.TEMPLATES = "a photo of a {}" and the bare
label), and with z = logit_scale * cos(image, class):
  CLIP:   probs = softmax(z) over the labels (each row sums to 1);
  SigLIP: probs = sigmoid(z + logit_bias), one independent probability per label (rows do NOT
          sum to 1): how SigLIP was trained and how transformers' SiglipModel is read.
The scale (and bias) are the model's own.

Matryoshka (`dim=m` of encode_images / encode_text): the first m coordinates, re-L2-normalised
(losses.matryoshka.truncate_and_normalize, the trainer's and the evaluator's cut; without
normalize, the raw prefix). `model.matryoshka_dims` lists the widths the model was trained at
(0 = full): from a workdir its config's model.matryoshka_dims, from an exported directory the
`matryoshka_dims` key launch.export writes into config.json; None where nothing records them
(an open_clip or third-party directory). Any m in [1, P] is allowed: a prefix the model was not
trained at is usable but weaker.
"""

import dataclasses
import os
import pathlib
from typing import Any, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.evaluate import prompts
from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_siglip
from fashion_jax.interop import open_clip as open_clip_lib
from fashion_jax.losses import matryoshka
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import siglip as siglip_lib
from fashion_jax.train import restore

RESIZE_MODES = ("shortest", "squash")
_INTERPOLATIONS = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}  # PIL.Image codes.


def _load_tokenizer(path: pathlib.Path):
  """The tokenizer saved in an HF directory, or None when there is none."""
  names = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "spiece.model")
  if not any((path / n).exists() for n in names):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(path))


def _resample(interpolation: str) -> int:
  if interpolation not in _INTERPOLATIONS:
    raise ValueError(f"Unknown interpolation {interpolation!r}; expected one of "
                     f"{sorted(_INTERPOLATIONS)}.")
  return _INTERPOLATIONS[interpolation]


def resize_and_crop(image, size: int, interpolation: str = "bicubic") -> np.ndarray:
  """PIL image -> uint8 [size, size, 3]: RGB, short side -> size, centre crop (CLIP)."""
  image = image.convert("RGB")
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  image = image.resize((new_w, new_h), resample=_resample(interpolation))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(image, np.uint8)[top:top + size, left:left + size]


def resize_squash(image, size: int, interpolation: str = "bicubic") -> np.ndarray:
  """PIL image -> uint8 [size, size, 3]: RGB, resized to size x size, no crop (SigLIP)."""
  image = image.convert("RGB").resize((size, size), resample=_resample(interpolation))
  return np.asarray(image, np.uint8)


class DualEncoder:
  """Inference with an image tower and a text tower; see the module docstring.

  Subclasses (FashionCLIP, FashionSigLIP) set the model, the resize mode, how text is fed and
  how zero-shot scores are read. `DualEncoder.from_pretrained(path)` (= `load`) picks the
  subclass from what `path` holds.

  Args:
    config: the model's config (CLIPConfig / SiglipConfig).
    params: the 'params' collection (numpy or jax arrays; boxes are unwrapped).
    tokenizer: a transformers tokenizer, or None (then encode_text raises).
    batch_size: images / texts per forward pass.
    resize_mode: 'shortest' (resize + centre crop) or 'squash'; None: the model's default.
    interpolation: the resize filter, 'bicubic' (both models' default), 'bilinear', ...
    text_clean: None (the tokenizer's own handling) or an open_clip cleaning applied before
      tokenizing (open_clip.CLEAN_KINDS: 'canonicalize', 'lower', 'whitespace').
    context_length: tokens per text (default and maximum: the model's max_len).
    matryoshka_dims: the widths the model was trained at (module docstring), or None.
  """
  KIND_NAME = "CLIP or SigLIP"
  DEFAULT_RESIZE = "shortest"
  USES_TEXT_MASK = True

  def __init__(self, config: Any, params: Any, tokenizer: Optional[Any] = None,
               batch_size: int = 32, *, resize_mode: Optional[str] = None,
               interpolation: str = "bicubic", text_clean: Optional[str] = None,
               context_length: Optional[int] = None,
               matryoshka_dims: Optional[Sequence[int]] = None):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    self.config = config
    self.params = jax.tree.map(jnp.asarray, nn.unbox(params))
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.resize_mode = resize_mode or self.DEFAULT_RESIZE
    if self.resize_mode not in RESIZE_MODES:
      raise ValueError(f"Unknown resize_mode {self.resize_mode!r}; expected one of "
                       f"{RESIZE_MODES}.")
    _resample(interpolation)
    self.interpolation = interpolation
    if text_clean is not None and text_clean not in open_clip_lib.CLEAN_KINDS:
      raise ValueError(f"Unknown text_clean {text_clean!r}; expected None or one of "
                       f"{open_clip_lib.CLEAN_KINDS}.")
    self.text_clean = text_clean
    self.matryoshka_dims = (None if matryoshka_dims is None
                            else matryoshka.check_dims(tuple(matryoshka_dims)))
    self.context_length = int(context_length or config.text.max_len)
    if not 0 < self.context_length <= config.text.max_len:
      raise ValueError(f"context_length={context_length} exceeds the model's max_len="
                       f"{config.text.max_len}.")
    model = self._make_model(config)
    cls = type(model)
    self._encode_images = jax.jit(
        lambda p, x, normalize: model.apply({"params": p}, x, normalize,
                                            method=cls.encode_images), static_argnums=2)
    self._encode_texts = jax.jit(
        lambda p, ids, mask, normalize: model.apply({"params": p}, ids, mask, normalize,
                                                    method=cls.encode_texts), static_argnums=3)
    self._scale = jax.jit(lambda p: model.apply({"params": p}, method=cls.logit_scale))

  def _make_model(self, config: Any):
    raise NotImplementedError

  # ------------------------------------------------------------------------------- loading
  @classmethod
  def from_pretrained(cls, path: str, batch_size: int = 32, **runtime) -> "DualEncoder":
    """From a training workdir, an open_clip directory, or a transformers CLIPModel /
    SiglipModel directory (or hub id); see the module docstring. `runtime`: dtype / scan /
    remat_policy / attention_impl of the model config. Called on a subclass, a checkpoint of
    the other kind is a ValueError."""
    local = pathlib.Path(os.path.expanduser(str(path)))
    if (local / "checkpoints").is_dir() and (local / "config.json").exists():
      return cls.from_workdir(str(local), batch_size=batch_size)
    root = hf_io.resolve_hf_path(path)  # A local directory, or the hub snapshot's.
    if open_clip_lib.is_open_clip_dir(root):
      return cls._from_open_clip(path, root, batch_size, runtime)
    hf_config, _ = hf_io.load_hf_config(str(root))
    if hf_config.get("auto_map"):
      raise ValueError(
          f"{path}: config.json is custom code (auto_map={hf_config['auto_map']}, "
          f"model_type={hf_config.get('model_type')!r}), not a transformers CLIPModel or "
          "SiglipModel, and there is no open_clip_config.json beside it; remote code is never "
          "run.")
    model_type = hf_config.get("model_type")
    target = _KINDS.get(model_type)
    if target is None:
      raise ValueError(f"{path}: model_type {model_type!r} is not a CLIP or SigLIP model "
                       f"(expected one of {sorted(_KINDS)}).")
    cls._check_kind(target, path)
    if target is FashionSigLIP:
      config, params = hf_siglip.load_siglip(str(root), **runtime)
    else:
      config, params = hf_clip.load_clip(str(root), **runtime)
    dims = hf_config.get("matryoshka_dims")
    return target(config, params, _load_tokenizer(root), batch_size=batch_size,
                  matryoshka_dims=None if dims is None else tuple(dims))

  @classmethod
  def _check_kind(cls, target: type, path: str) -> None:
    if not issubclass(target, cls):
      raise ValueError(f"{path} is a {target.KIND_NAME} checkpoint, not a {cls.KIND_NAME} one: "
                       f"load it with fashion_jax.api.load(path) (or {target.__name__}"
                       ".from_pretrained).")

  @classmethod
  def _from_open_clip(cls, path: str, root: pathlib.Path, batch_size: int,
                      runtime: dict) -> "DualEncoder":
    """An open_clip directory through interop/open_clip.py's transformers-layout conversion."""
    ckpt = open_clip_lib.to_hf(root)
    if ckpt.kind not in _KINDS:
      raise ValueError(f"{path}: open_clip model kind {ckpt.kind!r}, expected one of "
                       f"{sorted(_KINDS)}.")
    target = _KINDS[ckpt.kind]
    cls._check_kind(target, path)
    pre = dict(ckpt.preprocess or {})
    if target is FashionSigLIP:
      config = siglip_lib.SiglipConfig.from_hf(ckpt.hf_config, **runtime)
    else:
      config = clip_lib.CLIPConfig.from_hf(ckpt.hf_config, **runtime)
    vision = dataclasses.replace(
        config.vision, image_mean=tuple(pre.get("mean", config.vision.image_mean)),
        image_std=tuple(pre.get("std", config.vision.image_std)))
    config = config.replace(vision=vision)
    if target is FashionSigLIP:
      params = hf_siglip.hf_state_to_params(config, ckpt.hf_state)
    else:
      params = hf_clip.hf_state_to_params(config, ckpt.hf_state)
    tokenizer = _load_tokenizer(root)
    if tokenizer is None and ckpt.tokenizer_name:
      import transformers  # pylint: disable=g-import-not-at-top
      try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.tokenizer_name)
      except Exception as e:  # pylint: disable=broad-except  Offline, unknown id: text disabled.
        logging.warning("%s: tokenizer %r could not be loaded (%s: %s); encode_text will raise.",
                        path, ckpt.tokenizer_name, type(e).__name__, e)
    return target(config, params, tokenizer, batch_size=batch_size,
                  resize_mode=pre.get("resize_mode"),
                  interpolation=pre.get("interpolation", "bicubic"),
                  text_clean=ckpt.text_clean,
                  context_length=ckpt.context_length)

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None,
                   batch_size: int = 32) -> "DualEncoder":
    """From checkpoint `step` (None = newest) of a CLIP or SigLIP training run's workdir."""
    system, params, _ = restore.load_trained(workdir, step=step)
    model_config = getattr(system, "model_config", None)
    target = next((t for c, t in ((clip_lib.CLIPConfig, FashionCLIP),
                                  (siglip_lib.SiglipConfig, FashionSigLIP))
                   if isinstance(model_config, c)), None)
    if target is None:
      raise ValueError(f"{workdir} holds a {system.config.system!r} run, not a CLIP or SigLIP "
                       "model.")
    cls._check_kind(target, workdir)
    return target(model_config, params, system.tokenizer.hf, batch_size=batch_size,
                  matryoshka_dims=getattr(system, "matryoshka_dims", ()))

  @property
  def logit_scale(self) -> float:
    """exp of the learnt log scale."""
    return float(self._scale(self.params))

  # ---------------------------------------------------------------------------------- images
  def preprocess_images(self, images: Any) -> np.ndarray:
    """Images (see the module docstring) -> uint8 [N, S, S, 3] or float32 [N, S, S, 3]."""
    s = self.config.vision.image_size
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
      if images.ndim != 4:
        raise ValueError(f"Float pixel values must be [N, 3, S, S] or [N, S, S, 3]; got shape "
                         f"{images.shape}.")
      x = images.transpose(0, 2, 3, 1) if images.shape[1] == 3 else images
      if x.shape[1:] != (s, s, 3):
        raise ValueError(f"Float pixel values of shape {images.shape} do not match the model's "
                         f"input {s}x{s}x3 (channels-first or -last).")
      return x.astype(np.float32)
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif not isinstance(images, (list, tuple)):
      images = [images]
    if not images:
      raise ValueError("No images given (an empty list): nothing to preprocess or encode.")
    resize = resize_and_crop if self.resize_mode == "shortest" else resize_squash
    return np.stack([resize(self._to_pil(im), s, self.interpolation) for im in images])

  @staticmethod
  def _to_pil(image):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if isinstance(image, (str, os.PathLike)):
      with Image.open(image) as im:
        return im.convert("RGB")
    if isinstance(image, Image.Image):
      return image
    if isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise ValueError(f"A single image array must be uint8 [H, W, 3] or [H, W]; got "
                         f"{image.dtype} {image.shape} (float pixel values go as a 4-D batch).")
      if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
        return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1
                               else image)
      raise ValueError(f"Image array of shape {image.shape}: expected [H, W, 3] or [H, W].")
    raise TypeError(f"Unsupported image type {type(image).__name__}: expected a path, a PIL "
                    "image or a numpy array.")

  def encode_images(self, images: Any, normalize: bool = True, dim: int = 0) -> np.ndarray:
    """Images -> float32 [N, P] (L2-normalised unless normalize=False); with dim=m, [N, m]:
    the Matryoshka prefix (module docstring)."""
    self._check_dim(dim)
    x = self.preprocess_images(images)
    out = self._batched(lambda chunk: self._encode_images(self.params, chunk, normalize), x)
    return self._prefix(out, dim, normalize)

  def _check_dim(self, dim: int) -> None:
    width = self.config.projection_dim
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 <= dim <= width:
      raise ValueError(f"dim={dim!r}: the embedding prefix must be an int in [1, {width}] "
                       "(0 = the full width).")

  @staticmethod
  def _prefix(x: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    if not dim or dim == x.shape[1]:
      return x
    return matryoshka.truncate_and_normalize(x, dim) if normalize else x[:, :dim]

  # ------------------------------------------------------------------------------------ text
  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Texts -> (ids int32 [M, context_length], attention_mask int32 [M, L] or None).

    Cleaned (text_clean), truncated and padded to context_length with the tokenizer's pad id
    (its EOS when it has no pad token). The mask is None for a model fed without one (SigLIP).
    """
    if self.tokenizer is None:
      raise ValueError(f"This {type(self).__name__} has no tokenizer: load a directory that "
                       "holds one or pass tokenizer= to the constructor.")
    if isinstance(texts, str):
      texts = [texts]
    if not len(texts):
      raise ValueError("No texts given (an empty list): nothing to tokenize or encode.")
    if self.text_clean is not None:
      texts = [open_clip_lib.clean_text(self.text_clean, t) for t in texts]
    n = self.context_length
    rows = self.tokenizer(texts, truncation=True, max_length=n)["input_ids"]
    pad = self.tokenizer.pad_token_id
    pad = self.tokenizer.eos_token_id if pad is None else pad
    ids = np.full((len(rows), n), pad, np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, row in enumerate(rows):
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return ids, (mask if self.USES_TEXT_MASK else None)

  def encode_text(self, texts: Sequence[str], normalize: bool = True, dim: int = 0
                  ) -> np.ndarray:
    """Texts -> float32 [M, P] (L2-normalised unless normalize=False); with dim=m, [M, m]:
    the Matryoshka prefix (module docstring)."""
    self._check_dim(dim)
    ids, mask = self.tokenize(texts)
    if mask is None:
      out = self._batched(lambda c: self._encode_texts(self.params, c, None, normalize), ids)
    else:
      both = np.concatenate([ids, mask], axis=1)
      l = ids.shape[1]
      out = self._batched(
          lambda c: self._encode_texts(self.params, c[:, :l], c[:, l:], normalize), both)
    return self._prefix(out, dim, normalize)

  # -------------------------------------------------------------------------------- scoring
  def class_embeddings(self, labels: Sequence[str],
                       templates: str | Sequence[str] = prompts.TEMPLATES) -> np.ndarray:
    """K labels -> float32 [K, P]: prompts.class_embeddings (each label's prompts, averaged)."""
    return prompts.class_embeddings(lambda texts: self.encode_text(texts, normalize=False),
                                    labels, templates)

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """Zero-shot probabilities [N, K] from logit_scale * cos [N, K] (module docstring)."""
    raise NotImplementedError

  def zero_shot_classify(self, images: Any, labels: Sequence[str],
                         templates: str | Sequence[str] = prompts.TEMPLATES) -> np.ndarray:
    """Images, K labels -> probabilities [N, K] against `class_embeddings(labels, templates)`
    (a single string is one template); softmax for CLIP, per-label sigmoid for SigLIP."""
    cls = self.class_embeddings(labels, templates)
    return self.probabilities(prompts.logits(self.encode_images(images), cls, self.logit_scale))

  def save_pretrained(self, out_dir: str, overwrite: bool = False) -> pathlib.Path:
    """Writes a transformers directory (weights, config, tokenizer, preprocessor)."""
    raise NotImplementedError

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    """fn over chunks of `batch_size` rows; the last chunk is padded so shapes stay fixed."""
    n = x.shape[0]
    if n == 0:
      raise ValueError("No inputs given.")
    bs = min(self.batch_size, n)
    outs = []
    for i in range(0, n, bs):
      chunk = x[i:i + bs]
      pad = bs - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      outs.append(np.asarray(fn(jnp.asarray(chunk)))[:bs - pad])
    return np.concatenate(outs)


class FashionCLIP(DualEncoder):
  """CLIP inference (transformers CLIPModel layout): softmax zero-shot, masked causal text."""
  KIND_NAME = "CLIP"
  DEFAULT_RESIZE = "shortest"
  USES_TEXT_MASK = True

  def _make_model(self, config: clip_lib.CLIPConfig):
    return clip_lib.CLIPModel(config)

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (prompts.probabilities): each row sums to 1."""
    return prompts.probabilities(logits)

  def save_pretrained(self, out_dir: str, overwrite: bool = False) -> pathlib.Path:
    """Writes a transformers CLIPModel directory (weights, config, tokenizer, preprocessor;
    matryoshka_dims, when known, as a config.json key)."""
    return hf_clip.save_clip(out_dir, self.config, self.params, self.tokenizer,
                             overwrite=overwrite, matryoshka_dims=self.matryoshka_dims or ())


class FashionSigLIP(DualEncoder):
  """SigLIP inference (transformers SiglipModel layout): per-label sigmoid zero-shot, text
  padded to the context with EOS and no attention mask, squash resize."""
  KIND_NAME = "SigLIP"
  DEFAULT_RESIZE = "squash"
  USES_TEXT_MASK = False

  def __init__(self, config: siglip_lib.SiglipConfig, params: Any, *args, **kwargs):
    super().__init__(config, params, *args, **kwargs)
    model = siglip_lib.SiglipModel(config)
    self._bias = jax.jit(lambda p: model.apply({"params": p},
                                               method=siglip_lib.SiglipModel.logit_bias))

  def _make_model(self, config: siglip_lib.SiglipConfig):
    return siglip_lib.SiglipModel(config)

  @property
  def logit_bias(self) -> float:
    """The learnt bias b of logits = scale * cos + b."""
    return float(self._bias(self.params))

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits + logit_bias) per label, computed in float64: rows do not sum to 1."""
    z = np.asarray(logits, np.float64) + self.logit_bias
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

  def save_pretrained(self, out_dir: str, overwrite: bool = False) -> pathlib.Path:
    """Writes a transformers SiglipModel directory (weights, config, tokenizer, preprocessor;
    matryoshka_dims, when known, as a config.json key)."""
    return hf_siglip.save_siglip(out_dir, self.config, self.params, self.tokenizer,
                                 overwrite=overwrite, matryoshka_dims=self.matryoshka_dims or ())


_KINDS = {"clip": FashionCLIP, "siglip": FashionSigLIP}


def load(path: str, batch_size: int = 32, **runtime) -> DualEncoder:
  """FashionCLIP or FashionSigLIP from `path` (DualEncoder.from_pretrained; module docstring)."""
  return DualEncoder.from_pretrained(path, batch_size=batch_size, **runtime)


