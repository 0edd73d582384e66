"""The `evaluate` job: zero-shot retrieval or classification of a stage-2 model on a corpus,
results to WORKDIR/eval_<task>.json.

Weights come from `config.eval.weights` (an official-layout stage-2 checkpoint: .pth with torch,
.safetensors, .npz, e.g. our export or the released InternVideo2-stage2 files) or else from the
latest Orbax checkpoint in `config.eval.checkpoint_dir` (default WORKDIR/checkpoints).

  iv2 --config=configs/stage2.py:size=1B --config.job=evaluate --workdir=runs/eval \
      --config.eval.weights=/ckpt/InternVideo2-stage2_1b-224p-f4.pt \
      --config.eval.corpus.path=/data/msrvtt/test.json --config.eval.corpus.data_root=/data/msrvtt
  ... --config.eval.task=classification  (rows {"video": ..., "caption": class name})
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from internvideo2_jax.convert.io import load_state_dict
from internvideo2_jax.convert.official import stage2_from_state_dict
from internvideo2_jax.data import sources, text as text_lib
from internvideo2_jax.data.loader import LoadSpec
from internvideo2_jax.evaluate import classification, retrieval
from internvideo2_jax.models.stage2 import Stage2Model
from internvideo2_jax.parallel import mesh as mesh_lib


def load_params(config, mcfg, workdir: str):
  if config.eval.get("weights"):
    sd = load_state_dict(config.eval.weights)
    return stage2_from_state_dict(sd, mcfg, checkpoint_num_frames=config.eval.get("weights_num_frames"))["params"]
  ckpt_dir = os.path.abspath(config.eval.get("checkpoint_dir") or os.path.join(workdir, "checkpoints"))
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; set eval.weights or eval.checkpoint_dir")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  print(f"restored step {step} from {ckpt_dir}")
  return jax.tree.map(np.asarray, restored["state"]["params"])


def run(config, workdir: str) -> dict:
  from internvideo2_jax.train.stage2 import build_model_config
  os.makedirs(workdir, exist_ok=True)
  mcfg = build_model_config(config.model)
  params = load_params(config, mcfg, workdir)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  v = mcfg.vision
  spec = LoadSpec(num_frames=v.num_frames, size=v.img_size, patch_size=v.patch_size,
                  tubelet_size=v.tubelet_size)
  corpus = config.eval.corpus.to_dict()
  if not corpus.get("path"):
    raise ValueError("set config.eval.corpus.path (and data_root) to the evaluation annotations")
  tok = text_lib.load_tokenizer(config.data.load.get("tokenizer", ""))
  enc = retrieval.Encoder(Stage2Model(mcfg), params, mesh, batch_size=int(config.eval.batch_size),
                          norm=config.data.get("norm", "imagenet"))
  task = config.eval.get("task", "retrieval")
  if task == "retrieval":
    rset = retrieval.load_retrieval_set(corpus, spec, caption_field=config.eval.get("caption_field", "captions"))
    res = retrieval.evaluate_retrieval(enc, rset, tokenizer=tok, max_txt_l=int(config.eval.max_txt_l),
                                       k_test=int(config.eval.k_test))
    print(retrieval.format_table(res))
  elif task == "classification":
    rset = retrieval.load_retrieval_set(corpus, spec, caption_field="captions")
    names = sorted(set(rset.texts))
    first = [rset.texts[np.flatnonzero(rset.txt2vid == i)[0]] for i in range(len(rset.videos))]
    labels = np.asarray([names.index(c) for c in first])
    res = classification.zero_shot_classify(enc, rset.videos, labels, names, tokenizer=tok,
                                            max_txt_l=int(config.eval.max_txt_l))
    print(f"zero-shot classification over {len(names)} classes: top-1 {res['top1']:.1f}%  top-5 {res['top5']:.1f}%")
  else:
    raise ValueError(f"unknown eval.task {task!r} (retrieval or classification)")
  res["skipped_videos"] = rset.skipped
  path = os.path.join(workdir, f"eval_{task}.json")
  retrieval.save_json(res, path)
  print(f"results: {path}")
  return res
