"""Reading and writing flat state dicts (name -> numpy array) in .pth / .safetensors / .npz.

`.pth`/`.pt`/`.bin` need torch (optional) and are read with `weights_only=True`, so a checkpoint
cannot run code. Top-level wrappers (`module` from DeepSpeed, `model`, `state_dict`) are
unwrapped as the official loaders do.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

_WRAPPERS = ("model", "module", "state_dict")


class CheckpointError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending key."""


def mismatch_error(what: str, missing, misshaped, unexpected, hint: str = "") -> CheckpointError | None:
  """One error listing every missing, mis-shaped and unexpected key (None if all is well)."""
  def abbrev(items, limit=12):
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
  problems = []
  if missing:
    problems.append(f"missing ({len(missing)}): {abbrev(missing)}")
  if misshaped:
    problems.append(f"wrong shape ({len(misshaped)}): {abbrev(misshaped)}")
  if unexpected:
    problems.append(f"unexpected ({len(unexpected)}){hint}: {abbrev(unexpected)}")
  if not problems:
    return None
  return CheckpointError(f"{what} does not match the config:\n  " + "\n  ".join(problems))


class KeyReader:
  """Reads float32 tensors from a state dict by key, recording used, missing and mis-shaped keys
  so a converter can report every problem at once (`mismatch_error`)."""

  def __init__(self, state_dict: Mapping[str, np.ndarray]):
    self.sd, self.used, self.missing, self.misshaped = state_dict, set(), [], []

  def take(self, key: str, shape, required: bool = True):
    """The tensor at `key` (float32) or None when absent / mis-shaped (and recorded)."""
    if key not in self.sd:
      if required:
        self.missing.append(key)
      return None
    self.used.add(key)
    value = np.asarray(self.sd[key], np.float32)
    if value.shape != tuple(shape):
      self.misshaped.append(f"{key}: checkpoint {value.shape}, model expects {tuple(shape)}")
      return None
    return value

  def unused(self, ignore_prefixes=()) -> list[str]:
    return sorted(k for k in set(self.sd) - self.used if not k.startswith(tuple(ignore_prefixes)))


def unwrap(obj) -> dict:
  """Returns the inner state dict of `{'model': sd}` / `{'module': sd}` / `{'state_dict': sd}`."""
  for key in _WRAPPERS:
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      return unwrap(obj[key])
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"expected a state dict (mapping of name -> tensor), got {type(obj)}")
  return dict(obj)


def _to_numpy(value):
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch tensor; bf16 has no numpy dtype, go through fp32
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      t = t.float()
    return t.numpy()
  return np.asarray(value)


class RenamedView(Mapping):
  """A lazy view of a state dict under other key names ({new name: old name}), optionally with
  per-key transforms applied when a tensor is read ({new name: fn})."""

  def __init__(self, base, names: Mapping[str, str], transforms: Optional[Mapping[str, Callable]] = None):
    self._base, self._names, self._fns = base, dict(names), dict(transforms or {})

  def __getitem__(self, key: str):
    value = self._base[self._names[key]]
    fn = self._fns.get(key)
    return value if fn is None else fn(value)

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)

  def __contains__(self, key) -> bool:
    return key in self._names


class _SafetensorsReader:
  def __init__(self, path: str):
    from safetensors import safe_open
    self.file = safe_open(path, framework="numpy")

  def __getitem__(self, key: str) -> np.ndarray:
    return self.file.get_tensor(key)


class LazyStateDict(RenamedView):
  """The tensors of a .safetensors file, each read when it is accessed: converting a checkpoint
  tensor by tensor never holds the whole file in host memory."""

  def __init__(self, path: str):
    self.path = path
    reader = _SafetensorsReader(path)
    super().__init__(reader, {k: k for k in reader.file.keys() if not k.endswith("position_ids")})


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


def is_repo_id(path: str) -> bool:
  """`org/name` that is not a local path: a Hugging Face repo id."""
  return (not os.path.exists(path) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path))
          and not path.startswith(".") and not path.endswith(WEIGHT_SUFFIXES))


def resolve_weights(path: str) -> str:
  """A weights file from: a file; a directory laid out like a Hugging Face model repo (the
  released InternVideo2 repos hold one checkpoint, e.g. `InternVideo2-stage2_1b-224p-f4.pt`);
  or a repo id `org/name` (fetched with huggingface_hub when a network is there)."""
  if os.path.isfile(path):
    return path
  if is_repo_id(path):
    try:
      from huggingface_hub import snapshot_download
      path = snapshot_download(path, allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES] + ["*.json"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: one clear line
      raise FileNotFoundError(f"{path}: not a local path, and fetching it as a Hugging Face repo failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it and "
                              "pass the directory or file") from None
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  found = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                 if f.endswith(WEIGHT_SUFFIXES) and not f.startswith("."))
  if len(found) != 1:
    raise FileNotFoundError(f"{path}: " + ("no weights file (" + ", ".join(WEIGHT_SUFFIXES) + ")" if not found else
                                           f"{len(found)} weights files ({', '.join(map(os.path.basename, found))}); "
                                           "pass the one to load"))
  return found[0]


def load_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """Loads a flat state dict from .pth/.pt/.bin (torch), .safetensors or .npz: a file, a
  directory laid out like a Hugging Face model repo, or a repo id (resolve_weights)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    path = resolve_weights(path)
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == ".safetensors":  # read lazily, tensor by tensor (no wrappers in this format)
      return LazyStateDict(path)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    elif ext in (".pth", ".pt", ".bin", ".ckpt"):
      try:
        import torch
      except ImportError:
        raise CheckpointError(
            f"{path}: reading {ext} files needs torch (pip install 'internvideo2-jax[torch]'), or "
            "convert it once to .safetensors / .npz elsewhere") from None
      raw = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise CheckpointError(f"{path}: unknown checkpoint format {ext!r} "
                            "(expected .pth, .pt, .bin, .safetensors or .npz)")
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - report any reader failure with the file name
    raise CheckpointError(f"{path}: could not read checkpoint: {type(e).__name__}: {e}") from e
  sd = unwrap(raw)
  return {k: _to_numpy(v) for k, v in sd.items() if not k.endswith("position_ids")}


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes .safetensors or .npz (by extension)."""
  from etils import epath  # local paths and gs://... alike
  path = os.fspath(path)
  if not path.endswith((".safetensors", ".npz")):
    raise ValueError(f"{path}: export format must be .safetensors or .npz")
  arrays = {k: np.array(v, order="C") for k, v in state_dict.items()}  # keeps 0-d scalars 0-d
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if path.endswith(".safetensors") and "://" not in path:
    from safetensors.numpy import save_file
    save_file(arrays, path)
  elif path.endswith(".safetensors"):  # object stores: one upload of the serialised file
    from safetensors.numpy import save
    target.write_bytes(save(arrays))
  else:
    with target.open("wb") as f:
      np.savez(f, **arrays)


def set_path(tree: dict, path, value) -> None:
  """tree[path[0]][path[1]]... = value, creating the inner dicts."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def leaf_writer(tree: dict, sink: Optional[Callable] = None, prefix: tuple = ()) -> Callable:
  """`put(path, value)` for a converter: to `sink(prefix + path, value)` when given (streaming
  into sharded arrays, one leaf on the host at a time), else into the nested dict `tree`.
  None values (a tensor that was missing; already reported) are skipped."""
  def put(path, value):
    if value is None:
      return
    full = tuple(prefix) + tuple(path)
    if sink is not None:
      sink(full, value)
    else:
      set_path(tree, full, value)
  return put


def select(state_dict: Mapping[str, np.ndarray], keep: Callable[[str], bool]) -> Mapping[str, np.ndarray]:
  """The keys for which `keep(key)` holds. A view: no tensor is read."""
  return RenamedView(state_dict, {k: k for k in state_dict if keep(k)})


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> Mapping[str, np.ndarray]:
  """Keys under `prefix` with it removed, if any key has it; otherwise the dict unchanged.
  A view: no tensor is read."""
  if any(k.startswith(prefix) for k in state_dict):
    return RenamedView(state_dict, {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)})
  return state_dict
