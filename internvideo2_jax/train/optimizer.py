"""Optimizer: AdamW with the official no-decay rule, warmup + cosine with a floor, global-norm
clipping, freezing by regex (frozen parameters get neither gradients nor optimizer state),
gradient accumulation and layer-wise lr decay.

Parameters are addressed by '/'-joined paths, e.g. `vision_encoder/blocks/attn/qkv/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

# Linear/conv weights, embedding tables and the other >= 2-D weights (the official rule decays
# every tensor of 2+ dims that is not a bias): LLM embeddings, LoRA adapters, QFormer queries.
DECAYED_LEAVES = ("kernel", "embedding", "embed_tokens", "lora_a", "lora_b", "query_tokens",
                  "extra_query_tokens")


def flatten(params: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def trainable_keys(flat_params: Mapping[str, Any], freeze: Sequence[str] = (),
                   unfreeze: Sequence[str] = ()) -> list[str]:
  """Paths that train: not matched by a `freeze` regex, or matched by an `unfreeze` regex."""
  fr = [re.compile(p) for p in freeze]
  un = [re.compile(p) for p in unfreeze]
  return [k for k in flat_params
          if not any(r.search(k) for r in fr) or any(r.search(k) for r in un)]


def freeze_patterns(model_cfg) -> tuple[list[str], list[str]]:
  """Official switches -> regexes: freeze_vision / freeze_text / freeze_audio, unfreeze_keys."""
  freeze = []
  for flag, prefix in (("freeze_vision", "^vision_encoder/"), ("freeze_text", "^text_encoder/"),
                       ("freeze_audio", "^audio_encoder/")):
    if model_cfg.get(flag, False):
      freeze.append(prefix)
  freeze += list(model_cfg.get("freeze", ()))
  return freeze, list(model_cfg.get("unfreeze_keys", ()))


def decay_mask(flat: Mapping[str, Any], no_decay: Sequence[str] = ()) -> dict[str, bool]:
  """Official rule: no decay on 1-D params, biases, position embeddings, cls token and temp,
  i.e. decay exactly the Linear/conv kernels and embedding tables; `no_decay` regexes exclude
  more (the CLIP variant excludes the whole text encoder)."""
  nd = [re.compile(p) for p in no_decay]
  return {k: k.rsplit("/", 1)[-1] in DECAYED_LEAVES and not any(r.search(k) for r in nd)
          for k in flat}


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_lr_multi: float = 0.01,
                kind: str = "cosine") -> Callable:
  """Official stage-2 schedule (`cosine`): max(floor, step / warmup) during warmup, then
  max(floor, 0.5 (1 + cos(pi * progress))). `cosine_min` is the stage-1 `cosine_scheduler`:
  linear warmup from 0, then floor + (1 - floor) * 0.5 (1 + cos). `constant` keeps the peak."""
  if kind not in ("cosine", "cosine_min", "constant"):
    raise ValueError(f"unknown lr schedule {kind!r} (cosine, cosine_min or constant)")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.maximum(min_lr_multi, step / max(warmup_steps, 1))
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = jnp.maximum(min_lr_multi, 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0))))
    if kind == "cosine_min":
      warm = step / max(warmup_steps, 1)
      cos = min_lr_multi + (1 - min_lr_multi) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0.0, 1.0)))
    after = 1.0 if kind == "constant" else cos
    return base_lr * jnp.where(step < warmup_steps, warm, after)
  return schedule


def layer_decay_scales(flat: Mapping[str, Any], decay: float, depth: int,
                       prefix: str = "vision_encoder/") -> dict[str, Any]:
  """Official layer-wise lr decay for the vision tower: scale decay ** (depth + 1 - layer_id),
  layer_id 0 for cls/pos/patch embedding, i + 1 for block i (stacked on axis 0), and scale 1
  for everything else."""
  out = {}
  for k, v in flat.items():
    if not k.startswith(prefix):
      out[k] = 1.0
      continue
    rest = k[len(prefix):]
    if rest.startswith("blocks/"):
      ids = np.arange(1, depth + 1, dtype=np.float32)
      out[k] = (decay ** (depth + 1 - ids)).reshape((depth,) + (1,) * (np.ndim(v) - 1))
    elif rest.startswith(("cls_token", "pos_embed", "img_pos_embed", "patch_embed")):
      out[k] = decay ** (depth + 1)
    else:
      out[k] = 1.0
  return out


def scale_by_tree(scales: Mapping[str, Any]) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return {k: u * jnp.asarray(scales[k], u.dtype) for k, u in updates.items()}, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg, trainable: Mapping[str, Any], *, vision_depth: int = 0) -> optax.GradientTransformation:
  """cfg: lr, min_lr_multi, warmup_steps, total_steps, schedule, b1, b2, eps, weight_decay,
  no_decay (regexes), max_grad_norm (<= 0: off), grad_accum_steps, layer_decay (1.0: off),
  lr_mult ((regex, multiplier), ...) for per-tower learning rates.
  `trainable` is the flat dict of trainable parameters the optimizer will see."""
  sched = lr_schedule(float(cfg.lr), int(cfg.total_steps), int(cfg.warmup_steps),
                      float(cfg.get("min_lr_multi", 0.01)), cfg.get("schedule", "cosine"))
  parts = []
  if float(cfg.get("max_grad_norm", 0)) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
  parts.append(optax.adamw(sched, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.98)),
                           eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.weight_decay),
                           mask=decay_mask(trainable, cfg.get("no_decay", ()))))
  ld = float(cfg.get("layer_decay", 1.0))
  scales = layer_decay_scales(trainable, ld, vision_depth) if ld != 1.0 else {k: 1.0 for k in trainable}
  for pattern, mult in cfg.get("lr_mult", ()):  # per-tower learning rates, e.g. (("^text_encoder/", 0.1),)
    rx = re.compile(pattern)
    scales = {k: (v * float(mult) if rx.search(k) else v) for k, v in scales.items()}
  if any(np.any(np.asarray(v) != 1.0) for v in scales.values()):
    parts.append(scale_by_tree(scales))
  tx = optax.chain(*parts)
  k = int(cfg.get("grad_accum_steps", 1))
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


__all__ = ["flatten", "unflatten", "trainable_keys", "freeze_patterns", "decay_mask", "lr_schedule",
           "layer_decay_scales", "make_optimizer"]
