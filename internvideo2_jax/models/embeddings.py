"""Patch embedding, the official sin-cos position tables, and torch-exact table resizing.

Table layout (official `get_3d_sincos_pos_embed`, MAE lineage): for a token at (t, h, w) the
first D/4 channels are the 1-D code of t; the remaining 3D/4 are a 2-D code whose first half
encodes the *column* w and second half the *row* h (the MAE `meshgrid(w, h)` quirk). Each 1-D
code is [sin(p * omega), cos(p * omega)] with omega_i = 10000 ** (-i / (d/2)). With a cls token
a zero row is prepended.

Resizing reproduces torch's `F.interpolate` exactly (computed in float64): `linear` in time and
`bicubic` (a = -0.75) in space, both with align_corners=False. `jax.image.resize('cubic')` uses
a = -0.5 and would not match the official checkpoints' interpolation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import numpy as np

from internvideo2_jax.models.layers import Linear


# ----------------------------------------------------------------------------- sin-cos tables


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(len(positions), dim): [sin(p * omega), cos(p * omega)]."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """(grid_h * grid_w, dim), row-major over (h, w); first half codes w, second half codes h."""
  if dim % 2:
    raise ValueError(f"2-D sin-cos embedding needs an even dimension, got {dim}")
  w, h = np.meshgrid(np.arange(grid_w), np.arange(grid_h))  # each (grid_h, grid_w)
  return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
  """(cls + T*H*W, dim) float32, tokens in (t, h, w) order; first dim/4 channels code t."""
  if dim % 4:
    raise ValueError(f"3-D sin-cos embedding needs dim % 4 == 0, got {dim}")
  d_t, d_s = dim // 4, dim // 4 * 3
  temporal = np.repeat(sincos_1d(d_t, np.arange(grid_t))[:, None], grid_h * grid_w, axis=1)
  spatial = np.repeat(sincos_2d(d_s, grid_h, grid_w)[None], grid_t, axis=0)
  table = np.concatenate([temporal, spatial], axis=-1).reshape(-1, dim)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


# ----------------------------------------------------------------------------- torch resizing


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch `linear`, align_corners=False."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * scale - 0.5, 0.0)  # torch clamps negative source coords for linear
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    lam = src - i0
    m[i, i0] += 1.0 - lam
    m[i, i1] += lam
  return m


def _cubic(x: float, a: float) -> float:
  x = abs(x)
  if x <= 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return 0.0


def _bicubic_weights(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) matrix of torch `bicubic` along one axis, align_corners=False."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5  # no clamp for cubic, as in torch
    base = int(math.floor(src))
    t = src - base
    for k, coeff in zip(range(-1, 3), (_cubic(t + 1, a), _cubic(t, a), _cubic(1 - t, a),
                                        _cubic(2 - t, a))):
      m[i, min(max(base + k, 0), n_in - 1)] += coeff  # border replicate
  return m


def resize_linear(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """torch F.interpolate(mode='linear', align_corners=False) along `axis` (float64)."""
  w = _linear_weights(x.shape[axis], size)
  return np.moveaxis(np.tensordot(w, np.moveaxis(x.astype(np.float64), axis, 0), axes=1), 0, axis)


def resize_bicubic(x: np.ndarray, size: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
  """torch F.interpolate(mode='bicubic', align_corners=False) over two axes (float64)."""
  out = x.astype(np.float64)
  for n, axis in zip(size, axes):
    w = _bicubic_weights(out.shape[axis], n)
    out = np.moveaxis(np.tensordot(w, np.moveaxis(out, axis, 0), axes=1), 0, axis)
  return out


def resize_pos_embed(table: np.ndarray, src_grid: tuple[int, int, int],
                     dst_grid: tuple[int, int, int], num_extra_tokens: int = 1) -> np.ndarray:
  """Resizes a joint (1, extra + T*H*W, D) table from grid (T, H, W) to another grid.

  Time first (linear), then space (bicubic), like the official `interpolate_pos_embed_*`;
  the extra (cls) rows are kept as they are. Returns float32 with the same leading dims.
  """
  table = np.asarray(table)
  lead = table.shape[:-2]
  d = table.shape[-1]
  flat = table.reshape(-1, table.shape[-2], d)
  if flat.shape[0] != 1:
    raise ValueError(f"expected one table, got leading shape {lead}")
  t0, h0, w0 = src_grid
  t1, h1, w1 = dst_grid
  n = flat.shape[1] - num_extra_tokens
  if n != t0 * h0 * w0:
    raise ValueError(f"table has {n} patch rows, grid {src_grid} needs {t0 * h0 * w0}")
  extra, tokens = flat[0, :num_extra_tokens], flat[0, num_extra_tokens:].reshape(t0, h0, w0, d)
  if t1 != t0:
    tokens = resize_linear(tokens, t1, axis=0)
  if (h1, w1) != (h0, w0):
    tokens = resize_bicubic(tokens, (h1, w1), axes=(1, 2))
  out = np.concatenate([extra.astype(np.float64), tokens.reshape(-1, d)], axis=0)
  return out.astype(np.float32).reshape(lead + out.shape)


# ----------------------------------------------------------------------------- patch embedding


class PatchEmbed(nn.Module):
  """Conv3d(kernel = stride = (tubelet, p, p)) as a reshape + matmul; tokens in (t, h, w) order.

  The kernel is stored like a Flax Conv3d kernel, (tubelet, p, p, C, D) = torch's
  (D, C, t, p, p) transposed, under `patch_embed/proj`.
  """
  embed_dim: int
  patch_size: int
  tubelet_size: int
  dtype: object

  @nn.compact
  def __call__(self, video):  # (B, T, H, W, C)
    b, t, h, w, c = video.shape
    tt, p = self.tubelet_size, self.patch_size
    x = video.reshape(b, t // tt, tt, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T', H', W', tt, p, p, C)
    x = x.reshape(b, (t // tt) * (h // p) * (w // p), tt, p, p, c)
    proj = Linear(self.embed_dim, (None, None, None, None, "embed"), n_in=4, dtype=self.dtype,
                  name="proj")
    return proj(x)  # (B, T'*H'*W', D)


def grid_of(video_shape, patch_size: int, tubelet_size: int) -> tuple[int, int, int]:
  _, t, h, w, _ = video_shape
  return t // tubelet_size, h // patch_size, w // patch_size


__all__ = ["sincos_1d", "sincos_2d", "sincos_3d", "resize_linear", "resize_bicubic",
           "resize_pos_embed", "PatchEmbed", "grid_of"]
