"""Reliability of the train loop's end, the config check of evaluations, and one zero-shot prompt set.

  * The stock FashionCLIP smoke config trains on a shop's own image_text_folder catalog without
    the synthetic probe splits: the optional evaluations it lacks are skipped with a note, the run
    ends cleanly with evaluation results and a restorable final checkpoint.
  * An evaluation that cannot run (missing split or field, no labels, a split too small) is a
    ConfigError naming the evaluation, the split and what the dataset has, before anything
    compiles; an unknown evaluator argument gets a "did you mean".
  * The final state is saved before the final evaluation: an evaluation that raises leaves the
    final checkpoint on disk, restorable, and rerunning the command only evaluates.
  * Nonsense hyper-parameters (lr / weight_decay < 0, a batch larger than the train split, a
    retrieval split of 1 or 2 products) are refused or warned about, naming the value.
  * A command-line override of a key that does not exist ends in one line with "did you mean".
  * Zero-shot: FashionCLIP.zero_shot_classify and the zero-shot evaluator use the same prompts,
    hence the same class embeddings and probabilities.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fashion_jax.api import FashionCLIP
from fashion_jax.data.builders import image_text_folder  # pylint: disable=unused-import
from fashion_jax.evaluate import common
from fashion_jax.evaluate import prompts
from fashion_jax.evaluate import zeroshot
from fashion_jax.train import config_check
from fashion_jax.evaluate import base as eval_base
from fashion_jax.train import loop
from fashion_jax.train import step as step_lib
from tests import fixtures_real
from tests import toy_system
from tests.test_fashionclip_system import load_config
from fashion_jax.train import restore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCATEGORIES = ("shirts", "dresses", "coats")
# A shop's own splits: no holdout_brand / holdout_category / improbable. 'one' and 'two' are
# the tiny validation splits of the hyper-parameter checks.
SPLITS = {"train": 24, "validation": 8, "test": 16, "one": 1, "two": 2}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
  """(data_dir, name) of an image_text_folder catalog built like launch.build_data does: a
  'subcategory' column, an empty 'brand' column, explicit splits SPLITS."""
  root = tmp_path_factory.mktemp("shop")
  rows = ["product_id,image,title,description,subcategory,brand,split"]
  k = 0
  for split, n in SPLITS.items():
    for _ in range(n):
      sub = SUBCATEGORIES[k % 3]
      fixtures_real.write_jpeg(os.path.join(root, "img", f"p{k}.jpg"), k)
      rows.append(f"p{k},img/p{k}.jpg,{sub[:-1]} number {k},a plain {sub[:-1]},{sub},,{split}")
      k += 1
  (root / "catalog.csv").write_text("\n".join(rows) + "\n")
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds.builder("image_text_folder/relshop", data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  assert set(builder.info.splits) == set(SPLITS)
  return str(data_dir), "image_text_folder/relshop"


def smoke_config(catalog):
  """configs/fashionclip.py:smoke as README's "Your own data" runs it, with tiny towers."""
  c = load_config("fashionclip", "smoke")
  c.data.name, c.data.data_dir = catalog[1], catalog[0]
  c.data.image_size, c.data.max_len, c.data.shuffle_buffer = 32, 16, 64
  c.model.projection_dim = 16
  c.model.vision = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=16)
  c.model.text = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64)
  c.batch_size = 8
  c.total_steps = 3
  c.log_every_steps = 1
  c.optimizer.schedule.warmup_steps = 1
  return c


@pytest.fixture
def absl_warnings(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  return lambda: "\n".join(r.getMessage() for r in caplog.records)


@pytest.fixture
def no_compile(monkeypatch):
  """Building the train step fails: an error raised instead proves nothing compiled."""
  def fail(*args, **kwargs):
    raise AssertionError("the train step was built")
  monkeypatch.setattr(step_lib, "make_train_step", fail)


@pytest.fixture(scope="module")
def smoke_run(catalog, tmp_path_factory):
  """The smoke config trained through train_and_evaluate on the catalog: (workdir, config,
  result, warnings logged)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())
  handler = Keep(level=logging.WARNING)
  logging.getLogger("absl").addHandler(handler)
  try:
    config = smoke_config(catalog)
    result = loop.train_and_evaluate(config, workdir)
  finally:
    logging.getLogger("absl").removeHandler(handler)
  return workdir, config, result, "\n".join(records)


# ------------------------------------------------------------------------------------------------
# Item 1: the stock config on a catalog without the probe splits.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # One FashionCLIP training run (module fixture, shared with the zero-shot test).
def test_smoke_config_trains_on_a_catalog_without_probe_splits(smoke_run):
  workdir, config, result, warnings = smoke_run
  assert int(result.state.step) == 3 and not result.preempted
  # Evaluations of what exists: validation and test retrieval, zero-shot by sub-category.
  m = result.metrics
  assert m["validation/full/num_items"] == 8 and m["test/full/num_items"] == 16
  assert 0 <= m["test/full/t2i_R@1"] <= 1
  assert m["test/zeroshot/subcategory_num_classes"] == 3
  assert not any(k.startswith(("holdout", "improbable")) for k in m)
  # Each skipped evaluation is named, with the splits the dataset has.
  for split in ("holdout_brand", "holdout_category", "improbable"):
    assert f"Skipping config.evals.retrieval_{split} (type 'retrieval', split={split!r})" \
        in warnings
  assert "has no split 'holdout_brand'; its splits are ['one', 'test', 'train', 'two', " \
         "'validation']" in warnings
  # sample100 needs 101 products; the test split has 16.
  assert ("Skipping config.evals.retrieval_test_sample100 (type 'retrieval', split='test'): "
          "split 'test' of image_text_folder/relshop") in warnings
  # The final checkpoint is on disk and restores to the trained parameters.
  params, step, _ = restore.load_params(config, workdir)
  assert step == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                  jax.tree.leaves(jax.device_get(result.state.params))):
    np.testing.assert_array_equal(a, b)
  # config.json holds the evaluations that ran, so launch.evaluate from it runs them too.
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert "retrieval_holdout_brand" not in saved["evals"] and "retrieval_test" in saved["evals"]


def test_smoke_config_evals_follow_the_catalog(catalog, absl_warnings):
  """The quick half of the test above: what the config check keeps of the stock evaluations."""
  config = config_check.with_defaults(smoke_config(catalog))
  kept = config_check.check_eval_data(config)
  assert sorted(kept.evals) == ["retrieval_test", "retrieval_validation", "zeroshot_test"]
  skipped = {n for n in config.evals if f"Skipping config.evals.{n} " in absl_warnings()}
  assert skipped == set(config.evals) - set(kept.evals)


@pytest.mark.slow
def test_evaluate_cli_names_an_explicitly_requested_missing_split(smoke_run, tmp_path):
  """launch.evaluate --evals=NAME of an optional evaluation the dataset cannot serve: one line
  naming the evaluation, the split and the splits there (no traceback, nothing restored)."""
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  saved = json.loads((workdir / "config.json").read_text())
  saved["evals"]["retrieval_holdout_brand"] = dict(type="retrieval", split="holdout_brand",
                                                   protocols=["full"], every=0, optional=True)
  (workdir / "config.json").write_text(json.dumps(saved))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--workdir={workdir}",
       "--evals=retrieval_holdout_brand"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "launch.evaluate: config.evals.retrieval_holdout_brand (type 'retrieval', "
      "split='holdout_brand') cannot run: dataset image_text_folder/relshop/1.0.0 has no split "
      "'holdout_brand'; its splits are ['one', 'test', 'train', 'two', 'validation']."), \
      proc.stderr[-3000:]
  assert not list(workdir.glob("eval_*.json"))


# ------------------------------------------------------------------------------------------------
# Item 1 / 13d: evaluations that cannot run are config errors, before anything compiles.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    (dict(type="retrieval", split="tset", protocols=("full",)),
     r"config.evals.bad \(type 'retrieval', split='tset'\) cannot run: dataset "
     r"image_text_folder/relshop/.* has no split 'tset'; its splits are \['one', 'test', 'train', "
     r"'two', 'validation'\]. To run it, point config.evals.bad.split at one of them; to "
     r"skip it on datasets that cannot serve it, set config.evals.bad.optional=True."),
    (dict(type="zeroshot", split="test", field="colour"),
     r"config.evals.bad \(type 'zeroshot', split='test'\) cannot run: dataset .* has no field "
     r"'colour' \(split 'test'\); its fields are \[.*'subcategory'.*\]"),
    (dict(type="zeroshot", split="test", field="brand"),
     r"config.evals.bad \(type 'zeroshot', split='test'\) cannot run: field 'brand' is empty in "
     r"all 16 examples of split 'test' of .*, so there is no label to evaluate; the fields with "
     r"values there are \['description', 'product_id', 'subcategory', 'title'\]"),
    (dict(type="linear_probe", split="test", train_split="training"),
     r"config.evals.bad \(type 'linear_probe', train_split='training'\) cannot run: .* no split "
     r"'training'"),
    (dict(type="retrieval", split="one", protocols=("full",)),
     r"split 'one' of .* has 1 example\(s\); full-gallery retrieval .* needs at least 2"),
    (dict(type="retrieval", split="test", protocol=("full",)),
     r"Unknown config key evals.bad.'protocol' \(did you mean 'protocols'\?\)"),
])
def test_evaluation_that_cannot_run_fails_at_config_check(catalog, tmp_path, no_compile, spec,
                                                          match):
  config = smoke_config(catalog)
  config.evals = {"bad": dict(spec, every=0)}
  config.checkpoint.best_metric = None
  with pytest.raises(config_check.ConfigError, match=match):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_optional_evaluation_is_dropped_with_a_note(catalog, absl_warnings):
  config = config_check.with_defaults(smoke_config(catalog))
  with config.unlocked():
    config.evals = {"a": dict(type="zeroshot", split="test", field="brand", optional=True),
                    "b": dict(type="retrieval", split="test", protocols=("full",))}
  kept = config_check.check_eval_data(config)
  assert list(kept.evals) == ["b"] and list(config.evals) == ["a", "b"]
  assert "Skipping config.evals.a (type 'zeroshot', split='test'): field 'brand' is empty" \
      in absl_warnings()


def test_zeroshot_without_labels_names_field_split_and_fields(catalog):
  """The evaluator's own error (a run that skipped the config check, e.g. a direct call)."""
  config = smoke_config(catalog)

  class MeanColour:
    def embed_images(self, params, images):
      x = images.astype(jnp.float32).mean((1, 2)) + 1.0
      return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def logit_scale(self, params):
      return 1.0

  ev = zeroshot.Evaluator(MeanColour(), config, split="test", field="brand", batch_size=8)
  with pytest.raises(ValueError, match=r"zero-shot on split 'test': field 'brand' is empty in "
                     r"all 16 examples.*fields with values in image_text_folder/relshop:test are "
                     r"\['description', 'product_id', 'subcategory', 'title'\]"):
    ev.run({})


# ------------------------------------------------------------------------------------------------
# Item 1: the final state is saved before the final evaluation.
# ------------------------------------------------------------------------------------------------
def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.mark.parametrize("best_metric", [None, "val/toy/loss"])
def test_final_checkpoint_survives_a_failing_final_evaluation(tmp_path, monkeypatch,
                                                              best_metric):
  config = toy_system.get_config()
  config.total_steps = 4
  config.checkpoint.every_steps = 1000  # No periodic save: only the final one.
  config.checkpoint.best_metric = best_metric
  config.checkpoint.best_mode = "min"
  config.evals = {"toy": {"type": "tests.toy_system", "every": 2 if best_metric else 0}}
  original = toy_system.Evaluator.run
  calls = []

  def run(self, params):
    calls.append(1)
    if len(calls) == (2 if best_metric else 1):  # The evaluation at the last step.
      raise RuntimeError("evaluation exploded")
    return original(self, params)
  monkeypatch.setattr(toy_system.Evaluator, "run", run)
  workdir = str(tmp_path)
  with pytest.raises(RuntimeError, match="evaluation exploded"):
    loop.train_and_evaluate(config, workdir, iterator_factory=toy_system.make_iterator)
  assert 4 in _steps(workdir)
  params, step, _ = restore.load_params(config, workdir)
  assert step == 4 and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))

  # The same command again: nothing to train, the final evaluation runs and the run completes.
  result = loop.train_and_evaluate(config, workdir, iterator_factory=toy_system.make_iterator)
  assert int(result.state.step) == 4 and "val/toy/loss" in result.metrics
  for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                  jax.tree.leaves(jax.device_get(result.state.params))):
    np.testing.assert_array_equal(a, b)


def test_final_checkpoint_that_is_best_replaces_the_older_best(tmp_path, monkeypatch):
  """keep=1 + best by a metric that improves at every evaluation: only the final step stays,
  though its state is saved before its evaluation (it is re-saved with its metrics)."""
  config = toy_system.get_config()
  config.total_steps = 4
  config.checkpoint.update(keep=1, every_steps=1000, best_metric="val/toy/step",
                           best_mode="max")
  config.evals = {"toy": {"type": "tests.toy_system", "every": 1}}
  original = toy_system.Evaluator.run
  seen = []

  def run(self, params):
    seen.append(1)
    return {**original(self, params), "val/toy/step": float(len(seen))}
  monkeypatch.setattr(toy_system.Evaluator, "run", run)
  loop.train_and_evaluate(config, str(tmp_path), iterator_factory=toy_system.make_iterator)
  assert _steps(str(tmp_path)) == [4]


# ------------------------------------------------------------------------------------------------
# Item 9: nonsense hyper-parameters.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("lr", -1e-3, r"config.optimizer.lr=-0.001 must be > 0"),
    ("weight_decay", -0.1, r"config.optimizer.weight_decay=-0.1 must be >= 0"),
    ("b2", 1.5, r"config.optimizer.b2=1.5 must lie in \[0, 1\)"),
    ("eps", 0.0, r"config.optimizer.eps=0.0 must be > 0"),
])
def test_nonsense_optimizer_values_are_refused(toy_config, key, value, match):
  toy_config.optimizer[key] = value
  with pytest.raises(config_check.ConfigError, match=match):
    config_check.check(toy_config, num_devices=8)


def test_batch_larger_than_the_train_split_is_refused(tmp_path, toy_config, no_compile):
  toy_config.data.num_examples = 10
  with pytest.raises(config_check.ConfigError, match=r"config.batch_size=16 is larger than the "
                     r"train split, which has 10 example\(s\)"):
    loop.train_and_evaluate(toy_config, str(tmp_path), iterator_factory=toy_system.make_iterator)
  assert not os.path.exists(tmp_path / "config.json")


def test_batch_larger_than_a_catalog_train_split_is_refused(catalog, tmp_path, no_compile):
  config = smoke_config(catalog)
  config.batch_size = 32  # The train split has 24 products.
  with pytest.raises(config_check.ConfigError, match=r"config.batch_size=32 is larger than the "
                     r"train split \(image_text_folder/relshop:train\), which has 24 example"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_two_product_retrieval_split_is_warned_about(catalog, absl_warnings):
  config = config_check.with_defaults(smoke_config(catalog))
  with config.unlocked():
    config.evals = {"v": dict(type="retrieval", split="two", protocols=("full",))}
  config_check.check_eval_data(config)
  assert ("config.evals.v (type 'retrieval', split='two'): split 'two' of "
          "image_text_folder/relshop") in absl_warnings()
  assert "has only 2 example(s): full-gallery retrieval (R@K is 1 by construction" \
      in absl_warnings()


# ------------------------------------------------------------------------------------------------
# Item 10: a command-line typo.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["launch.train", "launch.evaluate"])
def test_cli_override_typo_gets_one_line_with_a_suggestion(tmp_path, module):
  proc = subprocess.run(
      [sys.executable, "-m", module, "--config=tests/toy_system.py", f"--workdir={tmp_path}",
       "--config.optimizer.learning_rate=0.1"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if "learning_rate" in l]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "--config.optimizer.learning_rate" in lines[0]
  assert "Unknown config key optimizer.'learning_rate' (did you mean 'lr'?)" in lines[0]
  assert not os.path.exists(tmp_path / "config.json")


# ------------------------------------------------------------------------------------------------
# Item 16: one set of zero-shot prompts.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # The smoke_run fixture.
def test_api_and_evaluator_zero_shot_agree(smoke_run):
  workdir, config, _, _ = smoke_run
  fclip = FashionCLIP.from_workdir(workdir)
  system, params, _ = restore.load_trained(workdir)
  spec = config_check.with_defaults(config).evals["zeroshot_test"]
  labels = list(SUBCATEGORIES)
  images = np.stack([fixtures_real.image_array(k) for k in range(5)])
  # The evaluator's class embeddings with the config's prompts (what its run() scores against).
  embedder = common.Embedder(system)
  tokenize = common.tokenizer_from_config(config)
  ev_cls = zeroshot.class_embeddings(lambda t: embedder.embed_tokens(params, t), tokenize,
                                     labels, spec.templates)
  img = fclip.encode_images(images)
  ev_probs = prompts.probabilities(zeroshot.zeroshot_logits(img, ev_cls, fclip.logit_scale))
  np.testing.assert_allclose(fclip.zero_shot_classify(images, labels), ev_probs, atol=1e-5)
  np.testing.assert_array_equal(fclip.zero_shot_classify(images, labels).argmax(1),
                                ev_probs.argmax(1))
  # The one definition: the same class embeddings through the API and the evaluator object.
  ev = zeroshot.Evaluator(system, config, **eval_base.evaluator_kwargs(spec))
  np.testing.assert_allclose(fclip.class_embeddings(labels), ev.class_embeddings(params, labels),
                             atol=1e-5)
  assert tuple(spec.templates) == prompts.TEMPLATES == zeroshot.DEFAULT_TEMPLATES
  # The averaging is real: one template alone gives other class embeddings.
  assert not np.allclose(fclip.class_embeddings(labels, templates="{}"),
                         fclip.class_embeddings(labels), atol=1e-3)
