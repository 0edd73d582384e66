"""The stage-1 student (official `PretrainInternVideo2` of single_modality) and its loss.

    video (8 frames) -> encoder on the visible tokens, returning the last K_clip and K_mae layers
    clip_decoder[k]: Linear(D -> D_clip_teacher) + LayerNorm, on layer k + clip_pos_embed
    mae_decoder[k]:  Linear(D, D) - GELU - Linear(D -> D_mae_teacher) + LayerNorm, on the patch
                     tokens of layer k + mae_pos_embed
    final_clip_decoder: Linear(768 -> 768) + LayerNorm on the pooled feature
All decoder outputs are L2-normalised; the loss is 2 - 2 cos against the teachers' targets at
the visible positions (cls + visible patches for CLIP, visible patches for MAE).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from internvideo2_jax.models.embeddings import sincos_3d
from internvideo2_jax.models.layers import LayerNorm, Linear, gelu, param_with_axes
from internvideo2_jax.models.vit import ViTSpec, VisionEncoder, last_layers
from internvideo2_jax.ops.losses import l2_normalize

xavier = nn.initializers.xavier_uniform()


def stage1_config(vision, *, clip_teacher_dim: int, clip_teacher_final_dim: int, mae_teacher_dim: int,
                  clip_return_layer: int = 6, clip_student_return_interval: float = 1,
                  mae_return_layer: int = 4) -> ml_collections.ConfigDict:
  clip_layers = last_layers(vision.depth, clip_return_layer, clip_student_return_interval)
  mae_layers = last_layers(vision.depth, mae_return_layer)
  vision = ml_collections.ConfigDict(vision.to_dict())
  vision.return_layers = tuple(sorted(set(clip_layers) | set(mae_layers)))
  return ml_collections.ConfigDict({
      "vision": vision, "clip_layers": clip_layers, "mae_layers": mae_layers,
      "clip_teacher_dim": clip_teacher_dim, "clip_teacher_final_dim": clip_teacher_final_dim,
      "mae_teacher_dim": mae_teacher_dim})


class _Decoder(nn.Module):
  out_dim: int
  mlp: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    if self.mlp:  # MLP_Decoder: head = Sequential(Linear(D, D), GELU, Linear(D, out))
      h = Linear(x.shape[-1], ("embed", "mlp"), dtype=self.dtype, kernel_init=xavier, name="head_0")(x)
      x = Linear(self.out_dim, ("mlp", "embed_out"), dtype=self.dtype, kernel_init=xavier,
                 name="head_2")(gelu(h, approximate=False))
    else:
      x = Linear(self.out_dim, ("embed", "embed_out"), dtype=self.dtype, kernel_init=xavier, name="head")(x)
    return l2_normalize(LayerNorm(1e-5, name="norm")(x))


class Stage1Student(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, video, mask, num_visible: int, train: bool = True):
    c = self.config
    s = ViTSpec.from_config(c.vision)
    out = VisionEncoder(c.vision, name="vision_encoder")(video, mask=mask, train=train, num_visible=num_visible)
    layers = list(s.return_layers)
    inter = out["intermediates"]                                      # (K_all, B, 1+Nv, D)
    idx = out["visible_index"]                                        # (B, Nv)
    t, gh, gw = s.grid
    table = lambda *_: sincos_3d(s.embed_dim, t, gh, gw)[None]        # noqa: E731
    clip_pos = param_with_axes(self, "clip_pos_embed", table, (1, 1 + s.num_patches, s.embed_dim),
                               (None, None, "embed"))
    mae_pos = param_with_axes(self, "mae_pos_embed", lambda *_: sincos_3d(s.embed_dim, t, gh, gw, False)[None],
                              (1, s.num_patches, s.embed_dim), (None, None, "embed"))
    b = video.shape[0]
    vis_clip = jnp.concatenate([jnp.broadcast_to(clip_pos[:, :1], (b, 1, s.embed_dim)),
                                jnp.take(clip_pos[0, 1:], idx, axis=0)], axis=1)     # (B, 1+Nv, D)
    vis_mae = jnp.take(mae_pos[0], idx, axis=0)                                         # (B, Nv, D)
    clip_out = jnp.stack([
        _Decoder(c.clip_teacher_dim, False, s.dtype, name=f"clip_decoder_{k}")(inter[layers.index(l)] + vis_clip)
        for k, l in enumerate(c.clip_layers)])                        # (Kc, B, 1+Nv, Dc)
    mae_out = jnp.stack([
        _Decoder(c.mae_teacher_dim, True, s.dtype, name=f"mae_decoder_{k}")(inter[layers.index(l)][:, 1:] + vis_mae)
        for k, l in enumerate(c.mae_layers)])                         # (Km, B, Nv, Dm)
    final = None
    if c.clip_teacher_final_dim:
      final = _Decoder(c.clip_teacher_final_dim, False, s.dtype, name="final_clip_decoder")(out["pooled"])
    return {"clip": clip_out, "mae": mae_out, "final": final, "visible_index": idx}


def cosine_distance(pred, target):
  """2 - 2 cos of L2-normalised features, averaged over every leading axis."""
  return jnp.mean(2.0 - 2.0 * jnp.sum(pred * target.astype(pred.dtype), axis=-1))


def stage1_loss(student_out, clip_tokens, clip_final, mae_tokens, weights) -> dict:
  """Targets at the visible positions: CLIP (cls + visible), MAE (visible patches)."""
  idx = student_out["visible_index"]                                  # (B, Nv)
  gather = lambda tok: jnp.take_along_axis(tok, idx[None, :, :, None], axis=2)  # noqa: E731
  clip_t = jnp.concatenate([clip_tokens[:, :, :1], gather(clip_tokens[:, :, 1:])], axis=2)
  out = {"clip": cosine_distance(student_out["clip"], clip_t),
         "mae": cosine_distance(student_out["mae"], gather(mae_tokens))}
  if student_out["final"] is not None:
    out["clip_final"] = cosine_distance(student_out["final"], clip_final)
  out["loss"] = (weights[0] * out["clip"] + weights[1] * out.get("clip_final", 0.0)
                 + weights[2] * out["mae"])
  return out
