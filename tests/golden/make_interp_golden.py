"""Writes interp.npz: position tables resized by torch's F.interpolate, the official way.

Run once with torch installed (any Python): python tests/golden/make_interp_golden.py
Mirrors the official `interpolate_pos_embed_internvideo2`: cls held out; time with
mode='linear' on (HW, D, T); space with mode='bicubic', align_corners=False on (T, D, h, w).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

CASES = {  # name: (src grid (T, H, W), dst grid)
    "t_up": ((4, 3, 3), (8, 3, 3)),
    "t_down": ((8, 2, 2), (4, 2, 2)),
    "s_up": ((2, 4, 4), (2, 7, 7)),
    "s_down": ((1, 16, 16), (1, 14, 14)),
    "both": ((4, 5, 5), (6, 3, 3)),
}


def official_resize(table, src, dst):
  t0, h0, _ = src
  t1, h1, _ = dst
  d = table.shape[-1]
  extra, tokens = table[:, :1], table[:, 1:]
  if t0 != t1:
    x = tokens.view(1, t0, -1, d).permute(0, 2, 3, 1).reshape(-1, d, t0)
    x = F.interpolate(x, size=t1, mode="linear")
    tokens = x.view(1, -1, d, t1).permute(0, 3, 1, 2).reshape(1, -1, d)
  if h0 != h1:
    x = tokens.reshape(-1, h0, h0, d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(h1, h1), mode="bicubic", align_corners=False)
    tokens = x.permute(0, 2, 3, 1).flatten(1, 2).reshape(1, -1, d)
  return torch.cat([extra, tokens], dim=1)


def main():
  rng = np.random.default_rng(0)
  out = {}
  for name, (src, dst) in CASES.items():
    table = rng.standard_normal((1, 1 + int(np.prod(src)), 16)).astype(np.float32)
    out[f"{name}_in"] = table
    out[f"{name}_out"] = official_resize(torch.from_numpy(table), src, dst).numpy()
    out[f"{name}_grids"] = np.asarray([src, dst])
  np.savez(os.path.join(os.path.dirname(os.path.abspath(__file__)), "interp.npz"), **out)


if __name__ == "__main__":
  main()
