"""Token masks computed on device (plain JAX). Masks are boolean, True = dropped.

`attention_mask` is the stage-1 "attention" masking of the official code: per frame keep
N_vis = HW - int(HW * ratio) tokens drawn *without replacement in proportion to* the CLIP
teacher's pooling attention (torch.multinomial). Sampling with Gumbel-top-k draws exactly that
distribution: the top N_vis of log(attn) + Gumbel noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_per_frame(hw: int, ratio: float) -> int:
  return hw - int(hw * ratio)


def attention_mask(key, attn, ratio: float, batch: int):
  """attn (B*T, HW) -> mask (B, T*HW), the same number of visible tokens in every row."""
  bt, hw = attn.shape
  n_vis = visible_per_frame(hw, ratio)
  gumbel = jax.random.gumbel(key, attn.shape)
  scores = jnp.log(jnp.maximum(attn.astype(jnp.float32), 1e-30)) + gumbel
  _, keep = jax.lax.top_k(scores, n_vis)                                  # (B*T, N_vis)
  visible = jnp.zeros((bt, hw), bool).at[jnp.arange(bt)[:, None], keep].set(True)
  return (~visible).reshape(batch, (bt // batch) * hw)


def tube_mask(key, batch: int, grid: tuple[int, int, int], ratio: float):
  t, h, w = grid
  n_vis = visible_per_frame(h * w, ratio)
  keep = jax.vmap(lambda k: jax.random.permutation(k, h * w)[:n_vis])(jax.random.split(key, batch))
  frame = jnp.ones((batch, h * w), bool).at[jnp.arange(batch)[:, None], keep].set(False)
  return jnp.tile(frame, (1, t))


def random_mask(key, batch: int, num_tokens: int, ratio: float):
  n_vis = num_tokens - int(num_tokens * ratio)
  keep = jax.vmap(lambda k: jax.random.permutation(k, num_tokens)[:n_vis])(jax.random.split(key, batch))
  return jnp.ones((batch, num_tokens), bool).at[jnp.arange(batch)[:, None], keep].set(False)
