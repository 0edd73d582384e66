"""The `chat` job and the stage-3 `evaluate` task `qa`.

  iv2 --config=configs/stage3.py --config.job=chat --workdir=runs/chat_demo \
      --config.chat.video=clip.mp4 --config.chat.question="Which way does the shape move?"
  ... --config.chat.interactive=True      (questions from stdin, one per line; empty line ends)
  iv2 --config=configs/stage3.py --config.job=evaluate --workdir=runs/chat_demo   (eval.qa.path)

Weights: the latest checkpoint of `chat.checkpoint_dir` / `eval.checkpoint_dir` (default
WORKDIR/checkpoints), else the pretrained parts the config names (`model.init` in the
official InternVideo2-Chat layout, or vision_init / qformer_init / llm_init), streamed into
their shards. The clip is read as the official chat demo does: 8 (the config's frame count)
segment-centre frames, bicubic resize of the shorter side and a centre crop.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from internvideo2_jax.data.transforms import chat_transform, hd_clips
from internvideo2_jax.data.video import VideoFile, VideoReadError, frame_indices
from internvideo2_jax.evaluate import qa as qa_lib
from internvideo2_jax.parallel import distributed, mesh as mesh_lib


def read_clip(path: str, num_frames: int, size: int, hd_num: int = 0, grid=()) -> np.ndarray:
  """(T, size, size, 3) uint8 frames of a video file, or with `hd_num` the HD tiles
  (clips, T, size, size, 3) on the video's grid (or `grid`); a ValueError names a bad file."""
  if not os.path.exists(path):
    raise ValueError(f"chat.video={path}: no such file")
  try:
    with VideoFile(path) as v:
      frames = v.read(frame_indices(num_frames, v.num_frames(), "chat"))
  except (VideoReadError, ValueError) as e:
    raise ValueError(f"chat.video={path}: cannot be read as a video ({e})") from e
  if hd_num:
    return hd_clips(frames, size, hd_num, grid=tuple(grid) or None)
  return chat_transform(frames, size)


def load_params(config, workdir: str, mesh, checkpoint_dir: str = ""):
  """The stage-3 params, sharded over the mesh (see the module docstring)."""
  from internvideo2_jax.parallel import sharding
  from internvideo2_jax.train import stage3
  from internvideo2_jax.train.checkpoint import Checkpointer, resolve_dir
  import flax.linen as nn
  parts = stage3.step_parts(config, mesh)
  ckpt_dir = resolve_dir(checkpoint_dir or os.path.join(workdir, "checkpoints"))
  if os.path.isdir(ckpt_dir) or "://" in ckpt_dir:
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
      if ckpt.latest_step() is not None:
        state, step = ckpt.restore(parts.abstract)
        print(f"restored step {step} from {ckpt_dir}", flush=True)
        return state.params
    finally:
      ckpt.close()
  if not any(config.model.get(k) for k in ("init", "vision_init", "qformer_init", "llm_init")):
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir} and no pretrained weights in the config "
                            "(model.init / vision_init / qformer_init / llm_init)")
  params, _ = sharding.init_sharded(parts.init_fn, mesh, parts.rules)
  placer = sharding.Placer(parts.abstract.params)
  for line in stage3.load_weights(config, placer):
    print(f"loaded the {line}", flush=True)
  return placer.merge(nn.unbox(params)["params"])


def run(config, workdir: str) -> None:
  """The chat job."""
  cc = config.chat
  stage_check(config)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  v = config.model.vision
  grid = tuple(config.data.get("load", {}).get("hd_grid", ()) or ())
  clip = read_clip(cc.video, int(v.num_frames), int(v.img_size), int(config.model.get("hd_num", 0)),
                   grid) if cc.video else None
  if clip is None:
    raise ValueError("set config.chat.video to the clip to talk about")
  if not cc.interactive and not cc.question.strip():
    raise ValueError("config.chat.question is empty (or set config.chat.interactive=True)")
  if cc.interactive and jax.process_count() > 1:
    raise ValueError("interactive chat reads stdin on one host; run it with one process")
  params = load_params(config, workdir, mesh, cc.get("checkpoint_dir", ""))
  chat = qa_lib.Chat(config, params, mesh, max_new_tokens=int(cc.max_new_tokens),
                     temperature=float(cc.temperature), top_p=float(cc.top_p))
  questions = [cc.question] if not cc.interactive else None
  while True:
    if questions is None:
      sys.stdout.write("you> ")
      sys.stdout.flush()
      line = sys.stdin.readline()
      if not line.strip():
        return
      q = line.strip()
    else:
      if not questions:
        return
      q = questions.pop(0)
    say(chat, clip, q, cc.get("instruction", ""))


def say(chat: "qa_lib.Chat", clip: np.ndarray, question: str, instruction: str = "") -> str:
  """Answers one question, printing the tokens as they come (process 0)."""
  shown, ids = [""], []
  main = distributed.is_main()

  def on_token(tok):
    ids.append(int(tok[0]))
    text = chat.tok.decode([i for i in ids if i != chat.tok.eos_token_id], skip_special_tokens=True)
    if main and len(text) > len(shown[0]):
      sys.stdout.write(text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text

  if main:
    sys.stdout.write("model> ")
  answer = chat.answer(clip[None], [question], [instruction], on_token=on_token)[0]
  if main:
    sys.stdout.write("\n")
    sys.stdout.flush()
  return answer


def stage_check(config) -> None:
  if not config.get("chat") or not config.model.get("llm"):
    raise ValueError("the chat job needs a stage-3 config (configs/stage3.py)")


def run_qa(config, workdir: str) -> dict:
  """The `evaluate` job's `qa` task: results to WORKDIR/eval_qa.json."""
  stage_check(config)
  if not config.eval.qa.get("path"):
    raise ValueError("set config.eval.qa.path (and data_root) to official-format QA JSON")
  distributed.make_dirs(workdir)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  params = load_params(config, workdir, mesh, config.eval.get("checkpoint_dir", ""))
  results = qa_lib.evaluate_qa(config, params, mesh)
  if distributed.is_main():
    print(qa_lib.format_results(results))
    qa_lib.save_json(results, os.path.join(workdir, "eval_qa.json"))
  return results
