"""SigLIP against transformers' SiglipModel (float32): import, export, text padding, levers, api.

Tiny random models with odd widths and head counts (vision 36 wide / 3 heads, text 44 wide /
4 heads, head dims 12 and 11), built and saved by the test with a tiny SentencePiece vocabulary
trained here (SiglipTokenizer: pad = EOS, lower-cases, drops punctuation).
"""

import functools
import io
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from safetensors.numpy import load_file, save_file

from fashion_jax import api
from fashion_jax.interop import hf_io
from fashion_jax.interop import hf_siglip
from fashion_jax.interop import open_clip as open_clip_lib
from fashion_jax.losses import sigmoid as sigmoid_lib
from fashion_jax.models import layers
from fashion_jax.models import siglip as siglip_lib
from fashion_jax.parallel.axes import DEFAULT_RULES, MESH_AXES
from tests import numerics
from tests.test_clip_parity import random_images

TEXTS = ["A photo of a red dress!", "black shoes, with a red heel", "blue silk dress",
         "long sleeves"]
_WORDS = ("a photo of red dress black shoes with heel blue silk long sleeves cotton shirt "
          "skirt jeans").split()
VISION = dict(hidden_size=36, intermediate_size=72, num_hidden_layers=2, num_attention_heads=3,
              patch_size=8, image_size=32)
TEXT = dict(hidden_size=44, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def make_siglip_tokenizer(directory):
  """A SiglipTokenizer over a tiny SentencePiece model (pad 0 '<pad>', EOS 1 '</s>', unk 2, no
  BOS: SigLIP's layout), saved to `directory` and loaded back with AutoTokenizer."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))] * 20
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=buf, vocab_size=60, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
      unk_piece="<unk>", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "spiece.model").write_bytes(buf.getvalue())
  tok = transformers.SiglipTokenizer(vocab_file=str(directory / "spiece.model"),
                                     model_max_length=64)
  tok.save_pretrained(str(directory))
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def make_hf_siglip(directory, tokenizer, seed=0, vision=VISION, text=TEXT):
  """A random transformers SiglipModel (LayerNorms, probe, logit scale and bias perturbed),
  saved with the tokenizer and a SigLIP image processor. Returns the torch model (eval)."""
  text = dict(text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, projection_size=vision["hidden_size"])
  cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
  torch.manual_seed(seed)
  model = transformers.SiglipModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name in ("logit_scale", "logit_bias") or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
    model.logit_scale.fill_(1.3)  # exp = 3.7: sigmoid probabilities away from 0 and 1.
    model.logit_bias.fill_(-0.4)
  model.save_pretrained(str(directory))
  tokenizer.save_pretrained(str(directory))
  s = vision["image_size"]
  transformers.SiglipImageProcessorPil(size={"height": s, "width": s}).save_pretrained(
      str(directory))
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(directory, torch model, tokenizer) of one tiny random SiglipModel."""
  root = tmp_path_factory.mktemp("siglip")
  tok = make_siglip_tokenizer(root / "tok")
  model = make_hf_siglip(root / "hf", tok)
  return root / "hf", model, tok


@pytest.fixture(scope="module")
def imported(hf):
  return hf_siglip.load_siglip(str(hf[0]))


def _l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_inputs(path, images):
  processor = transformers.AutoProcessor.from_pretrained(str(path))
  assert isinstance(processor, transformers.SiglipProcessor)
  return processor(text=TEXTS, images=images, padding="max_length", return_tensors="pt")


def _ours(config, params, pixels_nchw, ids):
  out = jax.jit(siglip_lib.SiglipModel(config).apply)(
      {"params": params}, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)), jnp.asarray(ids))
  return jax.tree.map(np.asarray, out)


def test_import_matches_transformers(hf, imported):
  path, model, tok = hf
  config, params = imported
  assert config.vision.width == 36 and config.text.width == 44 and config.text.max_len == 64
  inputs = _hf_inputs(path, random_images(3))
  ids = inputs["input_ids"].numpy()
  assert ids.shape == (4, 64) and (ids[:, -1] == tok.eos_token_id).all()
  with torch.no_grad():  # input_ids only, as SigLIP was trained (no padding mask).
    want = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
  ours = _ours(config, params, inputs["pixel_values"].numpy(), ids)
  for key in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
    np.testing.assert_allclose(ours[key], getattr(want, key).numpy(), atol=1e-4, err_msg=key)
  np.testing.assert_allclose(ours["logit_scale"], np.exp(1.3), rtol=1e-6)
  np.testing.assert_allclose(ours["logit_bias"], -0.4, rtol=1e-6)
  # Token outputs equal HF's last_hidden_state (both after the final / post LayerNorm).
  m = siglip_lib.SiglipModel(config)
  vis = jax.jit(lambda p, x: m.apply({"params": p}, x, method=lambda s, x: s.vision(x)))(
      params, jnp.asarray(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(vis["tokens"]),
                             want.vision_model_output.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(vis["pooled"]),
                             want.vision_model_output.pooler_output.numpy(), atol=1e-4)
  txt = jax.jit(lambda p, i: m.apply({"params": p}, i, method=lambda s, i: s.text(i)))(
      params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(txt["tokens"]),
                             want.text_model_output.last_hidden_state.numpy(), atol=1e-4)


def _random_params(config, seed=0):
  """Params with every leaf perturbed (LayerNorms, biases, probe, scale and bias included)."""
  params = nn.unbox(jax.jit(functools.partial(siglip_lib.init_params, config))(
      jax.random.PRNGKey(seed)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [np.asarray(l) + np.asarray(0.1 * rng.randn(*l.shape), np.float32)
                                   for l in leaves])


def _our_config(tok, **runtime):
  return siglip_lib.siglip_config(
      "tiny", vision=dict(width=36, num_layers=2, num_heads=3, mlp_dim=72, patch_size=8,
                          image_size=32),
      text=dict(width=44, num_layers=3, num_heads=4, mlp_dim=88, vocab_size=len(tok),
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), **runtime)


def test_export_to_transformers_round_trips(tmp_path):
  tok = make_siglip_tokenizer(tmp_path / "tok")
  config = _our_config(tok, scan=True)  # Scanned params: the export unstacks them.
  params = _random_params(config)
  out = hf_siglip.save_siglip(str(tmp_path / "export"), config, params, tokenizer=tok)

  model, info = transformers.SiglipModel.from_pretrained(str(out), output_loading_info=True)
  model.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  expected = hf_siglip.params_to_hf_state(config, params)
  sd = model.state_dict()
  assert set(expected) == {k for k in sd if not k.endswith("position_ids")}
  for key, value in expected.items():
    np.testing.assert_array_equal(sd[key].numpy(), value, err_msg=key)

  processor = transformers.AutoProcessor.from_pretrained(str(out))
  ip = processor.image_processor
  assert (ip.size["height"], ip.size["width"]) == (32, 32)
  assert list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
  assert ip.resample == Image.BICUBIC and not getattr(ip, "do_center_crop", False)
  inputs = _hf_inputs(out, random_images(2))
  assert inputs["pixel_values"].shape == (2, 3, 32, 32)
  with torch.no_grad():
    want = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
  ours = _ours(config, params, inputs["pixel_values"].numpy(), inputs["input_ids"].numpy())
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    np.testing.assert_allclose(ours[key], getattr(want, key).numpy(), atol=1e-4, err_msg=key)

  config2, params2 = hf_siglip.load_siglip(str(out), scan=True)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  with pytest.raises(FileExistsError, match="not empty"):
    hf_siglip.save_siglip(str(out), config, params)


def test_text_is_padded_to_64_with_eos_and_pooled_from_the_last_token(hf):
  path, model, tok = hf
  sig = api.load(str(path), batch_size=3)
  assert isinstance(sig, api.FashionSigLIP)
  ids, mask = sig.tokenize(TEXTS)
  assert ids.shape == (4, 64) and mask is None
  eos = tok.eos_token_id
  assert tok.pad_token_id == eos
  for row, text in zip(ids, TEXTS):
    own = tok(text)["input_ids"]  # Canonicalised, EOS appended, unpadded.
    assert own[-1] == eos
    np.testing.assert_array_equal(row, own + [eos] * (64 - len(own)))
  with torch.no_grad():
    padded = model.get_text_features(input_ids=torch.as_tensor(ids)).pooler_output.numpy()
    unpadded = np.concatenate([
        model.get_text_features(input_ids=torch.as_tensor([tok(t)["input_ids"]])
                                ).pooler_output.numpy() for t in TEXTS])
  got = sig.encode_text(TEXTS)  # batch_size 3: one full chunk, one padded.
  np.testing.assert_allclose(got, _l2(padded), atol=1e-4)
  np.testing.assert_allclose(sig.encode_text(TEXTS, normalize=False), padded, atol=1e-4)
  # The last-token pool reads the padding: unpadded (or masked) text is another embedding.
  assert np.abs(_l2(unpadded) - got).max() > 1e-2


def test_api_zero_shot_is_sigmoid_of_scaled_cosine_plus_bias(hf, tmp_path):
  path, model, _ = hf
  sig = api.load(str(path), batch_size=4)
  images = random_images(3, seed=2)
  labels = ["red dress", "black shoes", "blue silk"]
  processor = transformers.AutoProcessor.from_pretrained(str(path))
  inputs = processor(text=[f"a photo of a {l}" for l in labels], images=images,
                     padding="max_length", return_tensors="pt")
  # Squash resize (no crop) + 0.5 / 0.5 stats reproduce SiglipProcessor's pixels.
  x = sig.preprocess_images(images)
  assert x.dtype == np.uint8 and x.shape == (3, 32, 32, 3)
  np.testing.assert_allclose((x / 255.0 - 0.5) / 0.5,
                             inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-5)
  with torch.no_grad():
    out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
  img, txt = out.image_embeds.numpy().astype(np.float64), out.text_embeds.numpy()
  scale, bias = float(model.logit_scale.detach().exp()), float(model.logit_bias.detach())
  want = 1 / (1 + np.exp(-(scale * _l2(img) @ _l2(txt.astype(np.float64)).T + bias)))
  got = sig.zero_shot_classify(images, labels, templates="a photo of a {}")
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got.sum(-1) - 1).max() > 1e-2  # Independent per-label probabilities.
  assert sig.logit_scale == pytest.approx(scale, rel=1e-6)
  assert sig.logit_bias == pytest.approx(bias, rel=1e-6)

  again = api.load(str(sig.save_pretrained(str(tmp_path / "export"))), batch_size=4)
  assert isinstance(again, api.FashionSigLIP)
  np.testing.assert_array_equal(again.encode_images(images), sig.encode_images(images))
  np.testing.assert_array_equal(again.encode_text(TEXTS), sig.encode_text(TEXTS))


@pytest.mark.slow  # ~25 s: four recompiles of the model.
def test_levers_give_the_plain_embeddings(imported):
  """scan + remat, the 'xla' attention path and bf16 compute against the plain float32 model."""
  config, params = imported
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8))
  ids = jnp.asarray(rs.randint(0, config.text.vocab_size, (3, 16)).astype(np.int32))

  def forward(cfg, p):
    return jax.tree.map(np.asarray, jax.jit(siglip_lib.SiglipModel(cfg).apply)(
        {"params": p}, images, ids))

  def with_grads(cfg, p):
    def loss(p):
      out = siglip_lib.SiglipModel(cfg).apply({"params": p}, images, ids)
      return jnp.sum(out["logits_per_image"] ** 2), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, grads)

  plain, plain_grads = with_grads(config, params)
  scanned, scanned_grads = with_grads(
      config.replace(scan=True, remat_policy="nothing_saveable"), layers.stack_layers(params))
  width = max(config.vision.mlp_dim, config.text.mlp_dim)
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    numerics.assert_rounding_close(scanned[key], plain[key], width, what=key)
  # A parameter gradient sums over the batch's tokens: 2 x 16 patches, 3 x 16 text tokens.
  numerics.assert_rounding_close(layers.unstack_layers(scanned_grads), plain_grads, 48,
                                 what="grads")
  xla = forward(config.replace(attention_impl="xla"), params)
  for key in ("image_embeds", "text_embeds"):
    numerics.assert_rounding_close(xla[key], plain[key], width, what=key)
  bf16 = forward(config.replace(dtype="bfloat16"), params)
  for key in ("image_embeds", "text_embeds"):
    assert bf16[key].dtype == np.float32
    np.testing.assert_allclose(bf16[key], plain[key], atol=3e-2, err_msg=key)


_SHARDED = dict(
    vision=dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32),
    text=dict(width=48, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=40, max_len=16))


def test_param_axis_names_are_clips():
  """Every parameter has logical axis names, all of them ones the default rules map (the CLIP
  towers' names), so CLIP's fsdp / tensor sharding rules shard SigLIP unchanged."""
  config = siglip_lib.siglip_config("tiny", scan=True, **_SHARDED)
  boxed = jax.eval_shape(functools.partial(siglip_lib.init_params, config),
                         jax.random.PRNGKey(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
  names = {n for l in leaves for n in l.names}
  assert names - {None} <= {k for k, _ in DEFAULT_RULES}, names
  specs = nn.get_partition_spec(boxed)
  assert specs["vision"]["head"]["probe"] == P(None, None, "embed")
  assert specs["vision"]["patch_embed"]["bias"] == P("embed")
  assert specs["text"]["encoder"]["layers"]["attn"]["query"]["kernel"] == P(
      "layers", "embed", "heads", "kv")


@pytest.mark.slow
def test_sharded_init_and_forward_match_single_device():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), MESH_AXES)
  config = siglip_lib.siglip_config("tiny", scan=True, **_SHARDED)
  init = functools.partial(siglip_lib.init_params, config)
  rng = jax.random.PRNGKey(0)
  specs = nn.get_partition_spec(jax.eval_shape(init, rng))
  shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_RULES)
  params = nn.unbox(jax.jit(init, out_shardings=shardings)(rng))
  probe = params["vision"]["head"]["probe"]
  assert probe.addressable_shards[0].data.shape == (1, 1, 16)  # embed -> fsdp.
  reference = jax.device_get(nn.unbox(jax.jit(init)(rng)))
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
  ids = rs.randint(0, 40, (8, 16)).astype(np.int32)
  model = siglip_lib.SiglipModel(config)

  def forward(p, x, t):
    with nn.logical_axis_rules(DEFAULT_RULES):
      return model.apply({"params": p}, x, t)

  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    sharded = jax.jit(forward)(params, jax.device_put(images, batch), jax.device_put(ids, batch))
  single = jax.jit(forward)(jax.device_put(reference, jax.devices()[0]), images, ids)
  for key in ("image_embeds", "text_embeds", "logits_per_image"):
    numerics.assert_rounding_close(np.asarray(sharded[key]), np.asarray(single[key]), 64,
                                   what=key)


@pytest.mark.parametrize("variant", ["B/16", "So400m/14"])
def test_param_counts_equal_transformers(variant):
  config = siglip_lib.siglip_config(variant)
  with torch.device("meta"):
    torch_model = transformers.SiglipModel(config.to_hf())
  torch_count = sum(p.numel() for p in torch_model.parameters())
  assert siglip_lib.count_params(config) == torch_count
  assert siglip_lib.count_params(config.replace(scan=True)) == torch_count


def test_config_round_trips_and_defaults():
  config = siglip_lib.siglip_config("B/16-256", text=dict(max_len=32))
  assert config.vision.image_size == 256 and config.vision.act == "gelu_tanh"
  assert config.vision.layer_norm_eps == 1e-6 and config.vision.image_mean == (0.5,) * 3
  assert config.logit_scale_init == sigmoid_lib.INIT_LOG_TEMPERATURE
  assert config.logit_bias_init == sigmoid_lib.INIT_BIAS
  so = siglip_lib.siglip_config("So400m/14")
  assert (so.vision.width, so.vision.num_layers, so.vision.num_heads, so.vision.mlp_dim,
          so.vision.patch_size, so.vision.image_size, so.text.width) == (
              1152, 27, 16, 4304, 14, 384, 1152)
  hf_cfg = config.to_hf()
  assert hf_cfg.vision_config.hidden_act == "gelu_pytorch_tanh"
  assert siglip_lib.SiglipConfig.from_hf(hf_cfg) == config
  assert siglip_lib.SiglipConfig.from_hf(hf_cfg.to_dict()) == config
  assert siglip_lib.SiglipConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  # New-init logit scale and bias: exp(log 10) and -10.
  tiny = siglip_lib.siglip_config("tiny", text=dict(vocab_size=50, max_len=8))
  params = nn.unbox(jax.jit(functools.partial(siglip_lib.init_params, tiny))(
      jax.random.PRNGKey(0)))
  assert float(params["logit_scale"]) == pytest.approx(np.log(10.0))
  assert float(params["logit_bias"]) == -10.0


def test_bad_configs_and_checkpoints_raise_clear_errors(hf, tmp_path):
  with pytest.raises(ValueError, match="Unknown SigLIP variant 'B/32'"):
    siglip_lib.siglip_config("B/32")
  with pytest.raises(ValueError, match=r"SigLIP needs vision\.class_token=False"):
    siglip_lib.siglip_config("tiny", vision=dict(pool="cls", class_token=True))
  with pytest.raises(ValueError, match=r"got text\.causal=True"):
    siglip_lib.siglip_config("tiny", text=dict(causal=True))
  d = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION).to_dict()
  d["vision_config"]["vision_use_head"] = False
  with pytest.raises(ValueError, match="vision_use_head=False"):
    siglip_lib.SiglipConfig.from_hf(d)
  d = transformers.SiglipConfig(text_config=dict(TEXT, projection_size=40),
                                vision_config=VISION).to_dict()
  with pytest.raises(ValueError, match="projection_size=40"):
    siglip_lib.SiglipConfig.from_hf(d)
  # A custom-code config (model_type siglip + auto_map) is not a SiglipModel.
  custom = dict(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION).to_dict(),
                auto_map={"AutoModel": "custom.Model"}, architectures=["MarqoFashionSigLIP"])
  with pytest.raises(ValueError, match="auto_map"):
    siglip_lib.SiglipConfig.from_hf(custom)
  # A wrong shape names the key and both shapes.
  broken = tmp_path / "broken"
  shutil.copytree(hf[0], broken)
  state = load_file(str(broken / "model.safetensors"))
  state["vision_model.head.attention.in_proj_weight"] = np.zeros((108, 35), np.float32)
  save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf_io.CheckpointMismatchError,
                     match=r"'vision_model\.head\.attention\.in_proj_weight': checkpoint shape "
                           r"\(108, 35\) != expected shape \(108, 36\)"):
    hf_siglip.load_siglip(str(broken))


def test_api_bad_paths_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    api.load(str(tmp_path / "no_such_model"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    api.load(str(tmp_path / "empty"))
  (tmp_path / "bert").mkdir()
  (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type 'bert'"):
    api.load(str(tmp_path / "bert"))
  (tmp_path / "custom").mkdir()
  (tmp_path / "custom" / "config.json").write_text(json.dumps(
      {"model_type": "siglip", "auto_map": {"AutoModel": "m.Model"}}))
  with pytest.raises(ValueError, match="auto_map"):
    api.load(str(tmp_path / "custom"))


def test_fashionclip_refuses_a_siglip_directory(hf):
  with pytest.raises(ValueError, match="SigLIP checkpoint.*api.load"):
    api.FashionCLIP.from_pretrained(str(hf[0]))


def test_open_clip_directory_is_read_before_its_custom_config(hf, tmp_path, monkeypatch):
  """The api's open_clip branch: a directory with open_clip_config.json AND a custom-code
  config.json (Marqo's hub layout) is read through open_clip.to_hf (stood in for by the HF
  model's own state: tests/test_open_clip.py checks to_hf against open_clip), never refused for
  its auto_map, and gives the same model and preprocessing."""
  path, model, tok = hf
  (tmp_path / "oc").mkdir()
  tok.save_pretrained(str(tmp_path / "oc"))
  (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
  (tmp_path / "oc" / "config.json").write_text(json.dumps(
      {"model_type": "siglip", "auto_map": {"AutoModel": "marqo.Model"}}))
  checkpoint = open_clip_lib.OpenClipCheckpoint(
      kind="siglip", hf_config=model.config.to_dict(),
      hf_state={k: v.numpy() for k, v in model.state_dict().items()},
      preprocess=dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
                      resize_mode="squash"),
      text_clean="canonicalize", tokenizer_name=None, context_length=64)
  monkeypatch.setattr(open_clip_lib, "to_hf", lambda path_or_id: checkpoint)
  sig = api.load(str(tmp_path / "oc"), batch_size=4)
  assert isinstance(sig, api.FashionSigLIP) and sig.text_clean == "canonicalize"
  assert sig.resize_mode == "squash" and sig.config.vision.image_mean == (0.5,) * 3
  ref = api.load(str(path), batch_size=4)
  jax.tree.map(np.testing.assert_array_equal, sig.params, ref.params)
  ids, _ = sig.tokenize(["A  RED_dress!!"])  # open_clip's canonicalize: '_' -> ' ' too.
  np.testing.assert_array_equal(ids, ref.tokenize(["a red dress"])[0])
  x = random_images(2, seed=4)
  np.testing.assert_array_equal(sig.preprocess_images(x), ref.preprocess_images(x))
  with pytest.raises(ValueError, match="CLIP checkpoint|SigLIP checkpoint"):
    api.FashionCLIP.from_pretrained(str(tmp_path / "oc"))
  (tmp_path / "oc" / "open_clip_config.json").unlink()  # Without it: the custom code refused.
  with pytest.raises(ValueError, match="auto_map"):
    api.load(str(tmp_path / "oc"))


def _pool_vs_einsum(impl, dtype):
  """rel. differences (value, input grad, param grads) of AttentionPool under `impl` vs einsum,
  ViT-B-sized: 196 tokens (even; the single query row is padded for cuDNN), 12 heads."""
  b, n, d = 4, 196, 768
  x = jnp.asarray(np.random.RandomState(0).randn(b, n, d).astype(np.float32))
  kw = dict(num_heads=12, mlp_dim=4 * d, dtype=dtype)
  params = nn.unbox(layers.AttentionPool(**kw).init(jax.random.PRNGKey(0), x))["params"]

  def run(impl):
    pool = layers.AttentionPool(**kw, attention_impl=impl)
    f = lambda p, x: (pool.apply({"params": p}, x).astype(jnp.float32) ** 2).mean()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
  (y0, (gp0, gx0)), (y1, (gp1, gx1)) = run("einsum"), run(impl)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  flat = lambda t: jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(t)])
  return rel(y1, y0), rel(gx1, gx0), rel(flat(gp1), flat(gp0))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_pool_matches_einsum_on_gpu():
  value, grad_x, grad_p = _pool_vs_einsum("cudnn", jnp.bfloat16)
  assert value < 1e-2 and grad_x < 2e-2 and grad_p < 2e-2, (value, grad_x, grad_p)
