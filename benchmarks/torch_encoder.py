"""A PyTorch transcription of the official InternVideo2 vision encoder's training path, for
benchmarks/encoder_step.py only (torch is a benchmark extra, never a runtime dependency).

It follows the official modules (`InternVideo2/multi_modality/models/backbones/internvideo2/
internvideo2.py`, the non-flash path every CPU run takes): Conv3d patch embedding on
(B, C, T, H, W) with token order (t, h, w), cls + a fixed position table, `x[~mask]`, pre-norm
blocks with fp32 RMSNorm, qkv without bias, q/k RMSNorm over the full width, `(q * scale) @ k^T`
softmax attention, LayerScale, fc1 -> GELU -> fc2, and the `AttentionPoolingBlock` (query =
mean of all tokens, separate LayerNorms, cross-attention with q/k/v biases). It loads the
official state-dict layout, so it computes the same function as our model given the same
weights (encoder_step.py checks the loss agrees).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


class LayerScale(nn.Module):
  def __init__(self, dim, init_values=1e-5, force_fp32=True):
    super().__init__()
    self.gamma = nn.Parameter(init_values * torch.ones(dim))
    self.force_fp32 = force_fp32

  def forward(self, x):
    if self.force_fp32:
      dtype = x.dtype
      return (x.float() * self.gamma.float()).to(dtype)
    return x * self.gamma


class Attention(nn.Module):
  def __init__(self, dim, num_heads, sdpa=False):
    super().__init__()
    self.num_heads, self.scale, self.sdpa = num_heads, (dim // num_heads) ** -0.5, sdpa
    self.qkv = nn.Linear(dim, dim * 3, bias=False)
    self.q_norm, self.k_norm = RMSNorm(dim), RMSNorm(dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    h = self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
    q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(b, n, h, c // h).transpose(1, 2)
    k = self.k_norm(k.transpose(1, 2).flatten(-2, -1)).view(b, n, h, c // h).transpose(1, 2)
    if self.sdpa:  # not the official CPU path; offered for comparison
      o = F.scaled_dot_product_attention(q, k, v)
    else:
      attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
      o = attn @ v
    return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden, approximate):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    self.approximate = "tanh" if approximate else "none"

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
  def __init__(self, dim, num_heads, hidden, approximate, sdpa):
    super().__init__()
    self.norm1, self.attn, self.ls1 = RMSNorm(dim), Attention(dim, num_heads, sdpa), LayerScale(dim)
    self.norm2, self.mlp, self.ls2 = RMSNorm(dim), Mlp(dim, hidden, approximate), LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
  def __init__(self, dim, num_heads, out_dim):
    super().__init__()
    self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
    self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
    self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
    self.proj = nn.Linear(dim, out_dim)

  def forward(self, x, k, v):
    b, n, c = x.shape
    h = self.num_heads
    q = F.linear(x, self.q.weight, self.q_bias).reshape(b, n, h, -1).permute(0, 2, 1, 3)
    k = F.linear(k, self.k.weight, self.k_bias).reshape(b, k.shape[1], h, -1).permute(0, 2, 1, 3)
    v = F.linear(v, self.v.weight, self.v_bias).reshape(b, v.shape[1], h, -1).permute(0, 2, 1, 3)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class AttentionPoolingBlock(nn.Module):
  def __init__(self, dim, num_heads, out_dim):
    super().__init__()
    self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
    self.cross_attn = CrossAttention(dim, num_heads, out_dim)

  def forward(self, x):
    q = self.norm1_q(x.mean(1, keepdim=True))
    return self.cross_attn(q, self.norm1_k(x), self.norm1_v(x)).squeeze(1)


class VisionEncoder(nn.Module):
  """`forward(video (B, C, T, H, W), mask (B, 1 + N) bool with a False cls column)` ->
  (x_vis (B, 1 + N_visible, D), pooled (B, clip_embed_dim))."""

  def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, mlp_hidden, num_frames,
               tubelet_size, attn_pool_num_heads, clip_embed_dim, gelu_approximate, sdpa=False):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv3d(3, embed_dim, (tubelet_size, patch_size, patch_size),
                                      stride=(tubelet_size, patch_size, patch_size))
    n = (num_frames // tubelet_size) * (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.register_buffer("pos_embed", torch.zeros(1, 1 + n, embed_dim))  # fixed sin-cos table
    self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_hidden, gelu_approximate, sdpa)
                                for _ in range(depth))
    self.clip_projector = AttentionPoolingBlock(embed_dim, attn_pool_num_heads, clip_embed_dim)

  def forward(self, video, mask):
    x = self.patch_embed.proj(video)                     # B x D x T x H x W
    x = x.flatten(3).permute(0, 2, 3, 1)                 # B x T x HW x D
    b, t, hw, d = x.shape
    x = x.reshape(b, t * hw, d)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
    x = x[~mask].reshape(b, -1, d)
    for blk in self.blocks:
      x = blk(x)
    return x, self.clip_projector(x)


def load_official(model: VisionEncoder, state_dict) -> None:
  """Official-layout numpy arrays (convert.official.vision_to_state_dict) into the module."""
  sd = {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if k != "pos_embed"] + ([] if "pos_embed" in sd else ["pos_embed"])
  if missing or unexpected:
    raise KeyError(f"torch encoder: missing {missing}, unexpected {unexpected}")
