"""The audio-visual stage-2 model (official `InternVideo2_Stage2_audiovisual`, 6B recipe).

    vision_encoder -> x_vis -> av_concat_vision_proj (Linear + LayerNorm) -> vision memory
    audio_encoder (BEATs) -> tokens -> av_concat_audio_proj (Linear + LayerNorm) -> audio memory
    pooled audio = mean of the BEATs tokens (before av_concat_audio_proj) -> audio_proj
    vision_proj(pooled vision), text_proj([CLS]), av_fusion(concat[audio_proj, vision_proj])
    text encoder fusion layers cross-attend to [audio memory; vision memory] (width av_concat_dim)
    itm_head (video-text), avtm_head (audio-video-text), atm_head (audio-text)
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from internvideo2_jax.models.audio import AudioEncoder
from internvideo2_jax.models.layers import LayerNorm, Linear, param_with_axes
from internvideo2_jax.models.stage2 import clamp_temp, masked_lm_logits
from internvideo2_jax.models.text import TextEncoder
from internvideo2_jax.models.vit import VisionEncoder


def av_stage2_config(vision, text, audio, *, contra_dim: int = 768, av_concat_dim: int = 768,
                     temp: float = 0.07) -> ml_collections.ConfigDict:
  text = ml_collections.ConfigDict(text.to_dict() if hasattr(text, "to_dict") else dict(text))
  text.encoder_width = int(av_concat_dim)  # the fusion memory is the projected concatenation
  return ml_collections.ConfigDict({"vision": vision, "text": text, "audio": audio,
                                    "contra_dim": contra_dim, "av_concat_dim": av_concat_dim, "temp": temp})


class _ProjNorm(nn.Module):
  """Sequential(Linear, LayerNorm) as `name/0`, `name/1` (official av_concat_*_proj)."""
  dim: int

  @nn.compact
  def __call__(self, x):
    return LayerNorm(1e-5, name="1")(Linear(self.dim, ("embed", "embed_out"), name="0")(x))


class Stage2AVModel(nn.Module):
  config: Any
  deterministic: bool = True

  def setup(self):
    c = self.config
    self.vision_encoder = VisionEncoder(c.vision)
    self.audio_encoder = AudioEncoder(c.audio)
    self.text_encoder = TextEncoder(c.text, deterministic=self.deterministic)
    cd, ad = int(c.contra_dim), int(c.av_concat_dim)
    self.vision_proj = Linear(cd, ("embed_out", "embed"))
    self.text_proj = Linear(cd, ("embed", "embed_out"))
    self.audio_proj = Linear(cd, ("embed", "embed_out"))
    self.av_concat_vision_proj = _ProjNorm(ad)
    self.av_concat_audio_proj = _ProjNorm(ad)
    self.av_fusion = Linear(cd, ("embed", "embed_out"))
    self.itm_head = Linear(2, ("embed", None))
    self.avtm_head = Linear(2, ("embed", None))
    self.atm_head = Linear(2, ("embed", None))
    self.temp = param_with_axes(self, "temp", nn.initializers.constant(float(c.temp)), (), ())

  def encode_vision(self, video, mask=None, num_visible: Optional[int] = None):
    """-> (vision memory (B, 1+N, av_concat_dim), vision feature (B, contra_dim))."""
    out = self.vision_encoder(video, mask=mask, train=not self.deterministic, num_visible=num_visible)
    return self.av_concat_vision_proj(out["tokens"]), self.vision_proj(out["pooled"])

  def encode_audio(self, fbank):
    """-> (audio memory (B, T_a, av_concat_dim), audio feature (B, contra_dim))."""
    tokens = self.audio_encoder(fbank)
    return self.av_concat_audio_proj(tokens), self.audio_proj(jnp.mean(tokens, axis=1))

  def encode_text(self, ids, mask):
    hidden = self.text_encoder.encode_text(ids, mask)
    return hidden, self.text_proj(hidden[:, 0])

  def av_feature(self, audio_feat, vision_feat):
    return self.av_fusion(jnp.concatenate([audio_feat, vision_feat], axis=-1))

  def match_logits(self, head: str, text_hidden, text_mask, memory):
    fused = self.text_encoder.fuse(text_hidden, text_mask, memory)
    return getattr(self, head)(fused[:, 0]).astype(jnp.float32)

  def mlm_logits(self, masked_ids, text_mask, memory, positions):
    return masked_lm_logits(self.text_encoder, masked_ids, text_mask, memory, positions)

  def get_temp(self):
    return clamp_temp(self.temp)

  def __call__(self, video, fbank, ids, mask):
    mv, fv = self.encode_vision(video)
    ma, fa = self.encode_audio(fbank)
    hidden, ft = self.encode_text(ids, mask)
    av = self.av_feature(fa, fv)
    mem = jnp.concatenate([ma, mv], axis=1)
    heads = [self.match_logits(h, hidden, mask, m) for h, m in
             (("itm_head", mv), ("avtm_head", mem), ("atm_head", ma))]
    mlm = self.mlm_logits(ids, mask, mem, jnp.zeros((ids.shape[0], 1), jnp.int32))
    return fv, fa, ft, av, heads, mlm, self.get_temp()
