"""Frame sampling semantics and PyAV decoding: exact frames, seeking, windows, images."""

import numpy as np
import pytest

from internvideo2_jax.data import synthetic, video as V


def test_middle_and_rand_follow_official_intervals():
  assert V.frame_indices(4, 16, "middle") == [1, 5, 9, 13]  # (x0 + x1 - 1) // 2 per interval
  rng = np.random.default_rng(0)
  edges = np.linspace(0, 100, 9).astype(int)
  for _ in range(50):
    idx = V.frame_indices(8, 100, "rand", rng=rng)
    for k, i in enumerate(idx):
      assert edges[k] <= i < edges[k + 1] - 1  # never the last frame of an interval
  assert V.frame_indices(4, 2, "middle") == [0, 1, 1, 1]  # short videos repeat the last
  fallback = V.frame_indices(4, 5, "rand", rng=rng)  # an empty interval: sorted random subset
  assert fallback == sorted(fallback) and len(set(fallback)) == 4
  assert V.frame_indices(3, 90, "fps1", input_fps=30) == [15, 45, 75]
  with pytest.raises(ValueError, match="unknown frame sampling"):
    V.frame_indices(4, 10, "uniform")


def test_tsn_segments():
  rng = np.random.default_rng(0)
  for _ in range(20):
    idx = V.segment_indices(16, 160, rng=rng)
    assert all(10 * k <= i < 10 * (k + 1) for k, i in enumerate(idx))
  assert V.segment_indices(4, 8, test=True) == [1, 3, 5, 7]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  rng = np.random.default_rng(0)
  frames = synthetic.render_clip(rng, 120, 48, shape="circle", colour="red", direction="right")
  d = tmp_path_factory.mktemp("clips")
  paths = {}
  for name, kw in {"gop8": dict(keyframe_interval=8), "bframes": dict(keyframe_interval=30, bframes=True)}.items():
    paths[name] = str(d / f"{name}.mp4")
    synthetic.write_mp4(paths[name], frames, fps=24, **kw)
  return paths


def _sequential(path):
  import av
  with av.open(path) as c:
    return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("name", ["gop8", "bframes"])
def test_seeking_returns_exact_frames(clip, name):
  ref = _sequential(clip[name])
  assert len(ref) == 120 == V.num_frames_of(clip[name])
  for idx in ([0, 37, 80, 119], [110, 3, 3, 64], list(range(5, 120, 15)), [119]):
    out = V.read_frames(clip[name], idx)
    for o, i in zip(out, idx):
      np.testing.assert_array_equal(o, ref[i])
  with open(clip[name], "rb") as f:  # encoded bytes (shard records) decode the same
    np.testing.assert_array_equal(V.read_frames(f.read(), [50])[0], ref[50])


def test_decodes_only_what_it_needs(clip, monkeypatch):
  decoded = []
  orig = V.VideoFile._decode

  def counting(self):
    for frame in orig(self):
      decoded.append(frame)
      yield frame

  monkeypatch.setattr(V.VideoFile, "_decode", counting)
  V.read_frames(clip["gop8"], V.frame_indices(8, 120, "middle"))
  assert len(decoded) < 70  # a few GOPs, not 120 frames
  decoded.clear()
  V.read_frames(clip["gop8"], [3])
  assert 1 <= len(decoded) <= 4  # from the keyframe at or before 3, stopping right after it


def test_indices_past_the_end_repeat_the_last_frame(clip):
  ref = _sequential(clip["gop8"])
  out = V.read_frames(clip["gop8"], [118, 130])
  np.testing.assert_array_equal(out[1], ref[119])


def test_resize_on_decode_and_images(tmp_path):
  img = np.zeros((30, 40, 3), np.uint8)
  img[:, 20:] = 255
  path = str(tmp_path / "x.png")
  synthetic.write_png(path, img)
  out = V.read_frames(path, [0])
  np.testing.assert_array_equal(out[0], img)
  assert V.read_frames(path, [0], size=(16, 16)).shape == (1, 16, 16, 3)


def test_errors_name_the_file(tmp_path):
  with pytest.raises(V.VideoReadError, match="nope.mp4: file not found") as e:
    V.read_frames(str(tmp_path / "nope.mp4"), [0])
  assert e.value.reason == "missing_file"
  (tmp_path / "empty.mp4").write_bytes(b"")
  with pytest.raises(V.VideoReadError, match="empty file"):
    V.read_frames(str(tmp_path / "empty.mp4"), [0])
  (tmp_path / "junk.mp4").write_bytes(b"\x00" * 5000)
  with pytest.raises(V.VideoReadError, match="junk.mp4"):
    V.read_frames(str(tmp_path / "junk.mp4"), [0])
