"""Token masks computed on the host (no model needed): `random` and `tube`.

Masks are boolean over the patch tokens, (T * H * W,) in (t, h, w) order, True = dropped; the
cls token is not part of them and is always kept by the encoder. Every mask of a given shape and
ratio drops the same number of tokens, so batches have a static visible length:
`num_visible(n, ratio) = n - int(n * ratio)`. They are deterministic in the generator passed in
(the pipeline derives it from the seed and the example index).
"""

from __future__ import annotations

import numpy as np


def num_visible(num_tokens: int, ratio: float) -> int:
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
  return num_tokens - int(num_tokens * ratio)


def random_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
  """Unstructured over space and time (official RandomMaskingGenerator)."""
  n = int(np.prod(grid))
  mask = np.ones(n, bool)
  mask[rng.permutation(n)[:num_visible(n, ratio)]] = False
  return mask


def tube_mask(grid: tuple[int, int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
  """The same spatial mask on every frame (official TubeMaskingGenerator)."""
  t, h, w = grid
  hw = h * w
  frame = np.ones(hw, bool)
  frame[rng.permutation(hw)[:num_visible(hw, ratio)]] = False
  return np.tile(frame, t)


def make_mask(kind: str, grid: tuple[int, int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
  if kind == "random":
    return random_mask(grid, ratio, rng)
  if kind == "tube":
    return tube_mask(grid, ratio, rng)
  raise ValueError(f"unknown host mask type {kind!r} (use 'random' or 'tube'; 'attention' "
                   "masks need the teacher and are computed on device)")


def visible_count(kind: str, grid: tuple[int, int, int], ratio: float) -> int:
  """Visible tokens per clip for a mask kind (static, for the model's num_visible)."""
  t, h, w = grid
  return t * num_visible(h * w, ratio) if kind == "tube" else num_visible(t * h * w, ratio)
