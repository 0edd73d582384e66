"""Sin-cos tables (official layout) and torch-exact position-table resizing."""

import os

import numpy as np
import pytest

from internvideo2_jax.models import embeddings as E


def test_sincos_1d_formula():
  table = E.sincos_1d(8, np.arange(3))
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  np.testing.assert_allclose(table[2], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))


def test_sincos_3d_layout():
  d, t, h, w = 32, 3, 2, 4
  table = E.sincos_3d(d, t, h, w, cls_token=True)
  assert table.shape == (1 + t * h * w, d) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0], 0)  # cls row is zero
  tok = table[1:].reshape(t, h, w, d)
  dt, ds = d // 4, 3 * d // 4
  # first D/4 channels code the frame index only
  np.testing.assert_allclose(tok[2, 1, 3, :dt], E.sincos_1d(dt, [2])[0], rtol=1e-6)
  np.testing.assert_allclose(tok[2, 0, 0, :dt], tok[2, 1, 2, :dt])
  # then the column (w) index, then the row (h) index: the MAE meshgrid(w, h) quirk
  spatial = tok[..., dt:]
  np.testing.assert_allclose(spatial[0, 1, 3, :ds // 2], E.sincos_1d(ds // 2, [3])[0], rtol=1e-6)
  np.testing.assert_allclose(spatial[0, 1, 3, ds // 2:], E.sincos_1d(ds // 2, [1])[0], rtol=1e-6)
  # tokens are t-major, then h, then w
  np.testing.assert_allclose(table[1 + 1 * h * w + 1 * w + 2], tok[1, 1, 2])


def test_sincos_rejects_bad_dims():
  with pytest.raises(ValueError, match="dim % 4"):
    E.sincos_3d(30, 1, 2, 2)


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "interp.npz")


@pytest.mark.parametrize("case", ["t_up", "t_down", "s_up", "s_down", "both"])
def test_resize_matches_torch(case):
  """Golden outputs of torch F.interpolate (tests/golden/make_interp_golden.py)."""
  g = np.load(GOLDEN)
  src, dst = (tuple(int(v) for v in row) for row in g[f"{case}_grids"])
  out = E.resize_pos_embed(g[f"{case}_in"], src, dst)
  # torch computes in fp32, we in fp64: agreement is to fp32 rounding.
  np.testing.assert_allclose(out, g[f"{case}_out"], atol=1e-5, rtol=1e-5)


def test_resize_identity_and_cubic_weights():
  x = np.random.default_rng(0).standard_normal((5, 6, 3))
  np.testing.assert_allclose(E.resize_bicubic(x, (5, 6), axes=(0, 1)), x, atol=1e-12)
  w = E._bicubic_weights(7, 4)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
  # torch's a = -0.75 kernel, not jax.image's a = -0.5: cubic(1.5) differs between them
  assert E._cubic(1.5, -0.75) == pytest.approx(-0.09375)
