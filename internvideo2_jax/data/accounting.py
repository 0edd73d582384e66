"""What the input pipeline dropped, for the console, the metrics and the result files.

Two kinds of drops:
* rows refused when an annotation file is parsed (per corpus, per reason: `bad_annotation`,
  `outside_root`, `bad_caption`), once per run;
* records replaced while batches are built (`RobustLoad`: per reason of `loader.REASONS`), counted
  in each batch's `skipped` vector.

`DataReport` sums the second kind over each log interval and since the run (this process's
start; a resumed run counts again from 0) across all processes (`reduce` sums a vector over the
processes; the loop passes a collective), so `data_skipped/*` is exact, not the last batch's.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

import numpy as np

from internvideo2_jax.data.loader import REASONS


class DataReport:

  def __init__(self):
    self.corpora: dict[str, dict] = {}  # path -> {"usable": rows, "dropped": {reason: rows}}
    self.replaced = collections.Counter()  # since the start, all processes
    self.examples = 0
    self._interval = np.zeros(len(REASONS) + 1, np.int64)  # this process; last = examples

  def add_corpus(self, path: str, usable: int, dropped: dict) -> None:
    self.corpora[path] = {"usable": int(usable), "dropped": {k: int(v) for k, v in dropped.items() if v}}

  def parse_dropped(self) -> dict[str, int]:
    total = collections.Counter()
    for c in self.corpora.values():
      total.update(c["dropped"])
    return dict(total)

  def table(self) -> str:
    """One line per corpus: usable rows and the rows refused, per reason."""
    lines = []
    for path, c in self.corpora.items():
      dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["dropped"].items(), key=lambda x: -x[1]))
      lines.append(f"  {path}: {c['usable']} rows" + (f"; refused: {dropped}" if dropped else ""))
    return "data (annotation rows at parse time):\n" + "\n".join(lines) if lines else ""

  def add_batch(self, batch: dict) -> None:
    """Counts a host batch (this process's slice)."""
    self._interval[-1] += len(batch["index"]) if "index" in batch else 0
    if "skipped" in batch:  # cached examples were checked when they were written
      self._interval[:-1] += np.asarray(batch["skipped"]).sum(axis=0)

  def flush(self, reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> dict[str, float]:
    """Metrics of the interval since the last flush (global sums), then resets it. Every
    process must call it at the same step when `reduce` is a collective."""
    counts = np.array(reduce(self._interval) if reduce else self._interval)  # a copy: reset below
    self._interval[:] = 0
    self.examples += int(counts[-1])
    interval = {r: int(c) for r, c in zip(REASONS, counts[:-1]) if c}
    self.replaced.update(interval)
    out = {f"data_skipped/{r}": float(interval.get(r, 0)) for r in self.replaced}
    out.update({f"data_skipped_total/{r}": float(n) for r, n in self.replaced.items()})
    return out

  def summary(self) -> dict:
    return {"examples_loaded": self.examples, "replaced": dict(self.replaced),
            "refused_at_parse": self.parse_dropped(), "corpora": self.corpora}

  def summary_line(self) -> str:
    replaced = ", ".join(f"{k} {v}" for k, v in self.replaced.most_common()) or "none"
    refused = ", ".join(f"{k} {v}" for k, v in self.parse_dropped().items()) or "none"
    return (f"data: {self.examples} examples loaded; records replaced: {replaced}; "
            f"annotation rows refused at parse time: {refused}")


__all__ = ["DataReport"]
