"""Zero-shot video-text retrieval with the official protocol (reference §5.1).

1. ITC: cosine similarity of the projected, L2-normalised features (temperature 1).
2. ITM re-ranking: for each video the top-k texts by ITC (and for each text the top-k videos)
   are scored by the raw positive ITM logit of the fusion layers; everything else gets -100.
   This `match` matrix is the headline result; ITC and ITM scores are not combined.
3. Dual softmax (`dsl`): s * softmax(s, over the other axis).
Recall@1/5/10 in both directions use the best rank among a query's ground truths (several
captions per video). All numbers are percentages.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from internvideo2_jax.data import sources, text as text_lib
from internvideo2_jax.data.loader import LoadSpec, SkipExample, load_example
from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.stage2 import Stage2Model
from internvideo2_jax.ops.losses import l2_normalize
from internvideo2_jax.parallel import distributed, sharding
from internvideo2_jax.parallel.mesh import batch_sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RetrievalSet:
  videos: np.ndarray        # uint8 (Nv, T, S, S, 3)
  texts: list[str]          # cleaned captions
  txt2vid: np.ndarray       # (Nt,) video of each text
  keys: list[str]           # video keys
  skipped: list[str]
  audio: Optional[np.ndarray] = None      # (Nv, 998, 64) fbank when the spec asks for audio
  has_audio: Optional[np.ndarray] = None  # (Nv,) bool
  data: Optional[dict] = None             # counts: items, refused rows / skipped items per reason

  @property
  def vid2txt(self) -> list[list[int]]:
    out = [[] for _ in range(len(self.videos))]
    for t, v in enumerate(self.txt2vid):
      out[v].append(t)
    return out


def _collect(corpus: dict, caption_field: str, load, what: str, limit: Optional[int]):
  """(items, texts, text -> item, keys, skipped, data counts) of a corpus: `load(rec, i)` gives
  the item or raises SkipExample / AudioReadError; rows whose `caption_field` is missing or
  unusable are refused when the annotations are parsed."""
  from internvideo2_jax.data.audio import AudioReadError
  refused, reasons = collections.Counter(), collections.Counter()
  records = sources.open_corpus(corpus, skipped=refused, uses=(caption_field,))
  items, texts, t2i, keys, skipped = [], [], [], [], []
  n = len(records) if limit is None else min(limit, len(records))
  for i in range(n):
    rec = records[i]
    caps = sources.record_captions(rec, caption_field)
    try:
      item = load(rec, i)
    except (SkipExample, AudioReadError) as e:
      skipped.append(str(e))
      reasons[getattr(e, "reason", "no_audio")] += 1
      log.warning("%s set: skipping %s", what, e)
      continue
    if not caps:  # packed records (annotation rows were checked at parse time)
      skipped.append(f"{rec['key']}: no {caption_field}")
      reasons["bad_caption"] += 1
      continue
    for c in caps:
      texts.append(text_lib.pre_text(c))
      t2i.append(len(items))
    items.append(item)
    keys.append(rec["key"])
  data = {"items": len(items), "refused_at_parse": dict(refused), "skipped": dict(reasons)}
  if not items:
    raise ValueError(f"{what} set {corpus.get('path')}: no usable {what} "
                     f"(refused rows {dict(refused) or 0}, skipped {dict(reasons) or 0})")
  return items, texts, np.asarray(t2i), keys, skipped, data


def load_retrieval_set(corpus: dict, spec: LoadSpec, caption_field: str = "captions",
                       limit: Optional[int] = None) -> RetrievalSet:
  """Decodes every video of an annotation corpus with the test transform; all captions kept."""
  spec = dataclasses.replace(spec, train=False, mask="none", text=False, crop="squash",
                             sample="middle" if spec.sample != "segments" else "segments")
  items, texts, t2v, keys, skipped, data = _collect(
      corpus, caption_field, lambda rec, i: load_example(rec, spec, np.random.default_rng(i)), "video", limit)
  audio = np.stack([x["audio"] for x in items]) if spec.audio else None
  has_audio = np.asarray([bool(x["has_audio"]) for x in items]) if spec.audio else None
  return RetrievalSet(np.stack([x["video"] for x in items]), texts, t2v, keys, skipped, audio, has_audio, data)


def recall_metrics(v2t: np.ndarray, t2v: np.ndarray, txt2vid: np.ndarray) -> dict[str, float]:
  """R@1/5/10 (%) for v2t (Nv, Nt) and t2v (Nt, Nv) score matrices, plus their mean."""
  nv = v2t.shape[0]
  vid2txt = [np.flatnonzero(txt2vid == v) for v in range(nv)]
  order = np.argsort(-v2t, axis=1, kind="stable")
  v_rank = np.array([np.min(np.flatnonzero(np.isin(order[i], vid2txt[i]))) for i in range(nv)])
  order = np.argsort(-t2v, axis=1, kind="stable")
  t_rank = np.array([np.flatnonzero(order[j] == txt2vid[j])[0] for j in range(len(txt2vid))])
  out = {}
  for k in (1, 5, 10):
    out[f"v2t_r{k}"] = 100.0 * float(np.mean(v_rank < k))
    out[f"t2v_r{k}"] = 100.0 * float(np.mean(t_rank < k))
  out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("v2t", "t2v") for k in (1, 5, 10)]))
  return out


def dual_softmax(scores: np.ndarray) -> np.ndarray:
  e = np.exp(scores - scores.max(axis=0, keepdims=True))
  return scores * (e / e.sum(axis=0, keepdims=True))


class Encoder:
  """Jitted, mesh-sharded encoding of videos and texts and ITM scoring for a Stage2Model."""

  def __init__(self, model: Stage2Model, params, mesh, *, batch_size: int, norm: str = "imagenet"):
    self.model, self.params, self.mesh, self.batch = model, {"params": params}, mesh, batch_size
    vdtype = jnp.dtype(model.config.vision.dtype)
    self._video = jax.jit(lambda p, v: model.apply(p, normalize(v, norm, vdtype), method=Stage2Model.encode_vision))
    self._text = jax.jit(lambda p, i, m: model.apply(p, i, m, method=Stage2Model.encode_text))
    self._itm = jax.jit(lambda p, h, m, mem: model.apply(p, h, m, mem, method=Stage2Model.itm_logits)[:, 1])

  _compiled: dict = None

  def _batches(self, n):
    for s in range(0, n, self.batch):
      yield s, min(s + self.batch, n)

  def _run(self, fn, arrays):
    if self._compiled is None:
      self._compiled = {}
    n = len(arrays[0])
    outs = []
    for s, e in self._batches(n):
      chunk = [a[s:e] for a in arrays]
      pad = self.batch - (e - s)
      if pad:
        chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) for c in chunk]
      # Every process holds the whole evaluation set; each transfers only its devices' rows,
      # and the results are gathered back (process_allgather) so all processes score alike.
      placed = [sharding.global_from_host(c, batch_sharding(self.mesh, c.ndim)) for c in chunk]
      key = (id(fn), tuple(c.shape for c in chunk))
      if key not in self._compiled:  # compiled on every host before any runs it (multi-host)
        self._compiled[key] = distributed.compiled(fn, self.params, *placed)
      res = self._compiled[key](self.params, *placed)
      res = res if isinstance(res, tuple) else (res,)
      outs.append([sharding.to_host(r)[: e - s] for r in res])
    return [np.concatenate(parts) for parts in zip(*outs)]

  def videos(self, videos):
    memory, feats = self._run(self._video, [videos])
    return memory, np.asarray(l2_normalize(feats))

  def texts(self, ids, mask):
    hidden, feats = self._run(self._text, [ids, mask])
    return hidden, np.asarray(l2_normalize(feats))

  def itm(self, text_hidden, text_mask, memory):
    return self._run(self._itm, [text_hidden, text_mask, memory])[0]


def rerank(itc: np.ndarray, k_test: int, score_fn) -> tuple[np.ndarray, np.ndarray]:
  """Official re-ranking: the top-k texts of each video and top-k videos of each text (by ITC)
  get `score_fn(video_idx, text_idx)` (one call over all pairs), everything else -100."""
  nv, nt = itc.shape
  kv, kt = min(k_test, nt), min(k_test, nv)
  top_t = np.argsort(-itc, axis=1)[:, :kv]         # per video, its top texts
  top_v = np.argsort(-itc.T, axis=1)[:, :kt]       # per text, its top videos
  pairs = {(v, t) for v in range(nv) for t in top_t[v]} | {(v, t) for t in range(nt) for v in top_v[t]}
  pairs = np.asarray(sorted(pairs), np.int64)
  score = dict(zip(map(tuple, pairs.tolist()), np.asarray(score_fn(pairs[:, 0], pairs[:, 1])).tolist()))
  v2t = np.full((nv, nt), -100.0)
  t2v = np.full((nt, nv), -100.0)
  for v in range(nv):
    for t in top_t[v]:
      v2t[v, t] = score[(v, int(t))]
  for t in range(nt):
    for v in top_v[t]:
      t2v[t, v] = score[(int(v), t)]
  return v2t, t2v


def evaluate_retrieval(encoder: Encoder, rset: RetrievalSet, *, tokenizer, max_txt_l: int,
                       k_test: int = 128) -> dict:
  """All retrieval numbers: {'itc': {...}, 'dsl': {...}, 'match': {...}}."""
  ids, mask = text_lib.tokenize(tokenizer, rset.texts, max_txt_l)
  memory, vfeat = encoder.videos(rset.videos)
  hidden, tfeat = encoder.texts(ids, mask)
  itc = vfeat @ tfeat.T  # (Nv, Nt), temperature 1
  results = {"itc": recall_metrics(itc, itc.T, rset.txt2vid)}
  results["dsl"] = recall_metrics(dual_softmax(itc), dual_softmax(itc.T), rset.txt2vid)
  v2t, t2v = rerank(itc, k_test, lambda v, t: encoder.itm(hidden[t], mask[t], memory[v]))
  results["match"] = recall_metrics(v2t, t2v, rset.txt2vid)
  nv, nt = itc.shape
  results["num_videos"], results["num_texts"], results["k_test"] = nv, nt, min(k_test, max(nv, nt))
  return results


class AVEncoder(Encoder):
  """Jitted, mesh-sharded encoding and matching heads of a Stage2AVModel."""

  def __init__(self, model, params, mesh, *, batch_size: int, norm: str = "imagenet"):
    from internvideo2_jax.models.stage2_av import Stage2AVModel as M
    self.model, self.params, self.mesh, self.batch = model, {"params": params}, mesh, batch_size
    vdtype = jnp.dtype(model.config.vision.dtype)
    self._video = jax.jit(lambda p, v: model.apply(p, normalize(v, norm, vdtype), method=M.encode_vision))
    self._audio = jax.jit(lambda p, a: model.apply(p, a, method=M.encode_audio))
    self._text = jax.jit(lambda p, i, m: model.apply(p, i, m, method=M.encode_text))
    self._fuse = jax.jit(lambda p, a, v: model.apply(p, a, v, method=M.av_feature))
    self._heads = {h: jax.jit(lambda p, hid, m, mem, h=h: model.apply(p, h, hid, m, mem, method=M.match_logits)[:, 1])
                   for h in ("itm_head", "atm_head", "avtm_head")}

  def audios(self, fbank):
    """-> (audio memory, raw audio feature)."""
    return self._run(self._audio, [fbank])

  def videos_raw(self, videos):
    return self._run(self._video, [videos])

  def fused(self, audio_feat, video_feat):
    return self._run(self._fuse, [audio_feat, video_feat])[0]

  def match(self, head: str, text_hidden, text_mask, memory):
    return self._run(self._heads[head], [text_hidden, text_mask, memory])[0]


def _text_to(encoder: AVEncoder, feats, head: str, memory, t, hidden, mask, gt, k_test) -> tuple[dict, dict]:
  """(ITC, re-ranked) recalls of texts `t` (normalised) against media features `feats`."""
  itc = np.asarray(l2_normalize(jnp.asarray(feats))) @ t.T
  v2t, t2v = rerank(itc, k_test, lambda v, j: encoder.match(head, hidden[j], mask[j], memory(v)))
  return recall_metrics(itc, itc.T, gt), recall_metrics(v2t, t2v, gt)


def evaluate_av_retrieval(encoder: AVEncoder, rset: RetrievalSet, *, tokenizer, max_txt_l: int,
                          k_test: int = 128) -> dict:
  """Audio-visual model: text against the video feature, the audio feature (clips with audio
  only) and the fused audio-video feature; ITC (temperature 1) as `text_to_<m>` and the official
  re-ranking of the top k by the matching head of that memory (itm on video, atm on audio,
  avtm on [audio; video]) as `text_to_<m>_match`."""
  ids, mask = text_lib.tokenize(tokenizer, rset.texts, max_txt_l)
  mem_v, fv = encoder.videos_raw(rset.videos)
  mem_a, fa = encoder.audios(rset.audio)
  hidden, t = encoder.texts(ids, mask)
  fav = encoder.fused(fa, fv)
  out = {}
  for name, feats, head, memory in (
      ("text_to_video", fv, "itm_head", lambda v: mem_v[v]),
      ("text_to_av", fav, "avtm_head", lambda v: np.concatenate([mem_a[v], mem_v[v]], axis=1))):
    out[name], out[f"{name}_match"] = _text_to(encoder, feats, head, memory, t, hidden, mask,
                                               rset.txt2vid, k_test)
  keep = np.flatnonzero(rset.has_audio)       # text to audio: clips with an audio track only
  tkeep = np.flatnonzero(np.isin(rset.txt2vid, keep))
  if len(keep):
    gt = np.searchsorted(keep, rset.txt2vid[tkeep])
    out["text_to_audio"], out["text_to_audio_match"] = _text_to(
        encoder, fa[keep], "atm_head", lambda v: mem_a[keep[v]], t[tkeep], hidden[tkeep],
        mask[tkeep], gt, k_test)
  out["num_videos"], out["num_texts"], out["num_with_audio"] = len(fv), len(t), int(len(keep))
  out["k_test"] = k_test
  return out


@dataclasses.dataclass
class AudioSet:
  audio: np.ndarray         # (N, F, 64) normalised fbank
  texts: list[str]
  txt2aud: np.ndarray
  keys: list[str]
  skipped: list[str]
  data: Optional[dict] = None


def load_audio_set(corpus: dict, *, audio_seconds: float = 10.0, caption_field: str = "captions",
                   limit: Optional[int] = None) -> AudioSet:
  """Audio (own file, or the video's track, first `audio_seconds`) and captions of every row;
  rows without usable audio are skipped and listed (no video is decoded)."""
  from internvideo2_jax.data import audio as audio_lib
  frames = audio_lib.fbank_frames(audio_seconds)

  def load(rec, i):
    wave = audio_lib.load_waveform(rec["audio"] or rec["data"] or rec["path"],
                                   name=rec["audio"] or rec["path"] or rec["key"])
    return audio_lib.fbank_features(audio_lib.crop_or_pad(wave, audio_seconds), target_frames=frames)[0]

  items, texts, t2a, keys, skipped, data = _collect(corpus, caption_field, load, "audio", limit)
  return AudioSet(np.stack(items), texts, t2a, keys, skipped, data)


def evaluate_audio_retrieval(encoder: AVEncoder, aset: AudioSet, *, tokenizer, max_txt_l: int,
                             k_test: int = 128) -> dict:
  """Text-audio retrieval on an audio corpus: ITC and atm re-ranking (R@1/5/10 both ways)."""
  ids, mask = text_lib.tokenize(tokenizer, aset.texts, max_txt_l)
  mem_a, fa = encoder.audios(aset.audio)
  hidden, t = encoder.texts(ids, mask)
  out = {}
  out["text_to_audio"], out["text_to_audio_match"] = _text_to(
      encoder, fa, "atm_head", lambda v: mem_a[v], t, hidden, mask, aset.txt2aud, k_test)
  out["num_audio"], out["num_texts"], out["k_test"] = len(fa), len(t), k_test
  return out


# one table layout for training and the evaluate job (and the README): contrastive, dual
# softmax, then the matching-head re-ranking
TABLE_LABELS = {"itc": "itc (contrastive)", "dsl": "dsl (dual softmax)",
                "match": "match (ITM re-ranking of the top k_test)"}


def format_table(results: dict) -> str:
  rows = ["| scores | t2v R@1 | R@5 | R@10 | v2t R@1 | R@5 | R@10 | mean |", "|---|---|---|---|---|---|---|---|"]
  if "text_to_audio" in results:
    rows[0] = "| text to | R@1 | R@5 | R@10 | reverse R@1 | R@5 | R@10 | mean |"
  names = ("itc", "dsl", "match") + tuple(f"text_to_{m}{s}" for m in ("video", "audio", "av") for s in ("", "_match"))
  for name in [k for k in names if k in results]:
    r = results[name]
    rows.append(f"| {TABLE_LABELS.get(name, name)} | {r['t2v_r1']:.1f} | {r['t2v_r5']:.1f} | {r['t2v_r10']:.1f} | "
                f"{r['v2t_r1']:.1f} | {r['v2t_r5']:.1f} | {r['v2t_r10']:.1f} | {r['r_mean']:.1f} |")
  return "\n".join(rows)


def save_json(results: dict, path: str) -> None:
  from etils import epath  # local paths and gs://... alike
  epath.Path(path).write_text(json.dumps(results, indent=2))
