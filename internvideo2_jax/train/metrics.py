"""What a run reports: every metric to JSONL and TensorBoard event files (tensorboardX, no
TensorFlow), a short progress line to the console, the run's record (`run.json`) and its curves
(`curves.png`).

Aggregation over steps uses `clu.metrics` collections (see train/stage2.py); this module only
writes the computed scalars. In a multi-host run only process 0 writes (`enabled`); the other
processes get writers that do nothing, so no file is written twice.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from typing import Mapping, Optional, Sequence

from etils import epath


class MetricWriter:
  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self._jsonl = self._tb = None
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


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """The console's view of training: a line per log interval with the step, the run's elapsed
  time (all starts together), the ETA, steps/s and the key metrics; on a terminal the same line
  (without metrics) refreshes about once a second in between. Compile and evaluation time are
  left out of the rate the ETA uses. Everything else goes to metrics.jsonl / TensorBoard."""

  def __init__(self, total: int, start: int, *, elapsed_before: float = 0.0, keys: Sequence[str] = ("loss",),
               enabled: bool = True, stream=None):
    self.total, self.start, self.keys = total, start, tuple(keys)
    self.before = elapsed_before
    self.enabled = enabled
    self.stream = stream or sys.stdout
    self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.perf_counter()
    self.excluded = 0.0
    self._last_tick = 0.0
    self._dirty = False

  def exclude(self, seconds: float) -> None:
    """Time that is not training (compiling, evaluating, checkpointing synchronously)."""
    self.excluded += seconds

  def elapsed(self) -> float:
    return self.before + time.perf_counter() - self.t0

  def steps_per_s(self, step: int) -> float:
    busy = time.perf_counter() - self.t0 - self.excluded
    return (step - self.start) / busy if busy > 0 and step > self.start else 0.0

  def line(self, step: int, values: Optional[Mapping[str, float]] = None) -> str:
    width = len(str(self.total))
    rate = self.steps_per_s(step)
    eta = _clock((self.total - step) / rate) if rate > 0 else "?"
    parts = [f"step {step:>{width}}/{self.total} {100 * step / max(self.total, 1):3.0f}%",
             f"{_clock(self.elapsed())} elapsed", f"ETA {eta}", f"{rate:.2f} steps/s"]
    if values:
      parts.append("  ".join(f"{k} {_fmt(values[k])}" for k in self.keys if k in values))
      extra = [f"{k} {_fmt(v)}" for k, v in values.items()
               if (k == "skipped_updates" or k.startswith("data_skipped/")) and v]
      if extra:
        parts.append("  ".join(extra))
    return " | ".join(parts)

  def tick(self, step: int) -> None:
    if not self.live:
      return
    now = time.perf_counter()
    if now - self._last_tick >= 1.0:
      self._last_tick = now
      self.stream.write("\r" + self.line(step) + "\033[K")
      self.stream.flush()
      self._dirty = True

  def log(self, step: int, values: Mapping[str, float]) -> None:
    self.print(self.line(step, values))

  def print(self, text: str) -> None:
    """A permanent line (clears a live line first)."""
    if not self.enabled:
      return
    if self._dirty:
      self.stream.write("\r\033[K")
      self._dirty = False
    print(text, file=self.stream, flush=True)


_EVAL_KEYS = re.compile(r"(t2v_r1|v2t_r1|top1|mc_accuracy|open_exact_match)$")


def eval_line(step: int, flat: Mapping[str, float]) -> str:
  """One short line for an in-training evaluation: the R@1 / top-1 / accuracy numbers."""
  shown = {k: v for k, v in flat.items() if _EVAL_KEYS.search(k) and "eval_data" not in k}
  body = "  ".join(f"{k.replace('_r1', ' R@1')} {v:.1f}" for k, v in shown.items())
  took = flat.get("eval_time_s")
  return f"eval at step {step}: {body or '(no scalar results)'}" + (f"  ({took:.0f} s)" if took else "")


class RunRecord:
  """`WORKDIR/run.json`: the run's totals over all its starts (steps, starts, training time) and,
  once it has finished, its final results, so a restart of a finished run only reports them."""

  def __init__(self, workdir: str, enabled: bool = True):
    from etils import epath
    self.path = epath.Path(workdir) / "run.json"
    self.enabled = enabled
    self.data = {}
    try:
      if self.path.exists():
        self.data = json.loads(self.path.read_text())
    except (OSError, ValueError):
      self.data = {}  # a file cut by a kill: the totals restart (the checkpoints are what count)

  @property
  def train_s(self) -> float:
    return float(self.data.get("train_s", 0.0))

  def finished_at(self, step: int) -> Optional[dict]:
    """The saved results if the run already finished at `step`, else None."""
    if self.data.get("finished") and int(self.data.get("step", -1)) == step:
      return self.data.get("results", {})
    return None

  def update(self, **fields) -> None:
    self.data.update(fields)
    if self.enabled:
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
      tmp.replace(self.path)


def _jsonable(o):
  return o.tolist() if hasattr(o, "tolist") else str(o)


def read_history(jsonl_path: str) -> dict[str, list[tuple[int, float]]]:
  """A metrics.jsonl (local or gs://) as {name: [(step, value), ...]}; unreadable lines skipped."""
  from etils import epath
  out: dict = {}
  for line in epath.Path(jsonl_path).read_text().splitlines():
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    for k, v in rec.items():
      if k not in ("step", "time") and isinstance(v, (int, float)):
        out.setdefault(k, []).append((int(rec["step"]), float(v)))
  return out


def plot_curves(jsonl_path: str, out_path: str) -> Optional[str]:
  """The training losses and the evaluation R@1 / accuracy over steps as one PNG (for users
  without TensorBoard). Returns the path, or None when there is nothing to plot."""
  # A Figure without pyplot: no global backend switch (a notebook's inline plots keep working)
  from matplotlib.figure import Figure
  from etils import epath
  history = read_history(jsonl_path)
  train = {k[6:]: v for k, v in history.items()
           if k.startswith("train/") and (k == "train/loss" or k[6:] in _LOSS_NAMES)}
  evals = {k[5:]: v for k, v in history.items() if k.startswith("eval/") and _EVAL_KEYS.search(k)}
  if not train:
    return None
  fig = Figure(figsize=(11 if evals else 6, 4))
  axes = fig.subplots(1, 2 if evals else 1, squeeze=False)
  ax = axes[0][0]
  for k, pts in sorted(train.items()):
    ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
  ax.set_xlabel("step"), ax.set_title("training losses"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
  if evals:
    ax = axes[0][1]
    for k, pts in sorted(evals.items()):
      ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_xlabel("step"), ax.set_title("evaluation (%)"), ax.legend(fontsize=7), ax.grid(alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()  # written through epath: local or gs://
  fig.savefig(buf, format="png", dpi=90)
  epath.Path(out_path).write_bytes(buf.getvalue())
  return out_path


# loss terms of every stage (metrics named like config.train.loss keys)
_LOSS_NAMES = {"vtc", "vtm", "mlm", "atc", "atm", "amlm", "avc", "avtc", "avtm", "avmlm", "clip",
               "clip_final", "mae"}
