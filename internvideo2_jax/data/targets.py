"""The record format of cached stage-1 teacher targets (written by `train/cache_targets.py`) and
random access over such shards (corpus format "targets"): one augmented clip (uint8) with the
teachers' outputs in bf16 per record, msgpack in ArrayRecord files."""

from __future__ import annotations

import jax.numpy as jnp
import msgpack
import numpy as np

TARGET_KEYS = ("clip_tokens", "clip_final", "clip_attn", "mae_tokens")


def _pack(arr: np.ndarray, dtype: str) -> dict:
  a = np.asarray(arr)
  if dtype == "bfloat16":
    raw = np.asarray(jnp.asarray(a, jnp.bfloat16)).view(np.uint16)
  else:
    raw = a.astype(dtype)
  return {"dtype": dtype, "shape": list(a.shape), "data": raw.tobytes()}


def _unpack(d: dict) -> np.ndarray:
  if d["dtype"] == "bfloat16":
    u = np.frombuffer(d["data"], np.uint16).reshape(d["shape"])
    return np.asarray(jnp.asarray(u.view(jnp.bfloat16), jnp.float32))
  return np.frombuffer(d["data"], d["dtype"]).reshape(d["shape"])


def encode_example(example: dict, dtype: str = "bfloat16") -> bytes:
  rec = {"video": _pack(example["video"], "uint8"), "label": int(example.get("label", -1))}
  rec.update({k: _pack(example[k], dtype) for k in TARGET_KEYS})
  return msgpack.packb(rec, use_bin_type=True)


def decode_example(raw: bytes) -> dict:
  rec = msgpack.unpackb(raw, raw=False)
  out = {k: _unpack(rec[k]) for k in ("video",) + TARGET_KEYS}
  out["label"] = np.int32(rec["label"])
  return out


class TargetsCorpus:
  """Random access over cached examples (already batched-shape per example)."""

  def __init__(self, pattern: str):
    import grain
    from internvideo2_jax.data.sources import shard_paths
    self.paths = shard_paths(pattern)
    self._src = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return decode_example(self._src[i])


__all__ = ["TARGET_KEYS", "encode_example", "decode_example", "TargetsCorpus"]
