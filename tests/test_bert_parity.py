"""BERT parity: tiny random transformers BERTs imported into our Flax Bert, and exported back."""

import functools
import json
import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_jax.interop import hf_bert
from fashion_jax.interop import hf_io
from fashion_jax.models import bert as bert_lib

CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
         intermediate_size=64, max_position_embeddings=40),
    dict(vocab_size=71, hidden_size=48, num_attention_heads=3, num_hidden_layers=3,
         intermediate_size=80, max_position_embeddings=24, type_vocab_size=3),
    dict(vocab_size=64, hidden_size=24, num_attention_heads=2, num_hidden_layers=1,
         intermediate_size=40, max_position_embeddings=16, hidden_act="gelu_new",
         layer_norm_eps=1e-7),
]
WORDS = ["red", "shoes", "with", "black", "heel", "a", "dress", "silk", "blue", "shirt"]


def _make_hf(tmp_path, cls=transformers.BertModel, seed=0, **kw):
  torch.manual_seed(seed)
  model = cls(transformers.BertConfig(**kw)).eval()
  # Non-trivial LayerNorm and bias values, so that a swapped or dropped parameter shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model


def _inputs(kw, batch=3, length=11, seed=0):
  rng = np.random.default_rng(seed)
  length = min(length, kw["max_position_embeddings"])
  ids = rng.integers(1, kw["vocab_size"], (batch, length))
  lengths = np.array([length, length // 2 + 1, 3])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  ids = ids * mask  # [PAD] = 0 after each sequence.
  types = rng.integers(0, kw.get("type_vocab_size", 2), (batch, length)) * mask
  return ids, mask, types


def _torch(hf, ids, mask, types):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              token_type_ids=torch.from_numpy(types))


def _apply(model, variables, *args, **kwargs):
  """model.apply under jit (one compilation instead of one per eager op: keeps the tests fast)."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


@pytest.mark.parametrize("kw,scan", [(CONFIGS[0], False), (CONFIGS[1], False),
                                     (CONFIGS[2], False), (CONFIGS[1], True)])
def test_hidden_states_and_pooler_match_torch(tmp_path, kw, scan):
  hf = _make_hf(tmp_path, **kw)
  model, params = hf_bert.load_hf_bert(str(tmp_path), scan=scan)
  ids, mask, types = _inputs(kw)
  ref = _torch(hf, ids, mask, types)
  out = _apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask),
               jnp.asarray(types))
  # Every position, padding included: only keys are masked, as in BERT.
  np.testing.assert_allclose(np.asarray(out["hidden"]), np.asarray(ref.last_hidden_state),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["pooled"], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_mlm_logits_match_bert_for_masked_lm(tmp_path, caplog):
  kw = CONFIGS[0]
  hf = _make_hf(tmp_path, transformers.BertForMaskedLM, seed=1, **kw)
  with caplog.at_level(logging.INFO):
    model, params = hf_bert.load_hf_bert(str(tmp_path))
  # BertForMaskedLM has no pooler: ours is initialised fresh, and says so.
  assert "initialised fresh: pooler" in caplog.text
  ids, mask, types = _inputs(kw, seed=1)
  ref = _torch(hf, ids, mask, types).logits.numpy()
  variables = {"params": params}
  hidden = _apply(model, variables, jnp.asarray(ids), jnp.asarray(mask),
                       jnp.asarray(types))["hidden"]
  logits = _apply(model, variables, hidden, method=bert_lib.Bert.mlm_logits)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4, rtol=1e-4)
  # Tied: the decoder is the word embedding table.
  np.testing.assert_array_equal(params["word_embeddings"]["embedding"],
                                hf.cls.predictions.decoder.weight.detach().numpy())


def test_pretraining_checkpoint_ignores_nsp_head(tmp_path, caplog):
  kw = CONFIGS[1]
  hf = _make_hf(tmp_path, transformers.BertForPreTraining, seed=2, **kw)
  with caplog.at_level(logging.INFO):
    model, params = hf_bert.load_hf_bert(str(tmp_path))
  assert "not modelled: cls.seq_relationship." in caplog.text
  ids, mask, types = _inputs(kw, seed=2)
  with torch.no_grad():
    hidden_ref = hf.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         token_type_ids=torch.from_numpy(types))
    logits_ref = hf.cls.predictions(hidden_ref.last_hidden_state).numpy()
  out = _apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask),
               jnp.asarray(types))
  np.testing.assert_allclose(out["pooled"], hidden_ref.pooler_output.numpy(), atol=1e-4)
  logits = _apply(model, {"params": params}, out["hidden"], method=bert_lib.Bert.mlm_logits)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), atol=1e-4,
                             rtol=1e-4)


def test_old_bin_checkpoint_with_gamma_beta(tmp_path):
  """A pytorch_model.bin in the original Google layout (LayerNorm.gamma/beta) imports the same."""
  hf = _make_hf(tmp_path, transformers.BertForPreTraining, seed=3, **CONFIGS[2])
  _, params = hf_bert.load_hf_bert(str(tmp_path))
  old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                  "LayerNorm.beta"): v
         for k, v in hf.state_dict().items()}
  assert any(k.endswith("gamma") for k in old)
  (tmp_path / "model.safetensors").unlink()
  torch.save(old, tmp_path / "pytorch_model.bin")
  _, params_bin = hf_bert.load_hf_bert(str(tmp_path))
  flat, flat_bin = (flax.traverse_util.flatten_dict(p) for p in (params, params_bin))
  assert set(flat) == set(flat_bin)
  for k, v in flat.items():
    np.testing.assert_array_equal(v, flat_bin[k], err_msg=str(k))


def test_fusion_path_equals_call():
  """embed_text + concatenated extra tokens + encode: the path fusion models use."""
  model = bert_lib.bert("tiny", vocab_size=50, max_position=16, num_layers=1)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 5)))
  params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
  v = {"params": params}
  text = _apply(model, v, ids, method=bert_lib.Bert.embed_text)
  np.testing.assert_allclose(_apply(model, v, text, method=bert_lib.Bert.encode),
                             _apply(model, v, ids)["hidden"], atol=1e-6)
  img = jax.random.normal(jax.random.key(1), (2, 3, 128))
  mask = jnp.array([[1] * 8, [1] * 4 + [0] + [1] * 3])
  joint = _apply(model, v, jnp.concatenate([text, img], 1), mask, method=bert_lib.Bert.encode)
  assert joint.shape == (2, 8, 128)
  # The text-only prefix of the second example ignores the masked text token: changing it
  # does not move any other position.
  ids2 = ids.at[1, 4].set((ids[1, 4] + 1) % 50)
  text2 = _apply(model, v, ids2, method=bert_lib.Bert.embed_text)
  joint2 = _apply(model, v, jnp.concatenate([text2, img], 1), mask, method=bert_lib.Bert.encode)
  keep = np.array([0, 1, 2, 3, 5, 6, 7])
  np.testing.assert_allclose(joint2[1, keep], joint[1, keep], atol=1e-6)
  assert not np.allclose(joint2[1, 4], joint[1, 4])
  with pytest.raises(ValueError, match="exceeds max_position=16"):
    _apply(model, v, jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
  model = bert_lib.bert("tiny", vocab_size=30, max_position=8, scan=scan)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(boxed))
  shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed))
  assert set(specs) == set(shapes)
  for path, spec in specs.items():
    assert len(spec) == len(shapes[path].shape), path
  assert specs[("word_embeddings", "embedding")] == jax.sharding.PartitionSpec("vocab", "embed")
  qkv = ("encoder", "layers", "attn", "query", "kernel") if scan else (
      "encoder", "layers_0", "attn", "query", "kernel")
  want = ("layers", "embed", "heads", "kv") if scan else ("embed", "heads", "kv")
  assert specs[qkv] == jax.sharding.PartitionSpec(*want)


def _random_params(model, seed):
  """Our model with every parameter random (not BERT's LN=1 / bias=0 init)."""
  params = flax.linen.unbox(
      jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in
                                   zip(keys, leaves)])


def _tokenizer():
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
  return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


@pytest.mark.parametrize("scan", [False, True])
def test_export_round_trip_bert_model(tmp_path, scan):
  model = bert_lib.bert("tiny", vocab_size=40, max_position=32, num_layers=2, mlp_dim=96,
                        hidden_size=32, num_heads=4, scan=scan)
  params = _random_params(model, 0)
  out = hf_bert.export_hf_bert(params, model, tmp_path / "export", tokenizer=_tokenizer())
  hf = transformers.BertModel.from_pretrained(str(out)).eval()
  ours = hf_bert.export_bert_state(params, model)
  theirs = hf.state_dict()
  assert set(ours) == {k for k in theirs if not k.endswith(("position_ids", "token_type_ids"))}
  for k, v in ours.items():
    np.testing.assert_array_equal(theirs[k].numpy(), v, err_msg=k)
  # The same strings through the exported tokenizer on both sides.
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tok(["red shoes with black heel", "a blue silk dress"], padding=True,
            return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert ids[0, 0] == 2 and ids[0, 1] == 5  # [CLS] red
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  got = _apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got["hidden"]), np.asarray(ref.last_hidden_state),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got["pooled"], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  # And back: re-importing the export gives the same parameters, bit for bit.
  _, params2 = hf_bert.load_hf_bert(str(out), scan=scan, with_mlm_head=False)
  flat, flat2 = (flax.traverse_util.flatten_dict(p) for p in (params, params2))
  assert set(flat2) == {p for p in flat if not p[0].startswith("mlm")}
  for p, b in flat2.items():
    np.testing.assert_array_equal(np.asarray(flat[p]), np.asarray(b), err_msg=str(p))


def test_export_round_trip_masked_lm(tmp_path):
  model = bert_lib.bert("tiny", vocab_size=30, max_position=16, num_layers=1, hidden_size=16,
                        num_heads=2, mlp_dim=24, act="gelu_tanh")
  params = _random_params(model, 3)
  out = hf_bert.export_hf_bert(params, model, tmp_path, architecture="BertForMaskedLM")
  hf = transformers.BertForMaskedLM.from_pretrained(str(out)).eval()
  ids, mask, types = _inputs(dict(vocab_size=30, max_position_embeddings=16), seed=4)
  ref = _torch(hf, ids, mask, types).logits.numpy()
  v = {"params": params}
  hidden = _apply(model, v, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))["hidden"]
  logits = _apply(model, v, hidden, method=bert_lib.Bert.mlm_logits)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_export_refuses_non_empty_dir(tmp_path):
  model = bert_lib.bert("tiny", vocab_size=20, max_position=8, num_layers=1, hidden_size=16,
                        mlp_dim=16)
  params = _random_params(model, 5)
  (tmp_path / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty"):
    hf_bert.export_hf_bert(params, model, tmp_path)
  # Overwrite never deletes the user's own files (issue #16 item 3).
  with pytest.raises(FileExistsError, match=r"notes\.txt, which no export writes"):
    hf_bert.export_hf_bert(params, model, tmp_path, overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "keep me"
  (tmp_path / "notes.txt").unlink()
  hf_bert.export_hf_bert(params, model, tmp_path)
  hf_bert.export_hf_bert(params, model, tmp_path, overwrite=True)
  assert (tmp_path / "model.safetensors").exists()
  with pytest.raises(ValueError, match="with_pooler=False"):
    no_pooler = model.clone(with_pooler=False)
    hf_bert.export_hf_bert(_random_params(no_pooler, 0), no_pooler, tmp_path / "b")


def _edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


def test_wrong_shape_names_key_and_shapes(tmp_path):
  _make_hf(tmp_path, **CONFIGS[0])
  _edit_config(tmp_path, intermediate_size=72)
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"layer\.0\.intermediate\.dense\.weight.*\(64, 32\).*\(72, 32\)"):
    hf_bert.load_hf_bert(str(tmp_path))


def test_missing_layer_and_wrong_architecture(tmp_path):
  _make_hf(tmp_path, **CONFIGS[0])
  _edit_config(tmp_path, num_hidden_layers=3)
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"missing key 'encoder\.layer\.2\.attention\.self\.query\.weight'"):
    hf_bert.load_hf_bert(str(tmp_path))
  _edit_config(tmp_path, num_hidden_layers=2, model_type="roberta")
  with pytest.raises(hf_io.CheckpointMismatchError, match="model_type 'roberta'"):
    hf_bert.load_hf_bert(str(tmp_path))


def test_untied_decoder_is_an_error(tmp_path):
  kw = CONFIGS[2]
  hf = _make_hf(tmp_path, transformers.BertForMaskedLM, **kw)
  state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
  hf_io.save_safetensors(state, tmp_path / "model.safetensors")
  with pytest.raises(hf_io.CheckpointMismatchError, match="untied MLM decoder"):
    hf_bert.load_hf_bert(str(tmp_path))
  # Without the MLM head the rest imports.
  model, _ = hf_bert.load_hf_bert(str(tmp_path), with_mlm_head=False, with_pooler=False)
  assert not model.with_mlm_head
