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

Training and the other jobs run in-process through `train` (the `iv2` command line calls it too):

    run = api.train("configs/stage2.py:size=demo", "runs/nb", {"train.total_steps": 300})
    run.results["itc"]["t2v_r1"], run.history["train/loss"]  # final results, metrics over steps
    m = run.load()
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from internvideo2_jax.convert.io import resolve_weights  # noqa: F401 - part of this API

KINDS = {"train_stage2": "stage2", "evaluate": "stage2", "finetune": "classifier"}

# job name -> module with `run(config, workdir)`; imported lazily so a job pulls in only its deps.
JOBS = {
    "features": "internvideo2_jax.evaluate.features",
    "inspect_data": "internvideo2_jax.data.inspect",
    "train_stage2": "internvideo2_jax.train.stage2",
    "evaluate": "internvideo2_jax.evaluate.run",
    "train_stage1": "internvideo2_jax.train.stage1",
    "train_stage3": "internvideo2_jax.train.stage3",
    "chat": "internvideo2_jax.evaluate.chat",
    "cache_targets": "internvideo2_jax.train.cache_targets",
    "compile": "internvideo2_jax.train.compile",
    "finetune": "internvideo2_jax.train.finetune",
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  if not os.path.exists(path) and os.path.exists(os.path.join(_REPO, path)):
    path = os.path.join(_REPO, path)  # "configs/..." from a notebook's directory too
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  mod_spec = importlib.util.spec_from_file_location(f"_iv2_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a config file defines get_config(arg) (as the files in configs/ do)")
  return module.get_config(arg or None)


def override(config, overrides: Optional[dict]) -> ml_collections.ConfigDict:
  """Sets dotted keys ({"train.total_steps": 300, "model.vision.depth": 2}) as `--config.x=y`
  does; an unknown key is refused with the closest known ones."""
  for key, value in (overrides or {}).items():
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        known = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
        near = difflib.get_close_matches(part, known, n=3)
        where = ".".join(parts[:i]) or "the config"
        raise KeyError(f"unknown config key {key!r}: {where} has no {part!r}"
                       + (f" (did you mean {', '.join(near)}?)" if near else ""))
      if i == len(parts) - 1:
        try:
          node[part] = value
        except TypeError as e:  # ml_collections keeps each field's type
          raise TypeError(f"config key {key!r}: {value!r} does not fit ({e})") from None
      else:
        node = node[part]
  return config


@dataclasses.dataclass
class Run:
  """What `train` returns: the job's results (as in its eval_*.json / run.json) and the run's
  metrics over steps (metrics.jsonl, as `metrics_history`)."""
  workdir: str
  config: Any
  results: dict

  @property
  def history(self) -> dict:
    path = os.path.join(self.workdir, "metrics.jsonl")
    return metrics_history(self.workdir) if os.path.exists(path) else {}

  def load(self) -> "Loaded":
    return load(self.workdir)


def train(config, workdir: str, overrides: Optional[dict] = None) -> Run:
  """Runs the job `config.job` names (training stage 1/2/3, fine-tuning, evaluation, ...) in this
  process, exactly as `iv2 --config=... --workdir=...` does (the command line calls this), and
  returns its results and metrics history. `config`: a ConfigDict or "configs/FILE.py[:args]".
  A run already in `workdir` resumes from its latest checkpoint (a finished one reports again)."""
  config = override(load_config(config), overrides)
  job = config.get("job")
  if job not in JOBS:
    raise ValueError(f"config.job={job!r} is not a known job; known: {sorted(JOBS)}")
  setup_logging()
  start_runtime(config, job)
  results = importlib.import_module(JOBS[job]).run(config, workdir) or {}
  from internvideo2_jax.parallel import distributed
  # Process 0 may still be writing exports and results long after the others are done; jax's
  # shutdown barrier allows only `distributed.timeout_s`, this one an hour.
  distributed.sync("job finished")
  return Run(workdir, config, results)


class _PlainFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    msg = super().format(record)
    return msg if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {msg}"


def setup_logging() -> None:
  """Our modules report at INFO in plain lines; libraries (orbax, jax backend probing) only
  warnings, also those that log through absl (its `I1202 12:00:00 file:line]` lines)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  ours = logging.getLogger("internvideo2_jax")
  ours.setLevel(logging.INFO)
  ours.propagate = False
  if not any(isinstance(h.formatter, _PlainFormatter) for h in ours.handlers):  # once per process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    ours.addHandler(handler)


def start_runtime(config, job: str) -> None:
  """Before any device use: fake devices for `compile`, the multi-host start, the compilation
  cache; then only process 0 prints (the others keep warnings and errors on stderr)."""
  from internvideo2_jax.parallel import distributed
  if job == "compile":
    n = int(config.compile.get("devices", 0))
    if n and not config.compile.get("topology"):
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", n)
    where = "single process (compile job)"
  else:
    where = distributed.initialize(config.get("distributed"))
  cache = config.get("runtime", {}).get("compilation_cache_dir", "auto")
  if cache == "auto":
    cache = (os.path.expanduser("~/.cache/internvideo2_jax/jax_cache")
             if jax.default_backend() in ("gpu", "tpu") else "")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  if jax.process_count() > 1:
    if jax.process_index() != 0:
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
      logging.getLogger("internvideo2_jax").setLevel(logging.WARNING)
    print(f"multi-host: {where}", flush=True)


def _one_process(what: str) -> None:
  """The load / encode helpers hold a model in one process (a notebook, a script); a multi-host
  job evaluates through the jobs (evaluate, features), which gather their results explicitly."""
  if jax.process_count() > 1:
    raise RuntimeError(f"api.{what} runs in one process, this is process {jax.process_index()} of "
                       f"{jax.process_count()}: use the evaluate or features job (--config.job=...) in "
                       "multi-host runs")


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
  _one_process("load")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return _load_workdir(path, config)
  path = resolve_weights(path)
  if config is None:
    raise ValueError(f"{path}: a weights file needs the config it fits (config='configs/...py:size=...')")
  config = load_config(config)
  kind = _kind(config)
  mcfg, model, tok = _model(config, kind)
  from internvideo2_jax.convert import official
  from internvideo2_jax.convert.io import load_state_dict
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
    # a copy: the restore below sets its batch size, the caller's config stays as it was
    config = copy.deepcopy(load_config(config)) if config is not None else _saved_config(ckpt.restore_config())
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
  if n == 0:
    raise ValueError("nothing to encode: the input is empty")
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


def _normalizer(m: Loaded):
  """uint8 clips -> the model's input (the run's pixel normalisation, its compute dtype)."""
  from internvideo2_jax.data.transforms import normalize
  norm = m.config.data.get("norm", "imagenet")
  dtype = jnp.dtype(m.model_config.vision.get("dtype", "float32"))
  return lambda v: normalize(v, norm, dtype)


def encode_videos(m: Loaded, videos, *, batch_size: int = 32) -> np.ndarray:
  """uint8 clips (N, T, H, W, 3) -> L2-normalised embeddings (N, D): the stage-2 model's
  `vision_proj` space, or a classifier's attention-pooled features."""
  from internvideo2_jax.ops.losses import l2_normalize
  videos, prep = _check_clips(m, videos), _normalizer(m)
  if m.kind == "stage2":
    method = type(m.model).encode_vision
    fn = jax.jit(lambda p, v: m.model.apply({"params": p}, prep(v), method=method)[1])
  else:
    pooled = _vision_output(m, "pooled")
    fn = jax.jit(lambda p, v: pooled(p, prep(v)))
  return np.asarray(l2_normalize(_batches(lambda v: fn(m.params, v), [videos], batch_size)))


def encode_texts(m: Loaded, texts: Sequence[str], *, max_len: Optional[int] = None) -> np.ndarray:
  """Captions -> L2-normalised embeddings (N, D) of a stage-2 model (the official `pre_text`
  cleaning and tokenizer)."""
  if m.kind != "stage2":
    raise ValueError("encode_texts needs a video-text (stage-2) model")
  if len(texts) == 0:
    raise ValueError("nothing to encode: the input is empty")
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
  videos, prep = _check_clips(m, videos), _normalizer(m)
  fn = jax.jit(lambda p, v: jax.nn.softmax(m.model.apply({"params": p}, prep(v)), axis=-1))
  return _batches(lambda v: fn(m.params, v), [videos], batch_size)


def _vision_output(m: Loaded, key: str):
  """A jitted fn (params, normalised video) -> the vision encoder's output `key`."""
  from internvideo2_jax.models.vit import VisionEncoder
  if m.kind == "stage2":
    return jax.jit(lambda p, v: m.model.apply({"params": p}, v, method=lambda mod, x: mod.vision_encoder(x)[key]))
  enc = VisionEncoder(m.model_config.vision)
  return jax.jit(lambda p, v: enc.apply({"params": p["vision_encoder"]}, v)[key])


def pool_attention(m: Loaded, videos, *, batch_size: int = 32) -> np.ndarray:
  """Where the attention pooling looks: its weights over the patch tokens (heads averaged, the
  class token's share left out) as (N, T / tubelet, H / patch, W / patch) maps, token order
  time-major as the official patch embedding. Each map sums to 1 - the class token's weight."""
  videos, prep = _check_clips(m, videos), _normalizer(m)
  v = m.model_config.vision
  if not v.get("attn_pool", True):
    raise ValueError("pool_attention: this model's vision encoder has no attention pooling (attn_pool=False)")
  grid = (v.num_frames // v.tubelet_size, v.img_size // v.patch_size, v.img_size // v.patch_size)
  fn = _vision_output(m, "pool_attn")
  attn = _batches(lambda x: fn(m.params, prep(x)), [videos], batch_size)
  return attn[:, 1:].reshape(len(videos), *grid)


def zero_shot(m: Loaded, videos, class_names: Sequence[str], *, templates: Sequence[str] = ("{}",),
              batch_size: int = 32) -> np.ndarray:
  """Zero-shot classification with a stage-2 model: (N, C) video-prompt similarities, averaged
  over `templates` (e.g. evaluate.classification.TEMPLATES, the official ActionCLIP prompts)."""
  from internvideo2_jax.evaluate.classification import prompt_similarity
  if not class_names or not templates or any("{}" not in t for t in templates):
    raise ValueError(f"zero_shot needs class names and templates with a '{{}}' for the name; got "
                     f"{len(class_names)} classes, templates {tuple(templates)!r}")
  feats = encode_videos(m, videos, batch_size=batch_size)
  prompts = encode_texts(m, [t.format(c) for c in class_names for t in templates])
  return prompt_similarity(feats, prompts, len(class_names))


def heldout(m: Loaded, *, limit: Optional[int] = None):
  """The held-out retrieval set of a stage-2 model's run (its `eval.corpus`, or the synthetic
  corpus's val.json it trained on), decoded with the test transform: an
  evaluate.retrieval.RetrievalSet (videos uint8 (N, T, H, W, 3), texts, txt2vid, keys)."""
  from internvideo2_jax.data.loader import LoadSpec
  from internvideo2_jax.evaluate import retrieval
  from internvideo2_jax.evaluate.run import eval_set
  if m.kind != "stage2":
    raise ValueError("heldout: the held-out retrieval set belongs to a video-text (stage-2) run")
  v = m.model_config.vision
  spec = LoadSpec(num_frames=v.num_frames, size=v.img_size, patch_size=v.patch_size, tubelet_size=v.tubelet_size)
  corpus = eval_set(m.config, m.config.to_dict())
  return retrieval.load_retrieval_set(corpus, spec, caption_field=m.config.eval.get("caption_field", "captions"),
                                      limit=limit)


def metrics_history(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """A run's metrics.jsonl as {name: [(step, value), ...]} (for plots in a notebook)."""
  from internvideo2_jax.train.metrics import read_history
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no metrics (is {workdir} a training run's workdir?)")
  return read_history(path)
