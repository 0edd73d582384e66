"""Heads on top of the towers: the attention-pooling `clip_projector`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvideo2_jax.models.layers import LayerNorm, Linear, param_with_axes
from internvideo2_jax.ops.attention import dot_product_attention


class CrossAttention(nn.Module):
  """Official `CrossAttention` with bias-free q/k/v weights plus separate q/k/v biases."""
  num_heads: int
  out_dim: int
  dtype: object = jnp.float32
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_q, x_k, x_v):
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"pooling width {d} is not divisible by attn_pool_num_heads={self.num_heads}")
    hd = d // self.num_heads

    def project(name, x):
      w = Linear(d, ("embed", "qkv"), use_bias=False, dtype=self.dtype, name=name)(x)
      bias = param_with_axes(self, f"{name}_bias", nn.initializers.zeros, (d,), ("qkv",))
      y = w + bias.astype(self.dtype)
      return y.reshape(y.shape[:-1] + (self.num_heads, hd))

    q, k, v = project("q", x_q), project("k", x_k), project("v", x_v)
    o = dot_product_attention(q, k, v, implementation=self.attn_impl)  # (B, Nq, H, hd)
    out = Linear(self.out_dim, ("heads", "head_dim", "embed_out"), n_in=2, dtype=self.dtype,
                 name="proj")(o)
    # The attention map averaged over heads (B, Nq, Nk): what the stage-1 CLIP teacher hands to
    # attention-guided masking. One query, so recomputing the scores here costs little.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd ** -0.5
    return out, jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)


class AttentionPoolingBlock(nn.Module):
  """Official `AttentionPoolingBlock`: one query = mean of ALL tokens (cls included).

  Separate LayerNorms (eps 1e-5) for q, k and v; no residual, no MLP, no LayerScale (the
  official block builds a drop_path but its forward never applies it). Output (B, out_dim) fp32.
  """
  num_heads: int
  out_dim: int
  dtype: object = jnp.float32
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x):  # (B, N, D)
    x_q = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True)
    q = LayerNorm(1e-5, name="norm1_q")(x_q)
    k = LayerNorm(1e-5, name="norm1_k")(x)
    v = LayerNorm(1e-5, name="norm1_v")(x)
    out, attn = CrossAttention(self.num_heads, self.out_dim, self.dtype, self.attn_impl,
                               name="cross_attn")(q, k, v)
    return out[:, 0].astype(jnp.float32), attn[:, 0]
