"""FashionCLIP: the CLIP dual encoder trained with symmetric InfoNCE over the global batch.

Config keys this system reads (besides the trainer's and the pipeline's `data`):
  model.variant          'tiny' | 'S/16' | 'B/32' | 'B/16' | 'L/14'
  model.projection_dim   joint space width (None = the variant's)
  model.vision / .text   per-tower field overrides (e.g. vision.image_size, text.num_layers)
  model.dtype            compute dtype ('float32' on CPU, 'bfloat16' on accelerators)
  model.scan, model.remat_policy
  model.attention_impl   'einsum' (default) | 'xla' | 'cudnn' (fused attention on NVIDIA GPUs,
                         bf16; same parameters and loss, layers.MultiHeadAttention)
  model.encode_chunks    1 | K: encode K row-chunks at a time, rematerialised (exact loss)
  model.loss_blocks      1 | K: blockwise [B, B] logits in K row blocks (exact loss)
  init.hf_clip_dir       '' = random init; else a local HF CLIPModel directory (or hub id)
                         whose weights initialise every parameter (FashionCLIP's recipe: full
                         fine-tuning from a pretrained CLIP). Its config then defines the
                         architecture and `model.variant/vision/text` must be left unset.

The text tower's vocabulary (size, bos/eos/pad ids) always comes from the tokenizer the pipeline
uses (`data.tokenizer`), and its context from `data.max_len`: a model and a tokenizer that
disagree cannot be configured.

Batches: 'image' uint8 [B, S, S, 3] (normalised with CLIP's mean/std on the device), 'text'
int32 [B, L].
"""

from typing import Any

import jax
import numpy as np

from fashion_jax.data import tokenizers
from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.losses import contrastive
from fashion_jax.models import clip as clip_lib


def model_config(config) -> clip_lib.CLIPConfig:
  """The CLIPConfig a FashionCLIP run trains, from `config.model`, `config.data`, `config.init`."""
  m, data = config.model, config.data
  tok = tokenizers.get_tokenizer(data.tokenizer.kind, data.tokenizer.path, data.max_len)
  runtime = dict(dtype=m.dtype, scan=m.scan, remat_policy=m.remat_policy,
                 attention_impl=m.get("attention_impl", "einsum"))
  if config.init.hf_clip_dir:
    hf_config, _ = hf_io.load_hf_config(config.init.hf_clip_dir)
    cfg = clip_lib.CLIPConfig.from_hf(hf_config, **runtime)
    if cfg.text.vocab_size != tok.vocab_size:
      raise ValueError(
          f"init.hf_clip_dir={config.init.hf_clip_dir!r} has a text vocabulary of "
          f"{cfg.text.vocab_size} tokens but data.tokenizer ({data.tokenizer.kind!r}, path="
          f"{data.tokenizer.path!r}) has {tok.vocab_size}: point data.tokenizer.path at the "
          "checkpoint's tokenizer.")
    if data.max_len > cfg.text.max_len:
      raise ValueError(f"data.max_len={data.max_len} exceeds the checkpoint's context "
                       f"{cfg.text.max_len}.")
    return cfg
  text = dict(m.get("text") or {})
  text.update(vocab_size=tok.vocab_size, max_len=data.max_len, eos_token_id=tok.eos_token_id,
              bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
  vision = dict(m.get("vision") or {})
  vision.setdefault("image_size", data.image_size)
  return clip_lib.clip_config(m.variant, projection_dim=m.get("projection_dim"), vision=vision,
                              text=text, **runtime)


class System:
  """FashionCLIP as a fashion_jax system (see systems/base.py)."""

  required_features = ("image", "text")  # The batch keys `loss` reads (systems/base.py).

  def __init__(self, config):
    self.config = config
    self.model_config = model_config(config)
    self.model = clip_lib.CLIPModel(self.model_config)
    self.tokenizer = tokenizers.get_tokenizer(
        config.data.tokenizer.kind, config.data.tokenizer.path, config.data.max_len)
    if config.data.image_size != self.model_config.vision.image_size:
      raise ValueError(f"data.image_size={config.data.image_size} but the vision tower takes "
                       f"{self.model_config.vision.image_size} px images.")

  # --- trainer interface --------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, l = self.model_config.vision.image_size, self.config.data.max_len
    return {"image": np.zeros((batch_size, s, s, 3), np.uint8),
            "text": np.zeros((batch_size, l), np.int32)}

  def init(self, rng: jax.Array, batch) -> Any:
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def pretrained_params(self):
    """Unboxed numpy params from `init.hf_clip_dir`, or None for a random init."""
    if not self.config.init.hf_clip_dir:
      return None
    _, params = hf_clip.load_clip(
        self.config.init.hf_clip_dir, dtype=self.model_config.dtype,
        scan=self.model_config.scan, remat_policy=self.model_config.remat_policy)
    return params

  def loss(self, params, batch, rng, train: bool = True):
    """Symmetric InfoNCE over the global batch.

    Memory levers (losses/contrastive.py; neither changes the loss beyond rounding):
    `model.encode_chunks` K encodes the batch K row-chunks at a time with rematerialisation
    (gradient cache), `model.loss_blocks` computes the [B, B] logits in row blocks.
    """
    del rng, train  # No dropout in CLIP.
    m_cfg = self.config.model
    chunks, blocks = m_cfg.get("encode_chunks", 1), m_cfg.get("loss_blocks", 1)
    variables = {"params": params}
    img = contrastive.map_in_chunks(
        lambda x: self.model.apply(variables, x, method=self.model.encode_images),
        batch["image"], num_chunks=chunks)
    txt = contrastive.map_in_chunks(
        lambda x: self.model.apply(variables, x, method=self.model.encode_texts),
        batch["text"], num_chunks=chunks)
    scale = self.model.apply(variables, method=self.model.logit_scale)
    loss, m = contrastive.info_nce(img, txt, scale, num_blocks=blocks)
    return loss, {"loss": loss, "i2t_acc": m["a2b_acc"], "t2i_acc": m["b2a_acc"],
                  "logit_scale": scale}

  # --- two-tower interface (evaluators, product search) -------------------------------------
  def embed_images(self, params, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, method=self.model.encode_images)

  def embed_texts(self, params, tokens: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, tokens, method=self.model.encode_texts)

  def logit_scale(self, params) -> jax.Array:
    return self.model.apply({"params": params}, method=self.model.logit_scale)

  # --- export ---------------------------------------------------------------------------------
  def export(self, params, out_dir: str, overwrite: bool = False):
    """A transformers CLIPModel directory (weights, config, tokenizer, preprocessor)."""
    return hf_clip.save_clip(out_dir, self.model_config, params, tokenizer=self.tokenizer.hf,
                             overwrite=overwrite)
