"""The attention entry point: reference numerics, masks, head dims, dispatch and errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.ops import attention as A


def naive(q, k, v, mask=None, causal=False):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("head_dim", [64, 88, 128, 200])
def test_xla_matches_naive_all_head_dims(head_dim):
  rng = np.random.default_rng(head_dim)
  q, k, v = (rng.standard_normal((2, 9, 3, head_dim)).astype(np.float32) for _ in range(3))
  out = A.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(out, naive(q, k, v), atol=1e-5)


def test_padding_mask_and_causal():
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((2, 7, 2, 16)).astype(np.float32) for _ in range(3))
  mask = np.ones((2, 7), bool)
  mask[0, 5:] = False
  out = A.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, naive(q, k, v, mask=mask), atol=1e-5)
  # padded keys have no influence at all
  v2 = v.copy()
  v2[0, 5:] = 1e3
  np.testing.assert_allclose(A.dot_product_attention(q, k, v2, mask=mask), out, atol=1e-5)
  out = A.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(out, naive(q, k, v, causal=True), atol=1e-5)


def test_bf16_keeps_fp32_softmax():
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((1, 33, 2, 64)).astype(np.float32) for _ in range(3))
  out = A.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive(q, k, v), atol=3e-2)


def test_auto_falls_back_on_cpu_and_explicit_cudnn_errors(caplog):
  q = jnp.ones((1, 4, 2, 64), jnp.bfloat16)
  spec = A.AttentionSpec("gpu", jnp.dtype(jnp.float32), 4, 4, 2, 64, False, False, False)
  with caplog.at_level(logging.INFO, logger=A.__name__):
    assert A.select_implementation(spec) == "pallas"
  assert "fp16/bf16" in caplog.text  # the reason for passing over cuDNN is logged
  dropout = A.AttentionSpec("gpu", jnp.dtype(jnp.bfloat16), 4, 4, 2, 64, False, False, False, True)
  assert A.select_implementation(dropout) == "xla"  # neither kernel does attention dropout
  assert A.select_implementation(A.AttentionSpec("cpu", jnp.dtype(jnp.float32), 4, 4, 2, 64,
                                                 False, False, False)) == "xla"
  ok = A.AttentionSpec("gpu", jnp.dtype(jnp.bfloat16), 4, 4, 2, 88, False, False, False)
  assert A.select_implementation(ok) == "cudnn"
  with pytest.raises(ValueError, match="cannot run this call: cuDNN needs a GPU"):
    A.dot_product_attention(q, q, q, implementation="cudnn")
  with pytest.raises(ValueError, match="unknown attention implementation"):
    A.dot_product_attention(q, q, q, implementation="flash9")


def test_bad_shapes_and_masks():
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
    A.dot_product_attention(q[0], q[0], q[0])
  with pytest.raises(TypeError, match="boolean"):
    A.dot_product_attention(q, q, q, mask=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="key-padding mask"):
    A.dot_product_attention(q, q, q, mask=jnp.ones((1, 5), bool))


def test_register_makes_auto_pick_a_kernel():
  calls = []

  def fake(q, k, v, **kw):
    calls.append(q.shape)
    return A.xla_attention(q, k, v, **kw)

  A.register("fake_cpu_kernel", fake, lambda s: None, auto_platforms=("cpu",))
  try:
    q = jnp.ones((1, 4, 2, 8))
    A.dot_product_attention(q, q, q)
    assert calls == [(1, 4, 2, 8)]
  finally:
    A._REGISTRY.pop("fake_cpu_kernel")
    A._AUTO_ORDER["cpu"].remove("fake_cpu_kernel")
