"""Metric writers: console, JSONL and TensorBoard event files (tensorboardX, no TensorFlow).

Aggregation over steps uses `clu.metrics` collections (see train/stage2.py); this module only
writes the computed scalars. In a multi-host run only process 0 writes (`enabled`); the other
processes get a writer that does nothing, so no file is written twice.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

from etils import epath


class MetricWriter:
  def __init__(self, workdir: str, *, tensorboard: bool = True, console: bool = True,
               total_steps: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._jsonl = self._tb = None
    self._console = console
    self._total = total_steps
    if not enabled:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
      self._jsonl = epath.Path(self.jsonl_path).open("a")
    except (OSError, ValueError, NotImplementedError):  # object stores cannot append: one file per start
      self.jsonl_path = os.path.join(workdir, f"metrics.{int(time.time())}.jsonl")
      self._jsonl = epath.Path(self.jsonl_path).open("w")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self.tb_dir)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    vals = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **vals}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in vals.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._console:
      width = len(str(self._total)) if self._total else 6
      where = f"{step:>{width}}/{self._total} {100 * step / self._total:3.0f}%" if self._total else f"{step:>6}"
      print(f"[{where}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in vals.items()), flush=True)

  def truncate_after(self, step: int) -> None:
    """Drops the JSONL records of steps after `step` (a resumed run logs them again), so the
    file holds one record per step and kind. Object stores (one file per start) need nothing."""
    if not self.enabled or self._jsonl is None or not self.jsonl_path.endswith("metrics.jsonl"):
      return
    self._jsonl.close()
    path = epath.Path(self.jsonl_path)
    keep = []
    for line in path.read_text().splitlines():
      try:
        if int(json.loads(line).get("step", 0)) <= step:
          keep.append(line)
      except (ValueError, AttributeError):
        continue  # a line cut by a kill mid-write
    path.write_text("".join(x + "\n" for x in keep))
    self._jsonl = path.open("a")

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f"{v:.4g}"
  return f"{v:.3e}"
