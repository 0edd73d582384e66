"""Damaged checkpoints: the newest is reported in one line and the newest intact one restores;
when none restores the error names every step; the run can save the damaged step again."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.train.checkpoint import Checkpointer, CheckpointRestoreError


def _state(v):
  return {"w": jnp.full((64, 32), float(v)), "b": jnp.arange(32.0) + v}


def _files(step_dir, pattern):
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.join(root, n) for n in names if pattern(os.path.join(root, n), n)]
  return sorted(out)


def _array_files(step_dir):
  """The data files of the arrays (TensorStore / OCDBT chunks), largest first."""
  files = _files(step_dir, lambda p, n: os.path.sep + "state" + os.path.sep in p and os.path.getsize(p) > 0
                 and not n.endswith((".json", "_METADATA")) and "manifest" not in n)
  return sorted(files, key=os.path.getsize, reverse=True)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(max(1, os.path.getsize(path) // 3))


def _overwrite(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(0)
    f.write(os.urandom(size))


def _zero_metadata(step_dir):
  for p in _files(step_dir, lambda p, n: n.endswith("_METADATA") or n == "_sharding" or n.endswith(".json")):
    open(p, "wb").close()


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "zero_metadata"])
def test_falls_back_to_the_newest_intact_step(tmp_path, damage, capsys):
  d = tmp_path / "ckpt"
  ckpt = Checkpointer(d, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step))
  ckpt.wait()
  ckpt.close()
  newest = d / "2"
  if damage == "truncate":
    for f in _array_files(newest):
      _truncate(f)
  elif damage == "overwrite":
    for f in _array_files(newest):
      _overwrite(f)
  else:
    _zero_metadata(newest)
  ckpt = Checkpointer(d, async_save=False)
  state, step = ckpt.restore(_state(0))
  assert step == 1
  np.testing.assert_array_equal(state["w"], np.full((64, 32), 1.0))
  out = capsys.readouterr().out
  assert f"checkpoint 2 in {d} cannot be restored" in out and "moved the damaged checkpoint 2" in out
  assert (d / "2.damaged").is_dir() and ckpt.latest_step() == 1
  ckpt.save(2, _state(5))  # the run goes on and saves step 2 again
  ckpt.wait()
  assert ckpt.restore(_state(0))[1] == 2
  ckpt.close()


def test_no_restorable_step_is_an_error_naming_each(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = Checkpointer(d, async_save=False)
  for step in (3, 4):
    ckpt.save(step, _state(step))
  ckpt.wait()
  ckpt.close()
  for step in (3, 4):
    for f in _array_files(d / str(step)):
      _truncate(f)
  ckpt = Checkpointer(d, async_save=False)
  with pytest.raises(CheckpointRestoreError) as e:
    ckpt.restore(_state(0))
  msg = str(e.value)
  assert str(d) in msg and "step 4:" in msg and "step 3:" in msg and len(msg) < 2000
  ckpt.close()


def test_a_resumed_run_keeps_one_metrics_record_per_step(tmp_path):
  import json
  from internvideo2_jax.train.metrics import MetricWriter
  w = MetricWriter(str(tmp_path), tensorboard=False)
  for step in range(1, 6):  # killed after logging step 5, its last checkpoint at step 3
    w.write(step, {"loss": float(step)}, prefix="train/")
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "tim')  # a line cut by the kill
  w = MetricWriter(str(tmp_path), tensorboard=False)
  w.truncate_after(3)
  for step in (4, 5, 6):
    w.write(step, {"loss": 10.0 + step}, prefix="train/")
  w.close()
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[3]["train/loss"] == 14.0
