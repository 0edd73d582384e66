"""The InternVideo2 video ViT (stage-2 / CLIP / classifier vision tower), exactly.

    video (B, T, H, W, C) -> patch_embed (Conv3d tubelet) -> [cls; tokens] + pos_embed
    -> drop masked tokens -> blocks (pre-RMSNorm, qk-norm, LayerScale, GELU MLP) -> no final norm
    -> clip_projector (attention pooling, query = mean of all tokens)

Blocks run under `nn.scan` (parameters carry a leading `layers` axis) with an optional named
`nn.remat` policy, so compile time does not grow with depth. The outputs of any set of layers
(for distillation) are written into a fixed (K, ...) buffer carried through the scan, so memory
grows with K, not with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from internvideo2_jax.config_utils import preset, with_defaults
from internvideo2_jax.models import remat
from internvideo2_jax.models.embeddings import PatchEmbed, sincos_2d, sincos_3d, sincos_1d
from internvideo2_jax.models.heads import AttentionPoolingBlock
from internvideo2_jax.models.layers import (Linear, LayerScale, Mlp, RMSNorm, drop_path,
                                            param_with_axes)
from internvideo2_jax.ops import platform
from internvideo2_jax.ops.attention import dot_product_attention

# ----------------------------------------------------------------------------- presets

# Official sizes (reference §1.2). Keys use the official argument names.
_SIZES = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
                 attn_pool_num_heads=4, clip_embed_dim=32, num_frames=4, drop_path_rate=0.0),
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.05),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.05),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.05),
    "1B": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, drop_path_rate=0.25),
    "6B": dict(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, drop_path_rate=0.3),
}

_DEFAULTS = dict(
    img_size=224, patch_size=14, in_chans=3, embed_dim=1408, depth=40, num_heads=16,
    mlp_ratio=4.0, num_frames=8, tubelet_size=1, qkv_bias=False, qk_normalization=True,
    init_values=1e-5, layerscale_force_fp32=True, attn_pool=True, attn_pool_num_heads=16,
    clip_embed_dim=768, sep_pos_embed=False, sep_image_video_pos_embed=False,
    drop_path_rate=0.0,
    # Released checkpoints were trained with flash-attn's FusedMLP = tanh GELU; the official CPU
    # reference path uses exact erf. True reproduces training, False the CPU path.
    gelu_approximate=True,
    dtype="float32",          # compute dtype; parameters are always fp32
    remat_policy="auto",      # see models/remat.py ("auto": the platform's measured choice)
    scan_unroll="auto",       # blocks per scan iteration (>= depth: fully unrolled, compile grows)
    attn_impl="auto",         # see ops/attention.py
    return_layers=(),         # block indices (negatives count from the end) to return
)


def vit_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """Config of a preset (`tiny`, `S`, `B`, `L`, `1B`, `6B`) with overrides applied."""
  key = {k.lower(): k for k in _SIZES}.get(str(name).lower(), str(name))
  cfg = preset("ViT", _SIZES, _DEFAULTS, key, overrides)
  cfg["return_layers"] = tuple(cfg["return_layers"])
  return ml_collections.ConfigDict(cfg)


def last_layers(depth: int, k: int, interval: float = 1) -> tuple[int, ...]:
  """The official student return indices `depth - int(i * interval) - 1`, ascending."""
  return tuple(sorted(depth - int(i * interval) - 1 for i in range(k)))


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Validated, hashable view of a ViT config (what the modules actually read)."""
  img_size: int
  patch_size: int
  in_chans: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_hidden: int
  num_frames: int
  tubelet_size: int
  qkv_bias: bool
  qk_normalization: bool
  init_values: float
  layerscale_force_fp32: bool
  attn_pool: bool
  attn_pool_num_heads: int
  clip_embed_dim: int
  sep_pos_embed: bool
  sep_image_video_pos_embed: bool
  drop_path_rate: float
  gelu_approximate: bool
  dtype: Any
  remat_policy: str
  attn_impl: str
  return_layers: tuple[int, ...]
  scan_unroll: int | str = "auto"

  @property
  def grid(self) -> tuple[int, int, int]:
    g = self.img_size // self.patch_size
    return self.num_frames // self.tubelet_size, g, g

  @property
  def num_patches(self) -> int:
    t, h, w = self.grid
    return t * h * w

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | ml_collections.ConfigDict) -> "ViTSpec":
    c = with_defaults("ViT", config, _DEFAULTS)

    def need(ok, msg):
      if not ok:
        raise ValueError(f"invalid ViT config: {msg}")

    d, heads = int(c["embed_dim"]), int(c["num_heads"])
    need(d > 0 and heads > 0 and d % heads == 0, f"embed_dim={d} must be divisible by num_heads={heads}")
    need(d % int(c["attn_pool_num_heads"]) == 0,
         f"embed_dim={d} must be divisible by attn_pool_num_heads={c['attn_pool_num_heads']}")
    need(d % 16 == 0 or c["sep_pos_embed"], f"embed_dim={d} must be divisible by 16 (3-D sin-cos table)")
    need(int(c["img_size"]) % int(c["patch_size"]) == 0,
         f"img_size={c['img_size']} must be divisible by patch_size={c['patch_size']}")
    need(int(c["num_frames"]) % int(c["tubelet_size"]) == 0,
         f"num_frames={c['num_frames']} must be divisible by tubelet_size={c['tubelet_size']}")
    need(c["dtype"] in _DTYPES, f"dtype={c['dtype']!r} must be one of {list(_DTYPES)}")
    need(0.0 <= float(c["drop_path_rate"]) < 1.0, f"drop_path_rate={c['drop_path_rate']} must be in [0, 1)")
    need(not (c["sep_pos_embed"] and c["sep_image_video_pos_embed"]),
         "sep_pos_embed and sep_image_video_pos_embed are exclusive")
    remat.check(c["remat_policy"])
    unroll = c["scan_unroll"]
    need(unroll == "auto" or (isinstance(unroll, int) and unroll >= 1),
         f"scan_unroll={unroll!r} must be 'auto' or an integer >= 1")
    depth = int(c["depth"])
    layers = []
    for i in c["return_layers"]:
      need(-depth <= int(i) < depth, f"return_layers entry {i} is outside [-{depth}, {depth})")
      layers.append(int(i) % depth)
    need(len(set(layers)) == len(layers), f"return_layers {tuple(c['return_layers'])} repeats a layer")
    return cls(
        img_size=int(c["img_size"]), patch_size=int(c["patch_size"]), in_chans=int(c["in_chans"]),
        embed_dim=d, depth=depth, num_heads=heads, mlp_hidden=int(d * float(c["mlp_ratio"])),
        num_frames=int(c["num_frames"]), tubelet_size=int(c["tubelet_size"]),
        qkv_bias=bool(c["qkv_bias"]), qk_normalization=bool(c["qk_normalization"]),
        init_values=float(c["init_values"]), layerscale_force_fp32=bool(c["layerscale_force_fp32"]),
        attn_pool=bool(c["attn_pool"]), attn_pool_num_heads=int(c["attn_pool_num_heads"]),
        clip_embed_dim=int(c["clip_embed_dim"]), sep_pos_embed=bool(c["sep_pos_embed"]),
        sep_image_video_pos_embed=bool(c["sep_image_video_pos_embed"]),
        drop_path_rate=float(c["drop_path_rate"]), gelu_approximate=bool(c["gelu_approximate"]),
        dtype=_DTYPES[c["dtype"]], remat_policy=str(c["remat_policy"]),
        attn_impl=str(c["attn_impl"]), return_layers=tuple(layers),
        scan_unroll=unroll if unroll == "auto" else min(int(unroll), depth))


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
  """qkv (no bias) -> q/k RMSNorm over the full width -> softmax attention -> proj."""
  spec: ViTSpec

  @nn.compact
  def __call__(self, x, init_scale):
    s = self.spec
    hd = s.embed_dim // s.num_heads
    qkv = Linear((3, s.num_heads, hd), ("embed", None, "heads", "head_dim"), use_bias=s.qkv_bias,
                 dtype=s.dtype, name="qkv")(x)  # (B, N, 3, H, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if s.qk_normalization:
      q = RMSNorm(1e-6, n_axes=2, name="q_norm")(q).astype(s.dtype)
      k = RMSNorm(1e-6, n_axes=2, name="k_norm")(k).astype(s.dtype)
    q, k, v = (checkpoint_name(nn.with_logical_constraint(a, ("batch", "tokens", "act_heads", None)),
                               "qkv") for a in (q, k, v))
    o = dot_product_attention(q, k, v, implementation=s.attn_impl)
    o = checkpoint_name(o, "attn_context")
    y = Linear(s.embed_dim, ("heads", "head_dim", "embed"), n_in=2, dtype=s.dtype, name="proj")(
        o, init_scale)
    return checkpoint_name(y, "attn_out")


class Block(nn.Module):
  """One pre-norm block; also the scan body, carrying (x, intermediates buffer | None).

  Scanned inputs per layer: (drop-path rate, layer index, output slot or -1).
  """
  spec: ViTSpec
  deterministic: bool = True

  def setup(self):
    s = self.spec
    self.norm1 = RMSNorm(1e-6)
    self.attn = Attention(s)
    self.ls1 = LayerScale(s.init_values, s.layerscale_force_fp32)
    self.norm2 = RMSNorm(1e-6)
    self.mlp = Mlp(s.mlp_hidden, s.gelu_approximate, s.dtype)
    self.ls2 = LayerScale(s.init_values, s.layerscale_force_fp32)

  def residual_branch(self, x, rate, layer_id):
    s = self.spec
    # Official fix_init_weight: proj and fc2 of block i (1-based) start divided by sqrt(2 i).
    init_scale = jax.lax.rsqrt(2.0 * (layer_id + 1).astype(jnp.float32))
    rng1 = rng2 = None
    if not self.deterministic:
      rng1, rng2 = jax.random.split(self.make_rng("dropout"))
    y = self.ls1(self.attn(self.norm1(x).astype(s.dtype), init_scale))
    x = x + drop_path(y, rate, rng1, self.deterministic).astype(x.dtype)
    y = self.ls2(self.mlp(self.norm2(x).astype(s.dtype), init_scale))
    x = x + drop_path(y, rate, rng2, self.deterministic).astype(x.dtype)
    return nn.with_logical_constraint(x, ("batch", "tokens", "act_embed"))

  def __call__(self, carry, xs):
    x, buf = carry
    rate, layer_id, slot = xs
    fn = Block.residual_branch
    policy = remat.policy(self.spec.remat_policy)
    if policy is not None:
      fn = nn.remat(fn, policy=policy, prevent_cse=False)
    x = fn(self, x, rate, layer_id)
    if buf is not None:
      # Write x into slot `slot` only when this layer was requested; touching one (B, N, D)
      # slice keeps the update in place instead of rewriting the whole (K, B, N, D) buffer.
      i = jnp.maximum(slot, 0)
      cur = jax.lax.dynamic_index_in_dim(buf, i, keepdims=False)
      buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, x, cur), i, 0)
    return (x, buf), None


# ----------------------------------------------------------------------------- encoder


class VisionEncoder(nn.Module):
  """InternVideo2 vision encoder.

  Call: `model.apply(params, video, mask=None, train=False)` with `video` float
  (B, T, H, W, C), already normalised, and `mask` boolean (B, N) over patch tokens (True =
  dropped; every row must drop the same number). T == 1 with a video config is an image.

  Returns a dict:
    tokens        (B, 1 + N_visible, D) fp32, raw last-block output (no final norm), cls first
    pooled        (B, clip_embed_dim) fp32 attention-pooled embedding (if attn_pool)
    intermediates (K, B, 1 + N_visible, D) outputs of `return_layers` (if any), in that order
    visible_index (B, N_visible) int32 positions of the kept patch tokens (if mask is given)
    pool_attn     (B, 1 + N_visible) pooling attention over the tokens, heads averaged
  """
  config: Any

  @property
  def spec(self) -> ViTSpec:
    return ViTSpec.from_config(self.config)

  @nn.compact
  def __call__(self, video, mask=None, train: bool = False, num_visible: Optional[int] = None):
    s = self.spec
    if video.ndim != 5 or video.shape[-1] != s.in_chans:
      raise ValueError(f"video must be (B, T, H, W, {s.in_chans}), got {video.shape}")
    b, t, h, w, _ = video.shape
    if h % s.patch_size or w % s.patch_size:
      raise ValueError(f"frame size {h}x{w} is not divisible by patch_size={s.patch_size}")
    is_image = t == 1 and s.num_frames > 1
    if not is_image and t != s.num_frames:
      raise ValueError(
          f"video has {t} frames but the model is configured for num_frames={s.num_frames}; "
          "resize the position embedding for a new frame count with "
          "internvideo2_jax.convert.official.resize_vision_params (or pass T=1 for an image)")
    if is_image and s.tubelet_size != 1:
      raise ValueError(f"image input (T=1) needs tubelet_size=1, got {s.tubelet_size}")
    if (h // s.patch_size, w // s.patch_size) != s.grid[1:]:
      raise ValueError(
          f"frames of {h}x{w} give a {h // s.patch_size}x{w // s.patch_size} patch grid, the model "
          f"expects {s.grid[1]}x{s.grid[2]} (img_size={s.img_size}); resize the position embedding "
          "with internvideo2_jax.convert.official.resize_vision_params")

    x = PatchEmbed(s.embed_dim, s.patch_size, s.tubelet_size, s.dtype, name="patch_embed")(
        video.astype(s.dtype))  # (B, N, D)
    cls = param_with_axes(self, "cls_token", nn.initializers.normal(0.02), (1, 1, s.embed_dim),
                          (None, None, "embed"))
    pos = self._pos_embed(s, is_image)  # (1, 1 + N, D) fp32
    # The residual stream is fp32, as in the official code (cls / pos_embed are fp32 and
    # torch promotes), whatever the compute dtype of the matmuls.
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, s.embed_dim)), x.astype(jnp.float32)], 1)
    x = x + pos

    visible_index = None
    if mask is not None:
      x, visible_index = _drop_masked(x, mask, num_visible)
    x = nn.with_logical_constraint(x, ("batch", "tokens", "act_embed"))

    x, inter = self._blocks(s, x, train)
    out = {"tokens": x}
    if inter is not None:
      out["intermediates"] = inter
    if visible_index is not None:
      out["visible_index"] = visible_index
    if s.attn_pool:
      out["pooled"], out["pool_attn"] = AttentionPoolingBlock(
          s.attn_pool_num_heads, s.clip_embed_dim, s.dtype, s.attn_impl, name="clip_projector")(x)
    return out

  def _pos_embed(self, s: ViTSpec, is_image: bool):
    t, gh, gw = s.grid
    d = s.embed_dim
    axes = (None, None, "embed")
    if s.sep_pos_embed:
      spatial = param_with_axes(self, "pos_embed_spatial",
                                lambda *_: sincos_2d(d, gh, gw)[None].astype(np.float32),
                                (1, gh * gw, d), axes)
      temporal = param_with_axes(self, "pos_embed_temporal",
                                 lambda *_: sincos_1d(d, np.arange(t))[None].astype(np.float32),
                                 (1, t, d), axes)
      cls = param_with_axes(self, "pos_embed_cls", nn.initializers.zeros, (1, 1, d), axes)
      if is_image:
        temporal = jnp.mean(temporal, axis=1, keepdims=True)
        t = 1
      grid = spatial[:, None, :, :] + temporal[:, :, None, :]  # (1, T, HW, D)
      return jnp.concatenate([cls, grid.reshape(1, t * gh * gw, d)], axis=1)
    pos = param_with_axes(self, "pos_embed", lambda *_: sincos_3d(d, t, gh, gw)[None],
                          (1, 1 + t * gh * gw, d), axes)
    if s.sep_image_video_pos_embed:
      img = param_with_axes(self, "img_pos_embed", lambda *_: sincos_3d(d, 1, gh, gw)[None],
                            (1, 1 + gh * gw, d), axes)
      if is_image:
        return img
    if is_image:
      # Official: the image table is [cls row, mean over frames of the video table].
      frames = pos[:, 1:].reshape(1, t, gh * gw, d)
      return jnp.concatenate([pos[:, :1], jnp.mean(frames, axis=1)], axis=1)
    return pos

  def _blocks(self, s: ViTSpec, x, train: bool):
    depth = s.depth
    rates = np.linspace(0.0, s.drop_path_rate, depth, dtype=np.float32)  # torch.linspace
    slots = np.full((depth,), -1, np.int32)
    for k, layer in enumerate(s.return_layers):
      slots[layer] = k
    buf = None
    if s.return_layers:
      buf = jnp.zeros((len(s.return_layers),) + x.shape, x.dtype)
    deterministic = not train or s.drop_path_rate == 0.0
    stack = nn.scan(Block, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=0, length=depth,
                    unroll=platform.resolve("scan_unroll", s.scan_unroll),
                    metadata_params={nn.PARTITION_NAME: "layers"})
    (x, buf), _ = stack(s, deterministic, name="blocks")(
        (x, buf), (jnp.asarray(rates), jnp.arange(depth, dtype=jnp.int32), jnp.asarray(slots)))
    return x, buf


def _drop_masked(x, mask, num_visible: Optional[int]):
  """Keeps cls and the unmasked patch tokens, in their original order (official x[~mask])."""
  b, n1, _ = x.shape
  n = n1 - 1
  if mask.shape != (b, n) or mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean (B={b}, N={n}) over patch tokens (True = dropped), "
                     f"got {mask.dtype} {mask.shape}")
  if num_visible is None:
    if isinstance(mask, jax.core.Tracer):
      raise ValueError("under jit the number of visible tokens must be static: pass "
                       "num_visible=... together with a traced mask")
    counts = np.asarray(~np.asarray(mask)).sum(axis=1)
    if counts.min() != counts.max():
      raise ValueError(f"every row of the mask must keep the same number of tokens, got "
                       f"{sorted(set(counts.tolist()))}")
    num_visible = int(counts[0])
  if not 0 <= num_visible <= n:
    raise ValueError(f"num_visible={num_visible} is outside [0, {n}]")
  # A stable sort puts the kept (False) positions first, in ascending order.
  index = jnp.argsort(mask, axis=1, stable=True)[:, :num_visible].astype(jnp.int32)
  kept = jnp.take_along_axis(x[:, 1:], index[:, :, None], axis=1)
  return jnp.concatenate([x[:, :1], kept], axis=1), index
