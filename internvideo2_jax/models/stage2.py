"""The stage-2 video-text model (official `InternVideo2_Stage2_visual`).

    vision_encoder (VisionEncoder) -> x_vis (all visible tokens, cls first) + pooled (clip_embed_dim)
    text_encoder (BERT with fusion layers, encoder_width = vision embed_dim)
    vision_proj: pooled -> embed_dim;  text_proj: [CLS] of the text-mode output -> embed_dim
    itm_head: [CLS] of the fusion output -> 2 logits;  temp: raw temperature, used clamped

Methods are called through `apply(..., method=Stage2Model.encode_vision)` etc. so training and
retrieval run only what they need.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from internvideo2_jax.models.layers import Linear, param_with_axes
from internvideo2_jax.models.text import TextEncoder, TextSpec
from internvideo2_jax.models.vit import ViTSpec, VisionEncoder

TEMP_MIN, TEMP_MAX = 0.001, 0.5


def stage2_config(vision, text, *, embed_dim: int = 512, temp: float = 0.07) -> ml_collections.ConfigDict:
  """Model config: the text tower's encoder_width follows the vision width."""
  text = ml_collections.ConfigDict(text.to_dict() if hasattr(text, "to_dict") else dict(text))
  text.encoder_width = int(vision.embed_dim)
  return ml_collections.ConfigDict({"vision": vision, "text": text, "embed_dim": embed_dim,
                                    "temp": temp})


def masked_lm_logits(text_encoder, masked_ids, text_mask, memory, positions):
  """Text pass on the masked ids, fusion with the memory (all-ones memory mask, as the official
  mlm_loss), then the tied MLM head only at `positions` (the vocab projection is the cost)."""
  hidden = text_encoder.encode_text(masked_ids, text_mask)
  fused = text_encoder.fuse(hidden, text_mask, memory)
  return text_encoder.mlm_logits(jnp.take_along_axis(fused, positions[..., None], axis=1))


def clamp_temp(temp):
  return jnp.clip(temp, TEMP_MIN, TEMP_MAX)


class Stage2Model(nn.Module):
  config: Any
  deterministic: bool = True

  def setup(self):
    c = self.config
    vspec, tspec = ViTSpec.from_config(c.vision), TextSpec.from_config(c.text)
    if tspec.encoder_width != vspec.embed_dim:
      raise ValueError(f"text.encoder_width={tspec.encoder_width} must equal vision.embed_dim="
                       f"{vspec.embed_dim} (the fusion memory is the vision tokens)")
    if not vspec.attn_pool:
      raise ValueError("stage 2 needs the vision attention pool (vision.attn_pool=True)")
    self.vision_encoder = VisionEncoder(c.vision)
    self.text_encoder = TextEncoder(c.text, deterministic=self.deterministic)
    self.vision_proj = Linear(int(c.embed_dim), ("embed_out", "embed"), dtype=vspec.dtype)
    self.text_proj = Linear(int(c.embed_dim), ("embed", "embed_out"), dtype=tspec.dtype)
    self.itm_head = Linear(2, ("embed", None), dtype=tspec.dtype)
    self.temp = param_with_axes(self, "temp", nn.initializers.constant(float(c.temp)), (), ())

  def encode_vision(self, video, mask=None, num_visible: Optional[int] = None):
    """-> (x_vis (B, 1+N_vis, D) fp32, vision feature (B, embed_dim) fp32, not normalised)."""
    out = self.vision_encoder(video, mask=mask, train=not self.deterministic, num_visible=num_visible)
    return out["tokens"], self.vision_proj(out["pooled"]).astype(jnp.float32)

  def encode_text(self, ids, mask):
    """-> (text-mode hidden (B, L, H), text feature (B, embed_dim) fp32 from [CLS])."""
    hidden = self.text_encoder.encode_text(ids, mask)
    return hidden, self.text_proj(hidden[:, 0]).astype(jnp.float32)

  def itm_logits(self, text_hidden, text_mask, memory):
    """ITM logits (B, 2) from the fusion layers' [CLS] over a memory of vision tokens."""
    fused = self.text_encoder.fuse(text_hidden, text_mask, memory)
    return self.itm_head(fused[:, 0]).astype(jnp.float32)

  def mlm_logits(self, masked_ids, text_mask, memory, positions):
    """MLM logits (B, P, vocab) at `positions` (B, P): text pass on the masked ids, fusion with
    the memory (all-ones memory mask, as the official mlm_loss), then the tied head only where
    needed (the vocab projection is the expensive part)."""
    return masked_lm_logits(self.text_encoder, masked_ids, text_mask, memory, positions)

  def get_temp(self):
    return clamp_temp(self.temp)

  def __call__(self, video, ids, mask):
    """Touches every parameter (for init)."""
    x_vis, v = self.encode_vision(video)
    hidden, t = self.encode_text(ids, mask)
    itm = self.itm_logits(hidden, mask, x_vis)
    mlm = self.mlm_logits(ids, mask, x_vis, jnp.zeros((ids.shape[0], 1), jnp.int32))
    return v, t, itm, mlm, self.get_temp()
