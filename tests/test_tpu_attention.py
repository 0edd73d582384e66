"""The TPU flash attention path (ops/tpu_attention.py): numerics against the `xla` reference in
Pallas TPU interpret mode on CPU, and an ahead-of-time compile for a real TPU topology showing
that `auto` picks the Pallas kernel there (needs the libtpu copy under .venv/libtpu)."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from internvideo2_jax.ops import attention as A
from internvideo2_jax.ops import platform as platform_lib

LIBTPU = pathlib.Path(__file__).resolve().parents[1] / ".venv/libtpu/libtpu/libtpu.so"
MARKER = "tpu_custom_call"  # the custom-call target of every Mosaic (Pallas TPU) kernel


def _inputs(rng, b, tq, tk, h, d, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((b, tq, h, d), (b, tk, h, d), (b, tk, h, d)))


@pytest.mark.parametrize("tq,tk,d,causal,mask,bias", [
    (70, 70, 88, False, "keys", "keys"),      # odd length, ViT-1B head dim, key padding, BERT bias
    (40, 40, 200, True, "keys", None),        # the 6B pooling head dim (padded to 256), causal
    (17, 130, 64, False, "full", "full"),     # Tq != Tk, two key blocks, query-dependent mask/bias
])
def test_forward_and_gradients_match_reference(tq, tk, d, causal, mask, bias):
  rng = np.random.default_rng(tk + d)
  b, h = 2, 2
  q, k, v = _inputs(rng, b, tq, tk, h, d)
  if mask == "keys":
    m = np.ones((b, tk), bool)
    m[0, tk // 3:] = False
    mask = jnp.asarray(m)
  elif mask == "full":
    mask = jnp.asarray(rng.random((b, 1, tq, tk)) > 0.3)
  if bias == "keys":
    bias = jnp.asarray(np.where(rng.random((b, 1, 1, tk)) > 0.2, 0.0, -10000.0)
                       + rng.standard_normal((b, 1, 1, tk)), jnp.float32)
  elif bias == "full":
    bias = jnp.asarray(rng.standard_normal((1, h, tq, tk)), jnp.float32)
  w = jnp.cos(jnp.arange(d, dtype=jnp.float32))

  def run(impl):
    def loss(q, k, v):
      out = A.dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=causal,
                                    implementation=impl)
      return jnp.sum(out * w), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  with pltpu.force_tpu_interpret_mode():
    grads, out = run("tpu_flash")
  ref_grads, ref = run("xla")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  for a, r in zip(grads, ref_grads):
    np.testing.assert_allclose(a, r, atol=5e-5, rtol=1e-4)


def test_sharded_gradients_match_reference():
  # Under a mesh the kernel runs in a shard_map: batch 2 splits over `data` only (fsdp is left
  # replicated, whose gradients must not be summed twice), heads over `tensor`.
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 2, 40, 40, 2, 64)
  mask = jnp.asarray(rng.random((2, 40)) > 0.3)
  w = jnp.cos(jnp.arange(64, dtype=jnp.float32))

  def run(impl):
    loss = lambda q, k, v: jnp.sum(
        A.dot_product_attention(q, k, v, mask=mask, implementation=impl) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  with jax.set_mesh(mesh), pltpu.force_tpu_interpret_mode():
    grads = run("tpu_flash")
  for a, r in zip(grads, run("xla")):
    np.testing.assert_allclose(a, r, atol=5e-6)


def _spec(platform, **kw):
  fields = dict(platform=platform, dtype=jnp.dtype(jnp.bfloat16), q_len=2049, kv_len=2049,
                num_heads=16, head_dim=88, has_mask=True, has_bias=False, is_causal=False)
  return A.AttentionSpec(**{**fields, **kw})


def test_auto_selection():
  assert A._AUTO_ORDER["tpu"] == ["tpu_flash", "xla"]
  for d in (64, 88, 128, 200):
    assert A.select_implementation(_spec("cpu", head_dim=d)) == "xla"
    assert A.select_implementation(_spec("tpu", head_dim=d)) == "tpu_flash"
  # What the kernel cannot do falls back to xla on TPU.
  assert A.select_implementation(_spec("tpu", has_dropout=True)) == "xla"
  assert A.select_implementation(_spec("tpu", is_causal=True, q_len=1)) == "xla"
  assert A.select_implementation(_spec("tpu", dtype=jnp.dtype(jnp.float16))) == "xla"
  assert A.select_implementation(_spec("tpu", head_dim=320)) == "xla"
  with pytest.raises(ValueError, match="does not run on gpu"):
    A.select_implementation(_spec("gpu"), "tpu_flash")


def test_auto_under_a_cpu_mesh_is_xla():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  q, k, v = _inputs(np.random.default_rng(0), 4, 206, 206, 2, 88)
  seen = []

  def attend(q, k, v):
    seen.append(platform_lib.current())
    return A.dot_product_attention(q, k, v)

  with jax.set_mesh(mesh):
    hlo = jax.jit(attend).lower(q, k, v).as_text()
    out = jax.jit(attend)(q, k, v)
  assert seen[0] == "cpu" and platform_lib.current() == "cpu"
  assert "pallas" not in hlo and MARKER not in hlo
  np.testing.assert_allclose(out, A.xla_attention(q, k, v), atol=1e-6)


@pytest.fixture(scope="module")
def tpu_mesh():
  if not LIBTPU.exists():
    pytest.skip(f"no libtpu at {LIBTPU} (installed outside site-packages on purpose)")
  os.environ["TPU_LIBRARY_PATH"] = str(LIBTPU)
  # Compile-only: no chips are opened, so other processes' libtpu locks do not matter.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  errors = []
  for name in ("v5p:2x2x1", "v5e:2x2"):
    try:
      topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
      break
    except Exception as e:  # noqa: BLE001 - a libtpu that knows neither topology
      errors.append(f"{name}: {e}")
  else:
    pytest.skip(f"libtpu offers no test topology: {errors}")
  return Mesh(np.asarray(topo.devices).reshape(2, 2, 1), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize("t,d,kind", [(1025, 88, "mask"), (206, 200, "bias")])
def test_auto_compiles_the_pallas_kernel_for_tpu(tpu_mesh, t, d, kind):
  batch = NamedSharding(tpu_mesh, P(("data", "fsdp")))
  x = jax.ShapeDtypeStruct((8, t, 4, d), jnp.bfloat16, sharding=batch)
  extra = (jax.ShapeDtypeStruct((8, t), jnp.bool_, sharding=batch) if kind == "mask" else
           jax.ShapeDtypeStruct((8, 1, 1, t), jnp.float32, sharding=batch))
  platforms = []

  def train_step(q, k, v, extra):
    platforms.append((platform_lib.current(), platform_lib.resolve("remat_policy", "auto")))
    kw = {kind: extra}
    loss = lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, **kw).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with jax.set_mesh(tpu_mesh):
    hlo = jax.jit(train_step).lower(x, x, x, extra).compile().as_text()
  assert platforms == [("tpu", platform_lib.DEFAULTS["tpu"]["remat_policy"])]  # the target's settings
  assert MARKER in hlo
  # shard_map keeps the kernel on per-device shards: the batch of 8 is 2 per chip, no gathers.
  assert "bf16[2,4," in hlo and "all-gather" not in hlo
