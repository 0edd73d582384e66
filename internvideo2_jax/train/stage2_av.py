"""Tri-modal stage-2 objectives (official audio-visual criterion, reference §2.4):
vtc / vtm / mlm on the video memory, atc / atm / amlm on the audio memory, avc (audio-video),
avtc / avtm / avmlm on the fused audio-video feature and the [audio; video] memory.

Samples without audio (`has_audio` False) are left out of every audio term: contrastive rows and
columns are masked, they are never drawn as hard negatives, and their matching/MLM terms get zero
weight, so the model is never trained on the zero fbank of a silent clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.stage2_av import Stage2AVModel
from internvideo2_jax.ops import losses as L

AV_LOSSES = ("vtc", "vtm", "mlm", "atc", "atm", "amlm", "avc", "avtc", "avtm", "avmlm")


def _matching(model, p, key, head, feat_m, feat_t, hidden, tmask, memory, sid, temp, groups, valid, rngs):
  """VTM-style loss for one memory: hard negatives, 3B pairs, weights from `valid`."""
  n = hidden.shape[0]
  neg_t, neg_m = L.hard_negatives(key, jax.lax.stop_gradient(feat_m), jax.lax.stop_gradient(feat_t), sid,
                                  jax.lax.stop_gradient(temp), groups, valid)
  take = lambda x, i: L.take_in_groups(x, i, groups)  # noqa: E731 - local to each batch shard
  text_h = jnp.concatenate([hidden, hidden, take(hidden, neg_t)])
  text_m = jnp.concatenate([tmask, tmask, take(tmask, neg_t)])
  mem = jnp.concatenate([memory, take(memory, neg_m), memory])
  logits = model.apply(p, head, text_h, text_m, mem, method=Stage2AVModel.match_logits, rngs=rngs)
  w = jnp.concatenate([valid, valid & take(valid, neg_m), valid & take(valid, neg_t)]).astype(jnp.float32)
  return L.cross_entropy(logits, L.itm_labels(n), w)


def _mlm(model, p, key, ids, tmask, memory, cfg, weight_rows, rngs):
  tc = model.config.text
  masked, targets, chosen = L.mlm_mask(key, ids, vocab_size=tc.vocab_size, mask_token_id=cfg.mask_token_id,
                                       pad_token_id=tc.pad_token_id, cls_token_id=cfg.cls_token_id,
                                       prob=cfg.mlm_prob)
  pos, valid, dropped = L.select_positions(chosen, cfg.get("mlm_max_positions", 0))
  logits = model.apply(p, masked, tmask, memory, pos, method=Stage2AVModel.mlm_logits, rngs=rngs)
  w = valid.astype(jnp.float32) * weight_rows[:, None].astype(jnp.float32)
  return L.cross_entropy(logits, jnp.take_along_axis(targets, pos, axis=1), w), dropped


def av_losses(model: Stage2AVModel, params, batch, rng, cfg, *, num_visible, groups: int,
              vtc_mult: float) -> dict:
  """Unweighted terms whose weight in `cfg.loss` is non-zero (the official 6B recipe: vtc, vtm,
  mlm, avtc, avtm, avmlm = 1, the rest 0)."""
  keys = jax.random.split(rng, 8)
  p = {"params": params}
  rngs = {"dropout": keys[0]}
  video = normalize(batch["video"], cfg.data_norm, jnp.dtype(model.config.vision.dtype))
  mem_v, fv = model.apply(p, video, batch.get("mask"), num_visible, method=Stage2AVModel.encode_vision, rngs=rngs)
  mem_a, fa = model.apply(p, batch["audio"], method=Stage2AVModel.encode_audio)
  hidden, ft = model.apply(p, batch["text_ids"], batch["text_mask"], method=Stage2AVModel.encode_text, rngs=rngs)
  temp = model.apply(p, method=Stage2AVModel.get_temp)
  fav = model.apply(p, fa, fv, method=Stage2AVModel.av_feature)
  v, a, t, av = (L.l2_normalize(x) for x in (fv, fa, ft, fav))
  sid, tmask, ids = batch["sample_id"], batch["text_mask"], batch["text_ids"]
  has = batch["has_audio"].astype(bool)
  every = jnp.ones_like(has)
  mem_av = jnp.concatenate([mem_a, mem_v], axis=1)
  w = cfg.loss
  out = {}
  if w.get("vtc"):
    out["vtc"] = L.vtc_loss(v, t, sid, temp) * vtc_mult
  if w.get("atc"):
    out["atc"] = L.vtc_loss(a, t, sid, temp, valid=has) * vtc_mult
  if w.get("avc"):
    out["avc"] = L.vtc_loss(a, v, sid, temp, valid=has) * vtc_mult
  if w.get("avtc"):
    out["avtc"] = L.vtc_loss(av, t, sid, temp, valid=has) * vtc_mult
  if w.get("vtm"):
    out["vtm"] = _matching(model, p, keys[1], "itm_head", v, t, hidden, tmask, mem_v, sid, temp, groups, every, rngs)
  if w.get("atm"):
    out["atm"] = _matching(model, p, keys[2], "atm_head", a, t, hidden, tmask, mem_a, sid, temp, groups, has, rngs)
  if w.get("avtm"):
    out["avtm"] = _matching(model, p, keys[3], "avtm_head", av, t, hidden, tmask, mem_av, sid, temp, groups, has, rngs)
  if w.get("mlm"):
    out["mlm"], out["mlm_dropped"] = _mlm(model, p, keys[4], ids, tmask, mem_v, cfg, every, rngs)
  if w.get("amlm"):
    out["amlm"], out["amlm_dropped"] = _mlm(model, p, keys[5], ids, tmask, mem_a, cfg, has, rngs)
  if w.get("avmlm"):
    out["avmlm"], out["avmlm_dropped"] = _mlm(model, p, keys[6], ids, tmask, mem_av, cfg, has, rngs)
  out["temp"] = temp
  return out
