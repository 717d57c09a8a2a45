"""The notebooks run top to bottom (nbclient, CPU, a few training steps), so they never rot.

notebooks/quickstart.ipynb checks its own results with asserts, which fail the execution here:
colour queries return products of that colour (on the returned ids' titles; chance ~1/15), the
search's HITS@10 equals the evaluator's t2i R@10, zero-shot probabilities sum to 1, and the
transformers CLIPModel reloaded from the export gives the same zero-shot probabilities (1e-4).
The parameters come from FJ_NB_* environment variables: no `pip install` (no network), a tiny
model, 120 steps. The committed notebooks hold no outputs.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_quickstart_executes(tmp_path, monkeypatch):
  # The kernel inherits this environment: one CPU device (not the suite's 8), no install.
  monkeypatch.setenv("FJ_NB_INSTALL", "0")
  monkeypatch.setenv("FJ_NB_STEPS", "120")
  monkeypatch.setenv("FJ_NB_MODEL", "tiny")
  monkeypatch.setenv("FJ_NB_BATCH", "32")
  monkeypatch.setenv("FJ_NB_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("FJ_NB_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "colour precision@6" in text and "max |torch - jax| probability" in text
  # The t2i grid and the figures were drawn (PNG outputs).
  pngs = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.outputs)
  assert pngs >= 6, pngs
