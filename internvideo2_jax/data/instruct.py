"""Stage-3 instruction data: VideoChat2 conversations tokenized for the LLM, with answer labels.

A record's `qa` list (VideoChat2-IT rows: {"video", "QA": [{"i", "q", "a"}, ...]}) becomes the
official Mistral prompt (Ask-Anything `dataset/it_dataset_mistral.py: process_qa`):

    {system}{i} [INST] <Video></Video>{msg} [/INST] [INST] {q1} [/INST] {a1} </s> [INST] {q2} ...

(`<Image></Image>` for images; no "[INST] {q} [/INST]" when q is empty, as in caption data; the
QA pairs are shuffled in training; `msg` is the optional " The video contains N frames sampled
at t1, t2, ... seconds. "). The model's visual tokens go between `<Video>` and `</Video>`:

    llm_ids    [BOS] tokens("...<Video>") [V visual slots] tokens("</Video>... </s>") [pad ...]
    llm_labels -100 everywhere except the answer tokens ("{a} </s>"), aligned with llm_ids
               (the loss shifts by one, as HF's causal-LM loss does)

as the official `VideoChat2_it_mistral.forward` builds it, with two deliberate differences:
* Position 0 holds the real BOS token. The official code writes the *id* into the embedding
  (`inputs_embeds[:, :1] = bos_token_id`, every feature = 1.0), which is a bug.
* Answer labels come from character offsets of the whole tokenized string, not from token
  counts of separately tokenized pieces: the official way asserts when a tokenizer splits
  differently at piece boundaries (the Mistral v0.3 tokenizer turns the space between
  `[/INST]` and `[INST]` into a token of its own, so the counts never add up).
Lengths are fixed for jit: `max_txt_l` text tokens + `visual_tokens` slots (the official
`min(longest + 1, max_txt_len + img_len)` with padding to the cap), truncated on the right.

The instruction (`i`, plus the first question with `question_instruction`) is also tokenized
for the QFormer with the BERT tokenizer, left-truncated and left-padded as the official code
(`init_tokenizer(truncation_side="left")`, `padding_side = "left"`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from internvideo2_jax.data import text as text_lib

IGNORE = -100                 # label of tokens without a loss (HF / official convention)
HUMAN_START, HUMAN_END, ASSIST_END = "[INST]", "[/INST]", "</s>"
MEDIA_TAGS = {"video": ("<Video>", "</Video>"), "image": ("<Image>", "</Image>")}
# The Mistral-7B-Instruct-v0.3 tokenizer (InternVideo2-Chat-8B's LLM), as shipped offline in
# the PyPI package mistral-common (installed with --no-deps by launch/setup.sh).
MISTRAL_V3 = "mistral_instruct_tokenizer_240323.model.v3"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InstructSpec:
  """How stage-3 examples are tokenized (config: data.instruct)."""
  tokenizer: str = ""             # LLM tokenizer directory; "" = Mistral-7B-Instruct-v0.3's
  max_txt_l: int = 512            # text tokens (BOS included) besides the visual slots (official)
  visual_tokens: int = 96         # slots the model fills (QFormer: 32 + 64 extra queries)
  system: str = ""                # official `system`, must end with a space when set
  shuffle_qa: bool = True         # official `random_shuffle` (training only)
  time_msg: bool = False          # official `add_second_msg`
  qformer_text: bool = True       # tokenize the instruction for the QFormer (BERT)
  question_instruction: bool = False  # official `return_question_instruction`
  instruction_l: int = 64         # QFormer text length (official: padding="longest")
  qformer_tokenizer: str = ""     # BERT directory; "" = the bundled bert-base-uncased vocab

  @property
  def length(self) -> int:
    return self.max_txt_l + self.visual_tokens

  def validate(self) -> "InstructSpec":
    if self.system and not self.system.endswith(" "):
      raise ValueError(f"data.instruct.system must end with a space (official rule), got {self.system!r}")
    if self.max_txt_l < 8 or self.visual_tokens < 1 or self.instruction_l < 2:
      raise ValueError(f"data.instruct: max_txt_l={self.max_txt_l} (>= 8), visual_tokens="
                       f"{self.visual_tokens} (>= 1), instruction_l={self.instruction_l} (>= 2)")
    return self


def _offline_mistral_dir() -> str:
  """A directory holding the Mistral v0.3 tokenizer as tokenizer.json, converted once from the
  sentencepiece model in mistral-common (conversion needs `sentencepiece`, ~3 s) and cached."""
  spec = importlib.util.find_spec("mistral_common")
  model = os.path.join(list(spec.submodule_search_locations)[0], "data", MISTRAL_V3) \
      if spec and spec.submodule_search_locations else ""
  if not model or not os.path.exists(model):
    raise FileNotFoundError("no LLM tokenizer given (data.instruct.tokenizer) and the offline one "
                            "is missing: pip install --no-deps mistral-common sentencepiece, or "
                            "point data.instruct.tokenizer at a local tokenizer directory")
  cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                       "internvideo2_jax", "tokenizers", "mistral_v3")
  if os.path.exists(os.path.join(cache, "tokenizer.json")):
    return cache
  from transformers import LlamaTokenizer
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(model, os.path.join(tmp, "tokenizer.model"))
    try:
      tok = LlamaTokenizer.from_pretrained(tmp)
    except ValueError as e:
      raise ImportError(f"converting {model} needs the `sentencepiece` package: {e}") from e
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(cache))
    tok.save_pretrained(staging)
    try:
      os.rename(staging, cache)   # atomic: concurrent workers never see a half-written cache
    except OSError:
      shutil.rmtree(staging, ignore_errors=True)  # another process won the race
  return cache


@functools.lru_cache(maxsize=4)
def load_llm_tokenizer(path: str = ""):
  """An LLM tokenizer from a local directory (tokenizer.json, or tokenizer.model with
  sentencepiece installed); "" = the offline Mistral-7B-Instruct-v0.3 tokenizer."""
  from transformers import AutoTokenizer
  path = path or _offline_mistral_dir()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"LLM tokenizer directory not found: {path}")
  try:
    tok = AutoTokenizer.from_pretrained(path)
  except (ValueError, OSError) as e:  # e.g. a bare tokenizer.model without sentencepiece
    raise ValueError(f"cannot load the LLM tokenizer in {path}: {e} (a directory with "
                     "tokenizer.json, or tokenizer.model with `sentencepiece` installed)") from e
  if len(tok) < 100 or tok.bos_token_id is None or tok.eos_token_id is None:
    raise ValueError(f"LLM tokenizer at {path}: {len(tok)} tokens, bos={tok.bos_token!r}, "
                     f"eos={tok.eos_token!r}; the vocabulary did not load (a tokenizer.model needs "
                     "`sentencepiece`)")
  return tok


def conversation(qa: list[dict], media: str, spec: InstructSpec, *, msg: str = "",
                 rng: Optional[np.random.Generator] = None) -> tuple[str, str, list[tuple[int, int]]]:
  """(prompt, instruction, answer character spans) of one row, with the official template.

  `rng` shuffles the QA pairs (training); the spans cover each "{a} </s>".
  """
  qa = [qa[j] for j in rng.permutation(len(qa))] if rng is not None and len(qa) > 1 else list(qa)
  start_tag, end_tag = MEDIA_TAGS[media]
  instruction = qa[0]["i"] + " " if qa[0]["i"] else ""
  text = spec.system + instruction
  text += f"{HUMAN_START} {start_tag}{end_tag}{msg.rstrip()} {HUMAN_END}"
  spans = []
  for turn in qa:
    if turn["q"]:
      text += f" {HUMAN_START} {turn['q']} {HUMAN_END}"
    begin = len(text) + 1
    text += f" {turn['a']} {ASSIST_END}"
    spans.append((begin, len(text)))
  if spec.question_instruction and instruction:
    instruction += qa[0]["q"]
  # The official prompt is `.strip()`ped; shift the spans by what the left strip removes.
  lead = len(text) - len(text.lstrip())
  return text.strip(), instruction.strip(), [(b - lead, e - lead) for b, e in spans]


def tokenize_prompt(tok, question: str, media: str, spec: InstructSpec, *, instruction: str = "",
                    msg: str = "", answer_prompt: str = "") -> np.ndarray:
  """Token ids of an inference prompt (no padding): [BOS] "{system}{i} [INST] <Video>" [V slots]
  "</Video>{msg} [/INST] [INST] {question} [/INST]" [" {answer_prompt}"], the training template
  up to where the answer starts. Visual slots hold id -1 (the model fills them)."""
  if not question.strip():
    raise ValueError("the question is empty")
  prompt, _, _ = conversation([{"i": instruction, "q": question, "a": ""}], media, spec, msg=msg)
  prompt = prompt[:prompt.rindex(HUMAN_END) + len(HUMAN_END)]
  if answer_prompt:
    prompt += " " + answer_prompt
  cut = prompt.find(MEDIA_TAGS[media][1])
  before = tok(prompt[:cut], add_special_tokens=False)["input_ids"]
  after = tok(prompt[cut:], add_special_tokens=False)["input_ids"]
  return np.asarray([tok.bos_token_id] + before + [-1] * spec.visual_tokens + after, np.int32)


def time_message(times: np.ndarray) -> str:
  """Official `add_second_msg` (frame times rounded to 0.1 s)."""
  secs = ", ".join(str(round(float(t), 1)) for t in times)
  return f" The video contains {len(times)} frames sampled at {secs} seconds. "


class BadConversation(ValueError):
  """The row cannot give a training example (no answer left after truncation, ...)."""


def tokenize_conversation(tok, prompt: str, media: str, spans, spec: InstructSpec) -> dict:
  """Fixed-length ids / attention mask / visual-slot mask / labels of one prompt."""
  end_tag = MEDIA_TAGS[media][1]
  cut = prompt.find(end_tag)
  if cut < 0:
    raise BadConversation(f"prompt has no {end_tag}")
  before = tok(prompt[:cut], add_special_tokens=False)["input_ids"]
  after = tok(prompt[cut:], add_special_tokens=False, return_offsets_mapping=True)
  target = np.zeros(len(after["input_ids"]), bool)
  for k, (s, e) in enumerate(after["offset_mapping"]):
    s, e = s + cut, e + cut
    target[k] = any(s < hi and e > lo for lo, hi in spans)  # token overlaps an answer
  n, v = spec.length, spec.visual_tokens
  if 1 + len(before) + v > n - 1:
    raise BadConversation(f"{1 + len(before)} tokens before the visual slots leave no room "
                          f"in max_txt_l={spec.max_txt_l}")
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # official
  ids = np.full(n, pad, np.int32)
  labels = np.full(n, IGNORE, np.int32)
  visual = np.zeros(n, bool)
  ids[0] = tok.bos_token_id
  ids[1:1 + len(before)] = before
  at = 1 + len(before)
  visual[at:at + v] = True
  at += v
  keep = min(len(after["input_ids"]), n - at)  # right truncation, as the official code
  ids[at:at + keep] = after["input_ids"][:keep]
  labels[at:at + keep] = np.where(target[:keep], ids[at:at + keep], IGNORE)
  if not (labels != IGNORE).any():
    raise BadConversation(f"no answer token within max_txt_l={spec.max_txt_l} "
                          f"({1 + len(before) + len(after['input_ids'])} text tokens)")
  mask = np.zeros(n, np.int32)
  mask[:at + keep] = 1
  return {"llm_ids": ids, "llm_mask": mask, "llm_visual": visual, "llm_labels": labels}


def tokenize_instruction(tok, instruction: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """BERT ids / mask of the QFormer instruction, left-truncated and left-padded (official)."""
  ids = tok(instruction, add_special_tokens=True)["input_ids"]
  if len(ids) > length:  # keep [CLS], drop from the left of the text
    ids = ids[:1] + ids[len(ids) - length + 1:]
  out = np.full(length, tok.pad_token_id, np.int32)
  mask = np.zeros(length, np.int32)
  out[length - len(ids):] = ids
  mask[length - len(ids):] = 1
  return out, mask


def instruct_example(rec: dict, spec: InstructSpec, times: np.ndarray,
                     rng: Optional[np.random.Generator], train: bool) -> dict:
  """The stage-3 text fields of one record (see the module docstring)."""
  if not rec.get("qa"):
    raise BadConversation("row has no 'QA' list (stage 3 needs instruction rows)")
  msg = time_message(times) if spec.time_msg and rec["media"] == "video" else ""
  prompt, instruction, spans = conversation(rec["qa"], rec["media"], spec, msg=msg,
                                            rng=rng if train and spec.shuffle_qa else None)
  out = tokenize_conversation(load_llm_tokenizer(spec.tokenizer), prompt, rec["media"], spans, spec)
  if spec.qformer_text:
    bert = text_lib.load_tokenizer(spec.qformer_tokenizer)
    out["instruction_ids"], out["instruction_mask"] = tokenize_instruction(bert, instruction,
                                                                           spec.instruction_l)
  return out


def decode_example(tok, ex: dict) -> tuple[str, str]:
  """(prompt with the visual slots shown as <V x N>, answer text): to eyeball examples."""
  ids, visual, labels = ex["llm_ids"], ex["llm_visual"].astype(bool), ex["llm_labels"]
  live = ex["llm_mask"].astype(bool)
  first = int(np.argmax(visual))
  head = tok.decode(ids[:first])
  tail = tok.decode(ids[first:][live[first:] & ~visual[first:]])
  answers = tok.decode(labels[labels != IGNORE])
  return f"{head}<V x {int(visual.sum())}>{tail}", answers


__all__ = ["IGNORE", "InstructSpec", "BadConversation", "conversation", "time_message",
           "tokenize_conversation", "tokenize_instruction", "tokenize_prompt", "instruct_example",
           "load_llm_tokenizer", "decode_example"]
