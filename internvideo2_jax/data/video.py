"""Video decoding with PyAV and the official frame-sampling rules.

`frame_indices` reproduces the official `get_frame_indices`: [0, vlen) is cut into n equal
intervals (`np.linspace(0, vlen, n + 1).astype(int)`); `middle` takes each interval's centre,
`rand` a random frame of it (never its last frame, as the official `range(x0, x1 - 1)`), `fpsX`
samples at X frames per second; short videos repeat the last index. `segment_indices` is the
TSN-style sampling of stage 1 (one random offset in each of n segments).

`read_frames` seeks: it reads the keyframe positions from the packets (no decoding), jumps to
the keyframe before a wanted frame only when that keyframe lies ahead of the decoder, and stops
after the last wanted frame, so each needed GOP is decoded once and 8 frames of a 300-frame
clip cost a few GOPs, not the whole file.
"""

from __future__ import annotations

import bisect
import io
import os
from fractions import Fraction
from typing import Optional, Sequence

import av
import numpy as np

Source = str | os.PathLike | bytes


class VideoReadError(RuntimeError):
  """A video could not be decoded; the message names the file, `reason` is a short code
  (missing_file, empty_file, corrupt_video, no_video_stream) used in skip counts."""

  def __init__(self, message: str, reason: str = "corrupt_video"):
    super().__init__(message)
    self.reason = reason


def frame_indices(num_frames: int, vlen: int, sample: str = "middle", *,
                  rng: Optional[np.random.Generator] = None, input_fps: float = 30.0) -> list[int]:
  if vlen <= 0:
    raise ValueError(f"video has no frames (vlen={vlen})")
  if sample in ("rand", "middle"):
    n = min(num_frames, vlen)
    edges = np.linspace(0, vlen, n + 1).astype(int)
    ranges = [(int(edges[i]), int(edges[i + 1]) - 1) for i in range(n)]
    if sample == "rand":
      rng = rng if rng is not None else np.random.default_rng()
      if any(x1 <= x0 for x0, x1 in ranges):  # an interval too short: official fallback
        idx = sorted(int(i) for i in rng.permutation(vlen)[:n])
      else:
        idx = [int(rng.integers(x0, x1)) for x0, x1 in ranges]
    else:
      idx = [(x0 + x1) // 2 for x0, x1 in ranges]
  elif sample == "chat":  # InternVideo2-Chat demo `get_index`: segment centres of (n - 1) / num
    seg = float(vlen - 1) / num_frames
    idx = [min(int(seg / 2) + int(np.round(seg * i)), vlen - 1) for i in range(num_frames)]
  elif sample.startswith("fps"):
    try:
      out_fps = float(sample[3:])
    except ValueError:
      raise ValueError(f"bad frame sampling {sample!r}: fps sampling is written like 'fps0.5'") from None
    delta = 1.0 / out_fps
    times = np.arange(0, vlen / input_fps, delta) + delta / 2
    idx = [int(i) for i in np.around(times * input_fps) if i < vlen][:num_frames] or [vlen // 2]
  else:
    raise ValueError(f"unknown frame sampling {sample!r} (use 'rand', 'middle', 'chat' or 'fpsX')")
  return idx + [idx[-1]] * (num_frames - len(idx))  # repeat the last for short videos


def segment_indices(num_segments: int, vlen: int, *, rng: Optional[np.random.Generator] = None,
                    test: bool = False, view: int = 0, num_views: int = 1) -> list[int]:
  """TSN sparse sampling: one random frame per equal segment; when `test`, the frame at
  (view + 0.5) / num_views of each segment (the centre for one view), so the temporal test
  views of multi-view evaluation cover each segment evenly."""
  if vlen <= 0:
    raise ValueError(f"video has no frames (vlen={vlen})")
  seg = vlen / num_segments
  if test:
    at = (view + 0.5) / num_views
    return [min(int(seg * i + seg * at), vlen - 1) for i in range(num_segments)]
  rng = rng if rng is not None else np.random.default_rng()
  return [min(int(seg * i + rng.uniform(0, seg)), vlen - 1) for i in range(num_segments)]


def _name(src: Source) -> str:
  return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)


def check_file(src: Source) -> None:
  """A missing or empty file (not bytes) raises VideoReadError with its skip reason."""
  if isinstance(src, (bytes, bytearray)):
    return
  path = os.fspath(src)
  if not os.path.exists(path):
    raise VideoReadError(f"{path}: file not found", "missing_file")
  if os.path.getsize(path) == 0:
    raise VideoReadError(f"{path}: empty file", "empty_file")


class VideoFile:
  """An open video stream with frame-index <-> timestamp bookkeeping. Use as a context manager."""

  def __init__(self, src: Source, name: Optional[str] = None):
    self.name = name or _name(src)
    check_file(src)
    try:
      self.container = av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else os.fspath(src))
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
      raise VideoReadError(f"{self.name}: cannot open: {e}") from e
    if not self.container.streams.video:
      self.container.close()
      raise VideoReadError(f"{self.name}: no video stream", "no_video_stream")
    self.stream = self.container.streams.video[0]
    if self.stream.codec_context is None:  # PyAV < 18 would segfault decoding this (§11.8)
      self.container.close()
      raise VideoReadError(f"{self.name}: video stream has no codec context", "no_video_stream")
    rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
    self.fps = float(rate) if rate else 0.0
    self.time_base = self.stream.time_base or Fraction(1, 1)
    self.start_pts = self.stream.start_time if self.stream.start_time is not None else 0
    self._count = None
    self._keys = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.container.close()

  def num_frames(self) -> int:
    """Frames in the stream: the header's count, else duration x fps, else a full decode."""
    if self._count is None:
      if self.stream.frames:
        self._count = int(self.stream.frames)
      elif self.stream.duration and self.fps:
        self._count = max(1, int(round(float(self.stream.duration * self.time_base) * self.fps)))
      else:
        self._count = sum(1 for _ in self._decode())
        self.container.seek(0, stream=self.stream)
    return self._count

  def _decode(self):
    try:
      yield from self.container.decode(self.stream)
    except av.error.FFmpegError as e:
      raise VideoReadError(f"{self.name}: decode error: {e}") from e

  def _index(self, frame) -> int:
    if frame.pts is None:
      raise _NoTimestamps
    return int(round(float((frame.pts - self.start_pts) * self.time_base) * self.fps))

  def read(self, indices: Sequence[int], *, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) for the frames at `indices` (any order, repeats allowed).

    `size=(height, width)` squash-resizes with swscale bicubic during colour conversion.
    Indices past the real end of the stream (a header that over-counts) repeat the last frame.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
      raise ValueError(f"{self.name}: bad frame indices {list(indices)}")
    kwargs = {"format": "rgb24"}
    if size is not None:
      kwargs.update(height=int(size[0]), width=int(size[1]), interpolation="BICUBIC")
    got: dict[int, np.ndarray] = {}
    last = None
    if self.fps > 0:
      try:
        last = self._read_seeking(wanted, got, kwargs)
      except _NoTimestamps:
        got.clear()
        self.container.seek(0, stream=self.stream)
        last = None
    if last is None:
      last = self._read_sequential(wanted, got, kwargs)
    if last is None:
      raise VideoReadError(f"{self.name}: no frame could be decoded")
    tail = last.to_ndarray(**kwargs)  # indices past the real end repeat the last frame
    return np.stack([got.get(int(i), tail) for i in indices])

  def _read_sequential(self, wanted, got, kwargs):
    """One pass from the start, counting frames; stops after the last wanted frame."""
    last, want = None, set(wanted)
    for idx, frame in enumerate(self._decode()):
      last = frame
      if idx in want:
        got[idx] = frame.to_ndarray(**kwargs)
      if idx >= wanted[-1]:
        break
    return last

  def keyframes(self) -> list[int]:
    """Frame indices of the keyframes, from the packets alone (no decoding)."""
    if self._keys is None:
      keys = []
      try:
        for packet in self.container.demux(self.stream):
          if packet.is_keyframe and packet.pts is not None:
            keys.append(int(round(float((packet.pts - self.start_pts) * self.time_base) * self.fps)))
      except av.error.FFmpegError as e:
        raise VideoReadError(f"{self.name}: demux error: {e}") from e
      self.container.seek(0, stream=self.stream)
      self._keys = sorted(set(keys)) or [0]
    return self._keys

  def _read_seeking(self, wanted, got, kwargs):
    """Decodes each needed GOP once: jumps to the keyframe before a wanted frame only when
    that keyframe lies ahead of the decoder; otherwise keeps decoding forward."""
    keys = self.keyframes()
    want, decoder, pos, last = set(wanted), None, 0, None
    for target in wanted:
      if target in got:
        continue
      key = keys[max(bisect.bisect_right(keys, target) - 1, 0)]
      if decoder is None or key > pos:
        if key > 0:
          ts = self.start_pts + int(target / self.fps / self.time_base)
          self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
        decoder = self._decode()
      for frame in decoder:
        idx = self._index(frame)
        pos, last = idx + 1, frame
        if idx in want and idx not in got:
          got[idx] = frame.to_ndarray(**kwargs)
        if idx >= target:
          break
      else:
        return last  # end of stream: the rest are past the end
      if target not in got:
        raise _NoTimestamps  # overshot (timestamps disagree with frame order): go sequential
    return last


class _NoTimestamps(Exception):
  """Timestamps cannot be trusted for seeking; decode sequentially instead."""


def read_frames(src: Source, indices: Sequence[int], *, size: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Decodes the frames at `indices` of a file path or encoded bytes -> uint8 (T, H, W, 3)."""
  with VideoFile(src) as v:
    return v.read(indices, size=size)


def num_frames_of(src: Source) -> int:
  with VideoFile(src) as v:
    return v.num_frames()
