"""ResNet parity: tiny random transformers ResNetModels imported into our Flax ResNet."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_resnet
from fashion_jax.models import resnet as resnet_lib


def _randomise_bn(model, seed):
  """HF initialises BN to the identity; random stats make the BN mapping observable."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
        m.bias.copy_(0.3 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _make_hf(tmp_path, seed=0, head=False, **config_kw):
  torch.manual_seed(seed)
  config = transformers.ResNetConfig(**config_kw)
  cls = transformers.ResNetForImageClassification if head else transformers.ResNetModel
  model = cls(config).eval()
  _randomise_bn(model, seed)
  model.save_pretrained(tmp_path)
  return model


CONFIGS = [
    # (ResNetConfig kwargs, image H, W)
    (dict(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 2, 1, 1],
          layer_type="bottleneck"), 64, 64),
    (dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 1, 2],
          layer_type="basic"), 40, 56),
    (dict(embedding_size=12, hidden_sizes=[16, 24, 48], depths=[1, 1, 2], layer_type="bottleneck",
          downsample_in_bottleneck=True, downsample_in_first_stage=True, num_channels=4), 45, 33),
]


@pytest.mark.parametrize("config_kw,h,w", CONFIGS)
def test_grid_and_pooled_match_torch(tmp_path, config_kw, h, w):
  hf = _make_hf(tmp_path, **config_kw)
  model, variables = hf_resnet.load_hf_resnet(str(tmp_path))
  c = config_kw.get("num_channels", 3)
  x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(x))
  out = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  ref_grid = ref.last_hidden_state.numpy().transpose(0, 2, 3, 1)
  assert out["grid"].shape == ref_grid.shape
  np.testing.assert_allclose(out["grid"], ref_grid, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["pooled"], ref.pooler_output.numpy()[:, :, 0, 0], atol=1e-4,
                             rtol=1e-4)


def test_train_mode_batch_statistics_match_torch(tmp_path):
  kw = CONFIGS[0][0]
  hf = _make_hf(tmp_path, seed=1, **kw)
  model, variables = hf_resnet.load_hf_resnet(str(tmp_path))
  x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
  hf.train()
  with torch.no_grad():
    ref = hf(torch.from_numpy(x)).last_hidden_state.numpy().transpose(0, 2, 3, 1)
  train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  out, updates = train_apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(out["grid"], ref, atol=1e-4, rtol=1e-4)
  # Running means move the way torch's do (momentum 0.1 towards the batch mean).
  np.testing.assert_allclose(updates["batch_stats"]["stem_bn"]["mean"],
                             hf.embedder.embedder.normalization.running_mean.numpy(), atol=1e-5)


def test_classification_checkpoint_drops_head_and_export_is_exact(tmp_path):
  hf = _make_hf(tmp_path, head=True, num_labels=5, **CONFIGS[1][0])
  model, variables = hf_resnet.load_hf_resnet(str(tmp_path))
  state = hf_resnet.export_resnet_state(variables, model)
  ref = hf.resnet.state_dict()
  assert set(state) == set(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)


def test_resnet50_layout_and_param_count():
  model = resnet_lib.resnet("resnet50")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), shapes)
  assert out["grid"].shape == (2, 7, 7, 2048) and out["pooled"].shape == (2, 2048)
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  hf = transformers.ResNetModel(transformers.ResNetConfig())
  theirs = sum(p.numel() for p in hf.parameters())
  assert ours == theirs
  # Logical axes on every parameter.
  specs = jax.tree.leaves(
      nn.get_partition_spec(shapes["params"]),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert all(s in (jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out"),
                   jax.sharding.PartitionSpec("norm")) for s in specs)


def test_zero_init_last_bn():
  model = resnet_lib.resnet("tiny", zero_init_last_bn=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = nn.unbox(params)
  assert not np.any(params["stage0_block0"]["bn_1"]["scale"])
  assert np.all(params["stage0_block0"]["bn_0"]["scale"] == 1)


def test_wrong_shape_names_key_and_shapes(tmp_path):
  _make_hf(tmp_path, **CONFIGS[0][0])
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["embedding_size"] = 10  # Architecture says 10 stem channels, weights have 8.
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"embedder\.convolution\.weight.*\(8, 3, 7, 7\).*\(10, 3, 7, 7\)"):
    hf_resnet.load_hf_resnet(str(tmp_path))


def test_missing_block_and_wrong_family_are_errors(tmp_path):
  _make_hf(tmp_path, **CONFIGS[0][0])
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["depths"] = [1, 3, 1, 1]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"missing key 'encoder\.stages\.1\.layers\.2\.layer\.0\.convolution"):
    hf_resnet.load_hf_resnet(str(tmp_path))
  cfg["model_type"] = "bert"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_io.CheckpointMismatchError, match="model_type 'bert'"):
    hf_resnet.load_hf_resnet(str(tmp_path))
