"""Fine-tuning augmentations that run on the device, after normalisation: random erasing, then
mixup / cutmix with label smoothing (timm's `RandomErasing` and `Mixup` as the official
single-modality fine-tuning uses them, reference §8).

Official semantics reproduced:
- Mixup is timm's `mode="batch"`: one lambda (and one cutmix box) per batch, each clip mixed
  with the clip at the mirrored position of the batch (`x.flip(0)`); the box covers the same
  pixels in every frame. The official code does this per GPU, on its local batch: here per
  batch shard (`groups`), so no device reads another's clips and the result does not depend on
  the device count beyond the shards themselves. Mixup alpha 0.8, cutmix alpha 1.0, switch
  probability 0.5, cutmix lambda corrected to the box's real area.
- Targets: one-hot with label smoothing (off = s / C, on = 1 - s + off), mixed with lambda.
- Random erasing (probability 0.25, `mode="pixel"`, one box): timm erases each frame of a clip
  on its own (the clip reaches it as a (T, C, H, W) batch), with per-pixel N(0, 1) values in
  the normalised space; boxes of area 2%..1/3 and log-uniform aspect 0.3..3.3, 10 attempts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(key, h: int, w: int, lam):
  """timm `rand_bbox` (no margin): a box of sides int(H sqrt(1 - lam)), int(W sqrt(1 - lam))
  centred on a uniform random pixel, clipped to the image; returns (mask (H, W), corrected lam)."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
  cy, cx = jax.random.randint(ky, (), 0, h), jax.random.randint(kx, (), 0, w)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (ys >= yl) & (ys < yh) & (xs >= xl) & (xs < xh)
  return box, 1.0 - (yh - yl) * (xh - xl) / (h * w)


def _mix_group(key, x, targets, mixup_alpha: float, cutmix_alpha: float, switch_prob: float):
  """One batch shard: x (b, T, H, W, C), soft targets (b, C)."""
  k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  _, _, h, w, _ = x.shape
  box, lam_box = _cutmix_box(k_box, h, w, lam)
  flipped = x[::-1]
  cut = jnp.where(box[None, None, :, :, None], flipped, x)
  mixed = x * lam.astype(x.dtype) + flipped * (1.0 - lam).astype(x.dtype)
  lam = jnp.where(use_cutmix, lam_box, lam)
  out = jnp.where(use_cutmix, cut, mixed)
  return out, targets * lam + targets[::-1] * (1.0 - lam), lam


def mixup_cutmix(key, x, labels, num_classes: int, *, groups: int = 1, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1):
  """x (B, T, H, W, C) normalised clips, labels (B,) -> (mixed x, soft targets (B, C), lambdas
  (groups,)). With both alphas 0 only the label smoothing applies."""
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return x, targets, jnp.ones((groups,), jnp.float32)
  b = x.shape[0]
  if b % groups:
    raise ValueError(f"batch {b} is not divisible by {groups} batch shards")
  xg = x.reshape((groups, b // groups) + x.shape[1:])
  tg = targets.reshape(groups, b // groups, num_classes)
  out, t, lam = jax.vmap(lambda k, xx, tt: _mix_group(k, xx, tt, mixup_alpha, cutmix_alpha, switch_prob))(
      jax.random.split(key, groups), xg, tg)
  return out.reshape(x.shape), t.reshape(b, num_classes), lam


def random_erasing(key, x, probability: float = 0.25, *, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10):
  """x (B, T, H, W, C) normalised: each frame erased with `probability` in one box of N(0, 1)
  pixels (timm's per-image rejection sampling: the first of `attempts` boxes that fits)."""
  if probability <= 0:
    return x
  b, t, h, w, c = x.shape
  k_on, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  shape = (b, t, attempts)
  on = jax.random.uniform(k_on, (b, t)) < probability
  area = h * w * jax.random.uniform(k_area, shape, minval=min_area, maxval=max_area)
  log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=log_ratio[0], maxval=log_ratio[1]))
  eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits, axis=-1)                      # the first attempt that fits
  any_fit = jnp.any(fits, axis=-1) & on
  pick = lambda a: jnp.take_along_axis(a, first[..., None], axis=-1)[..., 0]  # noqa: E731
  eh, ew = pick(eh), pick(ew)
  top = jnp.floor(jax.random.uniform(k_top, (b, t)) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b, t)) * (w - ew + 1)).astype(jnp.int32)
  ys = jnp.arange(h)[None, None, :, None]
  xs = jnp.arange(w)[None, None, None, :]
  box = ((ys >= top[..., None, None]) & (ys < (top + eh)[..., None, None]) &
         (xs >= left[..., None, None]) & (xs < (left + ew)[..., None, None]) & any_fit[..., None, None])
  noise = jax.random.normal(k_noise, x.shape, jnp.float32).astype(x.dtype)
  return jnp.where(box[..., None], noise, x)
