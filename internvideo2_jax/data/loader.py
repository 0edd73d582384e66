"""Record -> example: decode, sample, transform, tokenize, audio features, host masks.

Every example of a stage has the same keys and shapes (see `pipeline.BATCH_SPEC`). A record
that cannot become an example raises `SkipExample(reason, message)`; the pipeline replaces it
and counts the reason. Missing or broken audio does not skip the example: its features are
zeros and `has_audio` is False, so the audio losses can leave it out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import numpy as np

from internvideo2_jax.data import audio as audio_lib, instruct, masks, sources, text as text_lib, transforms
from internvideo2_jax.data.image import read_image
from internvideo2_jax.data.video import VideoFile, VideoReadError, frame_indices, segment_indices

# Skip reasons, in the order of the `skipped` counts vector of every batch.
REASONS = ("missing_file", "empty_file", "corrupt_video", "no_video_stream", "short_clip",
           "bad_caption", "bad_record", "error")


class SkipExample(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason if reason in REASONS else "error"


@dataclasses.dataclass(frozen=True)
class LoadSpec:
  """What one stage's examples contain (built from the data config by the pipeline)."""
  num_frames: int = 4
  sample: str = "rand"            # rand | middle | fpsX | segments (TSN, stage 1)
  size: int = 224
  crop: str = "rrc"               # rrc | multiscale | squash
  rrc_scale: tuple[float, float] = (0.5, 1.0)
  rand_augment: str = ""          # fine-tuning: timm config, e.g. rand-m7-n4-mstd0.5-inc1 (same ops per clip)
  flip: bool = True
  no_flip_sources: tuple[str, ...] = ("ssv2", "sthv2", "something-something")
  image_frames: int = 1           # frames of an image example (T = 1 as official)
  text: bool = True
  caption_field: str = "captions"  # or another *caption* key of the rows, e.g. avs_captions
  max_txt_l: int = 32
  max_caption_chars: int = text_lib.MAX_CAPTION_CHARS  # longer captions / answers are refused
  tokenizer: str = ""             # local directory; "" = the bundled bert-base-uncased vocab
  audio: bool = False
  audio_seconds: float = 10.0     # crop / pad length (official 10 s -> 998 fbank frames)
  mask: str = "none"              # none | random | tube
  mask_ratio: float = 0.8
  image_mask_ratio: float = 0.5
  patch_size: int = 14
  tubelet_size: int = 1
  min_frames: int = 1             # videos with fewer decodable frames are skipped
  sample_id: str = "media"        # media | caption: what makes two examples VTC positives
  instruct: Optional[instruct.InstructSpec] = None  # stage 3: conversation tokens for the LLM
  hd_grid: tuple[int, ...] = ()   # stage-3 HD: (columns, rows) sub-clips + a global clip per video
  train: bool = True

  def grid(self, frames: int) -> tuple[int, int, int]:
    g = self.size // self.patch_size
    return frames // self.tubelet_size, g, g


def _open(rec) -> VideoFile:
  src = rec["data"] or rec["path"]
  return VideoFile(src, name=rec["path"] or rec["key"])


def _indices(spec: LoadSpec, vlen: int, rng: np.random.Generator, fps: float = 30.0) -> list[int]:
  if spec.sample == "segments":
    return segment_indices(spec.num_frames, vlen, rng=rng, test=not spec.train)
  return frame_indices(spec.num_frames, vlen, spec.sample, rng=rng, input_fps=fps)


def _decode(rec: dict, spec: LoadSpec, rng: np.random.Generator, size) -> tuple[np.ndarray, np.ndarray]:
  """The sampled frames of a record, from its decoded cache or by seeking in the file, and the
  time of each in seconds from the clip's start (for the stage-3 time message)."""
  if rec.get("frames") is not None:  # decoded once (sources.cache_frames)
    cached = rec["frames"]
    if rec["media"] == "image":
      return np.repeat(cached[:1], spec.image_frames, axis=0), np.zeros(spec.image_frames, np.float32)
    idx = _indices(spec, len(cached), rng)
    clip = cached[idx]
    times = np.asarray(rec.get("frame_times", np.arange(len(cached)) / 30.0))[idx]
    return (clip if size is None else transforms.resize(clip, *size)), times
  if rec["media"] == "image":  # through the image decoder (PyAV's seeking path fails on JPEGs)
    img = read_image(rec["data"] or rec["path"], name=rec["path"] or rec["key"])[None]
    if size is not None:
      img = transforms.resize(img, *size)
    return np.repeat(img, spec.image_frames, axis=0), np.zeros(spec.image_frames, np.float32)
  with _open(rec) as v:
    start, end = sources.clip_window(rec, v.num_frames(), v.fps)
    vlen = end - start
    if vlen < spec.min_frames:
      raise SkipExample("short_clip", f"{v.name}: clip has {vlen} frames "
                                      f"(frames {start}..{end - 1}), need {spec.min_frames}")
    idx = _indices(spec, vlen, rng, v.fps or 30.0)
    return v.read([start + i for i in idx], size=size), np.asarray(idx, np.float32) / (v.fps or 30.0)


def _frames(rec: dict, spec: LoadSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  if spec.hd_grid:  # (columns * rows + 1, T, S, S, 3): the tiles, then the whole frame
    clip, times = _decode(rec, spec, rng, None)
    cols, rows = spec.hd_grid
    return transforms.hd_clips(clip, spec.size, cols * rows, grid=(cols, rows)), times
  squash = spec.crop == "squash" or not spec.train
  clip, times = _decode(rec, spec, rng, (spec.size, spec.size) if squash else None)
  if squash:
    return clip, times
  flip = spec.flip and rec["source"] not in spec.no_flip_sources
  if spec.rand_augment:  # before the crop, on whole frames, as the official fine-tuning
    clip = _rand_augment(spec.rand_augment)(clip, rng)
  kind = "multiscale" if spec.crop == "multiscale" else "rrc"
  return transforms.train_transform(clip, spec.size, rng, kind=kind, flip=flip, scale=spec.rrc_scale), times


@functools.lru_cache(maxsize=4)
def _rand_augment(config: str):
  from internvideo2_jax.data.randaugment import ClipRandAugment
  return ClipRandAugment(config)


def load_views(rec: dict, spec: LoadSpec, num_segments: int, num_crops: int) -> np.ndarray:
  """The official multi-view test input of one video: `num_segments` temporal views (sparse
  sampling at evenly spread offsets within each segment) x `num_crops` spatial crops (shorter
  side to `spec.size`, crops along the longer side) -> uint8 (views, T, S, S, 3), temporal major.
  Raises SkipExample like load_example."""
  try:
    with contextlib.ExitStack() as stack:
      if rec.get("frames") is not None:  # decoded once (sources.cache_frames)
        frames = rec["frames"]
        vlen, read = len(frames), (lambda idx: frames[idx])
      else:
        v = stack.enter_context(_open(rec))
        start, end = sources.clip_window(rec, v.num_frames(), v.fps)
        vlen = end - start
        if vlen < spec.min_frames:
          raise SkipExample("short_clip", f"{v.name}: clip has {vlen} frames, need {spec.min_frames}")
        read = lambda idx: v.read([start + i for i in idx])  # noqa: E731
      views = [transforms.spatial_views(np.asarray(read(segment_indices(
          spec.num_frames, vlen, test=True, view=k, num_views=num_segments))), spec.size, num_crops)
               for k in range(num_segments)]
  except VideoReadError as e:
    raise SkipExample(e.reason, str(e)) from e
  return np.concatenate(views)


def _caption(rec: dict, spec: LoadSpec, rng: np.random.Generator) -> str:
  caps = sources.record_captions(rec, spec.caption_field)
  if not caps:
    raise SkipExample("bad_caption", f"{rec['key']}: no {spec.caption_field!r} caption")
  # rows parsed from annotations were checked there; packed records are checked here
  caps = [c for c in caps if not text_lib.text_problem(c, max_chars=spec.max_caption_chars)]
  if not caps:
    why = text_lib.text_problem(sources.record_captions(rec, spec.caption_field)[0], max_chars=spec.max_caption_chars)
    raise SkipExample("bad_caption", f"{rec['key']}: {why}")
  return text_lib.pre_text(text_lib.choose_caption(caps, rng if spec.train else None))


def _waveform(rec: dict) -> Optional[np.ndarray]:
  """16 kHz mono waveform from packed PCM, a separate file, or the media's own track."""
  if rec["audio_pcm"]:
    return np.frombuffer(rec["audio_pcm"], np.int16).astype(np.float32) / 32768.0
  src = rec["audio"] or rec["data"] or rec["path"]
  return audio_lib.load_waveform(src, name=rec["audio"] or rec["path"] or rec["key"])


def load_example(rec: dict, spec: LoadSpec, rng: np.random.Generator) -> dict:
  """The example of one record; raises SkipExample when the record is unusable."""
  if rec["media"] == "audio":
    raise SkipExample("no_video_stream", f"{rec['key']}: audio-only row (evaluation only)")
  try:
    video, times = _frames(rec, spec, rng)
  except VideoReadError as e:
    raise SkipExample(e.reason, str(e)) from e
  is_image = rec["media"] == "image"
  out = {"video": video, "label": np.int32(rec["label"])}
  if spec.text:
    caption = _caption(rec, spec, rng)
    ids, mask = text_lib.tokenize(text_lib.load_tokenizer(spec.tokenizer), [caption], spec.max_txt_l)
    out["text_ids"], out["text_mask"] = ids[0], mask[0]
  if spec.audio:
    wave = None
    if not is_image:
      try:
        wave = _waveform(rec)
      except audio_lib.AudioReadError:
        wave = None  # silent videos are common; has_audio says so
    if wave is not None:
      wave = audio_lib.crop_or_pad(wave, spec.audio_seconds, rng=rng if spec.train else None)
    out["audio"], has = audio_lib.fbank_features(wave, target_frames=audio_lib.fbank_frames(spec.audio_seconds))
    out["has_audio"] = np.bool_(has)
  if spec.instruct is not None:
    try:
      out.update(instruct.instruct_example(rec, spec.instruct, times, rng, spec.train))
    except instruct.BadConversation as e:
      raise SkipExample("bad_caption", f"{rec['key']}: {e}") from e
  if spec.mask != "none":
    frames = spec.image_frames if is_image else spec.num_frames
    ratio = spec.image_mask_ratio if is_image else spec.mask_ratio
    out["mask"] = masks.make_mask(spec.mask, spec.grid(frames), ratio, rng)
  return out




__all__ = ["REASONS", "SkipExample", "LoadSpec", "load_example"]
