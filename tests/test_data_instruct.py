"""Stage-3 instruction data: the official VideoChat2 Mistral template, answer labels, visual
slots, truncation, the QFormer instruction, row validation, and the Grain pipeline end to end
with the real Mistral-7B-Instruct-v0.3 tokenizer (offline, from mistral-common)."""

import collections
import json
import os

import ml_collections
import numpy as np
import pytest

from internvideo2_jax.data import instruct as I, pack, pipeline as P, sources, synthetic, text as text_lib
from internvideo2_jax.data.accounting import DataReport
from internvideo2_jax.models.vit import vit_preset

QA = [{"i": "Answer briefly.", "q": "What colour is it?", "a": "red"},
      {"i": "", "q": "Which way does it move?", "a": "it moves left"}]
SPEC = I.InstructSpec(max_txt_l=128, visual_tokens=6)


@pytest.fixture(scope="module")
def tok():
  return I.load_llm_tokenizer("")


def test_official_template():
  prompt, instruction, spans = I.conversation(QA, "video", I.InstructSpec(system="You are helpful. "),
                                              msg=" The video contains 2 frames sampled at 0.0, 0.5 seconds. ")
  assert prompt == ("You are helpful. Answer briefly. [INST] <Video></Video> The video contains 2 frames "
                    "sampled at 0.0, 0.5 seconds. [/INST] [INST] What colour is it? [/INST] red </s> "
                    "[INST] Which way does it move? [/INST] it moves left </s>")
  assert instruction == "Answer briefly."
  assert [prompt[b:e] for b, e in spans] == ["red </s>", "it moves left </s>"]
  # Caption rows (empty q) have no question turn; images use <Image> tags; the first
  # question joins the instruction with question_instruction.
  prompt, instruction, spans = I.conversation([{"i": "", "q": "", "a": "a red circle"}], "image", SPEC)
  assert prompt == "[INST] <Image></Image> [/INST] a red circle </s>" and instruction == ""
  assert [prompt[b:e] for b, e in spans] == ["a red circle </s>"]
  _, instruction, _ = I.conversation(QA, "video", I.InstructSpec(question_instruction=True))
  assert instruction == "Answer briefly. What colour is it?"
  assert I.time_message(np.array([0.0, 0.26, 1.04])) == \
      " The video contains 3 frames sampled at 0.0, 0.3, 1.0 seconds. "
  with pytest.raises(ValueError, match="end with a space"):
    I.InstructSpec(system="no trailing space").validate()


def test_shuffle_is_per_rng_and_only_in_training():
  qa = [{"i": "", "q": f"q{k}", "a": f"a{k}"} for k in range(6)]
  order = lambda p: [int(w[1]) for w in p.split() if w.startswith("q")]  # noqa: E731
  a = order(I.conversation(qa, "video", SPEC, rng=np.random.default_rng(1))[0])
  b = order(I.conversation(qa, "video", SPEC, rng=np.random.default_rng(1))[0])
  c = order(I.conversation(qa, "video", SPEC, rng=np.random.default_rng(2))[0])
  assert a == b and sorted(a) == list(range(6)) and a != c
  assert order(I.conversation(qa, "video", SPEC)[0]) == list(range(6))


def test_tokens_labels_and_visual_slots(tok):
  prompt, _, spans = I.conversation(QA, "video", SPEC)
  ex = I.tokenize_conversation(tok, prompt, "video", spans, SPEC)
  ids, labels, visual, mask = ex["llm_ids"], ex["llm_labels"], ex["llm_visual"], ex["llm_mask"]
  n = SPEC.max_txt_l + SPEC.visual_tokens
  assert all(v.shape == (n,) for v in ex.values())
  assert ids[0] == tok.bos_token_id and visual.sum() == SPEC.visual_tokens
  cut = prompt.index("</Video>")
  # Token ids are the official ones: the text before/after the visual slots tokenized whole.
  before = tok(prompt[:cut], add_special_tokens=False)["input_ids"]
  after = tok(prompt[cut:], add_special_tokens=False)["input_ids"]
  assert tok.convert_ids_to_tokens(before[-3:]) == ["▁<", "Video", ">"]
  first = int(np.argmax(visual))
  assert first == 1 + len(before) and visual[first:first + SPEC.visual_tokens].all()
  live = mask.astype(bool)
  np.testing.assert_array_equal(ids[live & ~visual], [tok.bos_token_id] + before + after)
  assert mask.sum() == 1 + len(before) + SPEC.visual_tokens + len(after)
  assert (labels[~live] == I.IGNORE).all() and (labels[visual] == I.IGNORE).all()
  # The labelled tokens are exactly the answers with their </s>, in order.
  target = labels[labels != I.IGNORE]
  assert tok.decode(target) == "red </s> it moves left </s>"
  assert (target == tok.eos_token_id).sum() == 2
  np.testing.assert_array_equal(target, ids[labels != I.IGNORE])
  prompt_text, answers = I.decode_example(tok, ex)
  assert "<V x 6></Video>" in prompt_text and answers == "red </s> it moves left </s>"


def _official_targets(tok, p_after):
  """The official label rule (token counts of separately tokenized pieces), transcribed."""
  n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
  ids = np.array(tok(p_after, add_special_tokens=False)["input_ids"])
  targets = ids.copy()
  sep1, sep2 = "[INST] ", " [/INST] "
  raw = p_after.split(sep2)
  raw = [r + sep2 for r in raw[:-1]] + raw[-1:]
  cur = n(raw[0].rstrip())
  targets[:cur] = I.IGNORE
  for text in raw[1:-1]:
    total, ans = n(text.rstrip()), n(text.split(sep1)[0].rstrip())
    targets[cur + ans:cur + total] = I.IGNORE
    cur += total
  cur += n(raw[-1].rstrip())
  return targets, cur == len(ids)


def test_labels_agree_with_the_official_rule_where_it_holds(tok):
  # A caption row: the official piece counts add up, and the labels are identical.
  prompt, _, spans = I.conversation([{"i": "", "q": "", "a": "a red circle moves left"}], "video", SPEC)
  ex = I.tokenize_conversation(tok, prompt, "video", spans, SPEC)
  cut = prompt.index("</Video>")
  official, consistent = _official_targets(tok, prompt[cut:])
  assert consistent
  after = ex["llm_labels"][1 + len(tok(prompt[:cut], add_special_tokens=False)["input_ids"]) + SPEC.visual_tokens:]
  np.testing.assert_array_equal(after[:len(official)], official)
  # With question turns the Mistral v0.3 tokenizer makes the space between [/INST] and [INST]
  # a token of its own, so the official counts do not add up (it asserts); offsets still work.
  prompt, _, _ = I.conversation(QA, "video", SPEC)
  _, consistent = _official_targets(tok, prompt[prompt.index("</Video>"):])
  assert not consistent


def test_truncation_keeps_the_start_and_drops_unanswerable_rows(tok):
  prompt, _, spans = I.conversation(QA, "video", SPEC)
  full = I.tokenize_conversation(tok, prompt, "video", spans, SPEC)
  n_text = int(full["llm_mask"].sum()) - SPEC.visual_tokens
  short = I.InstructSpec(max_txt_l=n_text - 4, visual_tokens=6)  # cuts into the second answer
  ex = I.tokenize_conversation(tok, prompt, "video", spans, short)
  assert ex["llm_mask"].all() and len(ex["llm_ids"]) == n_text - 4 + 6
  np.testing.assert_array_equal(ex["llm_ids"], full["llm_ids"][:len(ex["llm_ids"])])
  assert tok.decode(ex["llm_labels"][ex["llm_labels"] != I.IGNORE]).startswith("red </s> it")
  first_answer = int(np.argmax(full["llm_labels"] != I.IGNORE))
  with pytest.raises(I.BadConversation, match="no answer token"):
    I.tokenize_conversation(tok, prompt, "video", spans,
                            I.InstructSpec(max_txt_l=first_answer - 6, visual_tokens=6))
  with pytest.raises(I.BadConversation, match="no room"):
    I.tokenize_conversation(tok, "x " * 40 + "[INST] <Video></Video> [/INST] a </s>", "video",
                            [(0, 1)], I.InstructSpec(max_txt_l=24, visual_tokens=6))


def test_qformer_instruction_is_left_truncated_and_left_padded():
  bert = text_lib.load_tokenizer("")
  ids, mask = I.tokenize_instruction(bert, "watch the video", 8)
  assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
  assert bert.decode(ids[mask == 1]) == "[CLS] watch the video [SEP]"
  ids, mask = I.tokenize_instruction(bert, "one two three four five six seven eight", 6)
  assert mask.all() and bert.decode(ids) == "[CLS] five six seven eight [SEP]"


def test_converted_tokenizer_matches_sentencepiece(tok):
  import sentencepiece as spm
  import mistral_common
  sp = spm.SentencePieceProcessor(model_file=os.path.join(
      os.path.dirname(mistral_common.__file__), "data", I.MISTRAL_V3))
  # (Runs of spaces are where HF's BPE conversions of sentencepiece models differ; the
  # official code tokenizes with HF's tokenizer too, so those are left out.)
  for s in ["What colour is the shape?", "A yellow triangle moves up across the frame.",
            "Ünïcode, 1234 and ½ spaces", "it moves left"]:
    assert tok(s, add_special_tokens=False)["input_ids"] == sp.encode(s)
  assert tok.convert_ids_to_tokens([1, 2, 3, 4]) == ["<s>", "</s>", "[INST]", "[/INST]"]


def test_bad_tokenizer_paths_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    I.load_llm_tokenizer(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty"):
    I.load_llm_tokenizer(str(tmp_path / "empty"))


def test_qa_rows_are_validated(tmp_path):
  rows = [{"video": "a.mp4", "QA": QA, "start": 1.5, "end": 3.0},
          {"video": "b.mp4", "QA": []},
          {"video": "c.mp4", "QA": [{"q": "why?"}]},
          {"video": "d.mp4", "QA": [{"q": 3, "a": "x"}]},
          {"video": "e.mp4", "QA": QA, "start": 4, "end": 2}]
  path = tmp_path / "qa.json"
  path.write_text(json.dumps(rows))
  skipped = collections.Counter()
  recs = sources.load_json(str(path), data_root="/data", skipped=skipped)
  assert [r["key"] for r in recs] == ["/data/a.mp4"]
  assert skipped == {"bad_caption": 3, "bad_annotation": 1}  # the QA lists; the clip window
  assert recs[0]["qa"][0] == QA[0] and (recs[0]["start_time"], recs[0]["end_time"]) == (1.5, 3.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic_qa"))
  return root, synthetic.write_corpus(root, train=12, val=0, num_frames=16, size=48)


def _cfg(corpora, **instruct):
  return ml_collections.ConfigDict({
      "batch_size": 4, "seed": 0, "num_workers": 0, "corpora": corpora,
      "instruct": {"max_txt_l": 160, "visual_tokens": 8, "time_msg": True, **instruct}})


def test_stage3_pipeline_end_to_end(corpus, tok, tmp_path):
  root, paths = corpus
  model = vit_preset("tiny", num_frames=8)
  # One row of the corpus is a plain caption row: stage 3 replaces it and counts it.
  rows = json.load(open(paths["train_qa"]))
  rows[3] = {"video": rows[3]["video"], "caption": "no QA here"}
  bad = os.path.join(root, "mixed_qa.json")
  json.dump(rows, open(bad, "w"))
  corpora = ({"format": "json", "path": bad, "data_root": root},)
  report = DataReport()
  it = iter(P.make_pipeline(_cfg(corpora), model, stage="stage3", report=report))
  batches = [next(it) for _ in range(3)]
  b = batches[0]
  m = 160 + 8
  shapes = {k: v.shape for k, v in b.items()}
  assert shapes["video"] == (4, 8, 32, 32, 3) and shapes["llm_ids"] == shapes["llm_labels"] == (4, m)
  assert shapes["instruction_ids"] == (4, 64) and "text_ids" not in b
  assert set(b) <= set(P.BATCH_SPEC)
  assert (b["llm_visual"].sum(1) == 8).all() and (b["llm_ids"][:, 0] == tok.bos_token_id).all()
  # the caption row is refused when the annotations are parsed, named by its file and row
  assert report.corpora[bad] == {"usable": 11, "dropped": {"bad_caption": 1}}
  assert sum(np.asarray(x["skipped"]).sum() for x in batches) == 0
  for i in range(4):
    text, answers = I.decode_example(tok, {k: v[i] for k, v in b.items()})
    assert "frames sampled at" in text and answers.endswith("</s>")
    assert text.startswith(("<s> " + synthetic.QA_INSTRUCTION, "<s> " + synthetic.MC_INSTRUCTION))
  # Deterministic for the seed (shuffled QA order included); evaluation keeps the row order.
  again = next(iter(P.make_pipeline(_cfg(corpora), model, stage="stage3")))
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  ev = next(iter(P.make_pipeline(_cfg(corpora), model, stage="stage3", train=False)))
  text, _ = I.decode_example(tok, {k: v[0] for k, v in ev.items()})
  assert text.index("What colour") < text.index("What shape")
  with pytest.raises(ValueError, match="unknown data.instruct keys"):
    P.make_pipeline(_cfg(corpora, max_len=3), model, stage="stage3")
  misplaced = _cfg(corpora)
  misplaced.load = {"instruct": {"max_txt_l": 64}}
  with pytest.raises(ValueError, match="data.instruct, not data.load"):
    P.make_pipeline(misplaced, model, stage="stage3")
  # Packed shards keep the QA rows: the same examples as from JSON.
  js = sources.open_corpus({"format": "json", "path": paths["train_qa"], "data_root": root})
  pack.write_shards(sources.iter_records([js]), str(tmp_path / "qa"), 2)
  ar = sources.open_corpus({"format": "array_record", "path": str(tmp_path / "qa")})
  assert sorted(ar[i]["key"] for i in range(len(ar))) == sorted(r["key"] for r in js.records)
  assert {ar[i]["key"]: ar[i]["qa"] for i in range(len(ar))} == {r["key"]: r["qa"] for r in js.records}
