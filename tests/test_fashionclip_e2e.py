"""FashionCLIP as a user runs it: train on the synthetic catalog, evaluate, export, reload.

One tiny run (synthetic_catalog/tiny, a 2-layer CLIP, a few steps) through `train_and_evaluate`,
then: the run's evaluations are named by split and protocol; the export writes a
transformers CLIPModel directory whose torch forward (with CLIPProcessor and the exported
tokenizer) matches `FashionCLIP.from_pretrained(workdir)` within 1e-4; a non-empty export
directory is refused.
"""

import numpy as np
import pytest
import torch
import transformers

import tensorflow_datasets as tfds

from fashion_jax.api import FashionCLIP
from fashion_jax.data import render
from fashion_jax.data.builders import synthetic_catalog  # pylint: disable=unused-import
from fashion_jax.train import loop
from tests.test_fashionclip_system import tiny_config
from fashion_jax.train import restore


def export(workdir, out):
  """What `python -m launch.export --workdir --out` does."""
  system, params, step = restore.load_trained(workdir)
  return system.export(params, out), step


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.builder("synthetic_catalog/tiny", data_dir=str(data_dir)).download_and_prepare()
  config = tiny_config()
  config.data.name = "synthetic_catalog/tiny"
  config.data.data_dir = str(data_dir)
  config.batch_size = 8
  config.total_steps = 4
  config.log_every_steps = 2
  config.checkpoint.every_steps = 2
  config.evals = {"retrieval_test": dict(type="retrieval", split="test", protocols=("full",),
                                         every=0)}
  workdir = tmp_path_factory.mktemp("run")
  result = loop.train_and_evaluate(config, str(workdir))
  return workdir, result


def test_run_trains_and_names_its_evaluations(trained_run):
  _, result = trained_run
  assert int(result.state.step) == 4 and not result.preempted
  assert np.isfinite(result.metrics["train/loss"])
  assert 0.0 <= result.metrics["test/full/t2i_R@1"] <= 1.0
  assert result.metrics["test/full/num_items"] == 8


def test_export_loads_in_transformers_with_the_same_embeddings(trained_run, tmp_path):
  workdir, _ = trained_run
  out, step = export(str(workdir), str(tmp_path / "hf"))
  assert step == 4
  ours = FashionCLIP.from_pretrained(str(workdir))
  model = transformers.CLIPModel.from_pretrained(out).eval()
  processor = transformers.CLIPProcessor.from_pretrained(out)

  products = list(render.generate_products("test", 3, seed=1, image_size=64))
  images = [p["images"][0] for p in products]
  texts = [p["title"] + ". " + p["description"] for p in products]
  inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length",
                     max_length=16, truncation=True)
  with torch.no_grad():
    img_t = model.get_image_features(pixel_values=inputs["pixel_values"])
    txt_t = model.get_text_features(input_ids=inputs["input_ids"])
  img_t = torch.nn.functional.normalize(getattr(img_t, "pooler_output", img_t), dim=-1).numpy()
  txt_t = torch.nn.functional.normalize(getattr(txt_t, "pooler_output", txt_t), dim=-1).numpy()
  np.testing.assert_allclose(ours.encode_images(images), img_t, atol=1e-4)
  np.testing.assert_allclose(ours.encode_text(texts), txt_t, atol=1e-4)

  with pytest.raises(FileExistsError, match="not empty"):
    export(str(workdir), str(tmp_path / "hf"))
