"""Corpora as random-access sequences of records (plain dicts), from annotations or shards.

A record:
  key         unique id (the media path, or the row id)
  media       "video" | "image" | "audio" (audio-only rows: evaluation only)
  path        file to decode (absolute), or "" when `data` holds the encoded bytes
  data        encoded media bytes (ArrayRecord / TFDS records), else b""
  captions    list of str; `caption_fields` keeps other caption keys, e.g. {"avs_captions": [...]}
  audio       audio file path ("" = the media file's own audio track)
  audio_pcm   int16 16 kHz mono PCM bytes (packed records), else b""
  start_frame / end_frame   clip window in frames, both inclusive as in the official annotations
                            (`duration = end - start + 1`); -1 = from the start / to the end
  start_time / end_time     clip window in seconds (stage-1 CSV; -1 = whole video)
  source      corpus / dataset name (e.g. "ssv2": per-source options such as no flip)
  label       int class id (-1 if none)
  qa          instruction data (stage 3): [{"i": instruction, "q": question, "a": answer}, ...]

Formats: the official JSON annotation lists (also JSON Lines), the stage-1 CSV rows
`source path total_time start_time end_time target`, ArrayRecord shards written by
`internvideo2_jax.data.pack`, and the TFDS builder in `data/tfds_corpus.py` over the same records.
Malformed rows are skipped, counted and logged with the file and row number.
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import logging
import os
from typing import Any, Iterable, Optional, Sequence

import msgpack
import numpy as np

from internvideo2_jax.data import text as text_lib

log = logging.getLogger(__name__)

RECORD_DEFAULTS = dict(key="", media="video", path="", data=b"", captions=[], caption_fields={},
                       audio="", audio_pcm=b"", start_frame=-1, end_frame=-1, start_time=-1.0,
                       end_time=-1.0, source="", label=-1, qa=[])


def make_record(**fields) -> dict:
  unknown = sorted(set(fields) - set(RECORD_DEFAULTS) - {"frames", "frame_times"})
  if unknown:
    raise ValueError(f"unknown record fields {unknown}")
  rec = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
         for k, v in RECORD_DEFAULTS.items()}  # fresh containers: records never share lists
  rec.update(fields)
  return rec


def record_captions(rec: dict, field: str = "captions") -> list[str]:
  """The captions of `field`: "caption"/"captions" or another *caption* key of the row."""
  return rec["captions"] if field in ("caption", "captions") else rec["caption_fields"].get(field, [])


class AnnotationError(ValueError):
  """An annotation file cannot be read at all (unreadable, not JSON/CSV)."""


class RowSkip(ValueError):
  """A row dropped at parse time for a named reason (a skip reason of `loader.REASONS` or
  "bad_annotation" / "outside_root"), counted per reason and logged once by file and row."""
  reason = "bad_annotation"


class OutsideRoot(RowSkip):
  """An annotation path that resolves (symlinks included) outside its corpus's data_root."""
  reason = "outside_root"


class BadText(RowSkip):
  """No usable caption / answer in the field the consumer reads."""
  reason = "bad_caption"


def clip_window(rec: dict, num_frames: int, fps: float) -> tuple[int, int]:
  """The record's clip as frame indices [start, end) of a video with `num_frames` frames.

  `end_frame` is inclusive, as the official loader reads it (`av_utils.lazy_load_s3video`:
  `duration = end - start + 1`); seconds windows (`start_time`/`end_time`) use `int(t * fps)`."""
  start, end = 0, num_frames
  if rec["start_frame"] >= 0 or rec["end_frame"] >= 0:
    start = max(rec["start_frame"], 0)
    end = min(rec["end_frame"] + 1, num_frames) if rec["end_frame"] >= 0 else num_frames
  elif rec["start_time"] >= 0 and fps:
    start = int(rec["start_time"] * fps)
    end = min(int(rec["end_time"] * fps), num_frames) if rec["end_time"] >= 0 else num_frames
  return start, end


def _join(root: str, path: str, allow_outside: bool = False) -> str:
  """root/path; with a local data_root, a path that resolves outside it (`../x`, an absolute
  path, a symlink out) is refused unless the corpus sets allow_outside_root: an annotation
  file must not make the decoder open any file on the host."""
  full = path if not root or os.path.isabs(path) else os.path.join(root, path)
  if root and not allow_outside and "://" not in root and "://" not in path:
    base = os.path.realpath(root)
    real = os.path.realpath(full)
    if real != base and not real.startswith(base.rstrip(os.sep) + os.sep):
      raise OutsideRoot(f"{path!r} resolves to {real}, outside data_root {root} (set the corpus's "
                        "allow_outside_root: true to read it)")
  return full


def _captions(value: Any, key: str, strict: bool, max_chars: int) -> list[str]:
  """The usable captions of a row's `key`. Strict (the consumer reads this field): bad entries of
  a list are dropped and logged by the caller; none left raises BadText. Otherwise whatever
  strings are there, never an error (a stage that ignores captions keeps the row)."""
  items = list(value) if isinstance(value, (list, tuple)) else [value]
  if not strict:
    return [c for c in items if isinstance(c, str)]
  good, bad = [], []
  for c in items:
    why = text_lib.text_problem(c, what=f"{key!r}", max_chars=max_chars)
    (bad if why else good).append(why or c)
  if not good:
    raise BadText("; ".join(bad[:2]) if bad else f"{key!r} is an empty list")
  if bad:
    log.info("%d of the %r captions dropped: %s", len(bad), key, bad[0])
  return good


def _qa(value: Any, max_chars: int = text_lib.MAX_CAPTION_CHARS) -> list[dict]:
  """VideoChat2 instruction rows: a non-empty list of {"i"?, "q"?, "a"} string fields."""
  if not isinstance(value, list) or not value:
    raise BadText("'QA' must be a non-empty list of {\"q\", \"a\"} objects")
  out = []
  for n, turn in enumerate(value):
    if not isinstance(turn, dict):
      raise BadText(f"QA[{n}] is {type(turn).__name__}, not an object")
    why = text_lib.text_problem(turn.get("a"), what=f"QA[{n}] answer 'a'", max_chars=max_chars, clean=False)
    for k in ("i", "q"):
      why = why or (text_lib.text_problem(turn[k], what=f"QA[{n}] {k!r}", max_chars=max_chars, clean=False)
                    if turn.get(k) not in (None, "") else None)
    if why:
      raise BadText(why)
    out.append({"i": turn.get("i") or "", "q": turn.get("q") or "", "a": turn["a"]})
  return out


def record_from_row(row: Any, *, data_root: str = "", audio_root: str = "", source: str = "",
                    allow_outside_root: bool = False, uses: Optional[Sequence[str]] = None,
                    max_text_chars: int = text_lib.MAX_CAPTION_CHARS) -> dict:
  """One official JSON annotation row -> record. Raises ValueError naming what is wrong.

  `uses`: the text fields the consumer reads ("captions", another *caption* key, "qa"): those
  must be present and usable, the others are not checked (a stage-1 run keeps rows whose
  captions are broken). None: whatever text fields a row has are validated, none required.
  `max_text_chars`: longer captions / answers are refused (`data.load.max_caption_chars`)."""
  strict = lambda key: uses is None or key in uses  # noqa: E731
  if not isinstance(row, dict):
    raise ValueError(f"row is {type(row).__name__}, not an object")
  # Audio-only rows ({"audio": ..., "caption": ...}) serve audio evaluation; training stages
  # skip them (they have no frames).
  media = "video" if "video" in row else "image" if "image" in row else "audio" if "audio" in row else None
  if media is None:
    raise ValueError("row has neither 'video', 'image' nor 'audio'")
  path = row[media]
  if not isinstance(path, str) or not path:
    raise ValueError(f"'{media}' must be a non-empty string")
  captions: list[str] = []
  main = "captions" if "captions" in row else "caption" if "caption" in row else None
  if main:
    captions = _captions(row[main], main, strict("captions") or strict("caption"), max_text_chars)
  elif uses is not None and ("captions" in uses or "caption" in uses):
    raise BadText("row has no 'caption' / 'captions'")
  fields = {k: _captions(v, k, strict(k), max_text_chars) for k, v in row.items()
            if "caption" in k and k not in ("caption", "captions")}
  audio = row.get("audio", "")
  if not isinstance(audio, str):
    raise ValueError("'audio' must be a path string")
  def frame(k):
    v = row.get(k, -1)
    if v is None:
      return -1
    if not isinstance(v, int) or isinstance(v, bool):
      raise ValueError(f"'{k}' must be an integer frame index, got {v!r}")
    return v
  start, end = frame("video_start_frame"), frame("video_end_frame")
  if 0 <= end < start:
    raise ValueError(f"empty clip window video_start_frame={start} video_end_frame={end}")
  # VideoChat2 instruction rows give the clip in seconds as "start"/"end".
  start_t, end_t = -1.0, -1.0
  if "start" in row and "end" in row:
    if not all(isinstance(row[k], (int, float)) and not isinstance(row[k], bool) for k in ("start", "end")):
      raise ValueError(f"'start'/'end' must be seconds, got {row['start']!r}, {row['end']!r}")
    start_t, end_t = float(row["start"]), float(row["end"])
    if end_t <= start_t:
      raise ValueError(f"empty clip window start={start_t} end={end_t}")
  full = _join(data_root, path, allow_outside_root)
  return make_record(key=full, media=media, path=full, captions=captions, caption_fields=fields,
                     audio=_join(audio_root or data_root, audio, allow_outside_root) if audio else "",
                     start_frame=start, end_frame=end, start_time=start_t, end_time=end_t,
                     source=source or row.get("source", ""), qa=_row_qa(row, strict("qa"), uses is not None and "qa" in uses, max_text_chars),
                     label=int(row["label"]) if isinstance(row.get("label"), int) else -1)


def _row_qa(row: dict, strict: bool, required: bool, max_chars: int) -> list[dict]:
  if "QA" not in row:
    if required:
      raise BadText("row has no 'QA' list (stage 3 needs instruction rows)")
    return []
  try:
    return _qa(row["QA"], max_chars)
  except BadText:
    if strict:
      raise
    return []


def load_json(path: str, *, data_root: str = "", audio_root: str = "", source: str = "",
              skipped: Optional[collections.Counter] = None, allow_outside_root: bool = False,
              uses: Optional[Sequence[str]] = None, max_text_chars: int = text_lib.MAX_CAPTION_CHARS) -> list[dict]:
  """Official JSON annotations (a list of rows) or JSON Lines; bad rows skipped and counted
  (`uses`: see record_from_row)."""
  into, skipped = skipped, collections.Counter()  # this file's drops, added to `into`
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise AnnotationError(f"{path}: cannot read annotations: {e}") from e
  text = raw.decode("utf-8", errors="replace")  # non-UTF-8 bytes become U+FFFD, rows stay usable
  if "\ufffd" in text:
    log.warning("%s: contains non-UTF-8 bytes; they were replaced", path)
  rows: list[tuple[int, Any]] = []
  if path.endswith(".jsonl"):
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
          skipped["bad_annotation"] += 1
          log.warning("%s:%d: skipped, not JSON (%s)", path, n, e.msg)
  else:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise AnnotationError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
      raise AnnotationError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    rows = list(enumerate(data, 1))
  records = []
  for n, row in rows:
    try:
      records.append(record_from_row(row, data_root=data_root, audio_root=audio_root, source=source,
                                     allow_outside_root=allow_outside_root, uses=uses,
                                     max_text_chars=max_text_chars))
    except RowSkip as e:
      skipped[e.reason] += 1
      log.warning("%s: row %d skipped (%s): %s", path, n, e.reason, e)
    except (ValueError, TypeError) as e:
      skipped["bad_annotation"] += 1
      log.warning("%s: row %d skipped: %s", path, n, e)
  return _usable(path, records, skipped, into)


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read().splitlines()
  except OSError as e:
    raise AnnotationError(f"{path}: cannot read annotations: {e}") from e


def _usable(path: str, records: list, skipped: collections.Counter,
            into: Optional[collections.Counter]) -> list[dict]:
  """The parsed rows; the file's refusals added to `into`; no usable row is an error naming why."""
  if into is not None:
    into.update(skipped)
  if not records:
    why = ", ".join(f"{k} x{v}" for k, v in skipped.most_common())
    raise AnnotationError(f"{path}: no usable rows ({why or 'empty'})")
  return records


def load_csv(path: str, *, data_root: str = "", skipped: Optional[collections.Counter] = None,
             allow_outside_root: bool = False) -> list[dict]:
  """Stage-1 rows `source path total_time start_time end_time target` (space- or comma-separated)."""
  into, skipped = skipped, collections.Counter()  # this file's drops, added to `into`
  lines = _read_lines(path)
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    cols = next(csv.reader([line])) if "," in line else line.split()
    try:
      if len(cols) != 6:
        raise ValueError(f"{len(cols)} columns, expected 6 (source path total_time start_time end_time target)")
      source, rel, total, start, end, target = cols
      start_t, end_t = float(start), float(end)
      if end_t >= 0 and end_t <= start_t:
        raise ValueError(f"empty clip window {start_t}..{end_t}")
      full = _join(data_root, rel, allow_outside_root)
      records.append(make_record(key=f"{full}@{start_t}", path=full, source=source,
                                 start_time=start_t, end_time=end_t, label=int(float(target))))
      del total
    except RowSkip as e:
      skipped[e.reason] += 1
      log.warning("%s: line %d skipped (%s): %s", path, n, e.reason, e)
    except ValueError as e:
      skipped["bad_annotation"] += 1
      log.warning("%s: line %d skipped: %s", path, n, e)
  return _usable(path, records, skipped, into)


# ----------------------------------------------------------------------------- packed records


def load_classes(path: str) -> list[str]:
  """Class names in label order from a class-index file: one name per line (line i = class i),
  `index name` / `name index` / `name,index` lines (Kinetics-style), or a JSON list / {name: index}."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise AnnotationError(f"{path}: cannot read the class index: {e}") from e
  if text.lstrip().startswith(("[", "{")):
    obj = json.loads(text)
    pairs = [(int(i), str(n)) for n, i in obj.items()] if isinstance(obj, dict) else list(enumerate(map(str, obj)))
  else:
    pairs = []
    for n, line in enumerate(x.strip() for x in text.splitlines() if x.strip()):
      cols = [c.strip().strip('"') for c in (line.rsplit(",", 1) if "," in line else line.split(None, 1))]
      if len(cols) == 2 and cols[0].isdigit():
        pairs.append((int(cols[0]), cols[1]))
      elif len(cols) == 2 and cols[1].isdigit():
        pairs.append((int(cols[1]), cols[0]))
      else:
        pairs.append((n, line))
  pairs.sort()
  if [i for i, _ in pairs] != list(range(len(pairs))):
    raise AnnotationError(f"{path}: class indices must be 0..{len(pairs) - 1} without gaps or repeats")
  return [name for _, name in pairs]


def load_labels(path: str, *, data_root: str = "", classes: Sequence[str] = (),
                skipped: Optional[collections.Counter] = None, allow_outside_root: bool = False) -> list[dict]:
  """Classification lists as the official fine-tuning reads them: `path label` lines (space,
  tab or comma separated; a path may contain spaces when the label is last), the label a class
  index or, with `classes`, a class name."""
  into, skipped = skipped, collections.Counter()
  lines = _read_lines(path)
  index = {name: i for i, name in enumerate(classes)}
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    cols = next(csv.reader([line])) if "," in line and "\t" not in line else line.rsplit(None, 1)
    try:
      if len(cols) != 2:
        raise ValueError(f"{len(cols)} columns, expected 2 (path label)")
      rel, label = cols[0].strip(), cols[1].strip()
      if label.lstrip("-").isdigit():
        cid = int(label)
      elif label in index:
        cid = index[label]
      else:
        raise ValueError(f"label {label!r} is not a class index" + (" or a class name of the class index"
                                                                     if classes else " (set the corpus's 'classes' file for names)"))
      if cid < 0 or (classes and cid >= len(classes)):
        raise ValueError(f"class {cid} outside 0..{len(classes) - 1 if classes else 'N'}")
      full = _join(data_root, rel, allow_outside_root)
      records.append(make_record(key=f"{full}#{n}", path=full, label=cid))
    except RowSkip as e:
      skipped[e.reason] += 1
      log.warning("%s: line %d skipped (%s): %s", path, n, e.reason, e)
    except ValueError as e:
      skipped["bad_annotation"] += 1
      log.warning("%s: line %d skipped: %s", path, n, e)
  return _usable(path, records, skipped, into)


def encode_record(rec: dict) -> bytes:
  return msgpack.packb(rec, use_bin_type=True)


def decode_record(raw: bytes) -> dict:
  return make_record(**msgpack.unpackb(raw, raw=False))


def shard_paths(pattern: str) -> list[str]:
  """Paths of an ArrayRecord corpus: a glob, a directory, or `name-*-of-*` prefix."""
  paths = sorted(glob.glob(pattern))
  if not paths and os.path.isdir(pattern):
    paths = sorted(glob.glob(os.path.join(pattern, "*.array_record")))
  if not paths:
    paths = sorted(glob.glob(pattern + "-*-of-*"))
  if not paths:
    raise FileNotFoundError(f"no ArrayRecord shards match {pattern!r}")
  return paths


class ArrayRecordCorpus:
  """Random access over packed shards; items are records (dicts)."""

  def __init__(self, pattern: str):
    import grain
    self.paths = shard_paths(pattern)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return decode_record(self._source[i])

  def __repr__(self):
    return f"ArrayRecordCorpus({len(self.paths)} shards, {len(self)} records)"


class RecordList:
  """A list of records with the random-access interface of the other sources."""

  def __init__(self, records: Sequence[dict], name: str = ""):
    self.records, self.name = list(records), name

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]

  def __repr__(self):
    return f"RecordList({self.name!r}, {len(self)} records)"


def open_corpus(cfg, skipped: Optional[collections.Counter] = None, uses: Optional[Sequence[str]] = None,
                max_text_chars: int = text_lib.MAX_CAPTION_CHARS):
  """A corpus config -> random-access source of records (`skipped` counts the rows dropped at
  parse time per reason; `uses` names the text fields the consumer reads, see record_from_row).

  cfg.format: "json" (also .jsonl) | "csv" | "labels" (`path label` lines; cfg.classes: a class
  index) | "array_record" | "tfds"; cfg.path (annotation file,
  shard glob, or TFDS name), cfg.data_root, cfg.audio_root, cfg.source, cfg.split, cfg.data_dir,
  cfg.allow_outside_root (read annotation paths that resolve outside data_root; default refused).
  """
  cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  if not cfg.get("path"):
    raise ValueError(f"corpus config needs a 'path': {cfg}")
  cfg = _Attr(cfg)
  fmt = cfg.get("format", "json")
  if cfg.get("cache_frames"):  # decode once into RAM (small corpora, e.g. the CPU demo)
    inner = dict(cfg, cache_frames=0)
    return cache_frames(open_corpus(inner, skipped, uses, max_text_chars), int(cfg["cache_frames"]))
  if fmt == "json":
    return RecordList(load_json(cfg.path, data_root=cfg.get("data_root", ""),
                                audio_root=cfg.get("audio_root", ""), source=cfg.get("source", ""),
                                skipped=skipped, allow_outside_root=bool(cfg.get("allow_outside_root", False)),
                                uses=uses, max_text_chars=max_text_chars),
                      cfg.path)
  if fmt == "csv":
    return RecordList(load_csv(cfg.path, data_root=cfg.get("data_root", ""), skipped=skipped,
                               allow_outside_root=bool(cfg.get("allow_outside_root", False))), cfg.path)
  if fmt == "labels":
    classes = load_classes(cfg["classes"]) if cfg.get("classes") else ()
    return RecordList(load_labels(cfg.path, data_root=cfg.get("data_root", ""), classes=classes, skipped=skipped,
                                  allow_outside_root=bool(cfg.get("allow_outside_root", False))), cfg.path)
  if fmt == "array_record":
    return ArrayRecordCorpus(cfg.path)
  if fmt == "tfds":
    from internvideo2_jax.data import tfds_corpus
    return tfds_corpus.TfdsCorpus(cfg.path, split=cfg.get("split", "train"),
                                  data_dir=cfg.get("data_dir", None))
  raise ValueError(f"unknown corpus format {fmt!r}; use json, csv, labels, array_record or tfds")


class _Attr(dict):
  __getattr__ = dict.__getitem__


def cache_frames(records, size: int, *, max_frames: int = 64, progress: bool = True) -> "RecordList":
  """Decodes every record once into uint8 frames (size x size, squash) kept in memory, so
  training reads RAM instead of decoding (for small corpora such as the CPU demo's). Records
  that cannot be decoded are dropped and reported."""
  from internvideo2_jax.data.video import VideoFile, VideoReadError
  out, failed = [], []
  n = len(records)
  for i in range(n):
    rec = dict(records[i])
    try:
      if rec["media"] == "image":
        from internvideo2_jax.data.image import read_image
        from internvideo2_jax.data.transforms import resize
        rec["frames"] = resize(read_image(rec["data"] or rec["path"], name=rec["path"] or rec["key"])[None], size, size)
        rec["frame_times"] = np.zeros(1, np.float32)
      else:
        with VideoFile(rec["data"] or rec["path"], name=rec["path"] or rec["key"]) as v:
          start, end = clip_window(rec, v.num_frames(), v.fps)
          count = end - start
          idx = list(range(count)) if count <= max_frames else \
              [int(j) for j in np.linspace(0, count - 1, max_frames).round()]
          rec["frames"] = v.read([start + j for j in idx], size=(size, size))
          rec["frame_times"] = np.asarray(idx, np.float32) / (v.fps or 30.0)
      rec["data"] = b""
      out.append(rec)
    except (VideoReadError, ValueError) as e:
      failed.append(str(e))
    if progress and (i + 1) % 200 == 0:
      print(f"  decoded {i + 1}/{n} clips", flush=True)
  if failed:
    log.warning("cache_frames: %d records could not be decoded, e.g. %s", len(failed), failed[0])
  return RecordList(out, f"cached({n})")


def iter_records(sources: Iterable) -> Iterable[dict]:
  for src in sources:
    for i in range(len(src)):
      yield src[i]
