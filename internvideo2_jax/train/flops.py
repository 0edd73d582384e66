"""Analytic training FLOPs (MaxText convention): 2 FLOPs per multiply-add of every matmul,
attention score/value products included, forward x 3 for forward + backward; embedding
lookups, norms and softmax are not counted. MFU = achieved FLOP/s / peak of the device."""

from __future__ import annotations

from typing import Optional

import jax

# Dense bf16 peak TFLOP/s per chip.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0,
               "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0}


def vit_forward(tokens: int, dim: int, depth: int, mlp: int, patch_in: int, pool_dim: int = 0) -> float:
  """Per clip: patch embedding, `depth` blocks over `tokens` tokens, the pooling head."""
  per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * mlp) + 4 * tokens * tokens * dim
  embed = 2 * tokens * patch_in * dim
  pool = 2 * tokens * 2 * dim * dim + 2 * 3 * dim * dim + 2 * dim * pool_dim if pool_dim else 0
  return depth * per_layer + embed + pool


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
    p = cfg.train.mlm_max_positions
    per_example += text + fusion + 2 * p * (h * h + h * t.vocab_size)
  return 3.0 * batch * per_example


def peak_flops(override_tflops: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s of all devices, from the device kind (None on CPU / unknown)."""
  if override_tflops:
    return override_tflops * 1e12 * jax.device_count()
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tf * 1e12 * jax.device_count()
  return None
