"""Step time, samples/s and MFU of the stage-1 and stage-2 steps per attention implementation
and remat policy, on one device.

    python benchmarks/train_step.py            # on a GPU: 1B encoder (+ a 6B-width slice)
    python benchmarks/train_step.py --smoke    # tiny models, any machine
    python benchmarks/train_step.py --rows stage2:demo:48,stage1:tiny:8 --remats none,dots_no_batch

MFU = analytic training FLOPs (train/flops.py: 2 per MAC of every matmul incl. attention,
forward x 3) / step time / device peak (H100/H200 bf16 dense 989 TFLOP/s).
Stage 1 is measured from cached targets (the teachers are not part of the student step).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import stage1 as stage1_config, stage2 as stage2_config
from internvideo2_jax.models.stage2 import Stage2Model
from internvideo2_jax.ops import masking
from internvideo2_jax.train import flops as F, optimizer as O, stage1, stage2, state as S


def _state(params, oc):
  flat = O.flatten(params)
  tx = O.make_optimizer(oc, flat)
  return tx, S.create(params, tx, list(flat))


def _time(step, state, batch, n):
  state, m = step(state, batch, jax.random.key(0))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch, jax.random.key(0))
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / n


def stage2_row(size, batch, impl, remat, n, width=None):
  c = stage2_config.get_config(f"size={size}")
  c.model.vision.attn_impl = c.model.text.attn_impl = impl
  c.model.vision.remat_policy = c.model.text.remat_policy = remat
  if width:  # a 6B-width slice: full width, few layers
    c.model.vision.depth, c.model.text.num_layers, c.model.text.fusion_layer = 4, 4, 3
  mcfg = stage2.build_model_config(c.model)
  model = Stage2Model(mcfg, deterministic=False)
  v = mcfg.vision
  t = c.data.load["max_txt_l"] if "max_txt_l" in c.data.load else 32
  ids = jnp.ones((1, t), jnp.int32)
  video = jnp.zeros((1, v.num_frames, v.img_size, v.img_size, 3))
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, video, ids, ids))["params"]
  oc = ml_collections.ConfigDict({"lr": 1e-4, "total_steps": 100, "warmup_steps": 1, "weight_decay": 0.05,
                                  "max_grad_norm": 3.0})
  tx, state = _state(params, oc)
  n_tok = (v.num_frames // v.tubelet_size) * (v.img_size // v.patch_size) ** 2
  n_vis = n_tok - int(n_tok * 0.8)
  rng = np.random.default_rng(0)
  mask = np.ones((batch, n_tok), bool)
  for i in range(batch):
    mask[i, rng.permutation(n_tok)[:n_vis]] = False
  b = {"video": jnp.asarray(rng.integers(0, 255, (batch,) + video.shape[1:], dtype=np.uint8)),
       "mask": jnp.asarray(mask), "text_ids": jnp.asarray(rng.integers(1000, 2000, (batch, t)), jnp.int32),
       "text_mask": jnp.ones((batch, t), jnp.int32), "sample_id": jnp.arange(batch, dtype=jnp.int32)}
  tcfg = ml_collections.ConfigDict(dict(c.train.to_dict(), data_norm="imagenet", mask_token_id=103, cls_token_id=101))
  step = jax.jit(lambda s, bb, r: stage2.make_step(model, tx, tcfg, groups=1, vtc_mult=1.0)(s, bb, r, num_visible=n_vis),
                 donate_argnums=(0,))
  dt = _time(step, state, b, n)
  fl = F.stage2_train_flops(ml_collections.ConfigDict({"model": mcfg, "train": c.train}), batch=batch,
                            frames=v.num_frames, visible_tokens=n_vis, text_len=t)
  return dt, fl


def stage1_row(size, batch, impl, remat, n):
  c = stage1_config.get_config(f"size={size}")
  c.model.vision.attn_impl, c.model.vision.remat_policy = impl, remat
  student, clip_t, mae_t = stage1.build_models(c)
  v = c.model.vision
  hw = (v.img_size // v.patch_size) ** 2
  t = v.num_frames // v.tubelet_size
  n_vis = t * masking.visible_per_frame(hw, c.train.mask_ratio)
  mask0 = jnp.zeros((1, t * hw), bool).at[:, n_vis:].set(True)
  params = {"student": nn.unbox(jax.jit(student.init, static_argnums=(3,))(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, jnp.zeros((1, v.num_frames, v.img_size, v.img_size, 3)),
      mask0, n_vis))["params"]}
  oc = ml_collections.ConfigDict({"lr": 1e-4, "total_steps": 100, "warmup_steps": 1, "weight_decay": 0.05})
  tx, state = _state(params, oc)
  tc, mc = c.model.clip_teacher, c.model.mae_teacher
  kc, km = len(tc.return_layers), mc.return_layers
  rng = np.random.default_rng(0)
  b = {"video": jnp.asarray(rng.integers(0, 255, (batch, 2 * v.num_frames, v.img_size, v.img_size, 3), dtype=np.uint8)),
       "clip_tokens": jnp.ones((batch, kc, 1 + t * hw, tc.embed_dim), jnp.bfloat16),
       "clip_final": jnp.ones((batch, tc.clip_embed_dim), jnp.bfloat16),
       "clip_attn": jnp.ones((batch, t, hw), jnp.bfloat16),
       "mae_tokens": jnp.ones((batch, km, t * hw, mc.embed_dim), jnp.bfloat16)}
  tcfg = ml_collections.ConfigDict(dict(c.train.to_dict(), data_norm="imagenet"))
  step = jax.jit(stage1.make_step(student, clip_t, mae_t, tx, tcfg), donate_argnums=(0,))
  dt = _time(step, state, b, n)
  d = v.embed_dim
  fl = 3.0 * batch * F.vit_forward(1 + n_vis, d, v.depth, int(d * v.mlp_ratio), 3 * v.patch_size ** 2, v.clip_embed_dim)
  return dt, fl


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--rows", default="", help="own rows, e.g. 'stage2:demo:48,stage1:tiny:8' (with --remats)")
  p.add_argument("--remats", default="none,dots_no_batch", help="remat policies for --rows")
  a = p.parse_args()
  peak = F.peak_flops()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| step | batch | attention | remat | step time (s) | samples/s | TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  if a.rows:  # e.g. the CPU comparison of remat policies in BENCHMARKS.md
    runs = [(stage, size, int(batch), "xla", remat, None) for stage, size, batch in
            (r.split(":") for r in a.rows.split(",")) for remat in a.remats.split(",")]
  elif a.smoke:
    runs = [("stage2", "tiny", 8, "xla", "none", None), ("stage1", "tiny", 8, "xla", "none", None)]
  else:
    runs = []
    for impl in ("xla", "cudnn", "pallas"):
      for remat in ("full", "minimal"):
        runs += [("stage2", "1B", 32, impl, remat, None), ("stage1", "1B", 32, impl, remat, None)]
    runs += [("stage2 6B-width slice", "6B", 16, "cudnn", "full", True)]
  for name, size, batch, impl, remat, width in runs:
    try:
      if name.startswith("stage2"):
        dt, fl = stage2_row(size, batch, impl, remat, 3 if a.smoke or a.rows else 10, width)
      else:
        dt, fl = stage1_row(size, batch, impl, remat, 3 if a.smoke or a.rows else 10)
      mfu = f"{100 * fl / dt / peak:.1f}%" if peak else "n/a"
      print(f"| {name} {size} | {batch} | {impl} | {remat} | {dt:.3f} | {batch / dt:.1f} | {fl / dt / 1e12:.2f} | {mfu} |",
            flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"| {name} {size} | {batch} | {impl} | {remat} | failed: {type(e).__name__}: {str(e)[:100]} |", flush=True)


if __name__ == "__main__":
  main()
