"""Synthetic corpus: coloured shapes moving on varied backgrounds, with a tone, as real mp4s.

Each clip shows one shape (circle, square, triangle, cross) of one colour moving left, right,
up or down, with one of several sounds (a low hum, a high beep, a rising or a falling chirp,
silence). Captions describe what is seen (`caption`, video-text training) and, in
`avs_captions`, also what is heard, so telling some captions apart needs temporal modelling
(direction) and some need the audio (sound). A few clips have no audio track at all.
Instruction rows (VideoChat2 format, `{split}_qa.json`) ask about colour, shape, motion and
sound, for stage 3.

    python -m internvideo2_jax.data.synthetic --out DIR [--train 400 --val 100 --images 100]

writes DIR/videos/*.mp4 (h264 + AAC), DIR/images/*.png, and official-format annotations
DIR/{train,val}.json, DIR/{train,val}_qa.json, DIR/train_images.json and the stage-1 CSV
DIR/train_stage1.csv.
Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import os
from fractions import Fraction
from typing import Optional

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 220, 40), "white": (235, 235, 235), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
# sound -> (caption phrase, start Hz, end Hz); the pitch follows the stated rule
SOUNDS = {"hum": ("a low hum", 220.0, 220.0), "beep": ("a high beep", 1760.0, 1760.0),
          "rising": ("a rising tone", 300.0, 1500.0), "falling": ("a falling tone", 1500.0, 300.0),
          "silent": ("no sound", 0.0, 0.0)}
SAMPLE_RATE = 16000


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dy, dx = y - cy, x - cx
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= r ** 2
  if shape == "square":
    return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
  if shape == "triangle":
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
  if shape == "cross":
    arm = r * 0.35
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
  raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render_clip(rng: np.random.Generator, num_frames: int, size: int, *, shape: str, colour: str,
                direction: str, radius=(0.12, 0.2)) -> np.ndarray:
  """uint8 (T, size, size, 3): the shape (radius a fraction of the frame) crosses the frame in
  `direction`."""
  r = size * rng.uniform(*radius)
  speed = max(size - 2 * r, 1.0) * rng.uniform(0.6, 0.9) / max(num_frames - 1, 1)
  dy, dx = DIRECTIONS[direction]
  lo, hi = r, size - r
  slack = max(hi - lo - speed * (num_frames - 1), 0.0)
  cy = rng.uniform(lo, hi) if dy == 0 else (lo + rng.uniform(0, slack) if dy > 0 else hi - rng.uniform(0, slack))
  cx = rng.uniform(lo, hi) if dx == 0 else (lo + rng.uniform(0, slack) if dx > 0 else hi - rng.uniform(0, slack))
  bg = rng.uniform(10, 90, size=3)
  rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-15, 15, size=3), 0, 255)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    img = bg + rng.normal(0, 12, size=(size, size, 3))
    img[_shape_mask(shape, size, cy + dy * speed * t, cx + dx * speed * t, r)] = rgb
    frames[t] = np.clip(img, 0, 255).astype(np.uint8)
  return frames


def render_tone(rng: np.random.Generator, sound: str, seconds: float) -> np.ndarray:
  """float32 mono waveform at 16 kHz; pitch constant, rising or falling (log scale)."""
  n = int(seconds * SAMPLE_RATE)
  _, f0, f1 = SOUNDS[sound]
  noise = rng.normal(0, 0.01, n)
  if f0 == 0:
    return noise.astype(np.float32)
  freq = f0 * (f1 / f0) ** np.linspace(0, 1, n)
  phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
  return (0.4 * np.sin(phase) + noise).astype(np.float32)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *,
              audio: Optional[np.ndarray] = None, sample_rate: int = SAMPLE_RATE,
              keyframe_interval: int = 8, bframes: bool = False) -> None:
  """Writes uint8 (T, H, W, 3) frames as h264 (yuv420p) mp4, with optional mono AAC audio.

  `path` may be a file-like object (e.g. io.BytesIO) as well as a path.
  """
  target = path if hasattr(path, "write") else os.fspath(path)
  t, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"h264/yuv420p needs even frame sizes, got {h}x{w}")
  with av.open(target, mode="w", format="mp4") as container:
    vs = container.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    vs.codec_context.gop_size = keyframe_interval
    opts = {"crf": "20", "preset": "veryfast"}
    if not bframes:
      opts["tune"] = "zerolatency"
    vs.options = opts
    a_stream = None
    if audio is not None:
      a_stream = container.add_stream("aac", rate=sample_rate)
      a_stream.layout = "mono"
    for i in range(t):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
      frame.pts, frame.time_base = i, Fraction(1, fps)
      for packet in vs.encode(frame):
        container.mux(packet)
    for packet in vs.encode():
      container.mux(packet)
    if a_stream is not None:
      samples = np.asarray(audio, np.float32).reshape(1, -1)
      af = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
      af.sample_rate = sample_rate
      for packet in a_stream.encode(af):
        container.mux(packet)
      for packet in a_stream.encode():
        container.mux(packet)


def write_png(path: str, image: np.ndarray) -> None:
  with av.open(path, mode="w", format="image2") as container:
    s = container.add_stream("png", rate=1)
    s.width, s.height, s.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
      container.mux(packet)
    for packet in s.encode():
      container.mux(packet)


def captions_for(shape: str, colour: str, direction: str, sound: str) -> dict:
  phrase = SOUNDS[sound][0]
  verb = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down"}[direction]
  seen = [f"a {colour} {shape} {verb}", f"the {colour} {shape} {verb} across the frame"]
  heard = [f"a {colour} {shape} {verb} with {phrase}", f"{phrase} while a {colour} {shape} {verb}"]
  return {"caption": seen[0], "captions": seen, "avs_captions": heard}


QA_INSTRUCTION = "Carefully watch the video and answer the question in a few words."


MC_INSTRUCTION = "Carefully watch the video and select the best option."
MC_QUESTION = "Which way does the shape move?"


def multiple_choice(question: str, options: list[str], answer: str) -> dict:
  """An MVBench-style multiple-choice turn: "Question: ...\nOptions:\n(A) ...\n...Only give
  the best option." answered "Best option:(X) ..." (the evaluation's answer prompt
  "Best option:(" followed by the letter, so training and evaluation share the format)."""
  letters = "ABCDEFGH"
  body = "".join(f"({letters[k]}) {o}\n" for k, o in enumerate(options))
  q = f"Question: {question}\nOptions:\n{body}Only give the best option."
  k = options.index(answer)
  return {"i": MC_INSTRUCTION, "q": q, "a": f"Best option:({letters[k]}) {answer}"}


def qa_for(shape: str, colour: str, direction: str, sound: str, mc: bool = True) -> list[dict]:
  """VideoChat2-style QA pairs about one clip ("none" sound = no audio track: not asked), and
  with `mc` an MVBench-style multiple-choice question on the direction. Its options come in one
  fixed order ((A) left (B) right (C) up (D) down): the letter still needs the motion seen
  (chance 25%) without asking a tiny LLM trained from scratch to read shuffled option lists
  (the demo's 3-layer LLM does not learn that in 10 minutes: 21-27% with shuffled options)."""
  verb = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down"}[direction]
  qa = [{"i": QA_INSTRUCTION, "q": "What colour is the shape?", "a": colour},
        {"i": QA_INSTRUCTION, "q": "What shape is in the video?", "a": f"a {shape}"},
        {"i": QA_INSTRUCTION, "q": "Which way does the shape move?", "a": f"it {verb}"},
        {"i": QA_INSTRUCTION, "q": "Describe the video.", "a": f"A {colour} {shape} {verb}."}]
  if sound != "none":
    qa.append({"i": QA_INSTRUCTION, "q": "What can be heard?", "a": SOUNDS[sound][0]})
  if mc:
    qa.append(multiple_choice(MC_QUESTION, list(DIRECTIONS), direction))
  return qa


def _split_rows(out: str):
  """(split, rows) of the clips' train.json / val.json that exist."""
  for split in ("train", "val"):
    src = os.path.join(out, f"{split}.json")
    if os.path.exists(src):
      with open(src) as f:
        yield split, json.load(f)


def write_qa(out: str) -> dict:
  """(Re)writes {split}_qa.json from the clips' {split}.json rows."""
  paths = {}
  for split, rows in _split_rows(out):
    qa_rows = [{"video": r["video"], "QA": qa_for(r["shape"], r["colour"], r["direction"], r["sound"])}
               for r in rows]
    paths[f"{split}_qa"] = os.path.join(out, f"{split}_qa.json")
    with open(paths[f"{split}_qa"], "w") as f:
      json.dump(qa_rows, f, indent=0)
  return paths


LABEL_TASKS = {"direction": tuple(DIRECTIONS), "shape": SHAPES, "colour": tuple(COLOURS)}


def write_label_lists(out: str) -> dict:
  """(Re)writes classification lists in the official fine-tuning format from the clips'
  {split}.json rows: classes_{task}.txt (one class name per line, line i = class i) and
  {split}_{task}.txt (`videos/x.mp4 <class index>` lines) for the tasks direction (4 classes),
  shape (4) and colour."""
  paths = {}
  for task, classes in LABEL_TASKS.items():
    paths[f"classes_{task}"] = os.path.join(out, f"classes_{task}.txt")
    with open(paths[f"classes_{task}"], "w") as f:
      f.write("\n".join(classes) + "\n")
    for split, rows in _split_rows(out):
      paths[f"{split}_{task}"] = os.path.join(out, f"{split}_{task}.txt")
      with open(paths[f"{split}_{task}"], "w") as f:
        f.write("".join(f"{r['video']} {classes.index(r[task])}\n" for r in rows))
  return paths


def write_corpus(out: str, *, train: int = 400, val: int = 100, images: int = 0, seed: int = 0,
                 num_frames: int = 16, size: int = 64, fps: int = 8, no_audio_every: int = 10,
                 radius=(0.12, 0.2), val_av: int = 0) -> dict:
  """Writes the corpus; returns {split: annotation path}.

  `val_av` > 0 also writes `val_av.json`: val_av // 2 visual combinations, each shown twice
  with two different sounds, so its `avs_captions` can only be told apart by the audio.
  """
  os.makedirs(os.path.join(out, "videos"), exist_ok=True)
  rng = np.random.default_rng(seed)
  colours, dirs, sounds = list(COLOURS), list(DIRECTIONS), list(SOUNDS)
  paths = {}
  csv_rows = []
  # Held-out clips cycle through every (shape, colour, direction) combination in a shuffled
  # order, so a gallery of up to 96 clips has one clip per visual caption (R@1 can reach 100%).
  combos = [(sh, co, di) for sh in SHAPES for co in colours for di in dirs]
  val_order = [combos[j] for j in rng.permutation(len(combos))]
  for split, n in (("train", train), ("val", val)):
    rows = []
    for i in range(n):
      if split == "val":
        shape, colour, direction = val_order[i % len(val_order)]
      else:
        shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]
        direction = dirs[rng.integers(len(dirs))]
      sound = sounds[rng.integers(len(sounds))]
      rel = f"videos/{split}_{i:05d}.mp4"
      frames = render_clip(rng, num_frames, size, shape=shape, colour=colour, direction=direction,
                           radius=radius)
      has_track = no_audio_every <= 0 or i % no_audio_every != no_audio_every - 1
      wave = render_tone(rng, sound, num_frames / fps) if has_track else None
      write_mp4(os.path.join(out, rel), frames, fps, audio=wave)
      row = {"video": rel, **captions_for(shape, colour, direction, sound),
             "shape": shape, "colour": colour, "direction": direction,
             "sound": sound if has_track else "none", "label": dirs.index(direction)}
      rows.append(row)
      if split == "train":
        csv_rows.append(f"synthetic {rel} {num_frames / fps:.3f} 0.0 {num_frames / fps:.3f} {row['label']}")
    paths[split] = os.path.join(out, f"{split}.json")
    with open(paths[split], "w") as f:
      json.dump(rows, f, indent=0)
  paths.update(write_qa(out))
  paths.update(write_label_lists(out))
  if val_av:
    rows = []
    audible = [k for k in SOUNDS if k != "silent"]
    for i in range(val_av // 2):
      shape, colour, direction = val_order[i % len(val_order)]
      for j, sound in enumerate(rng.choice(audible, size=2, replace=False)):
        rel = f"videos/val_av_{i:05d}_{j}.mp4"
        frames = render_clip(rng, num_frames, size, shape=shape, colour=colour, direction=direction,
                             radius=radius)
        write_mp4(os.path.join(out, rel), frames, fps, audio=render_tone(rng, str(sound), num_frames / fps))
        rows.append({"video": rel, **captions_for(shape, colour, direction, str(sound)),
                     "sound_caption": SOUNDS[str(sound)][0], "shape": shape, "colour": colour,
                     "direction": direction, "sound": str(sound)})
    paths["val_av"] = os.path.join(out, "val_av.json")
    with open(paths["val_av"], "w") as f:
      json.dump(rows, f, indent=0)
  if images:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rows = []
    for i in range(images):
      shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]
      rel = f"images/{i:05d}.png"
      img = render_clip(rng, 1, size, shape=shape, colour=colour, direction="left")[0]
      write_png(os.path.join(out, rel), img)
      rows.append({"image": rel, "caption": f"a {colour} {shape}", "shape": shape, "colour": colour})
    paths["train_images"] = os.path.join(out, "train_images.json")
    with open(paths["train_images"], "w") as f:
      json.dump(rows, f, indent=0)
  paths["train_stage1"] = os.path.join(out, "train_stage1.csv")
  with open(paths["train_stage1"], "w") as f:
    f.write("\n".join(csv_rows) + "\n")
  return paths


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--train", type=int, default=400)
  p.add_argument("--val", type=int, default=100)
  p.add_argument("--images", type=int, default=0)
  p.add_argument("--val_av", type=int, default=0, help="clips of the audio-pairs split (val_av.json)")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--fps", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  paths = write_corpus(a.out, train=a.train, val=a.val, images=a.images, seed=a.seed,
                       num_frames=a.frames, size=a.size, fps=a.fps, val_av=a.val_av)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  main()
