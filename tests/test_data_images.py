"""Still images of every format real corpora hold, through the image decoder and the loader,
and the "N in a row" error that says what the failures were."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from internvideo2_jax.data import pipeline as P
from internvideo2_jax.data.image import read_image
from internvideo2_jax.data.loader import LoadSpec, load_example
from internvideo2_jax.data.video import VideoReadError
from internvideo2_jax.models.vit import vit_preset


def _picture(h=48, w=64):
  """Left half red, right half blue, a green band at the top: orientation is visible."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:, : w // 2] = (200, 30, 30)
  a[:, w // 2:] = (30, 30, 200)
  a[:8] = (30, 200, 30)
  return a


def _write_all(d):
  pic = _picture()
  img = Image.fromarray(pic)
  paths = {}
  paths["jpeg"] = d / "a.jpg"
  img.save(paths["jpeg"], quality=95)
  paths["progressive"] = d / "p.jpg"
  img.save(paths["progressive"], quality=95, progressive=True)
  paths["cmyk"] = d / "c.jpg"
  img.convert("CMYK").save(paths["cmyk"], quality=95)
  paths["png"] = d / "a.png"
  img.save(paths["png"])
  paths["png16"] = d / "g16.png"
  Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257)).save(paths["png16"])
  paths["palette"] = d / "pal.png"
  img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(paths["palette"])
  paths["rgba"] = d / "rgba.png"
  img.convert("RGBA").save(paths["rgba"])
  paths["webp"] = d / "a.webp"
  img.save(paths["webp"], quality=95)
  paths["gif"] = d / "a.gif"
  img.save(paths["gif"], save_all=True, append_images=[Image.fromarray(255 - pic)])
  paths["gray"] = d / "g.jpg"
  img.convert("L").save(paths["gray"], quality=95)
  paths["exif"] = d / "rot.jpg"  # stored rotated, EXIF orientation 6 (rotate 90 CW to view)
  exif = Image.Exif()
  exif[0x0112] = 6
  img.transpose(Image.Transpose.ROTATE_90).save(paths["exif"], quality=95, exif=exif)
  return pic, paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return _write_all(tmp_path_factory.mktemp("images"))


def test_every_image_kind_decodes_upright_rgb(images):
  pic, paths = images
  for kind, path in paths.items():
    out = read_image(str(path))
    assert out.dtype == np.uint8 and out.shape == pic.shape, (kind, out.shape)
    if kind in ("png16", "gray"):  # grayscale: three equal channels, the luma of the picture
      assert (out[..., 0] == out[..., 1]).all() and abs(int(out[30, 5, 0]) - 76) < 12, kind
      continue
    tol = 40 if kind in ("palette", "gif", "cmyk") else 12
    for y, x in ((2, 5), (30, 5), (30, 60)):  # green top band, red left, blue right
      assert np.abs(out[y, x].astype(int) - pic[y, x]).max() <= tol, (kind, y, x, out[y, x], pic[y, x])
  with open(paths["jpeg"], "rb") as f:  # bytes (packed shards) as well as paths
    assert read_image(f.read()).shape == pic.shape


def test_broken_images_are_named(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(VideoReadError, match="bad.jpg: cannot decode image") as e:
    read_image(str(bad))
  assert e.value.reason == "corrupt_video"
  with pytest.raises(VideoReadError) as e:
    read_image(str(tmp_path / "missing.png"))
  assert e.value.reason == "missing_file"


def test_jpeg_image_text_corpus_trains_and_bad_runs_say_why(images, tmp_path):
  _, paths = images
  root = os.path.dirname(paths["jpeg"])
  rows = [{"image": os.path.basename(str(p)), "caption": f"picture {k}"} for k, p in paths.items()]
  ann = tmp_path / "images.json"
  ann.write_text(json.dumps(rows))
  spec = LoadSpec(num_frames=4, size=32, patch_size=8, text=False, crop="squash", train=False)
  from internvideo2_jax.data import sources
  corpus = sources.open_corpus({"format": "json", "path": str(ann), "data_root": root})
  for i in range(len(corpus)):
    ex = load_example(corpus[i], spec, np.random.default_rng(0))
    assert ex["video"].shape == (1, 32, 32, 3)
  cfg = ml_collections.ConfigDict({"batch_size": 4, "seed": 0, "num_workers": 0,
                                   "corpora": ({"format": "json", "path": str(ann), "data_root": root},),
                                   "load": {"max_txt_l": 8}})
  batch = next(iter(P.make_pipeline(cfg, vit_preset("tiny", num_frames=4), stage="stage2")))
  assert batch["video"].shape[0] == 4 and batch["skipped"].sum() == 0
  # every row points at a missing file: the error says so, with counts and example paths
  ann.write_text(json.dumps([{"image": f"nope_{i}.jpg", "caption": "x"} for i in range(20)]))
  with pytest.raises(RuntimeError, match=r"missing_file x\d+ \(e\.g\. .*nope_\d+\.jpg.*\|.*nope_\d+\.jpg"):
    next(iter(P.make_pipeline(cfg, vit_preset("tiny", num_frames=4), stage="stage2")))


def test_paths_outside_the_data_root_are_refused_unless_allowed(tmp_path):
  from internvideo2_jax.data import sources
  root = tmp_path / "root"
  (root / "sub").mkdir(parents=True)
  outside = tmp_path / "secret.jpg"
  Image.fromarray(_picture()).save(outside)
  Image.fromarray(_picture()).save(root / "sub" / "ok.jpg")
  (root / "link.jpg").symlink_to(outside)
  rows = [{"image": "sub/ok.jpg", "caption": "in"}, {"image": "../secret.jpg", "caption": "up"},
          {"image": str(outside), "caption": "absolute"}, {"image": "link.jpg", "caption": "symlink out"},
          {"image": str(root / "sub" / "ok.jpg"), "caption": "absolute inside"}]
  ann = tmp_path / "a.json"
  ann.write_text(json.dumps(rows))
  skipped = __import__("collections").Counter()
  corpus = sources.open_corpus({"format": "json", "path": str(ann), "data_root": str(root)}, skipped)
  assert [corpus[i]["captions"][0] for i in range(len(corpus))] == ["in", "absolute inside"]
  assert skipped["outside_root"] == 3
  allowed = sources.open_corpus({"format": "json", "path": str(ann), "data_root": str(root),
                                 "allow_outside_root": True})
  assert len(allowed) == 5
  ann.write_text(json.dumps(rows[1:4]))
  with pytest.raises(sources.AnnotationError, match="no usable rows \\(outside_root x3\\)"):
    sources.open_corpus({"format": "json", "path": str(ann), "data_root": str(root)})
