"""Settings whose fastest value depends on the platform, chosen from measurements.

A model config may say "auto" for `remat_policy` and `scan_unroll`; the value is taken when the
model is traced, for the platform the computation runs on (which is the TPU also when a step is
compiled ahead of time for a TPU topology on a CPU host). The table's CPU row comes from
benchmarks/encoder_step.py (BENCHMARKS.md, "Encoder step against the official PyTorch"): on
CPU, saving only the non-batched matmul outputs of each block (`dots_no_batch`) was the fastest
of the remat policies (the stage-2 demo step: 0.64 s against 0.79 s with `none`), unrolling the
block loop gained at most ~5% (not worth its compile time), and it needs less memory than
saving everything. The GPU
and TPU rows keep every activation (`none`), the fastest when memory allows; they are not
measured yet (no accelerator was lent to this project's sessions). Configs of the large sizes
set `remat_policy="full"` explicitly (memory), which "auto" never overrides.
"""

from __future__ import annotations

import jax

DEFAULTS = {
    "cpu": {"remat_policy": "dots_no_batch", "scan_unroll": 1},
    "gpu": {"remat_policy": "none", "scan_unroll": 1},
    "tpu": {"remat_policy": "none", "scan_unroll": 1},
}


def current() -> str:
  """Where the traced computation runs: the devices of the ambient mesh (`jax.set_mesh`), else
  the default backend (inputs are tracers inside jit, so they cannot tell)."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(key: str, value):
  """`value`, or the platform's measured choice for `key` when it is "auto"."""
  if value != "auto":
    return value
  return DEFAULTS.get(current(), DEFAULTS["gpu"])[key]


def describe() -> str:
  """One line for the start of a run: what "auto" means here."""
  p = current()
  row = DEFAULTS.get(p, DEFAULTS["gpu"])
  return (f"platform {p}: settings left to auto: " + ", ".join(f"{k}={v}" for k, v in row.items())
          + ", attention picked per call (ops/attention.py)")
