"""The main job end to end: config file, CLI overrides, real mp4 decoding, bad files, init_from."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import official_reference as ref
from configs import features as features_config
from internvideo2_jax.config_utils import parse_arg
from internvideo2_jax.convert.io import save_state_dict
from internvideo2_jax.convert.official import vision_from_state_dict
from internvideo2_jax.data import synthetic, video as video_io
from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.evaluate import features
from internvideo2_jax.models.vit import VisionEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg():
  a = parse_arg("size=1B,frames=8,fast", size="tiny", frames=4, fast=False)
  assert (a.size, a.frames, a.fast) == ("1B", 8, True)
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    parse_arg("sise=1B", size="tiny")


def test_config_presets():
  c = features_config.get_config("size=1B,frames=8,dtype=bfloat16")
  assert (c.model.embed_dim, c.model.num_frames, c.model.dtype) == (1408, 8, "bfloat16")


def test_features_with_official_weights_and_a_broken_file(tmp_path):
  rng = np.random.default_rng(0)
  sd = ref.random_state_dict(rng, d=64, depth=2, mlp_hidden=256, clip_dim=32)
  ckpt = tmp_path / "iv2_tiny.safetensors"
  save_state_dict({f"vision_encoder.{k}": v for k, v in sd.items()}, ckpt)
  clip = tmp_path / "clip.mp4"
  synthetic.write_mp4(clip, synthetic.render_clip(rng, 12, 48, shape="square", colour="blue",
                                                  direction="up"))
  broken = tmp_path / "broken.mp4"
  broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
  c = features_config.get_config()
  c.init_from = str(ckpt)
  c.data.videos = (str(clip), str(broken), str(tmp_path / "missing.mp4"))
  c.save_tokens = True
  out = features.run(c, str(tmp_path / "work"))
  assert list(out["paths"]) == [str(clip)]
  saved = np.load(tmp_path / "work" / "features.npz")
  assert saved["pooled"].shape == (1, 32) and saved["tokens"].shape == (1, 65, 64)
  # the same as running the encoder by hand on the officially sampled frames
  frames = video_io.read_frames(clip, video_io.frame_indices(4, 12, "middle"), size=(32, 32))
  params = vision_from_state_dict(sd, c.model)
  want = VisionEncoder(c.model).apply(params, normalize(jnp.asarray(frames[None])))["pooled"]
  np.testing.assert_allclose(saved["pooled"], want, atol=1e-5)


def test_cli_runs_the_features_job(tmp_path):
  cmd = [sys.executable, "-m", "internvideo2_jax.main", "--config=configs/features.py", f"--workdir={tmp_path}",
         "--config.data.num_synthetic=3", "--config.batch_size=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "3 videos -> pooled features (3, 32)" in res.stdout
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in res.stdout
  assert np.load(tmp_path / "features.npz")["pooled"].shape == (3, 32)


def test_inspect_data_job(tmp_path):
  from configs import data as data_config
  from internvideo2_jax.data import inspect
  c = data_config.get_config()
  c.num_batches = 1
  c.data.batch_size = 2
  out = inspect.run(c, str(tmp_path))
  assert out["skipped"] == {} and (tmp_path / "batch.png").exists()
