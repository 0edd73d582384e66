"""Hugging Face Llama-family LLM weights (Mistral, Llama, Qwen2) <-> `models.llm.LLM` params.

HF layout (`save_pretrained`, one `model.safetensors` or shards + `model.safetensors.index.json`):
  model.embed_tokens.weight (V, D), model.norm.weight (D,), lm_head.weight (V, D) (absent if tied)
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (out, in), q/k/v .bias (Qwen2)
  model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight
Ours: kernels (in, out) with heads split ((D, H, hd) for q/k/v, (H, hd, D) for o_proj), the
layers stacked on a leading axis. Import streams: each stacked leaf is read, converted and
handed to `sink` (the sharded placer) before the next, from lazily read safetensors shards, so a
host never holds the whole model. LoRA adapters are not part of an HF model: export merges them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from internvideo2_jax.convert.io import CheckpointError, KeyReader, LazyStateDict, leaf_writer, mismatch_error
from internvideo2_jax.models.llm import LLMSpec, merge_lora

_ARCHS = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
Sink = Callable[[tuple, np.ndarray], None]


def _rules(s: LLMSpec):
  """(hf key suffix, our path, hf shape, to ours, to hf) per layer, and for the top level."""
  d, h, kv, hd, f = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size
  same = (lambda a: a, lambda a: a)

  def qkv(n):
    return (lambda w: w.T.reshape(d, n, hd), lambda k: k.reshape(d, n * hd).T)

  layer = [(f"self_attn.{n}.weight", ("self_attn", n, "kernel"), (heads * hd, d), *qkv(heads))
           for n, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))]
  if s.attention_bias:
    layer += [(f"self_attn.{n}.bias", ("self_attn", n, "bias"), (heads * hd,),
               lambda b, n=heads: b.reshape(n, hd), lambda b: b.reshape(-1))
              for n, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))]
  layer += [("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, h * hd),
             lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T),
            ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), lambda w: w.T, lambda k: k.T),
            ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), lambda w: w.T, lambda k: k.T),
            ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), lambda w: w.T, lambda k: k.T),
            ("input_layernorm.weight", ("input_layernorm", "weight"), (d,), *same),
            ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), (d,), *same)]
  top = [("model.embed_tokens.weight", ("embed_tokens",), (s.vocab_size, d), *same),
         ("model.norm.weight", ("norm", "weight"), (d,), *same)]
  if not s.tie_word_embeddings:
    top.append(("lm_head.weight", ("lm_head", "kernel"), (s.vocab_size, d), lambda w: w.T, lambda k: k.T))
  return layer, top


def llm_config_from_hf(directory_or_config: str | Mapping, **overrides) -> dict:
  """Our llm config from an HF `config.json` (a directory, a file or the dict). A config of
  another architecture is refused by name."""
  hf = directory_or_config
  where = "config"
  if isinstance(hf, str):
    where = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
    if not os.path.exists(where):
      raise CheckpointError(f"{where}: no HF config.json (an LLM directory holds config.json and "
                            "model*.safetensors)")
    with open(where) as f:
      hf = json.load(f)
  archs = list(hf.get("architectures") or [])
  family = next((_ARCHS[a] for a in archs if a in _ARCHS), None)
  if family is None and hf.get("model_type") in _ARCHS.values():
    family = hf["model_type"]
  if family is None:
    raise CheckpointError(f"{where}: architecture {archs or hf.get('model_type')!r} is not a supported "
                          f"LLM; supported: {sorted(_ARCHS)}")
  # transformers >= 5 writes {"rope_parameters": {"rope_theta", "rope_type"}}, older ones
  # a top-level rope_theta and an optional rope_scaling
  rope = dict(hf.get("rope_parameters") or {})
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  for scaling in (rope, hf.get("rope_scaling") or {}):
    if (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
      raise CheckpointError(f"{where}: RoPE scaling {scaling!r} is not supported (plain RoPE only)")
  heads = int(hf["num_attention_heads"])
  window = int(hf.get("sliding_window") or 0) if family == "mistral" else 0
  if family == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointError(f"{where}: Qwen2's per-layer sliding window (use_sliding_window) is not supported")
  cfg = dict(family=family, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
             intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
             num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
             head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), rope_theta=theta,
             max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
             rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
             tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
             attention_bias=bool(hf.get("attention_bias", family == "qwen2")), sliding_window=window)
  cfg.update(overrides)
  return cfg


class ShardedSafetensors(Mapping):
  """The tensors of an HF directory's `model.safetensors` or its shards (index json), each read
  lazily from its own file."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: LazyStateDict(os.path.join(directory, name)) for name in sorted(set(weight_map.values()))}
      self._where = {k: files[v] for k, v in weight_map.items()}
    elif os.path.exists(single):
      sd = LazyStateDict(single)
      self._where = {k: sd for k in sd}
    else:
      raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")

  def __getitem__(self, key):
    return self._where[key][key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def llm_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                        sink: Optional[Sink] = None, prefix: str = "") -> dict:
  """HF state dict -> LLM params (the base weights; LoRA adapters keep their init). With
  `sink(path, value)` each leaf goes there as soon as it is converted. Every missing, unknown
  or mis-shaped key is reported together."""
  s = LLMSpec.from_config(config)
  layer, top = _rules(s)
  reader = KeyReader(state_dict)
  params: dict = {}

  put = leaf_writer(params, sink)

  for key, path, shape, to_ours, _ in top:
    v = reader.take(prefix + key, shape)
    if v is not None:
      put(path, to_ours(v))
  for key, path, shape, to_ours, _ in layer:
    vals = [reader.take(f"{prefix}model.layers.{i}.{key}", shape) for i in range(s.num_layers)]
    if all(v is not None for v in vals):
      put(("layers",) + path, np.stack([to_ours(v) for v in vals]))
  ignore = (prefix + "model.rotary_emb.", prefix + "lm_head.weight") if s.tie_word_embeddings else (
      prefix + "model.rotary_emb.",)
  unexpected = [k for k in reader.unused(ignore) if k.startswith(prefix) and not k.endswith("rotary_emb.inv_freq")]
  have = {int(k[len(prefix):].split(".")[2]) for k in state_dict if k.startswith(prefix + "model.layers.")}
  hint = f" (checkpoint has {max(have) + 1} layers, config num_layers={s.num_layers})" if have else ""
  error = mismatch_error("LLM checkpoint", reader.missing, reader.misshaped, unexpected, hint)
  if error:
    raise error
  return params


def llm_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """LLM params (adapters merged in) -> HF state dict."""
  s = LLMSpec.from_config(config)
  if s.lora_rank:
    params = merge_lora(params, config)
  layer, top = _rules(s)

  def get(path):
    t = params
    for k in path:
      t = t[k]
    return np.asarray(t, np.float32)

  # contiguous: safetensors writes a transposed view's buffer as is (scrambled weights)
  out = {key: np.ascontiguousarray(to_hf(get(path))) for key, path, _, _, to_hf in top}
  for key, path, _, _, to_hf in layer:
    stacked = get(("layers",) + path)
    for i in range(s.num_layers):
      out[f"model.layers.{i}.{key}"] = np.ascontiguousarray(to_hf(stacked[i]))
  return out


def hf_config(config: Any) -> dict:
  """The HF config.json of an LLM config."""
  s = LLMSpec.from_config(config)
  arch = {v: k for k, v in _ARCHS.items()}[s.family]
  out = dict(architectures=[arch], model_type=s.family, vocab_size=s.vocab_size, hidden_size=s.hidden_size,
             intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
             num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim,
             rope_theta=s.rope_theta, max_position_embeddings=s.max_position_embeddings,
             rms_norm_eps=s.rms_norm_eps, tie_word_embeddings=s.tie_word_embeddings, hidden_act="silu",
             sliding_window=s.sliding_window or None, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
  if s.family == "qwen2":
    out["use_sliding_window"] = bool(s.sliding_window)
  if s.family == "llama":
    out["attention_bias"] = s.attention_bias
  return out


def save_hf_llm(params: Mapping, config: Any, directory: str, max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Writes an HF directory (config.json + safetensors, sharded with an index past
  `max_shard_bytes`) that `transformers` loads as is. Returns the files written."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  sd = llm_to_state_dict(params, config)
  shards, cur, size = [], {}, 0
  for k in sorted(sd):
    nbytes = sd[k].nbytes
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k], size = np.ascontiguousarray(sd[k]), size + nbytes
  shards.append(cur)
  written = []
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    written.append("model.safetensors")
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
      written.append(name)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}, f, indent=2)
    written.append("model.safetensors.index.json")
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config(config), f, indent=2)
  written.append("config.json")
  return written


def load_hf_llm(directory: str, config: Any, *, sink: Optional[Sink] = None) -> dict:
  """Params of LLM(config) from an HF directory; the config must describe the same model as
  the directory's config.json (checked by name)."""
  theirs = LLMSpec.from_config(llm_config_from_hf(directory))
  ours = LLMSpec.from_config(config)
  diff = [f"{k}: config {getattr(ours, k)!r}, {directory} {getattr(theirs, k)!r}"
          for k in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                    "attention_bias") if _differs(getattr(ours, k), getattr(theirs, k))]
  if diff:
    raise CheckpointError(f"{directory}: the LLM config does not match the checkpoint: " + "; ".join(diff))
  return llm_from_state_dict(ShardedSafetensors(directory), config, sink=sink)


def _differs(a, b) -> bool:
  if isinstance(b, float) or isinstance(a, float):
    return abs(float(a) - float(b)) > 1e-9 * max(1.0, abs(float(b)))
  return a != b
