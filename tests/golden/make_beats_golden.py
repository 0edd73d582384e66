"""Writes beats.npz: the official BEATs forward (as InternVideo2 calls it) on a tiny random config.

Run once with a PyTorch environment (torch + numpy only):
  /tmp/torchvenv/bin/python tests/golden/make_beats_golden.py
The test (tests/test_beats_golden.py) imports the stored official-layout state dict through
convert/beats.py and runs our Flax AudioEncoder without torch.

The torch code below is an independent transcription of Microsoft unilm `beats/BEATs.py` and
`beats/backbone.py` (TransformerEncoder, TransformerSentenceEncoderLayer, MultiheadAttention),
restricted to the path InternVideo2's `BEATs.forward(fbank)` takes: eval mode (no dropout, no
layerdrop), `padding_mask=None`, self-attention, post-LN with deep norm, relative position buckets,
GRU-gated relative bias, the q / 32 ... x 32 attention stabilisation, and the weight-normed
positional conv (`torch.nn.utils.weight_norm(dim=2)`, so the state dict carries `weight_g` /
`weight_v` exactly as the official checkpoints do). It keeps the official operation order
(T x B x C layout, bsz * heads folding, the alpha trick) rather than a simplified equivalent.

The npz holds:
  sd/<official key>    every tensor of the official state dict (fp16-representable values, stored
                       fp16 to keep the file small; the shared relative_attention_bias under every
                       layer, as the official state_dict lists it)
  config_json          the BEATsConfig fields
  fbank                (2, 998, 64) input (fp16 values); sample 1 has a zero tail from frame 700
  out                  (2, 248, D) encoder output = what InternVideo2's BEATs.forward returns
  after_proj           post_extract_proj output (encoder input)
  after_pos_conv       after x + GELU(pos_conv(x)) and encoder.layer_norm (layer 0 input)
  after_layer0         output of encoder layer 0
  bucket_rel, bucket_ids  relative-position buckets for key - query = bucket_rel
The reference runs in float64 (the bucket log stays float32, as the official `.float()` forces),
so the stored activations are the exact answer; the script also prints the float32 torch error.
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CFG = dict(
    input_patch_size=16, embed_dim=32, conv_bias=False,
    encoder_layers=3, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
    activation_fn="gelu", layer_norm_first=False, deep_norm=True,
    conv_pos=16, conv_pos_groups=4,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
)


# ----------------------------------------------------------------------------------------------
# official modules (eval path), re-implemented
# ----------------------------------------------------------------------------------------------

class SamePad(nn.Module):
  def __init__(self, kernel_size):
    super().__init__()
    self.remove = 1 if kernel_size % 2 == 0 else 0

  def forward(self, x):
    return x[:, :, :-self.remove] if self.remove > 0 else x


def relative_positions_bucket(rel, num_buckets, max_distance):
  """MultiheadAttention._relative_positions_bucket(bidirectional=True)."""
  buckets = 0
  num_buckets = num_buckets // 2
  buckets = buckets + (rel > 0).to(torch.long) * num_buckets
  rel = torch.abs(rel)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).to(torch.long)
  large = torch.min(large, torch.full_like(large, num_buckets - 1))
  return buckets + torch.where(is_small, rel, large)


class MultiheadAttention(nn.Module):
  def __init__(self, dim, heads, has_rel, num_buckets, max_distance, gru_rel_pos):
    super().__init__()
    self.embed_dim, self.num_heads = dim, heads
    self.head_dim = dim // heads
    self.scaling = self.head_dim ** -0.5
    self.num_buckets, self.max_distance = num_buckets, max_distance
    self.has_relative_attention_bias = has_rel
    if has_rel:
      self.relative_attention_bias = nn.Embedding(num_buckets, heads)
    self.k_proj = nn.Linear(dim, dim)
    self.v_proj = nn.Linear(dim, dim)
    self.q_proj = nn.Linear(dim, dim)
    self.out_proj = nn.Linear(dim, dim)
    self.gru_rel_pos = gru_rel_pos
    if gru_rel_pos:
      self.grep_linear = nn.Linear(self.head_dim, 8)
      self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

  def compute_bias(self, q_len, k_len):
    rel = torch.arange(k_len, dtype=torch.long)[None, :] - torch.arange(q_len, dtype=torch.long)[:, None]
    bucket = relative_positions_bucket(rel, self.num_buckets, self.max_distance)
    return self.relative_attention_bias(bucket).permute([2, 0, 1])     # (H, Tq, Tk)

  def forward(self, x, position_bias=None):
    tgt_len, bsz, embed_dim = x.size()
    src_len = tgt_len
    if self.has_relative_attention_bias and position_bias is None:
      position_bias = self.compute_bias(tgt_len, src_len)
      position_bias = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * self.num_heads, tgt_len, src_len)
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q * self.scaling
    alpha = 32
    q = q * (1 / alpha)
    q = q.contiguous().view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
    w = torch.bmm(q, k.transpose(1, 2))
    w = (w - w.max(dim=-1, keepdim=True)[0]) * alpha
    if position_bias is not None:
      rel = position_bias
      if self.gru_rel_pos:
        # the gate reads the unscaled q (scaling and 1/alpha undone); sigmoid of the 4-sums
        ql = q.view(bsz, self.num_heads, tgt_len, self.head_dim) * alpha / self.scaling
        b_, h_, l_, _ = ql.size()
        gate_a, gate_b = torch.sigmoid(self.grep_linear(ql).view(b_, h_, l_, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        rel = gate.view(bsz * self.num_heads, tgt_len, 1) * position_bias
      w = w + rel.view(w.size())
    p = F.softmax(w, dim=-1).type_as(w)
    o = torch.bmm(p, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return self.out_proj(o), position_bias                              # the *ungated* bias moves on


class EncoderLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    d = c["encoder_embed_dim"]
    self.self_attn = MultiheadAttention(d, c["encoder_attention_heads"], c["relative_position_embedding"],
                                        c["num_buckets"], c["max_distance"], c["gru_rel_pos"])
    self.self_attn_layer_norm = nn.LayerNorm(d)
    self.fc1 = nn.Linear(d, c["encoder_ffn_embed_dim"])
    self.fc2 = nn.Linear(c["encoder_ffn_embed_dim"], d)
    self.final_layer_norm = nn.LayerNorm(d)
    self.alpha = math.pow(2 * c["encoder_layers"], 1 / 4) if c["deep_norm"] else 1
    assert not c["layer_norm_first"]

  def forward(self, x, pos_bias):
    residual = x
    x, pos_bias = self.self_attn(x, pos_bias)
    x = self.self_attn_layer_norm(residual * self.alpha + x)
    residual = x
    x = self.fc2(F.gelu(self.fc1(x)))                                   # fairseq "gelu" = exact erf
    x = self.final_layer_norm(residual * self.alpha + x)
    return x, pos_bias


class TransformerEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    d = c["encoder_embed_dim"]
    conv = nn.Conv1d(d, d, kernel_size=c["conv_pos"], padding=c["conv_pos"] // 2, groups=c["conv_pos_groups"])
    conv = nn.utils.weight_norm(conv, name="weight", dim=2)
    self.pos_conv = nn.Sequential(conv, SamePad(c["conv_pos"]), nn.GELU())
    self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(c["encoder_layers"])])
    if c["relative_position_embedding"]:
      for i in range(1, c["encoder_layers"]):                           # share layer 0's table
        del self.layers[i].self_attn.relative_attention_bias
        self.layers[i].self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
    self.layer_norm = nn.LayerNorm(d)
    self.taps = {}

  def forward(self, x):
    x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    x = self.layer_norm(x)                                              # post-LN encoder
    self.taps["after_pos_conv"] = x
    x = x.transpose(0, 1)                                               # B T C -> T B C
    pos_bias = None
    for i, layer in enumerate(self.layers):
      x, pos_bias = layer(x, pos_bias)
      if i == 0:
        self.taps["after_layer0"] = x.transpose(0, 1)
    return x.transpose(0, 1)


class BEATs(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.post_extract_proj = (nn.Linear(c["embed_dim"], c["encoder_embed_dim"])
                              if c["embed_dim"] != c["encoder_embed_dim"] else None)
    p = c["input_patch_size"]
    self.patch_embedding = nn.Conv2d(1, c["embed_dim"], kernel_size=p, stride=p, bias=c["conv_bias"])
    self.encoder = TransformerEncoder(c)
    self.layer_norm = nn.LayerNorm(c["embed_dim"])

  def forward(self, fbank):
    """InternVideo2's BEATs.forward: precomputed fbank (B, T, F) -> encoder tokens."""
    f = self.patch_embedding(fbank.unsqueeze(1))
    f = f.reshape(f.shape[0], f.shape[1], -1).transpose(1, 2)
    f = self.layer_norm(f)
    if self.post_extract_proj is not None:
      f = self.post_extract_proj(f)
    self.encoder.taps["after_proj"] = f
    return self.encoder(f)


# ----------------------------------------------------------------------------------------------

def randomise(model, gen):
  """Non-trivial random weights on the fp16 grid (so fp16 storage is exact)."""
  def r(shape, std, mean=0.0):
    return (mean + std * torch.randn(shape, generator=gen)).half().float()

  with torch.no_grad():
    for name, t in model.named_parameters():  # shared table listed once here
      if name.endswith("weight_g"):
        val = (1.0 + 2.0 * torch.rand(t.shape, generator=gen)).half().float()
      elif name.endswith("weight_v"):
        val = r(t.shape, 1.0)
      elif name.endswith("relative_attention_bias.weight"):
        val = r(t.shape, 1.0)
      elif name.endswith("grep_a"):
        val = r(t.shape, 0.5, 1.0)
      elif "layer_norm" in name and name.endswith("weight"):
        val = r(t.shape, 0.2, 1.0)
      elif name.endswith("bias"):
        val = r(t.shape, 0.2)
      elif name.endswith("patch_embedding.weight"):
        val = r(t.shape, 1.0 / 16)
      elif name.endswith("grep_linear.weight"):
        val = r(t.shape, 1.0 / math.sqrt(t.shape[1]))
      else:                                                               # Linear (out, in)
        val = r(t.shape, 1.0 / math.sqrt(t.shape[1]))
      t.copy_(val)


def main():
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(1234)
  model = BEATs(CFG).eval()
  randomise(model, gen)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

  fbank = (0.7 * torch.randn(2, 998, 64, generator=gen)).half().float()
  fbank[1, 700:] = 0.0                                                    # zero (padded) tail

  with torch.no_grad():
    out32 = model(fbank).numpy()
    model64 = model.double()
    out = model64(fbank.double())
    taps = {k: v.float().numpy() for k, v in model64.encoder.taps.items()}
    out = out.float().numpy()
  print("torch fp32 vs fp64 max abs err:", np.abs(out32 - out).max(), " output absmax:", np.abs(out).max())

  n = 2000
  rel = torch.arange(-(n - 1), n, dtype=torch.long)
  bucket_ids = relative_positions_bucket(rel, CFG["num_buckets"], CFG["max_distance"])

  arrays = {f"sd/{k}": v.astype(np.float16) for k, v in sd.items()}
  assert all(np.array_equal(arrays[f"sd/{k}"].astype(np.float32), v) for k, v in sd.items())
  arrays.update(config_json=np.array(json.dumps(CFG)), fbank=fbank.numpy().astype(np.float16), out=out,
                bucket_rel=rel.numpy().astype(np.int16), bucket_ids=bucket_ids.numpy().astype(np.int16),
                **{k: v[:1] for k, v in taps.items()})                  # intermediates: sample 0 only
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beats.npz")
  np.savez_compressed(path, **arrays)
  print("wrote", path, os.path.getsize(path), "bytes;", len(sd), "state-dict keys")
  for k in sorted(sd):
    print(f"  {k} {tuple(sd[k].shape)}")


if __name__ == "__main__":
  main()
