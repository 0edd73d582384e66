"""Clips per second per worker for the stage-2 and stage-1 loaders on one CPU core.

    .venv/bin/python benchmarks/data_throughput.py [--clips 24 --frames 240 --height 256 --width 320]

Writes a synthetic corpus of long-ish clips (h264, 30 fps, keyframe every 60 frames, like
typical web video), packs it into re-encoded ArrayRecord shards (short side 256, keyframe every
4 frames), and times, per example on one process (= one Grain worker):

* ours, mp4 files:    seeking PyAV decode of only the sampled frames + transforms
* ours, shards:       the same from re-encoded shard records
* naive:              decode every frame, then pick the sampled ones (+ the same transforms)
* decord get_batch:   if `decord` imports (pip install decord2), + the same transforms

Stage 2: 4 frames (`rand`), RandomResizedCrop 224 + flip, caption tokenized. Stage 1: 16 TSN
segments, multi-scale crop 224 + flip. Results go to BENCHMARKS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from internvideo2_jax.data import pack, sources, synthetic, transforms
from internvideo2_jax.data.loader import LoadSpec, load_example
from internvideo2_jax.data.video import frame_indices, segment_indices


def make_corpus(root, n, frames, h, w):
  os.makedirs(os.path.join(root, "videos"), exist_ok=True)
  rng = np.random.default_rng(0)
  recs = []
  for i in range(n):
    clip = np.empty((frames, h, w, 3), np.uint8)
    base = synthetic.render_clip(rng, frames, min(h, w), shape="circle", colour="red", direction="right")
    clip[:] = 40
    clip[:, :, :base.shape[2]] = base[:, :h]
    path = os.path.join(root, "videos", f"{i:04d}.mp4")
    synthetic.write_mp4(path, clip, fps=30, keyframe_interval=60, bframes=True)
    recs.append(sources.make_record(key=path, path=path, captions=[f"a red circle moves right {i}"]))
  return recs


def naive_example(rec, spec, rng):
  """Baseline: decode the whole file, then pick frames."""
  import av
  with av.open(rec["data"] and __import__("io").BytesIO(rec["data"]) or rec["path"]) as c:
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  idx = pick(spec, len(frames), rng)
  return transforms.train_transform(np.stack([frames[i] for i in idx]), spec.size, rng,
                                    kind="multiscale" if spec.crop == "multiscale" else "rrc")


def decord_example(rec, spec, rng):
  import decord
  vr = decord.VideoReader(rec["path"], num_threads=1)
  idx = pick(spec, len(vr), rng)
  clip = vr.get_batch(idx).asnumpy()
  return transforms.train_transform(clip, spec.size, rng,
                                    kind="multiscale" if spec.crop == "multiscale" else "rrc")


def pick(spec, n, rng):
  if spec.sample == "segments":
    return segment_indices(spec.num_frames, n, rng=rng)
  return frame_indices(spec.num_frames, n, spec.sample, rng=rng)


def rate(fn, recs, spec, repeat=2):
  fn(recs[0], spec, np.random.default_rng(0))  # warm-up (tokenizer load etc.)
  t = time.perf_counter()
  n = 0
  for r in range(repeat):
    for i, rec in enumerate(recs):
      fn(rec, spec, np.random.default_rng([r, i]))
      n += 1
  return n / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--clips", type=int, default=24)
  p.add_argument("--frames", type=int, default=240)
  p.add_argument("--height", type=int, default=256)
  p.add_argument("--width", type=int, default=320)
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as root:
    recs = make_corpus(root, a.clips, a.frames, a.height, a.width)
    res = pack.write_shards(recs, os.path.join(root, "shards", "c"), 2, reencode=256, keyframe_interval=4)
    shard_recs = [r for r in sources.iter_records([sources.ArrayRecordCorpus(os.path.join(root, "shards", "c"))])]
    mb = lambda paths: sum(os.path.getsize(p) for p in paths) / 2**20  # noqa: E731
    print(f"corpus: {a.clips} clips x {a.frames} frames {a.height}x{a.width}, "
          f"{mb([r['path'] for r in recs]):.1f} MiB mp4, {mb(res['paths']):.1f} MiB shards")
    stages = {
        "stage2 (4 frames, RRC 224, text)": LoadSpec(num_frames=4, sample="rand", size=224, crop="rrc"),
        "stage1 (16 segments, multiscale 224)": LoadSpec(num_frames=16, sample="segments", size=224,
                                                         crop="multiscale", text=False),
    }
    try:
      import decord  # noqa: F401
      have_decord = True
    except ImportError:
      have_decord = False
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one process")
    print("| pipeline | ours, mp4 | ours, re-encoded shards | naive (decode all) | decord get_batch | ours vs naive |")
    print("|---|---|---|---|---|---|")
    for name, spec in stages.items():
      ours = rate(load_example, recs, spec)
      shards = rate(load_example, shard_recs, spec)
      naive = rate(naive_example, recs, spec, repeat=1)
      dec = f"{rate(decord_example, recs, spec):.1f}" if have_decord else "n/a"
      print(f"| {name} | {ours:.1f} | {shards:.1f} | {naive:.1f} | {dec} | {ours / naive:.1f}x |")


if __name__ == "__main__":
  main()
