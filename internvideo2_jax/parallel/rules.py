"""Logical axis names -> mesh axes: the one rules table.

Models annotate parameters with logical names (`embed`, `mlp`, `heads`, ...) and activations
with `batch`, `tokens`, `act_*`. Parameter `embed` is sharded over `fsdp` (ZeRO-3 style) while
activation `act_embed` is not, because the batch already uses `fsdp`. Heads and MLP hidden units
are split over `tensor` (Megatron-style tensor parallelism).
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes a global batch is split over

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("tokens", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", "tensor"),
    ("embed_out", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def rules_from_config(overrides=None) -> tuple[tuple[str, object], ...]:
  """DEFAULT_RULES with per-name overrides ({'embed': None, ...}) from a config."""
  if not overrides:
    return DEFAULT_RULES
  known = {name for name, _ in DEFAULT_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown logical axis names in sharding rules {unknown}; known: {sorted(known)}")
  for name, axes in overrides.items():
    for a in (axes if isinstance(axes, (tuple, list)) else [axes]):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"rule {name!r} -> {axes!r}: mesh axes are {MESH_AXES}")
  return tuple((n, tuple(overrides[n]) if isinstance(overrides.get(n), list) else overrides.get(n, a))
               for n, a in DEFAULT_RULES)
