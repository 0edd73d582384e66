"""The one attention entry point: `dot_product_attention(q, k, v, ...)`.

Layout is [batch, tokens, heads, head_dim] for q, k and v. Implementations:

* ``xla``   - the numerics reference: logits and softmax in fp32, output in q's dtype.
* ``cudnn`` - ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, fp16/bf16 only).
* ``auto``  - the fastest implementation that supports the call; every fallback is logged once
  with its reason.

Further implementations (our Pallas kernels) register themselves with `register`, giving a
``supports(spec) -> reason | None`` predicate, so `auto` can pick them without this module
knowing about them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from internvideo2_jax.ops import platform as platform_lib

log = logging.getLogger(__name__)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """What an implementation needs to know to accept or refuse a call (all static)."""
  platform: str
  dtype: jnp.dtype
  q_len: int
  kv_len: int
  num_heads: int
  head_dim: int
  has_mask: bool
  has_bias: bool
  is_causal: bool
  has_dropout: bool = False
  key_only_mask: bool = True   # mask / bias (if any) depend on the key position only


@dataclasses.dataclass(frozen=True)
class Implementation:
  fn: Callable[..., Array]
  # Returns None when the call is supported, else a short human-readable reason.
  supports: Callable[[AttentionSpec], Optional[str]]


_REGISTRY: dict[str, Implementation] = {}
# `auto` tries these in order per platform; the first that supports the call wins.
_AUTO_ORDER: dict[str, list[str]] = {"gpu": ["cudnn", "xla"], "tpu": ["xla"], "cpu": ["xla"]}


def register(name: str, fn, supports, *, auto_platforms: tuple[str, ...] = (), first: bool = True):
  """Adds an implementation; `auto_platforms` lists the platforms where `auto` may pick it."""
  _REGISTRY[name] = Implementation(fn, supports)
  for platform in auto_platforms:
    order = _AUTO_ORDER.setdefault(platform, ["xla"])
    if name in order:
      order.remove(name)
    order.insert(0 if first else len(order) - 1, name)


def implementations() -> list[str]:
  return sorted(_REGISTRY) + ["auto"]


# ----------------------------------------------------------------------------- masks


def _broadcast_mask(mask: Optional[Array], b: int, h: int, tq: int, tk: int) -> Optional[Array]:
  """Normalises a mask to a boolean [B|1, H|1, Tq|1, Tk] array (True = attend).

  Accepted: key padding [B, Tk], or anything broadcastable to [B, H, Tq, Tk].
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
  if mask.ndim == 2:  # key padding
    if mask.shape != (b, tk) and mask.shape != (1, tk):
      raise ValueError(f"key-padding mask must be [batch={b}, kv_len={tk}], got {mask.shape}")
    return mask[:, None, None, :]
  if mask.ndim != 4:
    raise ValueError(f"attention mask must be [B, Tk] or 4-D [B, H, Tq, Tk], got {mask.shape}")
  try:
    jnp.broadcast_shapes(mask.shape, (b, h, tq, tk))
  except ValueError:
    raise ValueError(f"attention mask {mask.shape} does not broadcast to {(b, h, tq, tk)}") from None
  return mask


# ----------------------------------------------------------------------------- xla


def xla_attention(q, k, v, *, mask=None, bias=None, scale=None, is_causal=False,
                  dropout_rate=0.0, dropout_rng=None):
  """Reference attention: fp32 logits and softmax, output in q's dtype; optional dropout on the
  attention probabilities (BERT's attention_probs_dropout)."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = _broadcast_mask(mask, b, h, tq, tk)
  if is_causal:
    causal = jnp.tril(jnp.ones((tq, tk), jnp.bool_), k=tk - tq)[None, None]
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    # A finite fill keeps fully masked rows finite (uniform weights) instead of NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _xla_supports(spec: AttentionSpec) -> Optional[str]:
  return None


# ----------------------------------------------------------------------------- cudnn


def cudnn_attention(q, k, v, *, mask=None, bias=None, scale=None, is_causal=False, **_):
  b, tq, h, _ = q.shape
  mask = _broadcast_mask(mask, b, h, tq, k.shape[1])
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation="cudnn")


def _cudnn_supports(spec: AttentionSpec) -> Optional[str]:
  if spec.platform != "gpu":
    return f"cuDNN needs a GPU (platform is {spec.platform})"
  if spec.has_dropout:
    return "attention dropout is not supported by jax.nn.dot_product_attention"
  if spec.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN flash attention needs fp16/bf16 inputs, got {spec.dtype}"
  if spec.head_dim % 8 or spec.head_dim > 128:
    return f"cuDNN flash attention needs head_dim % 8 == 0 and <= 128, got {spec.head_dim}"
  return None


def _key_only(x) -> bool:
  return x is None or x.ndim == 2 or (x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == 1)


def _pallas(q, k, v, **kw):
  from internvideo2_jax.ops.pallas_attention import pallas_attention
  return pallas_attention(q, k, v, **kw)


def _pallas_supports(spec):
  from internvideo2_jax.ops.pallas_attention import supports
  return supports(spec)


register("xla", xla_attention, _xla_supports)
register("cudnn", cudnn_attention, _cudnn_supports)
# On GPU, `auto` prefers cuDNN where it runs and takes our kernel where cuDNN cannot (fp32,
# head dims > 128 such as the 6B pooling head's 200); BENCHMARKS.md will decide the rest once
# measured on a GPU.
register("pallas", _pallas, _pallas_supports)
_AUTO_ORDER["gpu"] = ["cudnn", "pallas", "xla"]


def _tpu_flash(q, k, v, **kw):
  from internvideo2_jax.ops.tpu_attention import tpu_flash_attention
  return tpu_flash_attention(q, k, v, **kw)


def _tpu_flash_supports(spec):
  from internvideo2_jax.ops.tpu_attention import supports
  return supports(spec)


# jax's Pallas TPU flash kernel (ops/tpu_attention.py); its import stays lazy for CPU/GPU users.
register("tpu_flash", _tpu_flash, _tpu_flash_supports, auto_platforms=("tpu",))


# ----------------------------------------------------------------------------- entry point


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
  log.info(message)


def select_implementation(spec: AttentionSpec, implementation: str = "auto") -> str:
  """Resolves `implementation` for a call; raises a clear error if an explicit one cannot run."""
  if implementation != "auto":
    if implementation not in _REGISTRY:
      raise ValueError(f"unknown attention implementation {implementation!r}; "
                       f"choose from {implementations()}")
    reason = _REGISTRY[implementation].supports(spec)
    if reason is not None:
      raise ValueError(f"attention implementation {implementation!r} cannot run this call: {reason}")
    return implementation
  reasons = []
  for name in _AUTO_ORDER.get(spec.platform, ["xla"]):
    reason = _REGISTRY[name].supports(spec)
    if reason is None:
      if reasons:
        _log_once(f"attention auto -> {name} for {_describe(spec)} ({'; '.join(reasons)})")
      return name
    reasons.append(f"{name}: {reason}")
  raise AssertionError("xla always supports the call")


def _describe(spec: AttentionSpec) -> str:
  return (f"{spec.dtype} q_len={spec.q_len} kv_len={spec.kv_len} heads={spec.num_heads} "
          f"head_dim={spec.head_dim}")


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
                          bias: Optional[Array] = None, scale: Optional[float] = None,
                          is_causal: bool = False, implementation: str = "auto",
                          dropout_rate: float = 0.0, dropout_rng=None) -> Array:
  """Multi-head attention on [B, T, H, D] inputs.

  Args:
    q: queries [B, Tq, H, D]; k, v: keys and values [B, Tk, H, D].
    mask: boolean, True = attend; key padding [B, Tk] or broadcastable to [B, H, Tq, Tk].
    bias: additive logits bias broadcastable to [B, H, Tq, Tk].
    scale: logits scale, default D ** -0.5.
    is_causal: lower-triangular mask (aligned to the end when Tq < Tk).
    implementation: "auto", "xla", "cudnn" or a registered kernel.
    dropout_rate, dropout_rng: dropout on the attention probabilities (training only).
  Returns:
    [B, Tq, H, D] in q's dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"incompatible q/k/v shapes {q.shape}, {k.shape}, {v.shape}")
  spec = AttentionSpec(platform=platform_lib.current(), dtype=jnp.dtype(q.dtype), q_len=q.shape[1],
                       kv_len=k.shape[1], num_heads=q.shape[2], head_dim=q.shape[3],
                       has_mask=mask is not None, has_bias=bias is not None, is_causal=is_causal,
                       has_dropout=dropout_rate > 0.0,
                       key_only_mask=_key_only(mask) and _key_only(bias))
  name = select_implementation(spec, implementation)
  kw = {"dropout_rate": dropout_rate, "dropout_rng": dropout_rng} if dropout_rate > 0.0 else {}
  return _REGISTRY[name].fn(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal, **kw)

