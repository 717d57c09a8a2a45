"""FashionViL downstream end to end on tiny fixtures, as the driver runs them.

One tiny FashionViL pretraining run (ITC only, 1 step) gives the pretrained workdir, shared by
the whole module; each downstream task then fine-tunes from it for 1 step through
`train_and_evaluate` with its own input (config.input = data/downstream.py) and evaluator, on
synthetic_catalog/tiny and on FashionIQ / Polyvore sets derived in the real on-disk formats and
built with the real builders. Cost is compile time, so every run uses a 1-device mesh (the
8-device sharded step is covered by the trainer's and FashionViL's sharding tests) and one step.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import fashionvil as fashionvil_config
from fashion_jax.checkpoint import restore as checkpoint_restore
from fashion_jax.data import derived
from fashion_jax.data.builders import fashioniq  # pylint: disable=unused-import
from fashion_jax.data.builders import polyvore_outfits  # pylint: disable=unused-import
from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=unused-import
from fashion_jax.parallel import sharding as sharding_lib
from fashion_jax.prepare import downstream as driver
from fashion_jax.systems import fashionvil_downstream as ds_system
from fashion_jax.train import loop
from fashion_jax.train import restore

S, L = 32, 16


def tiny_model(c):
  c.model.resnet = dict(depths=(1, 1, 1), widths=(8, 8, 8))  # 32 px -> 2 x 2 grid.
  c.model.bert = dict(variant="tiny", hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_position=32, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.model.num_codes = 8
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  tfds.builder("synthetic_catalog/tiny", data_dir=str(d)).download_and_prepare()
  fiq, pv = tmp_path_factory.mktemp("fiq"), tmp_path_factory.mktemp("pv")
  derived.write_fashioniq(str(fiq), size="tiny", image_size=S)
  derived.write_polyvore(str(pv), size="tiny", image_size=S)
  for name, manual in (("fashioniq/triplets", fiq), ("fashioniq/gallery", fiq),
                       ("polyvore_outfits/nondisjoint_items", pv),
                       ("polyvore_outfits/nondisjoint_outfits", pv),
                       ("polyvore_outfits/nondisjoint_fitb", pv)):
    tfds.builder(name, data_dir=str(d)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return str(d)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
  c = tiny_model(fashionvil_config.get_config("smoke"))
  c.data.name, c.data.data_dir = "synthetic_catalog/tiny", data_dir
  c.data.image_size, c.data.max_len = S, L
  c.data.views, c.data.mlm_prob = 1, 0.0
  c.data.patch_mask = dict(grid=0, count=0)
  c.objective.tasks = dict(itc=1.0)
  c.batch_size, c.total_steps, c.log_every_steps = 8, 1, 1
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.optimizer.schedule.warmup_steps = 0
  c.checkpoint = dict(every_steps=1, keep=1, best_metric=None, best_mode="max")
  c.evals = {}
  workdir = str(tmp_path_factory.mktemp("pre"))
  loop.train_and_evaluate(c, workdir)
  return workdir


def task_config(task, pretrained, data_dir):
  c = driver.task_config(task, "smoke", pretrained, data_dir, steps=1)
  c.data.max_len = L
  c.batch_size, c.log_every_steps = 8, 1
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  if task in ("retrieval", "scr"):
    c.data.name = "synthetic_catalog/tiny"
  if task == "retrieval":
    c.evals.retrieval.protocols = ("full",)  # The tiny test split has 8 products.
  if task == "ocir":
    c.objective.max_items = 3
  return c


def test_downstream_init_holds_every_pretrained_backbone_array(pretrained, data_dir):
  c = task_config("tgir", pretrained, data_dir)
  system = ds_system.System(c)
  # Jitted, as the trainer initialises (state.py): one compile instead of op-by-op dispatch.
  params = nn.unbox(jax.jit(system.init)(jax.random.key(1), system.dummy_batch(2)))
  _, pre, _ = restore.load_trained(pretrained)
  for collection in ("params", "batch_stats"):
    got = sharding_lib.flat_by_path(params[collection]["vil"])
    want = sharding_lib.flat_by_path(pre[collection])
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert float(params["params"]["tgir_scale"]) == 4.0
  # Without init.checkpoint the backbone is the seeded random init, not the pretrained one.
  c.init.checkpoint = ""
  fresh = nn.unbox(jax.jit(ds_system.System(c).init)(jax.random.key(1), system.dummy_batch(2)))
  assert not np.allclose(fresh["params"]["vil"]["image_proj"]["kernel"],
                         pre["params"]["image_proj"]["kernel"])


def test_another_architecture_is_refused_by_name(pretrained, data_dir):
  c = task_config("scr", pretrained, data_dir)
  c.model.share = False  # A second BERT the pretrained run does not have.
  system = ds_system.System(c)
  # The trainer's first call of init is jax.eval_shape (train/state.py): the refusal comes there,
  # before any array is made.
  with pytest.raises(ValueError, match="lacks backbone parameters.*fusion_bert"):
    jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(2))
  c = task_config("scr", pretrained, data_dir)
  c.model.bert.hidden_size = 16
  system = ds_system.System(c)
  with pytest.raises(ValueError, match="shape"):
    jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(2))


@pytest.mark.parametrize("task", ["retrieval", "tgir", "scr", "ocir"])
def test_task_fine_tunes_and_evaluates(task, pretrained, data_dir, tmp_path):
  c = task_config(task, pretrained, data_dir)
  metrics = driver.run_task(c, str(tmp_path / task))
  r = driver.row(metrics)
  if task == "retrieval":
    assert metrics["test/full/num_items"] == 8
    assert 0 <= r["ITR_full"] <= 100 and 0 <= r["TIR_full"] <= 100
  elif task == "tgir":
    for cat in ("dress", "shirt", "toptee"):
      assert metrics[f"validation/tgir/{cat}_num_queries"] == 4  # derived 'tiny': 4 val triplets.
      assert metrics[f"validation/tgir/{cat}_R@10"] <= metrics[f"validation/tgir/{cat}_R@50"]
    assert r["TGIR"] == pytest.approx(50 * (metrics["validation/tgir/mean_R@10"]
                                            + metrics["validation/tgir/mean_R@50"]))
    # Product search answers text-modified image queries of this run with its TGIR head.
    from fashion_jax.evaluate import common  # pylint: disable=g-import-not-at-top
    from fashion_jax.search import encoders  # pylint: disable=g-import-not-at-top
    workdir = str(tmp_path / task)
    enc = encoders.load_encoder(workdir, batch_size=2)
    assert enc.supports_composed and enc.image_size == S
    system, params, _ = restore.load_trained(workdir)
    images = np.random.default_rng(0).integers(0, 256, (3, S, S, 3), np.uint8)
    texts = ["is red", "has shorter sleeves and no pattern", "more casual"]
    ids = common.tokenizer_from_config(checkpoint_restore.load_workdir_config(workdir))(texts)
    want = system.tgir_query(params, images, ids, ids != system.tokenizer.pad_token_id)
    np.testing.assert_allclose(enc.composed(images, texts), np.asarray(want), atol=1e-5)
  elif task == "scr":
    assert metrics["test/cls/subcategory_num_examples"] == 8
    assert 0 <= metrics["test/cls/subcategory_macro_f1"] <= metrics["test/cls/subcategory_acc"] + 1
  else:
    questions = len(tfds.builder("polyvore_outfits/nondisjoint_fitb", data_dir=data_dir)
                    .as_dataset(split="test"))
    assert metrics["test/ocir/num_queries"] == questions > 0
    assert metrics["test/ocir/R@10"] <= metrics["test/ocir/R@30"] <= metrics["test/ocir/R@50"]
    assert 0 < metrics["test/ocir/mean_gallery"]
  assert all(np.isfinite(v) for v in metrics.values())
