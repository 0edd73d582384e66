"""Official BEATs weights (as in InternVideo2's `audio_encoder.*`) <-> AudioEncoder params.

Keys: patch_embedding.weight (512, 1, 16, 16), layer_norm.*, post_extract_proj.*,
encoder.pos_conv.0.{weight_g (1, 1, K), weight_v (D, D/groups, K), bias} (weight norm over every
dim but 2, folded here), encoder.layer_norm.*, encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*,
.self_attn.grep_linear.*, .self_attn.grep_a (1, H, 1, 1), .self_attn.relative_attention_bias.weight
(layer 0's, shared), .self_attn_layer_norm.*, .fc1.*, .fc2.*, .final_layer_norm.*.
Export writes the folded kernel as weight_v with weight_g = ||v|| (an exact weight-norm form).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from internvideo2_jax.convert.io import mismatch_error, strip_prefix
from internvideo2_jax.models.audio import fold_weight_norm


def _lin(w, out_shape=None):
  k = np.asarray(w, np.float32).T
  return k if out_shape is None else k.reshape((k.shape[0],) + out_shape)


def beats_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any) -> dict:
  sd = strip_prefix(strip_prefix(dict(state_dict), "module."), "audio_encoder.")
  c = config
  d, e, h, L = c.embed_dim, c.encoder_embed_dim, c.encoder_attention_heads, c.encoder_layers
  hd, p, k, g = e // h, c.input_patch_size, c.conv_pos, c.conv_pos_groups
  missing, misshaped, used = [], [], set()

  def get(key, shape):
    if key not in sd:
      missing.append(key)
      return np.zeros(shape, np.float32)
    used.add(key)
    v = np.asarray(sd[key], np.float32)
    if v.shape != tuple(shape):
      misshaped.append(f"{key}: checkpoint {v.shape}, model expects {tuple(shape)}")
      return np.zeros(shape, np.float32)
    return v

  ln = lambda pre, n: {"weight": get(f"{pre}.weight", (n,)), "bias": get(f"{pre}.bias", (n,))}  # noqa: E731
  w = fold_weight_norm(get("encoder.pos_conv.0.weight_g", (1, 1, k)), get("encoder.pos_conv.0.weight_v", (e, e // g, k)))
  params = {
      "patch_embedding": {"kernel": get("patch_embedding.weight", (d, 1, p, p)).reshape(d, p * p).T},
      "layer_norm": ln("layer_norm", d),
      "encoder": {"pos_conv_weight": w.transpose(2, 1, 0), "pos_conv_bias": get("encoder.pos_conv.0.bias", (e,)),
                  "layer_norm": ln("encoder.layer_norm", e),
                  "relative_attention_bias": get("encoder.layers.0.self_attn.relative_attention_bias.weight",
                                                 (c.num_buckets, h))},
  }
  if d != e:  # official: post_extract_proj is None (no keys) when embed_dim == encoder_embed_dim
    params["post_extract_proj"] = {"kernel": _lin(get("post_extract_proj.weight", (e, d))),
                                   "bias": get("post_extract_proj.bias", (e,))}
  for i in range(L):
    pre = f"encoder.layers.{i}"
    att = f"{pre}.self_attn"
    layer = {n: {"kernel": _lin(get(f"{att}.{n}.weight", (e, e)), (h, hd)), "bias": get(f"{att}.{n}.bias", (e,)).reshape(h, hd)}
             for n in ("q_proj", "k_proj", "v_proj")}
    layer["out_proj"] = {"kernel": _lin(get(f"{att}.out_proj.weight", (e, e))).reshape(h, hd, e),
                         "bias": get(f"{att}.out_proj.bias", (e,))}
    if c.gru_rel_pos:
      layer["grep_linear"] = {"kernel": _lin(get(f"{att}.grep_linear.weight", (8, hd))),
                              "bias": get(f"{att}.grep_linear.bias", (8,))}
      layer["grep_a"] = get(f"{att}.grep_a", (1, h, 1, 1))
    used.add(f"{att}.relative_attention_bias.weight")  # the shared table, listed in every layer
    layer["self_attn_layer_norm"] = ln(f"{pre}.self_attn_layer_norm", e)
    layer["fc1"] = {"kernel": _lin(get(f"{pre}.fc1.weight", (c.encoder_ffn_embed_dim, e))),
                    "bias": get(f"{pre}.fc1.bias", (c.encoder_ffn_embed_dim,))}
    layer["fc2"] = {"kernel": _lin(get(f"{pre}.fc2.weight", (e, c.encoder_ffn_embed_dim))), "bias": get(f"{pre}.fc2.bias", (e,))}
    layer["final_layer_norm"] = ln(f"{pre}.final_layer_norm", e)
    params["encoder"][f"layers_{i}"] = layer
  unexpected = sorted(set(sd) - used)
  error = mismatch_error("BEATs checkpoint", missing, misshaped, unexpected)
  if error:
    raise error
  return params


def beats_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  c = config
  e, h = c.encoder_embed_dim, c.encoder_attention_heads
  a = lambda x: np.asarray(x, np.float32)  # noqa: E731
  out = {"patch_embedding.weight": a(params["patch_embedding"]["kernel"]).T.reshape(
      c.embed_dim, 1, c.input_patch_size, c.input_patch_size)}
  for name, pre in (("layer_norm", "layer_norm"),):
    out[f"{pre}.weight"], out[f"{pre}.bias"] = a(params[name]["weight"]), a(params[name]["bias"])
  if "post_extract_proj" in params:  # absent when embed_dim == encoder_embed_dim, as in the official model
    out["post_extract_proj.weight"] = a(params["post_extract_proj"]["kernel"]).T
    out["post_extract_proj.bias"] = a(params["post_extract_proj"]["bias"])
  enc = params["encoder"]
  v = a(enc["pos_conv_weight"]).transpose(2, 1, 0)
  out["encoder.pos_conv.0.weight_v"] = v
  out["encoder.pos_conv.0.weight_g"] = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(0, 1), keepdims=True)).astype(np.float32)
  out["encoder.pos_conv.0.bias"] = a(enc["pos_conv_bias"])
  out["encoder.layer_norm.weight"], out["encoder.layer_norm.bias"] = a(enc["layer_norm"]["weight"]), a(enc["layer_norm"]["bias"])
  for i in range(c.encoder_layers):
    lp, pre = enc[f"layers_{i}"], f"encoder.layers.{i}"
    for n in ("q_proj", "k_proj", "v_proj"):
      out[f"{pre}.self_attn.{n}.weight"] = a(lp[n]["kernel"]).reshape(e, e).T
      out[f"{pre}.self_attn.{n}.bias"] = a(lp[n]["bias"]).reshape(e)
    out[f"{pre}.self_attn.out_proj.weight"] = a(lp["out_proj"]["kernel"]).reshape(e, e).T
    out[f"{pre}.self_attn.out_proj.bias"] = a(lp["out_proj"]["bias"])
    if c.gru_rel_pos:
      out[f"{pre}.self_attn.grep_linear.weight"] = a(lp["grep_linear"]["kernel"]).T
      out[f"{pre}.self_attn.grep_linear.bias"] = a(lp["grep_linear"]["bias"])
      out[f"{pre}.self_attn.grep_a"] = a(lp["grep_a"])
    out[f"{pre}.self_attn.relative_attention_bias.weight"] = a(enc["relative_attention_bias"])
    for n in ("self_attn_layer_norm", "final_layer_norm"):
      out[f"{pre}.{n}.weight"], out[f"{pre}.{n}.bias"] = a(lp[n]["weight"]), a(lp[n]["bias"])
    for n in ("fc1", "fc2"):
      out[f"{pre}.{n}.weight"], out[f"{pre}.{n}.bias"] = a(lp[n]["kernel"]).T, a(lp[n]["bias"])
  del h
  return out
