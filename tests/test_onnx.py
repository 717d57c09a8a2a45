"""ONNX export of the towers: onnxruntime equals our JAX embeddings; the directory's contract.

One tiny FashionCLIP with odd widths (head dims 15 and 11, projection 19) goes through
`launch.export.export(export_format='onnx')` (its checkpoint restore replaced by in-memory
params) and most tests read that one export; a tiny SigLIP has its own. The reference is our
JAX forward (encode_images on uint8, encode_texts on int32 ids); the ONNX side is fed what
preprocess.json prescribes, computed here in float64 numpy.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from fashion_jax import systems
from fashion_jax.api import resize_and_crop
from fashion_jax.data import tokenizers
from fashion_jax.interop import hf_io
from fashion_jax.interop import onnx_export
from fashion_jax.models import siglip as siglip_lib
from fashion_jax.train import restore
from launch import export as export_cli
from tests.test_fashionclip_system import tiny_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXTS = ["red linen shirt", "navy striped wool coat with a belt and brass buttons", "bag"]


def _odd_clip_config():
  c = tiny_config()
  c.data.image_size = 24
  c.model.projection_dim = 19
  c.model.vision = dict(width=45, num_layers=2, num_heads=3, mlp_dim=70, patch_size=8)
  c.model.text = dict(width=33, num_layers=2, num_heads=3, mlp_dim=50)
  return c


def _random_params(init, *args, seed=0):
  """Numpy params of the shapes `init(*args)` returns (nothing compiled): every leaf random,
  LayerNorm scales 1 + 0.1 N(0, 1), all else 0.1 N(0, 1) (biases and logit scale included)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(init, *args))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (float(path[-1].key == "scale")
                       + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """launch.export --format=onnx of a tiny run: .system, .params, .out (the directory) and the
  JAX references .embed_images / .embed_texts (jitted, closing over the params)."""
  system = systems.get_system(_odd_clip_config())
  params = _random_params(system.init, jax.random.PRNGKey(0), system.dummy_batch(1))
  out = tmp_path_factory.mktemp("onnx") / "fc"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(export_cli.restore, "load_trained",
               lambda workdir, step=None: (system, params, 7))
    got, step = export_cli.export("unused-workdir", str(out), export_format="onnx")
  assert step == 7 and got == out
  return types.SimpleNamespace(
      system=system, params=params, out=out,
      embed_images=jax.jit(lambda x: system.embed_images(params, x)),
      embed_texts=jax.jit(lambda x: system.embed_texts(params, x)))


def _pixels(images_uint8, contract):
  """What preprocess.json prescribes, in float64: (x / 255 - mean) / std, NHWC -> NCHW."""
  pre = contract["image"]["preprocessing"]
  x = (images_uint8.astype(np.float64) / 255 - np.asarray(pre["mean"])) / np.asarray(pre["std"])
  return x.transpose(0, 3, 1, 2).astype(np.float32)


def _check_two_batch_sizes(out, contract, images, ids, embed_images, embed_texts):
  """Both sessions at batch 1 and 3 (one file each: the batch is dynamic) against the JAX
  embeddings of the same 3 rows (compiled once); returns the JAX text embeddings."""
  image = onnx_export.load_session(out / onnx_export.IMAGE_FILE)
  text = onnx_export.load_session(out / onnx_export.TEXT_FILE)
  want_images, want_texts = np.asarray(embed_images(images)), np.asarray(embed_texts(ids))
  for batch in (1, 3):
    got = image.run(None, {"pixel_values": _pixels(images[:batch], contract)})[0]
    assert got.shape == (batch, contract["embedding_dim"])
    np.testing.assert_allclose(got, want_images[:batch], atol=1e-4)
    got = text.run(None, {"input_ids": ids[:batch].astype(np.int64)})[0]
    assert got.shape == (batch, contract["embedding_dim"])
    np.testing.assert_allclose(got, want_texts[:batch], atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=-1), 1.0, atol=1e-6)
  return want_texts


def test_onnx_towers_equal_jax_at_two_batch_sizes(exported):
  ex, out = exported, exported.out
  assert set(onnx_export.ONNX_EXPORT_FILES) <= {p.name for p in out.iterdir()}
  assert not list(out.glob("*.data"))  # Weights inside the .onnx files.
  text_model = onnx.load(str(out / onnx_export.TEXT_FILE))
  opsets = {o.domain: o.version for o in text_model.opset_import}
  contract = json.loads((out / onnx_export.PREPROCESS_FILE).read_text())
  image = onnx_export.load_session(out / onnx_export.IMAGE_FILE)
  text = onnx_export.load_session(out / onnx_export.TEXT_FILE)
  assert [(i.name, i.type, i.shape) for i in image.get_inputs()] == [
      ("pixel_values", "tensor(float)", ["batch", 3, 24, 24])]
  assert [(i.name, i.type, i.shape) for i in text.get_inputs()] == [
      ("input_ids", "tensor(int64)", ["batch", "length"])]
  assert opsets[""] == contract["opset"] == onnx_export.OPSET
  assert contract["image"]["output"]["l2_normalized"] and contract["text"]["input"][
      "max_length"] == 16

  images = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
  ids = ex.system.tokenizer(TEXTS)  # int32 [3, 16], right-padded.
  want_texts = _check_two_batch_sizes(out, contract, images, ids, ex.embed_images,
                                      ex.embed_texts)
  assert contract["embedding_dim"] == 19
  # Dynamic length: the rows cut after the longest one's EOS give the same embeddings.
  length = int((ids == ex.system.tokenizer.eos_token_id).argmax(1).max()) + 1
  assert length < ids.shape[1]
  got = text.run(None, {"input_ids": ids[:, :length].astype(np.int64)})[0]
  np.testing.assert_allclose(got, want_texts, atol=1e-4)
  scale = float(np.exp(np.float64(ex.params["logit_scale"])))
  assert abs(contract["logit_scale"] - scale) <= 1e-5 * scale


def test_processor_saved_beside_the_models_prepares_their_inputs(exported):
  """CLIPProcessor.from_pretrained(out) -> onnxruntime == JAX on api.resize_and_crop images."""
  import transformers  # pylint: disable=g-import-not-at-top
  ex, out = exported, exported.out
  rng = np.random.default_rng(2)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((40, 30), (24, 57), (24, 24))]
  processor = transformers.CLIPProcessor.from_pretrained(str(out))
  inputs = processor(text=TEXTS, images=images, return_tensors="np", padding="max_length",
                     max_length=16, truncation=True)
  np.testing.assert_array_equal(inputs["input_ids"], ex.system.tokenizer(TEXTS))
  got = onnx_export.load_session(out / onnx_export.IMAGE_FILE).run(
      None, {"pixel_values": inputs["pixel_values"].astype(np.float32)})[0]
  ours = np.stack([resize_and_crop(im, 24) for im in images])
  np.testing.assert_allclose(got, np.asarray(ex.embed_images(ours)), atol=1e-4)
  got = onnx_export.load_session(out / onnx_export.TEXT_FILE).run(
      None, {"input_ids": inputs["input_ids"].astype(np.int64)})[0]
  np.testing.assert_allclose(got, np.asarray(ex.embed_texts(ex.system.tokenizer(
      TEXTS))), atol=1e-4)


def test_overwrite_replaces_an_onnx_export_and_never_foreign_files(exported, tmp_path):
  ex, out = exported, exported.out
  again = tmp_path / "again"
  shutil.copytree(out, again)
  with pytest.raises(FileExistsError, match="not empty"):
    onnx_export.export_clip(str(again), ex.system.model_config, ex.params)
  (again / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=r"notes\.txt, which no export writes"):
    onnx_export.export_clip(str(again), ex.system.model_config, ex.params, overwrite=True)
  assert (again / "notes.txt").read_text() == "keep me"
  assert (again / onnx_export.IMAGE_FILE).exists()  # Nothing deleted.
  (again / "notes.txt").unlink()
  # Every file an ONNX export writes is one that --overwrite may replace.
  hf_io.prepare_export_dir(str(again), overwrite=True)
  assert not list(again.iterdir())


def test_bad_format_and_unsupported_system_error_clearly(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown export format 'tflite'; expected one of "
                                       r"\['hf', 'onnx'\]"):
    export_cli.export(str(tmp_path / "no_run"), str(tmp_path / "out"), export_format="tflite")
  assert not (tmp_path / "out").exists()
  e2_like = types.SimpleNamespace(model=object(), config=types.SimpleNamespace(system="e2"))
  with pytest.raises(ValueError, match="System 'e2' has no ONNX export"):
    onnx_export.export_system(e2_like, {}, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_bad_params_are_refused_before_the_directory_is_touched(exported, tmp_path):
  ex = exported
  params = {k: v for k, v in ex.params.items() if k != "text"}
  with pytest.raises(hf_io.CheckpointMismatchError, match=r"missing \['text/"):
    onnx_export.export_clip(str(tmp_path / "out"), ex.system.model_config, params)
  assert not (tmp_path / "out").exists()


def test_sigmoid_trained_clip_keeps_its_bias_out_of_the_model(exported, monkeypatch):
  """A top-level logit_bias beside CLIP params goes to preprocess.json, not to CLIPModel."""
  ex, calls = exported, []
  monkeypatch.setattr(onnx_export, "export_clip", lambda *a, **k: calls.append((a, k)))
  params = dict(ex.params, logit_bias=np.float32(-7.5))
  onnx_export.export_system(ex.system, params, "unused")
  ((args, kwargs),) = calls
  assert "logit_bias" not in args[2] and set(args[2]) == set(ex.params)
  assert kwargs["logit_bias"] == -7.5 and kwargs["tokenizer"] is ex.system.tokenizer.hf


def test_siglip_towers_equal_jax_at_two_batch_sizes(tmp_path):
  """A tiny SigLIP (odd widths) through export_system: fixed text length, logit bias kept, the
  saved image processor and tokenizer produce what preprocess.json says."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer("clip", "", 12)
  cfg = siglip_lib.siglip_config(
      "tiny", vision=dict(width=45, num_layers=2, num_heads=3, mlp_dim=70, patch_size=8,
                          image_size=24),
      text=dict(width=33, num_layers=2, num_heads=3, mlp_dim=50, vocab_size=tok.vocab_size,
                max_len=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id))
  model = siglip_lib.SiglipModel(cfg)
  params = _random_params(functools.partial(siglip_lib.init_params, cfg), jax.random.PRNGKey(0),
                          seed=3)
  system = types.SimpleNamespace(model=model, model_config=cfg, tokenizer=tok,
                                 matryoshka_dims=(16, 0))
  out = onnx_export.export_system(system, params, str(tmp_path / "siglip"))
  contract = json.loads((out / onnx_export.PREPROCESS_FILE).read_text())
  assert contract["image"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
  assert contract["matryoshka_dims"] == [16, 0]
  np.testing.assert_allclose(contract["logit_bias"], params["logit_bias"], rtol=1e-6)
  np.testing.assert_allclose(contract["logit_scale"], np.exp(np.float64(params["logit_scale"])),
                             rtol=1e-6)
  image = onnx_export.load_session(out / onnx_export.IMAGE_FILE)
  text = onnx_export.load_session(out / onnx_export.TEXT_FILE)
  assert image.get_inputs()[0].shape == ["batch", 3, 24, 24]
  assert (text.get_inputs()[0].type, text.get_inputs()[0].shape) == ("tensor(int64)",
                                                                      ["batch", 12])
  images = np.random.default_rng(4).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
  ids = tok(TEXTS)  # Padded with pad (= EOS) to max_len.
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  np.testing.assert_allclose(
      processor(images=[Image.fromarray(x) for x in images], return_tensors="np")[
          "pixel_values"], _pixels(images, contract), atol=1e-6)
  saved = transformers.AutoTokenizer.from_pretrained(str(out))
  np.testing.assert_array_equal(
      saved(TEXTS, padding="max_length", max_length=12, truncation=True)["input_ids"], ids)
  apply = lambda method: jax.jit(lambda x: model.apply({"params": params}, x, method=method))
  _check_two_batch_sizes(out, contract, images, ids, apply(model.encode_images),
                         apply(model.encode_texts))


@pytest.mark.slow
def test_launch_export_cli_writes_onnx_of_a_trained_run(tmp_path):
  """`python -m launch.export --format=onnx` on a real 1-step run (checkpoint restore and all);
  --format=tflite is refused by the flag parser, naming the choices."""
  from tests import test_fashionclip_system  # pylint: disable=g-import-not-at-top
  from tests.test_reliability_export_search import _tiny_run  # pylint: disable=g-import-not-at-top
  config = _odd_clip_config()
  config.batch_size = 8
  workdir = _tiny_run(config, tmp_path / "run", test_fashionclip_system.batch_fn(config))
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "launch.export", f"--workdir={workdir}",
         f"--out={tmp_path / 'onnx'}"]
  proc = subprocess.run(cmd + ["--format=tflite"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode != 0 and "value should be one of <hf|onnx>" in proc.stderr, proc.stderr
  proc = subprocess.run(cmd + ["--format=onnx"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "onnx"
  system, params, _ = restore.load_trained(workdir)
  contract = json.loads((out / onnx_export.PREPROCESS_FILE).read_text())
  images = np.random.default_rng(5).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
  _check_two_batch_sizes(out, contract, images, system.tokenizer(TEXTS),
                         lambda x: system.embed_images(params, x),
                         lambda x: system.embed_texts(params, x))
