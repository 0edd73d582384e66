"""Grain pipelines end to end on real files: shapes, determinism, sharding, resume through
Orbax, formats (JSON / ArrayRecord / TFDS) giving the same examples, mixing, bad data."""

import collections
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from internvideo2_jax.data import pack, pipeline as P, sources, synthetic, tfds_corpus
from internvideo2_jax.data.accounting import DataReport
from internvideo2_jax.data.loader import REASONS, LoadSpec, load_example
from internvideo2_jax.models.vit import vit_preset
from internvideo2_jax.parallel import mesh as M, sharding as S

MODEL = vit_preset("tiny")  # 32 px, patch 8, 4 frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  paths = synthetic.write_corpus(root, train=16, val=4, images=8, num_frames=16, size=48)
  return root, paths


def data_cfg(corpora, **kw):
  c = ml_collections.ConfigDict({"batch_size": 4, "seed": 0, "num_workers": 0,
                                 "corpora": corpora, "load": {"mask": "random", "audio": True}})
  c.update(kw)
  return c


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_stage2_batches_follow_the_spec(corpus):
  root, paths = corpus
  ds = P.make_pipeline(data_cfg([{"format": "json", "path": paths["train"], "data_root": root}]),
                       MODEL, stage="stage2")
  b = take(ds, 1)[0]
  assert b["video"].shape == (4, 4, 32, 32, 3) and b["video"].dtype == np.uint8
  assert b["text_ids"].shape == (4, 32) and b["text_mask"].dtype == np.int32
  assert b["audio"].shape == (4, 998, 64) and b["has_audio"].dtype == np.bool_
  assert b["mask"].shape == (4, 64) and (~b["mask"]).sum(1).tolist() == [13] * 4
  assert b["skipped"].shape == (4, len(REASONS)) and b["index"].shape == (4,)
  assert set(b) <= set(P.BATCH_SPEC)


def test_deterministic_and_sharded_per_process(corpus):
  root, paths = corpus
  cfg = data_cfg([{"format": "json", "path": paths["train"], "data_root": root}])
  a = take(P.make_pipeline(cfg, MODEL), 3)
  b = take(P.make_pipeline(cfg, MODEL), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = take(P.make_pipeline(data_cfg(cfg.corpora.to_list() if hasattr(cfg.corpora, "to_list") else cfg.corpora, seed=1), MODEL), 1)[0]
  assert not np.array_equal(other["index"], a[0]["index"]) or not np.array_equal(other["video"], a[0]["video"])
  # two processes: disjoint halves of the same global order, each with half the batch
  cfg8 = data_cfg(cfg.corpora, batch_size=8)
  halves = [take(P.make_pipeline(cfg8, MODEL, shard_index=i, shard_count=2, num_epochs=1), 2)
            for i in range(2)]
  seen = [np.concatenate([b["index"] for b in h]) for h in halves]
  assert all(len(s) == 8 for s in seen) and not set(seen[0]) & set(seen[1])


def test_resume_by_position_on_any_process_and_worker_count(corpus):
  """A run stopped after s steps continues with start_batch=s: the same global batches follow,
  with worker processes, and when 2 processes each build their half (contiguous blocks)."""
  root, paths = corpus
  corpora = [{"format": "json", "path": paths["train"], "data_root": root}]
  cfg = data_cfg(corpora, batch_size=4)
  whole = take(P.make_pipeline(cfg, MODEL), 5)
  resumed = take(P.make_pipeline(data_cfg(corpora, batch_size=4, num_workers=2), MODEL, start_batch=3), 2)
  halves = [take(P.make_pipeline(cfg, MODEL, shard_index=i, shard_count=2, start_batch=3), 2) for i in range(2)]
  for s, want in enumerate(whole[3:]):
    for k in want:
      np.testing.assert_array_equal(resumed[s][k], want[k], err_msg=k)
      np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), want[k], err_msg=k)


def test_mixture_is_random_access_and_follows_the_weights():
  import grain
  a = grain.MapDataset.source([("a", i) for i in range(1000)])
  b = grain.MapDataset.source([("b", i) for i in range(1000)])
  mix = P.BatchMixture([a, b], [3.0, 1.0])
  seq = [mix[i] for i in range(400)]
  assert sum(x[0] == "a" for x in seq[:8]) == 6 and sum(x[0] == "a" for x in seq) == 300
  # each corpus is read in order, and any position can be read directly (resume)
  assert [x[1] for x in seq if x[0] == "b"] == list(range(100))
  fresh = P.BatchMixture([a, b], [3.0, 1.0])
  assert [fresh[i] for i in range(399, 199, -1)] == seq[200:][::-1]


def test_json_arrayrecord_and_tfds_give_the_same_examples(corpus, tmp_path):
  root, paths = corpus
  js = sources.open_corpus(ml_collections.ConfigDict({"format": "json", "path": paths["val"], "data_root": root}))
  res = pack.write_shards(sources.iter_records([js]), str(tmp_path / "shards" / "val"), 2, audio=True)
  assert res["written"] == len(js) == 4
  ar = sources.open_corpus(ml_collections.ConfigDict({"format": "array_record", "path": str(tmp_path / "shards" / "val")}))
  tfds_corpus.build({"val": paths["val"]}, data_dir=str(tmp_path / "tfds"), data_root=root,
                    pack_kwargs=dict(audio=True))
  tf = tfds_corpus.TfdsCorpus(split="val", data_dir=str(tmp_path / "tfds"))
  by_key = lambda src: {src[i]["key"]: src[i] for i in range(len(src))}  # noqa: E731
  a, b = by_key(ar), by_key(tf)
  assert set(a) == set(b) == {r["key"] for r in js.records}
  spec = LoadSpec(num_frames=4, size=32, patch_size=8, audio=True, mask="random")
  for key, rec in js_records(js).items():
    ex = [load_example(src[key], spec, np.random.default_rng(0)) for src in (
        {key: rec}, a, b)]
    for k in ex[0]:
      if k == "audio":  # the JSON record decodes AAC itself, packed ones read stored PCM
        np.testing.assert_allclose(ex[1][k], ex[2][k])
        np.testing.assert_allclose(ex[0][k], ex[1][k], atol=0.05)
      else:
        np.testing.assert_array_equal(ex[0][k], ex[1][k])
        np.testing.assert_array_equal(ex[1][k], ex[2][k])


def js_records(js):
  return {r["key"]: r for r in js.records}


def test_weighted_mixing_of_video_and_image_corpora(corpus):
  root, paths = corpus
  cfg = data_cfg([{"format": "json", "path": paths["train"], "data_root": root, "weight": 3.0},
                  {"format": "json", "path": paths["train_images"], "data_root": root, "weight": 1.0}],
                 load={"mask": "random", "text": True})
  frames = [b["video"].shape[1] for b in take(P.make_pipeline(cfg, MODEL), 8)]
  assert set(frames) == {4, 1} and frames.count(4) == 6  # 3:1 by batch
  img = next(b for b in take(P.make_pipeline(cfg, MODEL), 4) if b["video"].shape[1] == 1)
  assert (~img["mask"]).sum(1).tolist() == [8] * 4  # image mask ratio 0.5 of 16 tokens


def test_stage1_csv_pipeline(corpus):
  root, paths = corpus
  cfg = data_cfg([{"format": "csv", "path": paths["train_stage1"], "data_root": root}],
                 load={"num_frames": 16})
  b = take(P.make_pipeline(cfg, MODEL, stage="stage1"), 1)[0]
  assert b["video"].shape == (4, 16, 32, 32, 3) and "text_ids" not in b
  assert set(b["label"].tolist()) <= {0, 1, 2, 3}


def test_host_batch_becomes_a_sharded_global_array(corpus):
  root, paths = corpus
  cfg = data_cfg([{"format": "json", "path": paths["train"], "data_root": root}], batch_size=8)
  batch = take(P.make_pipeline(cfg, MODEL), 1)[0]
  mesh = M.make_mesh({"data": 4, "fsdp": 2})
  arrays = S.shard_batch(batch, mesh)
  assert arrays["video"].shape == (8, 4, 32, 32, 3)
  assert len(arrays["video"].addressable_shards) == 8
  assert arrays["video"].addressable_shards[0].data.shape == (1, 4, 32, 32, 3)


# ----------------------------------------------------------------------------- bad data


def _bad_corpus(root, good_rows):
  """Rows pointing at every kind of broken input next to good ones."""
  d = os.path.join(root, "bad")
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(5)
  open(os.path.join(d, "empty.mp4"), "wb").close()
  with open(os.path.join(root, good_rows[0]["video"]), "rb") as f:
    data = f.read()
  with open(os.path.join(d, "truncated.mp4"), "wb") as f:
    f.write(data[: len(data) // 3])
  with open(os.path.join(d, "garbage.mp4"), "wb") as f:
    f.write(rng.bytes(4000))
  import av
  with av.open(os.path.join(d, "audio_only.m4a"), "w") as c:  # no video stream
    s = c.add_stream("aac", rate=16000)
    s.layout = "mono"
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
    fr.sample_rate = 16000
    for p in list(s.encode(fr)) + list(s.encode()):
      c.mux(p)
  clip = synthetic.render_clip(rng, 3, 48, shape="square", colour="red", direction="up")
  synthetic.write_mp4(os.path.join(d, "short.mp4"), clip)  # 3 frames < 4 requested
  gray = synthetic.render_clip(rng, 8, 50, shape="circle", colour="white", direction="left")
  with av.open(os.path.join(d, "gray_odd.mkv"), "w") as c:  # grayscale, odd size (50 x 49)
    s = c.add_stream("ffv1", rate=8)
    s.width, s.height, s.pix_fmt = 50, 49, "gray"
    for i in range(8):
      f = av.VideoFrame.from_ndarray(np.ascontiguousarray(gray[i, :49, :, 0]), format="gray")
      for p in s.encode(f):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  with open(os.path.join(d, "broken_audio.wav"), "wb") as f:
    f.write(b"RIFF\x00\x00\x00\x00WAVEjunk")
  rows = [dict(r) for r in good_rows[:4]]
  rows += [
      {"video": "bad/missing.mp4", "caption": "a missing file"},
      {"video": "bad/empty.mp4", "caption": "an empty file"},
      {"video": "bad/truncated.mp4", "caption": "a truncated file"},
      {"video": "bad/garbage.mp4", "caption": "random bytes"},
      {"video": "bad/audio_only.m4a", "caption": "no video stream"},
      {"video": "bad/short.mp4", "caption": "only three frames"},
      {"video": "bad/gray_odd.mkv", "caption": "grey odd sized frames"},
      {"video": good_rows[1]["video"], "caption": "undecodable audio", "audio": "bad/broken_audio.wav"},
      {"video": good_rows[2]["video"], "caption": "word " * 2000},
      {"video": good_rows[3]["video"], "caption": 42},          # refused: not a string
      {"video": good_rows[0]["video"], "caption": "lone \ud800 surrogate"},  # refused: unencodable
      {"video": good_rows[1]["video"], "caption": "?!. ..."},   # refused: empty after pre_text
      {"video": good_rows[2]["video"], "captions": [7, "one good caption"]},  # kept: the good one
      ["not", "a", "row"],                                       # malformed row
      {"caption": "no media key"},                               # malformed row
  ]
  path = os.path.join(root, "bad.json")
  text = json.dumps(rows).replace("grey odd sized frames", "gr\\u00e9y odd sized frames")
  with open(path, "wb") as f:
    f.write(text.encode("utf-8").replace(b"gr\\u00e9y", b"gr\xe9y"))  # a non-UTF-8 byte
  return path


def test_bad_data_is_skipped_counted_and_the_run_goes_on(corpus, caplog):
  root, paths = corpus
  with open(paths["train"]) as f:
    good = json.load(f)
  path = _bad_corpus(root, good)
  report = DataReport()
  cfg = data_cfg([{"format": "json", "path": path, "data_root": root}], batch_size=1,
                 load={"audio": True, "mask": "random", "max_caption_chars": 500})
  batches = list(P.make_pipeline(cfg, MODEL, num_epochs=1, report=report))
  # refused when parsed, each logged once by file and row: a list and a row without media are
  # malformed; the 10000-character, non-string, unencodable and empty captions are bad_caption
  assert report.corpora[path] == {"usable": 13, "dropped": {"bad_annotation": 2, "bad_caption": 4}}
  assert len(batches) == 13  # every slot filled, bad media replaced
  total = collections.Counter()
  for b in batches:
    total.update(P.skip_summary(b))
  # each bad row is replaced once; a replacement candidate can itself be bad and count again
  want = {"missing_file": 1, "empty_file": 1, "corrupt_video": 2, "no_video_stream": 1}
  assert set(total) == set(want) and all(total[k] >= n for k, n in want.items()), total
  has_audio = {int(b["index"][0]): bool(b["has_audio"][0]) for b in batches}
  assert sum(has_audio.values()) >= 4 and not all(has_audio.values())  # broken audio -> zeros
  shapes = {b["video"].shape for b in batches}
  assert shapes == {(1, 4, 32, 32, 3)}  # the short, grey, odd-sized clips are usable
  assert "missing.mp4" in caplog.text and "row 14" in caplog.text
  for row, why in [(14, "is int, not a string"), (15, "unencodable character '\\ud800'"),
                   (16, "empty after cleaning"), (13, "max_caption_chars=500")]:
    lines = [ln for ln in caplog.text.splitlines() if f"bad.json: row {row} skipped (bad_caption)" in ln]
    assert len(lines) == 1 and why in lines[0], (row, lines)


def test_unreadable_annotation_files_are_named(tmp_path):
  p = tmp_path / "a.json"
  p.write_text("[{\"video\": \"x.mp4\"},")
  with pytest.raises(sources.AnnotationError, match="a.json: not valid JSON at line 1"):
    sources.load_json(str(p))
  with pytest.raises(sources.AnnotationError, match="cannot read"):
    sources.load_json(str(tmp_path / "none.json"))
  p.write_text("[1, 2]")
  with pytest.raises(sources.AnnotationError, match="no usable rows"):
    sources.load_json(str(p))


def test_clip_window_and_per_source_flip(corpus):
  root, paths = corpus
  with open(paths["train"]) as f:
    row = json.load(f)[0]
  path = os.path.join(root, row["video"])
  from internvideo2_jax.data.video import read_frames
  full = read_frames(path, list(range(16)), size=(32, 32))
  # video_end_frame is inclusive (official `duration = end - start + 1`): frames 9, 10, 11, 12
  rec = sources.record_from_row(dict(row, video_start_frame=9, video_end_frame=12), data_root=root)
  spec = LoadSpec(num_frames=4, sample="middle", size=32, patch_size=8, text=False, train=False)
  ex = load_example(rec, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(ex["video"], full[9:13])
  # a decoded-once cache keeps the same window
  cached = sources.cache_frames([rec], 32, progress=False)[0]
  np.testing.assert_array_equal(cached["frames"], full[9:13])
  np.testing.assert_array_equal(load_example(cached, spec, np.random.default_rng(0))["video"], full[9:13])
  # a one-frame window (start == end) is valid; end before start is not
  one = sources.record_from_row(dict(row, video_start_frame=5, video_end_frame=5), data_root=root)
  assert sources.clip_window(one, 32, 30.0) == (5, 6)
  with pytest.raises(ValueError, match="empty clip window"):
    sources.record_from_row(dict(row, video_start_frame=6, video_end_frame=5), data_root=root)
  # flips happen for ordinary sources but never for the ones listed in no_flip_sources
  train = LoadSpec(num_frames=4, sample="middle", size=32, patch_size=8, text=False, rrc_scale=(1.0, 1.0))
  def flips(source):
    r = dict(rec, source=source)
    outs = [load_example(r, train, np.random.default_rng(s))["video"] for s in range(12)]
    return {bool(np.array_equal(o, outs[0][:, :, ::-1])) for o in outs}
  assert True in flips("webvid") and True not in flips("ssv2")


def test_skip_counts_are_summed_over_each_interval_across_processes():
  """data_skipped/* is the interval's sum over every batch and process (not the last batch's),
  data_skipped_total/* the run's; a reason seen once keeps reporting (0 when quiet)."""
  report = DataReport()
  report.add_corpus("a.json", 10, {"bad_caption": 2})

  def batch(**counts):
    skipped = np.zeros((4, len(REASONS)), np.int32)
    for reason, n in counts.items():
      skipped[0, REASONS.index(reason)] = n
    return {"index": np.arange(4), "skipped": skipped}

  for b in (batch(missing_file=1), batch(), batch(missing_file=2, error=1)):
    report.add_batch(b)
  one = DataReport()  # one process: the reduce returns its input, which must not be lost
  one.add_batch(batch(missing_file=1))
  assert one.flush(lambda v: v)["data_skipped/missing_file"] == 1.0 and one.examples == 4
  two_processes = lambda v: 2 * v  # noqa: E731 - the other process saw the same
  first = report.flush(two_processes)
  assert first == {"data_skipped/missing_file": 6.0, "data_skipped/error": 2.0,
                   "data_skipped_total/missing_file": 6.0, "data_skipped_total/error": 2.0}
  report.add_batch(batch())
  second = report.flush(two_processes)
  assert second["data_skipped/missing_file"] == 0.0 and second["data_skipped_total/missing_file"] == 6.0
  summary = report.summary()
  assert summary["examples_loaded"] == 32 and summary["replaced"] == {"missing_file": 6, "error": 2}
  assert summary["refused_at_parse"] == {"bad_caption": 2}
  assert "a.json: 10 rows; refused: bad_caption 2" in report.table()
