"""Helpers for the config files under configs/ (big_vision style `get_config("k=v,...")`)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "size=tiny,frames=8,fast" into a ConfigDict typed like `defaults`.

  A bare word sets a boolean default to True. Unknown keys are an error naming the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "on")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def preset(kind: str, presets: dict, defaults: dict, name: str, overrides: dict) -> dict:
  """defaults <- presets[name] <- overrides, with unknown names and keys reported."""
  if name not in presets:
    raise ValueError(f"unknown {kind} preset {name!r}; choose from {list(presets)}")
  cfg = dict(defaults, **presets[name])
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f"unknown {kind} config keys {unknown}; valid keys: {sorted(cfg)}")
  cfg.update(overrides)
  return cfg


def with_defaults(kind: str, config, defaults: dict) -> dict:
  """A model config (dict or ConfigDict) over its defaults, unknown keys reported by name."""
  c = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  unknown = sorted(set(c) - set(defaults))
  if unknown:
    raise ValueError(f"unknown {kind} config keys {unknown}; valid keys: {sorted(defaults)}")
  return dict(defaults, **c)


def add_runtime(c: ml_collections.ConfigDict, *, step: str = "") -> ml_collections.ConfigDict:
  """The settings every job shares: multi-host start, compilation cache, and `job=compile`.

  `step` names the training job whose step `job=compile` builds (train_stage1, train_stage2).
  """
  c.distributed = ml_collections.ConfigDict({
      "mode": "auto",            # auto: SLURM / TPU pod / MPI detection; off: never
      "coordinator_address": "",  # host:port of process 0 (explicit start)
      "num_processes": 0,
      "process_id": -1,
      "local_device_ids": "",    # e.g. "0,1,2,3"
      "timeout_s": 300,          # start, shutdown and CPU (gloo) collective waits
  })
  c.runtime = ml_collections.ConfigDict({
      # Persistent XLA compilation cache: "auto" = ~/.cache/internvideo2_jax/jax_cache on GPU/TPU
      # (off on CPU), "" = off, or a directory (gs:// works).
      "compilation_cache_dir": "auto",
  })
  c.compile = ml_collections.ConfigDict({
      "step": step,
      "topology": "",            # e.g. "v5p:4x8x8" (libtpu topology; no TPU needed)
      "num_slices": 1,           # multislice: that many copies of the topology joined by DCN
      "devices": 0,              # or N fake CPU devices
      "hbm_gib": 0.0,            # per-chip memory to check against (0: from the chip kind)
      "libtpu": "",              # path of libtpu.so (default: installed libtpu or .venv/libtpu)
  })
  return c
