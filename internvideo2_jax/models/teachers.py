"""Frozen stage-1 teachers (reference §1.9).

* CLIP teacher (InternViT-6B of InternVL-C): the InternVideo2 block design (RMSNorm, qk-norm,
  LayerScale 0.1, no qkv bias) with attention pooling to 768, run per frame (a 2-D patch kernel
  is a (1, p, p) tubelet). Outputs the last K layers with the cls token averaged over frames and
  the patches laid out (B, T*HW), the pooled feature averaged over frames, both L2-normalised,
  and the pooling attention over patches per frame (heads averaged, cls column dropped).
* VideoMAE-v2 teacher: pre-LN blocks (LayerNorm eps 1e-6, exact GELU), qkv with q and v biases
  (k has none), tubelet 2, a fixed 1-D sinusoid table, no cls, 16 frames. Outputs the last K
  layers, the final one after the last LayerNorm, L2-normalised.

Teachers run in `jax.lax.stop_gradient` and are frozen in the optimizer (no state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from internvideo2_jax.config_utils import preset
from internvideo2_jax.models.embeddings import PatchEmbed
from internvideo2_jax.models.layers import LayerNorm, Linear, gelu
from internvideo2_jax.models.vit import VisionEncoder, last_layers, vit_preset
from internvideo2_jax.ops.attention import dot_product_attention
from internvideo2_jax.ops.losses import l2_normalize


def clip_teacher_preset(name: str = "6B", *, return_layers: int = 6, **overrides) -> ml_collections.ConfigDict:
  """InternViT-6B CLIP teacher (`6B`) or a small one (`tiny`); a per-frame image ViT config."""
  base = {"6B": dict(), "tiny": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4,
                                     attn_pool_num_heads=4, clip_embed_dim=24)}
  if name not in base:
    raise ValueError(f"unknown CLIP teacher preset {name!r}; choose from {list(base)}")
  size = "6B" if name == "6B" else "tiny"
  cfg = vit_preset(size, num_frames=1, tubelet_size=1, init_values=0.1, drop_path_rate=0.0, **base[name])
  cfg.return_layers = last_layers(cfg.depth, return_layers)
  cfg.update(overrides)
  return cfg


_MAE_PRESETS = {
    "g": dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
    "tiny": dict(img_size=32, patch_size=8, embed_dim=40, depth=3, num_heads=4, mlp_ratio=2.0),
}
_MAE_DEFAULTS = dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                     mlp_ratio=48 / 11, num_frames=16, tubelet_size=2, return_layers=4,
                     dtype="float32", attn_impl="auto")


def mae_teacher_preset(name: str = "g", **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(preset("VideoMAE teacher", _MAE_PRESETS, _MAE_DEFAULTS, name, overrides))


def sinusoid_table(n: int, d: int) -> np.ndarray:
  """VideoMAE's fixed table: angle pos / 10000^(2 (j // 2) / d), sin on even j, cos on odd j."""
  pos = np.arange(n, dtype=np.float64)[:, None]
  j = np.arange(d)[None, :]
  angle = pos / np.power(10000, 2 * (j // 2) / d)
  return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class CLIPTeacher(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, video):  # (B, T, H, W, C), normalised with the CLIP statistics
    b, t = video.shape[:2]
    out = VisionEncoder(self.config, name="encoder")(video.reshape((b * t, 1) + video.shape[2:]))
    inter = out["intermediates"]                                    # (K, B*T, 1+HW, D)
    k, _, n1, d = inter.shape
    inter = inter.reshape(k, b, t, n1, d)
    cls = jnp.mean(inter[:, :, :, :1], axis=2)                      # cls averaged over frames
    patches = inter[:, :, :, 1:].reshape(k, b, t * (n1 - 1), d)     # (K, B, T*HW, D)
    tokens = l2_normalize(jnp.concatenate([cls, patches], axis=2))
    pooled = l2_normalize(jnp.mean(out["pooled"].reshape(b, t, -1), axis=1))
    attn = out["pool_attn"][:, 1:]                                  # (B*T, HW), cls column dropped
    return {"tokens": tokens, "pooled": pooled, "attn": attn}


@dataclasses.dataclass(frozen=True)
class _MAESpec:
  embed_dim: int
  num_heads: int
  mlp_hidden: int
  dtype: Any
  attn_impl: str


class _MAEBlock(nn.Module):
  spec: _MAESpec

  @nn.compact
  def __call__(self, carry, slot):
    """carry = (x, buffer of the last K outputs); `slot` >= 0 writes this layer's output."""
    x, buf = carry
    s = self.spec
    h, hd = s.num_heads, s.embed_dim // s.num_heads
    y = LayerNorm(1e-6, name="norm1")(x).astype(s.dtype)
    qkv = Linear((3, h, hd), ("embed", None, "heads", "head_dim"), use_bias=False, dtype=s.dtype,
                 name="qkv")(y)
    q_bias = self.param("q_bias", nn.initializers.zeros, (h, hd), jnp.float32)
    v_bias = self.param("v_bias", nn.initializers.zeros, (h, hd), jnp.float32)
    q, k, v = qkv[:, :, 0] + q_bias.astype(s.dtype), qkv[:, :, 1], qkv[:, :, 2] + v_bias.astype(s.dtype)
    o = dot_product_attention(q, k, v, implementation=s.attn_impl)
    x = x + Linear(s.embed_dim, ("heads", "head_dim", "embed"), n_in=2, dtype=s.dtype, name="proj")(o)
    y = LayerNorm(1e-6, name="norm2")(x).astype(s.dtype)
    y = gelu(Linear(s.mlp_hidden, ("embed", "mlp"), dtype=s.dtype, name="fc1")(y), approximate=False)
    x = (x + Linear(s.embed_dim, ("mlp", "embed"), dtype=s.dtype, name="fc2")(y)).astype(jnp.float32)
    i = jnp.maximum(slot, 0)
    cur = jax.lax.dynamic_index_in_dim(buf, i, keepdims=False)
    buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, x, cur), i, 0)
    return (x, buf), None


class MAETeacher(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, video):  # (B, 16, H, W, C), ImageNet-normalised
    c = self.config
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.dtype]
    spec = _MAESpec(c.embed_dim, c.num_heads, int(c.embed_dim * c.mlp_ratio), dtype, c.attn_impl)
    x = PatchEmbed(c.embed_dim, c.patch_size, c.tubelet_size, dtype, name="patch_embed")(video.astype(dtype))
    x = x.astype(jnp.float32) + sinusoid_table(x.shape[1], c.embed_dim)[None]
    stack = nn.scan(_MAEBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=0, length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    k = int(c.return_layers)
    slots = jnp.asarray(np.arange(c.depth) - (c.depth - k), jnp.int32)  # -1 before the last K
    buf = jnp.zeros((k,) + x.shape, jnp.float32)
    (x, buf), _ = stack(spec, name="blocks")((x, buf), slots)
    buf = buf.at[-1].set(LayerNorm(1e-6, name="norm")(buf[-1]))       # the final one after the norm
    return {"tokens": l2_normalize(buf)}                              # (K, B, N, D)
