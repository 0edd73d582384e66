"""Stage 1 with online teachers vs cached targets: step time and storage per clip.

    .venv/bin/python benchmarks/stage1_targets.py

Storage per clip is computed for the official 1B recipe (bf16 targets: 6 CLIP layers of
(1 + 8 x 256) x 3200, the pooled 768, the 8 x 256 attention, 4 MAE layers of 2048 x 1408, plus
the 16 x 224 x 224 x 3 uint8 clip) and measured on the benchmark model. Step times are measured
on this machine for a small student (tiny ViT) with teachers 4-8x its size, a proportion like
the real 1B student vs the 6B + 1B teachers.
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import stage1 as stage1_config
from internvideo2_jax.models.teachers import clip_teacher_preset, mae_teacher_preset
from internvideo2_jax.data import targets
from internvideo2_jax.train import optimizer as O, stage1, state as S
from internvideo2_jax.data.transforms import normalize


def official_bytes_per_clip() -> dict:
  bf16 = 2
  parts = {"clip tokens (6 x 2049 x 3200)": 6 * 2049 * 3200 * bf16, "clip pooled": 768 * bf16,
           "clip attention (8 x 256)": 8 * 256 * bf16, "mae tokens (4 x 2048 x 1408)": 4 * 2048 * 1408 * bf16,
           "clip frames (16 x 224 x 224 x 3 uint8)": 16 * 224 * 224 * 3}
  parts["total"] = sum(parts.values())
  return parts


def main():
  c = stage1_config.get_config("size=tiny")
  c.model.clip_teacher = clip_teacher_preset("tiny", return_layers=2, embed_dim=192, depth=6, num_heads=6,
                                             attn_pool_num_heads=6, clip_embed_dim=96)
  c.model.mae_teacher = mae_teacher_preset("tiny", return_layers=2, embed_dim=160, depth=6, num_heads=4)
  student, clip_t, mae_t = stage1.build_models(c)
  k = jax.random.key(0)
  b = 16
  video = jnp.asarray(np.random.default_rng(0).integers(0, 255, (b, 16, 32, 32, 3), dtype=np.uint8))
  teachers = {"clip": clip_t.init(k, video[:1, ::2])["params"], "mae": mae_t.init(k, video[:1])["params"]}
  mask0 = jnp.zeros((1, 128), bool).at[:, 32:].set(True)
  params = {"student": student.init({"params": k, "dropout": k}, video[:1, ::2], mask0, 32)["params"],
            "teachers": teachers}
  flat = O.flatten(params)
  trainable = [key for key in flat if not key.startswith("teachers/")]
  tx = O.make_optimizer(ml_collections.ConfigDict({"lr": 1e-3, "total_steps": 100, "warmup_steps": 1,
                                                   "weight_decay": 0.05}), {key: flat[key] for key in trainable})
  tcfg = ml_collections.ConfigDict(dict(c.train.to_dict(), data_norm="imagenet"))
  step = jax.jit(stage1.make_step(student, clip_t, mae_t, tx, tcfg))
  tg = jax.tree.map(np.asarray, stage1.teacher_targets(teachers, normalize(video), clip_t, mae_t, jnp.bfloat16))
  raw = [targets.encode_example({"video": np.asarray(video[i]), "label": 0,
                                       "clip_tokens": tg["clip_tokens"][:, i], "mae_tokens": tg["mae_tokens"][:, i],
                                       "clip_final": tg["clip_final"][i],
                                       "clip_attn": tg["clip_attn"].reshape(b, 8, -1)[i]}) for i in range(b)]
  ex = [targets.decode_example(r) for r in raw]
  cached = {key: jnp.asarray(np.stack([e[key] for e in ex])) for key in ("video",) + targets.TARGET_KEYS}

  def timeit(batch, n=20):
    st = S.create(params, tx, trainable)
    st, m = step(st, batch, k)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n):
      st, m = step(st, batch, k)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / n

  online, off = timeit({"video": video}), timeit(cached)
  print(f"machine: {platform.machine()}, {jax.devices()[0].device_kind}, batch {b}")
  print(f"step with online teachers: {online * 1e3:.1f} ms; from cached targets: {off * 1e3:.1f} ms "
        f"({online / off:.1f}x faster)")
  print(f"cache per clip for this benchmark model: {np.mean([len(r) for r in raw]) / 2**10:.1f} KiB")
  for name, v in official_bytes_per_clip().items():
    print(f"official 1B recipe, {name}: {v / 2**20:.2f} MiB")


if __name__ == "__main__":
  main()
