"""FashionCLIP initialised directly sharded on 8 CPU devices (data=2, fsdp=2, tensor=2).

Shardings come from the params' logical axis names and parallel.axes.DEFAULT_RULES through
jax.eval_shape (no allocation) and jax.jit(init, out_shardings=...), so no device ever holds the
full model; the sharded forward equals the single-device one.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fashion_jax.models import clip as clip_lib
from fashion_jax.parallel.axes import DEFAULT_RULES, MESH_AXES
from tests import numerics


def _config(scan):
  return clip_lib.clip_config(
      "tiny", projection_dim=32, scan=scan,
      vision=dict(width=64, num_layers=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32),
      text=dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=500, max_len=12,
                eos_token_id=499))


# Both layouts run by default; the unrolled one is marked slow (deselect with -m "not slow").
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_init_and_forward_match_single_device(scan):
  assert len(jax.devices()) >= 8
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), MESH_AXES)
  config = _config(scan)
  init = functools.partial(clip_lib.init_params, config)
  rng = jax.random.PRNGKey(0)

  abstract = jax.eval_shape(init, rng)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
  params = nn.unbox(jax.jit(init, out_shardings=shardings)(rng))

  # The parameters really are split: addressable shards are fractions of the full arrays.
  vis = params["vision"]["encoder"]
  fc1 = vis["layers"]["mlp"]["fc1"]["kernel"] if scan else vis["layers_0"]["mlp"]["fc1"]["kernel"]
  full = fc1.shape  # [(N,) 64, 128] axes ((layers,) embed -> fsdp, mlp -> tensor)
  assert fc1.addressable_shards[0].data.shape == full[:-2] + (full[-2] // 2, full[-1] // 2)
  assert fc1.sharding.spec[-2:] == ("fsdp", "tensor")
  tok = params["text"]["token_embedding"]["embedding"]  # [vocab, D] -> (tensor, fsdp)
  assert tok.addressable_shards[0].data.shape == (250, 16)
  q = params["text"]["encoder"]["layers" if scan else "layers_1"]["attn"]["query"]["kernel"]
  assert q.addressable_shards[0].data.shape[-3:] == (16, 2, 8)  # [D/fsdp, H/tensor, Dh]
  n_split = sum(a.addressable_shards[0].data.size < a.size for a in jax.tree.leaves(params))
  assert n_split > len(jax.tree.leaves(params)) // 2

  # Same values as an unsharded init with the same key.
  reference = jax.device_get(nn.unbox(jax.jit(init)(rng)))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference)

  # Forward with a batch sharded over (data, fsdp) and activation constraints active.
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  ids = rs.randint(0, 499, (8, 12)).astype(np.int32)
  ids[np.arange(8), rs.randint(3, 12, 8)] = 499
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  model = clip_lib.CLIPModel(config)

  def forward(p, x, t):
    with nn.logical_axis_rules(DEFAULT_RULES):
      return model.apply({"params": p}, x, t)

  with jax.set_mesh(mesh):
    args = (params, jax.device_put(images, batch_sharding), jax.device_put(ids, batch_sharding))
    # The activation constraints (act_batch -> (data, fsdp), act_mlp -> tensor ...) are live.
    assert jax.jit(forward).lower(*args).as_text().count("sharding_constraint") > 10
    sharded = jax.jit(forward)(*args)
  single = jax.jit(forward)(jax.device_put(reference, jax.devices()[0]), images, ids)
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    # Up to float32 rounding of the widest contraction, mlp_dim = 128 (tests/numerics.py).
    numerics.assert_rounding_close(np.asarray(sharded[key]), np.asarray(single[key]), 128,
                                   what=key)
  assert sharded["image_embeds"].sharding.spec[0] == ("data", "fsdp")
