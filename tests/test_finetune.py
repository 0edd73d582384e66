"""Fine-tuning and probing (train/finetune.py): the official recipe's pieces, each against a
hand computation, and the job in its three modes on the synthetic clips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.data import sources
from internvideo2_jax.ops import mixup


def test_class_index_and_label_lists(tmp_path):
  (tmp_path / "names.txt").write_text("abseiling\nair drumming\n\nzumba\n")
  assert sources.load_classes(str(tmp_path / "names.txt")) == ["abseiling", "air drumming", "zumba"]
  (tmp_path / "k.txt").write_text('2 zumba\n0 abseiling\n1 "air drumming"\n')
  assert sources.load_classes(str(tmp_path / "k.txt")) == ["abseiling", "air drumming", "zumba"]
  (tmp_path / "c.csv").write_text("abseiling,0\nzumba,1\n")
  assert sources.load_classes(str(tmp_path / "c.csv")) == ["abseiling", "zumba"]
  (tmp_path / "j.json").write_text(json.dumps({"b": 1, "a": 0}))
  assert sources.load_classes(str(tmp_path / "j.json")) == ["a", "b"]
  (tmp_path / "gap.txt").write_text("0 a\n2 b\n")
  with pytest.raises(sources.AnnotationError, match="without gaps"):
    sources.load_classes(str(tmp_path / "gap.txt"))
  (tmp_path / "v").mkdir()
  lines = ["a.mp4 0", "dir with space/b.mp4 zumba", "c.mp4,1", "d.mp4 unknown", "e.mp4 7", "../f.mp4 1", "just_a_path"]
  (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
  skipped = __import__("collections").Counter()
  recs = sources.load_labels(str(tmp_path / "train.txt"), data_root=str(tmp_path / "v"),
                             classes=["abseiling", "air drumming", "zumba"], skipped=skipped)
  assert [(os.path.relpath(r["path"], tmp_path / "v"), r["label"]) for r in recs] == [
      ("a.mp4", 0), ("dir with space/b.mp4", 2), ("c.mp4", 1)]
  assert skipped == {"bad_annotation": 3, "outside_root": 1}
  corpus = sources.open_corpus({"format": "labels", "path": str(tmp_path / "train.txt"),
                                "data_root": str(tmp_path / "v"), "classes": str(tmp_path / "names.txt")})
  assert len(corpus) == 3


def test_official_layer_decay_ids():
  from internvideo2_jax.train.optimizer import layer_decay_scales
  flat = {"vision_encoder/cls_token": np.zeros(3), "vision_encoder/pos_embed": np.zeros(3),
          "vision_encoder/patch_embed/proj/kernel": np.zeros(3),
          "vision_encoder/blocks/attn/qkv/kernel": np.zeros((4, 2, 2)),
          "vision_encoder/clip_projector/proj/kernel": np.zeros(3), "head/kernel": np.zeros(3),
          "fc_norm/weight": np.zeros(3)}
  s = layer_decay_scales(flat, 0.9, depth=4)
  # 0.9 ** (L + 1 - layer_id): id 0 for cls / pos / patch, i + 1 for block i, L + 1 for the rest
  assert s["vision_encoder/cls_token"] == pytest.approx(0.9 ** 5)
  assert s["vision_encoder/patch_embed/proj/kernel"] == pytest.approx(0.9 ** 5)
  np.testing.assert_allclose(np.ravel(s["vision_encoder/blocks/attn/qkv/kernel"]), [0.9 ** 4, 0.9 ** 3, 0.9 ** 2, 0.9],
                             rtol=1e-6)
  assert s["vision_encoder/clip_projector/proj/kernel"] == s["head/kernel"] == s["fc_norm/weight"] == 1.0


def test_mixup_cutmix_targets_and_boxes():
  labels = jnp.asarray([0, 1, 2, 3])
  x = jnp.arange(4, dtype=jnp.float32).reshape(4, 1, 1, 1, 1) * jnp.ones((4, 2, 8, 8, 3))
  # label smoothing alone: off = 0.1 / 4, on = 0.9 + off
  _, t, _ = mixup.mixup_cutmix(jax.random.key(0), x, labels, 4, mixup_alpha=0, cutmix_alpha=0)
  np.testing.assert_allclose(t[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
  # mixup only: x_i = lam x_i + (1 - lam) x_{B-1-i}, targets mixed the same way
  out, t, lam = mixup.mixup_cutmix(jax.random.key(1), x, labels, 4, mixup_alpha=0.8, cutmix_alpha=0, smoothing=0)
  lam = float(lam[0])
  np.testing.assert_allclose(out[0, 0, 0, 0, 0], lam * 0 + (1 - lam) * 3, rtol=1e-5)
  np.testing.assert_allclose(t[0], [lam, 0, 0, 1 - lam], rtol=1e-5)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  # cutmix only: one box, the same pixels in every frame, lambda = 1 - box area
  for seed in range(5):
    out, t, lam = mixup.mixup_cutmix(jax.random.key(seed), x, labels, 4, mixup_alpha=0, cutmix_alpha=1.0, smoothing=0)
    pasted = np.asarray(out[0, :, :, :, 0] == 3)                  # clip 0 got clip 3's pixels here
    assert (pasted[0] == pasted[1]).all()
    np.testing.assert_allclose(float(lam[0]), 1 - pasted[0].mean(), rtol=1e-6)
    np.testing.assert_allclose(t[0], [float(lam[0]), 0, 0, 1 - float(lam[0])], rtol=1e-5)
  # per batch shard: clips mix only within their shard (as the official per-GPU batches)
  out, _, lam = mixup.mixup_cutmix(jax.random.key(2), x, labels, 4, groups=2, mixup_alpha=0.8, cutmix_alpha=0)
  l0 = float(lam[0])
  np.testing.assert_allclose(out[0, 0, 0, 0, 0], l0 * 0 + (1 - l0) * 1, rtol=1e-5)


def test_random_erasing_boxes_per_frame():
  x = jnp.zeros((64, 4, 16, 16, 3))
  out = np.asarray(mixup.random_erasing(jax.random.key(0), x, 0.25))
  erased = (out != 0).any(axis=-1)                               # (B, T, H, W)
  per_frame = erased.reshape(64 * 4, -1).any(axis=1)
  assert 0.15 < per_frame.mean() < 0.35                          # each frame on its own, p = 0.25
  for f in np.flatnonzero(per_frame)[:20]:                       # one axis-aligned box of 2%..1/3
    m = erased.reshape(256, 16, 16)[f]
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and m.sum() <= 256 / 3 + 16
  assert np.allclose(mixup.random_erasing(jax.random.key(0), x, 0.0), 0)


def test_rand_augment_same_ops_on_every_frame():
  from internvideo2_jax.data.randaugment import ClipRandAugment, RandAugmentSpec
  spec = RandAugmentSpec.parse("rand-m7-n4-mstd0.5-inc1")
  assert spec == RandAugmentSpec(7.0, 4, 0.5, 0.5, True)
  with pytest.raises(ValueError, match="unknown part"):
    RandAugmentSpec.parse("rand-m7-x3")
  ra = ClipRandAugment(spec)
  assert len(ra.names) == 15 and "PosterizeIncreasing" in ra.names
  frame = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
  clip = np.stack([frame] * 4)
  changed = 0
  for seed in range(10):
    out = ra(clip, np.random.default_rng(seed))
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert all((out[i] == out[0]).all() for i in range(4))       # identical frames stay identical
    changed += not (out == clip).all()
  assert changed >= 5


def test_multi_view_metrics_and_views():
  from internvideo2_jax.data.transforms import spatial_views
  from internvideo2_jax.data.video import segment_indices
  from internvideo2_jax.evaluate.views import classification_metrics
  clip = np.zeros((2, 10, 20, 3), np.uint8)
  clip[:, :, :5] = 1
  clip[:, :, -5:] = 2
  v = spatial_views(clip, 10, 3)                                  # short side 10: crops along the width
  assert v.shape == (3, 2, 10, 10, 3) and v[0, 0, 0, 0, 0] == 1 and v[2, 0, 0, -1, 0] == 2 and v[1, 0, 0, 0, 0] == 0
  assert segment_indices(2, 8, test=True) == [2, 6]
  assert segment_indices(2, 8, test=True, view=0, num_views=4) == [0, 4]
  assert segment_indices(2, 8, test=True, view=3, num_views=4) == [3, 7]
  probs = np.asarray([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
  r = classification_metrics(probs, np.asarray([0, 2, 1, 1]), ["a", "b", "c"])
  assert r["top1"] == 50.0 and r["top5"] == 100.0
  assert r["per_class"] == {"a": 100.0, "b": 0.0, "c": 100.0} and r["mean_class_accuracy"] == pytest.approx(200 / 3)
  assert r["confusion"] == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]


def test_finetune_job_full_attentive_and_linear(tmp_path):
  """The three modes on the synthetic clips' direction labels (official list format): results,
  confusion matrix, the official fine-tuning export (round trip), and the probes leaving the
  encoder as loaded (no optimizer state for it)."""
  from configs import finetune as ft_config
  from internvideo2_jax.convert.io import load_state_dict
  from internvideo2_jax.convert.official import classifier_from_state_dict
  from internvideo2_jax.data import synthetic
  from internvideo2_jax.parallel import mesh as mesh_lib
  from internvideo2_jax.train import finetune
  syn = str(tmp_path / "syn")
  synthetic.write_corpus(syn, train=16, val=6, size=32, radius=(0.22, 0.3))

  def cfg(mode):
    c = ft_config.get_config(f"size=tiny,mode={mode}")
    lists = {"format": "labels", "data_root": syn, "classes": f"{syn}/classes_direction.txt"}
    c.data.corpora = (dict(lists, path=f"{syn}/train_direction.txt"),)
    c.eval.corpus.update(dict(lists, path=f"{syn}/val_direction.txt"))
    return c

  res = finetune.run(cfg("full"), str(tmp_path / "full"))
  assert res["step"] == 4 and 0 <= res["top1"] <= 100 and res["views"] == "2 x 3"
  assert res["classes"] == ["left", "right", "up", "down"] and res["num_videos"] == 6
  saved = json.load(open(tmp_path / "full" / "eval_classification.json"))
  assert np.asarray(saved["confusion"]).sum() == 6
  assert open(tmp_path / "full" / "confusion.png", "rb").read(4) == b"\x89PNG"
  export = str(tmp_path / "full" / "export" / "finetune_official_layout.safetensors")
  sd = load_state_dict(export)
  assert sd["head.weight"].shape == (4, 32) and "fc_norm.bias" in sd and "blocks.0.attn.qkv.weight" in sd
  c = cfg("full")
  back = classifier_from_state_dict(sd, finetune.build_model_config(c))["params"]
  np.testing.assert_array_equal(back["head"]["kernel"], sd["head.weight"].T)
  # the official fine-tuning loader's prefixes: `backbone.` / `encoder.` dropped, other keys kept
  wrapped = {(k if k.startswith(("head.", "fc_norm.")) else "backbone." + k): v for k, v in sd.items()}
  again = classifier_from_state_dict(wrapped, finetune.build_model_config(c))["params"]
  np.testing.assert_array_equal(again["vision_encoder"]["cls_token"], back["vision_encoder"]["cls_token"])
  np.testing.assert_array_equal(again["head"]["kernel"], back["head"]["kernel"])

  probe = cfg("attentive")
  probe.model.init_from = export            # a fine-tuned classifier file: the encoder keys are read
  mesh = mesh_lib.make_mesh(probe.mesh.to_dict())
  parts = finetune.step_parts(probe, mesh)
  assert parts.trainable and all(k.startswith(("vision_encoder/clip_projector/", "fc_norm/", "head/"))
                                 for k in parts.trainable)
  res = finetune.run(probe, str(tmp_path / "ap"))
  assert res["views"] == "1 x 3" and 0 <= res["top1"] <= 100
  after = load_state_dict(str(tmp_path / "ap" / "export" / "finetune_official_layout.safetensors"))
  np.testing.assert_array_equal(after["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])  # frozen
  q = "clip_projector.cross_attn.q.weight"
  assert not np.array_equal(after[q], sd[q])                            # the pool trains

  lin = cfg("linear")
  lin.model.init_from = export
  res = finetune.run(lin, str(tmp_path / "lin"))
  assert len(res["linear_loss"]) == 3 and 0 <= res["top1"] <= 100
  after = load_state_dict(str(tmp_path / "lin" / "export" / "finetune_official_layout.safetensors"))
  np.testing.assert_array_equal(after["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
  assert not np.array_equal(after["head.weight"], sd["head.weight"])


def test_python_api_loads_workdirs_and_files(tmp_path):
  """api.load: a stage-2 workdir (config + checkpoint) and its export file + config give the
  same embeddings; a fine-tuned classifier from its export classifies."""
  from configs import finetune as ft_config, stage2 as stage2_config
  from internvideo2_jax import api
  from internvideo2_jax.data import synthetic
  from internvideo2_jax.train import finetune
  syn = str(tmp_path / "syn")
  synthetic.write_corpus(syn, train=8, val=4, size=32, radius=(0.22, 0.3))
  c = stage2_config.get_config("size=tiny")
  with pytest.raises(KeyError, match=r"train has no 'total_step'.*total_steps"):
    api.train(c, str(tmp_path / "s2"), {"train.total_step": 1})
  # in-process training, as the command line runs it: results and the metrics history come back
  run = api.train(c, str(tmp_path / "s2"), {
      "data.corpora": ({"format": "json", "path": f"{syn}/train.json", "data_root": syn},),
      "eval.corpus": {"format": "json", "path": f"{syn}/val.json", "data_root": syn},
      "train.total_steps": 1, "train.eval_every": 1})
  assert [s for s, _ in run.history["train/loss"]] == [1]
  assert 0 <= run.results["itc"]["t2v_r1"] <= 100
  clips = np.random.default_rng(0).integers(0, 255, (3, 4, 32, 32, 3), dtype=np.uint8)
  from_dir = run.load()
  assert from_dir.kind == "stage2" and from_dir.step == 1
  held = api.heldout(from_dir)
  assert held.videos.shape == (4, 4, 32, 32, 3) and len(held.texts) >= 4
  attn = api.pool_attention(from_dir, held.videos)
  assert attn.shape == (4, 4, 4, 4) and np.all(attn >= 0) and np.all(attn.sum((1, 2, 3)) <= 1 + 1e-5)
  assert api.zero_shot(from_dir, held.videos, ["left", "right"], templates=("{}", "moving {}")).shape == (4, 2)
  with pytest.raises(ValueError, match="templates with a"):
    api.zero_shot(from_dir, held.videos, ["left"], templates=("moving",))
  with pytest.raises(ValueError, match="input is empty"):
    api.encode_texts(from_dir, [])
  with pytest.raises(TypeError, match="config key 'train.total_steps'"):
    api.override(stage2_config.get_config("size=tiny"), {"train.total_steps": "many"})
  v = api.encode_videos(from_dir, clips)
  t = api.encode_texts(from_dir, ["a red circle moves left", "a blue square moves up"])
  assert v.shape == (3, 16) and t.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
  from_file = api.load(str(tmp_path / "s2" / "export" / "stage2_official_layout.safetensors"),
                       config="configs/stage2.py:size=tiny")
  np.testing.assert_allclose(api.encode_videos(from_file, clips), v, atol=1e-5)
  np.testing.assert_allclose(api.encode_texts(from_file, ["a red circle moves left"]), t[:1], atol=1e-5)
  with pytest.raises(ValueError, match="uint8"):
    api.encode_videos(from_dir, clips.astype(np.float32))
  with pytest.raises(ValueError, match="needs the config"):
    api.load(str(tmp_path / "s2" / "export" / "stage2_official_layout.safetensors"))
  # a directory laid out like a Hugging Face model repo (one checkpoint + config.json), offline
  import shutil
  repo = tmp_path / "hf" / "InternVideo2-Stage2_tiny"
  repo.mkdir(parents=True)
  shutil.copy(tmp_path / "s2" / "export" / "stage2_official_layout.safetensors", repo / "InternVideo2-stage2_tiny.safetensors")
  (repo / "config.json").write_text("{}")
  from_repo = api.load(str(repo), config="configs/stage2.py:size=tiny")
  np.testing.assert_allclose(api.encode_videos(from_repo, clips), v, atol=1e-5)
  shutil.copy(repo / "InternVideo2-stage2_tiny.safetensors", repo / "other.safetensors")
  with pytest.raises(FileNotFoundError, match="2 weights files"):
    api.load(str(repo), config="configs/stage2.py:size=tiny")
  with pytest.raises(FileNotFoundError, match="Hugging Face repo"):
    api.resolve_weights("iv2-tests-nobody/no-such-repo-here")

  f = ft_config.get_config("size=tiny")
  f.data.corpora = ({"format": "labels", "path": f"{syn}/train_direction.txt", "data_root": syn},)
  f.train.total_steps = 1
  finetune.run(f, str(tmp_path / "ft"))
  clf = api.load(str(tmp_path / "ft"))
  probs = api.classify(clf, clips)
  with pytest.raises(ValueError, match="belongs to a video-text"):
    api.heldout(clf)
  assert probs.shape == (3, 4)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  same = api.load(str(tmp_path / "ft" / "export" / "finetune_official_layout.safetensors"), config=f)
  np.testing.assert_allclose(api.classify(same, clips), probs, atol=1e-5)


def test_every_weights_setting_takes_a_hf_repo_layout(tmp_path):
  """load_state_dict (behind every *_init and eval.weights) takes a file, a directory laid out
  like a Hugging Face repo, or a repo id (offline here: one clear error)."""
  from internvideo2_jax.convert.io import is_repo_id, load_state_dict
  repo = tmp_path / "InternVideo2-Stage2_1B-224p-f4"
  repo.mkdir()
  np.savez(repo / "InternVideo2-stage2_1b-224p-f4.npz", **{"temp": np.float32(0.07)})
  (repo / "README.md").write_text("model card")
  assert float(load_state_dict(str(repo))["temp"]) == pytest.approx(0.07)
  assert is_repo_id("OpenGVLab/InternVideo2-Stage2_1B-224p-f4") and not is_repo_id("runs/x.safetensors")
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    load_state_dict(str(tmp_path / "runs" / "missing.safetensors"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no weights file"):
    load_state_dict(str(tmp_path / "empty"))


def test_bad_fine_tuning_settings_are_named_before_model_work(tmp_path):
  from configs import finetune as ft_config
  from internvideo2_jax.train import finetune
  (tmp_path / "train.txt").write_text("a.mp4 1\nb.mp4 7\n")
  c = ft_config.get_config("size=tiny")          # 4 classes
  c.data.corpora = ({"format": "labels", "path": str(tmp_path / "train.txt"), "data_root": str(tmp_path)},)
  with pytest.raises(ValueError, match=r"corpora\[0\] .*train.txt: .*b.mp4.* has label 7, outside 0..3 "
                                       r"\(model.num_classes=4\)"):
    finetune.check_settings(c)
  (tmp_path / "train.txt").write_text("a.mp4 1\nb.mp4 3\n")
  finetune.check_settings(c)
  c.data.load = dict(c.data.load.to_dict(), rand_augment="rand-m7-q2")
  with pytest.raises(ValueError, match="config.data.load.rand_augment: .*unknown part 'q2'"):
    finetune.check_settings(c)
