"""Multi-view classification evaluation, the official fine-tuning protocol (reference §5.3):
each video is seen as `num_segments` temporal clips x `num_crops` spatial crops (4 x 3 for full
fine-tuning, 1 x 3 for probes), the softmax of every view averaged; top-1 / top-5, per-class
accuracy and the confusion matrix (JSON, and a PNG with `save_confusion_png`).

Streams the set in chunks (a Kinetics validation set does not fit in host memory at 12 views):
process p of n decodes only its block of each chunk, the global batch is assembled from the
process-local blocks, and the per-video probabilities are gathered (`process_allgather`), so
every process ends with the same results. Videos that cannot be decoded are counted per reason
and left out of the accuracy (their rows are padding).
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, Sequence

import jax
import numpy as np

from internvideo2_jax.data.loader import REASONS, LoadSpec, SkipExample, load_views
from internvideo2_jax.parallel import distributed, sharding

log = logging.getLogger(__name__)


def view_outputs(fn: Callable, records: Sequence[dict], spec: LoadSpec, mesh, *,
                 num_segments: int, num_crops: int, batch_size: int):
  """`fn(uint8 views (B * V, T, S, S, 3) global array) -> (B * V, K)` (e.g. class probabilities
  or pooled features); returns (the mean over each video's views (N, K) float32, valid (N,) bool,
  skip reasons Counter), the same on every process."""
  views = num_segments * num_crops
  procs, me = jax.process_count(), jax.process_index()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  per_proc = -(-batch_size // procs)
  # the global row count (videos x views) must split over the batch shards
  while (per_proc * procs * views) % shards:
    per_proc += 1
  chunk = per_proc * procs
  probs, valid, reasons = [], [], collections.Counter()
  blank = np.zeros((views, spec.num_frames, spec.size, spec.size, 3), np.uint8)
  for start in range(0, len(records), chunk):
    mine = range(start + me * per_proc, min(start + (me + 1) * per_proc, len(records)))
    local, ok = [], []
    for i in mine:
      try:
        local.append(load_views(records[i], spec, num_segments, num_crops))
        ok.append(True)
      except SkipExample as e:
        reasons[e.reason] += 1
        log.warning("evaluation: skipping %s", e)
        local.append(blank)
        ok.append(False)
    while len(local) < per_proc:  # the last chunk: padding rows
      local.append(blank)
      ok.append(False)
    batch = sharding.shard_batch({"v": np.concatenate(local)}, mesh)["v"]
    out = fn(batch).astype(np.float32)
    p = sharding.to_host(out.reshape(chunk, views, -1).mean(axis=1))
    flags = np.asarray(ok)
    if procs > 1:  # every process's block, in process order
      from jax.experimental import multihost_utils
      flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1)
    n = min(chunk, len(records) - start)
    probs.append(p[:n])
    valid.append(flags[:n])
  total = distributed.sum_processes(np.asarray([reasons.get(k, 0) for k in REASONS], np.int64))
  return np.concatenate(probs), np.concatenate(valid), collections.Counter(
      {k: int(v) for k, v in zip(REASONS, total) if v})


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
  """top-1 / top-5 (%), mean per-class accuracy, per-class accuracy and the confusion matrix
  (rows: true class, columns: predicted)."""
  c = len(class_names)
  labels = np.asarray(labels)
  order = np.argsort(-probs, axis=1)
  top1 = order[:, 0] == labels
  top5 = (order[:, :min(5, c)] == labels[:, None]).any(axis=1)
  confusion = np.zeros((c, c), np.int64)
  np.add.at(confusion, (labels, order[:, 0]), 1)
  counts = confusion.sum(axis=1)
  per_class = {name: (100.0 * confusion[i, i] / counts[i] if counts[i] else None)
               for i, name in enumerate(class_names)}
  seen = [v for v in per_class.values() if v is not None]
  return {"top1": 100.0 * float(top1.mean()), "top5": 100.0 * float(top5.mean()),
          "mean_class_accuracy": float(np.mean(seen)) if seen else 0.0, "num_videos": int(len(labels)),
          "per_class": per_class, "classes": list(class_names), "confusion": confusion.tolist()}


def save_confusion_png(results: dict, path: str) -> str:
  """The confusion matrix as an image (row-normalised, counts written in small sets)."""
  import io

  from etils import epath

  # A Figure without pyplot: no global backend switch (a notebook's inline plots keep working)
  from matplotlib.figure import Figure
  m = np.asarray(results["confusion"], np.float64)
  names = results["classes"]
  norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.35 * len(names), 30)
  fig = Figure(figsize=(size, size))
  ax = fig.subplots()
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  if len(names) <= 40:
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
  if len(names) <= 20:
    for i in range(len(names)):
      for j in range(len(names)):
        if m[i, j]:
          ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                  color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted"), ax.set_ylabel("true")
  ax.set_title(f"top-1 {results['top1']:.1f}%  ({results['num_videos']} videos)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  epath.Path(path).write_bytes(buf.getvalue())
  return path
