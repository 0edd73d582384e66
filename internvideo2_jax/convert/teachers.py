"""Stage-1 teacher weights from the official key layouts (reference §1.9, §6).

* CLIP teacher (InternViT-6B, `internvl_clip_vision.py`): the InternVideo2 vision key layout with
  a 2-D patch kernel (D, 3, p, p), inflated to the (1, p, p) tubelet, and a (1, 1 + HW, D) table
  (resized for other resolutions). Prefixes `vision_model.` / `visual.` are stripped.
* VideoMAE-v2 teacher (`videomae.py`): patch_embed.proj (D, 3, 2, p, p), blocks.{i}.{norm1,
  attn.qkv (3D, D), attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np

from internvideo2_jax.convert.io import KeyReader, RenamedView, leaf_writer, mismatch_error, strip_prefix
from internvideo2_jax.convert.official import vision_from_state_dict

Sink = Callable[[tuple, np.ndarray], None]


def clip_teacher_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                                 sink: Optional[Sink] = None) -> dict:
  """-> params of CLIPTeacher(config) (inner dict, under `encoder`). With `sink(path, value)`
  each leaf goes there as soon as it is converted (paths under `encoder`): the host never holds
  the whole teacher (5.9B parameters for InternViT-6B)."""
  sd = state_dict
  for prefix in ("module.", "vision_model.", "visual."):
    sd = strip_prefix(sd, prefix)
  key = "patch_embed.proj.weight"
  if key in sd:  # a 2-D kernel (D, 3, p, p) becomes the (1, p, p) tubelet when it is read
    sd = RenamedView(sd, {k: k for k in sd},
                     {key: lambda w: np.asarray(w)[:, :, None] if np.ndim(w) == 4 else w})
  inner = None if sink is None else (lambda path, value: sink(("encoder",) + tuple(path), value))
  return {"encoder": vision_from_state_dict(sd, config, strict=False, sink=inner)["params"]}


def mae_teacher_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                                sink: Optional[Sink] = None) -> dict:
  """-> params of MAETeacher(config) (inner dict); with `sink`, leaf by leaf as above."""
  sd = strip_prefix(strip_prefix(state_dict, "module."), "encoder.")
  d, h, depth = config.embed_dim, config.num_heads, config.depth
  hd, mlp = d // h, int(d * config.mlp_ratio)
  p, tt = config.patch_size, config.tubelet_size
  reader = KeyReader(sd)
  take = reader.take
  params: dict = {}

  put = leaf_writer(params, sink)

  def stack(path, fmt, shape, fn):  # one leaf: the per-layer tensors stacked on the scan axis
    vals = [take(fmt.format(i), shape) for i in range(depth)]
    put(("blocks",) + path, np.stack([fn(x) for x in vals]) if all(x is not None for x in vals) else None)

  same = lambda x: x  # noqa: E731
  kernel = take("patch_embed.proj.weight", (d, 3, tt, p, p))
  put(("patch_embed", "proj", "kernel"), None if kernel is None else kernel.transpose(2, 3, 4, 1, 0))
  put(("patch_embed", "proj", "bias"), take("patch_embed.proj.bias", (d,)))
  for n in ("norm1", "norm2"):
    stack((n, "weight"), f"blocks.{{}}.{n}.weight", (d,), same)
    stack((n, "bias"), f"blocks.{{}}.{n}.bias", (d,), same)
  stack(("qkv", "kernel"), "blocks.{}.attn.qkv.weight", (3 * d, d), lambda w: w.T.reshape(d, 3, h, hd))
  stack(("q_bias",), "blocks.{}.attn.q_bias", (d,), lambda b: b.reshape(h, hd))
  stack(("v_bias",), "blocks.{}.attn.v_bias", (d,), lambda b: b.reshape(h, hd))
  stack(("proj", "kernel"), "blocks.{}.attn.proj.weight", (d, d), lambda w: w.T.reshape(h, hd, d))
  stack(("proj", "bias"), "blocks.{}.attn.proj.bias", (d,), same)
  stack(("fc1", "kernel"), "blocks.{}.mlp.fc1.weight", (mlp, d), lambda w: w.T)
  stack(("fc1", "bias"), "blocks.{}.mlp.fc1.bias", (mlp,), same)
  stack(("fc2", "kernel"), "blocks.{}.mlp.fc2.weight", (d, mlp), lambda w: w.T)
  stack(("fc2", "bias"), "blocks.{}.mlp.fc2.bias", (d,), same)
  put(("norm", "weight"), take("norm.weight", (d,)))
  put(("norm", "bias"), take("norm.bias", (d,)))
  unexpected = reader.unused(("fc_norm.", "head.", "pos_embed", "decoder", "mask_token"))
  error = mismatch_error("VideoMAE teacher checkpoint", reader.missing, reader.misshaped, unexpected)
  if error:
    raise error
  return params
