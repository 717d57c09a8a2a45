"""The prepare step: build_data, launch.prepare, launch.train (the same flags on the last two).

On synthetic_catalog/tiny and a tiny FashionViL config (32 px, 2 x 2 grid): which artefacts a
config needs; launch.prepare's library writes the manifest and the artefacts, skips them on a
rerun, refuses (or with overwrite remakes) an artefact made for another config; `apply` fills the
config keys, names the launch.prepare command when something is missing and refuses a manifest
of another dataset or image size. The slow test trains the VQ tokenizer (2 steps), caches its
codes, trains FashionViL 1 step from the filled config, and runs the two commands' error and
skip paths as subprocesses.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import fashionbert as fashionbert_config
from configs import fashionclip as fashionclip_config
from configs import fashionvil as fashionvil_config
from fashion_jax.checkpoint import manager as checkpoint
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.data import attributes as attributes_lib
from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=unused-import
from fashion_jax.prepare import attributes as prepare_attributes
from fashion_jax.prepare import make
from fashion_jax.prepare import manifest
from fashion_jax.prepare import vq_codes
from fashion_jax.train import loop
from tests import test_pipeline as tp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, GRID, CODES = 32, 2, 8
# The tokenizer for 32 px -> 2 x 2 codes: configs/vqvae.py:smoke (4 stride-2 stages) made tiny.
VQVAE = ("model.widths=(4, 8, 8, 8, 8)", "model.code_dim=4", "total_steps=2", "batch_size=8",
         "checkpoint.every_steps=2", "optimizer.schedule.warmup_steps=0", "mesh.data=1",
         "log_every_steps=1", "evals.vq_validation.batch_size=8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("synthetic_catalog/tiny", data_dir=d).download_and_prepare()
  return d


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_other"))
  tp.PipelineTestProducts(data_dir=d).download_and_prepare()
  return d


def tiny_config(data_dir, **tasks):
  """configs/fashionvil.py:smoke on synthetic_catalog/tiny, shrunk (as launch.train would run)."""
  c = fashionvil_config.get_config("smoke")
  c.data.name, c.data.data_dir = "synthetic_catalog/tiny", data_dir
  c.data.image_size, c.data.max_len = S, 16
  c.data.patch_mask = dict(grid=GRID, count=1, min_block=1)
  c.model.resnet = dict(depths=(1, 1, 1), widths=(8, 8, 8))  # 32 px -> 2 x 2 grid.
  c.model.bert = dict(variant="tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_position=32, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.model.num_codes = CODES
  c.objective.tasks.update(tasks)
  c.batch_size, c.total_steps, c.log_every_steps = 8, 1, 1
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.optimizer.schedule.warmup_steps = 0
  c.checkpoint = dict(every_steps=1, keep=1, best_metric=None, best_mode="max")
  c.evals = {}
  return c


def names(artefacts):
  return [a.name for a in artefacts]


# ------------------------------------------------------------------------------------------------
# Which artefacts a config needs.
# ------------------------------------------------------------------------------------------------
def test_needed_follows_the_task_weights_and_the_prepared_value():
  vil = fashionvil_config.get_config("smoke")
  assert names(manifest.needed(vil)) == ["attributes", "vq_codes"]
  vil.objective.tasks.pac = 0.0
  assert names(manifest.needed(vil)) == ["vq_codes"]
  vil.objective.tasks.mpfc = 0.0
  assert names(manifest.needed(vil)) == []
  vil = fashionvil_config.get_config("smoke")
  vil.data.vq_codes = "/my/own/codes.npz"  # The user's own file: nothing from the manifest.
  assert names(manifest.needed(vil)) == ["attributes"]
  vil.data.vq_codes = manifest.PREPARED
  assert names(manifest.needed(vil)) == ["attributes", "vq_codes"]
  assert manifest.reason(vil, manifest.BY_NAME["attributes"]) == "objective.tasks.pac=0.15 > 0"
  bert = fashionbert_config.get_config("smoke")
  assert names(manifest.needed(bert)) == []            # Cached patch features are opt-in...
  bert.data.patch_features = manifest.PREPARED
  assert names(manifest.needed(bert)) == ["patch_features"]  # ...with 'prepared'.
  assert names(manifest.needed(fashionclip_config.get_config("smoke"))) == []


def test_prepare_command_keeps_the_config_and_workdir_flags():
  argv = ["/x/launch/train.py", "--config=configs/fashionvil.py:smoke", "--workdir", "runs/a b",
          "--config.data.data_dir=/tmp/d", "--num_processes=2", "--config.total_steps=5"]
  assert manifest.prepare_command(argv) == (
      "python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir 'runs/a b' "
      "--config.data.data_dir=/tmp/d --config.total_steps=5")
  assert manifest.prepare_command(["evaluate.py", "--config=c.py"], "w") == (
      "python -m launch.prepare --config=c.py --workdir=w")


# ------------------------------------------------------------------------------------------------
# The tokenizer that matches a FashionViL config.
# ------------------------------------------------------------------------------------------------
def test_tokenizer_config_matches_the_fashionvil_config(data_dir):
  smoke = vq_codes.tokenizer_config(fashionvil_config.get_config("smoke"))
  assert (smoke.data.image_size, smoke.model.grid, smoke.model.num_codes) == (64, 4, 1024)
  assert smoke.model.widths == (16, 32, 64, 64, 64)  # configs/vqvae.py:smoke.
  base = vq_codes.tokenizer_config(fashionvil_config.get_config("base"))
  assert (base.data.name, base.data.image_size, base.model.grid) == (
      "synthetic_catalog/base", 224, 7)
  tiny = vq_codes.tokenizer_config(tiny_config(data_dir), overrides=VQVAE)
  assert (tiny.data.name, tiny.data.data_dir, tiny.data.image_size, tiny.model.grid,
          tiny.model.num_codes, tiny.total_steps) == ("synthetic_catalog/tiny", data_dir, S, GRID,
                                                      CODES, 2)
  odd = tiny_config(data_dir)
  odd.data.image_size = 48  # 48 / 2 = 24: no variant downsamples by 24.
  with pytest.raises(manifest.PrepareError, match=r"No configs/vqvae.py variant.*/24.*smoke: "
                     r"64 px -> 4 x 4 \(/16\)"):
    vq_codes.tokenizer_config(odd)
  with pytest.raises(manifest.PrepareError, match="model.grid=3.*data.patch_mask.grid"):
    vq_codes.tokenizer_config(tiny_config(data_dir), overrides=("model.grid=3",))


# ------------------------------------------------------------------------------------------------
# The manifest: made, skipped, refused, overwritten; apply.
# ------------------------------------------------------------------------------------------------
def test_prepare_records_skips_and_refuses_another_config(data_dir, tmp_path):
  config, workdir, lines = tiny_config(data_dir), str(tmp_path / "run"), []
  status = make.make_all(config, workdir, only=["attributes"], command="python -m launch.prepare "
                         "--config=X", config_name="configs/fashionvil.py:smoke", log=lines.append)
  assert status == {"attributes": make.MADE}
  path = os.path.join(workdir, "prepared", "attributes.txt")
  with open(os.path.join(workdir, "prepared", "manifest.json")) as f:
    entry = json.load(f)["artefacts"]["attributes"]
  assert entry["path"] == "attributes.txt" and entry["config_key"] == "data.attributes"
  assert entry["command"] == "python -m launch.prepare --config=X"
  assert entry["config"] == "configs/fashionvil.py:smoke" and entry["created"]
  assert entry["dataset"]["name"] == "synthetic_catalog/tiny"
  assert entry["dataset"]["version"] == "1.0.0"
  assert entry["dataset"]["splits"]["train"] == 24
  assert entry["dataset"]["data_dir"].startswith(os.path.abspath(data_dir))
  assert entry["made_for"] == {"data.text_fields": ["title", "description"],
                               "data.train_split": "train"}
  # The vocabulary is the mining of the train split's texts, joined as the pipeline joins them.
  texts = prepare_attributes.dataset_texts("synthetic_catalog/tiny", data_dir)
  assert len(texts) == 24
  assert attributes_lib.load_vocabulary(path) == [g for g, _ in attributes_lib.mine(texts)]
  assert entry["summary"].startswith(f"{len(attributes_lib.load_vocabulary(path))} pseudo-")

  mtime = os.stat(path).st_mtime_ns
  assert make.make_all(config, workdir, only=["attributes"], log=lines.append) == {
      "attributes": make.SKIPPED}
  assert os.stat(path).st_mtime_ns == mtime and "up to date" in lines[-1]

  other = tiny_config(data_dir)
  other.data.text_fields = ("title",)
  with pytest.raises(manifest.ArtefactMismatchError,
                     match=r"data.text_fields: \['title', 'description'\] there, \['title'\] "
                     r"here.*--overwrite"):
    make.make_all(other, workdir, only=["attributes"], log=lines.append)
  assert make.make_all(other, workdir, only=["attributes"], overwrite=True,
                       log=lines.append) == {"attributes": make.MADE}
  assert manifest.load(workdir)["artefacts"]["attributes"]["made_for"]["data.text_fields"] == [
      "title"]
  with pytest.raises(manifest.PrepareError, match=r"does not need \['patch_features'\] from "
                     r"launch.prepare; it needs \['attributes', 'vq_codes'\]"):
    make.make_all(config, workdir, only=["patch_features"])


def _fake_prepared(workdir, config, names_):
  """Records artefacts of `config`'s dataset with placeholder files (no training)."""
  identity = manifest.dataset_identity(config.data)
  os.makedirs(manifest.prepared_dir(workdir), exist_ok=True)
  for name in names_:
    a = manifest.BY_NAME[name]
    attributes_lib.save_vocabulary([("red", 3)], os.path.join(manifest.prepared_dir(workdir),
                                                              a.filename))
    manifest.record(workdir, a, dataset=identity,
                    made_for_values=manifest.made_for(name, config))


def test_apply_fills_the_keys_and_names_launch_prepare_when_missing(data_dir, tmp_path):
  config, workdir = tiny_config(data_dir), str(tmp_path / "run")
  command = manifest.prepare_command(["train.py", "--config=configs/fashionvil.py:smoke",
                                      f"--workdir={workdir}"])
  with pytest.raises(manifest.MissingArtefactError) as e:
    manifest.apply(config, workdir, command=command)
  message = str(e.value)
  assert ("Make them first with:  python -m launch.prepare --config=configs/fashionvil.py:smoke "
          f"--workdir={workdir}  (then rerun this command)") in message
  assert "data.attributes (the pseudo-attribute vocabulary" in message
  assert "data.vq_codes (the VQ tokenizer's codes" in message
  assert "needed since objective.tasks.mpfc=0.15 > 0" in message
  assert "manifest.json does not exist" in message
  assert "--config.objective.tasks.pac=0 --config.objective.tasks.mpfc=0" in message

  _fake_prepared(workdir, config, ["attributes"])
  with pytest.raises(manifest.MissingArtefactError, match=r"lists no 'vq_codes' \(it has "
                     r"\['attributes'\]\)") as e:
    manifest.apply(config, workdir, command=command)
  assert "data.attributes (" not in str(e.value)  # Only what is missing is named.

  _fake_prepared(workdir, config, ["attributes", "vq_codes"])
  filled = manifest.apply(config, workdir)
  prepared = os.path.abspath(manifest.prepared_dir(workdir))
  assert filled.data.attributes == os.path.join(prepared, "attributes.txt")
  assert filled.data.vq_codes == os.path.join(prepared, "vq_codes.npz")
  assert config.data.attributes == "" and config.data.vq_codes == ""  # A copy was filled.
  # A config that needs nothing, or gives its own file, is left as it is.
  own = tiny_config(data_dir, pac=0.0)
  own.data.vq_codes = "/my/codes.npz"
  assert manifest.apply(own, workdir) is own

  os.remove(os.path.join(prepared, "vq_codes.npz"))
  with pytest.raises(manifest.MissingArtefactError, match="lists 'vq_codes' at .*, which is gone"):
    manifest.apply(config, workdir)


def test_apply_refuses_a_manifest_of_another_dataset_or_image_size(data_dir, other_data_dir,
                                                                   tmp_path):
  config, workdir = tiny_config(data_dir), str(tmp_path / "run")
  _fake_prepared(workdir, config, ["attributes", "vq_codes"])
  other = tiny_config(other_data_dir)
  other.data.name = "pipeline_test_products"
  with pytest.raises(manifest.ArtefactMismatchError,
                     match=r"made for another dataset or config \(dataset data_dir: .*; dataset "
                     r"name: 'synthetic_catalog/tiny' there, 'pipeline_test_products' here; "
                     r"dataset splits: .*--overwrite"):
    manifest.apply(other, workdir, command="python -m launch.prepare --config=C --workdir=W")
  bigger = tiny_config(data_dir)
  bigger.data.image_size = 64
  with pytest.raises(manifest.ArtefactMismatchError,
                     match=r"'vq_codes' was made for another dataset or config \(data.image_size: "
                     r"32 there, 64 here\)"):
    manifest.apply(bigger, workdir)


# ------------------------------------------------------------------------------------------------
# End to end: the tokenizer, its codes, FashionViL trained from the filled config; the commands.
# ------------------------------------------------------------------------------------------------
def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m"] + args, cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)


@pytest.mark.slow  # Trains the VQ tokenizer and FashionViL (compiles), two subprocesses.
def test_prepare_then_train_end_to_end(data_dir, tmp_path):
  config = tiny_config(data_dir, itc=0.0, mlm=0.0, itm=0.0, mvc=0.0)  # The two that read files.
  config.objective.mode = "sum"  # Both PAC and MPFC run in the one step.
  workdir = str(tmp_path / "run")
  status = make.make_all(config, workdir, vqvae_overrides=VQVAE, batch_size=16)
  assert status == {"attributes": make.MADE, "vq_codes": make.MADE}
  entries = manifest.load(workdir)["artefacts"]
  assert entries["vq_codes"]["made_for"] == {"data.image_size": S, "data.patch_mask.grid": GRID,
                                             "data.train_split": "train",
                                             "model.num_codes": CODES}
  tokenizer = os.path.join(workdir, "prepared", "vqvae")
  assert entries["vq_codes"]["options"]["tokenizer_step"] == 2
  assert vq_codes.trained_step(tokenizer) == 2
  vq_config = checkpoint_restore.load_workdir_config(tokenizer)  # Trained on this data/size.
  assert (vq_config.data.name, vq_config.data.data_dir, vq_config.data.image_size,
          vq_config.model.grid, vq_config.evals.vq_validation.type) == (
              "synthetic_catalog/tiny", data_dir, S, GRID, "vq")
  with np.load(os.path.join(workdir, "prepared", "vq_codes.npz")) as f:
    codes, ids, num_views = f["codes"], f["product_id"], f["num_views"]
  assert len(set(ids)) == 24 and codes.shape[-1] == GRID * GRID
  valid = np.arange(codes.shape[1])[None, :] < num_views[:, None]
  assert (codes[valid] >= 0).all() and (codes[valid] < CODES).all()
  assert (codes[~valid] == -1).all()

  # A rerun skips both: nothing is rewritten or retrained.
  mtimes = {n: os.stat(manifest.artefact_path(workdir, e)).st_mtime_ns for n, e in entries.items()}
  assert make.make_all(config, workdir, vqvae_overrides=VQVAE) == {
      "attributes": make.SKIPPED, "vq_codes": make.SKIPPED}
  assert {n: os.stat(manifest.artefact_path(workdir, e)).st_mtime_ns
          for n, e in entries.items()} == mtimes
  ckpt = checkpoint.Checkpointer(tokenizer, read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()

  # Train finds them: the filled config trains PAC and MPFC on the prepared files.
  result = loop.train_and_evaluate(manifest.apply(config, workdir), workdir)
  assert int(result.state.step) == 1
  assert result.metrics["train/pac/rows_with_attributes"] > 0
  assert result.metrics["train/mpfc/num_targets"] > 0
  with open(os.path.join(workdir, "config.json")) as f:
    data = json.load(f)["data"]
  assert data["attributes"] == manifest.artefact_path(workdir, entries["attributes"])
  assert data["vq_codes"] == manifest.artefact_path(workdir, entries["vq_codes"])

  # The commands: launch.prepare with the same flags skips; launch.train on a workdir without
  # them stops in one line naming the launch.prepare command with its own flags.
  flags = ["--config=configs/fashionvil.py:smoke", "--config.data.name=synthetic_catalog/tiny",
           f"--config.data.data_dir={data_dir}", f"--config.data.image_size={S}",
           f"--config.data.patch_mask.grid={GRID}", f"--config.model.num_codes={CODES}"]
  proc = _run(["launch.prepare", f"--workdir={workdir}"] + flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "attributes skipped, vq_codes skipped (all up to date)" in proc.stdout
  empty = str(tmp_path / "empty")
  proc = _run(["launch.train", f"--workdir={empty}"] + flags)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("launch.train: This config needs prepared artefacts"), last
  assert ("python -m launch.prepare " + f"--workdir={empty} " + " ".join(flags)) in last, last
  assert not os.path.exists(empty)
