"""Offline teacher targets for stage 1: run both teachers once, train from the cache.

    iv2 --config=configs/stage1.py:size=1B --config.job=cache_targets --workdir=/ckpt/s1_targets \
        --config.cache.views=2 --config.cache.num_shards=64
    iv2 --config=configs/stage1.py:size=1B --workdir=/ckpt/s1 \
        --config.data.corpora='({"format": "targets", "path": "/ckpt/s1_targets/targets"},)'

Each record holds one augmented 16-frame clip (uint8, as the student will see it) with the
CLIP teacher's tokens, pooled feature and pooling attention and the MAE teacher's tokens, stored
in bf16 (`views` augmented views per clip). Training from it skips both teachers; the attention
masking still samples a fresh mask every step from the stored attention. The saving and the
storage per clip are in BENCHMARKS.md (benchmarks/stage1_targets.py).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from array_record.python.array_record_module import ArrayRecordWriter

from internvideo2_jax.data import pipeline
from internvideo2_jax.data.targets import encode_example
from internvideo2_jax.data.transforms import normalize


def run(config, workdir: str) -> dict:
  from internvideo2_jax.parallel import mesh as mesh_lib, sharding
  from internvideo2_jax.train.stage1 import build_models, teacher_targets
  os.makedirs(workdir, exist_ok=True)  # (local: ArrayRecord files are written with local I/O)
  cc = config.cache
  student, clip_t, mae_t = build_models(config)
  del student
  v = config.model.vision
  v16 = jnp.zeros((1, 2 * v.num_frames, v.img_size, v.img_size, 3))
  k = jax.random.key(config.seed)
  params = {"clip": clip_t.init(k, v16[:, ::2])["params"], "mae": mae_t.init(k, v16)["params"]}
  if config.model.clip_teacher_init or config.model.mae_teacher_init:
    from internvideo2_jax.convert import teachers as tc
    from internvideo2_jax.convert.io import load_state_dict
    if config.model.clip_teacher_init:
      params["clip"] = tc.clip_teacher_from_state_dict(load_state_dict(config.model.clip_teacher_init),
                                                       config.model.clip_teacher)
    if config.model.mae_teacher_init:
      params["mae"] = tc.mae_teacher_from_state_dict(load_state_dict(config.model.mae_teacher_init),
                                                     config.model.mae_teacher)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  fn = jax.jit(lambda p, video: teacher_targets(p, normalize(video, config.data.get("norm", "imagenet")),
                                                clip_t, mae_t))
  ds = pipeline.make_pipeline(config.data, ml_collections.ConfigDict(dict(v.to_dict(), num_frames=2 * v.num_frames)),
                              stage="stage1", num_epochs=int(cc.views), train=True)
  prefix = os.path.join(workdir, "targets")
  n = int(cc.num_shards)
  # Each process writes the clips it loaded (its block of every global batch) to its own files.
  proc = f"-p{jax.process_index():03d}" if jax.process_count() > 1 else ""
  writers = [ArrayRecordWriter(f"{prefix}{proc}-{i:05d}-of-{n:05d}.array_record", "group_size:1") for i in range(n)]
  count, nbytes, t0 = 0, 0, time.perf_counter()
  try:
    for host in ds:
      video = sharding.shard_batch({"v": host["video"]}, mesh)["v"]
      b = len(host["video"])
      lo = jax.process_index() * b
      tg = {k: sharding.to_host(x) for k, x in fn(params, video).items()}  # gathered; keep our rows
      tg = {k: (x[:, lo:lo + b] if x.ndim == 4 else x[lo * (x.shape[0] // (b * jax.process_count())):
                                                       (lo + b) * (x.shape[0] // (b * jax.process_count()))])
            for k, x in tg.items()}
      for i in range(len(host["video"])):
        raw = encode_example({"video": host["video"][i], "label": host["label"][i],
                              **{k: tg[k][:, i] if tg[k].ndim == 4 else tg[k][i] for k in
                                 ("clip_tokens", "mae_tokens", "clip_final")},
                              "clip_attn": tg["clip_attn"].reshape(len(host["video"]), -1, tg["clip_attn"].shape[-1])[i]},
                             cc.get("dtype", "bfloat16"))
        writers[count % n].write(raw)
        count, nbytes = count + 1, nbytes + len(raw)
  finally:
    for w in writers:
      w.close()
  dt = time.perf_counter() - t0
  print(f"cached {count} clips ({nbytes / max(count, 1) / 2**10:.1f} KiB per clip, "
        f"{nbytes / 2**20:.1f} MiB in all) in {dt:.1f}s -> {prefix}-*")
  return {"clips": count, "bytes_per_clip": nbytes / max(count, 1), "path": prefix}
