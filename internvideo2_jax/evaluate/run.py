"""The `evaluate` job: zero-shot retrieval or classification of a stage-2 model on a corpus,
results to WORKDIR/eval_<task>.json.

Weights come from `config.eval.weights` (an official-layout stage-2 checkpoint: .pth with torch,
.safetensors, .npz, e.g. our export or the released InternVideo2-stage2 files) or else from the
latest Orbax checkpoint in `config.eval.checkpoint_dir` (default WORKDIR/checkpoints).

  iv2 --config=configs/stage2.py:size=1B --config.job=evaluate --workdir=runs/eval \
      --config.eval.weights=/ckpt/InternVideo2-stage2_1b-224p-f4.pt \
      --config.eval.corpus.path=/data/msrvtt/test.json --config.eval.corpus.data_root=/data/msrvtt
  ... --config.eval.task=classification  (rows {"video": ..., "caption": class name})

Audio-visual models (`configs/stage2.py:...,av`): `retrieval` reports text to video / audio /
audio-video (ITC and re-ranking by itm / atm / avtm); `audio_retrieval` and
`audio_classification` read only the audio of each row (`"audio"` file or the video's track;
rows may be audio-only, `{"audio": "x.wav", "caption": ...}`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from internvideo2_jax.convert.io import load_state_dict
from internvideo2_jax.convert.official import stage2_av_from_state_dict, stage2_from_state_dict
from internvideo2_jax.data import text as text_lib
from internvideo2_jax.data.loader import LoadSpec
from internvideo2_jax.evaluate import classification, retrieval
from internvideo2_jax.models.stage2 import Stage2Model
from internvideo2_jax.ops.losses import l2_normalize
from internvideo2_jax.parallel import mesh as mesh_lib


def load_params(config, mcfg, workdir: str, mesh):
  """Weights from an official-layout file (host numpy, the same on every process) or from the
  latest Orbax checkpoint, restored straight into the mesh's shardings (any process count).
  Returns (params, the training run's config as a dict, or None for a weights file)."""
  if config.eval.get("weights"):
    sd = load_state_dict(config.eval.weights)
    convert = stage2_av_from_state_dict if mcfg.get("audio") else stage2_from_state_dict
    return convert(sd, mcfg, checkpoint_num_frames=config.eval.get("weights_num_frames"))["params"], None
  from internvideo2_jax.train import stage2
  from internvideo2_jax.train.checkpoint import Checkpointer, CheckpointRestoreError, resolve_dir
  ckpt_dir = resolve_dir(config.eval.get("checkpoint_dir") or os.path.join(workdir, "checkpoints"))
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; set eval.weights or eval.checkpoint_dir")
    abstract = stage2.step_parts(config, mesh, mcfg).abstract
    try:
      state, step = ckpt.restore(abstract)
    except CheckpointRestoreError as e:  # most often: the run trained another model
      raise CheckpointRestoreError(f"{e} If the run was trained with another model, pass its --config "
                                   "(and size) to the evaluate job.") from e
    run_config = ckpt.restore_config(step)
  finally:
    ckpt.close()
  print(f"restored step {step} from {ckpt_dir}")
  return state.params, run_config


def eval_set(config, run_config: Optional[dict]) -> dict:
  """The annotations to evaluate on: `eval.corpus` when it names a file, else the held-out set
  of the training run whose checkpoint is evaluated (its `eval.corpus`, or the synthetic
  corpus's `val.json` it trained on), else this config's synthetic corpus."""
  from internvideo2_jax.train import corpus as corpus_lib
  if config.eval.corpus.get("path"):
    return config.eval.corpus.to_dict()
  if run_config:
    saved = run_config.get("eval", {}).get("corpus", {})
    root = run_config.get("data", {}).get("synthetic_dir")
    if saved.get("path"):
      print(f"evaluating on the run's held-out set {saved['path']}", flush=True)
      return saved
    if root:
      print(f"evaluating on the run's held-out set {root}/val.json (synthetic)", flush=True)
      return dict(format="json", path=os.path.join(root, "val.json"), data_root=root)
  found = corpus_lib.eval_corpus(config)
  if found is None:
    raise ValueError("no evaluation set: set config.eval.corpus.path (and data_root) to the evaluation "
                     "annotations")
  return found


TASKS = ("retrieval", "classification", "audio_retrieval", "audio_classification", "qa")


def _labels(texts: list[str], txt2item: np.ndarray, n: int) -> tuple[list[str], np.ndarray]:
  """Class names (sorted unique captions) and each item's label (its first caption)."""
  names = sorted(set(texts))
  first = [texts[np.flatnonzero(txt2item == i)[0]] for i in range(n)]
  return names, np.asarray([names.index(c) for c in first])


def run(config, workdir: str) -> dict:
  from internvideo2_jax.parallel import distributed
  from internvideo2_jax.train.stage2 import build_model_config
  task = config.eval.get("task", "retrieval")
  if task == "qa":  # stage 3
    from internvideo2_jax.evaluate import chat
    return chat.run_qa(config, workdir)
  distributed.make_dirs(workdir)
  if task not in TASKS:
    raise ValueError(f"unknown eval.task {task!r}; one of {TASKS}")
  mcfg = build_model_config(config.model)
  av = bool(mcfg.get("audio"))
  if task.startswith("audio") and not av:
    raise ValueError(f"eval.task={task} needs an audio-visual model (configs/stage2.py:<size>,av)")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  params, run_config = load_params(config, mcfg, workdir, mesh)
  v = mcfg.vision
  seconds = float(config.data.load.get("audio_seconds", 10.0))
  spec = LoadSpec(num_frames=v.num_frames, size=v.img_size, patch_size=v.patch_size,
                  tubelet_size=v.tubelet_size, audio=av and task == "retrieval", audio_seconds=seconds)
  corpus = eval_set(config, run_config)
  tok = text_lib.load_tokenizer(config.data.load.get("tokenizer", ""))
  if av:
    from internvideo2_jax.models.stage2_av import Stage2AVModel
    enc = retrieval.AVEncoder(Stage2AVModel(mcfg), params, mesh, batch_size=int(config.eval.batch_size),
                              norm=config.data.get("norm", "imagenet"))
  else:
    enc = retrieval.Encoder(Stage2Model(mcfg), params, mesh, batch_size=int(config.eval.batch_size),
                            norm=config.data.get("norm", "imagenet"))
  kw = dict(tokenizer=tok, max_txt_l=int(config.eval.max_txt_l))
  caption_field = config.eval.get("caption_field", "captions")
  if task == "retrieval":
    rset = retrieval.load_retrieval_set(corpus, spec, caption_field=caption_field)
    evaluate = retrieval.evaluate_av_retrieval if av else retrieval.evaluate_retrieval
    res = evaluate(enc, rset, k_test=int(config.eval.k_test), **kw)
    print(retrieval.format_table(res))
  elif task == "classification":
    rset = retrieval.load_retrieval_set(corpus, spec, caption_field=config.eval.get("class_field", "captions"))
    names, labels = _labels(rset.texts, rset.txt2vid, len(rset.videos))
    res = classification.zero_shot_classify(enc, rset.videos, labels, names, **kw)
    print(f"zero-shot classification over {len(names)} classes: top-1 {res['top1']:.1f}%  top-5 {res['top5']:.1f}%")
  else:
    rset = retrieval.load_audio_set(corpus, audio_seconds=seconds, caption_field=caption_field
                                    if task == "audio_retrieval" else config.eval.get("class_field", "captions"))
    if task == "audio_retrieval":
      res = retrieval.evaluate_audio_retrieval(enc, rset, k_test=int(config.eval.k_test), **kw)
      print(retrieval.format_table(res))
    else:
      names, labels = _labels(rset.texts, rset.txt2aud, len(rset.audio))
      _, feats = enc.audios(rset.audio)
      feats = np.asarray(l2_normalize(feats))
      res = classification.classify_features(enc, feats, labels, names,
                                             templates=classification.AUDIO_TEMPLATES, **kw)
      print(f"zero-shot audio classification over {len(names)} classes: top-1 {res['top1']:.1f}%  "
            f"top-5 {res['top5']:.1f}%")
  res["skipped"], res["data"] = rset.skipped, rset.data
  path = os.path.join(workdir, f"eval_{task}.json")
  if jax.process_index() == 0:
    retrieval.save_json(res, path)
  print(f"results: {path}")
  return res
