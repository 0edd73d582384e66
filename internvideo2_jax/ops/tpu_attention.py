"""TPU attention through jax's Pallas TPU flash kernel (`jax.experimental.pallas.ops.tpu`).

Registered as ``tpu_flash``; `auto` picks it on TPU. Layout [B, T, H, D] like the entry point
(transposed to the kernel's [B, H, T, D] here). Supported: bf16 and fp32, head dims up to 256,
any sequence length, non-causal and causal (Tq == Tk), key-padding masks, additive biases and
general masks.

How the entry point's arguments map onto the kernel:

* Sequences are padded to the kernel's block multiple (keys to 128, the lane width the kernel
  requires; queries to 16 when short, else 128) and the padded keys are masked; the output is
  sliced back. Head dims above 128 that are not a multiple of 128 (200) are zero-padded (256),
  which the forward kernel requires; zero columns change neither q.k nor the kept output columns.
* Key-padding masks ([B, Tk], [B, 1, 1, Tk]) and padded keys become kv `segment_ids` (1 = attend,
  0 = masked, every query 1): a [B, T] int32 array that the kernel compares per tile. The
  alternative, a -inf-ish bias in `ab`, would stream a [B, H, Tq, Tk] array through HBM in the
  forward and write its gradient in the backward, i.e. the memory traffic flash attention avoids.
* Biases (per-key or full) go into `ab`, broadcast to [B, H, Tq, Tk] in fp32: the kernel has no
  per-key bias input. That costs O(Tq * Tk) memory, fine at text lengths. The kernel adds `ab`
  *before* multiplying by `sm_scale`, so we pass bias / scale. Masks that depend on the query or
  head (not key-only) are folded into `ab` as -1e30.
* Under a mesh (`jax.set_mesh`) the pallas_call, which GSPMD cannot partition, runs in a
  `shard_map`: batch over the batch mesh axes that divide it, heads over `tensor` if it divides
  them, everything else replicated. Inside a user's `shard_map` it maps over the axes still
  free; with `check_vma=True` there the backward fails (jax's kernel VJP is not vma-aware), so
  such callers use `check_vma=False` or ``xla``.

Refused (so `auto` falls back to ``xla``): attention dropout, causal with Tq != Tk (the kernel's
causal mask is aligned to the start, ours to the end), fp16 and other dtypes, head dims > 256.
Rows whose keys are all masked get uniform weights over the padded keys too (as our GPU kernel),
where ``xla`` spreads them over the real keys only; such rows carry no information either way.
On CPU the kernel only runs under `pltpu.force_tpu_interpret_mode()` (the tests).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from internvideo2_jax.parallel.rules import BATCH_AXES, DEFAULT_RULES  # plain data, no flax

NEG = -1e30
LANES = 128
HEAD_AXIS = dict(DEFAULT_RULES)["act_heads"]  # "tensor"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(t: int) -> int:
  """Largest of 512 / 256 / 128 dividing t (t is a multiple of 128), else t itself (short q).

  Untuned: bigger tiles amortise the per-grid-step cost; padding further to reach them (2049 ->
  2560) would cost more than it saves.
  """
  for b in (512, 256, 128):
    if t % b == 0:
      return b
  return t


def _key_only(x) -> bool:
  return x.ndim == 2 or (x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == 1)


def _mesh_specs(b: int, h: int):
  """(shard_map axis names, batch axes, head axis) for the ambient mesh, or None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
  if not any(mesh.shape[n] > 1 for n in free):
    return None
  batch, n = [], 1
  for a in BATCH_AXES:
    if a in free and mesh.shape[a] > 1 and b % (n * mesh.shape[a]) == 0:
      batch.append(a)
      n *= mesh.shape[a]
  heads = None
  if HEAD_AXIS in free and mesh.shape[HEAD_AXIS] > 1 and h % mesh.shape[HEAD_AXIS] == 0:
    heads = HEAD_AXIS
  return frozenset(free), tuple(batch) or None, heads


def tpu_flash_attention(q, k, v, *, mask=None, bias=None, scale=None, is_causal=False):
  """[B, T, H, D] attention through jax's Pallas TPU flash kernel (see module docstring)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU users only

  b, tq, h, d = q.shape
  tk = k.shape[1]
  scale = d ** -0.5 if scale is None else float(scale)
  dp = d if d <= LANES else _round_up(d, LANES)
  tk_pad = _round_up(tk, LANES)
  tq_pad = _round_up(tq, 16) if tq <= LANES else _round_up(tq, LANES)

  def prep(x, t_pad):
    x = jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
    return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - x.shape[2]), (0, dp - d)))

  key_mask = full_mask = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if _key_only(mask):
      key_mask = jnp.broadcast_to(mask.reshape(mask.shape[0], mask.shape[-1]), (b, tk))
    else:
      full_mask = mask

  segment_ids = None
  if key_mask is not None or tk_pad > tk:
    kv = jnp.ones((b, tk), jnp.int32) if key_mask is None else key_mask.astype(jnp.int32)
    segment_ids = fa.SegmentIds(q=jnp.ones((b, tq_pad), jnp.int32),
                                kv=jnp.pad(kv, ((0, 0), (0, tk_pad - tk))))

  ab = None
  if bias is not None or full_mask is not None:
    # The kernel computes (q.k + ab) * sm_scale; the clamp keeps -inf / finfo.min biases finite.
    ab = jnp.zeros((b, h, tq, tk), jnp.float32)
    if bias is not None:
      ab = jnp.maximum(jnp.broadcast_to(bias.astype(jnp.float32), ab.shape) / scale, NEG)
    if full_mask is not None:
      ab = jnp.where(jnp.broadcast_to(full_mask, ab.shape), ab, NEG)
    ab = jnp.pad(ab, ((0, 0), (0, 0), (0, tq_pad - tq), (0, tk_pad - tk)))

  bq, bk = _block(tq_pad), _block(tk_pad)
  blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                         block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                         block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)

  def kernel(q, k, v, *extra):
    extra = iter(extra)
    return fa.flash_attention(q, k, v, next(extra) if ab is not None else None,
                              next(extra) if segment_ids is not None else None,
                              causal=bool(is_causal), sm_scale=scale, block_sizes=blocks)

  args = [prep(q, tq_pad), prep(k, tk_pad), prep(v, tk_pad)]
  args += [x for x in (ab, segment_ids) if x is not None]
  sharding = _mesh_specs(b, h)
  if sharding is not None:
    axis_names, batch, heads = sharding
    x, ids = P(batch, heads, None, None), P(batch, None)
    specs = [x, x, x] + [s for a, s in ((ab, x), (segment_ids, fa.SegmentIds(ids, ids)))
                         if a is not None]
    kernel = jax.shard_map(kernel, in_specs=tuple(specs), out_specs=x, axis_names=axis_names,
                           check_vma=False)
  out = kernel(*args)
  return jnp.swapaxes(out[:, :, :tq, :d], 1, 2)


def supports(spec) -> Optional[str]:
  if spec.platform not in ("tpu", "cpu"):  # CPU: interpret mode only (tests)
    return f"the Pallas TPU kernel does not run on {spec.platform}"
  if spec.has_dropout:
    return "no attention dropout in the Pallas TPU kernel"
  if spec.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    return f"the Pallas TPU kernel takes bf16 / fp32, got {spec.dtype}"
  if spec.is_causal and spec.q_len != spec.kv_len:
    return "the TPU kernel's causal mask is aligned to the start; causal needs q_len == kv_len"
  if spec.head_dim > 256:
    return f"head_dim {spec.head_dim} > 256"
  return None
