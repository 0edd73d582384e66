"""A Llama-family decoder (Mistral, Llama, Qwen2) with LoRA and a KV cache.

One module covers the family by config, the HF layouts and numerics (`modeling_mistral.py`,
`modeling_llama.py`, `modeling_qwen2.py`):

* RMSNorm: fp32 statistics, `weight * x.to(input dtype)`; pre-norm residual blocks.
* RoPE on q and k with `rope_theta`, rotate-half convention, angles in fp32 from position ids.
* GQA: `num_kv_heads` k/v heads, head i reads kv head i // (heads / kv_heads) (HF `repeat_kv`).
* SwiGLU MLP: down(silu(gate(x)) * up(x)); q/k/v biases for Qwen2 (`attention_bias`).
* lm_head untied (Mistral, Llama) or tied to `embed_tokens` (`tie_word_embeddings`, Qwen2 small).
* Optional sliding window (Mistral v0.1): a key is visible when 0 <= q_pos - k_pos < window.

Module names follow HF (`embed_tokens`, `layers/self_attn/q_proj`, `mlp/gate_proj`, `norm`,
`lm_head`) so conversion is a table; the layers are one scanned stack (leading `layers` axis).

LoRA (peft semantics): y = x W (+ b) + dropout(x) A B * alpha / r on the configured target
modules, A ~ U(+-1/sqrt(in)) (kaiming_uniform(a=sqrt 5)), B = 0, so a fresh adapter is the base
model exactly. `merge_lora` folds the adapters into the kernels (an exported LLM is a plain
checkpoint); `unmerge_lora` takes them out again.

Decoding: `init_cache(batch, length)` gives per-layer k/v buffers [L, B, S, KV, hd]; a call with
`cache` and `cache_index` writes the new tokens' k/v at that slot and attends over the buffer
(slots > the query's own slot and padded slots masked), so prefill and one-token steps share
one code path and `generate` compiles two programs in all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from internvideo2_jax.config_utils import preset, with_defaults
from internvideo2_jax.models import remat
from internvideo2_jax.models.layers import RMSNorm, param_with_axes
from internvideo2_jax.ops.attention import dot_product_attention

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")

_PRESETS = {
    # mistralai/Mistral-7B-Instruct-v0.3, the InternVideo2-Chat LLM
    "mistral-7b": dict(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-5),
    # a small model trained from scratch in the demo (the Mistral v0.3 vocabulary)
    "small": dict(family="mistral", vocab_size=32768, hidden_size=128, intermediate_size=384,
                  num_layers=3, num_heads=4, num_kv_heads=2, rope_theta=1e6,
                  max_position_embeddings=1024, rms_norm_eps=1e-5),
    "tiny": dict(family="mistral", vocab_size=128, hidden_size=64, intermediate_size=112,
                 num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=1e6,
                 max_position_embeddings=128, rms_norm_eps=1e-5),
}
_DEFAULTS = dict(family="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                 num_layers=32, num_heads=32, num_kv_heads=8, head_dim=0, rope_theta=10000.0,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 attention_bias=False, sliding_window=0, lora_rank=0, lora_alpha=32.0,
                 lora_dropout=0.1, lora_targets=",".join(LORA_TARGETS), dtype="float32",
                 remat_policy="none", attn_impl="auto", initializer_range=0.02)
FAMILIES = ("mistral", "llama", "qwen2")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def llm_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """Config of an LLM preset (`mistral-7b`, `small`, `tiny`) with overrides."""
  return ml_collections.ConfigDict(preset("llm", _PRESETS, _DEFAULTS, name, overrides))


@dataclasses.dataclass(frozen=True)
class LLMSpec:
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  max_position_embeddings: int
  rms_norm_eps: float
  tie_word_embeddings: bool
  attention_bias: bool
  sliding_window: int
  lora_rank: int
  lora_alpha: float
  lora_dropout: float
  lora_targets: tuple[str, ...]
  dtype: Any
  remat_policy: str
  attn_impl: str
  initializer_range: float

  @classmethod
  def from_config(cls, config: Mapping | ml_collections.ConfigDict) -> "LLMSpec":
    c = with_defaults("llm", config, _DEFAULTS)
    bad = lambda msg: ValueError(f"invalid llm config: {msg}")  # noqa: E731
    if c["family"] not in FAMILIES:
      raise bad(f"family={c['family']!r} must be one of {FAMILIES}")
    h, kv = int(c["num_heads"]), int(c["num_kv_heads"])
    if kv <= 0 or h % kv:
      raise bad(f"num_heads={h} must be a multiple of num_kv_heads={kv}")
    if not c["head_dim"]:
      if c["hidden_size"] % h:
        raise bad(f"hidden_size={c['hidden_size']} must be divisible by num_heads={h} (or set head_dim)")
      c["head_dim"] = c["hidden_size"] // h
    if int(c["head_dim"]) % 2:
      raise bad(f"head_dim={c['head_dim']} must be even (rotary embedding)")
    targets = tuple(t for t in str(c["lora_targets"]).replace(" ", "").split(",") if t)
    if set(targets) - set(LORA_TARGETS):
      raise bad(f"lora_targets {sorted(set(targets) - set(LORA_TARGETS))} are not LoRA targets {LORA_TARGETS}")
    c["lora_targets"] = targets
    if c["dtype"] not in _DTYPES:
      raise bad(f"dtype={c['dtype']!r} must be one of {list(_DTYPES)}")
    if int(c["lora_rank"]) < 0:
      raise bad(f"lora_rank={c['lora_rank']} must be >= 0")
    remat.check(c["remat_policy"])
    c["dtype"] = _DTYPES[c["dtype"]]
    return cls(**{k: c[k] for k in (f.name for f in dataclasses.fields(cls))})

  def lora_on(self, name: str) -> bool:
    return self.lora_rank > 0 and name in self.lora_targets


class LoRALinear(nn.Module):
  """x . kernel (+ bias) (+ the LoRA update). kernel (in, out...) with logical axes; the adapters
  are `lora_a` (in, r) and `lora_b` (r, out...)."""
  features: tuple[int, ...]
  kernel_axes: tuple
  spec: LLMSpec
  use_bias: bool = False
  n_in: int = 1
  lora: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    s = self.spec
    in_shape = x.shape[x.ndim - self.n_in:]
    init = nn.initializers.normal(s.initializer_range)
    kernel = param_with_axes(self, "kernel", init, in_shape + self.features, self.kernel_axes)
    contract = tuple(range(x.ndim - self.n_in, x.ndim))
    dot = lambda a, w: jax.lax.dot_general(  # noqa: E731
        a.astype(s.dtype), w.astype(s.dtype), ((tuple(range(a.ndim - self.n_in, a.ndim)), tuple(range(self.n_in))), ((), ())))
    y = dot(x, kernel)
    if self.use_bias:
      y = y + param_with_axes(self, "bias", nn.initializers.zeros, self.features,
                              self.kernel_axes[self.n_in:]).astype(s.dtype)
    if self.lora:
      fan_in = math.prod(in_shape)
      bound = 1.0 / math.sqrt(fan_in)
      a = param_with_axes(self, "lora_a", lambda k, sh, dt: jax.random.uniform(k, sh, dt, -bound, bound),
                          in_shape + (s.lora_rank,), self.kernel_axes[:self.n_in] + (None,))
      b = param_with_axes(self, "lora_b", nn.initializers.zeros, (s.lora_rank,) + self.features,
                          (None,) + self.kernel_axes[self.n_in:])
      xd = nn.Dropout(s.lora_dropout)(x, deterministic=self.deterministic)
      low = jax.lax.dot_general(xd.astype(s.dtype), a.astype(s.dtype), ((contract, tuple(range(self.n_in))), ((), ())))
      y = y + jax.lax.dot_general(low, b.astype(s.dtype), (((low.ndim - 1,), (0,)), ((), ()))) * (
          s.lora_alpha / s.lora_rank)
    return y


def rope_angles(positions, head_dim: int, theta: float):
  """cos, sin [B, T, head_dim] in fp32 (HF: inv_freq = theta^(-2i/d), emb = cat(freqs, freqs))."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, H, D]; rotate-half convention, computed in fp32, cast back."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nn.Module):
  spec: LLMSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, cos, sin, mask, is_causal, cache, cache_index):
    s = self.spec
    h, kv, hd, d = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
    lin = lambda name, heads: LoRALinear(  # noqa: E731
        (heads, hd), ("embed", "heads", "head_dim"), s, use_bias=s.attention_bias, lora=s.lora_on(name),
        deterministic=self.deterministic, name=name)
    q = apply_rope(lin("q_proj", h)(x), cos, sin)
    k = apply_rope(lin("k_proj", kv)(x), cos, sin)
    v = lin("v_proj", kv)(x)
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    new_cache = None
    if cache is not None:  # write this call's keys/values at cache_index, attend over the buffer
      ck, cv = cache
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
      new_cache = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    if kv != h:  # GQA: query head i reads kv head i // (h / kv), as HF repeat_kv
      k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    o = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=s.attn_impl)
    o = checkpoint_name(o, "attn_context")
    y = LoRALinear((d,), ("heads", "head_dim", "embed"), s, n_in=2, lora=s.lora_on("o_proj"),
                   deterministic=self.deterministic, name="o_proj")(o)
    return checkpoint_name(y, "attn_out"), new_cache


class Mlp(nn.Module):
  spec: LLMSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    s = self.spec
    lin = lambda name, f, axes: LoRALinear(f, axes, s, lora=s.lora_on(name),  # noqa: E731
                                           deterministic=self.deterministic, name=name)
    gate = lin("gate_proj", (s.intermediate_size,), ("embed", "mlp"))(x)
    up = lin("up_proj", (s.intermediate_size,), ("embed", "mlp"))(x)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "tokens", "act_mlp"))
    return checkpoint_name(lin("down_proj", (s.hidden_size,), ("mlp", "embed"))(hidden), "mlp_out")


class DecoderLayer(nn.Module):
  """Pre-norm block (also the scan body): x + attn(norm(x)); x + mlp(norm(x))."""
  spec: LLMSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, cache, cos, sin, mask, is_causal, cache_index):
    s = self.spec

    def body(mdl, x, cache):
      norm = lambda name: RMSNorm(s.rms_norm_eps, name=name)  # noqa: E731
      a, new_cache = Attention(s, mdl.deterministic, name="self_attn")(
          norm("input_layernorm")(x).astype(s.dtype), cos, sin, mask, is_causal, cache, cache_index)
      x = x + a.astype(x.dtype)
      x = x + Mlp(s, mdl.deterministic, name="mlp")(norm("post_attention_layernorm")(x).astype(s.dtype)).astype(x.dtype)
      return x, new_cache

    policy = remat.policy(s.remat_policy)
    fn = nn.remat(body, policy=policy, prevent_cse=False) if policy is not None else body
    x, new_cache = fn(self, x, cache)
    return nn.with_logical_constraint(x, ("batch", "tokens", "act_embed")), new_cache


class LLM(nn.Module):
  """Causal LM. `__call__(ids=None, embeds=None, mask=None, positions=None, cache=None,
  cache_index=0)` -> (logits fp32 [B, T, V], new cache or None); `embed(ids)` gives the input
  embeddings (for splicing visual tokens in); `hidden` the final normalised states."""
  config: Any
  deterministic: bool = True

  @property
  def spec(self) -> LLMSpec:
    return LLMSpec.from_config(self.config)

  def setup(self):
    s = self.spec
    self.embed_tokens = param_with_axes(self, "embed_tokens", nn.initializers.normal(s.initializer_range),
                                        (s.vocab_size, s.hidden_size), ("vocab", "embed"))
    scanned = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=s.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    self.layers = scanned(s, self.deterministic)
    self.norm = RMSNorm(s.rms_norm_eps)
    if not s.tie_word_embeddings:
      self.lm_head = LoRALinear((s.vocab_size,), ("embed", "vocab"), s, lora=s.lora_on("lm_head"),
                                deterministic=self.deterministic)

  def embed(self, ids):
    return jnp.take(self.embed_tokens, ids, axis=0).astype(self.spec.dtype)

  def init_cache(self, batch: int, length: int, dtype=None):
    s = self.spec
    shape = (s.num_layers, batch, length, s.num_kv_heads, s.head_dim)
    z = jnp.zeros(shape, dtype or s.dtype)
    return z, z

  def hidden(self, embeds, mask=None, positions=None, cache=None, cache_index=0):
    s = self.spec
    b, t = embeds.shape[:2]
    if mask is None:
      mask = jnp.ones((b, t), jnp.int32)
    if positions is None:  # HF: position ids count the real tokens (left padding starts at 0)
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cos, sin = rope_angles(positions, s.head_dim, s.rope_theta)
    attn_mask, is_causal = self._attention_mask(mask, t, cache, cache_index)
    x = nn.with_logical_constraint(embeds.astype(s.dtype), ("batch", "tokens", "act_embed"))
    x, new_cache = self.layers(x, cache, cos, sin, attn_mask, is_causal, cache_index)
    return self.norm(x).astype(s.dtype), new_cache

  def logits(self, hidden):
    s = self.spec
    if s.tie_word_embeddings:
      out = jnp.einsum("btd,vd->btv", hidden, self.embed_tokens.astype(hidden.dtype))
    else:
      out = self.lm_head(hidden)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "tokens", "act_vocab"))

  def __call__(self, ids=None, embeds=None, mask=None, positions=None, cache=None, cache_index=0):
    if (ids is None) == (embeds is None):
      raise ValueError("LLM: pass exactly one of ids or embeds")
    if embeds is None:
      embeds = self.embed(ids)
    h, new_cache = self.hidden(embeds, mask, positions, cache, cache_index)
    return self.logits(h), new_cache

  def _attention_mask(self, mask, t, cache, cache_index):
    """(boolean mask or key-padding mask, is_causal). Without a cache: causal + key padding (the
    kernels' fast path) unless a sliding window needs the full mask. With a cache: `mask` covers
    the whole buffer [B, S] (1 = a real token was or is written there)."""
    s = self.spec
    if cache is None and not s.sliding_window:
      return mask.astype(bool), True
    q_slot = (cache_index if cache is not None else 0) + jnp.arange(t)
    k_slot = jnp.arange(mask.shape[1])
    visible = k_slot[None, :] <= q_slot[:, None]
    if s.sliding_window:
      visible &= q_slot[:, None] - k_slot[None, :] < s.sliding_window
    return visible[None, None] & mask.astype(bool)[:, None, None, :], False


def merge_lora(params: Mapping, config: Any, *, keep_adapters: bool = False, sign: float = 1.0) -> dict:
  """Folds each adapter into its kernel (kernel += A B * alpha / r). Without `keep_adapters` the
  adapters are dropped: the result is a plain model for the same config with lora_rank=0."""
  s = LLMSpec.from_config(config)
  scale = sign * s.lora_alpha / max(s.lora_rank, 1)

  def walk(tree, stacked):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping) and "lora_a" in v:
        delta = _lora_delta(jnp.asarray(v["lora_a"]), jnp.asarray(v["lora_b"]), stacked)
        out[k] = {kk: vv for kk, vv in v.items() if keep_adapters or kk not in ("lora_a", "lora_b")}
        out[k]["kernel"] = jnp.asarray(v["kernel"]) + scale * delta.astype(jnp.asarray(v["kernel"]).dtype)
      elif isinstance(v, Mapping):
        out[k] = walk(v, stacked or k == "layers")
      else:
        out[k] = v
    return out

  return walk(params, False)


def unmerge_lora(params: Mapping, config: Any) -> dict:
  """Takes merged adapters back out of their kernels (kernel -= A B * alpha / r), keeping them."""
  return merge_lora(params, config, keep_adapters=True, sign=-1.0)


def _lora_delta(a, b, stacked: bool):
  """A (in..., r) . B (r, out...) -> (in..., out...); per layer when stacked (leading axis)."""
  if stacked:
    return jax.vmap(lambda x, y: _lora_delta(x, y, False))(a, b)
  r = a.shape[-1]
  return (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(a.shape[:-1] + b.shape[1:])
