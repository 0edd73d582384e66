"""Packs a JSON/CSV corpus into ArrayRecord shards of self-contained records.

    python -m internvideo2_jax.data.pack --annotations train.json --data_root DIR \
        --out shards/train --num_shards 8 [--reencode 256 --keyframe_interval 4] [--audio]

Each record (see data/sources.py) holds the encoded media bytes, captions, labels and clip
window; with --reencode the clip window is decoded and re-encoded as h264 whose short side is
the given size, with a short keyframe interval so seeking to any sampled frame costs little;
with --audio the waveform (16 kHz int16 PCM, from the `audio` file or the video's own track) is
stored too. Unreadable media are skipped and listed. Shards: OUT-00000-of-00008.array_record.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
from typing import Iterable, Optional

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from internvideo2_jax.data import audio as audio_lib, sources, synthetic
from internvideo2_jax.data.video import VideoFile, VideoReadError

log = logging.getLogger(__name__)


def _reencode(rec: dict, short_side: int, keyframe_interval: int) -> tuple[bytes, int, int]:
  """Decodes the clip window, resizes (short side), re-encodes; returns (bytes, start, end)."""
  import io
  with VideoFile(rec["path"]) as v:
    start, end = sources.clip_window(rec, v.num_frames(), v.fps)
    frames = v.read(list(range(start, end)))
    fps = int(round(v.fps)) or 25
  _, h, w, _ = frames.shape
  scale = short_side / min(h, w)
  nh, nw = (max(2, int(round(h * scale / 2)) * 2), max(2, int(round(w * scale / 2)) * 2))
  from internvideo2_jax.data.transforms import resize
  frames = resize(frames, nh, nw)
  buf = io.BytesIO()
  synthetic.write_mp4(buf, frames, fps=fps, keyframe_interval=keyframe_interval)
  return buf.getvalue(), start, end


def pack_record(rec: dict, *, reencode: int = 0, keyframe_interval: int = 4,
                audio: bool = False) -> dict:
  out = dict(rec)
  if reencode and rec["media"] == "video":
    data, start, end = _reencode(rec, reencode, keyframe_interval)
    out.update(data=data, start_frame=-1, end_frame=-1, start_time=-1.0, end_time=-1.0)
    del start, end
  else:
    with open(rec["path"], "rb") as f:
      out["data"] = f.read()
    if not out["data"]:
      raise VideoReadError(f"{rec['path']}: empty file", "empty_file")
  if audio and rec["media"] == "video":
    try:
      wave = audio_lib.load_waveform(rec["audio"] or rec["path"])
      out["audio_pcm"] = (np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes()
    except audio_lib.AudioReadError as e:
      log.info("no audio for %s: %s", rec["key"], e)
  out["audio"] = ""
  return out


def write_shards(records: Iterable[dict], out_prefix: str, num_shards: int, **pack_kw) -> dict:
  """Writes records round-robin into shards; returns {'written', 'skipped', 'paths'}."""
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths = [f"{out_prefix}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
  writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
  written, skipped = 0, collections.Counter()
  failures = []
  try:
    for rec in records:
      try:
        packed = pack_record(rec, **pack_kw)
      except (VideoReadError, OSError) as e:
        reason = getattr(e, "reason", "missing_file")
        skipped[reason] += 1
        failures.append(f"{rec['key']}: {e}")
        continue
      writers[written % num_shards].write(sources.encode_record(packed))
      written += 1
  finally:
    for w in writers:
      w.close()
  return {"written": written, "skipped": dict(skipped), "failures": failures, "paths": paths}


def main(argv: Optional[list] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--annotations", required=True, help="JSON / JSONL list or stage-1 CSV")
  p.add_argument("--data_root", default="")
  p.add_argument("--audio_root", default="")
  p.add_argument("--source", default="")
  p.add_argument("--out", required=True, help="output prefix, e.g. shards/train")
  p.add_argument("--num_shards", type=int, default=8)
  p.add_argument("--reencode", type=int, default=0, help="short side in pixels (0 = keep bytes)")
  p.add_argument("--keyframe_interval", type=int, default=4)
  p.add_argument("--audio", action="store_true", help="store 16 kHz PCM audio in each record")
  a = p.parse_args(argv)
  skipped_rows = collections.Counter()
  if a.annotations.endswith(".csv"):
    recs = sources.load_csv(a.annotations, data_root=a.data_root, skipped=skipped_rows)
  else:
    recs = sources.load_json(a.annotations, data_root=a.data_root, audio_root=a.audio_root,
                             source=a.source, skipped=skipped_rows)
  res = write_shards(recs, a.out, a.num_shards, reencode=a.reencode,
                     keyframe_interval=a.keyframe_interval, audio=a.audio)
  print(json.dumps({"written": res["written"], "skipped_media": res["skipped"],
                    "skipped_rows": dict(skipped_rows), "shards": len(res["paths"])}))
  for f in res["failures"][:20]:
    print("  skipped", f)


if __name__ == "__main__":
  main()
