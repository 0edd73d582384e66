"""Our Pallas flash attention (interpret mode on CPU) against the `xla` reference: outputs and
gradients, odd lengths, masks, per-key bias, causal, every head dim that occurs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.ops import attention as A


def _inputs(rng, b, tq, tk, h, d, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, tq, h, d), (b, tk, h, d), (b, tk, h, d)))


@pytest.mark.parametrize("tq,tk,d,causal,masked", [
    (65, 65, 88, False, False),    # ViT-1B head dim, 1 + 64 tokens (not a block multiple)
    (33, 70, 64, False, True),     # key padding, Tq != Tk
    (24, 40, 200, True, False),    # the 6B pooling head dim; causal aligned to the end
    (17, 17, 128, False, True),
])
def test_forward_and_gradients_match_reference(tq, tk, d, causal, masked):
  rng = np.random.default_rng(tq)
  q, k, v = _inputs(rng, 2, tq, tk, 2, d)
  mask = None
  if masked:
    m = np.ones((2, tk), bool)
    m[0, tk // 2:] = False
    mask = jnp.asarray(m)
  w = jnp.cos(jnp.arange(d, dtype=jnp.float32))

  def loss(impl):
    return lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                           implementation=impl) * w)

  np.testing.assert_allclose(A.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="pallas"),
                             A.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla"),
                             atol=2e-5)
  for a, b in zip(jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_bert_bias_and_bf16():
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 2, 12, 12, 4, 64, jnp.bfloat16)
  valid = np.ones((2, 12), np.float32)
  valid[1, 8:] = 0
  bias = jnp.asarray((1.0 - valid) * -10000.0)[:, None, None, :]  # the BERT extended mask
  out = A.dot_product_attention(q, k, v, bias=bias, implementation="pallas")
  ref = A.dot_product_attention(q, k, v, bias=bias, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)


def test_general_masks_are_refused_with_a_reason():
  q = jnp.ones((1, 4, 2, 16))
  with pytest.raises(ValueError, match="key-padding masks"):
    A.dot_product_attention(q, q, q, mask=jnp.ones((1, 2, 4, 4), bool), implementation="pallas")
  spec = A.AttentionSpec("gpu", jnp.dtype(jnp.float32), 1025, 1025, 16, 88, False, False, False)
  assert A.select_implementation(spec) == "pallas"  # cuDNN refuses fp32: our kernel takes it
  spec = A.AttentionSpec("gpu", jnp.dtype(jnp.bfloat16), 1025, 1025, 16, 200, False, False, False)
  assert A.select_implementation(spec) == "pallas"  # head dim 200: beyond cuDNN


@pytest.mark.gpu
def test_on_gpu_against_reference():
  rng = np.random.default_rng(0)
  for d in (64, 88, 128, 200):
    q, k, v = _inputs(rng, 2, 1025, 1025, 4, d, jnp.bfloat16)
    out = A.dot_product_attention(q, k, v, implementation="pallas")
    ref = A.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
