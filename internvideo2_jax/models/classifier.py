"""The single-modality fine-tuning model (official `SM/models/internvideo2.py` classifier):

    video -> vision encoder -> attention pooling (`clip_projector`, clip_embed_dim)
          -> fc_norm (LayerNorm, eps 1e-5) -> dropout (fc_drop_rate) -> head (Linear, num_classes)

The head's weight and bias are scaled by `init_scale` = 0.001 at initialisation (trunc-normal
0.02 weight, zero bias), as official. The encoder keeps its official names under
`vision_encoder/`, so layer-wise lr decay (`optimizer.layer_decay_scales`) and the converters
apply unchanged; the export writes the official fine-tuning layout (encoder keys at the top
level plus `fc_norm.*` and `head.*`, see convert/official.classifier_to_state_dict).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from internvideo2_jax.models.layers import LayerNorm, Linear
from internvideo2_jax.models.vit import VisionEncoder


def classifier_config(vision, num_classes: int, *, fc_drop_rate: float = 0.0, init_scale: float = 0.001):
  import ml_collections
  if not vision.get("attn_pool", True):
    raise ValueError("the classifier pools with the encoder's clip_projector: vision.attn_pool must be on")
  return ml_collections.ConfigDict({"vision": vision, "num_classes": int(num_classes),
                                    "fc_drop_rate": float(fc_drop_rate), "init_scale": float(init_scale)})


class VideoClassifier(nn.Module):
  """`apply(params, video (B, T, H, W, 3) normalised, train=...)` -> logits (B, num_classes) fp32."""
  config: Any

  @nn.compact
  def __call__(self, video, train: bool = False):
    c = self.config
    pooled = VisionEncoder(c.vision, name="vision_encoder")(video, train=train)["pooled"]
    x = LayerNorm(1e-5, name="fc_norm")(pooled)
    x = nn.Dropout(float(c.fc_drop_rate))(x, deterministic=not train)
    init = nn.initializers.normal(0.02)  # timm trunc_normal_(std=.02) cuts at +-2 absolute: a plain normal
    scale = float(c.init_scale)
    return Linear(int(c.num_classes), ("embed_out", None), kernel_init=lambda k, s, d: init(k, s, d) * scale,
                  name="head")(x).astype(jnp.float32)
