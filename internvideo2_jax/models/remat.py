"""Named rematerialisation policies for the scanned transformer blocks.

Blocks tag activations with `checkpoint_name`: `qkv` (q, k, v after q/k-norm), `attn_context`
(attention output before the projection), `attn_out`, `mlp_hidden`, `mlp_out`. A config picks a
policy by name (`auto`: the platform's measured choice); `none` disables remat (fastest, most memory), `full` saves nothing inside a block
(least memory, one extra forward).
"""

from __future__ import annotations

import jax

from internvideo2_jax.ops import platform

_names = jax.checkpoint_policies.save_only_these_names

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": _names("qkv"),
    "save_attn": _names("qkv", "attn_context"),
    "save_outs": _names("attn_out", "mlp_out"),
    "minimal": _names("qkv", "attn_context", "attn_out", "mlp_out"),
}


def check(name: str) -> str:
  """`name` if it is a policy or `auto`; raises naming the valid choices (no backend needed)."""
  if name not in POLICIES and name != "auto":
    raise ValueError(f"unknown remat_policy {name!r}; choose from {sorted(POLICIES) + ['auto']}")
  return name


def policy(name: str):
  """The jax policy for `name` (None for `none`; `auto`: the platform's measured choice,
  ops/platform.py), called when the model is traced."""
  return POLICIES[platform.resolve("remat_policy", check(name))]
