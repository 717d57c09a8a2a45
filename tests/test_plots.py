"""The end-of-run PNG summary reads back exactly what clu's writer (the trainer's) wrote."""

import numpy as np
import pytest
from clu import metric_writers
from PIL import Image

from fashion_jax.train import plots


@pytest.fixture
def workdir(tmp_path):
  writer = metric_writers.create_default_writer(str(tmp_path))
  writer.write_hparams({"lr": 0.001})
  rng = np.random.default_rng(0)
  losses = {}
  for step in range(10, 210, 10):
    losses[step] = float(3.0 * np.exp(-step / 80) + 0.05 * rng.random())
    writer.write_scalars(step, {"train/loss": losses[step], "train/lr": 1e-3,
                                "steps_per_sec": 2.0})
  for step, r10 in ((100, 0.4), (200, 0.7)):
    writer.write_scalars(step, {"validation/full/t2i_R@10": r10,
                                "validation/full/t2i_HITS@10": r10,
                                "validation/full/MedR": 5.0})
  writer.write_scalars(200, {"test/full/t2i_R@10": 0.65})
  writer.flush()
  writer.close()
  return str(tmp_path), losses


def test_reads_the_scalars_the_writer_wrote(workdir):
  path, losses = workdir
  scalars = plots.read_scalars(path)
  steps, values = zip(*scalars["train/loss"])
  assert list(steps) == sorted(losses)
  np.testing.assert_allclose(values, [losses[s] for s in steps], rtol=1e-6)
  assert scalars["validation/full/t2i_R@10"] == [(100, pytest.approx(0.4)),
                                                 (200, pytest.approx(0.7))]


def test_panels_and_png(workdir, tmp_path):
  path, _ = workdir
  panels, once = plots._panels(plots.read_scalars(path))  # pylint: disable=protected-access
  names = [name for name, _ in panels]
  assert names[0] == "train/loss" and "train/lr" in names and "validation/full" in names
  assert "steps_per_sec" not in names
  loss_lines = dict((label, vals) for label, _, vals in panels[0][1])
  # The moving average smooths: less step-to-step variation than the raw curve.
  assert np.abs(np.diff(loss_lines["EMA 0.3"])).sum() < np.abs(np.diff(loss_lines["loss"])).sum()
  val_lines = [label for label, _, _ in dict(panels)["validation/full"]]
  assert val_lines == ["t2i_R@10"]  # HITS@10 duplicates R@10; MedR is not a [0, 1] curve.
  assert once == {"test/full/t2i_R@10": pytest.approx(0.65)}
  out = plots.write_summary(path, str(tmp_path / "s.png"))
  with Image.open(out) as im:
    assert im.size[0] > 400 and im.size[1] > 200


def test_no_event_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="No TensorBoard event files"):
    plots.write_summary(str(tmp_path))
