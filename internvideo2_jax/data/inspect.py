"""The `inspect_data` job: run a stage's pipeline over a corpus and report what comes out.

Prints batch keys/shapes, throughput, skipped records by reason, decoded captions, and writes
a contact sheet (first batch, every frame) to WORKDIR/batch.png to eyeball crops and flips.
Use it to check a new corpus before training (README: "Bring your own corpus").
"""

from __future__ import annotations

import collections
import os
import time

import numpy as np

from internvideo2_jax.data import pipeline, synthetic, text as text_lib
from internvideo2_jax.data.accounting import DataReport


def _contact_sheet(video: np.ndarray) -> np.ndarray:
  b, t, h, w, _ = video.shape
  sheet = np.zeros((b * (h + 2), t * (w + 2), 3), np.uint8)
  for i in range(b):
    for j in range(t):
      sheet[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = video[i, j]
  return sheet[: sheet.shape[0] - sheet.shape[0] % 2, : sheet.shape[1] - sheet.shape[1] % 2]


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  data = config.data
  if not data.corpora:
    paths = synthetic.write_corpus(os.path.join(workdir, "synthetic"), train=32, val=0, seed=config.seed)
    data.corpora = ({"format": "json", "path": paths["train_qa" if config.stage == "stage3" else "train"],
                     "data_root": os.path.join(workdir, "synthetic")},)
    print(f"no corpora configured: wrote a synthetic corpus to {workdir}/synthetic")
  report = DataReport()
  ds = pipeline.make_pipeline(data, config.model, stage=config.stage, train=config.train,
                              report=report)
  it = iter(ds)
  skipped, clips, first = collections.Counter(), 0, None
  t0 = time.perf_counter()
  for _ in range(int(config.num_batches)):
    batch = next(it)
    first = first or batch
    skipped.update(pipeline.skip_summary(batch))
    clips += len(batch["index"])
  dt = time.perf_counter() - t0
  print(f"{config.num_batches} batches, {clips} examples in {dt:.2f}s "
        f"({clips / dt:.1f} examples/s with {data.get('num_workers', 0)} workers)")
  for k, v in first.items():
    print(f"  {k:10s} {str(v.shape):22s} {v.dtype}")
  print(f"annotation rows refused at parse time: {report.parse_dropped() or 'none'}; "
        f"replaced records: {dict(skipped) or 'none'}")
  if "text_ids" in first:
    tok = text_lib.load_tokenizer(data.get("load", {}).get("tokenizer", ""))
    for ids in first["text_ids"][:3]:
      print("  caption:", tok.decode(ids, skip_special_tokens=True))
  if "llm_ids" in first:
    from internvideo2_jax.data import instruct
    tok = instruct.load_llm_tokenizer(data.get("instruct", {}).get("tokenizer", ""))
    for i in range(min(2, len(first["llm_ids"]))):
      prompt, answers = instruct.decode_example(tok, {k: v[i] for k, v in first.items()})
      print(f"  conversation: {prompt}\n  trained on:   {answers}")
  sheet = os.path.join(workdir, "batch.png")
  synthetic.write_png(sheet, _contact_sheet(first["video"]))
  print(f"contact sheet of the first batch: {sheet}")
  return {"skipped": dict(skipped), "rows": report.parse_dropped(), "examples_per_s": clips / dt}
