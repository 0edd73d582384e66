"""Official InternVideo2 (PyTorch) vision-encoder weights <-> our Flax parameters.

The conversion is a table: each official key maps to one of our parameter paths with a pure
reshape/transpose each way. torch Linear (out, in) becomes kernel (in, out...); the qkv rows are
[q; k; v], each head-major (heads, head_dim); Conv3d (O, I, t, p, p) becomes (t, p, p, I, O);
`blocks.{i}.*` are stacked on a leading layers axis (the scanned blocks).

Position tables whose size differs from the config (other frame count or resolution) are
resized with the official interpolation (linear in time, torch bicubic in space).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np

from internvideo2_jax.convert.io import (CheckpointError, RenamedView, leaf_writer, mismatch_error, set_path,
                                         strip_prefix)
from internvideo2_jax.models.embeddings import resize_bicubic, resize_linear, resize_pos_embed
from internvideo2_jax.models.vit import ViTSpec

log = logging.getLogger(__name__)

# Keys of other heads that live next to the encoder in official checkpoints (stage-1/2
# decoders, classifier heads). Importing the encoder skips them; their own converters read them.
_OTHER_HEADS = ("clip_decoder.", "final_clip_decoder.", "clip_pos_embed", "clip_img_pos_embed",
                "mae_decoder.", "mae_pos_embed", "fc_norm.", "head.", "extra_mlp.")

Rule = tuple[str, tuple[str, ...], tuple[int, ...], Callable, Callable]


def _linear(out_shape: tuple[int, ...], in_dim: int):
  """torch (out, in) <-> kernel (in, *out_shape)."""
  return (lambda w: w.T.reshape((in_dim,) + out_shape),
          lambda k: k.reshape(in_dim, -1).T)


def _linear_in(in_shape: tuple[int, ...], out_dim: int):
  """torch (out, in) <-> kernel (*in_shape, out)."""
  return (lambda w: w.T.reshape(in_shape + (out_dim,)),
          lambda k: k.reshape(-1, out_dim).T)


_same = (lambda a: a, lambda a: a)


def _rules(s: ViTSpec) -> tuple[list[Rule], list[Rule]]:
  """(top-level rules, per-block rules): (official key, our path, official shape, to_ours, to_official)."""
  d, h = s.embed_dim, s.num_heads
  hd = d // h
  t, g1, g2 = s.grid
  p, tt = s.patch_size, s.tubelet_size
  top: list[Rule] = [
      ("cls_token", ("cls_token",), (1, 1, d), *_same),
      ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), (d, s.in_chans, tt, p, p),
       lambda w: w.transpose(2, 3, 4, 1, 0), lambda k: k.transpose(4, 3, 0, 1, 2)),
      ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), (d,), *_same),
  ]
  if s.sep_pos_embed:
    top += [("pos_embed_spatial", ("pos_embed_spatial",), (1, g1 * g2, d), *_same),
            ("pos_embed_temporal", ("pos_embed_temporal",), (1, t, d), *_same),
            ("pos_embed_cls", ("pos_embed_cls",), (1, 1, d), *_same)]
  else:
    top.append(("pos_embed", ("pos_embed",), (1, 1 + t * g1 * g2, d), *_same))
    if s.sep_image_video_pos_embed:
      top.append(("img_pos_embed", ("img_pos_embed",), (1, 1 + g1 * g2, d), *_same))
  if s.attn_pool:
    ph = s.attn_pool_num_heads
    cp, ca = "clip_projector", ("clip_projector", "cross_attn")
    for n in ("q", "k", "v"):
      top += [(f"{cp}.norm1_{n}.weight", (cp, f"norm1_{n}", "weight"), (d,), *_same),
              (f"{cp}.norm1_{n}.bias", (cp, f"norm1_{n}", "bias"), (d,), *_same),
              (f"{cp}.cross_attn.{n}.weight", ca + (n, "kernel"), (d, d), *_linear((d,), d)),
              (f"{cp}.cross_attn.{n}_bias", ca + (f"{n}_bias",), (d,), *_same)]
    top += [(f"{cp}.cross_attn.proj.weight", ca + ("proj", "kernel"), (s.clip_embed_dim, d),
             *_linear_in((ph, d // ph), s.clip_embed_dim)),
            (f"{cp}.cross_attn.proj.bias", ca + ("proj", "bias"), (s.clip_embed_dim,), *_same)]
  mh = s.mlp_hidden
  block: list[Rule] = [
      ("norm1.weight", ("norm1", "weight"), (d,), *_same),
      ("attn.qkv.weight", ("attn", "qkv", "kernel"), (3 * d, d), *_linear((3, h, hd), d)),
      ("attn.proj.weight", ("attn", "proj", "kernel"), (d, d), *_linear_in((h, hd), d)),
      ("attn.proj.bias", ("attn", "proj", "bias"), (d,), *_same),
      ("ls1.gamma", ("ls1", "gamma"), (d,), *_same),
      ("norm2.weight", ("norm2", "weight"), (d,), *_same),
      ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (mh, d), *_linear((mh,), d)),
      ("mlp.fc1.bias", ("mlp", "fc1", "bias"), (mh,), *_same),
      ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (d, mh), *_linear((d,), mh)),
      ("mlp.fc2.bias", ("mlp", "fc2", "bias"), (d,), *_same),
      ("ls2.gamma", ("ls2", "gamma"), (d,), *_same),
  ]
  if s.qkv_bias:
    block.append(("attn.qkv.bias", ("attn", "qkv", "bias"), (3 * d,),
                  lambda b: b.reshape(3, h, hd), lambda b: b.reshape(-1)))
  if s.qk_normalization:
    block += [("attn.q_norm.weight", ("attn", "q_norm", "weight"), (d,), *_same),
              ("attn.k_norm.weight", ("attn", "k_norm", "weight"), (d,), *_same)]
  return top, block


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _source_grid(n_rows: int, spec: ViTSpec, checkpoint_num_frames: Optional[int]) -> tuple[int, int, int]:
  """Infers the (T, H, W) grid of a checkpoint's joint table with n_rows patch rows.

  Without `checkpoint_num_frames`, the two readings "same resolution, other frame count" and
  "same frame count, other resolution" are tried; exactly one must fit.
  """
  t, g1, g2 = spec.grid

  def square(t0):
    side = math.isqrt(n_rows // t0) if t0 > 0 and n_rows % t0 == 0 else 0
    return (t0, side, side) if side and side * side * t0 == n_rows else None

  if checkpoint_num_frames is not None:
    grid = square(checkpoint_num_frames // spec.tubelet_size)
    if grid is None:
      raise CheckpointError(f"pos_embed has {n_rows} patch rows, not {checkpoint_num_frames} "
                            f"frames (tubelet {spec.tubelet_size}) of a square grid")
    return grid
  readings = {g for g in ((n_rows // (g1 * g2), g1, g2) if n_rows % (g1 * g2) == 0 else None,
                          square(t)) if g is not None}
  if len(readings) != 1:
    raise CheckpointError(
        f"pos_embed has {n_rows} patch rows; cannot tell the checkpoint's frame count and "
        f"resolution apart ({sorted(readings) or 'no reading fits'}): pass "
        "checkpoint_num_frames= (the frames it was trained with)")
  return readings.pop()


def _resize_table(key: str, value: np.ndarray, want: tuple[int, ...], spec: ViTSpec,
                  checkpoint_num_frames: Optional[int]) -> np.ndarray:
  t, g1, g2 = spec.grid
  if key == "pos_embed":
    src = _source_grid(value.shape[1] - 1, spec, checkpoint_num_frames)
    out = resize_pos_embed(value, src, (t, g1, g2))
  elif key == "img_pos_embed":
    side = math.isqrt(value.shape[1] - 1)
    out = resize_pos_embed(value, (1, side, side), (1, g1, g2))
  elif key == "pos_embed_spatial":
    side = math.isqrt(value.shape[1])
    grid = value.reshape(side, side, -1)
    out = resize_bicubic(grid, (g1, g2), axes=(0, 1)).reshape(1, g1 * g2, -1).astype(np.float32)
  elif key == "pos_embed_temporal":
    out = resize_linear(value[0], t, axis=0)[None].astype(np.float32)
  else:
    raise AssertionError(key)
  log.info("resized %s %s -> %s", key, value.shape, out.shape)
  if out.shape != want:
    raise CheckpointError(f"{key}: could not resize {value.shape} to {want}")
  return out


_RESIZABLE = ("pos_embed", "img_pos_embed", "pos_embed_spatial", "pos_embed_temporal")


def _sm_prefixes(sd: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """The single-modality fine-tuning loader's rule (`SM/run_finetuning.py`): `backbone.` and
  `encoder.` prefixes are dropped (pretraining checkpoints of other codebases use them); the
  other keys stay as they are. A view: no tensor is read."""
  def plain(k: str) -> str:
    for prefix in ("backbone.", "encoder."):
      if k.startswith(prefix):
        return k[len(prefix):]
    return k
  if not any(k.startswith(("backbone.", "encoder.")) for k in sd):
    return sd
  return RenamedView(sd, {plain(k): k for k in sd})


def vision_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                           checkpoint_num_frames: Optional[int] = None,
                           strict: bool = True,
                           sink: Optional[Callable[[tuple, np.ndarray], None]] = None,
                           ignored: Optional[list] = None) -> dict:
  """Official vision-encoder state dict -> `{'params': ...}` for `VisionEncoder(config)`.

  Accepts the encoder's own keys, or a whole stage-2/CLIP model (only `vision_encoder.*` is
  read). Position tables of another frame count or resolution are interpolated
  (`checkpoint_num_frames` disambiguates when needed). Missing keys, unknown keys (if
  `strict`) and mis-shaped tensors are collected and raised together as one CheckpointError.
  Keys of other heads (decoders, classifier) are skipped; with `strict=False` the other unknown
  keys (e.g. the extra blocks of a deeper checkpoint) are too, listed in `ignored`. With `sink(path, value)` each
  converted leaf goes there as soon as it is ready instead of into the returned tree (streaming
  into sharded arrays: the host holds one leaf at a time); the problems are still raised.
  """
  spec = ViTSpec.from_config(config)
  sd = _sm_prefixes(strip_prefix(strip_prefix(state_dict, "module."), "vision_encoder."))
  top, block = _rules(spec)
  params: dict = {}
  used, missing, misshaped = set(), [], []

  def take(key, path, shape, to_ours):
    if key not in sd:
      missing.append(key)
      return None
    used.add(key)
    value = np.asarray(sd[key], np.float32)
    if value.shape != shape:
      if key in _RESIZABLE and value.ndim == len(shape) and value.shape[-1] == shape[-1]:
        try:
          value = _resize_table(key, value, shape, spec, checkpoint_num_frames)
        except CheckpointError as e:
          misshaped.append(f"{key}: {e}")
          return None
      else:
        misshaped.append(f"{key}: checkpoint {value.shape}, model expects {shape}")
        return None
    return to_ours(value)

  put = leaf_writer(params, sink)
  for key, path, shape, to_ours, _ in top:
    value = take(key, path, shape, to_ours)
    if value is not None:
      put(path, value)
  for key, path, shape, to_ours, _ in block:
    layers = [take(f"blocks.{i}.{key}", path, shape, to_ours) for i in range(spec.depth)]
    if all(v is not None for v in layers):
      put(("blocks",) + path, np.stack(layers))

  unexpected = []
  for k in sorted(set(sd) - used):
    if k.startswith(_OTHER_HEADS) or (not spec.attn_pool and k.startswith("clip_projector.")):
      continue
    unexpected.append(k)
  more_blocks = any(k.startswith("blocks.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) >= spec.depth
                    for k in unexpected)
  if not strict and ignored is not None:
    ignored.extend(unexpected)
  error = mismatch_error("vision encoder checkpoint", missing, misshaped, unexpected if strict else (),
                         f" (the checkpoint has more blocks than depth={spec.depth})" if more_blocks else "")
  if error:
    raise error
  return {"params": params}


def load_vision_init(path: str, config: Any, *, partial: bool = False,
                     sink: Optional[Callable[[tuple, np.ndarray], None]] = None) -> str:
  """`model.vision_init`: the vision tower from an official / exported checkpoint file, leaf by
  leaf into `sink`. Every mismatch is an error (a deeper checkpoint of the same width would
  otherwise load with its extra blocks silently dropped) unless `partial`
  (`model.vision_init_partial`), which loads what matches and says what it left out."""
  from internvideo2_jax.convert.io import load_state_dict
  ignored: list = []
  try:
    vision_from_state_dict(load_state_dict(path), config, strict=not partial, sink=sink, ignored=ignored)
  except CheckpointError as e:
    raise CheckpointError(f"model.vision_init={path}: {e}" + (
        "" if partial else "\n(set model.vision_init_partial=True to load only the matching part)")) from e
  if not ignored:
    return f"vision encoder from {path}"
  shown = ", ".join(ignored[:8]) + (f", ... (+{len(ignored) - 8} more)" if len(ignored) > 8 else "")
  return f"vision encoder from {path}, partially: {len(ignored)} checkpoint tensors left out: {shown}"


def vision_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """`{'params': ...}` (or the inner dict) -> official key layout, float32 numpy."""
  spec = ViTSpec.from_config(config)
  tree = params.get("params", params)
  top, block = _rules(spec)
  out = {}
  for key, path, shape, _, to_official in top:
    out[key] = _checked(key, to_official(np.asarray(_get(tree, path), np.float32)), shape)
  for key, path, shape, _, to_official in block:
    stacked = np.asarray(_get(tree, ("blocks",) + path), np.float32)
    for i in range(spec.depth):
      out[f"blocks.{i}.{key}"] = _checked(key, to_official(stacked[i]), shape)
  return out


def resize_vision_params(params: Mapping, old_config: Any, new_config: Any) -> dict:
  """Re-targets encoder params to another `num_frames` / `img_size` (official interpolation)."""
  old = ViTSpec.from_config(old_config)
  sd = vision_to_state_dict(params, old_config)
  return vision_from_state_dict(sd, new_config, checkpoint_num_frames=old.num_frames)


def _checked(key, value, shape):
  if value.shape != shape:
    raise CheckpointError(f"{key}: params give {value.shape}, official layout is {shape}")
  return value


# ----------------------------------------------------------------------------- stage 2


def _linear_pair(key, kernel_path, out_dim, in_dim):
  return [(f"{key}.weight", kernel_path + ("kernel",), (out_dim, in_dim), lambda w: w.T, lambda k: k.T),
          (f"{key}.bias", kernel_path + ("bias",), (out_dim,), lambda b: b, lambda b: b)]


def _stage2_head_rules(cfg):
  v, t = cfg.vision, cfg.text
  e = int(cfg.embed_dim)
  return (_linear_pair("vision_proj", ("vision_proj",), e, v.clip_embed_dim)
          + _linear_pair("text_proj", ("text_proj",), e, t.hidden_size)
          + _linear_pair("itm_head", ("itm_head",), 2, t.hidden_size)
          + [("temp", ("temp",), (), lambda x: x, lambda x: x)])


def stage2_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                           checkpoint_num_frames: Optional[int] = None) -> dict:
  """Official stage-2 checkpoint (`vision_encoder.*`, `text_encoder.bert.*`, `text_encoder.cls.*`,
  `vision_proj`, `text_proj`, `itm_head`, `temp`) -> `{'params': ...}` of Stage2Model(config)."""
  from internvideo2_jax.convert.bert import bert_from_state_dict
  sd = strip_prefix(state_dict, "module.")
  vision = vision_from_state_dict({k: v for k, v in sd.items() if k.startswith("vision_encoder.")},
                                  config.vision, checkpoint_num_frames=checkpoint_num_frames)
  text = bert_from_state_dict({k[len("text_encoder."):]: v for k, v in sd.items()
                               if k.startswith("text_encoder.")}, config.text)
  params = {"vision_encoder": vision["params"], "text_encoder": text}
  _take_heads(sd, _stage2_head_rules(config), params, "stage-2 checkpoint")
  return {"params": params}


def _take_heads(sd, rules, params, what, optional=(), base=None):
  """Copies the head tensors of `rules` into params; `optional` keys fall back to `base`."""
  missing = []
  for key, path, shape, to_ours, _ in rules:
    if key not in sd:
      if key.startswith(tuple(optional)) and base is not None:
        set_path(params, path, np.asarray(_get(base.get("params", base), path)))
      else:
        missing.append(key)
      continue
    value = np.asarray(sd[key], np.float32)
    if value.shape != shape:
      missing.append(f"{key} (shape {value.shape}, expected {shape})")
      continue
    set_path(params, path, to_ours(value))
  if missing:
    raise CheckpointError(f"{what}: missing or mis-shaped heads: {', '.join(missing)}")


def stage2_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """Stage2Model params -> the official stage-2 key layout."""
  from internvideo2_jax.convert.bert import bert_to_state_dict
  tree = params.get("params", params)
  out = {f"vision_encoder.{k}": v for k, v in vision_to_state_dict(tree["vision_encoder"], config.vision).items()}
  out.update({f"text_encoder.{k}": v for k, v in bert_to_state_dict(tree["text_encoder"], config.text).items()})
  for key, path, _, _, to_official in _stage2_head_rules(config):
    out[key] = np.asarray(to_official(np.asarray(_get(tree, path), np.float32)))
  return out


# ----------------------------------------------------------------------------- stage 1


def stage1_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """Stage1Student params -> the official single_modality stage-1 key layout (the encoder keys,
  clip_pos_embed, mae_pos_embed, clip_decoder.{k}, final_clip_decoder, mae_decoder.{k})."""
  tree = params.get("params", params)
  out = vision_to_state_dict(tree["vision_encoder"], config.vision)
  out["clip_pos_embed"] = np.asarray(tree["clip_pos_embed"], np.float32)
  out["mae_pos_embed"] = np.asarray(tree["mae_pos_embed"], np.float32)

  def lin(prefix, p):
    return {f"{prefix}.weight": np.asarray(p["kernel"], np.float32).T,
            f"{prefix}.bias": np.asarray(p["bias"], np.float32)}

  def norm(prefix, p):
    return {f"{prefix}.weight": np.asarray(p["weight"], np.float32),
            f"{prefix}.bias": np.asarray(p["bias"], np.float32)}

  for k in range(len(config.clip_layers)):
    p = tree[f"clip_decoder_{k}"]
    out.update(lin(f"clip_decoder.{k}.head", p["head"]), **norm(f"clip_decoder.{k}.norm", p["norm"]))
  for k in range(len(config.mae_layers)):
    p = tree[f"mae_decoder_{k}"]
    out.update(lin(f"mae_decoder.{k}.head.0", p["head_0"]), **lin(f"mae_decoder.{k}.head.2", p["head_2"]),
               **norm(f"mae_decoder.{k}.norm", p["norm"]))
  if "final_clip_decoder" in tree:
    p = tree["final_clip_decoder"]
    out.update(lin("final_clip_decoder.head", p["head"]), **norm("final_clip_decoder.norm", p["norm"]))
  return out


# ----------------------------------------------------------------------------- stage 2, audio-visual


def _av_head_rules(cfg):
  v, t, a = cfg.vision, cfg.text, cfg.audio
  c, ad = int(cfg.contra_dim), int(cfg.av_concat_dim)
  rules = (_linear_pair("vision_proj", ("vision_proj",), c, v.clip_embed_dim)
           + _linear_pair("text_proj", ("text_proj",), c, t.hidden_size)
           + _linear_pair("audio_proj", ("audio_proj",), c, a.encoder_embed_dim)
           + _linear_pair("av_fusion", ("av_fusion",), c, 2 * c)
           + _linear_pair("av_concat_vision_proj.0", ("av_concat_vision_proj", "0"), ad, v.embed_dim)
           + _linear_pair("av_concat_audio_proj.0", ("av_concat_audio_proj", "0"), ad, a.encoder_embed_dim)
           + _linear_pair("itm_head", ("itm_head",), 2, t.hidden_size)
           + _linear_pair("avtm_head", ("avtm_head",), 2, t.hidden_size)
           + _linear_pair("atm_head", ("atm_head",), 2, t.hidden_size)
           + [("temp", ("temp",), (), lambda x: x, lambda x: x)])
  for name in ("av_concat_vision_proj", "av_concat_audio_proj"):
    rules += [(f"{name}.1.weight", (name, "1", "weight"), (ad,), lambda x: x, lambda x: x),
              (f"{name}.1.bias", (name, "1", "bias"), (ad,), lambda x: x, lambda x: x)]
  return rules


def stage2_av_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                              checkpoint_num_frames: Optional[int] = None, base: Optional[Mapping] = None) -> dict:
  """Official 6B audio-visual stage-2 checkpoint -> `{'params': ...}` of Stage2AVModel(config).

  `atm_head` is optional (the released recipe trains it only when atm != 0): taken from `base`
  (a fresh init) when absent.
  """
  from internvideo2_jax.convert.bert import bert_from_state_dict
  from internvideo2_jax.convert.beats import beats_from_state_dict
  sd = strip_prefix(state_dict, "module.")
  params = {
      "vision_encoder": vision_from_state_dict({k: v for k, v in sd.items() if k.startswith("vision_encoder.")},
                                               config.vision, checkpoint_num_frames=checkpoint_num_frames)["params"],
      "text_encoder": bert_from_state_dict({k[len("text_encoder."):]: v for k, v in sd.items()
                                            if k.startswith("text_encoder.")}, config.text),
      "audio_encoder": beats_from_state_dict({k: v for k, v in sd.items() if k.startswith("audio_encoder.")},
                                             config.audio)}
  _take_heads(sd, _av_head_rules(config), params, "audio-visual stage-2 checkpoint",
              optional=("atm_head",), base=base)
  return {"params": params}


def stage2_av_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  from internvideo2_jax.convert.bert import bert_to_state_dict
  from internvideo2_jax.convert.beats import beats_to_state_dict
  tree = params.get("params", params)
  out = {f"vision_encoder.{k}": v for k, v in vision_to_state_dict(tree["vision_encoder"], config.vision).items()}
  out.update({f"text_encoder.{k}": v for k, v in bert_to_state_dict(tree["text_encoder"], config.text).items()})
  out.update({f"audio_encoder.{k}": v for k, v in beats_to_state_dict(tree["audio_encoder"], config.audio).items()})
  for key, path, _, _, to_official in _av_head_rules(config):
    out[key] = np.asarray(to_official(np.asarray(_get(tree, path), np.float32)))
  return out


# ----------------------------------------------------------------------------- fine-tuning


def _classifier_head_rules(cfg):
  d = int(cfg.vision.clip_embed_dim)
  return ([("fc_norm.weight", ("fc_norm", "weight"), (d,), lambda x: x, lambda x: x),
           ("fc_norm.bias", ("fc_norm", "bias"), (d,), lambda x: x, lambda x: x)]
          + _linear_pair("head", ("head",), int(cfg.num_classes), d))


def classifier_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """VideoClassifier params -> the official single-modality fine-tuning layout: the encoder's
  keys at the top level (`patch_embed.*`, `blocks.*`, `clip_projector.*`, ...) plus `fc_norm.*`
  and `head.*` (what `SM/run_finetuning.py` loads and saves)."""
  tree = params.get("params", params)
  out = vision_to_state_dict(tree["vision_encoder"], config.vision)
  for key, path, _, _, to_official in _classifier_head_rules(config):
    out[key] = np.asarray(to_official(np.asarray(_get(tree, path), np.float32)))
  return out


def classifier_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                               checkpoint_num_frames: Optional[int] = None) -> dict:
  """An official fine-tuned classifier (or our export) -> `{'params': ...}` of VideoClassifier."""
  sd = _sm_prefixes(strip_prefix(strip_prefix(state_dict, "module."), "model."))
  heads = {k for k, *_ in _classifier_head_rules(config)}
  vision = vision_from_state_dict({k: v for k, v in sd.items() if k not in heads}, config.vision,
                                  checkpoint_num_frames=checkpoint_num_frames)
  params = {"vision_encoder": vision["params"]}
  _take_heads(sd, _classifier_head_rules(config), params, "classifier checkpoint")
  return {"params": params}
