"""transformers BERT checkpoints <-> fashion_jax.models.bert.Bert.

Import: a local HF directory (or hub id) of BertModel, BertForPreTraining, BertForMaskedLM (or
any Bert* model whose extra head is listed in UNMODELLED_HEADS). Keys may carry the `bert.` prefix;
old checkpoints' `LayerNorm.gamma/beta` are read as `weight/bias`. The encoder must match exactly
(missing key, unexpected key or wrong shape -> CheckpointMismatchError naming the key and both
shapes). Heads:
  - pooler (`pooler.dense.*`) and MLM head (`cls.predictions.{transform.*, bias}`): loaded when
    present; when the model wants one the checkpoint lacks (BertForMaskedLM has no pooler,
    BertModel no MLM head) it is initialised fresh from `rng`; when the checkpoint has one the
    model does not want (with_pooler / with_mlm_head False) it is ignored. Each case is logged.
  - the MLM decoder (`cls.predictions.decoder.{weight,bias}`, absent from transformers 5 files)
    must equal the word embeddings / `cls.predictions.bias`: an untied decoder is an error, since
    our decoder is tied.
  - UNMODELLED_HEADS (NSP, classifiers, QA) are ignored explicitly by prefix, and logged.

Mapping (Linear weight [out, in] -> Dense kernel = W.T; D = hidden, H heads, Dh = D / H):
  embeddings.{word,position,token_type}_embeddings.weight -> {word,position,type}_embeddings/
                                                             embedding
  embeddings.LayerNorm.{weight,bias}                      -> embeddings_norm/{scale,bias}
  encoder.layer.i.attention.self.{query,key,value}.weight -> encoder/layers_i/attn/{query,key,
                                                             value}/kernel = W.T.reshape(D, H, Dh)
  encoder.layer.i.attention.self.{query,key,value}.bias   -> .../bias = b.reshape(H, Dh)
  encoder.layer.i.attention.output.dense.weight           -> .../attn/out/kernel
                                                             = W.T.reshape(H, Dh, D)
  encoder.layer.i.attention.output.LayerNorm              -> .../norm1
  encoder.layer.i.intermediate.dense                      -> .../mlp/fc1
  encoder.layer.i.output.dense                            -> .../mlp/fc2
  encoder.layer.i.output.LayerNorm                        -> .../norm2
  pooler.dense -> pooler;  cls.predictions.transform.dense -> mlm_transform;
  cls.predictions.transform.LayerNorm -> mlm_norm;  cls.predictions.bias -> mlm_bias
With scan=True the per-layer arrays are stacked on a leading axis under encoder/layers.

Export: `export_hf_bert` writes a transformers BertModel (or BertForMaskedLM) directory:
config.json, model.safetensors (every array bit-identical to ours), tokenizer files when given.
"""

import logging
import os
import pathlib
from typing import Any, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fashion_jax.interop import hf_io
from fashion_jax.models import bert as bert_lib

# Heads of Bert* task models we do not model: ignored on import, by key prefix.
UNMODELLED_HEADS = ("cls.seq_relationship.", "classifier.", "qa_outputs.")
_TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_HF_TO_OUR_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "quick_gelu": "quick_gelu"}
_OUR_TO_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
ARCHITECTURES = ("BertModel", "BertForMaskedLM")


def bert_from_hf_config(config: Mapping[str, Any], **overrides) -> bert_lib.Bert:
  """Our Bert with the architecture of an HF BertConfig dict (heads, dtype, scan via overrides)."""
  if config.get("model_type") != "bert":
    raise hf_io.CheckpointMismatchError(
        f"Expected an HF BERT checkpoint (model_type 'bert'), got model_type "
        f"{config.get('model_type')!r}.")
  pos = config.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise hf_io.CheckpointMismatchError(
        f"Only absolute position embeddings are modelled, got position_embedding_type {pos!r}.")
  if config.get("is_decoder") or config.get("add_cross_attention"):
    raise hf_io.CheckpointMismatchError(
        "A decoder BERT (is_decoder / add_cross_attention) is not an encoder we model.")
  act = config.get("hidden_act", "gelu")
  if act not in _HF_TO_OUR_ACT:
    raise hf_io.CheckpointMismatchError(
        f"hidden_act {act!r} is not modelled; expected one of {', '.join(_HF_TO_OUR_ACT)}.")
  kw = dict(
      vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"], max_position=config["max_position_embeddings"],
      type_vocab_size=config.get("type_vocab_size", 2),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12), act=_HF_TO_OUR_ACT[act],
      dropout_rate=config.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=config.get("attention_probs_dropout_prob", 0.1),
      pad_token_id=config.get("pad_token_id") or 0,
      initializer_range=config.get("initializer_range", 0.02))
  kw.update(overrides)
  model = bert_lib.Bert(**kw)
  if model.with_mlm_head and config.get("tie_word_embeddings", True) is False:
    raise hf_io.CheckpointMismatchError(
        "The checkpoint's config has tie_word_embeddings=False; our MLM decoder is tied to the "
        "word embeddings. Import with with_mlm_head=False.")
  return model


def hf_bert_config(model: bert_lib.Bert, architecture: str = "BertModel") -> dict[str, Any]:
  """transformers.BertConfig keyword arguments describing `model`."""
  return dict(
      architectures=[architecture], model_type="bert", vocab_size=model.vocab_size,
      hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
      num_attention_heads=model.num_heads, intermediate_size=model.mlp_dim,
      hidden_act=_OUR_TO_HF_ACT[model.act], hidden_dropout_prob=model.dropout_rate,
      attention_probs_dropout_prob=model.attention_dropout_rate,
      max_position_embeddings=model.max_position, type_vocab_size=model.type_vocab_size,
      initializer_range=model.initializer_range, layer_norm_eps=model.layer_norm_eps,
      pad_token_id=model.pad_token_id, tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------
# Key map. Each entry: (hf key, our path without the layer stacking, kind, group, layer index).
# kind says how the array is transformed; group is 'core', 'pooler' or 'mlm'.
# ---------------------------------------------------------------------------------------------

def _key_map(model: bert_lib.Bert) -> list[tuple[str, tuple[str, ...], str, str, Optional[int]]]:
  entries = [
      ("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), "copy", "core", None),
      ("embeddings.position_embeddings.weight", ("position_embeddings", "embedding"), "copy",
       "core", None),
      ("embeddings.token_type_embeddings.weight", ("type_embeddings", "embedding"), "copy", "core",
       None),
      ("embeddings.LayerNorm.weight", ("embeddings_norm", "scale"), "copy", "core", None),
      ("embeddings.LayerNorm.bias", ("embeddings_norm", "bias"), "copy", "core", None),
  ]
  per_layer = []
  for name in ("query", "key", "value"):
    per_layer += [(f"attention.self.{name}.weight", ("attn", name, "kernel"), "qkv"),
                  (f"attention.self.{name}.bias", ("attn", name, "bias"), "qkv_bias")]
  per_layer += [
      ("attention.output.dense.weight", ("attn", "out", "kernel"), "out"),
      ("attention.output.dense.bias", ("attn", "out", "bias"), "copy"),
      ("attention.output.LayerNorm.weight", ("norm1", "scale"), "copy"),
      ("attention.output.LayerNorm.bias", ("norm1", "bias"), "copy"),
      ("intermediate.dense.weight", ("mlp", "fc1", "kernel"), "dense"),
      ("intermediate.dense.bias", ("mlp", "fc1", "bias"), "copy"),
      ("output.dense.weight", ("mlp", "fc2", "kernel"), "dense"),
      ("output.dense.bias", ("mlp", "fc2", "bias"), "copy"),
      ("output.LayerNorm.weight", ("norm2", "scale"), "copy"),
      ("output.LayerNorm.bias", ("norm2", "bias"), "copy"),
  ]
  for i in range(model.num_layers):
    layer = ("encoder", "layers") if model.scan else ("encoder", f"layers_{i}")
    entries += [(f"encoder.layer.{i}.{k}", layer + p, kind, "core", i if model.scan else None)
                for k, p, kind in per_layer]
  if model.with_pooler:
    entries += [("pooler.dense.weight", ("pooler", "kernel"), "dense", "pooler", None),
                ("pooler.dense.bias", ("pooler", "bias"), "copy", "pooler", None)]
  if model.with_mlm_head:
    entries += [
        ("cls.predictions.transform.dense.weight", ("mlm_transform", "kernel"), "dense", "mlm",
         None),
        ("cls.predictions.transform.dense.bias", ("mlm_transform", "bias"), "copy", "mlm", None),
        ("cls.predictions.transform.LayerNorm.weight", ("mlm_norm", "scale"), "copy", "mlm", None),
        ("cls.predictions.transform.LayerNorm.bias", ("mlm_norm", "bias"), "copy", "mlm", None),
        ("cls.predictions.bias", ("mlm_bias",), "copy", "mlm", None),
    ]
  return entries


def _hf_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape of an array whose (per-layer) shape is `s` in our layout."""
  return {"copy": lambda: s, "dense": lambda: s[::-1], "qkv": lambda: (s[1] * s[2], s[0]),
          "qkv_bias": lambda: (s[0] * s[1],), "out": lambda: (s[2], s[0] * s[1])}[kind]()


def _to_ours(kind: str, w: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
  if kind in ("dense", "qkv", "out"):
    w = w.T
  return np.ascontiguousarray(w.reshape(s))


def _to_hf(kind: str, v: np.ndarray) -> np.ndarray:
  if kind == "qkv":
    v = v.reshape(v.shape[0], -1).T
  elif kind == "qkv_bias":
    v = v.reshape(-1)
  elif kind == "out":
    v = v.reshape(-1, v.shape[-1]).T
  elif kind == "dense":
    v = v.T
  return np.ascontiguousarray(v)


def _abstract_params(model: bert_lib.Bert) -> dict:
  ids = jnp.zeros((1, 2), jnp.int32)
  return flax.traverse_util.flatten_dict(
      nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids)))["params"])


def _normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips the `bert.` prefix of task models and renames old LayerNorm gamma/beta."""
  prefixed = any(k.startswith("bert.") for k in state)
  out = {}
  for k, v in state.items():
    if prefixed and k.startswith("bert."):
      k = k[len("bert."):]
    elif prefixed and not k.startswith("cls.") and not k.startswith(UNMODELLED_HEADS):
      raise hf_io.CheckpointMismatchError(f"Unexpected key {k!r} with shape {tuple(v.shape)} "
                                          "outside 'bert.' and the known heads.")
    if k.endswith("LayerNorm.gamma"):
      k = k[:-len("gamma")] + "weight"
    elif k.endswith("LayerNorm.beta"):
      k = k[:-len("beta")] + "bias"
    out[k] = v
  return out


def convert_hf_bert_state(state: Mapping[str, np.ndarray], model: bert_lib.Bert,
                          rng: Optional[jax.Array] = None) -> dict:
  """Flat HF BERT state -> our `params` tree for `model` (strict; see the module docstring).

  Heads the model has but the checkpoint lacks are initialised from `rng` (default key 0).
  """
  state = _normalise_keys(state)
  abstract = _abstract_params(model)
  entries = _key_map(model)
  in_ckpt = {"core": True, "pooler": "pooler.dense.weight" in state,
             "mlm": any(k.startswith("cls.predictions.") for k in state)}
  ignore = list(UNMODELLED_HEADS) + list(_TIED_DECODER)
  for group, prefix, wanted in (("pooler", "pooler.", model.with_pooler),
                                ("mlm", "cls.predictions.", model.with_mlm_head)):
    if in_ckpt[group] and not wanted:
      ignore.append(prefix)
      logging.info("HF BERT import: the checkpoint's %s head is ignored (with_%s=False).", group,
                   "pooler" if group == "pooler" else "mlm_head")
  ignored = sorted({p for p in UNMODELLED_HEADS if any(k.startswith(p) for k in state)})
  if ignored:
    logging.info("HF BERT import: ignoring head(s) not modelled: %s", ", ".join(ignored))

  expected = {}
  for key, path, kind, group, idx in entries:
    if in_ckpt[group]:
      s = abstract[path].shape
      expected[key] = _hf_shape(kind, s[1:] if idx is not None else s)
  hf_io.check_state(expected, state, what="HF BERT -> fashion_jax Bert",
                    ignore_unexpected=tuple(ignore))
  if model.with_mlm_head and in_ckpt["mlm"]:
    for key, tied_to in zip(_TIED_DECODER, ("embeddings.word_embeddings.weight",
                                            "cls.predictions.bias")):
      if key in state and not np.array_equal(state[key], state[tied_to]):
        raise hf_io.CheckpointMismatchError(
            f"{key!r} differs from {tied_to!r}: an untied MLM decoder cannot be imported into "
            "our tied one (import with with_mlm_head=False).")

  flat, stacked = {}, {}
  for key, path, kind, group, idx in entries:
    if not in_ckpt[group]:
      continue
    s = abstract[path].shape
    v = _to_ours(kind, np.asarray(state[key], np.float32), s[1:] if idx is not None else s)
    if idx is None:
      flat[path] = v
    else:
      stacked.setdefault(path, [None] * model.num_layers)[idx] = v
  flat.update({path: np.stack(vs) for path, vs in stacked.items()})

  fresh = [g for g in ("pooler", "mlm") if not in_ckpt[g] and
           (model.with_pooler if g == "pooler" else model.with_mlm_head)]
  if fresh:
    logging.info("HF BERT import: head(s) absent from the checkpoint, initialised fresh: %s",
                 ", ".join(fresh))
    rng = jax.random.key(0) if rng is None else rng
    init = flax.traverse_util.flatten_dict(nn.unbox(
        jax.jit(model.init)(rng, jnp.zeros((1, 2), jnp.int32)))["params"])
    for key, path, kind, group, idx in entries:
      if group in fresh:
        flat[path] = np.asarray(init[path])
  assert set(flat) == set(abstract), set(flat) ^ set(abstract)
  return flax.traverse_util.unflatten_dict(flat)


def load_hf_bert(path_or_id: str, *, rng: Optional[jax.Array] = None,
                 **overrides) -> tuple[bert_lib.Bert, dict]:
  """An HF BERT directory -> (Bert module, params). Overrides: with_pooler, dtype, scan, ..."""
  config, state = hf_io.load_hf_checkpoint(path_or_id)
  model = bert_from_hf_config(config, **overrides)
  return model, convert_hf_bert_state(state, model, rng)


def export_bert_state(params, model: bert_lib.Bert,
                      architecture: str = "BertModel") -> dict[str, np.ndarray]:
  """Our params -> the flat state dict of a transformers `architecture` (bit-identical arrays)."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
  if architecture == "BertModel" and not model.with_pooler:
    raise ValueError("BertModel has a pooler but this model has none (with_pooler=False): it "
                     "would be left randomly initialised. Export as 'BertForMaskedLM' instead.")
  if architecture == "BertForMaskedLM" and not model.with_mlm_head:
    raise ValueError("BertForMaskedLM needs the MLM head; this model has with_mlm_head=False.")
  flat = flax.traverse_util.flatten_dict(nn.unbox(flax.core.unfreeze(params)))
  state = {}
  for key, path, kind, group, idx in _key_map(model):
    if architecture == "BertModel" and group == "mlm":
      continue
    if architecture == "BertForMaskedLM" and group == "pooler":
      continue
    v = np.asarray(jax.device_get(flat[path]), np.float32)
    v = v[idx] if idx is not None else v
    prefix = "" if architecture == "BertModel" or group == "mlm" else "bert."
    state[prefix + key] = _to_hf(kind, v)
  if architecture == "BertForMaskedLM" and model.with_pooler:
    logging.info("HF BERT export: BertForMaskedLM has no pooler; the pooler is not exported.")
  return state


def export_hf_bert(params, model: bert_lib.Bert, out_dir: Union[str, os.PathLike], *,
                   tokenizer: Any = None, architecture: str = "BertModel",
                   overwrite: bool = False) -> pathlib.Path:
  """Writes a transformers `architecture` directory loadable with `.from_pretrained(out_dir)`.

  Args:
    params: our params tree for `model`.
    model: the Bert module (its fields become config.json).
    out_dir: target directory; must be empty or absent unless `overwrite`.
    tokenizer: None, a tokenizer object with `save_pretrained`, or a path to a tokenizer
      directory (loaded with transformers.AutoTokenizer) whose files are copied alongside.
    architecture: 'BertModel' (encoder + pooler) or 'BertForMaskedLM' (encoder + MLM head).
    overwrite: replace the contents of a non-empty `out_dir`.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  state = export_bert_state(params, model, architecture)
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
  if tokenizer is not None and len(tokenizer) > model.vocab_size:
    raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                     f"{model.vocab_size}.")
  out = hf_io.prepare_export_dir(str(out_dir), overwrite)
  transformers.BertConfig(**hf_bert_config(model, architecture)).save_pretrained(str(out))
  hf_io.save_safetensors(state, out / "model.safetensors")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out))
  return out
