"""The notebooks run top to bottom (nbclient, a real Jupyter kernel) with tiny settings put into
their parameter cell, so they cannot rot; in git they carry no outputs."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart.ipynb", "experiment.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  nb = json.load(open(os.path.join(REPO, "notebooks", name)))
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), \
      f"{name}: strip the outputs before committing (Jupyter: Edit > Clear All Outputs)"
  assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1


def _execute(name: str, root, params: str) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  cell.source += "\n# the test's settings\n" + params
  env_cwd = str(root / "notebooks")
  os.makedirs(env_cwd, exist_ok=True)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": env_cwd}}).execute()
  return nb


def _text(nb) -> str:
  out = []
  for c in nb.cells:
    for o in c.get("outputs", []):
      out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


@pytest.fixture
def checkout(tmp_path):
  """A scratch directory laid out like the checkout (configs/ linked) with a small synthetic
  corpus where the demo config reads it."""
  from internvideo2_jax.data import synthetic
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  synthetic.write_corpus(str(tmp_path / "data" / "synthetic"), train=16, val=8, seed=0, num_frames=16,
                         size=32, radius=(0.22, 0.3))
  return tmp_path


def test_quickstart_runs(checkout):
  nb = _execute("quickstart.ipynb", checkout,
                'TRAIN_STEPS = 2\nOVERRIDES = {"data.batch_size": 8, "eval.batch_size": 8}')
  text = _text(nb)
  assert "stage2 model, step 2" in text and "8 clips" in text
  for task in ("colour", "shape", "direction"):
    assert f"{task}: top-1" in text
  images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert images == 5  # similarity, top-5, attention maps, zero-shot bars, curves
  assert (checkout / "runs" / "demo" / "checkpoints").is_dir()


def test_experiment_runs(checkout):
  # the notebook's second variant and a masked one (the demo's loader settings have no ratio key)
  nb = _execute("experiment.ipynb", checkout, 'STEPS = 2\nOVERRIDES = {"data.batch_size": 8, "eval.batch_size": 8}\n'
                'VARIANTS = {k: v for k, v in VARIANTS.items() if "depth 1" in k}\n'
                'VARIANTS["masked 50%"] = {"model.vision.depth": 1, "data.load.mask": "random", '
                '"data.load.mask_ratio": 0.5}')
  text = _text(nb)
  for name in ("depth 1, tubelet 1", "masked 50%"):
    assert f"{name}: vision" in text
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) == 1
