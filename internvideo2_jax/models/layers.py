"""Building blocks shared by the towers: Linear, RMSNorm, LayerNorm, LayerScale, DropPath, MLP.

Conventions:
* Parameters are created in fp32 and carry logical axis names (`nn.with_logical_partitioning`).
* `dtype` is the compute dtype of matmuls; norms and LayerScale products run in fp32 as in the
  official code (RMSNorm upcasts, LayerNorm runs in fp32 under torch autocast, LayerScale forces
  fp32).
* Parameter names follow the official checkpoints (`weight` for norm scales, `gamma` for
  LayerScale) so weight conversion is a table; Linear weights are `kernel` (in, out), the
  transpose of torch's (out, in).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Axes = tuple[Optional[str], ...]

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. at 100 std: it is
# effectively a plain normal, so we use one (jax's truncated_normal would cut at 2 std).
default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Axes,
                    *init_args):
  """Creates an fp32 parameter annotated with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"{module.name}/{name}: {len(axes)} logical axes for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32,
                      *init_args)


class Linear(nn.Module):
  """y = x . kernel + bias, contracting the last `n_in` input axes.

  `kernel` has shape in_shape + out_shape, with logical names `kernel_axes` (one per axis).
  `init_scale` multiplies the initial kernel (the official `fix_init_weight` depth rescaling);
  it may be a traced value, e.g. a function of the scanned layer index.
  """
  features: int | tuple[int, ...]
  kernel_axes: Axes
  n_in: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x, init_scale=None):
    out_shape = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.n_in:]
    base_init = self.kernel_init

    def init(key, shape, dtype):
      w = base_init(key, shape, dtype)
      return w if init_scale is None else w * init_scale

    kernel = param_with_axes(self, "kernel", init, in_shape + out_shape, self.kernel_axes)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, out_shape,
                             self.kernel_axes[self.n_in:])
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Official RMSNorm: fp32 statistics, cast back, then times `weight` (no bias).

  Normalises over the last `n_axes` axes together (q/k-norm normalises the full width with the
  heads flattened, not per head); `weight` is stored flat, like the official (D,) vector.
  Returns fp32 (torch promotes bf16 x fp32-weight to fp32); callers cast as needed.
  """
  eps: float = 1e-6
  n_axes: int = 1
  weight_axes: Axes = ("norm",)

  @nn.compact
  def __call__(self, x):
    shape = x.shape[x.ndim - self.n_axes:]
    weight = param_with_axes(self, "weight", nn.initializers.ones, (math.prod(shape),),
                             self.weight_axes)
    axes = tuple(range(x.ndim - self.n_axes, x.ndim))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + self.eps)
    return weight.reshape(shape) * y.astype(x.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm (weight, bias), computed in fp32 as under torch autocast; fp32 out."""
  eps: float = 1e-5
  axes: Axes = ("norm",)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    weight = param_with_axes(self, "weight", nn.initializers.ones, (d,), self.axes)
    bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.axes)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias


class LayerScale(nn.Module):
  """x * gamma with the product in fp32 (official `force_fp32=True`), cast back to x's dtype."""
  init_value: float = 1e-5
  force_fp32: bool = True

  @nn.compact
  def __call__(self, x):
    gamma = param_with_axes(self, "gamma", nn.initializers.constant(self.init_value),
                            (x.shape[-1],), ("norm",))
    if self.force_fp32:
      return (x.astype(jnp.float32) * gamma).astype(x.dtype)
    return x * gamma.astype(x.dtype)


def drop_path(x, rate, rng, deterministic: bool):
  """Stochastic depth per sample; `rate` may be traced (it varies over scanned layers)."""
  if deterministic:
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  # rate == 1 would divide by zero; the official linspace never reaches 1, guard anyway.
  return jnp.where(mask, x / jnp.maximum(keep, 1e-6), jnp.zeros_like(x)).astype(x.dtype)


def gelu(x, approximate: bool):
  """GELU in fp32 (as torch computes it for bf16 inputs), cast back."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=approximate).astype(x.dtype)


class Mlp(nn.Module):
  """fc1 -> GELU (tanh or exact erf) -> fc2, both with bias."""
  hidden: int
  gelu_approximate: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, init_scale=None):
    d = x.shape[-1]
    h = Linear(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.with_logical_constraint(h, ("batch", "tokens", "act_mlp"))
    h = checkpoint_name(gelu(h, self.gelu_approximate), "mlp_hidden")
    y = Linear(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h, init_scale)
    return checkpoint_name(y, "mlp_out")
