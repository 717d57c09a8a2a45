"""The two-tower system's objectives: sigmoid (dense / blockwise / ring), multi-field, Matryoshka.

- FashionCLIP's default config: the system's loss and gradients are bitwise those of
  contrastive.info_nce on the model's embeddings (the objective it always had);
- the pipeline makes field_text / field_mask from the dataset's raw fields, masks the empty
  ones, and leaves the default batch as it was;
- a sigmoid + multi-field + Matryoshka train step on (data=4, fsdp=2) gives the same losses and
  parameters with the ring and the blockwise sigmoid loss as with the dense one (1e-5);
- configs/fashionsiglip.py passes the trainer's checks; its smoke variant, shrunk, trains on 8
  devices (its loss falls; marked slow);
- a SigLIP-family run starts from a transformers SiglipModel directory and exports one;
- bad objective settings are refused with the key named.
"""

import copy
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fashion_jax import api
from fashion_jax import configs
from fashion_jax.data import features
from fashion_jax.data import pipeline
from fashion_jax.data import tokenizers
from fashion_jax.interop import hf_siglip
from fashion_jax.interop import open_clip
from fashion_jax.losses import contrastive
from fashion_jax.systems import base as system_base
from fashion_jax.systems import fashionclip
from fashion_jax.train import config_check
from tests import test_fashionclip_system as tfc
from tests.test_multifield import np_multi_field_loss
from tests import test_pipeline as tp
from tests import toy_system

FIELDS = ("description", "brand")


def _field_batch_fn(config, pool=None):
  """Random images, texts and F field texts (some missing) per step; `pool` batches cycled."""
  tok = tokenizers.get_tokenizer(config.data.tokenizer.kind, config.data.tokenizer.path,
                                 config.data.max_len)
  words = ["red", "navy", "striped", "linen", "shirt", "dress", "loafers", "wool", "bag", "coat"]
  fields = features.multi_fields(config.data)

  def make(step):
    rng = np.random.default_rng(step if pool is None else step % pool)
    b, s = config.batch_size, config.data.image_size
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 8))) for _ in range(b)]
    out = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "text": tok(texts)}
    if fields:
      raw = np.array([[" ".join(rng.choice(words, size=2)) if rng.random() > 0.3 else ""
                       for _ in fields] for _ in range(b)], dtype=object)
      out["field_text"] = tok(raw.reshape(-1).tolist()).reshape(b, len(fields), -1)
      out["field_mask"] = features.field_present(raw)
    return out
  return make


def test_default_fashionclip_loss_is_bitwise_info_nce():
  config = tfc.tiny_config()
  config.model.vision.num_layers = 1
  config.model.text.num_layers = 1
  system = fashionclip.System(config)
  batch = jax.tree.map(jnp.asarray, tfc.batch_fn(config)(0))
  params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))

  def reference(p, b):  # The objective before multi-field / sigmoid / Matryoshka existed.
    v = {"params": p}
    img = system.model.apply(v, b["image"], method=system.model.encode_images)
    txt = system.model.apply(v, b["text"], method=system.model.encode_texts)
    scale = system.model.apply(v, method=system.model.logit_scale)
    return contrastive.info_nce(img, txt, scale)[0]

  got, g_got = jax.jit(jax.value_and_grad(
      lambda p, b: system.loss(p, b, None)[0]))(params, batch)
  want, g_want = jax.jit(jax.value_and_grad(reference))(params, batch)
  assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert fashionclip.System.required_features(config) == ("image", "text")
  assert set(system.dummy_batch(2)) == {"image", "text"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tp.PipelineTestProducts(data_dir=path).download_and_prepare()
  return path


def test_pipeline_makes_masked_field_texts(data_dir):
  base = tp.make_config(data_dir, **{"mlm_prob": 0.0, "patch_mask": dict(grid=0, count=0),
                                     "tag_fields": (), "views": 1, "tokenizer.kind": "clip"})
  config = copy.deepcopy(base)
  config.data.fields = FIELDS
  spec = features.feature_spec(config)
  assert spec["field_text"] == features.Spec(np.dtype(np.int32), (2, 16))
  assert spec["field_mask"] == features.Spec(np.dtype(bool), (2,))
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  plain = next(pipeline.make_train_iterator(base, process_index=0, process_count=1))
  # The default batch has no field keys and is otherwise the same batch.
  assert set(plain) == set(batch) - {"field_text", "field_mask"}
  for k in plain:
    np.testing.assert_array_equal(plain[k], batch[k])
  tok = tokenizers.get_tokenizer("clip", "", 16)
  keys = tp.keys_of(range(tp.NUM_TRAIN))
  for row, key in enumerate(batch["product_key"]):
    p = tp.product(keys[int(key)])
    raw = [p[f] for f in FIELDS]
    np.testing.assert_array_equal(batch["field_text"][row], tok(raw))
    np.testing.assert_array_equal(batch["field_mask"][row], [bool(r.strip()) for r in raw])
  assert not batch["field_mask"][:, 0].all() and batch["field_mask"][:, 0].any()
  bad = copy.deepcopy(base)
  bad.data.fields = ("colour",)
  with pytest.raises(configs.ConfigError, match=r"config.data.fields: field 'colour' is not in "):
    pipeline.make_train_iterator(bad, process_index=0, process_count=1)


def _sigmoid_config(impl="dense"):
  config = tfc.tiny_config()
  config.batch_size = 16
  config.model.vision.num_layers = 1  # One block per tower: the loss is what is compared.
  config.model.text.num_layers = 1
  config.data.fields = FIELDS
  config.model.matryoshka_dims = (8, 0)
  config.model.loss_blocks = 4 if impl == "blockwise" else 1
  config.loss = dict(kind="sigmoid", sigmoid_impl=impl, text_weight=1.0,
                     field_weights=(0.5, 1.0), matryoshka_weights=(0.5, 1.0))
  return config


@pytest.fixture(scope="module")
def dense_sigmoid_run():
  config = _sigmoid_config("dense")
  return toy_system.run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1}, num_steps=2,
                              batch_fn=_field_batch_fn(config))


# Slow job: a whole 2-step train step per impl on 8 devices (~60 s); the loss-level ring and
# blockwise equalities run by default in test_sigmoid_loss.py.
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ring", "blockwise"])
def test_ring_and_blockwise_sigmoid_steps_equal_dense(dense_sigmoid_run, impl):
  config = _sigmoid_config(impl)
  if impl == "ring":  # As a pod config would: each distinct field text encoded once (20-22).
    config.model.field_dedup = 24
  losses, params, _ = toy_system.run_steps(config, {"data": 4, "fsdp": 2, "tensor": 1},
                                           num_steps=2, batch_fn=_field_batch_fn(config))
  ref_losses, ref_params, _ = dense_sigmoid_run
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The CLIP model trained with the sigmoid loss carries SigLIP's bias, initialised at -10.
  assert "logit_bias" in params


@pytest.mark.parametrize("change, match", [
    ({"loss.kind": "siglip"}, r"config.loss.kind='siglip' is not one of"),
    ({"loss.sigmoid_impl": "rings"}, r"config.loss.sigmoid_impl='rings' is not one of"),
    ({"loss.field_weight": (1.0,)}, r"config.loss.field_weight \(did you mean 'field_weights'"),
    ({"loss.field_weights": (1.0,)}, r"must have one weight per entry of \('description', "),
    ({"model.matryoshka_dims": (8, 64)}, r"64 exceeds the embedding width 16"),
    ({"loss.matryoshka_weights": (1.0,)}, r"config.loss.matryoshka_weights=\(1.0,\) must have"),
    ({"loss.text_weight": 0.0, "data.fields": (), "loss.field_weights": ()},
     r"the loss has no term"),
    ({"loss.kind": "infonce", "model.loss_blocks": 4},
     r"masked InfoNCE of the field terms is dense only"),
    ({"loss.bias_init": "minus ten"}, r"config.loss.bias_init='minus ten' must be a finite"),
    ({"loss.bias_init": True}, r"config.loss.bias_init=True must be a finite"),
    ({"loss.field_positives": "values"},
     r"config.loss.field_positives='values' is not one of \('row', 'value'\)"),
    ({"model.field_dedup": -8}, r"config.model.field_dedup=-8 must be an int >= 0"),
    ({"model.field_dedup": True}, r"config.model.field_dedup=True must be an int >= 0"),
    ({"model.field_dedup": 6, "model.encode_chunks": 4},
     r"config.model.field_dedup=6 is not divisible by config.model.encode_chunks=4"),
])
def test_bad_objective_settings_are_named(change, match):
  config = _sigmoid_config("dense")
  for key, value in change.items():
    configs.apply_override(config, f"{key}={value!r}")
  with pytest.raises(ValueError, match=match):
    fashionclip.System(config)


def test_field_dedup_is_unused_without_fields():
  # The smoke recipe sets field_dedup=128; its single-text comparison (data.fields=()) is one key
  # away and must still build, with no field features.
  config = configs.get("fashionsiglip:smoke")
  assert config.model.field_dedup == 128
  configs.apply_override(config, "data.fields=()")
  configs.apply_override(config, "loss.field_weights=()")
  config.model.encode_chunks = 3  # Would not divide 128: irrelevant without fields.
  system = fashionclip.System(config)
  assert system.objective.fields == ()
  assert list(system_base.required_features(fashionclip.System, config)) == ["image", "text"]


@pytest.mark.parametrize("dedup", [24, 16])
def test_field_dedup_gives_the_same_loss_gradients_and_counts(dedup):
  # 16 products x 2 fields from a pool of 10 words: 20-22 distinct field texts among 32. With
  # U = 24 each is encoded once; U = 16 is too few and the step encodes all 32 (the fallback).
  config = _sigmoid_config("dense")
  batch = jax.tree.map(jnp.asarray, _field_batch_fn(config)(0))
  ft = np.asarray(batch["field_text"])
  distinct = len(np.unique(ft.reshape(-1, ft.shape[-1]), axis=0))
  assert 16 < distinct <= 24

  def loss_and_grads(field_dedup):
    configs.apply_override(config, f"model.field_dedup={field_dedup}")
    system = fashionclip.System(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))
    return jax.jit(jax.value_and_grad(lambda p, b: system.loss(p, b, None), has_aux=True))(
        params, batch)

  (want, want_m), want_g = loss_and_grads(0)
  (got, got_m), got_g = loss_and_grads(dedup)
  assert "field_texts_distinct" not in want_m
  assert int(got_m["field_texts_distinct"]) == distinct
  assert bool(got_m["field_dedup_fallback"]) == (distinct > dedup)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Rounding only: copies' gradients are summed in another order. Some leaves are ~1e-8
  # everywhere (parameters the normalised embeddings barely depend on), so the tolerance is
  # relative to the largest gradient.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_g))
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bias_init_sets_the_initial_logit_bias(family):
  # A CLIP model gets the loss's extra logit_bias, a SigLIP model its own: both start at
  # loss.bias_init (SigLIP's -10 when unset; the fashionsiglip recipe sets log(1/batch)).
  config = _sigmoid_config("dense")
  want = -10.0
  if family == "siglip":
    config = shrunk_siglip_smoke()
    want = np.float32(-np.log(64.0))  # The recipe's batch, before the shrink.
  system = fashionclip.System(config)
  params = nn.unbox(system.init(jax.random.PRNGKey(0), system.dummy_batch(2)))
  assert float(params["logit_bias"]) == want
  configs.apply_override(config, "loss.bias_init=-4.25")
  system = fashionclip.System(config)
  params = nn.unbox(system.init(jax.random.PRNGKey(0), system.dummy_batch(2)))
  assert float(params["logit_bias"]) == -4.25


@pytest.mark.parametrize("arg, devices", [("smoke", 8), ("base", 8), ("pod", 64)])
def test_fashionsiglip_configs_pass_the_trainer_checks(arg, devices):
  config = configs.get(f"fashionsiglip:{arg}")
  config_check.check(config, num_devices=devices)
  config_check.check_train_features(config)  # field_text / field_mask are made.
  assert config.loss.kind == "sigmoid" and config.model.family == "siglip"
  assert len(config.loss.field_weights) == len(config.data.fields)


def test_required_features_follow_the_fields():
  config = _sigmoid_config("dense")
  need = system_base.required_features(fashionclip.System, config)
  assert list(need) == ["image", "text", "field_text", "field_mask"]
  assert set(fashionclip.System(config).dummy_batch(2)) == set(need)


def shrunk_siglip_smoke():
  """configs/fashionsiglip.py:smoke with tiny towers, 32 px, 16 tokens and batch 16."""
  c = configs.get("fashionsiglip:smoke")
  c.data.image_size = 32
  c.data.max_len = 16
  c.model.vision = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=8)
  c.model.text = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64)
  c.model.matryoshka_dims = (8, 16, 0)
  c.batch_size = 16
  c.optimizer.schedule.warmup_steps = 2
  c.evals = {}
  c.checkpoint.best_metric = None
  return c


@pytest.mark.slow  # ~40 s under load: 12 steps on 8 devices (the ring test above is the fast one).
def test_fashionsiglip_smoke_trains_on_8_devices():
  config = shrunk_siglip_smoke()
  system = fashionclip.System(config)
  assert system.family == "siglip" and system.objective.kind == "sigmoid"
  assert system.objective.fields == ("primary_color", "pattern", "material", "subcategory",
                                     "brand")
  losses, params, _ = toy_system.run_steps(config, {"data": 8, "fsdp": 1, "tensor": 1},
                                           num_steps=12,
                                           batch_fn=_field_batch_fn(config, pool=2))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  # SigLIP's own bias parameter is trained (no extra one is added for a SigLIP model).
  assert float(params["logit_bias"]) != -10.0


def _tiny_hf_siglip():
  tok = tokenizers.get_tokenizer("clip", "", 16)
  torch.manual_seed(0)
  hf_config = transformers.SiglipConfig(
      text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, projection_size=32),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=8))
  return transformers.SiglipModel(hf_config).eval()


def test_siglip_family_starts_from_an_hf_siglip_dir_and_exports_it(tmp_path):
  hf = _tiny_hf_siglip()
  hf.save_pretrained(tmp_path / "hf")
  config = shrunk_siglip_smoke()
  config.init.hf_siglip_dir = str(tmp_path / "hf")
  config.model.vision = None
  config.model.text = None
  system = fashionclip.System(config)
  params = system.pretrained_params()
  # Exactly the tree the system's init makes (the trainer places it after a strict check) ...
  shapes = jax.eval_shape(lambda: nn.unbox(system.init(jax.random.PRNGKey(0),
                                                       system.dummy_batch(2))))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(params)):
    assert a.shape == np.shape(b)
  # ... and the export is a transformers SiglipModel with the same weights.
  out = system.export(params, str(tmp_path / "export"))
  again = transformers.SiglipModel.from_pretrained(str(out)).eval()
  want = hf.state_dict()
  for key, value in again.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), want[key].numpy(), err_msg=key)
  # The Matryoshka widths travel in config.json; api.load reads them and cuts prefixes.
  assert again.config.matryoshka_dims == [8, 16, 0]
  model = api.load(str(out))
  assert type(model) is api.FashionSigLIP and model.matryoshka_dims == (8, 16, 0)
  pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  emb = model.encode_images(pixels, normalize=False).astype(np.float64)
  want8 = emb[:, :8] / np.linalg.norm(emb[:, :8], axis=1, keepdims=True)
  np.testing.assert_allclose(model.encode_images(pixels, dim=8), want8, atol=1e-6)
  np.testing.assert_array_equal(model.encode_images(pixels, normalize=False, dim=8),
                                emb[:, :8].astype(np.float32))
  with pytest.raises(ValueError, match=r"dim=33: the embedding prefix must be an int in "
                                       r"\[1, 32\]"):
    model.encode_images(pixels, dim=33)
  # A CLIP directory cannot initialise a SigLIP model.
  config.init.hf_clip_dir = str(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"init.hf_clip_dir=.* does not initialise a "
                                       r"model.family='siglip' model; use init.hf_siglip_dir"):
    fashionclip.System(config)


def test_transformers_class_default_id_warning_is_dropped_and_no_other():
  """transformers warns on every SigLIP config save about its OWN class defaults (bos/eos 49406
  / 49407 outside a 32,000-token vocabulary); importing our SigLIP model drops exactly those two
  messages, and a config whose ids are really out of its vocabulary still warns. A fresh
  process: transformers warns each message once per process."""
  code = ("import transformers\n"
          "from fashion_jax.models import siglip\n"
          "transformers.SiglipConfig().to_json_string()\n"
          "transformers.SiglipTextConfig(vocab_size=100, bos_token_id=500)\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=repo)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "(between 0 and 31999), got 4940" not in proc.stderr, proc.stderr[-2000:]
  assert "(between 0 and 99), got 500." in proc.stderr, proc.stderr[-2000:]


def test_open_clip_dir_initialises_the_model_of_its_kind(tmp_path, monkeypatch):
  """init.open_clip_dir goes through interop/open_clip.py's to_hf (stubbed here with the
  transformers form of a tiny SigLIP: the conversion itself is tested with open_clip's files in
  that module's tests); the model gets exactly those weights, and a CLIP-family run is refused."""
  hf = _tiny_hf_siglip()
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  ckpt = open_clip.OpenClipCheckpoint(
      kind="siglip", hf_config=hf.config.to_dict(), hf_state=state,
      preprocess=dict(mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                      resize_mode="squash"),
      text_clean="canonicalize", tokenizer_name=None, context_length=16)
  seen = []
  monkeypatch.setattr(open_clip, "to_hf", lambda path: seen.append(path) or ckpt)
  config = shrunk_siglip_smoke()
  config.init = dict(open_clip_dir=str(tmp_path / "marqo"))
  config.model.vision = None
  config.model.text = None
  system = fashionclip.System(config)
  params = system.pretrained_params()
  hf.save_pretrained(tmp_path / "hf")
  _, want = hf_siglip.load_siglip(str(tmp_path / "hf"))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert seen == [str(tmp_path / "marqo")]  # Read once for the config and the weights.
  config.model.family = "clip"
  with pytest.raises(ValueError, match=r"holds an open_clip 'siglip' model but "
                                       r"config.model.family='clip'"):
    fashionclip.System(config)


@pytest.mark.parametrize("kind,field_positives", [
    ("infonce", "row"), ("sigmoid", "row"), ("infonce", "value"), ("sigmoid", "value")])
def test_system_loss_is_the_composed_formula(kind, field_positives):
  """System.loss == sum_g c_g [w_text L(tn img, tn txt) + sum_f w_f L(tn img, tn field_f; m_f)]
  in float64 numpy, from the system's own embeddings; with field_positives='value', products
  whose field f has the same tokens are positives of each other in the term of f."""
  config = _sigmoid_config("dense")
  config.loss.kind = kind
  configs.apply_override(config, f"loss.field_positives={field_positives!r}")
  system = fashionclip.System(config)
  # Two words per field from a pool of 10: a batch of 16 repeats some field values.
  batch = jax.tree.map(jnp.asarray, _field_batch_fn(config)(0))
  params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))
  loss, _ = jax.jit(lambda p, b: system.loss(p, b, None))(params, batch)
  img = np.asarray(system.embed_images(params, batch["image"]), np.float64)
  txt = np.asarray(system.embed_texts(params, batch["text"]), np.float64)
  ft = batch["field_text"]
  fields = [np.asarray(system.embed_texts(params, ft[:, k]), np.float64)
            for k in range(ft.shape[1])]
  masks = [np.ones(len(img), bool)] + [np.asarray(batch["field_mask"][:, k])
                                       for k in range(ft.shape[1])]
  weights = (1.0,) + tuple(config.loss.field_weights)
  scale = float(system.logit_scale(params))
  lt, bias = float(np.log(scale)), float(params.get("logit_bias", 0.0))

  def tn(x, m):
    x = x[:, :m or x.shape[1]]
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  keys = None
  if field_positives == "value":
    keys = [None] + [[tuple(row) for row in np.asarray(ft[:, k])] for k in range(ft.shape[1])]
    assert any(len(set(k)) < len(k) for k in keys[1:])  # The batch has repeated values.
  want = sum(c * np_multi_field_loss(kind, tn(img, m), [tn(t, m) for t in [txt] + fields],
                                     masks, weights, scale=scale, lt=lt, bias=bias, keys=keys)
             for m, c in zip(config.model.matryoshka_dims, config.loss.matryoshka_weights))
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
