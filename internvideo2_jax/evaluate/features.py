"""Feature extraction: videos -> pooled embeddings (and optionally all tokens) in an .npz.

The answer to the most common user question ("how do I get features for my videos?"). Frames are
sampled with the official test protocol (`middle`, squash resize, ImageNet normalisation); the
model runs jitted and sharded over every device of the mesh. With no videos configured, it
writes a synthetic clip first, so the job runs anywhere out of the box.
"""

from __future__ import annotations

import logging
import os
import time

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from internvideo2_jax.convert.io import load_state_dict
from internvideo2_jax.convert.official import vision_from_state_dict
from internvideo2_jax.data import synthetic, video as video_io
from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.vit import VisionEncoder, ViTSpec
from internvideo2_jax.parallel import mesh as mesh_lib, sharding
from internvideo2_jax.parallel.mesh import batch_sharding

log = logging.getLogger(__name__)


def _synthetic_videos(workdir: str, n: int, size: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    shape = synthetic.SHAPES[i % len(synthetic.SHAPES)]
    colour = list(synthetic.COLOURS)[i % len(synthetic.COLOURS)]
    direction = list(synthetic.DIRECTIONS)[i % len(synthetic.DIRECTIONS)]
    path = os.path.join(workdir, f"synthetic_{i}_{colour}_{shape}_{direction}.mp4")
    synthetic.write_mp4(path, synthetic.render_clip(rng, 16, size, shape=shape, colour=colour,
                                                    direction=direction))
    paths.append(path)
  return paths


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  spec = ViTSpec.from_config(config.model)
  model = VisionEncoder(config.model)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  batch = int(config.batch_size)
  mesh_lib.global_batch_size_ok(mesh, batch)

  paths = list(config.data.videos) or _synthetic_videos(
      workdir, int(config.data.num_synthetic), int(config.data.synthetic_size), int(config.seed))
  size = (spec.img_size, spec.img_size)

  example = jnp.zeros((batch, spec.num_frames) + size + (3,), jnp.float32)
  init_fn = lambda: model.init(jax.random.key(config.seed), example)  # noqa: E731
  if config.init_from:
    params = vision_from_state_dict(load_state_dict(config.init_from), config.model,
                                    checkpoint_num_frames=config.get("checkpoint_num_frames"))
    params = jax.tree.map(sharding.global_from_host, params,
                          flax.linen.unbox(sharding.shardings_for(init_fn, mesh)))
    print(f"loaded {config.init_from}")
  else:
    params, _ = sharding.init_sharded(init_fn, mesh)
    print("no init_from: randomly initialised weights (set init_from= to load a checkpoint)")
  print(f"model: {sharding.param_count(params):,} parameters, mesh {dict(mesh.shape)}")

  @jax.jit
  def embed(params, frames):
    out = model.apply(params, normalize(frames, config.data.norm))
    return out["pooled"], out["tokens"]

  pooled_all, tokens_all, ok_paths, failed = [], [], [], []
  clips = []
  t0 = time.perf_counter()
  for path in paths:
    try:
      n = video_io.num_frames_of(path)
      idx = video_io.frame_indices(spec.num_frames, n, "middle")
      clips.append(video_io.read_frames(path, idx, size=size))
      ok_paths.append(path)
    except (video_io.VideoReadError, ValueError) as e:
      log.warning("skipping %s", e)
      failed.append(f"{path}: {e}")
  decode_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for start in range(0, len(clips), batch):
    chunk = np.stack(clips[start:start + batch])
    real = len(chunk)
    if real < batch:  # pad the last batch so one compiled shape serves every call
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
    # every process decodes every video; each transfers its devices' rows, results are gathered
    frames = sharding.global_from_host(chunk, batch_sharding(mesh, chunk.ndim))
    pooled, tokens = embed(params, frames)
    pooled_all.append(sharding.to_host(pooled)[:real])
    if config.save_tokens:
      tokens_all.append(sharding.to_host(tokens)[:real])
  model_s = time.perf_counter() - t0

  result = {"paths": np.asarray(ok_paths), "pooled": np.concatenate(pooled_all) if pooled_all else
            np.zeros((0, spec.clip_embed_dim), np.float32)}
  if tokens_all:
    result["tokens"] = np.concatenate(tokens_all)
  out_path = os.path.join(workdir, "features.npz")
  if jax.process_index() == 0:
    np.savez(out_path, **result)
  feats = result["pooled"]
  print(f"{len(ok_paths)} videos -> pooled features {feats.shape} "
        f"(decode {decode_s:.2f}s, model {model_s:.2f}s incl. compile) -> {out_path}")
  if failed:
    print(f"{len(failed)} videos skipped:\n  " + "\n  ".join(failed))
  if len(feats) > 1:
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = unit @ unit.T
    print("cosine similarity of the first clips:")
    for i in range(min(4, len(feats))):
      print("  " + " ".join(f"{v:+.3f}" for v in sim[i, :min(4, len(feats))]) +
            f"  {os.path.basename(ok_paths[i])}")
  for i in range(min(2, len(feats))):
    print(f"  {os.path.basename(ok_paths[i])}: " + " ".join(f"{v:+.3f}" for v in feats[i, :8]) + " ...")
  return result
