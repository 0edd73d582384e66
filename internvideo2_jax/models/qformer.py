"""The BLIP-2 / VideoChat2 QFormer: learned queries reading the vision tokens (reference §3).

BERT-base (12 layers, hidden 768) built from the BERT pieces of `models/text.py`:
* input: `query_tokens` (32, N(0, 0.02)) + `extra_query_tokens` (64, zeros) = 96 queries; with
  `text_input` the instruction tokens follow them ([query; word + position embeddings] ->
  LayerNorm -> dropout; no token types, as the BLIP-2 embeddings).
* every layer: self-attention over queries and text together (padding bias -10000);
  cross-attention to the vision tokens in layers 0, 2, 4, ... (`cross_attention_freq`), on the
  query positions only; the query positions use their own FFN (`intermediate_query`,
  `output_query`), the text positions the BERT one.
* dropout 0.1, drop path linspace(0, `drop_path_rate`) over the layers, applied to the output
  of each attention and FFN sub-block before its post-LN residual (the UMT/VideoChat2 QFormer).
Returns the 96 query outputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from internvideo2_jax.config_utils import preset, with_defaults
from internvideo2_jax.models.layers import LayerNorm, param_with_axes
from internvideo2_jax.models.text import Attention, Embed, TextSpec, _Intermediate, _Output, _self_bias

_PRESETS = {
    "bert-base": dict(),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=30523,
                 max_position_embeddings=64, num_query_tokens=4, extra_query_tokens=4),
}
_DEFAULTS = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 vocab_size=30523, max_position_embeddings=512, layer_norm_eps=1e-12,
                 hidden_dropout=0.1, attention_dropout=0.1, drop_path_rate=0.2,
                 cross_attention_freq=2, encoder_width=1408, num_query_tokens=32,
                 extra_query_tokens=64, text_input=True, dtype="float32", attn_impl="auto")


def qformer_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """Config of a QFormer preset (`bert-base`, `tiny`) with overrides."""
  return ml_collections.ConfigDict(preset("qformer", _PRESETS, _DEFAULTS, name, overrides))


def text_spec(config: Any) -> TextSpec:
  c = with_defaults("qformer", config, _DEFAULTS)
  if c["cross_attention_freq"] < 1:
    raise ValueError(f"invalid qformer config: cross_attention_freq={c['cross_attention_freq']} must be >= 1")
  return TextSpec.from_config(dict(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_layers"],
      num_heads=c["num_heads"], intermediate_size=c["intermediate_size"],
      max_position_embeddings=c["max_position_embeddings"], type_vocab_size=2,
      layer_norm_eps=c["layer_norm_eps"], hidden_dropout=c["hidden_dropout"],
      attention_dropout=c["attention_dropout"], fusion_layer=0, encoder_width=c["encoder_width"],
      gelu_approximate=False, dtype=c["dtype"], remat_policy="none", attn_impl=c["attn_impl"]))


class QFormerLayer(nn.Module):
  spec: TextSpec
  cross: bool
  num_queries: int
  drop_path: float
  has_text: bool
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, bias, memory):
    s, q, dp, det = self.spec, self.num_queries, self.drop_path, self.deterministic
    x = Attention(s, det, drop_path=dp, name="attention")(x, x, bias=bias)
    queries = x[:, :q]
    if self.cross:
      queries = Attention(s, det, cross=True, drop_path=dp, name="crossattention")(queries, memory)
    out = _Output(s, det, drop_path=dp, name="output_query")(
        _Intermediate(s, name="intermediate_query")(queries), queries)
    if self.has_text:  # the text positions' own FFN (built even when a call has no text)
      text = x[:, q:] if x.shape[1] > q else x[:, :0]
      text = _Output(s, det, drop_path=dp, name="output")(_Intermediate(s, name="intermediate")(text), text)
      out = jnp.concatenate([out, text], axis=1)
    return nn.with_logical_constraint(out, ("batch", "tokens", "act_embed"))


class QFormer(nn.Module):
  """`__call__(memory, ids=None, mask=None)`: memory [B, N, encoder_width] (vision tokens after
  `vision_layernorm`), optional instruction tokens [B, L] with their mask -> [B, Q, hidden]."""
  config: Any
  deterministic: bool = True

  @nn.compact
  def __call__(self, memory, ids=None, mask=None):
    c = with_defaults("qformer", self.config, _DEFAULTS)
    s = text_spec(self.config)
    b, h = memory.shape[0], s.hidden_size
    if memory.shape[-1] != s.encoder_width:
      raise ValueError(f"QFormer: vision tokens have width {memory.shape[-1]}, encoder_width={s.encoder_width}")
    query = param_with_axes(self, "query_tokens", nn.initializers.normal(0.02),
                            (c["num_query_tokens"], h), (None, "embed"))
    parts = [query]
    if c["extra_query_tokens"]:  # zero-initialised (the official extra_query_tokens)
      parts.append(param_with_axes(self, "extra_query_tokens", nn.initializers.zeros,
                                   (c["extra_query_tokens"], h), (None, "embed")))
    queries = jnp.broadcast_to(jnp.concatenate(parts, 0)[None], (b, sum(p.shape[0] for p in parts), h))
    nq = queries.shape[1]
    x, full_mask = queries.astype(jnp.float32), jnp.ones((b, nq), jnp.int32)
    if c["text_input"]:
      word = Embed(s.vocab_size, h, name="word_embeddings")
      pos = Embed(s.max_position_embeddings, h, name="position_embeddings")
      if ids is not None:
        n = ids.shape[1]
        if n > s.max_position_embeddings:
          raise ValueError(f"QFormer: instruction of {n} tokens exceeds max_position_embeddings="
                           f"{s.max_position_embeddings}")
        x = jnp.concatenate([x, word(ids) + pos(jnp.arange(n)[None])], axis=1)
        full_mask = jnp.concatenate([full_mask, (jnp.ones_like(ids) if mask is None else mask).astype(jnp.int32)], 1)
      elif self.is_initializing():
        word(jnp.zeros((1, 1), jnp.int32)), pos(jnp.zeros((1, 1), jnp.int32))
    elif ids is not None:
      raise ValueError("QFormer: instruction tokens given but text_input=False")
    x = LayerNorm(s.layer_norm_eps, name="LayerNorm")(x)
    x = nn.Dropout(s.hidden_dropout)(x, deterministic=self.deterministic).astype(s.dtype)
    bias = _self_bias(full_mask)
    rates = np.linspace(0.0, float(c["drop_path_rate"]), s.num_layers)
    for i in range(s.num_layers):
      x = QFormerLayer(s, i % int(c["cross_attention_freq"]) == 0, nq, float(rates[i]), bool(c["text_input"]),
                       self.deterministic, name=f"layer_{i}")(x, bias, memory.astype(s.dtype))
    return x[:, :nq]
