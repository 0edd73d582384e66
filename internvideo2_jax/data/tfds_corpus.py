"""A TFDS builder for the packed records (array_record format, no TensorFlow needed).

    from internvideo2_jax.data import tfds_corpus
    tfds_corpus.build(annotations={"train": "train.json"}, data_root=..., data_dir="tfds/")
    ds = tfds.data_source("internvideo_corpus", split="train", data_dir="tfds/")  # -> Grain

Features are raw bytes / text / ints only (TFDS needs TensorFlow for Image/Video/Audio
features); the media stay encoded and are decoded with PyAV in the data workers, exactly as the
ArrayRecord shards of `data/pack.py`. `TfdsCorpus` turns TFDS examples back into records.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from internvideo2_jax.data import pack, sources


class InternvideoCorpus(tfds.core.GeneratorBasedBuilder):
  """Video/image-text(-audio) records; registered as `internvideo_corpus`."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "qa: stage-3 instruction pairs (JSON text)"}

  def __init__(self, *, annotations: Optional[dict] = None, data_root: str = "",
               audio_root: str = "", source: str = "", pack_kwargs: Optional[dict] = None, **kw):
    self._annotations = annotations or {}
    self._roots = dict(data_root=data_root, audio_root=audio_root, source=source)
    self._pack_kwargs = pack_kwargs or {}
    super().__init__(**kw)

  def _info(self):
    f = tfds.features
    raw = lambda: f.Tensor(shape=(), dtype=np.object_)  # noqa: E731
    return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
        "key": f.Text(), "media": f.Text(), "path": f.Text(), "data": raw(),
        "captions": f.Text(), "caption_fields": f.Text(), "audio_pcm": raw(),
        "start_frame": np.int64, "end_frame": np.int64, "start_time": np.float64,
        "end_time": np.float64, "source": f.Text(), "label": np.int64, "qa": f.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(path) for split, path in self._annotations.items()}

  def _generate_examples(self, path):
    if path.endswith(".csv"):
      recs = sources.load_csv(path, data_root=self._roots["data_root"])
    else:
      recs = sources.load_json(path, **self._roots)
    for rec in recs:
      try:
        packed = pack.pack_record(rec, **self._pack_kwargs)
      except (OSError, RuntimeError) as e:
        pack.log.warning("skipped %s: %s", rec["key"], e)
        continue
      yield packed["key"], {
          "key": packed["key"], "media": packed["media"], "path": packed["path"],
          "data": packed["data"], "captions": json.dumps(packed["captions"]),
          "caption_fields": json.dumps(packed["caption_fields"]), "audio_pcm": packed["audio_pcm"],
          "start_frame": packed["start_frame"], "end_frame": packed["end_frame"],
          "start_time": packed["start_time"], "end_time": packed["end_time"],
          "source": packed["source"], "label": packed["label"], "qa": json.dumps(packed["qa"])}


def build(annotations: dict, data_dir: str, **kw) -> InternvideoCorpus:
  builder = InternvideoCorpus(annotations=annotations, data_dir=data_dir, file_format="array_record",
                              **kw)
  builder.download_and_prepare()
  return builder


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def record_from_example(ex: dict) -> dict:
  return sources.make_record(
      key=_text(ex["key"]), media=_text(ex["media"]), path=_text(ex["path"]), data=bytes(ex["data"]),
      captions=json.loads(_text(ex["captions"])), caption_fields=json.loads(_text(ex["caption_fields"])),
      audio_pcm=bytes(ex["audio_pcm"]), start_frame=int(ex["start_frame"]),
      end_frame=int(ex["end_frame"]), start_time=float(ex["start_time"]),
      end_time=float(ex["end_time"]), source=_text(ex["source"]), label=int(ex["label"]),
      qa=json.loads(_text(ex["qa"])) if "qa" in ex else [])


class TfdsCorpus:
  """Random access over a prepared TFDS corpus; items are records."""

  def __init__(self, name: str = "internvideo_corpus", *, split: str = "train",
               data_dir: Optional[str] = None):
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return record_from_example(self._source[i])
