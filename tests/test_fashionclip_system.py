"""The FashionCLIP recipe end to end through the trainer's pieces.

- three training steps on 8 CPU devices, meshes (data=4, fsdp=2) and (data=2, fsdp=2, tensor=2),
  give the loss and parameters of one device on the same global batch (1e-5);
- `init.hf_clip_dir` starts training from a transformers CLIPModel's weights, exactly;
- a model whose vocabulary disagrees with the tokenizer cannot be configured.
"""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import torch
import transformers

from fashion_jax.data import tokenizers
from fashion_jax.interop import hf_clip
from fashion_jax.systems import fashionclip
from tests import toy_system

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config():
  c = load_config("fashionclip", "smoke")
  c.data.image_size = 32
  c.data.max_len = 16
  c.model.projection_dim = 16
  c.model.vision = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8)
  c.model.text = dict(width=32, num_layers=2, num_heads=2, mlp_dim=64)
  c.batch_size = 16
  c.optimizer.schedule.warmup_steps = 1
  c.evals = {}
  c.checkpoint.best_metric = None
  return c


def batch_fn(config):
  tok = tokenizers.get_tokenizer("clip", "", config.data.max_len)
  words = ["red", "navy", "striped", "linen", "shirt", "dress", "loafers", "wool", "bag", "coat"]

  def make(step):
    rng = np.random.default_rng(step)
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(config.batch_size)]
    s = config.data.image_size
    return {"image": rng.integers(0, 256, (config.batch_size, s, s, 3), dtype=np.uint8),
            "text": tok(texts)}
  return make


def _assert_same_run(run, ref):
  """Two toy_system.run_steps results: losses and final params within 1e-5."""
  np.testing.assert_allclose(run[0], ref[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(run[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def single_device_run():
  config = tiny_config()
  return toy_system.run_steps(config, {"data": 1, "fsdp": 1, "tensor": 1}, num_steps=3,
                              batch_fn=batch_fn(config))


@pytest.mark.parametrize("mesh_config", [
    {"data": 4, "fsdp": 2, "tensor": 1},
    # Slow job (default run time): ~25 s; the tensor axis is also checked by test_siglip's
    # sharded step and test_sigmoid_loss's ring over (data, fsdp, tensor).
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow)])
def test_fashionclip_steps_on_a_mesh_equal_one_device(single_device_run, mesh_config):
  config = tiny_config()
  losses, params, state = toy_system.run_steps(config, mesh_config, num_steps=3,
                                               batch_fn=batch_fn(config))
  assert single_device_run[0][2] < single_device_run[0][0]  # It trains.
  _assert_same_run((losses, params), single_device_run)
  # The big matrices really are split over the mesh.
  kernel = state.params["text"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape


def test_pooled_last_layer_trains_as_the_full_model_on_a_mesh(single_device_run):
  """model.pooled_last_layer=True, sharded over (data 4, fsdp 2): the same losses and params as
  the full last layers on one device (the skipped tokens never reach the loss)."""
  config = tiny_config()
  config.model.pooled_last_layer = True
  run = toy_system.run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1}, num_steps=3,
                             batch_fn=batch_fn(config))
  _assert_same_run(run, single_device_run)


def test_pooled_last_layer_is_refused_for_siglip():
  config = tiny_config()
  config.model.family = "siglip"
  config.model.pooled_last_layer = True
  with pytest.raises(ValueError, match="pooled_last_layer=True with model.family='siglip'"):
    fashionclip.model_config(config)


def _tiny_hf_clip(tmp_path, vocab_size, max_len):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=max_len, eos_token_id=vocab_size - 1,
                       bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=16)
  model = transformers.CLIPModel(cfg).eval()
  model.save_pretrained(tmp_path)
  return model


def test_init_from_hf_clip_dir_starts_from_its_weights(tmp_path):
  tok = tokenizers.get_tokenizer("clip", "", 16)
  _tiny_hf_clip(tmp_path, tok.vocab_size, 16)
  config = tiny_config()
  config.init.hf_clip_dir = str(tmp_path)
  config.model.vision = None
  config.model.text = None
  config.optimizer.lr = 0.0  # Zero updates: the state after a step is the initial state.
  config.optimizer.weight_decay = 0.0
  _, params, _ = toy_system.run_steps(config, {"data": 2, "fsdp": 2, "tensor": 2}, num_steps=1,
                                      batch_fn=batch_fn(config))
  _, expected = hf_clip.load_clip(str(tmp_path))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  assert len(flat) == len(exp)
  for path, value in flat:
    np.testing.assert_array_equal(value, exp[path])


def test_hf_clip_dir_with_another_vocabulary_is_refused(tmp_path):
  _tiny_hf_clip(tmp_path, 1000, 16)
  config = tiny_config()
  config.init.hf_clip_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"text vocabulary of 1000 tokens but data.tokenizer"):
    fashionclip.System(config)
