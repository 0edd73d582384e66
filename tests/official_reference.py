"""An independent float64 numpy transcription of the official vision-encoder forward.

It reads weights in the *official* state-dict layout and follows the PyTorch code path step by
step (Conv3d on [B, C, T, H, W], x[~mask], qkv reshape/permute, q_norm on the flattened heads,
AttentionPoolingBlock), so a test comparing it with the Flax model checks the converter and the
model together. It shares no code with the package.
"""

import math

import numpy as np


def _rms(x, w, eps=1e-6):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  from math import erf
  return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def forward(sd, video_bcthw, *, num_heads, depth, pool_heads, tubelet, patch, gelu_approximate,
            mask=None, image_mean_pos=False):
  """Returns (x_vis (B, 1+Nvis, D), x_pool (B, clip_dim)). `mask`: (B, 1+N) with cls column."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(video_bcthw, np.float64)
  b, c, t, h, w = x.shape
  wgt = sd["patch_embed.proj.weight"]  # (D, C, tt, p, p)
  d = wgt.shape[0]
  tt, p = tubelet, patch
  # Conv3d with kernel == stride: one dot product per (t', h', w') cell.
  cells = x.reshape(b, c, t // tt, tt, h // p, p, w // p, p)
  y = np.einsum("bcTtHpWq,dctpq->bdTHW", cells, wgt) + sd["patch_embed.proj.bias"][None, :, None, None, None]
  y = y.reshape(b, d, -1).transpose(0, 2, 1)  # flatten(3).permute -> B, T*HW, D
  cls = np.broadcast_to(sd["cls_token"], (b, 1, d))
  x = np.concatenate([cls, y], axis=1)
  pos = sd["pos_embed"]
  if image_mean_pos:
    n_t = sd["pos_embed"].shape[1] - 1
    hw = y.shape[1]
    pos = np.concatenate([pos[:, :1], pos[:, 1:].reshape(1, n_t // hw, hw, d).mean(1)], axis=1)
  x = x + pos
  if mask is not None:
    x = x[~mask].reshape(b, -1, d)
  hd = d // num_heads
  for i in range(depth):
    g = lambda k: sd[f"blocks.{i}.{k}"]
    n = x.shape[1]
    hx = _rms(x, g("norm1.weight"))
    qkv = (hx @ g("attn.qkv.weight").T).reshape(b, n, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
    q = _rms(q.transpose(0, 2, 1, 3).reshape(b, n, d), g("attn.q_norm.weight")).reshape(
        b, n, num_heads, hd).transpose(0, 2, 1, 3)
    k = _rms(k.transpose(0, 2, 1, 3).reshape(b, n, d), g("attn.k_norm.weight")).reshape(
        b, n, num_heads, hd).transpose(0, 2, 1, 3)
    attn = _softmax((q * hd ** -0.5) @ k.transpose(0, 1, 3, 2))
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    o = o @ g("attn.proj.weight").T + g("attn.proj.bias")
    x = x + o * g("ls1.gamma")
    hx = _rms(x, g("norm2.weight"))
    m = _gelu(hx @ g("mlp.fc1.weight").T + g("mlp.fc1.bias"), gelu_approximate)
    m = m @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    x = x + m * g("ls2.gamma")
  # AttentionPoolingBlock
  cp = lambda k: sd[f"clip_projector.{k}"]
  xq = _ln(x.mean(1, keepdims=True), cp("norm1_q.weight"), cp("norm1_q.bias"))
  xk = _ln(x, cp("norm1_k.weight"), cp("norm1_k.bias"))
  xv = _ln(x, cp("norm1_v.weight"), cp("norm1_v.bias"))
  phd = d // pool_heads
  q = (xq @ cp("cross_attn.q.weight").T + cp("cross_attn.q_bias")).reshape(b, 1, pool_heads, phd).transpose(0, 2, 1, 3)
  k = (xk @ cp("cross_attn.k.weight").T + cp("cross_attn.k_bias")).reshape(b, -1, pool_heads, phd).transpose(0, 2, 1, 3)
  v = (xv @ cp("cross_attn.v.weight").T + cp("cross_attn.v_bias")).reshape(b, -1, pool_heads, phd).transpose(0, 2, 1, 3)
  attn = _softmax((q * phd ** -0.5) @ k.transpose(0, 1, 3, 2))
  o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, 1, d)
  pooled = (o @ cp("cross_attn.proj.weight").T + cp("cross_attn.proj.bias"))[:, 0]
  return x, pooled


def random_state_dict(rng, *, d, depth, mlp_hidden, clip_dim, c=3, tubelet=1, patch=8, n_tokens=64,
                      scale=0.2):
  """Official-layout random weights with non-trivial norms and LayerScale (so every term counts)."""
  r = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
  one = lambda *s: (1 + rng.standard_normal(s) * 0.1).astype(np.float32)
  sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + n_tokens, d),
        "patch_embed.proj.weight": r(d, c, tubelet, patch, patch), "patch_embed.proj.bias": r(d)}
  for i in range(depth):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": one(d), p + "attn.qkv.weight": r(3 * d, d),
               p + "attn.q_norm.weight": one(d), p + "attn.k_norm.weight": one(d),
               p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d), p + "ls1.gamma": one(d),
               p + "norm2.weight": one(d), p + "mlp.fc1.weight": r(mlp_hidden, d),
               p + "mlp.fc1.bias": r(mlp_hidden), p + "mlp.fc2.weight": r(d, mlp_hidden),
               p + "mlp.fc2.bias": r(d), p + "ls2.gamma": one(d)})
  cp = "clip_projector."
  for n in "qkv":
    sd.update({f"{cp}norm1_{n}.weight": one(d), f"{cp}norm1_{n}.bias": r(d),
               f"{cp}cross_attn.{n}.weight": r(d, d), f"{cp}cross_attn.{n}_bias": r(d)})
  sd.update({cp + "cross_attn.proj.weight": r(clip_dim, d), cp + "cross_attn.proj.bias": r(clip_dim)})
  return sd
