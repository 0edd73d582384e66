"""The BEATs audio tower: token layout, relative-position buckets against hand-computed values,
weight-norm folding, the official key round trip, the GRU gate."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.convert.beats import beats_from_state_dict, beats_to_state_dict
from internvideo2_jax.convert.io import CheckpointError
from internvideo2_jax.models.audio import AudioEncoder, audio_preset, fold_weight_norm, relative_position_buckets


def test_buckets_match_hand_computed_values():
  b = relative_position_buckets(1, 300, 320, 800)[0]  # key - query = 0 .. 299
  assert b[0] == 0 and b[1] == 161 and b[79] == 239            # exact region: 160 + distance
  assert b[80] == 240                                          # 80 + int(log(80/80)/log(10) * 80)
  assert b[160] == 160 + 80 + int(np.log(2.0) / np.log(10.0) * 80)   # = 264
  assert b[299] == 160 + 80 + int(np.log(299 / 80) / np.log(10.0) * 80)  # = 285
  neg = relative_position_buckets(300, 1, 320, 800)[:, 0]       # key - query = 0 .. -299
  assert neg[5] == 5 and neg[299] == 125                       # negative side has no +160 offset
  far = relative_position_buckets(1, 5000, 320, 800)[0]
  assert far.max() == 319                                      # clamped to the last bucket


def test_weight_norm_folding():
  rng = np.random.default_rng(0)
  v = rng.standard_normal((6, 3, 5)).astype(np.float32)
  g = rng.standard_normal((1, 1, 5)).astype(np.float32)
  w = fold_weight_norm(g, v)
  for k in range(5):  # the norm runs over every dim except dim 2
    np.testing.assert_allclose(w[:, :, k], g[0, 0, k] * v[:, :, k] / np.linalg.norm(v[:, :, k]), rtol=1e-5)


def test_tokens_round_trip_and_errors():
  cfg = audio_preset("tiny")
  model = AudioEncoder(cfg)
  fbank = jax.random.normal(jax.random.key(1), (2, 998, 64))
  params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), fbank)))["params"]
  out = model.apply({"params": params}, fbank)
  assert out.shape == (2, 248, 48)  # 62 x 4 patches of 16 x 16, time-major
  sd = beats_to_state_dict(params, cfg)
  assert sd["encoder.pos_conv.0.weight_v"].shape == (48, 12, 16) and sd["patch_embedding.weight"].shape == (32, 1, 16, 16)
  back = beats_from_state_dict({f"audio_encoder.{k}": v for k, v in sd.items()}, cfg)
  np.testing.assert_allclose(model.apply({"params": back}, fbank), out, atol=1e-5)
  # token order: torch Conv2d over (time, freq) flattened -> token t * 4 + f is the patch at
  # rows 16 t .. 16 t + 15 and columns 16 f .. 16 f + 15, its pixels row-major (the kernel layout)
  _, inter = model.apply({"params": params}, fbank, capture_intermediates=True)
  emb = np.asarray(inter["intermediates"]["patch_embedding"]["__call__"][0])[0]
  patch = np.asarray(fbank)[0, 16:32, 48:64].reshape(-1)
  np.testing.assert_allclose(emb[1 * 4 + 3], patch @ params["patch_embedding"]["kernel"], rtol=1e-4, atol=1e-4)
  del sd["encoder.layers.1.fc2.bias"]
  with pytest.raises(CheckpointError, match="encoder.layers.1.fc2.bias"):
    beats_from_state_dict(sd, cfg)


def test_gru_gate_changes_the_relative_bias_per_layer():
  cfg = audio_preset("tiny")
  model = AudioEncoder(cfg)
  fbank = jax.random.normal(jax.random.key(2), (1, 160, 64))
  params = nn.unbox(model.init(jax.random.key(0), fbank))
  base = model.apply(params, fbank)
  bumped = jax.tree.map(lambda x: x, params)
  bumped["params"]["encoder"]["layers_1"]["grep_a"] = params["params"]["encoder"]["layers_1"]["grep_a"] + 3.0
  assert np.abs(model.apply(bumped, fbank) - base).max() > 1e-4  # the gate scales the shared bias
  off = AudioEncoder(audio_preset("tiny", gru_rel_pos=False))
  assert off.apply(off.init(jax.random.key(0), fbank), fbank).shape == (1, 40, 48)
  # zero relative table + gate -> plain attention: the table is shared by every layer
  assert params["params"]["encoder"]["relative_attention_bias"].shape == (32, 4)



def test_no_post_extract_proj_when_dims_match():
  # official BEATs sets post_extract_proj = None when embed_dim == encoder_embed_dim
  cfg = audio_preset("tiny", embed_dim=48)
  model = AudioEncoder(cfg)
  fbank = jax.random.normal(jax.random.key(3), (1, 64, 64))
  params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), fbank)))["params"]
  assert "post_extract_proj" not in params
  sd = beats_to_state_dict(params, cfg)
  assert not any(k.startswith("post_extract_proj") for k in sd)
  np.testing.assert_allclose(model.apply({"params": beats_from_state_dict(sd, cfg)}, fbank),
                             model.apply({"params": params}, fbank), atol=1e-6)
