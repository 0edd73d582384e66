"""Where a job's data comes from when its config names none: the generated synthetic corpus.

Every documented command runs as written from a fresh clone: a training config without
`data.corpora` trains on the synthetic corpus (moving shapes with sounds, data/synthetic.py),
written at start when it is missing, and says so; stage 2's held-out set is then its `val.json`.
Process 0 writes the files, every process waits for them.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax

from internvideo2_jax.parallel import distributed

# stage -> (default directory, training annotation file, format)
SYNTHETIC = {
    "stage1": ("data/synthetic_stage1", "train_stage1.csv", "csv"),
    "stage2": ("data/synthetic", "train.json", "json"),
    "stage3": ("data/synthetic", "train_qa.json", "json"),
    "finetune": ("data/synthetic", "train_{task}.txt", "labels"),
}


def default_to_synthetic(config, stage: str) -> bool:
  """Points an empty `data.corpora` at the synthetic corpus (and says so); True if it did."""
  data = config.data
  if data.get("corpora"):
    return False
  directory, name, fmt = SYNTHETIC[stage]
  root = data.get("synthetic_dir") or directory
  data.synthetic_dir = root
  corpus = {"format": fmt, "path": os.path.join(root, name), "data_root": root}
  if stage == "finetune":  # a classification task of the clips: direction, shape or colour
    task = data.get("synthetic_task", "direction")
    corpus.update(path=os.path.join(root, name.format(task=task)), classes=os.path.join(root, f"classes_{task}.txt"))
    if not config.eval.corpus.get("path"):
      config.eval.corpus.update(dict(corpus, path=os.path.join(root, f"val_{task}.txt")))
  data.corpora = (corpus,)
  if jax.process_index() == 0:
    print(f"data.corpora names no corpus: training on the synthetic corpus in {root} (generated if "
          f"missing); set --config.data.corpora to train on your own data", flush=True)
  return True


def write_synthetic(config, stage: str) -> None:
  """Writes the synthetic corpus into `data.synthetic_dir` when its files are missing (stage 3
  always rewrites the QA files from the clip rows, so an older corpus gets current questions)."""
  from internvideo2_jax.data import synthetic
  data = config.data
  root = data.get("synthetic_dir")
  if not root:
    return
  val_av = int(data.get("synthetic_val_av", 0))
  marker = "train_stage1.csv" if stage == "stage1" else "val.json"
  missing = not os.path.exists(os.path.join(root, marker)) or (
      val_av and not os.path.exists(os.path.join(root, "val_av.json")))
  if jax.process_index() == 0:
    if missing:
      print(f"writing the synthetic corpus to {root} ...", flush=True)
      t0 = time.perf_counter()
      # data/synthetic is one corpus for stages 2 and 3 (the demo's shapes: 14-19 px at 32 px)
      radius = tuple(data.get("synthetic_radius") or ((0.12, 0.2) if stage == "stage1" else (0.22, 0.3)))
      val = 0 if stage == "stage1" else int(data.get("synthetic_val", 96))
      synthetic.write_corpus(root, train=int(data.synthetic_train), val=val, seed=int(config.seed),
                             num_frames=32 if stage == "stage1" else 16, size=int(data.synthetic_size),
                             val_av=val_av, radius=radius)
      print(f"  {data.synthetic_train} + {val} clips in {time.perf_counter() - t0:.0f}s", flush=True)
    elif stage == "stage3":
      synthetic.write_qa(root)
    elif stage == "finetune" and not os.path.exists(os.path.join(root, "classes_direction.txt")):
      synthetic.write_label_lists(root)  # a corpus written before the lists existed
  distributed.sync("synthetic corpus written")


def eval_corpus(config) -> Optional[dict]:
  """Stage 2's held-out corpus: `eval.corpus` when it names a file, else the synthetic corpus's
  `val.json` when the run trains on it (unless `eval.synthetic` is False), else None."""
  corpus = config.eval.corpus.to_dict()
  if corpus.get("path"):
    return corpus
  root = config.data.get("synthetic_dir")
  if root and config.eval.get("synthetic", True):
    return dict(corpus, format="json", path=os.path.join(root, "val.json"), data_root=root)
  return None
