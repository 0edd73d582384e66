"""Video decoding with PyAV and the official frame-sampling rules.

`frame_indices` reproduces `get_frame_indices` of the official data code: [0, vlen) is cut into
n equal intervals (`np.linspace(0, vlen, n + 1).astype(int)`); `middle` takes each interval's
centre, `rand` a random frame of it (never its last frame, as the official `range(x0, x1 - 1)`),
`fpsX` samples at X frames per second; short videos repeat the last index.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import av
import numpy as np


class VideoReadError(RuntimeError):
  """A video could not be decoded; the message names the file and the reason."""


def frame_indices(num_frames: int, vlen: int, sample: str = "middle", *,
                  rng: Optional[np.random.Generator] = None, input_fps: float = 30.0) -> list[int]:
  if vlen <= 0:
    raise ValueError(f"video has no frames (vlen={vlen})")
  if sample in ("rand", "middle"):
    n = min(num_frames, vlen)
    edges = np.linspace(0, vlen, n + 1).astype(int)
    ranges = [(edges[i], edges[i + 1] - 1) for i in range(n)]
    if sample == "rand":
      rng = rng or np.random.default_rng()
      try:
        idx = [int(rng.choice(np.arange(x0, x1))) for x0, x1 in ranges]
      except ValueError:  # an empty interval: official fallback, a sorted random subset
        idx = sorted(rng.permutation(vlen)[:n].tolist())
    else:
      idx = [int((x0 + x1) // 2) for x0, x1 in ranges]
  elif sample.startswith("fps"):
    out_fps = float(sample[3:])
    duration = vlen / input_fps
    delta = 1 / out_fps
    times = np.arange(0, duration, delta) + delta / 2
    idx = [int(i) for i in np.around(times * input_fps) if i < vlen][:num_frames]
    if not idx:
      idx = [vlen // 2]
  else:
    raise ValueError(f"unknown frame sampling {sample!r} (use 'rand', 'middle' or 'fpsX')")
  idx = list(idx) + [idx[-1]] * (num_frames - len(idx))  # repeat the last for short videos
  return idx


def _open_video_stream(path: str):
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise VideoReadError(f"{path}: cannot open: {e}") from e
  streams = container.streams.video
  if not streams:
    container.close()
    raise VideoReadError(f"{path}: no video stream")
  stream = streams[0]
  if stream.codec_context is None:  # PyAV < 18 would segfault decoding this (reference §11.8)
    container.close()
    raise VideoReadError(f"{path}: video stream has no codec context")
  return container, stream


def num_frames_of(path: str) -> int:
  """Frame count from the container header, or by decoding when the header has none."""
  container, stream = _open_video_stream(path)
  with container:
    if stream.frames:
      return int(stream.frames)
    return sum(1 for _ in container.decode(stream))


def read_frames(path: str | os.PathLike, indices: Sequence[int], *,
                size: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Decodes the frames at `indices` (any order, repeats allowed) -> uint8 (T, H, W, 3).

  Decoding stops after the last needed frame. `size=(height, width)` resizes with swscale
  bicubic during colour conversion (a squash, no crop).
  """
  path = os.fspath(path)
  wanted = sorted(set(int(i) for i in indices))
  if not wanted or wanted[0] < 0:
    raise ValueError(f"{path}: bad frame indices {list(indices)}")
  container, stream = _open_video_stream(path)
  got: dict[int, np.ndarray] = {}
  kwargs = {"format": "rgb24"}
  if size is not None:
    kwargs.update(height=int(size[0]), width=int(size[1]), interpolation="BICUBIC")
  try:
    with container:
      for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
          got[i] = frame.to_ndarray(**kwargs)
        if i >= wanted[-1]:
          break
  except av.error.FFmpegError as e:
    raise VideoReadError(f"{path}: decode error after {len(got)} frames: {e}") from e
  missing = [i for i in wanted if i not in got]
  if missing:
    raise VideoReadError(f"{path}: video ended before frame(s) {missing[:5]} (decoded {len(got)})")
  return np.stack([got[int(i)] for i in indices])
