"""Crops (one set of parameters per clip), flips, the test transform, and host masks."""

import numpy as np
import pytest

from internvideo2_jax.data import masks as M, transforms as T


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = T.random_resized_crop_box(120, 160, rng)
    assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
    assert 0.47 <= h * w / (120 * 160) <= 1.0  # scale (0.5, 1) up to rounding
    assert 0.72 <= w / h <= 1.39               # ratio (3/4, 4/3) up to rounding


def test_multi_scale_crop_sizes():
  rng = np.random.default_rng(0)
  sizes = set()
  for _ in range(300):
    top, left, h, w = T.multi_scale_crop_box(256, 340, rng, input_size=224)
    sizes.add((h, w))
    assert top % 1 == 0 and top + h <= 256 and left + w <= 340
  allowed = {256, 224, 192, 168}  # int(256 * s) for s in (1, .875, .75, .66)
  assert {s for pair in sizes for s in pair} <= allowed
  assert all(abs([256, 224, 192, 168].index(h) - [256, 224, 192, 168].index(w)) <= 1 for h, w in sizes)


def test_same_parameters_for_every_frame_and_flip_control():
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
  clip = np.stack([frame] * 4)
  out = T.train_transform(clip, 32, np.random.default_rng(1))
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
  for t in range(1, 4):
    np.testing.assert_array_equal(out[t], out[0])
  # flip off: many draws never mirror; flip on: some do
  ramp = np.broadcast_to(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (64, 80, 3))
  clip = np.stack([ramp] * 2)
  flipped = lambda flip: [T.train_transform(clip, 16, np.random.default_rng(s), flip=flip)[0, 8, 0, 0]
                          > T.train_transform(clip, 16, np.random.default_rng(s), flip=flip)[0, 8, -1, 0]
                          for s in range(20)]
  assert not any(flipped(False)) and any(flipped(True))


def test_test_transform_squashes_without_crop():
  img = np.zeros((2, 40, 80, 3), np.uint8)
  img[:, :, :40] = 200  # left half bright
  out = T.test_transform(img, 32)
  assert out.shape == (2, 32, 32, 3)
  assert out[0, :, :14].mean() > 190 and out[0, :, 18:].mean() < 10  # left half stays left half


def test_device_normalisation():
  import jax.numpy as jnp
  x = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  out = T.normalize(x)
  np.testing.assert_allclose(out[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown normalisation"):
    T.normalize(x, "coco")


def test_masks():
  rng = np.random.default_rng(0)
  m = M.random_mask((4, 16, 16), 0.8, rng)
  assert m.shape == (1024,) and (~m).sum() == 1024 - int(1024 * 0.8) == M.visible_count("random", (4, 16, 16), 0.8)
  t = M.tube_mask((4, 16, 16), 0.8, rng).reshape(4, 256)
  assert (t == t[0]).all() and (~t[0]).sum() == 256 - int(256 * 0.8)
  assert M.visible_count("tube", (4, 16, 16), 0.8) == 4 * 52
  a = M.random_mask((2, 4, 4), 0.5, np.random.default_rng(7))
  np.testing.assert_array_equal(a, M.random_mask((2, 4, 4), 0.5, np.random.default_rng(7)))
  with pytest.raises(ValueError, match="computed on device"):
    M.make_mask("attention", (1, 2, 2), 0.5, rng)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    M.num_visible(10, 1.0)
