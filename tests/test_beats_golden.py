"""The BEATs audio tower against an independent PyTorch transcription of the official BEATs forward
(tests/golden/make_beats_golden.py; no torch needed here).

The golden file holds a tiny random BEATs (3 post-LN deep-norm layers, dim 64, 4 heads, 320 buckets /
max distance 800, GRU-gated relative bias, weight-normed grouped positional conv with an even kernel)
as an official-layout state dict, a (2, 998, 64) fbank (sample 1 zero from frame 700) and the
float64 reference activations. The weights go through convert/beats.py, so the converter's key
table, transposes, head splits and weight-norm folding are checked along with the model.
"""

import json
import os

import jax
import numpy as np
import pytest

from internvideo2_jax.convert.beats import beats_from_state_dict, beats_to_state_dict
from internvideo2_jax.models.audio import AudioEncoder, audio_preset, relative_position_buckets

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "beats.npz")
# the golden config's keys that our AudioEncoder config also has
_SHARED_KEYS = ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_attention_heads",
                "encoder_ffn_embed_dim", "conv_pos", "conv_pos_groups", "num_buckets", "max_distance", "deep_norm",
                "gru_rel_pos")


@pytest.fixture(scope="module")
def golden():
  if not os.path.exists(GOLDEN):
    pytest.skip("tests/golden/beats.npz missing; run tests/golden/make_beats_golden.py with torch")
  z = np.load(GOLDEN)
  off = json.loads(str(z["config_json"]))
  # what our port assumes about the official cfg (InternVideo2's BEATs iter3+ checkpoint)
  assert off["layer_norm_first"] is False and off["relative_position_embedding"] is True
  assert off["conv_bias"] is False and off["activation_fn"] == "gelu"
  cfg = audio_preset("tiny", **{k: off[k] for k in _SHARED_KEYS}, dtype="float32", attn_impl="xla")
  sd = {k[len("sd/"):]: z[k] for k in z.files if k.startswith("sd/")}
  return z, cfg, sd


@pytest.fixture(scope="module")
def ours(golden):
  z, cfg, sd = golden
  params = beats_from_state_dict({f"module.audio_encoder.{k}": v for k, v in sd.items()}, cfg)
  fbank = z["fbank"].astype(np.float32)
  out, inter = jax.jit(lambda p, x: AudioEncoder(cfg).apply({"params": p}, x, capture_intermediates=True))(params, fbank)
  return params, np.asarray(out), inter["intermediates"]


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_relative_position_buckets_match_official(golden):
  z, cfg, _ = golden
  rel, ids = z["bucket_rel"].astype(np.int64), z["bucket_ids"].astype(np.int64)
  n = (len(rel) + 1) // 2                                   # rel = key - query = -(n-1) .. n-1
  pos = relative_position_buckets(1, n, cfg.num_buckets, cfg.max_distance)[0]          # 0 .. n-1
  neg = relative_position_buckets(n, 1, cfg.num_buckets, cfg.max_distance)[::-1, 0]    # -(n-1) .. 0
  np.testing.assert_array_equal(np.concatenate([neg[:-1], pos]), ids)


def test_intermediates_match_official(golden, ours):
  z, _, _ = golden
  _, _, inter = ours
  proj = np.asarray(inter["post_extract_proj"]["__call__"][0])[:1]
  conv = np.asarray(inter["encoder"]["layer_norm"]["__call__"][0])[:1]
  layer0 = np.asarray(inter["encoder"]["layers_0"]["__call__"][0])[:1]
  assert _err(proj, z["after_proj"]) < 1e-4, "patch embedding / layer_norm / post_extract_proj"
  assert _err(conv, z["after_pos_conv"]) < 1e-4, "positional conv (weight norm, SamePad, GELU) / encoder.layer_norm"
  assert _err(layer0, z["after_layer0"]) < 1e-4, "encoder layer 0 (attention, buckets, GRU gate, deep norm)"


def test_output_matches_official(golden, ours):
  z, _, _ = golden
  _, out, _ = ours
  ref = z["out"]
  assert out.shape == ref.shape == (2, 248, 64)
  err = _err(out, ref)
  scale = float(np.abs(ref).max())
  assert err < 1e-4 * max(1.0, scale), f"max abs error {err:.3e} (output scale {scale:.2f})"
  # the zero-tail sample is a real check too (no padding mask in InternVideo2's forward)
  assert _err(out[1], ref[1]) < 1e-4 * max(1.0, scale)


def test_export_reproduces_official_state_dict(golden, ours):
  """Export -> official keys: everything but the weight-norm pair comes back bit for bit, and the
  exported (v, g = ||v||) pair folds to the same kernel as the official (v, g)."""
  _, cfg, sd = golden
  params, _, _ = ours
  back = beats_to_state_dict(params, cfg)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    if ".pos_conv.0.weight_" not in k:
      np.testing.assert_array_equal(back[k], v.astype(np.float32), err_msg=k)
  again = beats_from_state_dict(back, cfg)
  np.testing.assert_allclose(again["encoder"]["pos_conv_weight"], params["encoder"]["pos_conv_weight"], rtol=1e-6, atol=1e-7)
