"""Synthetic clips: a coloured shape moving over a noisy background, written as real mp4 files.

Deterministic for a seed. The data issue builds the full captioned corpus on top of these.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 220, 40), "white": (235, 235, 235), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dy, dx = y - cy, x - cx
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
  if shape == "triangle":
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
  if shape == "cross":
    arm = r * 0.35
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
  raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render_clip(rng: np.random.Generator, num_frames: int, size: int, *, shape: str, colour: str,
                direction: str) -> np.ndarray:
  """uint8 (T, size, size, 3): the shape crosses the frame in `direction`."""
  r = size * rng.uniform(0.12, 0.2)
  speed = size * rng.uniform(0.6, 0.8) / max(num_frames - 1, 1)
  dy, dx = DIRECTIONS[direction]
  # Start so the whole path stays inside the frame.
  span = speed * (num_frames - 1)
  lo, hi = r, size - r
  cy = rng.uniform(lo, hi) if dy == 0 else (lo if dy > 0 else hi) + rng.uniform(0, max(hi - lo - span, 0)) * dy
  cx = rng.uniform(lo, hi) if dx == 0 else (lo if dx > 0 else hi) + rng.uniform(0, max(hi - lo - span, 0)) * dx
  bg = rng.uniform(10, 70, size=3)
  jitter = rng.uniform(-15, 15, size=3)
  rgb = np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    img = bg + rng.normal(0, 20, size=(size, size, 3))
    img[_shape_mask(shape, size, cy + dy * speed * t, cx + dx * speed * t, r)] = rgb
    frames[t] = np.clip(img, 0, 255).astype(np.uint8)
  return frames


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *,
              audio: Optional[np.ndarray] = None, sample_rate: int = 16000,
              keyframe_interval: int = 8) -> None:
  """Writes uint8 (T, H, W, 3) frames as h264 (yuv420p) mp4, with optional mono AAC audio."""
  path = os.fspath(path)
  t, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"h264/yuv420p needs even frame sizes, got {h}x{w}")
  with av.open(path, mode="w") as container:
    vs = container.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    vs.codec_context.gop_size = keyframe_interval
    vs.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
    a_stream = None
    if audio is not None:
      a_stream = container.add_stream("aac", rate=sample_rate)
      a_stream.layout = "mono"
    for i in range(t):
      frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
      frame.pts = i
      frame.time_base = Fraction(1, fps)
      for packet in vs.encode(frame):
        container.mux(packet)
    for packet in vs.encode():
      container.mux(packet)
    if a_stream is not None:
      samples = np.asarray(audio, np.float32).reshape(1, -1)
      af = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
      af.sample_rate = sample_rate
      for packet in a_stream.encode(af):
        container.mux(packet)
      for packet in a_stream.encode():
        container.mux(packet)
