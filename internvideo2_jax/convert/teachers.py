"""Stage-1 teacher weights from the official key layouts (reference §1.9, §6).

* CLIP teacher (InternViT-6B, `internvl_clip_vision.py`): the InternVideo2 vision key layout with
  a 2-D patch kernel (D, 3, p, p), inflated to the (1, p, p) tubelet, and a (1, 1 + HW, D) table
  (resized for other resolutions). Prefixes `vision_model.` / `visual.` are stripped.
* VideoMAE-v2 teacher (`videomae.py`): patch_embed.proj (D, 3, 2, p, p), blocks.{i}.{norm1,
  attn.qkv (3D, D), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from internvideo2_jax.convert.io import KeyReader, mismatch_error, strip_prefix
from internvideo2_jax.convert.official import vision_from_state_dict


def clip_teacher_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any) -> dict:
  """-> params of CLIPTeacher(config) (inner dict, under `encoder`)."""
  sd = state_dict
  for prefix in ("module.", "vision_model.", "visual."):
    sd = strip_prefix(sd, prefix)
  w = sd.get("patch_embed.proj.weight")
  if w is not None and np.ndim(w) == 4:
    sd = dict(sd)  # (reads the tensors: the teacher is converted once)
    sd["patch_embed.proj.weight"] = np.asarray(w)[:, :, None]  # 2-D kernel -> (1, p, p) tubelet
  return {"encoder": vision_from_state_dict(sd, config, strict=False)["params"]}


def mae_teacher_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any) -> dict:
  """-> params of MAETeacher(config) (inner dict)."""
  sd = strip_prefix(strip_prefix(dict(state_dict), "module."), "encoder.")
  d, h, depth = config.embed_dim, config.num_heads, config.depth
  hd, mlp = d // h, int(d * config.mlp_ratio)
  p, tt = config.patch_size, config.tubelet_size
  reader = KeyReader(sd)
  take = reader.take

  def stack(fmt, shape, fn):
    vals = [take(fmt.format(i), shape) for i in range(depth)]
    return np.stack([fn(x) for x in vals]) if all(x is not None for x in vals) else None

  params = {
      "patch_embed": {"proj": {"kernel": take("patch_embed.proj.weight", (d, 3, tt, p, p)),
                               "bias": take("patch_embed.proj.bias", (d,))}},
      "blocks": {
          "norm1": {"weight": stack("blocks.{}.norm1.weight", (d,), lambda x: x),
                    "bias": stack("blocks.{}.norm1.bias", (d,), lambda x: x)},
          "qkv": {"kernel": stack("blocks.{}.attn.qkv.weight", (3 * d, d), lambda w: w.T.reshape(d, 3, h, hd))},
          "q_bias": stack("blocks.{}.attn.q_bias", (d,), lambda b: b.reshape(h, hd)),
          "v_bias": stack("blocks.{}.attn.v_bias", (d,), lambda b: b.reshape(h, hd)),
          "proj": {"kernel": stack("blocks.{}.attn.proj.weight", (d, d), lambda w: w.T.reshape(h, hd, d)),
                   "bias": stack("blocks.{}.attn.proj.bias", (d,), lambda x: x)},
          "norm2": {"weight": stack("blocks.{}.norm2.weight", (d,), lambda x: x),
                    "bias": stack("blocks.{}.norm2.bias", (d,), lambda x: x)},
          "fc1": {"kernel": stack("blocks.{}.mlp.fc1.weight", (mlp, d), lambda w: w.T),
                  "bias": stack("blocks.{}.mlp.fc1.bias", (mlp,), lambda x: x)},
          "fc2": {"kernel": stack("blocks.{}.mlp.fc2.weight", (d, mlp), lambda w: w.T),
                  "bias": stack("blocks.{}.mlp.fc2.bias", (d,), lambda x: x)}},
      "norm": {"weight": take("norm.weight", (d,)), "bias": take("norm.bias", (d,))},
  }
  k = params["patch_embed"]["proj"]["kernel"]
  if k is not None:
    params["patch_embed"]["proj"]["kernel"] = k.transpose(2, 3, 4, 1, 0)
  unexpected = reader.unused(("fc_norm.", "head.", "pos_embed", "decoder", "mask_token"))
  error = mismatch_error("VideoMAE teacher checkpoint", reader.missing, reader.misshaped, unexpected)
  if error:
    raise error
  return params
