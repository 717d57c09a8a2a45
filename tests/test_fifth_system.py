"""Adding a system (docs/architecture.md): tests/fifth_system.py, a system defined outside the
package, trains through `python -m launch.train` on the real pipeline and is evaluated by the
stock retrieval evaluator; nothing in fashion_jax/train/, data/pipeline.py or evaluate/ knows it.
"""

import json
import os
import pathlib
import subprocess
import sys

import tensorflow_datasets as tfds

from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=unused-import
from fashion_jax.train import restore

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_fifth_system_trains_saves_and_evaluates_through_launch_train(tmp_path):
  data_dir = tmp_path / "tfds"
  tfds.builder("synthetic_catalog/tiny", data_dir=str(data_dir)).download_and_prepare()
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["JAX_PLATFORMS"] = "cpu"
  res = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=tests/fifth_system.py",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["system"] == "tests.fifth_system"
  # The final state is on disk and restorable through the readers' path.
  system, params, step = restore.load_trained(str(workdir))
  assert step == 6 and type(system).__module__ == "tests.fifth_system"
  assert set(params) >= {"patch_embed", "token_embed", "log_temperature", "bias"}
  # The stock retrieval evaluator ran on it: its metrics are in the run's log.
  assert "test/full/t2i_R@1" in res.stderr + res.stdout
