"""Spatial transforms on uint8 clips (T, H, W, 3), one set of random parameters per clip.

* train (stage 2): RandomResizedCrop(size, scale=(0.5, 1), ratio=(3/4, 4/3)) + horizontal flip;
* stage 1: TSN GroupMultiScaleCrop(size, scales (1, .875, .75, .66), max_distort 1, 13 fixed
  offsets) + flip (switched off for sources such as something-something);
* test: squash resize to size x size, no crop.

Resizing is bicubic through swscale (PyAV), on the host in the data workers.

Normalisation runs on the device instead (`normalize`): clips travel as uint8, 4x less
host->device traffic than float32 and less worker CPU, and the scale/shift fuses into the
patch-embedding matmul on the accelerator.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import av
import jax.numpy as jnp
import numpy as np

# The official InternVideo2 towers use ImageNet statistics; CLIP teachers use OpenAI CLIP's.
MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def normalize(frames_uint8, stats: str = "imagenet", dtype=jnp.float32):
  """On device: uint8 (..., 3) in [0, 255] -> (x / 255 - mean) / std."""
  if stats not in MEAN_STD:
    raise ValueError(f"unknown normalisation {stats!r}; choose from {sorted(MEAN_STD)}")
  mean, std = (jnp.asarray(v, jnp.float32) for v in MEAN_STD[stats])
  return ((frames_uint8.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def resize(clip: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of every frame (swscale); returns uint8 (T, height, width, 3)."""
  if clip.shape[1:3] == (height, width):
    return clip
  out = np.empty((clip.shape[0], height, width, 3), np.uint8)
  for i, frame in enumerate(clip):
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    out[i] = vf.to_ndarray(width=width, height=height, format="rgb24", interpolation="BICUBIC")
  return out


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator,
                            scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (top, left, height, width)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  in_ratio = w / h  # fallback: central crop at the nearest allowed aspect
  if in_ratio < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    ch, cw = h, int(round(h * max(ratio)))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def multi_scale_crop_box(h: int, w: int, rng: np.random.Generator,
                         scales: Sequence[float] = (1, .875, .75, .66), max_distort: int = 1,
                         input_size: int = 224) -> tuple[int, int, int, int]:
  """TSN GroupMultiScaleCrop._sample_crop_size with fix_crop and more_fix_crop."""
  base = min(h, w)
  sizes = [int(base * s) for s in scales]
  crop_h = [input_size if abs(x - input_size) < 3 else x for x in sizes]
  crop_w = crop_h
  pairs = [(cw, ch) for i, ch in enumerate(crop_h) for j, cw in enumerate(crop_w)
           if abs(i - j) <= max_distort]
  cw, ch = pairs[int(rng.integers(len(pairs)))]
  ws, hs = (w - cw) // 4, (h - ch) // 4
  offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
             (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
             (1 * ws, 1 * hs), (3 * ws, 1 * hs), (1 * ws, 3 * hs), (3 * ws, 3 * hs)]
  ox, oy = offsets[int(rng.integers(len(offsets)))]
  return oy, ox, ch, cw


def train_transform(clip: np.ndarray, size: int, rng: np.random.Generator, *, kind: str = "rrc",
                    flip: bool = True, scale=(0.5, 1.0)) -> np.ndarray:
  """One random crop box (+ flip) for the whole clip, resized to size x size."""
  _, h, w, _ = clip.shape
  if kind == "rrc":
    top, left, ch, cw = random_resized_crop_box(h, w, rng, scale=scale)
  elif kind == "multiscale":
    top, left, ch, cw = multi_scale_crop_box(h, w, rng, input_size=size)
  else:
    raise ValueError(f"unknown train crop {kind!r} (use 'rrc' or 'multiscale')")
  out = resize(clip[:, top:top + ch, left:left + cw], size, size)
  if flip and rng.random() < 0.5:
    out = out[:, :, ::-1]
  return np.ascontiguousarray(out)


def spatial_views(clip: np.ndarray, size: int, num_crops: int) -> np.ndarray:
  """The official multi-crop test views (VideoMAE / InternVideo2 fine-tuning): the shorter side
  resized to `size`, then `num_crops` size x size crops evenly spaced along the longer side
  (first, centre, last for 3; the centre for 1). (num_crops, T, size, size, 3)."""
  h, w = clip.shape[1:3]
  scale = size / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  clip = resize(clip, nh, nw)
  long = max(nh, nw) - size
  starts = [long // 2] if num_crops == 1 else [int(i * long / (num_crops - 1)) for i in range(num_crops)]
  if nh >= nw:
    return np.stack([clip[:, s:s + size, :size] for s in starts])
  return np.stack([clip[:, :size, s:s + size] for s in starts])


def test_transform(clip: np.ndarray, size: int) -> np.ndarray:
  """Official test transform: squash resize to size x size, no crop."""
  return resize(clip, size, size)


test_transform.__test__ = False  # not a pytest test


def chat_transform(clip: np.ndarray, size: int) -> np.ndarray:
  """The InternVideo2-Chat demo transform: bicubic resize of the shorter side to `size`, then
  a centre crop of size x size."""
  h, w = clip.shape[1:3]
  scale = size / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  clip = resize(clip, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return clip[:, top:top + size, left:left + size]



def hd_grid(width: int, height: int, hd_num: int, size: int = 224) -> tuple[int, int]:
  """The (columns, rows) of the HD tiling (VideoChat2 `HD_transform_no_padding`, the
  InternVL-1.5 rule): among grids with 1 <= columns * rows <= hd_num, the one whose aspect
  ratio columns / rows is closest to the frame's; on a tie the larger grid wins when the frame
  has more than half its pixels (area > 0.5 * size^2 * columns * rows)."""
  if hd_num < 1:
    raise ValueError(f"hd_num={hd_num} must be >= 1")
  ratios = sorted({(i, j) for n in range(1, hd_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                   if i * j <= hd_num}, key=lambda r: r[0] * r[1])
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in ratios:
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * size * size * cols * rows:
      best = (cols, rows)
  return best


def hd_clips(clip: np.ndarray, size: int, hd_num: int, *, grid: Optional[tuple[int, int]] = None,
             add_global: bool = True) -> np.ndarray:
  """(T, H, W, 3) -> (columns * rows [+ 1], T, size, size, 3): the frames bicubic-resized to
  (rows * size, columns * size), cut into sub-clips row by row, then (add_global) the whole
  frame resized to size x size. `grid` fixes the tiling (the official `fix_ratio`)."""
  t, h, w = clip.shape[:3]
  cols, rows = grid or hd_grid(w, h, hd_num, size)
  big = resize(clip, rows * size, cols * size)
  tiles = big.reshape(t, rows, size, cols, size, 3).transpose(1, 3, 0, 2, 4, 5).reshape(rows * cols, t, size, size, 3)
  if add_global:
    tiles = np.concatenate([tiles, resize(clip, size, size)[None]], axis=0)
  return tiles