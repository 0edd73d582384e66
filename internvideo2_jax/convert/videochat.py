"""The whole stage-3 model in the official InternVideo2-Chat key layout, and its exports.

Keys (HF `modeling_videochat2.py` of InternVideo2-Chat-8B):
  vision_encoder.*                       (the InternVideo2 vision layout, convert/official.py)
  vision_layernorm.{weight,bias}
  qformer.bert.*, query_tokens, extra_query_tokens   (convert/qformer.py)
  project_up.{weight,bias}               (LLM width, QFormer width)
  lm.*                                   the LLM: with LoRA the peft layout
      lm.base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.weight
      lm.base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight (r, in)
      lm.base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight (out, r)
      lm.base_model.model.lm_head.{base_layer,lora_A.default,lora_B.default}.weight
  (older peft versions wrote the base weight without `.base_layer`; both are read), without
  LoRA the plain HF layout under `lm.` (lm.model.layers..., lm.lm_head.weight).
`export_videochat` writes that file plus the LLM with its adapters merged as a plain HF
directory (`llm_hf/`, loadable by transformers).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from internvideo2_jax.convert.io import (KeyReader, RenamedView, leaf_writer, mismatch_error, save_state_dict,
                                        strip_prefix)
from internvideo2_jax.convert.llm import llm_from_state_dict, llm_to_state_dict, save_hf_llm
from internvideo2_jax.convert.official import vision_from_state_dict, vision_to_state_dict
from internvideo2_jax.convert.qformer import qformer_from_state_dict, qformer_to_state_dict
from internvideo2_jax.models.llm import LLMSpec

Sink = Callable[[tuple, np.ndarray], None]
_LAYER_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT = "lm.base_model.model."


def _lora_shapes(s: LLMSpec, name: str) -> tuple[tuple, tuple]:
  """(in shape, out shape) of our kernel for a LoRA target."""
  d, h, kv, hd, f = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size
  return {"q_proj": ((d,), (h, hd)), "k_proj": ((d,), (kv, hd)), "v_proj": ((d,), (kv, hd)),
          "o_proj": ((h, hd), (d,)), "gate_proj": ((d,), (f,)), "up_proj": ((d,), (f,)),
          "down_proj": ((f,), (d,)), "lm_head": ((d,), (s.vocab_size,))}[name]


def _module_keys(s: LLMSpec) -> list[tuple[str, tuple, Optional[int]]]:
  """(HF module name without prefix, our path, layer index or None) of every LoRA target."""
  out = []
  for name in s.lora_targets:
    if name == "lm_head":
      if not s.tie_word_embeddings:
        out.append(("lm_head", ("lm_head",), None))
      continue
    for i in range(s.num_layers):
      out.append((f"model.layers.{i}.{_LAYER_TARGETS[name]}.{name}", ("layers", _LAYER_TARGETS[name], name), i))
  return out


def _peft_view(sd: Mapping) -> Mapping:
  """The LLM's plain HF keys, read through the peft layout (`.base_layer` or not)."""
  names = {}
  for k in sd:
    if not k.startswith(PEFT) or ".lora_" in k:
      continue
    names[k[len(PEFT):].replace(".base_layer.", ".")] = k
  return RenamedView(sd, names)


def videochat_from_state_dict(state_dict: Mapping[str, np.ndarray], mc: Any, *,
                              sink: Optional[Sink] = None) -> dict:
  """Official InternVideo2-Chat state dict -> VideoChat(mc) params; leaves to `sink(path, v)`
  (full paths from the model root) as they are converted when given."""
  out: dict = {}

  def put_under(prefix):
    return leaf_writer(out, sink, prefix)

  sd = state_dict
  vision_from_state_dict(strip_prefix(sd, "vision_encoder."), mc.vision, strict=False,
                         sink=put_under(("vision_encoder",)))
  reader = KeyReader(sd)
  d_v = int(mc.vision.embed_dim)
  for n in ("weight", "bias"):
    v = reader.take(f"vision_layernorm.{n}", (d_v,))
    if v is not None:
      put_under(("vision_layernorm",))((n,), v)
  spec = LLMSpec.from_config(mc.llm)
  hq = int(mc.qformer.hidden_size)
  w = reader.take("project_up.weight", (spec.hidden_size, hq))
  if w is not None:
    put_under(("project_up",))(("kernel",), w.T)
  b = reader.take("project_up.bias", (spec.hidden_size,))
  if b is not None:
    put_under(("project_up",))(("bias",), b)
  qformer_from_state_dict(sd, mc.qformer, prefix="qformer.", sink=put_under(("qformer",)))
  peft = any(k.startswith(PEFT) for k in sd)
  llm_sd = _peft_view(sd) if peft else strip_prefix(sd, "lm.")
  llm_from_state_dict(llm_sd, mc.llm, sink=put_under(("lm",)))
  if spec.lora_rank:
    r, adapters = spec.lora_rank, {}  # our path -> [(A, B) per layer]
    for module, path, _ in _module_keys(spec):  # layers in order
      in_shape, out_shape = _lora_shapes(spec, path[-1])
      a = reader.take(f"{PEFT}{module}.lora_A.default.weight", (r, int(np.prod(in_shape))))
      bb = reader.take(f"{PEFT}{module}.lora_B.default.weight", (int(np.prod(out_shape)), r))
      if a is not None and bb is not None:
        adapters.setdefault(path, []).append((a.T.reshape(in_shape + (r,)), bb.T.reshape((r,) + out_shape)))
    for path, pairs in adapters.items():
      if len(pairs) != (spec.num_layers if path[0] == "layers" else 1):
        continue  # a missing layer's adapter is already reported by the reader
      stacked = path[0] == "layers"
      put_under(("lm",) + path)(("lora_a",), np.stack([p[0] for p in pairs]) if stacked else pairs[0][0])
      put_under(("lm",) + path)(("lora_b",), np.stack([p[1] for p in pairs]) if stacked else pairs[0][1])
  error = mismatch_error("InternVideo2-Chat checkpoint", reader.missing, reader.misshaped, ())
  if error:
    raise error
  return out


def videochat_to_state_dict(params: Mapping, mc: Any) -> dict[str, np.ndarray]:
  """VideoChat params -> the official InternVideo2-Chat layout (LoRA in the peft layout)."""
  spec = LLMSpec.from_config(mc.llm)
  out = {f"vision_encoder.{k}": v for k, v in vision_to_state_dict(params["vision_encoder"], mc.vision).items()}
  out["vision_layernorm.weight"] = np.asarray(params["vision_layernorm"]["weight"], np.float32)
  out["vision_layernorm.bias"] = np.asarray(params["vision_layernorm"]["bias"], np.float32)
  out.update(qformer_to_state_dict(params["qformer"], mc.qformer, prefix="qformer."))
  out["project_up.weight"] = np.ascontiguousarray(np.asarray(params["project_up"]["kernel"], np.float32).T)
  out["project_up.bias"] = np.asarray(params["project_up"]["bias"], np.float32)
  lm = params["lm"]
  if not spec.lora_rank:
    out.update({f"lm.{k}": v for k, v in llm_to_state_dict(lm, mc.llm).items()})
    return out
  base_cfg = dict(mc.llm.to_dict() if hasattr(mc.llm, "to_dict") else mc.llm, lora_rank=0)
  strip = lambda t: {k: strip(v) for k, v in t.items() if k not in ("lora_a", "lora_b")} if isinstance(t, Mapping) else t  # noqa: E731
  targets = {m for m, _, _ in _module_keys(spec)}
  for k, v in llm_to_state_dict(strip(lm), base_cfg).items():
    module = k.rsplit(".", 1)[0]
    out[PEFT + (f"{module}.base_layer.{k.rsplit('.', 1)[1]}" if module in targets else k)] = v
  r = spec.lora_rank
  for module, path, layer in _module_keys(spec):
    t = lm
    for p in path:
      t = t[p]
    a, b = np.asarray(t["lora_a"], np.float32), np.asarray(t["lora_b"], np.float32)
    if layer is not None:
      a, b = a[layer], b[layer]
    out[f"{PEFT}{module}.lora_A.default.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    out[f"{PEFT}{module}.lora_B.default.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  return out


def export_videochat(params: Mapping, mc: Any, directory: str) -> list[str]:
  """Writes stage3_official_layout.safetensors and llm_hf/ (adapters merged); returns messages."""
  path = os.path.join(directory, "stage3_official_layout.safetensors")
  save_state_dict(videochat_to_state_dict(params, mc), path)
  hf_dir = os.path.join(directory, "llm_hf")
  save_hf_llm(params["lm"], mc.llm, hf_dir)
  return [f"exported the model in the InternVideo2-Chat key layout: {path}",
          f"exported the LLM (LoRA merged) as a Hugging Face directory: {hf_dir}"]
