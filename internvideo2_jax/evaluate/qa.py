"""Video question answering with the stage-3 model: the chat engine, multiple-choice accuracy
(MVBench protocol) and free-form exact match on official-format QA JSON.

`Chat` turns (video, question) pairs into answers: the clip goes through ViT -> LN -> QFormer
-> project_up once, its tokens fill the visual slots of the official prompt
(`{i} [INST] <Video>[slots]</Video>{msg} [/INST] [INST] {q} [/INST]`, the training template
up to the answer), and `models.generate.Generator` decodes with the KV cache (prefill + one
step program, tokens streamable). Inputs are replicated global arrays and outputs are read
on every process, so the same code runs on one host or many (every process must call it).

Evaluation rows are VideoChat2 / MVBench JSON: {"video", "QA": [{"i", "q", "a"}, ...]}. A
question with an "Options:" block (answer "(X) ...") is multiple choice: the prompt ends with
the answer prompt "Best option:(" and the first generated letter is compared with X; other
questions are scored by exact match of the normalised answer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import string
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from internvideo2_jax.data import instruct as instruct_lib, sources, text as text_lib
from internvideo2_jax.data.loader import LoadSpec, SkipExample, load_example
from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.generate import Generator
from internvideo2_jax.models.llm import LLM
from internvideo2_jax.models.videochat import VideoChat
from internvideo2_jax.parallel import sharding

log = logging.getLogger(__name__)

ANSWER_PROMPT = "Best option:("      # MVBench
_LETTER = re.compile(r"\(([A-Z])\)")


def is_multiple_choice(question: str) -> bool:
  return "Options:" in question


def normalise_answer(text: str) -> str:
  text = text.replace("</s>", "").lower().strip()
  text = text.translate(str.maketrans("", "", string.punctuation))
  return " ".join(text.split())


def choice_letter(text: str) -> str:
  """The option letter of a reference answer "(B) up" or of a continuation "B) up"."""
  m = _LETTER.search(text)
  if m:
    return m.group(1)
  text = text.strip()
  return text[0] if text and text[0] in string.ascii_uppercase else ""


class Chat:
  """Answers questions about clips with a VideoChat model and its (sharded) params."""

  def __init__(self, config, params, mesh, *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0):
    self.config, self.params, self.mesh = config, params, mesh
    self.model = VideoChat(config.model, deterministic=True)
    self.spec = instruct_lib.InstructSpec(**{k: v for k, v in dict(config.data.instruct).items()})
    self.tok = instruct_lib.load_llm_tokenizer(self.spec.tokenizer)
    self.bert = text_lib.load_tokenizer(self.spec.qformer_tokenizer) if self.spec.qformer_text else None
    self.repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    norm, vdtype = config.data.get("norm", "imagenet"), jnp.dtype(config.model.vision.dtype)
    model = self.model

    def embed(p, video, ids, slots, iids, imask):
      return model.apply({"params": p}, normalize(video, norm, vdtype), ids, slots, iids, imask,
                         method=VideoChat.embed_prompt)

    self._embed = jax.jit(embed)
    self.generator = Generator(LLM(config.model.llm, deterministic=True), max_new_tokens,
                               temperature=temperature, top_p=top_p, eos_id=self.tok.eos_token_id,
                               pad_id=self.tok.eos_token_id)

  def load_spec(self) -> LoadSpec:
    v = self.config.model.vision
    grid = tuple(self.config.data.get("load", {}).get("hd_grid", ()) or ())
    return LoadSpec(num_frames=v.num_frames, size=v.img_size, patch_size=v.patch_size,
                    tubelet_size=v.tubelet_size, text=False, train=False, crop="squash", sample="middle",
                    flip=False, hd_grid=grid)

  def prompts(self, questions: Sequence[str], instructions: Sequence[str], answer_prompt: str = "",
              clips: int = 1):
    """Left-padded (ids, mask, slots) of the prompts; the slots hold the pad id."""
    q = self.config.model.qformer
    spec = dataclasses.replace(self.spec, visual_tokens=clips * (int(q.num_query_tokens) + int(q.extra_query_tokens)))
    rows = [instruct_lib.tokenize_prompt(self.tok, q, "video", spec, instruction=i,
                                         answer_prompt=answer_prompt)
            for q, i in zip(questions, instructions)]
    n = max(len(r) for r in rows)
    limit = int(self.config.model.llm.max_position_embeddings) - self.generator.max_new
    if n > limit:
      raise ValueError(f"a prompt of {n} tokens leaves no room for {self.generator.max_new} new tokens in the "
                       f"LLM context of {self.config.model.llm.max_position_embeddings}")
    pad = self.tok.eos_token_id
    ids = np.full((len(rows), n), pad, np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    slots = np.zeros((len(rows), n), bool)
    for j, r in enumerate(rows):
      ids[j, n - len(r):] = np.where(r < 0, pad, r)
      mask[j, n - len(r):] = 1
      slots[j, n - len(r):] = r < 0
    return ids, mask, slots

  def answer(self, videos: np.ndarray, questions: Sequence[str], instructions: Optional[Sequence[str]] = None,
             *, answer_prompt: str = "", on_token: Optional[Callable[[np.ndarray], None]] = None) -> list[str]:
    """videos (B, T, S, S, 3) uint8, or (B, clips, T, S, S, 3) with HD tiles, -> the B
    generated answers (text, without </s>)."""
    instructions = list(instructions or [""] * len(questions))
    ids, mask, slots = self.prompts(questions, instructions, answer_prompt,
                                    clips=videos.shape[1] if videos.ndim == 6 else 1)
    b = len(questions)
    if self.bert is not None:
      pairs = [instruct_lib.tokenize_instruction(self.bert, i + (" " + q if self.spec.question_instruction else ""),
                                                 self.spec.instruction_l) for i, q in zip(instructions, questions)]
      iids, imask = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    else:
      iids = imask = None
    put = lambda x: None if x is None else sharding.global_from_host(np.asarray(x), self.repl)  # noqa: E731
    embeds = self._embed(self.params, put(videos), put(ids), put(slots), put(iids), put(imask))
    tokens = self.generator(self.params["lm"], embeds=embeds, mask=put(mask), on_token=on_token)
    out = []
    for j in range(b):
      row = [t for t in tokens[j].tolist()]
      if self.tok.eos_token_id in row:
        row = row[:row.index(self.tok.eos_token_id)]
      out.append(self.tok.decode(row, skip_special_tokens=True).strip())
    return out


def qa_rows(path: str, data_root: str = "", limit: int = 0,
            refused: Optional[collections.Counter] = None) -> list[dict]:
  """Records with a usable QA list from an official-format JSON file (others are refused and
  counted per reason in `refused`)."""
  corpus = sources.open_corpus({"format": "json", "path": path, "data_root": data_root},
                               skipped=refused, uses=("qa",))
  return [corpus[i] for i in range(len(corpus) if not limit else min(limit, len(corpus)))]


def evaluate_qa(config, params, mesh) -> dict:
  """Multiple-choice accuracy and free-form exact match (%) over every QA pair of eval.qa.path."""
  ec = config.eval
  chat = Chat(config, params, mesh, max_new_tokens=int(ec.get("max_new_tokens", 16)))
  spec = chat.load_spec()
  refused, reasons = collections.Counter(), collections.Counter()
  rows = qa_rows(ec.qa.path, ec.qa.get("data_root", ""), int(ec.qa.get("limit", 0)), refused)
  items, skipped = [], 0
  for i, rec in enumerate(rows):
    try:
      video = load_example(rec, spec, np.random.default_rng(i))["video"]
    except SkipExample as e:
      log.warning("QA set: skipping %s", e)
      skipped += 1
      reasons[e.reason] += 1
      continue
    for turn in rec["qa"]:
      items.append((video, turn))
  bs = int(ec.get("batch_size", 16))
  stats = {"mc": [0, 0], "open": [0, 0]}
  per_question: dict[str, list[int]] = {}
  examples = []
  for kind in ("mc", "open"):
    group = [(v, t) for v, t in items if is_multiple_choice(t["q"]) == (kind == "mc")]
    for s in range(0, len(group), bs):
      chunk = group[s:s + bs]
      answers = chat.answer(np.stack([v for v, _ in chunk]), [t["q"] for _, t in chunk], [t["i"] for _, t in chunk],
                            answer_prompt=ANSWER_PROMPT if kind == "mc" else "")
      for (_, t), a in zip(chunk, answers):
        ok = (choice_letter(a) == choice_letter(t["a"])) if kind == "mc" else (
            normalise_answer(a) == normalise_answer(t["a"]))
        stats[kind][0] += int(ok)
        stats[kind][1] += 1
        key = t["q"].split("\n")[0]
        per_question.setdefault(key, [0, 0])
        per_question[key][0] += int(ok)
        per_question[key][1] += 1
        if len(examples) < 6:
          examples.append({"question": t["q"].split("\n")[0], "reference": t["a"], "answer": a})
  out = {"qa_videos": len(rows) - skipped, "qa_skipped": skipped,
         "data": {"items": len(rows) - skipped, "refused_at_parse": dict(refused), "skipped": dict(reasons)}}
  if stats["mc"][1]:
    out["mc_accuracy"] = 100.0 * stats["mc"][0] / stats["mc"][1]
    out["mc_questions"] = stats["mc"][1]
  if stats["open"][1]:
    out["open_exact_match"] = 100.0 * stats["open"][0] / stats["open"][1]
    out["open_questions"] = stats["open"][1]
  # (a list, not a dict: the metric writer logs only the scalars above)
  out["per_question"] = [(k, 100.0 * c / n, n) for k, (c, n) in per_question.items()]
  out["examples"] = examples
  return out


def format_results(r: dict) -> str:
  lines = []
  if "mc_accuracy" in r:
    lines.append(f"multiple choice: {r['mc_accuracy']:.1f}% of {r['mc_questions']} questions")
  if "open_exact_match" in r:
    lines.append(f"free-form exact match: {r['open_exact_match']:.1f}% of {r['open_questions']} questions")
  for q, acc, n in r.get("per_question", []):
    lines.append(f"  {acc:5.1f}% of {n:3d}  {q}")
  for ex in r.get("examples", []):
    lines.append(f"  Q: {ex['question']}  A: {ex['answer']!r}  (reference {ex['reference']!r})")
  return "\n".join(lines)


def save_json(results: dict, path: str) -> None:
  from etils import epath
  epath.Path(path).write_text(json.dumps(results, indent=2))
