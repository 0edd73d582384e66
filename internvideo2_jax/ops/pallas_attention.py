"""Flash attention in Pallas (FlashAttention-2 algorithm), forward and backward, our own file.

Layout [B, T, H, D] like the entry point. Supported: non-causal and causal (aligned to the end
when Tq < Tk), key padding masks, an additive per-key bias broadcastable to [B, 1, 1, Tk] (the
BERT extended mask), any sequence length (padded to the block size and masked), head dims that
are not powers of two (88, 200: zero-padded to 128 / 256, which costs 45% / 28% extra matmul work
on those heads), fp32 accumulation for bf16/fp16/fp32 inputs.

The kernels use the portable `pl.pallas_call` + BlockSpec API (Triton lowering on NVIDIA GPUs);
on CPU they run in Pallas interpret mode, which is how the tests check them against the `xla`
reference. Backward: a dK/dV kernel over key blocks and a dQ kernel over query blocks, from the
saved log-sum-exp (custom VJP).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _scores(q, k, scale, kbias, q_idx, k_idx, causal, offset):
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale + kbias[None, :]
  if causal:
    s = jnp.where(q_idx[:, None] + offset >= k_idx[None, :], s, NEG)
  return s


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, l_ref, *, scale, block_k, causal, offset, block_q):
  qi = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32)
  d = q.shape[-1]
  q_idx = qi * block_q + jnp.arange(block_q)
  n_k = k_ref.shape[0] // block_k

  def body(j, carry):
    acc, m, l = carry
    sl = pl.ds(j * block_k, block_k)
    k = k_ref[sl, :].astype(jnp.float32)
    v = v_ref[sl, :].astype(jnp.float32)
    kb = b_ref[sl].astype(jnp.float32)
    s = _scores(q, k, scale, kb, q_idx, j * block_k + jnp.arange(block_k), causal, offset)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + p.sum(axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p, v, preferred_element_type=jnp.float32)
    return acc, m_new, l_new

  init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), NEG, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, n_k, body, init)
  l = jnp.maximum(l, 1e-30)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  l_ref[...] = m + jnp.log(l)


def _dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale,
                block_q, causal, offset, block_k):
  kj = pl.program_id(2)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  kb = b_ref[...].astype(jnp.float32)
  k_idx = kj * block_k + jnp.arange(block_k)
  n_q = q_ref.shape[0] // block_q

  def body(i, carry):
    dk, dv = carry
    sl = pl.ds(i * block_q, block_q)
    q = q_ref[sl, :].astype(jnp.float32)
    do = do_ref[sl, :].astype(jnp.float32)
    s = _scores(q, k, scale, kb, i * block_q + jnp.arange(block_q), k_idx, causal, offset)
    p = jnp.exp(s - lse_ref[sl][:, None])
    dv = dv + jnp.dot(p.T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[sl][:, None])
    dk = dk + jnp.dot(ds.T, q, preferred_element_type=jnp.float32) * scale
    return dk, dv

  dk, dv = jax.lax.fori_loop(0, n_q, body, (jnp.zeros_like(k), jnp.zeros_like(v)))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_k,
               causal, offset, block_q):
  qi = pl.program_id(2)
  q = q_ref[...].astype(jnp.float32)
  do = do_ref[...].astype(jnp.float32)
  lse, delta = lse_ref[...], delta_ref[...]
  q_idx = qi * block_q + jnp.arange(block_q)
  n_k = k_ref.shape[0] // block_k

  def body(j, dq):
    sl = pl.ds(j * block_k, block_k)
    k = k_ref[sl, :].astype(jnp.float32)
    v = v_ref[sl, :].astype(jnp.float32)
    s = _scores(q, k, scale, b_ref[sl].astype(jnp.float32), q_idx, j * block_k + jnp.arange(block_k),
                causal, offset)
    p = jnp.exp(s - lse[:, None])
    ds = p * (jnp.dot(do, v.T, preferred_element_type=jnp.float32) - delta[:, None])
    return dq + jnp.dot(ds, k, preferred_element_type=jnp.float32) * scale

  dq = jax.lax.fori_loop(0, n_k, body, jnp.zeros_like(q))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _specs(b, h, t, d, block, which):
  """BlockSpecs over [B, H, T, D] (heads moved next to batch inside the wrapper)."""
  if which == "block":
    return pl.BlockSpec((None, None, block, d), lambda bi, hi, i: (bi, hi, i, 0))
  return pl.BlockSpec((None, None, t, d), lambda bi, hi, i: (bi, hi, 0, 0))


def _vec_spec(t, block, which):
  if which == "block":
    return pl.BlockSpec((None, None, block), lambda bi, hi, i: (bi, hi, i))
  return pl.BlockSpec((None, None, t), lambda bi, hi, i: (bi, hi, 0))


def _bias_spec(tk, block, which):
  if which == "block":
    return pl.BlockSpec((None, block), lambda bi, hi, i: (bi, i))
  return pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, kbias, scale, causal, offset, block_q, block_k):
  return _flash_fwd(q, k, v, kbias, scale, causal, offset, block_q, block_k)[0]


def _flash_fwd(q, k, v, kbias, scale, causal, offset, block_q, block_k):
  b, h, tq, d = q.shape
  tk = k.shape[2]
  kern = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, causal=causal, offset=offset,
                           block_q=block_q)
  o, lse = pl.pallas_call(
      kern, grid=(b, h, tq // block_q),
      in_specs=[_specs(b, h, tq, d, block_q, "block"), _specs(b, h, tk, d, block_k, "full"),
                _specs(b, h, tk, d, block_k, "full"), _bias_spec(tk, block_k, "full")],
      out_specs=[_specs(b, h, tq, d, block_q, "block"), _vec_spec(tq, block_q, "block")],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
      interpret=_interpret())(q, k, v, kbias)
  return o, (q, k, v, kbias, o, lse)


def _flash_bwd(scale, causal, offset, block_q, block_k, res, do):
  q, k, v, kbias, o, lse = res
  b, h, tq, d = q.shape
  tk = k.shape[2]
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # (B, H, Tq)
  common = dict(scale=scale, causal=causal, offset=offset, block_q=block_q, block_k=block_k)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common), grid=(b, h, tk // block_k),
      in_specs=[_specs(b, h, tq, d, block_q, "full"), _specs(b, h, tk, d, block_k, "block"),
                _specs(b, h, tk, d, block_k, "block"), _bias_spec(tk, block_k, "block"),
                _specs(b, h, tq, d, block_q, "full"), _vec_spec(tq, block_q, "full"),
                _vec_spec(tq, block_q, "full")],
      out_specs=[_specs(b, h, tk, d, block_k, "block"), _specs(b, h, tk, d, block_k, "block")],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=_interpret())(q, k, v, kbias, do, lse, delta)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=(b, h, tq // block_q),
      in_specs=[_specs(b, h, tq, d, block_q, "block"), _specs(b, h, tk, d, block_k, "full"),
                _specs(b, h, tk, d, block_k, "full"), _bias_spec(tk, block_k, "full"),
                _specs(b, h, tq, d, block_q, "block"), _vec_spec(tq, block_q, "block"),
                _vec_spec(tq, block_q, "block")],
      out_specs=_specs(b, h, tq, d, block_q, "block"),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=_interpret())(q, k, v, kbias, do, lse, delta)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _key_bias(b, tk, tk_pad, mask, bias):
  """Per-key additive bias (B, Tk_pad): padding -> -1e30, masked keys -> -1e30, + user bias."""
  kb = jnp.zeros((b, tk_pad), jnp.float32)
  kb = kb.at[:, tk:].set(NEG)
  if bias is not None:
    kb = kb.at[:, :tk].add(jnp.broadcast_to(bias.astype(jnp.float32).reshape(bias.shape[0], -1), (b, tk)))
  if mask is not None:
    kb = kb.at[:, :tk].set(jnp.where(jnp.broadcast_to(mask.reshape(mask.shape[0], -1), (b, tk)),
                                     kb[:, :tk], NEG))
  return kb


def pallas_attention(q, k, v, *, mask=None, bias=None, scale=None, is_causal=False,
                     block_q: int = 64, block_k: int = 64):
  """[B, T, H, D] attention through the Pallas kernels (see module docstring)."""
  b, tq, h, d = q.shape
  tk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  dp = _pow2(d)
  bq = min(block_q, _pow2(tq))
  bk = min(block_k, _pow2(tk))
  tq_pad, tk_pad = math.ceil(tq / bq) * bq, math.ceil(tk / bk) * bk

  def prep(x, t_pad):
    x = jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
    return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - x.shape[2]), (0, dp - d)))

  kb = _key_bias(b, tk, tk_pad, None if mask is None else _key_mask(mask, b, tk),
                 None if bias is None else _key_only(bias, b, tk))
  out = _flash(prep(q, tq_pad), prep(k, tk_pad), prep(v, tk_pad), kb, float(scale), bool(is_causal),
               int(tk - tq), bq, bk)
  return jnp.swapaxes(out[:, :, :tq, :d], 1, 2)


def _key_mask(mask, b, tk):
  mask = jnp.asarray(mask)
  if mask.ndim == 4:
    mask = mask.reshape(mask.shape[0], mask.shape[-1])
  return jnp.broadcast_to(mask, (b, tk))


def _key_only(bias, b, tk):
  bias = jnp.asarray(bias)
  if bias.ndim == 4:
    bias = bias.reshape(bias.shape[0], bias.shape[-1])
  return jnp.broadcast_to(bias, (b, tk))


def supports(spec) -> Optional[str]:
  if spec.platform not in ("gpu", "cpu"):  # CPU runs it in interpret mode (tests); TPU has its own
    return f"the Pallas GPU kernel does not run on {spec.platform}"
  if not spec.key_only_mask:
    return "the Pallas kernel takes key-padding masks / per-key biases only ([B, Tk] or [B, 1, 1, Tk])"
  if spec.has_dropout:
    return "no attention dropout in the Pallas kernel"
  if spec.head_dim > 256:
    return f"head_dim {spec.head_dim} > 256"
  return None
