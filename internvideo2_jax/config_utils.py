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
