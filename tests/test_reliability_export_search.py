"""Export and search reliability (issue #16, items 3, 11, 12, 13b and 14).

- `--overwrite` replaces only the files an export writes: a target holding anything else
  (labels.json, NOTES.md, keep.txt, a file in bert/) is refused with every foreign file named,
  and nothing is deleted; a previous export (and a stale weight file of one) is replaced. Checked
  for every export layout: CLIPModel, BertModel, E2, FashionBERT (ResNet and pooled pixels),
  FashionViL.
- `launch.export` exports E2 and FashionBERT runs (the latter also with the default pooled-pixel
  patches); the exported torch modules reproduce the JAX forward of the run's checkpoint.
- A truncated weights file is an error naming the file, its size, and what to do.
- A product index records the model it was built with (path, step, params fingerprint); a query
  with another model is refused (message says how to rebuild) unless explicitly allowed.
- An empty query text is an error; k < 1 is an error and k above the index size is capped with a
  note, in the library and in `python -m launch.search query`.
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fashion_jax import systems
from fashion_jax.interop import e2_torch
from fashion_jax.interop import fashionbert_torch
from fashion_jax.interop import hf_bert
from fashion_jax.interop import hf_clip
from fashion_jax.interop import hf_io
from fashion_jax.models import bert as bert_lib
from fashion_jax.models import vit as vit_lib
from fashion_jax.search import encoders
from fashion_jax.search import products
from fashion_jax.train import loop
from launch import export as export_cli
from tests import test_e2_system
from tests import test_fashionbert
from tests import test_fashionbert_pixels
from tests import test_fashionvil
from tests.test_fashionclip_system import tiny_config as fashionclip_tiny_config
from fashion_jax.train import restore

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOREIGN = {"labels.json": "my labels", "NOTES.md": "# notes", "keep.txt": "keep me"}


def _init(system, batch_size=8):
  return jax.device_get(nn.unbox(jax.jit(system.init)(jax.random.key(0),
                                                      system.dummy_batch(batch_size))))


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Item 3: --overwrite never deletes what an export did not write.
# ------------------------------------------------------------------------------------------------
def _fashionbert_pixels_config():
  return test_fashionbert_pixels._config(image_size=32, grid=4, max_len=12)  # pylint: disable=protected-access


def _exporter(name, tmp_path):
  """(export(out, overwrite), sub-directory it writes or None) of one export layout."""
  if name == "clipmodel":
    system = systems.get_system(fashionclip_tiny_config())
    params = _init(system)
    return lambda out, ow: system.export(params, out, overwrite=ow), None
  if name == "bertmodel":
    model = bert_lib.bert("tiny", num_layers=1, with_pooler=True)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.device_get(nn.unbox(model.init(jax.random.key(0), ids, ids != 0)))["params"]
    return lambda out, ow: hf_bert.export_hf_bert(params, model, out, overwrite=ow), None
  if name == "e2":
    system = systems.get_system(test_e2_system._config())  # pylint: disable=protected-access
    params = _init(system)
    return lambda out, ow: system.export(params, out, overwrite=ow), "clip"
  if name in ("fashionbert_resnet", "fashionbert_pixels"):
    config = (test_fashionbert._config() if name == "fashionbert_resnet"  # pylint: disable=protected-access
              else _fashionbert_pixels_config())
    system = systems.get_system(config)
    variables = _init(system)
    return lambda out, ow: system.export(variables, out, overwrite=ow), "bert"
  if name == "fashionvil":
    system = systems.get_system(test_fashionvil.tiny_config(tmp_path))
    variables = _init(system)
    return lambda out, ow: system.export(variables, out, overwrite=ow), "cnn"
  raise ValueError(name)


@pytest.mark.parametrize("name", [
    "clipmodel", "bertmodel", "e2", "fashionbert_pixels",
    pytest.param("fashionbert_resnet", marks=pytest.mark.slow),   # ~25 s each on 2 cores
    pytest.param("fashionvil", marks=pytest.mark.slow)])
def test_overwrite_refuses_foreign_files_and_replaces_an_export(name, tmp_path):
  export, sub = _exporter(name, tmp_path)
  out = tmp_path / "out"
  export(str(out), False)
  first = _files(out)
  assert first
  # The user's own files next to the export (and one inside a sub-directory of it).
  for fname, text in FOREIGN.items():
    (out / fname).write_text(text)
  foreign = set(FOREIGN)
  if sub:
    (out / sub / "keep.txt").write_text("mine too")
    foreign.add(f"{sub}/keep.txt")
  before = _files(out)
  with pytest.raises(FileExistsError) as e:
    export(str(out), True)
  for f in foreign:
    assert f in str(e.value), (f, str(e.value))
  assert "overwrite" in str(e.value)
  assert _files(out) == before  # Nothing deleted, nothing rewritten.
  # Without the foreign files, --overwrite replaces the export, stale weight files included.
  for f in foreign:
    (out / f).unlink()
  (out / "pytorch_model.bin").write_bytes(b"stale weights of an older export")
  export(str(out), True)
  assert set(_files(out)) == set(first)


def test_overwrite_refuses_unknown_directories_and_plain_non_empty_dirs(tmp_path):
  out = tmp_path / "out"
  (out / "data").mkdir(parents=True)
  (out / "data" / "config.json").write_text("{}")  # An export's file name, in a foreign dir.
  (out / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match=r"holds data/config\.json, which no export writes"):
    hf_io.prepare_export_dir(str(out), overwrite=True)
  assert (out / "data" / "config.json").exists() and (out / "config.json").exists()
  with pytest.raises(FileExistsError, match="not empty"):
    hf_io.prepare_export_dir(str(out), overwrite=False)


# ------------------------------------------------------------------------------------------------
# Item 14: every system's run goes through `launch.export`; torch parity on the run's params.
# ------------------------------------------------------------------------------------------------
class _Batches:
  """The trainer's iterator interface over `make(step)` (a resumable `position`)."""

  def __init__(self, make, start_step):
    self.make, self.position = make, start_step

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.make(self.position)
    self.position += 1
    return batch


def _tiny_run(config, workdir, make_batch, steps=1):
  """Trains `steps` steps with `loop.train_and_evaluate` on `make_batch(step)` (a real run:
  config.json and checkpoints in `workdir`)."""
  config.total_steps = steps
  config.log_every_steps = steps
  config.checkpoint.every_steps = steps
  config.checkpoint.best_metric = None
  config.evals = {}
  config.optimizer.schedule.warmup_steps = 0
  factory = lambda cfg, start_step=0, **kw: _Batches(make_batch, start_step)
  loop.train_and_evaluate(config, str(workdir), iterator_factory=factory)
  return str(workdir)


def test_launch_export_names_the_systems_that_export(toy_config, tmp_path):
  from tests import toy_system  # pylint: disable=g-import-not-at-top
  toy_config.total_steps = 2
  loop.train_and_evaluate(toy_config, str(tmp_path / "run"),
                          iterator_factory=toy_system.make_iterator)
  with pytest.raises(ValueError, match=re.escape(
      "System 'tests.toy_system' of " + str(tmp_path / "run") + " has no export(); the systems "
      "that export are ['e2', 'fashionbert', 'fashionclip', 'fashionvil']")):
    export_cli.export(str(tmp_path / "run"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def _fashionbert_parity(system, variables, out, atol=1e-5):
  """FashionBertTorch from `out` against the Flax forward of `variables` on 3 fresh rows."""
  tm = fashionbert_torch.load_fashionbert_torch(out)
  b = test_fashionbert._batch(system, 3, seed=99)  # pylint: disable=protected-access
  model = system.model
  want = model.apply(variables, b["text"], b["text_mask"], images=b["image"],
                     patch_mask=b["patch_mask"])
  length = b["text"].shape[1]
  mlm = model.apply(variables, want["hidden"][:, :length], method=model.mlm_logits)
  mpm = model.apply(variables, want["hidden"][:, length:], method=model.mpm_predict)
  with torch.no_grad():
    got = tm(torch.tensor(b["text"], dtype=torch.long), torch.tensor(b["text_mask"]),
             images=torch.tensor(b["image"]), patch_mask=torch.tensor(b["patch_mask"]))
    got_mlm = tm.mlm_logits(got["hidden"][:, :length])
    got_mpm = tm.mpm_predict(got["hidden"][:, length:])
  valid = np.concatenate([b["text_mask"], np.ones(b["patch_mask"].shape, bool)], 1)
  # FashionBertTorch returns the features after the patch mask, Flax before it.
  kept = ~b["patch_mask"]
  np.testing.assert_allclose(got["features"].numpy()[kept], np.asarray(want["features"])[kept],
                             atol=atol)
  assert not got["features"].numpy()[~kept].any()
  np.testing.assert_allclose(got["hidden"].numpy()[valid], np.asarray(want["hidden"])[valid],
                             atol=atol)
  np.testing.assert_allclose(got["align_logits"].numpy(), want["align_logits"], atol=atol)
  text = b["text_mask"]
  np.testing.assert_allclose(got_mlm.numpy()[text], np.asarray(mlm)[text], atol=10 * atol)
  np.testing.assert_allclose(got_mpm.numpy(), mpm, atol=atol)


def test_fashionbert_pooled_pixel_export_matches_flax(tmp_path):
  """The default (smoke) patch path exports: no cnn/, the pooling done in torch."""
  system = systems.get_system(_fashionbert_pixels_config())
  noise = np.random.default_rng(1)
  variables = jax.tree.map(
      lambda x: np.asarray(x) + 0.05 * noise.standard_normal(x.shape).astype(np.float32),
      _init(system))
  out = system.export(variables, str(tmp_path / "fb"))
  assert not (out / "cnn").exists()
  assert json.loads((out / "fashionbert.json").read_text())["pixel_pool"] == 4
  _fashionbert_parity(system, variables, out)


@pytest.mark.slow
def test_launch_export_e2_run_matches_the_jax_forward(tmp_path):
  config = test_e2_system._config()  # pylint: disable=protected-access
  config.batch_size = 8
  probe = systems.get_system(config)
  workdir = _tiny_run(config, tmp_path / "run",
                      lambda step: test_e2_system._batch(probe, step))  # pylint: disable=protected-access
  out, step = export_cli.export(workdir, str(tmp_path / "export"))
  assert step == 1
  system, params, _ = restore.load_trained(workdir)
  model = e2_torch.E2Torch.from_pretrained(str(out)).eval()
  batch = test_e2_system._batch(system, 99, batch_size=4)  # pylint: disable=protected-access
  want = system.model.apply({"params": params}, batch["image"], batch["text"], batch["tags"])
  pixels = np.asarray(vit_lib.normalize_images(jnp.asarray(batch["image"]))).transpose(0, 3, 1, 2)
  with torch.no_grad():
    got = model(torch.from_numpy(pixels), torch.from_numpy(batch["text"]).long(),
                torch.from_numpy(batch["tags"]).long())
  for k in ("image_embeds", "text_embeds", "entity_image_embeds", "entity_text_embeds"):
    np.testing.assert_allclose(got[k].numpy(), np.asarray(want[k]), atol=1e-5, err_msg=k)
  # The CLIP part is a plain transformers CLIPModel directory with the run's tokenizer.
  import transformers  # pylint: disable=g-import-not-at-top
  assert transformers.CLIPModel.from_pretrained(str(out / "clip")).config.projection_dim == 16
  assert (out / "clip" / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("patches", ["pixels", "resnet"])
def test_launch_export_fashionbert_run_matches_the_jax_forward(patches, tmp_path):
  config = (_fashionbert_pixels_config() if patches == "pixels"
            else test_fashionbert._config())  # pylint: disable=protected-access
  assert (config.model.cnn_variant == "pixels") == (patches == "pixels")
  config.batch_size = 16
  probe = systems.get_system(config)
  workdir = _tiny_run(config, tmp_path / "run",
                      lambda step: test_fashionbert._batch(probe, 16, seed=step))  # pylint: disable=protected-access
  out, step = export_cli.export(workdir, str(tmp_path / "export"))
  assert step == 1
  system, variables, _ = restore.load_trained(workdir)
  assert (out / "cnn").exists() == (patches == "resnet")
  _fashionbert_parity(system, variables, out)


# ------------------------------------------------------------------------------------------------
# Item 13b: a truncated weights file names itself.
# ------------------------------------------------------------------------------------------------
def _truncate(path: pathlib.Path) -> int:
  size = path.stat().st_size // 2
  with open(path, "r+b") as f:
    f.truncate(size)
  return size


def _assert_names_the_file(error, path, size):
  text = str(error.value)
  assert str(path) in text and f"{size} bytes" in text, text
  assert "truncated or corrupt" in text and re.search("re-download|re-export", text), text


def test_truncated_weights_name_the_file(tmp_path):
  system = systems.get_system(test_e2_system._config())  # pylint: disable=protected-access
  params = _init(system)
  out = system.export(params, str(tmp_path / "e2"))
  # transformers CLIPModel directory, read by our importer (FashionCLIP.from_pretrained, search).
  clip_file = out / "clip" / "model.safetensors"
  size = _truncate(clip_file)
  with pytest.raises(hf_io.CorruptWeightsError) as e:
    hf_clip.load_clip(str(out / "clip"))
  _assert_names_the_file(e, clip_file, size)
  # E2's own weights, read back into Flax and into the torch module.
  e2_file = out / e2_torch.WEIGHTS_FILE
  size = _truncate(e2_file)
  with pytest.raises(hf_io.CorruptWeightsError) as e:
    e2_torch.load_e2(str(out))
  _assert_names_the_file(e, e2_file, size)
  with pytest.raises(hf_io.CorruptWeightsError) as e:
    e2_torch.E2Torch.from_pretrained(str(out))
  _assert_names_the_file(e, e2_file, size)
  # A torch-pickle checkpoint cut short.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "config.json").write_text("{}")
  torch.save({"w": torch.zeros(64, 64)}, str(bin_dir / "pytorch_model.bin"))
  size = _truncate(bin_dir / "pytorch_model.bin")
  with pytest.raises(hf_io.CorruptWeightsError) as e:
    hf_io.load_hf_checkpoint(str(bin_dir))
  _assert_names_the_file(e, bin_dir / "pytorch_model.bin", size)


def test_truncated_fashionbert_export_names_the_file(tmp_path):
  system = systems.get_system(_fashionbert_pixels_config())
  out = system.export(_init(system), str(tmp_path / "fb"))
  for rel in ("bert/model.safetensors", "fashionbert.safetensors"):
    intact = (out / rel).read_bytes()
    size = _truncate(out / rel)
    with pytest.raises(hf_io.CorruptWeightsError) as e:
      fashionbert_torch.load_fashionbert_torch(out)
    _assert_names_the_file(e, out / rel, size)
    (out / rel).write_bytes(intact)
  fashionbert_torch.load_fashionbert_torch(out)  # Intact again: loads.


# ------------------------------------------------------------------------------------------------
# Items 11 and 12: stale indexes, empty queries, k.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=g-import-not-at-top,unused-import
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_catalog/tiny", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope="module")
def exported_index(catalog_dir, tmp_path_factory):
  """Two exported tiny CLIPModels (seeds 0 and 1) and an index of the test split built with the
  first: (index_dir, encoder 0, encoder 1)."""
  tmp = tmp_path_factory.mktemp("exported")
  system = systems.get_system(fashionclip_tiny_config())
  encs = []
  for seed in (0, 1):
    params = jax.device_get(nn.unbox(jax.jit(system.init)(jax.random.key(seed),
                                                          system.dummy_batch(2))))
    encs.append(encoders.load_encoder(str(system.export(params, str(tmp / f"clip{seed}")))))
  index_dir = str(tmp / "index")
  products.build_product_index(encs[0], "synthetic_catalog/tiny", "test", data_dir=catalog_dir,
                               thumb_size=0).save(index_dir)
  return index_dir, encs[0], encs[1]


def test_index_refuses_a_query_model_it_was_not_built_with(exported_index):
  index_dir, enc0, enc1 = exported_index
  with open(os.path.join(index_dir, "meta.json")) as f:
    identity = json.load(f)["model_identity"]
  assert identity == enc0.identity and identity["step"] is None
  assert identity["path"] == os.path.abspath(enc0.name)
  # The same files loaded again are the same model; the other export is not.
  assert encoders.load_encoder(enc0.name).identity == identity
  assert enc1.identity["fingerprint"] != identity["fingerprint"]
  index = products.ProductIndex.load(index_dir)
  query = index.query_texts(rows=[0])
  assert len(index.search_text(enc0, query, 3)[0]) == 3
  for search in (lambda: index.search_text(enc1, query, 3),
                 lambda: index.search_image(enc1, [index.thumbs[0]] if index.thumbs is not None
                                            else [np.zeros((8, 8, 3), np.uint8)], 3),
                 lambda: index.text_query_hits(enc1, k=3)):
    with pytest.raises(products.StaleIndexError) as e:
      search()
    text = str(e.value)
    for part in (enc0.name, enc1.name, identity["fingerprint"], "launch.search build",
                 f"--model={os.path.abspath(enc1.name)}", "--allow_model_mismatch"):
      assert part in text, (part, text)
  allowed = products.ProductIndex.load(index_dir, allow_model_mismatch=True)
  assert len(allowed.search_text(enc1, query, 3)[0]) == 3


def test_empty_query_is_an_error_and_k_is_capped_with_a_note(exported_index, caplog):
  index_dir, enc0, _ = exported_index
  index = products.ProductIndex.load(index_dir)
  n = len(index)
  for texts, bad in ((["   "], 0), (["red dress", ""], 1), (["\t\n"], 0)):
    with pytest.raises(ValueError, match=f"query text {bad} is empty"):
      index.search_text(enc0, texts, 3)
  with pytest.raises(TypeError, match=r"\['red dress'\]"):
    index.search_text(enc0, "red dress", 3)
  for k in (0, -2):
    with pytest.raises(ValueError, match=f"k={k} must be >= 1"):
      index.search_text(enc0, ["red dress"], k)
    with pytest.raises(ValueError, match=f"k={k} must be >= 1"):
      index.text_query_hits(enc0, k=k)
  with caplog.at_level(logging.WARNING):
    hits = index.search_text(enc0, ["red dress"], n + 40)[0]
  assert len(hits) == n and sorted(h.row for h in hits) == list(range(n))
  assert f"k={n + 40} exceeds the {n} indexed products; returning all {n}" in caplog.text
  assert index.text_query_hits(enc0, k=n + 40)[f"HITS@{n + 40}"] == 1.0
  # The raw vector index keeps a strict range (its outputs are [Q, k] arrays), same k < 1 text.
  with pytest.raises(ValueError, match="k=0 must be >= 1"):
    index.index.search(np.ones((1, index.meta["dim"]), np.float32), 0)


@pytest.fixture(scope="module")
def indexed_run(catalog_dir, tmp_path_factory):
  """A tiny FashionCLIP run with checkpoints 2 and 4, and an index built with step 2."""
  config = fashionclip_tiny_config()
  config.data.name = "synthetic_catalog/tiny"
  config.data.data_dir = catalog_dir
  config.batch_size = 8
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 3
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train_and_evaluate(config, workdir)
  enc2 = encoders.load_encoder(workdir, step=2)
  index_dir = str(tmp_path_factory.mktemp("index"))
  products.build_product_index(enc2, "synthetic_catalog/tiny", "test", data_dir=catalog_dir,
                               thumb_size=16).save(index_dir)
  return workdir, index_dir, enc2


@pytest.mark.slow
def test_index_of_step_2_refuses_the_newer_step_4(indexed_run):
  workdir, index_dir, enc2 = indexed_run
  with open(os.path.join(index_dir, "meta.json")) as f:
    identity = json.load(f)["model_identity"]
  assert identity["path"] == os.path.abspath(workdir) and identity["step"] == 2
  assert identity["fingerprint"] == enc2.identity["fingerprint"]
  index = products.ProductIndex.load(index_dir)
  query = index.query_texts(rows=[0])
  assert len(index.search_text(enc2, query, 3)[0]) == 3  # Its own model: fine.
  enc4 = encoders.load_encoder(workdir)  # The newest checkpoint: another model.
  assert enc4.identity["step"] == 4 and enc4.identity["fingerprint"] != identity["fingerprint"]
  with pytest.raises(products.StaleIndexError) as e:
    index.search_text(enc4, query, 3)
  text = str(e.value)
  assert "step 2" in text and "step 4" in text and "--step=4" in text, text
  assert "--step=2" in text and "--allow_model_mismatch" in text, text
  allowed = products.ProductIndex.load(index_dir, allow_model_mismatch=True)
  assert len(allowed.search_text(enc4, query, 3)[0]) == 3


def _search_cli(*args):
  env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "launch.search", "query", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_search_cli_refuses_an_empty_query(tmp_path):
  proc = _search_cli(f"--index_dir={tmp_path}", "--text=  ")
  assert proc.returncode != 0
  assert "query text 0 is empty" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_search_cli_stale_index_and_k_note(indexed_run):
  _, index_dir, _ = indexed_run
  proc = _search_cli(f"--index_dir={index_dir}", "--text=red dress", "--k=3")
  assert proc.returncode != 0
  assert "step 2" in proc.stderr and "--allow_model_mismatch" in proc.stderr, proc.stderr[-3000:]
  proc = _search_cli(f"--index_dir={index_dir}", "--text=red dress", "--k=50",
                     "--allow_model_mismatch")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "k=50 exceeds the 8 indexed products" in proc.stdout
  assert len([line for line in proc.stdout.splitlines() if line.startswith("    ")]) == 8
