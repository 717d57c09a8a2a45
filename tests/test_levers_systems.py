"""Memory/speed levers of E2, FashionViL and FashionBERT change the numbers only by rounding.

tests/test_levers.py proves the levers for FashionCLIP; this file proves them for the other three
systems, at tiny sizes on the CPU in float32, through each system's whole training loss:

  * remat_policy (each block rematerialised) and scan (the BERT / ViT layers under nn.scan; E2's
    vision tower refuses it with an error naming the alternative): loss and gradients equal the
    plain model's with the same parameters up to float32 rounding (tests/numerics.py);
  * dtype='bfloat16': parameters, gradients and the AdamW state stay float32 (master weights),
    the loss moves by bf16 rounding only and the gradient keeps its direction;
  * grad_accum_steps (FashionViL's per-example tasks, MPFC and PAC): a whole train step with
    A = 2 micro-batches equals the step on the full batch;
  * fsdp / fsdp x tensor: a whole train step (levers on) with params and optimizer state sharded
    over 8 devices, fsdp=8 and fsdp=2 x tensor=4, equals one device, and most of the parameter
    elements are really split.
The train steps are compared through loss, grad norm and the update p_after - p_before of a
first step made linear in the gradient (test_levers.linear_first_step), up to float32 rounding.
Where a lever is not exact it is documented in the system's docstring instead (grad
accumulation for InfoNCE, in-batch negatives, token means and adaptive weights).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fashion_jax import systems
from fashion_jax.models import layers
from fashion_jax.parallel import mesh as mesh_lib
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.train import config_check
from fashion_jax.train import optimizer as optimizer_lib
from fashion_jax.train import state as state_lib
from fashion_jax.train import step as step_lib
from tests import test_e2_system as e2_tests
from tests import test_fashionbert as fb_tests
from tests import test_fashionvil as fvil_tests
from tests import numerics
from tests.test_levers import assert_bf16_only_rounds, linear_first_step

REMAT = "dots_with_no_batch_dims_saveable"
MESHES = (dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=2, tensor=4))


# ------------------------------------------------------------------------------------------------
# Tiny configs and batches of each system (built by the systems' own test helpers).
# ------------------------------------------------------------------------------------------------

def e2_config(**model):
  c = e2_tests._config()  # Fusion after blocks 1 and 2 (the last drops the patches), batch 8.
  c.model.vision.num_layers = 2
  c.model.update(model)
  return c


# The longest float32 sum each system's loss and gradients accumulate (tests/numerics.py): the
# tokens or positions a weight's gradient sums over. E2's text tower encodes 8 captions and 8 x 2
# entity tags of <= 16 tokens; its vision tower sees 8 x (16 patches + class + 2 selection tokens).
E2_N = (8 + 8 * 2) * 16


def e2_batch(system, seed=0):
  return e2_tests._batch(system, seed, batch_size=system.config.batch_size)


def fvil_config(tmp_path, dropout=0.0, **model):
  # MLM runs the image encoder and the (shared) BERT's fusion pass: every lever is on its path.
  c = fvil_tests.tiny_config(tmp_path, mlm=1.0)
  c.objective.mode = "sum"
  c.model.bert.update(num_layers=2, dropout_rate=dropout, attention_dropout_rate=dropout)
  c.model.update(model)
  c.batch_size = fvil_tests.B
  c.optimizer.schedule.warmup_steps = 0
  return config_check.with_defaults(c)


# 8 rows x 16 x 16 output positions of the ResNet's stride-2 stem (its kernel's gradient and its
# BatchNorm statistics sum over all of them).
FVIL_N = fvil_tests.B * (fvil_tests.S // 2) ** 2


def fvil_batch(system, seed=0):
  return fvil_tests.make_batch(system, seed)


def fb_config(dropout=0.0, **model):
  c = fb_tests._config()
  c.model.bert = dict(num_layers=2, dropout_rate=dropout, attention_dropout_rate=dropout)
  c.model.update(model)
  if c.model.cnn_variant == "pixels":
    c.optimizer.freeze = ()  # No CNN to freeze.
  c.batch_size = 16
  c.optimizer.schedule.warmup_steps = 0
  return config_check.with_defaults(c)


# 16 rows x <= 32 tokens (12 text + 16 patches + specials); the frozen patch CNN runs in eval
# mode (no batch statistics) and contracts over at most 3 x 3 x 32 = 288 terms.
FB_N = 16 * 32


def fb_batch(system, seed=0):
  return fb_tests._batch(system, b=16, seed=seed)


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------

def _init(system, batch):
  return jax.device_get(jax.jit(lambda k, b: nn.unbox(system.init(k, b)))(jax.random.key(0), batch))


def _loss_and_grads(config, params, batch, scan=False):
  """Training loss (train=True, fixed key) and gradients; `params` in the unscanned layout."""
  system = systems.get_system(config)
  if scan:
    params = layers.stack_layers(params)
  fn = jax.value_and_grad(lambda p, b: system.loss(p, b, jax.random.key(7)), has_aux=True)
  (loss, _), grads = jax.jit(fn)(params, batch)
  if scan:
    grads = layers.unstack_layers(grads)
  return float(loss), jax.device_get(grads)


def _reference(config_fn, batch_fn):
  """(system, batch, params, loss, grads) of the plain model (levers off)."""
  plain = config_fn()
  system = systems.get_system(plain)
  batch = batch_fn(system)
  params = _init(system, batch)
  loss0, grads0 = _loss_and_grads(plain, params, batch)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3
  return system, batch, params, loss0, grads0


def _check_lever(config_fn, reference, n, **lever):
  """A lever against the plain model with the same params: loss and gradients equal up to float32
  rounding of sums of n terms (tests/numerics.py)."""
  _, batch, params, loss0, grads0 = reference
  loss, grads = _loss_and_grads(config_fn(**lever), params, batch, scan=lever.get("scan"))
  numerics.assert_rounding_close(loss, loss0, n, what=f"loss with {lever}")
  numerics.assert_rounding_close(grads, grads0, n, what=f"gradients with {lever}")


def _check_bf16_numerics(config_fn, reference):
  """bf16 compute: float32 gradients; loss moved by bf16 rounding only, direction kept."""
  _, batch, params, loss0, grads0 = reference
  loss, grads = _loss_and_grads(config_fn(dtype="bfloat16"), params, batch)
  assert_bf16_only_rounds(loss, loss0, grads, grads0)


def _check_bf16_master_weights(config):
  """The train state the trainer would build for a bf16 config: params and both AdamW moments
  float32 (shapes only: jax.eval_shape of the real init, nothing compiled)."""
  system = systems.get_system(config)
  mesh = mesh_lib.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  rules = sharding_lib.logical_rules(None)
  shapes = state_lib.abstract_params(system, mesh, rules, 0)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, shapes.params, 10)
  abstract, _ = state_lib.abstract_state(system, tx, mesh, rules, 0, shapes)
  floats = [x.dtype for x in jax.tree.leaves((abstract.params, abstract.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > 10 and all(d == jnp.float32 for d in floats), set(floats)


def _one_step(config, mesh_config, batch, grad_accum_steps=1):
  """(loss, grad_norm, p_after - p_before, p_after, sharded fraction of the param elements and of
  Adam's moments) of one train step."""
  system = systems.get_system(config)
  mesh = mesh_lib.create_mesh(mesh_config, jax.devices()[:8])
  rules = sharding_lib.logical_rules(None)
  shapes = state_lib.abstract_params(system, mesh, rules, 0)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, shapes.params, 10)
  _, state_sh = state_lib.abstract_state(system, tx, mesh, rules, 0, shapes)
  # create_train_state's jitted init and the trainer's step.
  init = jax.jit(lambda: state_lib._init_state(system, tx, mesh, rules, 0),
                 out_shardings=state_sh)
  state = init()
  before = jax.tree.map(np.array, state.params)  # A copy: the step donates the state.
  step = step_lib.make_train_step(system, tx, schedule, mesh, rules, state_sh, grad_accum_steps)
  batch = sharding_lib.global_batch(batch, mesh)
  state, metrics = step(state, batch)
  leaves = jax.tree.leaves(state.params)
  split = sum(x.size for x in leaves if x.addressable_shards[0].data.size < x.size)
  # Adam's moments are sharded like the params they belong to.
  mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 1]
  split_mu = sum(x.size for x in mu if x.addressable_shards[0].data.size < x.size)
  after = jax.device_get(state.params)
  if config.model.get("scan"):
    before, after = layers.unstack_layers(before), layers.unstack_layers(after)
  update = jax.tree.map(np.subtract, after, before)  # Exact where within a factor 2.
  return (float(metrics["train/loss"]), float(metrics["train/grad_norm"]), update, after,
          split / sum(x.size for x in leaves), split_mu / max(sum(x.size for x in mu), 1))


def _check_step(got, want, n, what):
  """Loss, grad norm and update (p_after - p_before) of two one-step runs equal up to rounding of
  sums of n terms (tests/numerics.py; the step comes from `linear_first_step`)."""
  numerics.assert_rounding_close(got[0], want[0], n, what=f"loss, {what}")
  numerics.assert_rounding_close(got[1], want[1], n, what=f"grad norm, {what}")
  numerics.assert_rounding_close(got[2], want[2], n, stored=want[3], what=f"update, {what}")


def _check_sharded(config, batch, min_split, n):
  config = linear_first_step(config)
  want = _one_step(config, dict(data=1, fsdp=1, tensor=1), batch)
  for mesh in MESHES:
    got = _one_step(config, mesh, batch)
    _check_step(got, want, n, str(mesh))
    assert got[4] > min_split and got[5] > min_split, (mesh, got[4], got[5])


# ------------------------------------------------------------------------------------------------
# E2: remat per block (the vision tower is cut by fusion blocks and never scanned).
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2_reference():
  return _reference(e2_config, e2_batch)


def test_e2_remat_changes_loss_and_grads_only_by_rounding(e2_reference):
  _check_lever(e2_config, e2_reference, E2_N, remat_policy="nothing_saveable")


def test_e2_other_remat_policy_and_bf16_numerics(e2_reference):
  _check_lever(e2_config, e2_reference, E2_N, remat_policy=REMAT)
  _check_bf16_numerics(e2_config, e2_reference)


def test_e2_refuses_scan_and_names_remat():
  with pytest.raises(ValueError, match=r"model.scan=True.*set scan=False and use remat_policy"):
    systems.get_system(e2_config(scan=True))


def test_e2_bf16_keeps_float32_master_weights():
  _check_bf16_master_weights(e2_config(dtype="bfloat16"))


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_e2_sharded_step_with_remat_equals_one_device():
  config = e2_config(remat_policy="nothing_saveable")
  system = systems.get_system(config)
  _check_sharded(config, e2_batch(system, 1), min_split=0.9, n=E2_N)


# ------------------------------------------------------------------------------------------------
# FashionViL: remat (BERT + ResNet blocks), scan (BERT layers), bf16, grad accumulation.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fvil_tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("fvil_levers")


@pytest.fixture(scope="module")
def fvil_reference(fvil_tmp):
  return _reference(lambda **kw: fvil_config(fvil_tmp, **kw), fvil_batch)


def test_fashionvil_scan_and_remat_change_loss_and_grads_only_by_rounding(fvil_tmp,
                                                                          fvil_reference):
  params = fvil_reference[2]
  assert {"layers_0", "layers_1"} <= set(params["params"]["text_bert"]["encoder"])
  _check_lever(lambda **kw: fvil_config(fvil_tmp, **kw), fvil_reference, FVIL_N, scan=True,
               remat_policy="nothing_saveable")


def test_fashionvil_other_remat_policy_and_bf16_numerics(fvil_tmp, fvil_reference):
  config_fn = lambda **kw: fvil_config(fvil_tmp, **kw)
  _check_lever(config_fn, fvil_reference, FVIL_N, remat_policy=REMAT)
  _check_bf16_numerics(config_fn, fvil_reference)


def test_fashionvil_bf16_keeps_float32_master_weights(fvil_tmp):
  _check_bf16_master_weights(fvil_config(fvil_tmp, dtype="bfloat16"))


def test_fashionvil_levers_belong_to_the_model_not_the_bert(fvil_tmp):
  c = fvil_config(fvil_tmp)
  c.model.bert.scan = True
  with pytest.raises(ValueError, match=r"model.bert.scan is set.*set model.scan instead"):
    systems.get_system(c)


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_fashionvil_grad_accumulation_of_per_example_tasks_equals_the_full_batch(fvil_tmp):
  # MPFC (one masked patch per image) and PAC (every row has attributes) are means over a fixed
  # number of terms per example, so 2 micro-batches of 4 give the full batch's gradient.
  c = fvil_tests.tiny_config(fvil_tmp, mpfc=1.0, pac=1.0)
  c.objective.mode = "sum"
  c.model.bert.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  c.batch_size = fvil_tests.B
  c = linear_first_step(config_check.with_defaults(c))
  system = systems.get_system(c)
  batch = fvil_batch(system, 2)
  batch["attributes"][:, 0] = True
  one = dict(data=1, fsdp=1, tensor=1)
  want = _one_step(c, one, batch)
  got = _one_step(c, one, batch, grad_accum_steps=2)
  _check_step(got, want, FVIL_N, "2 accumulated micro-batches")


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_fashionvil_scan_and_remat_with_hf_bert_import_and_export(tmp_path):
  """init.hf_bert_dir with model.scan / remat_policy: the import stacks the checkpoint's layers,
  and `export` of the scanned model writes the same BertModel the checkpoint was."""
  from tests import test_fashionvil_export as export_tests  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  c = fvil_tests.tiny_config(tmp_path, mlm=1.0)
  bert, _ = export_tests._save_hf(tmp_path, systems.get_system(c).tokenizer.vocab_size)
  c.init.hf_bert_dir = str(tmp_path / "hf_bert")
  c.model.update(scan=True, remat_policy="nothing_saveable")
  system = systems.get_system(c)
  assert system.model.text_bert.scan and system.model.text_bert.remat_policy == "nothing_saveable"
  variables = system.pretrained_params()
  stacked = variables["params"]["text_bert"]["encoder"]
  assert set(stacked) == {"layers"}
  want = bert.state_dict()["encoder.layer.0.intermediate.dense.weight"].numpy().T
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["fc1"]["kernel"], want[None])
  out = system.export(variables, str(tmp_path / "export"))
  exported = transformers.BertModel.from_pretrained(str(out / "bert")).state_dict()
  for key, value in bert.state_dict().items():
    np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
def test_fashionvil_sharded_step_with_levers_equals_one_device(fvil_tmp):
  config = fvil_config(fvil_tmp, dropout=0.1, scan=True, remat_policy="nothing_saveable")
  system = systems.get_system(config)
  _check_sharded(config, fvil_batch(system, 1), min_split=0.8, n=FVIL_N)


# ------------------------------------------------------------------------------------------------
# FashionBERT: remat and scan of the BERT; the patch CNN is frozen (stop_gradient), so it holds
# no activations for the backward pass and has nothing to rematerialise.
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fb_reference():
  return _reference(fb_config, fb_batch)


def test_fashionbert_scan_and_remat_change_loss_and_grads_only_by_rounding(fb_reference):
  _check_lever(fb_config, fb_reference, FB_N, scan=True, remat_policy="nothing_saveable")


def test_fashionbert_other_remat_policy_and_bf16_numerics(fb_reference):
  _check_lever(fb_config, fb_reference, FB_N, remat_policy=REMAT)
  _check_bf16_numerics(fb_config, fb_reference)


def test_fashionbert_bf16_keeps_float32_master_weights():
  _check_bf16_master_weights(fb_config(dtype="bfloat16"))


@pytest.mark.slow  # heavy: the separate slow job (README, Tests)
@pytest.mark.parametrize("cnn_variant", ["tiny", "pixels"])
def test_fashionbert_sharded_step_with_levers_equals_one_device(cnn_variant):
  config = fb_config(dropout=0.1, scan=True, remat_policy="nothing_saveable",
                     cnn_variant=cnn_variant)
  system = systems.get_system(config)
  _check_sharded(config, fb_batch(system, 1), min_split=0.8, n=FB_N)
