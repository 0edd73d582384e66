"""Attention TFLOP/s, forward and forward+backward, for xla / cudnn / pallas at InternVideo2 shapes.

    python benchmarks/attention.py            # on a GPU: the table for BENCHMARKS.md
    python benchmarks/attention.py --smoke    # tiny shapes, any machine (checks the script runs)

Shapes (bf16): ViT-1B (16 heads x 88) and ViT-6B (25 x 128) at 1 + T x 256 tokens for T = 4, 8,
16, and the stage-1 visible length 1 + 8 x 52 = 417; also the 6B pooling head (16 x 200, one
query). FLOPs: 4 * B * H * Tq * Tk * D forward (QK^T and PV), x 2.5 for forward + backward.
Implementations that refuse a shape print the reason.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from internvideo2_jax.ops import attention as A

SHAPES = [  # name, batch, q_len, kv_len, heads, head_dim
    ("1B 1+4x256", 8, 1025, 1025, 16, 88), ("1B 1+8x256", 4, 2049, 2049, 16, 88),
    ("1B 1+16x256", 2, 4097, 4097, 16, 88), ("1B stage-1 visible 417", 32, 417, 417, 16, 88),
    ("6B 1+4x256", 4, 1025, 1025, 25, 128), ("6B 1+8x256", 2, 2049, 2049, 25, 128),
    ("6B 1+16x256", 1, 4097, 4097, 25, 128), ("6B stage-1 visible 417", 16, 417, 417, 25, 128),
    ("6B pool head", 32, 1, 1025, 16, 200),
]
SMOKE = [("smoke 65", 2, 65, 65, 2, 88), ("smoke pool", 2, 1, 33, 2, 200)]


def bench(fn, *args, n=10):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args()
  shapes = SMOKE if a.smoke else SHAPES
  dtype = jnp.float32 if a.smoke else jnp.bfloat16
  impls = ["xla", "pallas"] if a.smoke else ["xla", "cudnn", "pallas"]
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {jnp.dtype(dtype).name}")
  print("| shape | impl | fwd TFLOP/s | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|")
  for name, b, tq, tk, h, d in shapes:
    key = jax.random.key(0)
    q = jax.random.normal(key, (b, tq, h, d), dtype)
    k = jax.random.normal(jax.random.fold_in(key, 1), (b, tk, h, d), dtype)
    v = jax.random.normal(jax.random.fold_in(key, 2), (b, tk, h, d), dtype)
    flops = 4 * b * h * tq * tk * d
    for impl in impls:
      try:
        fwd = jax.jit(lambda q, k, v, i=impl: A.dot_product_attention(q, k, v, implementation=i))
        grad = jax.jit(jax.grad(lambda q, k, v, i=impl: jnp.sum(
            A.dot_product_attention(q, k, v, implementation=i).astype(jnp.float32)), argnums=(0, 1, 2)))
        tf = bench(fwd, q, k, v)
        tb = bench(grad, q, k, v)
        print(f"| {name} | {impl} | {flops / tf / 1e12:.1f} | {2.5 * flops / tb / 1e12:.1f} |", flush=True)
      except Exception as e:  # noqa: BLE001 - report and go on
        print(f"| {name} | {impl} | n/a | n/a ({type(e).__name__}: {str(e)[:80]}) |", flush=True)


if __name__ == "__main__":
  main()
