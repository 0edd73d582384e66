"""QFormer weights in the BLIP-2 / VideoChat2 layout <-> `models.qformer.QFormer` params.

Official keys (prefix `Qformer.` in BLIP-2/LAVIS, `qformer.` in VideoChat2/InternVideo2-Chat):
  {p}bert.embeddings.{word,position}_embeddings.weight, {p}bert.embeddings.LayerNorm.*
  {p}bert.encoder.layer.{i}.attention.{self.{query,key,value},output.dense,output.LayerNorm}.*
  {p}bert.encoder.layer.{i}.crossattention.*              (i % cross_attention_freq == 0)
  {p}bert.encoder.layer.{i}.{intermediate,output}[_query].dense.*, .output[_query].LayerNorm.*
  query_tokens (1, 32, D), extra_query_tokens (1, 64, D)  (no prefix)
Our module tree mirrors it (`layer_{i}/attention/self/query/kernel`), so the map is computed
from the model's own parameter paths: torch (out, in) weights become (in..., out...) kernels.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from internvideo2_jax.convert.io import KeyReader, mismatch_error
from internvideo2_jax.models.qformer import QFormer, text_spec

_TOP = ("query_tokens", "extra_query_tokens")


def _abstract(config) -> dict:
  s = text_spec(config)
  shapes = jax.eval_shape(lambda: QFormer(config).init(jax.random.key(0), jnp.zeros((1, 1, s.encoder_width))))
  return flatten_dict(nn.unbox(shapes)["params"])


def _key(path: tuple, prefix: str) -> str:
  """Our parameter path -> the official key."""
  if path[0] in _TOP:
    return path[0]
  leaf = {"kernel": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  if path[0].startswith("layer_"):
    return f"{prefix}bert.encoder.layer.{path[0][len('layer_'):]}." + ".".join(path[1:-1] + (leaf,))
  return f"{prefix}bert.embeddings." + ".".join(path[:-1] + (leaf,))


def _n_in(path: tuple) -> int:
  """Input axes of a kernel: the attention output projection contracts (heads, head_dim)."""
  return 2 if path[-1] == "kernel" and path[-3:-1] == ("output", "dense") and len(path) == 5 else 1


def detect_prefix(state_dict: Mapping) -> str:
  for p in ("qformer.", "Qformer.", ""):
    if f"{p}bert.embeddings.LayerNorm.weight" in state_dict:
      return p
  return "qformer."


def qformer_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                            prefix: Optional[str] = None,
                            sink: Optional[Callable[[tuple, np.ndarray], None]] = None) -> dict:
  """Official QFormer tensors -> QFormer(config) params (each leaf to `sink` if given)."""
  prefix = detect_prefix(state_dict) if prefix is None else prefix
  reader = KeyReader(state_dict)
  out = {}
  for path, leaf in _abstract(config).items():
    shape = tuple(leaf.shape)
    if path[0] in _TOP:
      v = reader.take(path[0], (1,) + shape)
      v = None if v is None else v[0]
    elif path[-1] == "kernel":
      n = _n_in(path)
      v = reader.take(_key(path, prefix), (int(np.prod(shape[n:])), int(np.prod(shape[:n]))))
      v = None if v is None else v.T.reshape(shape)
    else:
      v = reader.take(_key(path, prefix), (int(np.prod(shape)),) if path[-1] == "bias" else shape)
      v = None if v is None else v.reshape(shape)
    if v is None:
      continue
    if sink is not None:
      sink(path, v)
    else:
      out[path] = v
  ours = {_key(p, prefix) for p in _abstract(config)}
  unexpected = [k for k in reader.unused() if k.startswith(prefix + "bert.") and k not in ours
                and not k.endswith("position_ids") and ".cls." not in k]
  error = mismatch_error("QFormer checkpoint", reader.missing, reader.misshaped, unexpected)
  if error:
    raise error
  return unflatten_dict(out) if out else {}


def qformer_to_state_dict(params: Mapping, config: Any, prefix: str = "qformer.") -> dict[str, np.ndarray]:
  """QFormer params -> the official key layout."""
  out = {}
  for path, v in flatten_dict(dict(params)).items():
    v = np.asarray(v, np.float32)
    if path[0] in _TOP:
      out[path[0]] = v[None]
    elif path[-1] == "kernel":
      n = _n_in(path)
      out[_key(path, prefix)] = np.ascontiguousarray(v.reshape(int(np.prod(v.shape[:n])), -1).T)
    else:
      out[_key(path, prefix)] = v.reshape(-1) if path[-1] == "bias" else v
  return out
