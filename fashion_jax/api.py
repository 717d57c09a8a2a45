"""A small public API for notebooks and scripts: FashionCLIP embeddings and zero-shot scoring.

  fclip = FashionCLIP.from_pretrained("path/to/hf_clip_dir")   # or one of our export dirs
  img = fclip.encode_images(["a.jpg", pil_image, uint8_array])  # [N, P] L2-normalised numpy
  txt = fclip.encode_text(["red dress", "black shoes"])         # [M, P] L2-normalised numpy
  probs = fclip.zero_shot_classify(images, ["dress", "shoe"])   # [N, K], rows sum to 1
  cls = fclip.class_embeddings(["dress", "shoe"])               # [K, P], the prompts' average
  fclip.save_pretrained("out_dir")                              # transformers CLIPModel layout

Images (`encode_images`): a list (or a single item) of file paths, PIL images or uint8 arrays
[H, W, 3] / [H, W] of any size, or a uint8 array [N, H, W, 3]. These are preprocessed like
transformers' CLIPProcessor: RGB, bicubic resize of the short side to the model's image_size
(long side int(size * long / short)), centre crop, then /255 and CLIP mean/std (on the device).
A FLOAT array is taken as already-preprocessed pixel values and must be 4-D, [N, 3, S, S]
(CLIPProcessor's channels-first output) or [N, S, S, 3]; a dimension 1 of size 3 means
channels-first.

Texts (`encode_text`) go through the checkpoint's own tokenizer (AutoTokenizer from the
directory), truncated to the model's context like the tokenizer does (BOS ... EOS kept) and
padded to the context.

Zero-shot scoring uses evaluate/prompts.py, the one definition the zero-shot evaluator and the
configs' zero-shot evaluations use too (the reference package's benchmark and its API used
different prompts): each label's class embedding is the re-normalised average of the normalised
embeddings of its prompts (prompts.TEMPLATES = "a photo of a {}" and the bare label), and
probs = softmax(logit_scale * normalize(img) @ class^T), with the model's own clamped logit
scale (the reference package normalised only one side and dropped the scale).

`FashionCLIP.from_pretrained(workdir)` (or `from_workdir(workdir, step=...)`) loads a training
run's checkpoint directly, with the run's own tokenizer.
"""

import os
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.evaluate import prompts
from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.models import clip as clip_lib
from fashion_jax.train import restore


def _load_tokenizer(path: pathlib.Path):
  """The tokenizer saved in an HF directory, or None when there is none."""
  names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
  if not any((path / n).exists() for n in names):
    return None
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(str(path))


def resize_and_crop(image, size: int) -> np.ndarray:
  """PIL image -> uint8 [size, size, 3]: RGB, bicubic short side -> size, centre crop."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert("RGB")
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  image = image.resize((new_w, new_h), resample=Image.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(image, np.uint8)[top:top + size, left:left + size]


class FashionCLIP:
  """FashionCLIP inference: see the module docstring.

  Args:
    config: the model's CLIPConfig.
    params: the 'params' collection (numpy or jax arrays; boxes are unwrapped).
    tokenizer: a transformers tokenizer, or None (then encode_text raises).
    batch_size: images / texts per forward pass.
  """

  def __init__(self, config: clip_lib.CLIPConfig, params: Any, tokenizer: Optional[Any] = None,
               batch_size: int = 32):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    self.config = config
    self.params = jax.tree.map(jnp.asarray, nn.unbox(params))
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    model = clip_lib.CLIPModel(config)
    self._encode_images = jax.jit(
        lambda p, x, normalize: model.apply({"params": p}, x, normalize,
                                            method=clip_lib.CLIPModel.encode_images),
        static_argnums=2)
    self._encode_texts = jax.jit(
        lambda p, ids, mask, normalize: model.apply({"params": p}, ids, mask, normalize,
                                                    method=clip_lib.CLIPModel.encode_texts),
        static_argnums=3)
    self._scale = jax.jit(lambda p: model.apply({"params": p},
                                                method=clip_lib.CLIPModel.logit_scale))

  @classmethod
  def from_pretrained(cls, path: str, batch_size: int = 32, **runtime) -> "FashionCLIP":
    """From a transformers CLIPModel directory (ours or HF's), a hub id where reachable, or a
    fashion_jax training workdir (its newest checkpoint; see `from_workdir`).

    `runtime`: dtype / scan / remat_policy of the CLIPConfig.
    """
    local = pathlib.Path(os.path.expanduser(str(path)))
    if (local / "checkpoints").is_dir() and (local / "config.json").exists():
      return cls.from_workdir(str(local), batch_size=batch_size)
    root = hf_io.resolve_hf_path(path)  # A local directory, or the hub snapshot's.
    config, params = hf_clip.load_clip(str(root), **runtime)
    return cls(config, params, _load_tokenizer(root), batch_size=batch_size)

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None,
                   batch_size: int = 32) -> "FashionCLIP":
    """From checkpoint `step` (None = newest) of a FashionCLIP training run's workdir."""
    system, params, _ = restore.load_trained(workdir, step=step)
    if not hasattr(system, "model_config") or not isinstance(system.model_config,
                                                             clip_lib.CLIPConfig):
      raise ValueError(f"{workdir} holds a {system.config.system!r} run, not a CLIP model.")
    return cls(system.model_config, params, system.tokenizer.hf, batch_size=batch_size)

  @property
  def logit_scale(self) -> float:
    """The clamped exp of the learnt log scale."""
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
    return np.stack([resize_and_crop(self._to_pil(im), s) for im in images])

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

  def encode_images(self, images: Any, normalize: bool = True) -> np.ndarray:
    """Images -> float32 [N, P] (L2-normalised unless normalize=False)."""
    x = self.preprocess_images(images)
    return self._batched(lambda chunk: self._encode_images(self.params, chunk, normalize), x)

  # ------------------------------------------------------------------------------------ text
  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids, attention_mask), int32 [M, max_len], truncated and padded to max_len."""
    if self.tokenizer is None:
      raise ValueError("This FashionCLIP has no tokenizer: load a directory that holds one or "
                       "pass tokenizer= to the constructor.")
    if isinstance(texts, str):
      texts = [texts]
    enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                         max_length=self.config.text.max_len, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

  def encode_text(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
    """Texts -> float32 [M, P] (L2-normalised unless normalize=False)."""
    ids, mask = self.tokenize(texts)
    both = np.concatenate([ids, mask], axis=1)
    l = ids.shape[1]
    return self._batched(
        lambda c: self._encode_texts(self.params, c[:, :l], c[:, l:], normalize), both)

  # -------------------------------------------------------------------------------- scoring
  def class_embeddings(self, labels: Sequence[str],
                       templates: str | Sequence[str] = prompts.TEMPLATES) -> np.ndarray:
    """K labels -> float32 [K, P]: prompts.class_embeddings (each label's prompts, averaged)."""
    return prompts.class_embeddings(lambda texts: self.encode_text(texts, normalize=False),
                                    labels, templates)

  def zero_shot_classify(self, images: Any, labels: Sequence[str],
                         templates: str | Sequence[str] = prompts.TEMPLATES) -> np.ndarray:
    """Images, K labels -> probabilities [N, K] against `class_embeddings(labels, templates)`
    (a single string is one template)."""
    cls = self.class_embeddings(labels, templates)
    return prompts.probabilities(
        prompts.logits(self.encode_images(images), cls, self.logit_scale))

  def save_pretrained(self, out_dir: str, overwrite: bool = False) -> pathlib.Path:
    """Writes a transformers CLIPModel directory (weights, config, tokenizer, preprocessor)."""
    return hf_clip.save_clip(out_dir, self.config, self.params, self.tokenizer,
                             overwrite=overwrite)

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
