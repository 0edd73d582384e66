"""The library from Python (notebooks, scripts): load a trained model, encode videos and texts,
classify. The CLI jobs use the same pieces (`train/`, `evaluate/`).

    from internvideo2_jax import api
    m = api.load("runs/demo")                       # a workdir: its config and latest checkpoint
    m = api.load("runs/demo/export/stage2_official_layout.safetensors",
                 config="configs/stage2.py:size=demo")   # a weights file + the config it fits
    v = api.encode_videos(m, clips)                  # uint8 (N, T, H, W, 3) -> (N, D), L2-normalised
    t = api.encode_texts(m, ["a red circle moves left"])
    sim = t @ v.T                                    # the ITC similarity (temperature 1)
    probs = api.classify(m, clips)                   # a fine-tuned classifier's class probabilities

Kinds: `stage2` (video-text model: Stage2Model) and `classifier` (fine-tuned VideoClassifier),
named by the training config's `job`. Weights files: our exports or the official layouts
(`.safetensors`, `.npz`, `.pth` with torch), read by the converters of `convert/official.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from internvideo2_jax.convert.io import resolve_weights  # noqa: F401 - part of this API

KINDS = {"train_stage2": "stage2", "evaluate": "stage2", "finetune": "classifier"}


@dataclasses.dataclass
class Loaded:
  kind: str                    # "stage2" | "classifier"
  config: Any                  # the whole job config (ConfigDict)
  model_config: Any            # the model's config
  model: Any                   # the Flax module (deterministic)
  params: Any                  # its parameters (host or device arrays)
  tokenizer: Any = None        # stage 2: the text tokenizer
  step: Optional[int] = None   # the checkpoint's step, when loaded from a workdir

  @property
  def num_frames(self) -> int:
    return int(self.model_config.vision.num_frames)

  @property
  def img_size(self) -> int:
    return int(self.model_config.vision.img_size)


def load_config(spec) -> ml_collections.ConfigDict:
  """A config: a ConfigDict (as is), a dict, or "configs/FILE.py[:args]" as on the command line."""
  if isinstance(spec, ml_collections.ConfigDict):
    return spec
  if isinstance(spec, dict):
    return ml_collections.ConfigDict(spec)
  path, _, arg = str(spec).partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  mod_spec = importlib.util.spec_from_file_location(f"_iv2_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _kind(config) -> str:
  job = config.get("job", "")
  if job not in KINDS:
    raise ValueError(f"config.job={job!r}: api.load knows the models of {sorted(KINDS)}")
  return KINDS[job]


def _model(config, kind: str):
  if kind == "stage2":
    from internvideo2_jax.data import text as text_lib
    from internvideo2_jax.models.stage2 import Stage2Model
    from internvideo2_jax.train.stage2 import build_model_config
    mcfg = build_model_config(config.model)
    tok = text_lib.load_tokenizer(config.data.load.get("tokenizer", ""))
    if mcfg.get("audio"):
      from internvideo2_jax.models.stage2_av import Stage2AVModel
      return mcfg, Stage2AVModel(mcfg), tok
    return mcfg, Stage2Model(mcfg), tok
  from internvideo2_jax.models.classifier import VideoClassifier
  from internvideo2_jax.train.finetune import build_model_config
  mcfg = build_model_config(config)
  return mcfg, VideoClassifier(mcfg), None


def load(path: str, *, config=None) -> Loaded:
  """A trained model from a workdir (its saved config and latest intact checkpoint; `config`
  overrides the saved one), or from weights (`config` required: the config file they fit, e.g.
  "configs/stage2.py:size=1B"): a file, a directory laid out like a Hugging Face repo, or a
  repo id such as `OpenGVLab/InternVideo2-Stage2_1B-224p-f4` (see resolve_weights)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _load_workdir(path, config)
  path = resolve_weights(path)
  if config is None:
    raise ValueError(f"{path}: a weights file needs the config it fits (config='configs/...py:size=...')")
  config = load_config(config)
  kind = _kind(config)
  mcfg, model, tok = _model(config, kind)
  from internvideo2_jax.convert.io import load_state_dict
  from internvideo2_jax.convert import official
  sd = load_state_dict(path)
  if kind == "stage2":
    convert = official.stage2_av_from_state_dict if mcfg.get("audio") else official.stage2_from_state_dict
    params = convert(sd, mcfg)["params"]
  else:
    params = official.classifier_from_state_dict(sd, mcfg)["params"]
  return Loaded(kind, config, mcfg, model, jax.tree.map(jnp.asarray, params), tok)


def _load_workdir(workdir: str, config) -> Loaded:
  from internvideo2_jax.parallel import mesh as mesh_lib
  from internvideo2_jax.train.checkpoint import Checkpointer
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ directory (a training run's workdir?)")
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
    config = load_config(config) if config is not None else _saved_config(ckpt.restore_config())
    kind = _kind(config)
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    if kind == "stage2":
      from internvideo2_jax.train import stage2 as stage
    else:
      from internvideo2_jax.train import finetune as stage
    with config.unlocked():
      config.data.batch_size = jax.device_count()  # the restore needs only the state's shapes
    parts = stage.step_parts(config, mesh)
    state, step = ckpt.restore(parts.abstract)
  finally:
    ckpt.close()
  mcfg, model, tok = _model(config, kind)
  return Loaded(kind, config, mcfg, model, state.params, tok, step)


def _saved_config(d: dict) -> ml_collections.ConfigDict:
  """The JSON config of a checkpoint as a ConfigDict (lists back to tuples, as the configs use)."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x
  return ml_collections.ConfigDict(fix(d))


def _batches(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  n = len(arrays[0])
  outs = []
  for s in range(0, n, batch_size):
    outs.append(np.asarray(fn(*[a[s:s + batch_size] for a in arrays])))
  return np.concatenate(outs)


def _check_clips(m: Loaded, videos) -> np.ndarray:
  videos = np.asarray(videos)
  want = (m.num_frames, m.img_size, m.img_size, 3)
  if videos.ndim != 5 or videos.shape[1:] != want or videos.dtype != np.uint8:
    raise ValueError(f"videos must be uint8 (N, {', '.join(map(str, want))}), got {videos.dtype} {videos.shape}; "
                     "decode and resize with internvideo2_jax.data (e.g. data.video.VideoFile + "
                     "data.transforms.test_transform)")
  return videos


def encode_videos(m: Loaded, videos, *, batch_size: int = 32) -> np.ndarray:
  """uint8 clips (N, T, H, W, 3) -> L2-normalised embeddings (N, D): the stage-2 model's
  `vision_proj` space, or a classifier's attention-pooled features."""
  from internvideo2_jax.data.transforms import normalize
  from internvideo2_jax.ops.losses import l2_normalize
  videos = _check_clips(m, videos)
  norm = m.config.data.get("norm", "imagenet")
  dtype = jnp.dtype(m.model_config.vision.get("dtype", "float32"))
  if m.kind == "stage2":
    method = type(m.model).encode_vision
    fn = jax.jit(lambda p, v: m.model.apply({"params": p}, normalize(v, norm, dtype), method=method)[1])
  else:
    from internvideo2_jax.models.vit import VisionEncoder
    enc = VisionEncoder(m.model_config.vision)
    p = m.params["vision_encoder"]
    fn = jax.jit(lambda _, v: enc.apply({"params": p}, normalize(v, norm, dtype))["pooled"])
  return np.asarray(l2_normalize(_batches(lambda v: fn(m.params, v), [videos], batch_size)))


def encode_texts(m: Loaded, texts: Sequence[str], *, max_len: Optional[int] = None) -> np.ndarray:
  """Captions -> L2-normalised embeddings (N, D) of a stage-2 model (the official `pre_text`
  cleaning and tokenizer)."""
  if m.kind != "stage2":
    raise ValueError("encode_texts needs a video-text (stage-2) model")
  from internvideo2_jax.data import text as text_lib
  from internvideo2_jax.ops.losses import l2_normalize
  max_len = int(max_len or m.config.eval.get("max_txt_l", 32))
  ids, mask = text_lib.tokenize(m.tokenizer, [text_lib.pre_text(t) for t in texts], max_len)
  method = type(m.model).encode_text
  fn = jax.jit(lambda p, i, k: m.model.apply({"params": p}, i, k, method=method)[1])
  return np.asarray(l2_normalize(_batches(lambda i, k: fn(m.params, i, k), [ids, mask], 256)))


def classify(m: Loaded, videos, *, batch_size: int = 32) -> np.ndarray:
  """A fine-tuned classifier's class probabilities (N, C) for uint8 clips (one view each)."""
  if m.kind != "classifier":
    raise ValueError("classify needs a fine-tuned classifier (configs/finetune.py)")
  from internvideo2_jax.data.transforms import normalize
  videos = _check_clips(m, videos)
  norm = m.config.data.get("norm", "imagenet")
  dtype = jnp.dtype(m.model_config.vision.get("dtype", "float32"))
  fn = jax.jit(lambda p, v: jax.nn.softmax(m.model.apply({"params": p}, normalize(v, norm, dtype)), axis=-1))
  return _batches(lambda v: fn(m.params, v), [videos], batch_size)


def metrics_history(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """A run's metrics.jsonl as {name: [(step, value), ...]} (for plots in a notebook)."""
  import json
  out: dict = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      for k, v in rec.items():
        if k not in ("step", "time"):
          out.setdefault(k, []).append((int(rec["step"]), float(v)))
  return out
