"""Official checkpoint import/export: round trips, formats, wrappers, errors, interpolation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import official_reference as ref
from internvideo2_jax.convert import io as cio
from internvideo2_jax.convert.official import (resize_vision_params, vision_from_state_dict,
                                               vision_to_state_dict)
from internvideo2_jax.models.embeddings import resize_pos_embed
from internvideo2_jax.models.vit import VisionEncoder, vit_preset


def _sd(seed=0):
  return ref.random_state_dict(np.random.default_rng(seed), d=64, depth=2, mlp_hidden=256,
                               clip_dim=32)


@pytest.mark.parametrize("over", [dict(), dict(qkv_bias=True), dict(sep_pos_embed=True),
                                  dict(sep_image_video_pos_embed=True, tubelet_size=2)])
def test_flax_official_flax_round_trip(over):
  cfg = vit_preset("tiny", **over)
  params = nn.unbox(VisionEncoder(cfg).init(jax.random.key(3), jnp.ones((1, 4, 32, 32, 3))))
  sd = vision_to_state_dict(params, cfg)
  back = vision_from_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_file_formats_and_stage2_prefix(tmp_path, ext):
  sd = _sd()
  full = {f"vision_encoder.{k}": v for k, v in sd.items()}
  full["text_encoder.bert.embeddings.word_embeddings.weight"] = np.zeros((10, 4), np.float32)
  full["vision_encoder.clip_decoder.0.head.weight"] = np.zeros((48, 64), np.float32)
  full["temp"] = np.asarray(0.07, np.float32)
  path = tmp_path / f"ckpt{ext}"
  cio.save_state_dict(full, path)
  loaded = cio.load_state_dict(path)
  params = vision_from_state_dict(loaded, vit_preset("tiny"))  # text/decoder keys are skipped
  out = vision_to_state_dict(params, vit_preset("tiny"))
  assert set(out) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(out[k], sd[k])


def test_wrappers_are_unwrapped():
  sd = {"a": np.ones(2)}
  assert cio.unwrap({"module": sd}) is not sd and cio.unwrap({"module": sd}) == sd
  assert cio.unwrap({"model": {"state_dict": sd}}) == sd
  with pytest.raises(cio.CheckpointError, match="expected a state dict"):
    cio.unwrap([1, 2])


def test_unreadable_files_are_named(tmp_path):
  bad = tmp_path / "broken.safetensors"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(cio.CheckpointError, match="broken.safetensors: could not read"):
    cio.load_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    cio.load_state_dict(tmp_path / "nope.npz")
  with pytest.raises(cio.CheckpointError, match="unknown checkpoint format"):
    (tmp_path / "w.h5").write_bytes(b"")
    cio.load_state_dict(tmp_path / "w.h5")


def test_mismatches_are_listed_together():
  sd = _sd()
  del sd["blocks.1.ls2.gamma"]
  del sd["cls_token"]
  sd["blocks.0.mlp.fc1.weight"] = np.zeros((128, 64), np.float32)
  sd["blocks.2.norm1.weight"] = np.zeros(64, np.float32)
  sd["some.other.thing"] = np.zeros(3, np.float32)
  with pytest.raises(cio.CheckpointError) as e:
    vision_from_state_dict(sd, vit_preset("tiny"))
  msg = str(e.value)
  for needle in ("missing (2)", "cls_token", "blocks.1.ls2.gamma", "wrong shape (1)",
                 "blocks.0.mlp.fc1.weight: checkpoint (128, 64), model expects (256, 64)",
                 "unexpected (2)", "some.other.thing", "more blocks than depth=2"):
    assert needle in msg
  # strict=False tolerates unknown keys but never missing or mis-shaped ones
  del sd["some.other.thing"], sd["blocks.2.norm1.weight"]
  with pytest.raises(cio.CheckpointError, match="missing"):
    vision_from_state_dict(sd, vit_preset("tiny"), strict=False)


def test_vision_init_refuses_a_deeper_checkpoint_unless_partial(tmp_path):
  """`model.vision_init` with a deeper checkpoint of the same width: an error naming the key and
  the remedy; with vision_init_partial the matching blocks load and the rest is named."""
  from internvideo2_jax.convert.official import load_vision_init
  deep = ref.random_state_dict(np.random.default_rng(0), d=64, depth=3, mlp_hidden=256, clip_dim=32)
  path = tmp_path / "deep.safetensors"
  cio.save_state_dict(deep, path)
  with pytest.raises(cio.CheckpointError, match=r"(?s)model.vision_init=.*deep.safetensors.*more blocks "
                                                r"than depth=2.*vision_init_partial=True"):
    load_vision_init(str(path), vit_preset("tiny"))
  got = {}
  msg = load_vision_init(str(path), vit_preset("tiny"), partial=True, sink=lambda p, v: got.__setitem__(p, v))
  assert "partially" in msg and "blocks.2.attn.qkv.weight" in msg
  out = vision_to_state_dict({"params": _unflatten(got)}, vit_preset("tiny"))
  for k in out:
    np.testing.assert_array_equal(out[k], deep[k])
  same = tmp_path / "same.safetensors"  # a checkpoint that matches loads strictly, nothing left out
  cio.save_state_dict(_sd(), same)
  assert "partially" not in load_vision_init(str(same), vit_preset("tiny"))


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def test_position_tables_are_interpolated_on_load():
  sd8 = ref.random_state_dict(np.random.default_rng(1), d=64, depth=2, mlp_hidden=256,
                              clip_dim=32, n_tokens=8 * 16)
  cfg4 = vit_preset("tiny", num_frames=4)
  params = vision_from_state_dict(sd8, cfg4)  # 8 frames -> 4 frames, inferred
  want = resize_pos_embed(sd8["pos_embed"], (8, 4, 4), (4, 4, 4))
  np.testing.assert_allclose(params["params"]["pos_embed"], want)
  # other resolution (8x8 grid -> 4x4), same frames
  sd_big = ref.random_state_dict(np.random.default_rng(2), d=64, depth=2, mlp_hidden=256,
                                 clip_dim=32, n_tokens=4 * 64)
  with pytest.raises(cio.CheckpointError, match="cannot tell"):  # 16x(4x4) or 4x(8x8)?
    vision_from_state_dict(sd_big, cfg4)
  params = vision_from_state_dict(sd_big, cfg4, checkpoint_num_frames=4)
  np.testing.assert_allclose(params["params"]["pos_embed"],
                             resize_pos_embed(sd_big["pos_embed"], (4, 8, 8), (4, 4, 4)))
  # ambiguous row counts need the checkpoint's frame count
  sd_odd = dict(sd8, pos_embed=np.zeros((1, 1 + 2 * 36, 64), np.float32))
  with pytest.raises(cio.CheckpointError, match="not 4 frames"):
    vision_from_state_dict(sd_odd, cfg4, checkpoint_num_frames=4)
  params = vision_from_state_dict(sd_odd, cfg4, checkpoint_num_frames=2)
  assert params["params"]["pos_embed"].shape == (1, 65, 64)


def test_resize_params_for_new_frames_and_resolution():
  cfg = vit_preset("tiny")
  params = vision_from_state_dict(_sd(), cfg)
  new = vit_preset("tiny", num_frames=8, img_size=48)
  resized = resize_vision_params(params, cfg, new)
  out = VisionEncoder(new).apply(resized, jnp.ones((1, 8, 48, 48, 3)))
  assert out["tokens"].shape == (1, 1 + 8 * 36, 64)
  np.testing.assert_array_equal(resized["params"]["blocks"]["attn"]["qkv"]["kernel"],
                                params["params"]["blocks"]["attn"]["qkv"]["kernel"])


def test_torch_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _sd()
  path = tmp_path / "ckpt.pth"
  torch.save({"module": {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}}, path)
  params = vision_from_state_dict(cio.load_state_dict(path), vit_preset("tiny"))
  np.testing.assert_allclose(params["params"]["cls_token"], sd["cls_token"], rtol=1e-2)
