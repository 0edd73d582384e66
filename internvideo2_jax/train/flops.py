"""Analytic training FLOPs (MaxText convention): 2 FLOPs per multiply-add of every matmul,
attention score/value products included, forward x 3 for forward + backward; embedding
lookups, norms and softmax are not counted. MFU = achieved FLOP/s / peak of the device."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_tflops: float   # dense bf16
  hbm_gb: float        # memory per chip (GB = 1e9 bytes, as the vendors state it)
  hbm_tbps: float      # memory bandwidth, TB/s


# TPUs by the exact `device_kind` they report (v5p says "TPU v5", v5e "TPU v5 lite", v6e
# "TPU v6 lite"); GPUs by model name inside their kind ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
TPU_CHIPS = {
    "TPU v4": Chip("v4", 275.0, 32.0, 1.2),
    "TPU v5 lite": Chip("v5e", 197.0, 16.0, 0.82),
    "TPU v5e": Chip("v5e", 197.0, 16.0, 0.82),
    "TPU v5": Chip("v5p", 459.0, 95.0, 2.76),
    "TPU v5p": Chip("v5p", 459.0, 95.0, 2.76),
    "TPU v6 lite": Chip("v6e", 918.0, 32.0, 1.64),
    "TPU v6e": Chip("v6e", 918.0, 32.0, 1.64),
}
GPU_CHIPS = (  # the first name found in the kind wins, so longer names come first
    ("H100 PCIe", Chip("H100 PCIe", 756.0, 80.0, 2.0)),
    ("H100", Chip("H100", 989.0, 80.0, 3.35)),
    ("H200", Chip("H200", 989.0, 141.0, 4.8)),
    ("H800", Chip("H800", 989.0, 80.0, 3.35)),
    ("A100", Chip("A100", 312.0, 80.0, 2.0)),
    ("L4", Chip("L4", 121.0, 24.0, 0.3)),
)


def chip(device_kind: str) -> Optional[Chip]:
  """Peak FLOP/s, HBM and bandwidth of one chip from its `device_kind` (None if unknown)."""
  kind = device_kind.strip()
  if kind in TPU_CHIPS:
    return TPU_CHIPS[kind]
  for name, c in GPU_CHIPS:
    if name.lower() in kind.lower():
      return c
  return None


def vit_forward(tokens: int, dim: int, depth: int, mlp: int, patch_in: int, pool_dim: int = 0) -> float:
  """Per clip: patch embedding, `depth` blocks over `tokens` tokens, the pooling head."""
  per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * mlp) + 4 * tokens * tokens * dim
  embed = 2 * tokens * patch_in * dim
  pool = 2 * tokens * 2 * dim * dim + 2 * 3 * dim * dim + 2 * dim * pool_dim if pool_dim else 0
  return depth * per_layer + embed + pool


def classifier_train_flops(v, *, full: bool) -> float:
  """Per clip of a fine-tuning step: the encoder forward (all tokens) + the backward (2x) when
  the encoder trains; a probe's frozen encoder runs forward only."""
  d = v.embed_dim
  tokens = 1 + v.num_frames // v.tubelet_size * (v.img_size // v.patch_size) ** 2
  f = vit_forward(tokens, d, v.depth, int(d * v.mlp_ratio), v.in_chans * v.tubelet_size * v.patch_size ** 2,
                  v.clip_embed_dim)
  return 3.0 * f if full else f


def bert_forward(length: int, hidden: int, layers: int, inter: int, memory: int = 0,
                 memory_width: int = 0) -> float:
  """Per sequence; with `memory` > 0 each layer also cross-attends to `memory` tokens."""
  per = 2 * length * (4 * hidden * hidden + 2 * hidden * inter) + 4 * length * length * hidden
  if memory:
    per += 2 * length * 2 * hidden * hidden + 2 * memory * 2 * memory_width * hidden + 4 * length * memory * hidden
  return layers * per


def stage2_train_flops(cfg, *, batch: int, frames: int, visible_tokens: int, text_len: int) -> float:
  """FLOPs of one stage-2 training step (all objectives with non-zero weight)."""
  v, t = cfg.model.vision, cfg.model.text
  d, depth = v.embed_dim, v.depth
  mlp = int(d * v.mlp_ratio)
  tokens = 1 + visible_tokens
  patch_in = v.in_chans * v.tubelet_size * v.patch_size ** 2
  f = vit_forward(tokens, d, depth, mlp, patch_in, v.clip_embed_dim)
  h, n_text, n_fus = t.hidden_size, t.fusion_layer, t.num_layers - t.fusion_layer
  text = bert_forward(text_len, h, n_text, t.intermediate_size)
  fusion = bert_forward(text_len, h, n_fus, t.intermediate_size, tokens, d)
  per_example = f + text
  w = cfg.train.loss
  if w.get("vtm", 0):
    per_example += 3 * fusion
  if w.get("mlm", 0):
    p = int(cfg.train.get("mlm_max_positions", 0)) or text_len
    per_example += text + fusion + 2 * p * (h * h + h * t.vocab_size)
  return 3.0 * batch * per_example


def llm_forward(tokens: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                inter: int) -> float:
  """Per sequence of a Llama-family decoder (causal attention counted whole, as XLA computes it)."""
  proj = 2 * tokens * hidden * head_dim * (2 * heads + 2 * kv_heads)
  mlp = 2 * tokens * 3 * hidden * inter
  attn = 4 * tokens * tokens * heads * head_dim
  return layers * (proj + mlp + attn)


def stage3_train_flops(mc, *, batch: int, text_len: int, head_tokens: int, instruction_len: int = 0) -> float:
  """FLOPs of one stage-3 step: ViT + QFormer + LLM forward, the LM head at `head_tokens`
  positions, times 3 (forward + backward through activations and weights). With HD tiling
  pass batch = examples x clips (the LLM part is then counted per clip: an upper bound)."""
  v, q, m = mc.vision, mc.qformer, mc.llm
  tokens = 1 + (v.num_frames // v.tubelet_size) * (v.img_size // v.patch_size) ** 2
  vision = vit_forward(tokens, v.embed_dim, v.depth, int(v.embed_dim * v.mlp_ratio),
                       v.in_chans * v.tubelet_size * v.patch_size ** 2)
  nq = int(q.num_query_tokens) + int(q.extra_query_tokens)
  cross_layers = (int(q.num_layers) + int(q.cross_attention_freq) - 1) // int(q.cross_attention_freq)
  qformer = (bert_forward(nq + instruction_len, q.hidden_size, q.num_layers, q.intermediate_size)
             + bert_forward(nq, q.hidden_size, cross_layers, 0, tokens, v.embed_dim))
  head_dim = int(m.get("head_dim", 0)) or m.hidden_size // m.num_heads
  llm = llm_forward(text_len, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, head_dim,
                    m.intermediate_size) + 2 * head_tokens * m.hidden_size * m.vocab_size
  return 3.0 * batch * (vision + qformer + 2 * nq * q.hidden_size * m.hidden_size + llm)


def peak_flops(override_tflops: Optional[float] = None, devices=None) -> Optional[float]:
  """Peak FLOP/s of all devices, from the device kind (None on CPU / unknown)."""
  devices = jax.devices() if devices is None else devices
  if override_tflops:
    return override_tflops * 1e12 * len(devices)
  c = chip(devices[0].device_kind)
  return c.peak_tflops * 1e12 * len(devices) if c else None
