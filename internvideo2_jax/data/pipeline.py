"""Grain pipelines: one factory per stage, driven by the data config.

    corpus records --shuffle(seed, per epoch)--> repeat --> RobustLoad --[process block]-->
        batch --> mixture over corpora (weights, per batch) --[start_batch:]--> workers + prefetch

* Deterministic for a seed: the shuffle is global and every example draws its randomness from
  (seed, global index, attempt).
* Independent of the process count: global batch s holds the global examples
  [s*B, (s+1)*B) in order, and process p of n contributes the contiguous block
  [p*B/n, (p+1)*B/n) of it, which is exactly the rows its devices hold in the global array.
  So 2 hosts x 4 devices and 1 host x 8 devices train on identical global batches.
* Resumable by position: everything up to the mixture is random access, so a run that stopped
  after s steps continues with `start_batch=s` on any number of processes and workers; no
  iterator state has to be saved.
* Bad records never stop a run: `RobustLoad` replaces an unusable example with another
  (deterministically), counts the reason in the batch's `skipped` vector and logs each path once.
* Corpora of different media (video / image) keep fixed batch shapes by mixing whole batches
  (as the official MetaLoader alternates loaders): each batch comes from one corpus, in a fixed
  weighted round robin (`BatchMixture`).

BATCH_SPEC below is the one place that lists batch keys and shapes.
"""

from __future__ import annotations

import collections
import logging
import sys
import zlib
from typing import Optional

import grain
import jax
import numpy as np

from internvideo2_jax.data import sources
from internvideo2_jax.data.accounting import DataReport
from internvideo2_jax.data.instruct import InstructSpec
from internvideo2_jax.data.loader import REASONS, LoadSpec, SkipExample, load_example

log = logging.getLogger(__name__)

# key -> (shape, dtype, stages, meaning). B = batch, T = frames (1 for image corpora),
# S = image size, L = max_txt_l, N = tokens (T/tubelet * (S/patch)^2); stage 3: M = instruct
# max_txt_l + visual_tokens, I = instruct.instruction_l (see data/instruct.py).
BATCH_SPEC = {
    "video": ("(B, T, S, S, 3)", "uint8", "1 2 3 eval", "RGB frames, normalised on device; stage-3 HD: "
              "(B, cols * rows + 1, T, S, S, 3)"),
    "label": ("(B,)", "int32", "1 2 3 eval", "class id or -1"),
    "text_ids": ("(B, L)", "int32", "2 eval", "BERT token ids of the chosen caption"),
    "text_mask": ("(B, L)", "int32", "2 eval", "1 = real token"),
    "audio": ("(B, F, 64)", "float32", "2 (audio on)", "normalised Kaldi fbank, zeros if none; F = 998 for 10 s"),
    "has_audio": ("(B,)", "bool", "2 (audio on)", "False = no/undecodable audio"),
    "mask": ("(B, N)", "bool", "2 (mask on)", "True = token dropped (random / tube)"),
    "llm_ids": ("(B, M)", "int32", "3", "[BOS] prompt <Video> [visual slots] </Video> ... [pad]"),
    "llm_mask": ("(B, M)", "int32", "3", "1 = real token or visual slot"),
    "llm_visual": ("(B, M)", "bool", "3", "True = slot for the next visual token"),
    "llm_labels": ("(B, M)", "int32", "3", "answer token ids, -100 elsewhere (unshifted)"),
    "instruction_ids": ("(B, I)", "int32", "3 (qformer_text)", "BERT ids of the instruction, left-padded"),
    "instruction_mask": ("(B, I)", "int32", "3 (qformer_text)", "1 = real token"),
    "skipped": ("(B, R)", "int32", "all", f"replaced bad records per reason {REASONS}"),
    "index": ("(B,)", "int64", "all", "global example index (for resume checks)"),
    "sample_id": ("(B,)", "int32", "all", "VTC positives share it (media or caption hash)"),
}

_logged_keys: set = set()


def _sample_id(rec: dict, spec: LoadSpec) -> np.int32:
  """VTC positives: the same media (official `idx`), or with sample_id="caption" the same first
  caption (useful when many clips share a caption, as in the synthetic corpus)."""
  key = rec["key"] if spec.sample_id == "media" else (rec["captions"] or [rec["key"]])[0]
  return np.int32(zlib.crc32(key.encode("utf-8", "replace")) & 0x7FFFFFFF)


class RobustLoad(grain.MapDataset):
  """Maps records to examples; an unusable record is replaced by the next candidate."""

  def __init__(self, parent: grain.MapDataset, spec: LoadSpec, seed: int, max_tries: int = 16):
    super().__init__(parent)
    self._spec, self._seed, self._max_tries = spec, seed, max_tries

  def __len__(self):
    return len(self._parent)

  def __str__(self):
    return f"RobustLoad(tries={self._max_tries})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    skipped = np.zeros(len(REASONS), np.int32)
    n = len(self._parent)
    last = None
    examples: dict[str, list[str]] = {}
    for attempt in range(self._max_tries):
      # Replacement candidates stride through the corpus so a bad region is left quickly.
      j = index if attempt == 0 else (index + attempt * 7919) % n
      rng = np.random.default_rng([self._seed, index, attempt])
      rec = None
      try:
        rec = self._parent[j]
        if not isinstance(rec, dict):
          raise SkipExample("bad_record", f"record {j} is {type(rec).__name__}")
        example = load_example(rec, self._spec, rng)
      except SkipExample as e:
        last = e
      except Exception as e:  # noqa: BLE001 - data must never stop the run; count and move on
        # named by the record's key (its file), so it is logged once, not once per position
        name = rec.get("key") or rec.get("path") if isinstance(rec, dict) else None
        last = SkipExample("error", f"{name or f'record {j}'}: {type(e).__name__}: {e}")
      else:
        example["skipped"] = skipped
        example["index"] = np.int64(index)
        example["sample_id"] = _sample_id(rec, self._spec)
        return example
      skipped[REASONS.index(last.reason)] += 1
      examples.setdefault(last.reason, [])
      if len(examples[last.reason]) < 2:
        examples[last.reason].append(str(last))
      key = str(last).split(":")[0]
      if key not in _logged_keys:
        _logged_keys.add(key)
        log.warning("skipping example (%s): %s", last.reason, last)
    why = "; ".join(f"{REASONS[r]} x{int(c)} (e.g. {' | '.join(examples[REASONS[r]])})"
                    for r, c in sorted(enumerate(skipped), key=lambda x: -x[1]) if c)
    raise RuntimeError(f"{self._max_tries} candidates in a row were unusable around example {index}: "
                       f"{why}. Paths not found point at data_root; decode errors at the files "
                       f"themselves.")


def _fields(cls, d: dict, where: str) -> dict:
  unknown = sorted(set(d) - set(cls.__dataclass_fields__))
  if unknown:
    raise ValueError(f"unknown {where} keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
  return d


def _spec_from_config(data_cfg, model_cfg, stage: str, train: bool) -> LoadSpec:
  d = _fields(LoadSpec, dict(data_cfg.get("load", {})), "data.load")
  if "instruct" in d:
    raise ValueError("the stage-3 conversation settings go in data.instruct, not data.load.instruct")
  d.setdefault("size", model_cfg.img_size)
  d.setdefault("patch_size", model_cfg.patch_size)
  d.setdefault("tubelet_size", model_cfg.tubelet_size)
  d.setdefault("num_frames", model_cfg.num_frames)
  if stage == "stage1":
    d.setdefault("sample", "segments")
    d.setdefault("crop", "multiscale")
    d.setdefault("text", False)
  if stage == "finetune":  # the official single-modality fine-tuning (Kinetics_sparse)
    d.setdefault("sample", "segments")
    d.setdefault("crop", "rrc")
    d.setdefault("rrc_scale", (0.08, 1.0))
    d.setdefault("text", False)
  if stage == "stage3":
    d.setdefault("text", False)  # the conversation replaces the caption
    inst = dict(data_cfg.get("instruct", {}))
    d["instruct"] = InstructSpec(**_fields(InstructSpec, inst, "data.instruct")).validate()
  if not train:
    d.update(sample="middle" if d.get("sample", "rand") != "segments" else "segments",
             crop="squash", flip=False, mask="none", train=False, rand_augment="")
  for k in ("rrc_scale", "no_flip_sources", "hd_grid"):
    if k in d:
      d[k] = tuple(d[k])
  return LoadSpec(**d)


class ProcessBlocks(grain.MapDataset):
  """Process `index` of `count`: its contiguous block of every global batch of `global_batch`."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._b, self._B, self._p = global_batch // count, global_batch, index

  def __len__(self):
    return (len(self._parent) // self._B) * self._b

  def __str__(self):
    return f"ProcessBlocks({self._p}, {self._b}/{self._B})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[(index // self._b) * self._B + self._p * self._b + index % self._b]


class BatchMixture(grain.MapDataset):
  """Batch s comes from corpus c_s, chosen by smooth weighted round robin (the corpus furthest
  behind its share so far), so every prefix of the stream follows the weights as closely as
  possible (3:1 gives 6 of every 8); it is that corpus's k-th batch, k = how often c_s was chosen
  before s. Random access, so a run resumes by position."""

  _BLOCK = 4096

  def __init__(self, parents: list, weights: list[float]):
    super().__init__(parents)
    w = np.asarray(weights, np.float64)
    if (w <= 0).any():
      raise ValueError(f"corpus weights must be positive, got {weights}")
    self._w = w / w.sum()
    self._counts = np.zeros(len(w), np.int64)
    self._choice: list[int] = []
    self._rank: list[int] = []

  def __len__(self):
    return sys.maxsize  # training streams repeat forever

  def __str__(self):
    return f"BatchMixture({len(self._parents)} corpora)"

  def _extend(self, n: int) -> None:
    while len(self._choice) < n:
      for _ in range(self._BLOCK):
        s = len(self._choice)
        c = int(np.argmax(self._w * (s + 1) - self._counts))
        self._choice.append(c)
        self._rank.append(int(self._counts[c]))
        self._counts[c] += 1

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    self._extend(index + 1)
    return self._parents[self._choice[index]][self._rank[index]]


def corpus_dataset(records, spec: LoadSpec, *, seed: int, num_epochs: Optional[int],
                   global_batch: int, shard_index: int, shard_count: int) -> grain.MapDataset:
  """Records -> shuffled, repeated, loaded examples of this process (random access)."""
  ds = grain.MapDataset.source(records).shuffle(seed=seed)
  # Loading before the per-process split keys each example's randomness (and the `index` it
  # reports) by its global position, so an example is the same whatever the process count.
  ds = RobustLoad(ds.repeat(num_epochs), spec, seed)
  return ProcessBlocks(ds, global_batch, shard_index, shard_count) if shard_count > 1 else ds


def make_pipeline(data_cfg, model_cfg, *, stage: str = "stage2", train: bool = True,
                  batch_size: Optional[int] = None, seed: Optional[int] = None,
                  num_epochs: Optional[int] = None, shard_index: Optional[int] = None,
                  shard_count: Optional[int] = None, report: Optional[DataReport] = None,
                  start_batch: int = 0) -> grain.IterDataset:
  """The dataset of one stage: an IterDataset of host batches (dicts of numpy arrays).

  data_cfg.corpora: list of {format, path, data_root, weight, ...} (see sources.open_corpus);
  data_cfg.batch_size is the *global* batch; each process gets batch_size / process_count.
  `start_batch` skips that many global batches without loading them (resume after that many
  training steps, on any process count). `report` receives each corpus's usable and refused
  annotation rows.
  """
  if stage not in ("stage1", "stage2", "stage3", "finetune"):
    raise ValueError(f"unknown data stage {stage!r}: stage1 (distillation clips), stage2 "
                     "(video/image-text-audio), stage3 (instruction conversations) or finetune "
                     "(labelled clips)")
  seed = int(data_cfg.get("seed", 0) if seed is None else seed)
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  global_batch = int(batch_size or data_cfg.batch_size)
  if global_batch % shard_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by {shard_count} processes")
  host_batch = global_batch // shard_count
  if not data_cfg.get("corpora"):
    raise ValueError("data.corpora is empty: list at least one corpus")
  epochs = num_epochs if train else (num_epochs or 1)
  parts, weights = [], []
  for i, corpus in enumerate(data_cfg.corpora):
    corpus = corpus.to_dict() if hasattr(corpus, "to_dict") else dict(corpus)
    if corpus.get("format") == "targets":  # cached stage-1 examples: already decoded
      from internvideo2_jax.data.targets import TargetsCorpus
      ds = grain.MapDataset.source(TargetsCorpus(corpus["path"])).shuffle(seed=seed + 1000 * i)
      ds = ds.repeat(epochs)
      if shard_count > 1:
        ds = ProcessBlocks(ds, global_batch, shard_index, shard_count)
    else:
      spec = _spec_from_config(data_cfg, model_cfg, stage, train)
      # only the text a stage reads is validated (stage 1 keeps rows with broken captions)
      uses = ("qa",) if spec.instruct is not None else (spec.caption_field,) if spec.text else ()
      refused = collections.Counter()
      records = sources.open_corpus(corpus, skipped=refused, uses=uses, max_text_chars=spec.max_caption_chars)
      if report is not None:
        report.add_corpus(corpus["path"], len(records), refused)
      if isinstance(records, sources.RecordList):
        # (audio-only rows are evaluation rows: a training stage replaces them, counted)
        kinds = collections.Counter(r["media"] for r in records.records if r["media"] != "audio")
        if len(kinds) > 1:  # one corpus = one media type, so every batch has one frame count
          raise ValueError(f"{corpus['path']}: mixes media types {dict(kinds)}; split it into one "
                           "corpus per media type (they are mixed batch by batch)")
      ds = corpus_dataset(records, spec, seed=seed + 1000 * i, num_epochs=epochs,
                          global_batch=global_batch, shard_index=shard_index, shard_count=shard_count)
    parts.append(ds.batch(host_batch, drop_remainder=train))
    weights.append(float(corpus.get("weight", 1.0)))
  read = grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 1)),
                           prefetch_buffer_size=int(data_cfg.get("read_prefetch", 2)))
  if len(parts) == 1:
    ds = parts[0][start_batch:].to_iter_dataset(read)
  elif epochs is None:  # endless training streams
    ds = BatchMixture(parts, weights)[start_batch:].to_iter_dataset(read)
  else:  # finite streams (evaluation, a fixed number of epochs): grain's mixture, no resume
    if start_batch:
      raise ValueError("start_batch needs an endless stream (num_epochs=None) when corpora are mixed")
    ds = grain.IterDataset.mix([p.to_iter_dataset(read) for p in parts], weights)
  workers = int(data_cfg.get("num_workers", 0))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=int(data_cfg.get("worker_buffer", 2))))
  return ds


def skip_summary(batch: dict) -> dict[str, int]:
  """{reason: count} of records replaced while building this batch (for metrics)."""
  if "skipped" not in batch:  # cached examples were checked when they were written
    return {}
  counts = np.asarray(batch["skipped"]).sum(axis=0)
  return {r: int(c) for r, c in zip(REASONS, counts) if c}


__all__ = ["BATCH_SPEC", "RobustLoad", "ProcessBlocks", "BatchMixture", "make_pipeline", "skip_summary",
           "corpus_dataset"]
