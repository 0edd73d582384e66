"""Pixel normalisation constants and the on-device normalisation.

Frames travel to the device as uint8 and are normalised there: 4x less host->device traffic
than float32, and the subtraction/division fuses into the patch-embedding matmul's input.
"""

from __future__ import annotations

import jax.numpy as jnp

# The official InternVideo2 towers use ImageNet statistics; CLIP teachers use OpenAI CLIP's.
MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def normalize(frames_uint8, stats: str = "imagenet", dtype=jnp.float32):
  """uint8 (..., 3) in [0, 255] -> (x / 255 - mean) / std."""
  if stats not in MEAN_STD:
    raise ValueError(f"unknown normalisation {stats!r}; choose from {sorted(MEAN_STD)}")
  mean, std = (jnp.asarray(v, jnp.float32) for v in MEAN_STD[stats])
  return ((frames_uint8.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
