"""E2 system: regional loss vs float64 references, FashionCLIP equivalence, two-stage freezing,
pretrained init (HF CLIP dir, earlier checkpoint), and sharded steps == one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import e2 as e2_configs
from configs import fashionclip as fc_configs
from fashion_jax import systems
from fashion_jax.interop import hf_clip
from fashion_jax.losses import contrastive
from fashion_jax.losses import regional
from fashion_jax.models import clip as clip_lib
from fashion_jax.models import e2 as e2_lib
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.checkpoint import manager as checkpoint_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib

BRANDS = ["Oakhurst", "Ivo Marchetti", "Brisa Marin"]
SEASONS = ["SS2014", "FW2018"]
SUBCATS = ["parkas", "gloves", "pumps", "backpacks"]
COMPOSITIONS = ["100% wool", "60% silk, 40% modal", "100% leather"]


def _shrink(c):
  c.model.vision = dict(width=32, num_layers=3, num_heads=2, mlp_dim=64, patch_size=8)
  c.model.text = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64)
  c.model.projection_dim = 16
  c.data.image_size = 32
  c.data.max_len = 16
  c.batch_size = 8
  return config_check.with_defaults(c)


def _config(arg="smoke", entities=("brand", "season")):
  """A tiny E2 (2 entities x 1 token, fusion after blocks 1 and 2 of 3) for fast compiles."""
  c = _shrink(e2_configs.get_config(arg))
  if c.model.entities:
    c.model.entities = c.data.tag_fields = tuple(entities)
    c.model.tokens_per_entity = 1
    c.model.fusion_after = (1, 2)
  c.objective.tag_max_len = 8
  c.optimizer.schedule.warmup_steps = 0
  c.optimizer.lr = 1e-3
  return c


def _batch(system, step=0, batch_size=8, empty_brand_rows=()):
  rs = np.random.RandomState(100 + step)
  tok = system.tokenizer
  rows = []
  for i in range(batch_size):
    tags = [BRANDS[rs.randint(3)], SEASONS[rs.randint(2)], SUBCATS[rs.randint(4)],
            COMPOSITIONS[rs.randint(3)]]
    if i in empty_brand_rows:
      tags[0] = ""
    rows.append(tags)
  texts = [f"{t[3]} {t[2]} by {t[0]}, {t[1]}" for t in rows]
  out = {"image": rs.randint(0, 256, (batch_size, 32, 32, 3)).astype(np.uint8),
         "text": tok(texts)}
  entities = system.model_config.entities
  if system.uses_tags:
    cols = [e2_configs.ENTITIES.index(e) for e in entities]
    flat = [r[c] for r in rows for c in cols]
    out["tags"] = tok(flat).reshape(batch_size, len(entities), -1)
  return out


# --- the regional loss ------------------------------------------------------------------------
def _np_masked_nce(a, b, scale, same, valid):
  a, b = a.astype(np.float64), b.astype(np.float64)
  logits = scale * a @ b.T
  n = len(a)
  allowed = (~same | np.eye(n, dtype=bool)) & valid[:, None] & valid[None, :]
  total = 0.0
  for i in np.flatnonzero(valid):
    row = logits[i][allowed[i]]
    col = logits[:, i][allowed[:, i]]
    lse = lambda x: np.log(np.sum(np.exp(x - x.max()))) + x.max()
    total += 0.5 * (lse(row) - logits[i, i]) + 0.5 * (lse(col) - logits[i, i])
  return total / valid.sum()


def test_masked_info_nce_matches_float64_reference_and_info_nce():
  rs = np.random.RandomState(0)
  a = rs.randn(12, 8).astype(np.float32)
  b = rs.randn(12, 8).astype(np.float32)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  plain, _ = contrastive.info_nce(jnp.asarray(a), jnp.asarray(b), 10.0)
  ours, _ = regional.masked_info_nce(jnp.asarray(a), jnp.asarray(b), 10.0)
  np.testing.assert_allclose(float(ours), float(plain), rtol=1e-6)
  labels = rs.randint(0, 3, 12)
  same = labels[:, None] == labels[None, :]
  valid = np.ones(12, bool)
  valid[[2, 7]] = False
  got, m = regional.masked_info_nce(jnp.asarray(a), jnp.asarray(b), 10.0, jnp.asarray(same),
                                    jnp.asarray(valid))
  np.testing.assert_allclose(float(got), _np_masked_nce(a, b, 10.0, same, valid), rtol=1e-5)
  assert float(m["valid_frac"]) == pytest.approx(10 / 12)
  # Masking only removes candidates, so it can only lower the loss.
  unmasked, _ = regional.masked_info_nce(jnp.asarray(a), jnp.asarray(b), 10.0, None,
                                         jnp.asarray(valid))
  assert float(got) < float(unmasked)


def test_regional_loss_masks_same_tags_and_skips_unknown_tags():
  system = systems.get_system(_config(entities=e2_configs.ENTITIES))
  batch = _batch(system, batch_size=16, empty_brand_rows=(3, 5))
  tags = jnp.asarray(batch["tags"])[:, :, :8]
  rs = np.random.RandomState(1)
  img = rs.randn(16, 4, 16).astype(np.float32)
  txt = rs.randn(16, 4, 16).astype(np.float32)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  empty = jnp.asarray(system.empty_tag_ids[:8])
  for fn in ("mask", "negatives"):
    loss, metrics = regional.regional_loss(jnp.asarray(img), jnp.asarray(txt), 5.0, tags,
                                           e2_configs.ENTITIES, false_negatives=fn,
                                           empty_tag_ids=empty)
    expected = []
    for e in range(4):
      ids = np.asarray(tags[:, e])
      same = (ids[:, None] == ids[None]).all(-1)
      if fn == "negatives":
        same = np.zeros_like(same)
      valid = ~(ids == np.asarray(empty)).all(-1)
      assert valid.sum() == (14 if e == 0 else 16)
      expected.append(_np_masked_nce(img[:, e], txt[:, e], 5.0, same, valid))
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["brand_loss"]), expected[0], rtol=1e-5)
  with pytest.raises(ValueError, match="false_negatives='both'"):
    regional.regional_loss(jnp.asarray(img), jnp.asarray(txt), 5.0, tags, e2_configs.ENTITIES,
                           false_negatives="both")


# --- system and configs -----------------------------------------------------------------------
def test_clip_ablation_is_fashionclip():
  """Same seed, same batch: E2 without tokens/fusion/regional loss == FashionCLIP exactly."""
  e2_sys = systems.get_system(_config("smoke,ablation=clip"))
  fc_sys = systems.get_system(_shrink(fc_configs.get_config("smoke")))
  batch = _batch(e2_sys)
  key = jax.random.key(0)
  p_e2 = nn.unbox(e2_sys.init(key, e2_sys.dummy_batch(1)))
  p_fc = nn.unbox(fc_sys.init(key, fc_sys.dummy_batch(1)))
  jax.tree.map(np.testing.assert_array_equal, p_e2, p_fc)
  l_e2, _ = e2_sys.loss(p_e2, batch, key)
  l_fc, _ = fc_sys.loss(p_fc, batch, key)
  np.testing.assert_allclose(float(l_e2), float(l_fc), rtol=1e-6)


@pytest.mark.parametrize("arg,match", [
    ("medium", "must start with smoke, base or pod"),
    ("smoke,ablation=no_logo", "unknown ablation 'no_logo'"),
    ("smoke,stage=3", "stage=3 must be 0, 1 or 2"),
    ("smoke,stage=1,ablation=clip", "stage=1 trains only the E2 additions"),
    ("smoke,lr=1", "unknown option 'lr'"),
])
def test_config_argument_errors(arg, match):
  with pytest.raises(ValueError, match=match):
    e2_configs.get_config(arg)


def test_system_config_errors():
  c = _config()
  c.data.tag_fields = ("brand",)
  with pytest.raises(ValueError, match=r"tag_fields=\('brand',\) must equal"):
    systems.get_system(c)
  c = _config()
  c.init.hf_clip_dir, c.init.checkpoint = "/a", "/b"
  with pytest.raises(ValueError, match="at most one of init.hf_clip_dir and init.checkpoint"):
    systems.get_system(c)
  c = _config()
  c.objective.false_negatives = "drop"
  with pytest.raises(ValueError, match="false_negatives='drop'"):
    systems.get_system(c)


def test_variants_build():
  for arg in ("base,stage=1", "base,stage=2", "pod,stage=2", "smoke,ablation=no_brand",
              "smoke,tokens=3", "smoke,ablation=no_fusion", "smoke,fn=negatives"):
    c = e2_configs.get_config(arg)
    config_check.check(config_check.with_defaults(c), num_devices=8, process_count=1)
  c = e2_configs.get_config("smoke,ablation=no_brand")
  assert c.model.entities == ("season", "subcategory", "composition") == c.data.tag_fields


def _run(config, mesh_config, num_steps, init_from=None):
  mesh = mesh_lib.create_mesh(mesh_config)
  rules = sharding_lib.logical_rules(config.sharding_rules)
  system = systems.get_system(config)
  shapes = state_lib.abstract_params(system, mesh, rules, config.seed)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params,
                                                max(num_steps, 1))
  _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, config.seed, shapes)
  state = state_lib.create_train_state(system, tx, mesh, rules, config.seed, state_sh)
  init = jax.device_get(state.params)
  train_step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh)
  losses = []
  for k in range(num_steps):
    batch = _batch(system, k, batch_size=config.batch_size)
    state, metrics = train_step(state, sharding_lib.global_batch(batch, mesh))
    losses.append(float(metrics["train/loss"]))
  return losses, init, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device():
  return _run(_config(), {"data": 1, "fsdp": 1, "tensor": 1}, 2)


@pytest.mark.parametrize("mesh_config", [
    {"data": 4, "fsdp": 2, "tensor": 1},
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow)])  # ~45 s each.
def test_sharded_steps_equal_single_device(mesh_config, single_device):
  ref_losses, _, ref_params, _ = single_device
  losses, _, params, state = _run(_config(), mesh_config, 2)
  q = state.params["vision"]["fusion_0"]["query"]["kernel"]
  assert len(q.devices()) == 8 and q.sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_stage1_trains_only_the_e2_additions():
  c = _config("smoke,stage=1")
  _, before, after, _ = _run(c, {"data": 1, "fsdp": 1, "tensor": 1}, 1)
  changed = {sharding_lib.path_str(p): not np.array_equal(a, b) for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))}
  new = {k for k in changed if k.startswith("vision/") and e2_lib.is_new_param(k.split("/")[1])}
  assert new and all(changed[k] for k in new if "entity" in k or "fusion" in k)
  assert changed["vision/selection_tokens"]
  assert not any(v for k, v in changed.items() if k not in new)


def test_init_from_hf_clip_dir_and_from_checkpoint(tmp_path):
  base = _config()
  system = systems.get_system(base)
  clip_cfg = system.model_config.clip
  clip_params = jax.device_get(nn.unbox(jax.jit(
      lambda k: clip_lib.init_params(clip_cfg, k))(jax.random.PRNGKey(42))))
  hf_dir = hf_clip.save_clip(str(tmp_path / "hf"), clip_cfg, clip_params)
  # The checkpoint of an earlier run (params only matter): a FashionCLIP-shaped state.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "run"), keep=1, use_async=False)
  ckpt.save(7, {"params": clip_params}, {"step": 7, "position": 7})
  ckpt.wait()
  ckpt.close()
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  fresh = _run(base, mesh, 0)[1]
  for key, value in (("hf_clip_dir", str(hf_dir)), ("checkpoint", str(tmp_path / "run"))):
    c = _config()
    c.init[key] = value
    _, init, _, state = _run(c, mesh, 0)
    assert len(state.params["vision"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].devices()) == 8
    loaded = e2_lib.clip_part(init)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded),
                            jax.tree.leaves(clip_params)):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=key + jax.tree_util.keystr(path))
    new = {k: v for k, v in init["vision"].items() if e2_lib.is_new_param(k)}
    jax.tree.map(np.testing.assert_array_equal, new,
                 {k: v for k, v in fresh["vision"].items() if e2_lib.is_new_param(k)})
  c = _config()
  c.model.vision = dict(c.model.vision, width=64)
  c.init.checkpoint = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"shape \(.*\) != this model's"):
    _run(c, {"data": 1, "fsdp": 1, "tensor": 1}, 0)
