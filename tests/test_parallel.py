"""Mesh construction, logical sharding rules, global batches, and mesh equivalence of training."""

import os
import socket
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from fashion_jax import systems
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import config_check
from fashion_jax.train import loop
from fashion_jax.train import state as state_lib
from tests import toy_system


def test_eight_fake_devices():
  assert len(jax.devices()) == 8 and jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("config,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"data": -1, "fsdp": 2}, (4, 2, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": 1, "tensor": 1}, (1, 1, 1)),
])
def test_mesh_shape(config, expected):
  mesh = mesh_lib.create_mesh(config)
  assert tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")) == expected
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh.size == np.prod(expected)


@pytest.mark.parametrize("config,match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"product of the fixed axes \(3\) does not divide the 8"),
    ({"data": -1, "fsdp": 3}, r"'fsdp': 3.*does not divide the 8"),
    ({"data": -1, "fsdp": -1}, r"-1 on several axes \['data', 'fsdp'\]"),
    ({"data": -1, "model": 2}, r"Unknown mesh axis 'model'"),
    ({"data": 0}, r"config.mesh.data=0"),
])
def test_mesh_errors(config, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.create_mesh(config)


def test_rules_validation():
  assert sharding_lib.logical_rules(None)[0][0] == "act_batch"
  rules = sharding_lib.logical_rules([["embed", ["fsdp", "tensor"]], ("mlp", None)])
  assert rules == (("embed", ("fsdp", "tensor")), ("mlp", None))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding_lib.logical_rules([("embed", "model")])
  with pytest.raises(ValueError, match=r"'embed'.*not a \(logical_name, mesh_axes\) pair"):
    sharding_lib.logical_rules(["embed"])


def _toy_config(**model):
  config = toy_system.get_config()
  config.model.update(model)
  return config_check.with_defaults(config)


def _shapes(config, mesh_config, rules=None):
  mesh = mesh_lib.create_mesh(mesh_config)
  system = systems.get_system(config)
  return state_lib.abstract_params(system, mesh, sharding_lib.logical_rules(rules), 0)


def test_param_shardings_follow_rules_and_replicate_uneven_dims():
  shapes = _shapes(_toy_config(dim_a=6), {"data": 2, "fsdp": 2, "tensor": 2})
  specs = {sharding_lib.path_str(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shapes.shardings)}
  assert specs["params/tower_b/dense_in/kernel"] == P("fsdp", "tensor")      # 12 x 32
  assert specs["params/tower_a/dense_in/kernel"] == P("fsdp", "tensor")      # 6 x 32
  assert specs["params/tower_b/dense_out/kernel"] == P("tensor", "fsdp")     # 32 x 16
  assert specs["params/tower_a/norm/scale"] == P("tensor")
  assert specs["params/logit_scale"] == P()
  # dim_a = 6 is divisible by fsdp=2 but not by a 4-way fsdp: that dim is replicated.
  shapes = _shapes(_toy_config(dim_a=6), {"data": 2, "fsdp": 4, "tensor": 1})
  specs = {sharding_lib.path_str(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shapes.shardings)}
  assert specs["params/tower_a/dense_in/kernel"] == P(None, "tensor")
  assert specs["params/tower_b/dense_in/kernel"] == P("fsdp", "tensor")
  # A multi-axis assignment keeps the axes that divide: 6 over ('fsdp', 'tensor') = 2 x 2 -> fsdp.
  shapes = _shapes(_toy_config(dim_a=6), {"data": 2, "fsdp": 2, "tensor": 2},
                   rules=[("embed", ("fsdp", "tensor")), ("mlp", None), ("act_batch", "data"),
                          ("act_embed", None), ("act_mlp", None)])
  specs = {sharding_lib.path_str(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shapes.shardings)}
  assert specs["params/tower_a/dense_in/kernel"] == P("fsdp")
  assert specs["params/tower_b/dense_in/kernel"] == P(("fsdp", "tensor"))


def test_unknown_logical_name_is_an_error():
  with pytest.raises(ValueError, match=r"Parameter params/tower_a/dense_in/bias uses logical axis .mlp., which no rule"):
    _shapes(_toy_config(), {"data": -1}, rules=[("embed", "fsdp"), ("act_batch", "data")])


def test_global_batch_values_and_sharding():
  mesh = mesh_lib.create_mesh({"data": 4, "fsdp": 2})
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "ids": np.arange(16, dtype=np.int32)}
  batch = sharding_lib.global_batch(local, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["x"].addressable_shards) == 8
  assert batch["x"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  np.testing.assert_array_equal(np.asarray(batch["ids"]), local["ids"])
  with pytest.raises(ValueError, match="'s' is a scalar"):
    sharding_lib.global_batch({"s": np.float32(1)}, mesh)


def _run_steps(mesh_config):
  config = _toy_config()
  config.optimizer.lr = 0.01
  return toy_system.run_steps(config, mesh_config, num_steps=3)


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps({"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("mesh_config", [{"data": 4, "fsdp": 2, "tensor": 1},
                                         {"data": 2, "fsdp": 2, "tensor": 2}])
def test_mesh_equivalence(mesh_config, single_device_run):
  ref_losses, ref_params, ref_state = single_device_run
  assert len(ref_state.params["params"]["logit_scale"].devices()) == 1
  losses, params, state = _run_steps(mesh_config)
  # The run really is sharded: kernels and Adam moments split over fsdp (and tensor).
  kernel = state.params["params"]["tower_a"]["dense_in"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert len(kernel.devices()) == 8
  mu_specs = {s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding,
                                                           state.opt_state))}
  assert kernel.sharding.spec in mu_specs
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  assert losses[-1] < losses[0]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """jax.distributed on localhost: 2 processes x 4 CPU devices == 1 process x 8 devices."""

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.toy_system", "--config=tests/toy_system.py",
       f"--workdir={workdir}", "--config.distributed=True", "--config.total_steps=3",
       "--config.mesh.fsdp=2", f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=repo, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 prints the run's summary (launch/train.py).
  assert "Finished at step 3" in outs[0][0]
  assert "Finished at step" not in outs[1][0]

  config = toy_system.get_config()
  config.total_steps = 3
  config.mesh.fsdp = 2
  ref = loop.train_and_evaluate(config, str(tmp_path / "single"),
                                iterator_factory=toy_system.make_iterator).state
  ckpt = checkpoint_lib.Checkpointer(str(workdir), keep=2)
  try:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            ref)
    state, data = ckpt.restore(3, abstract)
  finally:
    ckpt.close()
  assert data == {"step": 3, "position": 3}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(ref.params)),
                          jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
