"""The BEATs audio encoder as InternVideo2 uses it (official BEATs forward on a precomputed
64-bin fbank; reference §2.6, §11.5-11.7).

    fbank (B, 998, 64) -> Conv2d(1, 512, 16, stride 16, no bias) -> 62 x 4 = 248 tokens
    (time-major) -> LayerNorm(512) -> post_extract_proj (768)
    -> + positional conv (kernel 128, pad 64, 16 groups, weight norm folded, last step dropped,
       exact GELU) -> encoder LayerNorm
    -> 12 post-LN layers with deep-norm residual scaling alpha = (2 L)^(1/4), T5 bucketed relative
       position bias (layer 0's table shared by all layers) gated per layer by the GRU term
Every LayerNorm has eps 1e-5. The attention's q / 32 ... x 32 stabilisation equals a plain
softmax(q k^T * scale + gated bias) and is computed that way.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from internvideo2_jax.config_utils import preset
from internvideo2_jax.models.layers import LayerNorm, Linear, gelu, param_with_axes
from internvideo2_jax.ops.attention import dot_product_attention

_PRESETS = {
    "beats": dict(),
    "tiny": dict(embed_dim=32, encoder_embed_dim=48, encoder_layers=2, encoder_attention_heads=4,
                 encoder_ffn_embed_dim=96, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64),
}
_DEFAULTS = dict(input_patch_size=16, embed_dim=512, encoder_embed_dim=768, encoder_layers=12,
                 encoder_attention_heads=12, encoder_ffn_embed_dim=3072, conv_pos=128, conv_pos_groups=16,
                 num_buckets=320, max_distance=800, deep_norm=True, gru_rel_pos=True, dtype="float32",
                 attn_impl="auto")


def audio_preset(name: str = "beats", **overrides) -> ml_collections.ConfigDict:
  """The BEATs iter3+ architecture (`beats`) or a small one for tests (`tiny`)."""
  return ml_collections.ConfigDict(preset("audio", _PRESETS, _DEFAULTS, name, overrides))


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """BEATs / T5 bidirectional buckets of (key - query), with the log computed in float32."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore", invalid="ignore"):
    large = max_exact + (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact)) * (half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(rel < max_exact, rel, large)


class _Layer(nn.Module):
  c: Any
  dtype: Any

  @nn.compact
  def __call__(self, x, position_bias):
    c = self.c
    h = c.encoder_attention_heads
    hd = c.encoder_embed_dim // h
    alpha = (2.0 * c.encoder_layers) ** 0.25 if c.deep_norm else 1.0
    lin = lambda n, name: Linear(n, ("embed", "mlp"), dtype=self.dtype, name=name)  # noqa: E731
    residual = x
    q = Linear((h, hd), ("embed", "heads", "head_dim"), dtype=self.dtype, name="q_proj")(x)
    k = Linear((h, hd), ("embed", "heads", "head_dim"), dtype=self.dtype, name="k_proj")(x)
    v = Linear((h, hd), ("embed", "heads", "head_dim"), dtype=self.dtype, name="v_proj")(x)
    bias = position_bias[None]                                       # (1, H, T, T)
    if c.gru_rel_pos:
      # The gate reads the *unscaled* q projection (bias included). Official:
      #   sigmoid(grep_linear(q).view(B, H, L, 2, 4).sum(-1)).chunk(2, -1)
      # i.e. the sigmoid is taken of the two 4-sums, not summed over 4 sigmoids (an earlier version
      # did the latter; gates then lay in (0, 4) instead of (0, 1) and tests/test_beats_golden.py
      # was off by ~0.9 after one layer).
      g = Linear(8, ("head_dim", None), dtype=jnp.float32, name="grep_linear")(q.astype(jnp.float32))
      g = jax.nn.sigmoid(g.reshape(g.shape[:-1] + (2, 4)).sum(-1))    # (B, T, H, 2)
      gate_a, gate_b = g[..., 0], g[..., 1]
      grep_a = param_with_axes(self, "grep_a", nn.initializers.ones, (1, h, 1, 1), (None, "heads", None, None))
      gate = gate_a * (gate_b * grep_a[0, :, 0, 0] - 1.0) + 2.0      # (B, T, H)
      bias = jnp.transpose(gate, (0, 2, 1))[..., None] * position_bias[None]
    o = dot_product_attention(q, k, v, bias=bias, implementation="xla" if c.gru_rel_pos else c.attn_impl)
    x = Linear(c.encoder_embed_dim, ("heads", "head_dim", "embed"), n_in=2, dtype=self.dtype, name="out_proj")(o)
    x = LayerNorm(1e-5, name="self_attn_layer_norm")(residual * alpha + x.astype(jnp.float32))
    residual = x
    y = gelu(lin(c.encoder_ffn_embed_dim, "fc1")(x.astype(self.dtype)), approximate=False)
    y = Linear(c.encoder_embed_dim, ("mlp", "embed"), dtype=self.dtype, name="fc2")(y)
    return LayerNorm(1e-5, name="final_layer_norm")(residual * alpha + y.astype(jnp.float32))


class AudioEncoder(nn.Module):
  """fbank (B, frames, 64), normalised -> tokens (B, (frames // 16) * 4, encoder_embed_dim)."""
  config: Any

  @nn.compact
  def __call__(self, fbank):
    c = self.config
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.dtype]
    p = c.input_patch_size
    b, t, f = fbank.shape
    t, f = (t // p) * p, (f // p) * p                                 # 998 -> 992 frames: 62 x 4
    x = fbank[:, :t, :f].reshape(b, t // p, p, f // p, p).transpose(0, 1, 3, 2, 4)
    x = x.reshape(b, (t // p) * (f // p), p * p)                      # tokens in (time, freq) order
    x = Linear(c.embed_dim, (None, "embed"), use_bias=False, dtype=dtype, name="patch_embedding")(x)
    x = LayerNorm(1e-5, name="layer_norm")(x)
    # Official BEATs builds post_extract_proj only when embed_dim != encoder_embed_dim (else None,
    # and the checkpoint has no such key); mirror that so such cfgs convert.
    if c.embed_dim != c.encoder_embed_dim:
      x = Linear(c.encoder_embed_dim, ("embed", "embed_out"), dtype=dtype, name="post_extract_proj")(x)
    return _Encoder(c, dtype, name="encoder")(x.astype(jnp.float32))


class _Encoder(nn.Module):
  c: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = self.c
    n = x.shape[1]
    d, k, g = c.encoder_embed_dim, c.conv_pos, c.conv_pos_groups
    # Positional grouped conv (weight norm folded at conversion); SamePad drops the last step.
    w = param_with_axes(self, "pos_conv_weight", nn.initializers.normal(0.02), (k, d // g, d), (None, None, "embed"))
    cb = param_with_axes(self, "pos_conv_bias", nn.initializers.zeros, (d,), ("embed",))
    y = jax.lax.conv_general_dilated(x[:, :, :].astype(self.dtype), w.astype(self.dtype), (1,), [(k // 2, k // 2)],
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=g)
    y = y[:, :n] if k % 2 == 0 else y
    x = x + gelu(y.astype(jnp.float32) + cb, approximate=False)
    x = LayerNorm(1e-5, name="layer_norm")(x)
    table = param_with_axes(self, "relative_attention_bias", nn.initializers.normal(0.02),
                            (c.num_buckets, c.encoder_attention_heads), (None, "heads"))
    buckets = relative_position_buckets(n, n, c.num_buckets, c.max_distance)
    position_bias = jnp.transpose(jnp.take(table, buckets, axis=0), (2, 0, 1))  # (H, T, T)
    for i in range(c.encoder_layers):
      x = _Layer(c, self.dtype, name=f"layers_{i}")(x, position_bias)
    return x


def fold_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray) -> np.ndarray:
  """torch weight_norm(dim=2): w = g * v / ||v||, the norm over every dim except dim 2."""
  norm = np.sqrt(np.sum(np.square(weight_v.astype(np.float64)), axis=(0, 1), keepdims=True))
  return (weight_g * weight_v / norm).astype(np.float32)
