"""Bad configs stop before anything compiles, with an error naming the bad value."""

import json
import os
import subprocess
import sys

import pytest

from fashion_jax import cli
from fashion_jax import configs
from fashion_jax.train import config_check
from fashion_jax.train import loop
from fashion_jax.train import step as step_lib
from tests import toy_system

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(config, num_devices=8, process_count=1):
  return config_check.check(config_check.with_defaults(config), num_devices=num_devices,
                            process_count=process_count)


def _set(config, dotted, value):
  *parents, last = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked():
    if last in node:  # ConfigDict is type-safe: a file that sets a wrong type creates it so.
      del node[last]
    node[last] = value


@pytest.mark.parametrize("key,value,match", [
    ("batchsize", 16, r"Unknown config key 'batchsize' \(did you mean 'batch_size'\?\)"),
    ("optimizer.lrr", 1e-3, r"Unknown config key optimizer.'lrr' \(did you mean 'lr'\?\)"),
    ("checkpoint.every", 5, r"Unknown config key checkpoint.'every'"),
    ("batch_size", "16", r"config.batch_size='16' has type str; expected int"),
    ("optimizer.lr", "fast", r"config.optimizer.lr='fast' has type str"),
    ("checkpoint.async", 1, r"config.checkpoint.async=1 has type int; expected bool"),
    ("optimizer.schedule.kind", "linear", r"config.optimizer.schedule.kind='linear' is not one"),
    ("checkpoint.best_mode", "lowest", r"config.checkpoint.best_mode='lowest' is not one"),
    ("nan_policy", "ignore", r"config.nan_policy='ignore' is not one of \('stop', 'skip'\)"),
    ("total_steps", 0, r"config.total_steps=0 must be >= 1"),
    ("optimizer.schedule.warmup_steps", 7, r"warmup_steps=7 must lie in \[0, total_steps=6\]"),
    ("num_epochs", 2, r"Both config.total_steps=6 and config.num_epochs=2"),
    ("mesh.data", 3, r"config.mesh=\{'data': 3, 'fsdp': 1, 'tensor': 1\}.*\(3\) does not divide "
                     r"the 8 devices"),
    ("mesh.model", 2, r"Unknown config key mesh.'model'"),
    ("batch_size", 12, r"config.batch_size=12 is not divisible by the batch axes data\*fsdp = "
                       r"8\*1 = 8"),
    ("grad_accum_steps", 4, r"config.batch_size=16 is not divisible by grad_accum_steps=4 into "
                            r"micro-batches divisible by data\*fsdp=8"),
    ("evals", {"retr": {"type": "no_such_evaluator", "every": 1}},
     r"config.evals.retr.type='no_such_evaluator': there is no evaluator module "
     r"fashion_jax.evaluate.no_such_evaluator"),
    ("evals", {"retr": {"every": 1}}, r"Missing required config key config.evals.retr.type"),
    ("checkpoint.best_metric", "val/x", r"best_metric='val/x' but config.evals is empty"),
    ("system", "no_such_system", r"config.system='no_such_system': there is no system module"),
])
def test_bad_value_is_named(toy_config, key, value, match):
  _set(toy_config, key, value)
  with pytest.raises(ValueError, match=match):
    _check(toy_config)


def test_missing_keys(toy_config):
  with toy_config.optimizer.unlocked():
    del toy_config.optimizer["lr"]
  with pytest.raises(config_check.ConfigError, match=r"Missing required config key "
                     r"config.optimizer.lr"):
    _check(toy_config)
  config = toy_system.get_config()
  with config.unlocked():
    del config["total_steps"]
  with pytest.raises(config_check.ConfigError, match="set config.total_steps or config.num_epochs"):
    _check(config)


def test_batch_not_divisible_by_process_count(toy_config):
  toy_config.mesh.update({"data": 2, "fsdp": 1, "tensor": 3})
  with pytest.raises(config_check.ConfigError, match=r"config.batch_size=16 is not divisible by "
                     r"the process count 3"):
    _check(toy_config, num_devices=6, process_count=3)


def test_valid_config_resolves_mesh(toy_config):
  toy_config.mesh.fsdp = 2
  assert _check(toy_config) == {"data": 4, "fsdp": 2, "tensor": 1}


@pytest.fixture
def no_compile(monkeypatch):
  """Makes building the train step fail: an error raised instead proves nothing compiled."""
  def fail(*args, **kwargs):
    raise AssertionError("the train step was built")
  monkeypatch.setattr(step_lib, "make_train_step", fail)


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 12, r"config.batch_size=12 is not divisible"),
    ("optimizer.lrr", 1e-3, r"Unknown config key optimizer.'lrr'"),
    ("log_every_steps", 2.5, r"config.log_every_steps=2.5 has type float; expected int"),
    ("mesh.tensor", 3, r"\(3\) does not divide the 8 devices"),
    ("evals", {"x": {"type": "no_such_evaluator"}}, r"config.evals.x.type='no_such_evaluator'"),
    ("nan_policy", "ignore", r"config.nan_policy='ignore' is not one of"),
])
def test_loop_rejects_bad_config_before_compiling(tmp_path, toy_config, no_compile, key, value,
                                                  match):
  """Through the trainer itself: the error comes before any step is built or config written."""
  _set(toy_config, key, value)
  with pytest.raises(config_check.ConfigError, match=match):
    loop.train_and_evaluate(toy_config, str(tmp_path), iterator_factory=toy_system.make_iterator)
  assert not os.path.exists(tmp_path / "config.json")


def test_workdir_of_another_config(tmp_path, toy_config, monkeypatch):
  toy_config.total_steps = 2
  loop.train_and_evaluate(toy_config, str(tmp_path), iterator_factory=toy_system.make_iterator)

  def fail(*args, **kwargs):
    raise AssertionError("the train step was built")
  monkeypatch.setattr(step_lib, "make_train_step", fail)

  # Another model config: both values are named.
  other = toy_system.get_config()
  other.model.hidden = 64
  with pytest.raises(config_check.ConfigError, match=r"another config: model=.*'hidden': 32.*"
                     r"model=.*'hidden': 64"):
    loop.train_and_evaluate(other, str(tmp_path), iterator_factory=toy_system.make_iterator)

  # Another system (the config.json says so): both names appear.
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  saved["system"] = "fashionclip"
  path.write_text(json.dumps(saved))
  with pytest.raises(config_check.ConfigError, match=r"system='fashionclip' there, "
                     r"system='tests.toy_system' here"):
    loop.train_and_evaluate(toy_system.get_config(), str(tmp_path),
                            iterator_factory=toy_system.make_iterator)

  # Without config.json the saved parameter shapes still identify another model.
  path.unlink()
  with pytest.raises(config_check.ConfigError, match=r"parameter params/tower_a/dense_in/bias "
                     r"has shape \(32,\) there and \(64,\) in this config"):
    loop.train_and_evaluate(other, str(tmp_path), iterator_factory=toy_system.make_iterator)


def test_cli_unknown_override_names_the_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=tests/toy_system.py",
       f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr
  assert not os.path.exists(tmp_path / "config.json")


def test_config_file_resolves_from_any_working_directory(tmp_path, monkeypatch):
  """README's recipes say --config=configs/fashionclip.py:base; run outside a checkout (a user's
  own project directory) that relative path names the installed configs package's file."""
  monkeypatch.chdir(tmp_path)
  installed = os.path.join(REPO, "configs", "fashionclip.py")
  for spec in ("configs/fashionclip.py:base", "fashionclip.py:base", "fashionclip:base"):
    path, _, arg = configs.resolve_file(spec).partition(":")
    assert os.path.samefile(path, installed) and arg == "base", spec
  own = tmp_path / "configs" / "fashionclip.py"  # A user's own file of the same name wins.
  own.parent.mkdir()
  own.write_text("")
  assert configs.resolve_file("configs/fashionclip.py:base") == "configs/fashionclip.py:base"
  with pytest.raises(FileNotFoundError, match=r"No config file 'my_configs/fashionclip\.py'.*"
                     r"installed configs \[.*'fashionclip'"):
    configs.resolve_file("my_configs/fashionclip.py:smoke")
  argv = ["train", "--config", "e2:smoke", "--workdir=w"]
  assert cli.resolve_config_files(argv)[2] == os.path.join(REPO, "configs", "e2.py") + ":smoke"


@pytest.mark.slow  # Two CLI subprocesses (~20 s); the in-process resolution test above is fast.
def test_cli_config_from_another_directory(tmp_path):
  """From a directory outside the checkout: the recipe's relative config path loads (shown by
  the config's own did-you-mean for a misspelt key), a missing file is one line, exit 1."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/fashionclip.py:base",
       f"--workdir={tmp_path / 'w'}", "--config.optimizer.lrr=0.1"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "did you mean 'lr'" in proc.stderr, proc.stderr[-2000:]
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/fashion_clip.py:base",
       f"--workdir={tmp_path / 'w'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "No config file 'configs/fashion_clip.py'" in proc.stderr.splitlines()[-1]
  assert not (tmp_path / "w").exists()


def test_cli_bad_value_is_one_line(tmp_path):
  """A value the config check refuses ends launch.train in one line (no traceback), exit 1,
  before anything is written."""
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=tests/toy_system.py",
       f"--workdir={tmp_path / 'w'}", "--config.total_steps=-1"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == "launch.train: config.total_steps=-1 must be >= 1."
  assert not (tmp_path / "w").exists()


def test_cli_dataset_not_built_is_one_line(tmp_path):
  """A config whose dataset is not built in its data dir ends launch.train in one line naming
  the build command (not a FileNotFoundError traceback), exit 1, nothing written."""
  empty = tmp_path / "tfds"
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/fashionclip.py:smoke",
       f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={empty}"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == (
      f"launch.train: Dataset 'synthetic_catalog/smoke' is not built (no complete build in "
      f"{empty}/synthetic_catalog/smoke/1.0.0); build it with `python -m launch.build_data "
      "--dataset=synthetic_catalog/smoke --data_dir=DIR`.")
  assert not (tmp_path / "w").exists()


def test_a_value_the_system_refuses_is_a_config_error_before_the_workdir(tmp_path):
  """The system's own check (FashionSigLIP's five field weights against one field) is a
  ConfigError naming the system and the key, raised before the workdir is created."""
  config = configs.get("fashionsiglip:smoke")
  config.data.fields = ("brand",)
  config.evals, config.checkpoint.best_metric = {}, None
  with pytest.raises(configs.ConfigError,
                     match=r"^config\.system='fashionclip': config\.loss\.field_weights="
                           r"\(1\.0, 1\.0, 1\.0, 1\.0, 1\.0\) must have one weight per entry "
                           r"of \('brand',\)\.$"):
    loop.train_and_evaluate(config, str(tmp_path / "w"), iterator_factory=lambda *a, **k: None)
  assert not (tmp_path / "w").exists()
