"""Test setup: CPU with 8 fake devices, absl flags parsed (grain workers read them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile far more than they run: LLVM's optimisation level 0 compiles about 30% faster
# on CPU (same numerics: no fast-math either way). Subprocesses that keep XLA_FLAGS inherit it;
# the multi-process runs of test_multihost.py set their own.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
  has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ["JAX_PLATFORMS"] != "cpu" else False
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)
  # The longest tests first (multi-process runs, whole training jobs), so that with xdist the
  # other worker fills in with the short ones instead of finishing alone at the end.
  first = ("test_multihost.py", "test_readme.py::test_readme_commands", "test_stage1.py::test_tiny_stage1_run", "test_stage3.py::test_tiny_stage3",
           "test_stage2_av.py::test_audio_visual_training_job", "test_stage3.py::test_7b_step")
  rank = lambda item: next((i for i, f in enumerate(first) if f in item.nodeid), len(first))  # noqa: E731
  items.sort(key=rank)  # stable: the rest keeps the collection order
