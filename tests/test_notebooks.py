"""The notebooks run top to bottom (nbclient, CPU, a few training steps), so they never rot.

notebooks/e2.ipynb asserts that every E2 selection is exactly one-hot, that the chosen patches
are the arg-max of the fusion blocks' own q k^T (recomputed from captured intermediates) and
are the boxes drawn, and that its per-entity tag search (the search index over the entity heads)
gives the HITS@1 and mAP that evaluate/entity_retrieval.py reported for the same model.
notebooks/fashionvil.ipynb asserts that the product search's TGIR R@10 per category equals
evaluate/tgir.py's for the same fine-tuned model and is above twice chance.

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
STEPS_E2, STEPS_FASHIONVIL = 200, 40
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
  """One TFDS data dir for the notebooks of this module: the first notebook that needs
  synthetic_catalog/smoke builds it in its own kernel (its build cell), the next one finds it
  built (tfds's download_and_prepare is then a no-op), as a user rerunning a notebook would."""
  return tmp_path_factory.mktemp("notebook_tfds")


def _execute(name, tmp_path, monkeypatch, data_dir, **params):
  """Runs notebooks/<name> with FJ_NB_<KEY>=value for params; returns (stdout text, #PNGs)."""
  monkeypatch.setenv("FJ_NB_INSTALL", "0")
  for k, v in params.items():
    monkeypatch.setenv(f"FJ_NB_{k.upper()}", str(v))
  monkeypatch.setenv("FJ_NB_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("FJ_NB_DATA_DIR", str(data_dir))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  pngs = sum("image/png" in o.get("data", {}) for o in outputs)
  return text, pngs


@pytest.mark.slow
def test_quickstart_executes(tmp_path, monkeypatch, catalog_dir):
  # The kernel inherits this environment: one CPU device (not the suite's 8), no install.
  text, pngs = _execute("quickstart.ipynb", tmp_path, monkeypatch, catalog_dir, steps=120,
                        model="tiny", batch=32)
  assert "colour precision@6" in text and "max |torch - jax| probability" in text
  # The t2i grid and the figures were drawn (PNG outputs).
  assert pngs >= 6, pngs


@pytest.mark.slow
def test_e2_executes(tmp_path, monkeypatch, catalog_dir):
  # Its 200 training steps outweigh its compiles: 195 s optimised, 248 s with the suite's
  # cheap compile (conftest.py; one run each, AMD EPYC, 2 cores).
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  text, pngs = _execute("e2.ipynb", tmp_path, monkeypatch, catalog_dir, steps=STEPS_E2,
                        model="tiny", lr=2e-3, batch=64, figure_dir=tmp_path / "figures")
  assert "distinct patches chosen" in text and "notebook HITS@1" in text
  assert pngs >= 3, pngs  # selections, patch frequencies, tag retrieval grid
  assert sorted(os.listdir(tmp_path / "figures")) == ["e2_selections.png",
                                                     "e2_tag_retrieval.png"]


@pytest.mark.slow
def test_fashionvil_executes(tmp_path, monkeypatch):
  # Its own data dir: it builds the FashionIQ-like catalogs, not synthetic_catalog/smoke.
  text, pngs = _execute("fashionvil.ipynb", tmp_path, monkeypatch, tmp_path / "tfds",
                        steps=STEPS_FASHIONVIL, model="tiny", batch=32, train_triplets=100,
                        val_triplets=40, figure_dir=tmp_path / "figures")
  assert "search R@10" in text and "mean R@10" in text
  assert pngs >= 1, pngs  # the TGIR grid
  assert os.listdir(tmp_path / "figures") == ["fashionvil_tgir.png"]
