"""Stage 3: the loss on answer tokens only, a tiny run that resumes exactly and exports in the
InternVideo2-Chat layout, the chat command on a generated clip, the 7B step's compile."""

import io
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage3 as stage3_config
from internvideo2_jax.convert.io import load_state_dict
from internvideo2_jax.convert.videochat import videochat_from_state_dict, videochat_to_state_dict
from internvideo2_jax.data import synthetic
from internvideo2_jax.models.videochat import VideoChat, next_token_loss, splice_visual
from internvideo2_jax.train import stage3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("s3"))
  synthetic.write_corpus(root, train=16, val=4, num_frames=16, size=32)
  return root


def _cfg(root, **train):
  c = stage3_config.get_config("size=tiny")
  c.mesh.data, c.mesh.fsdp = 1, 8  # FSDP over all 8 devices
  c.data.corpora = ({"format": "json", "path": os.path.join(root, "train_qa.json"), "data_root": root},)
  c.train.update(train)
  return c


def test_loss_counts_answer_tokens_only_and_the_label_gather_changes_nothing():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 7, 11)), jnp.float32)
  labels = jnp.asarray([[-100, -100, 3, 4, -100, -100, -100], [-100, -100, -100, -100, 5, 6, 2]])
  total, count = next_token_loss(logits, labels)
  logp = jax.nn.log_softmax(logits)
  manual = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[1, 3, 5] + logp[1, 4, 6] + logp[1, 5, 2])
  assert int(count) == 5 and float(total) == pytest.approx(float(manual), rel=1e-6)
  pos, valid = stage3.label_positions(labels, 4)
  np.testing.assert_array_equal(pos[0, :2], [1, 2]) and np.testing.assert_array_equal(valid[0], [1, 1, 0, 0])
  np.testing.assert_array_equal(pos[1, :3], [3, 4, 5])
  # the visual tokens fill the marked slots in order
  emb = jnp.zeros((1, 5, 2))
  vis = jnp.asarray([[[1.0, 1.0], [2.0, 2.0]]])
  out = splice_visual(emb, vis, jnp.asarray([[False, True, True, False, False]]))
  np.testing.assert_array_equal(out[0, :, 0], [0, 1, 2, 0, 0])


def test_tiny_stage3_resumes_exactly_evaluates_exports_and_chats(corpus, tmp_path, capsys):
  root = corpus
  whole = _cfg(root)
  whole.eval.qa.path, whole.eval.qa.data_root = os.path.join(root, "val_qa.json"), root
  res = stage3.run(whole, str(tmp_path / "whole"))
  assert res["step"] == 4 and res["mc_questions"] == 4 and res["open_questions"] > 10
  assert 0.0 <= res["mc_accuracy"] <= 100.0
  # stopped after step 2 (a planned stop), then resumed: the same weights as uninterrupted
  part = _cfg(root, stop_at_step=2)
  assert stage3.run(part, str(tmp_path / "part"))["preempted_at"] == 2
  stage3.run(_cfg(root), str(tmp_path / "part"))
  a = load_state_dict(str(tmp_path / "whole" / "export" / "stage3_official_layout.safetensors"))
  b = load_state_dict(str(tmp_path / "part" / "export" / "stage3_official_layout.safetensors"))
  assert set(a) == set(b) and any(".lora_A.default.weight" in k for k in a)
  assert "lm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # the official layout reads back into the same params (LoRA adapters included)
  mc = whole.model
  params = videochat_from_state_dict(a, mc)
  again = videochat_to_state_dict(params, mc)
  for k in a:
    np.testing.assert_array_equal(again[k], a[k], err_msg=k)
  # the merged HF export loads with the LoRA-free config and gives the LoRA model's logits
  from internvideo2_jax.convert.llm import load_hf_llm
  from internvideo2_jax.models.llm import LLM
  hf_cfg = dict(mc.llm.to_dict(), lora_rank=0)
  merged = load_hf_llm(str(tmp_path / "whole" / "export" / "llm_hf"), hf_cfg)
  ids = jnp.asarray([[1, 5, 9, 200, 3000]])
  lora_logits = LLM(mc.llm).apply({"params": params["lm"]}, ids)[0]
  np.testing.assert_allclose(LLM(hf_cfg).apply({"params": merged}, ids)[0], lora_logits, atol=1e-4)

  # the chat command on a generated clip, from the run's checkpoint
  from internvideo2_jax.evaluate import chat
  c = _cfg(root)
  clip = json.load(open(os.path.join(root, "val_qa.json")))[0]["video"]
  c.chat.video, c.chat.question, c.chat.max_new_tokens = os.path.join(root, clip), "What colour is the shape?", 5
  capsys.readouterr()
  chat.run(c, str(tmp_path / "whole"))
  out = capsys.readouterr().out
  assert "restored step 4" in out and "model> " in out
  c.chat.interactive = True
  sys.stdin = io.StringIO("Which way does the shape move?\n\n")
  try:
    chat.run(c, str(tmp_path / "whole"))
  finally:
    sys.stdin = sys.__stdin__
  assert capsys.readouterr().out.count("model> ") == 1
  # bad input: a file that is not a video, an empty question
  bad = tmp_path / "not_a_video.mp4"
  bad.write_bytes(b"\x00" * 100)
  c.chat.interactive, c.chat.video = False, str(bad)
  with pytest.raises(ValueError, match="not_a_video.mp4"):
    chat.run(c, str(tmp_path / "whole"))
  c.chat.video, c.chat.question = os.path.join(root, clip), "  "
  with pytest.raises(ValueError, match="question is empty"):
    chat.run(c, str(tmp_path / "whole"))


def test_config_mismatches_are_named_before_work():
  c = stage3_config.get_config("size=tiny")
  c.data.instruct["visual_tokens"] = 5
  with pytest.raises(ValueError, match="visual_tokens=5 must equal"):
    stage3.check_config(c)
  c = stage3_config.get_config("size=tiny")
  c.model.qformer.encoder_width = 7
  with pytest.raises(ValueError, match="encoder_width=7"):
    stage3.check_config(c)


def test_7b_step_compiles_with_real_shardings_on_8_devices(capsys):
  """InternVideo2-Chat-8B shapes (1B vision to depth 39, BERT-base QFormer, Mistral-7B with
  LoRA r16, bf16, full remat): the real step, lowered and compiled for 8 CPU devices (FSDP),
  state sharded like the params, LoRA-only optimizer state."""
  from internvideo2_jax.parallel import mesh as M
  from internvideo2_jax.train import compile as C
  c = stage3_config.get_config("size=7B")
  c.data.batch_size = 8
  c.data.instruct["max_txt_l"] = 160
  c.job = "compile"
  c.compile.devices = 8
  res = C.compile_config(c)
  printed = C.format_report(res)
  assert res["chips"] == 8 and res["mesh"]["fsdp"] == 8 and "per chip" in printed
  parts = stage3.step_parts(c, M.make_mesh(c.mesh.to_dict()))
  assert all(k.startswith("lm/") and "lora" in k or not k.startswith("lm/") for k in parts.trainable)
  assert sum("lora_a" in k for k in parts.trainable) == 7 + 1  # 7 layer targets (stacked) + lm_head
  print(printed)


def test_hd_grid_choice_tiles_and_clip_tokens():
  from internvideo2_jax.data.transforms import hd_clips, hd_grid, resize
  # the InternVL-1.5 rule: closest aspect ratio with columns * rows <= hd_num, ties to the
  # larger grid only for frames with more than half its pixels
  assert hd_grid(1280, 720, 6) == (2, 1) and hd_grid(720, 1280, 6) == (1, 2)
  assert hd_grid(640, 480, 6) == (3, 2) and hd_grid(1000, 200, 6) == (5, 1) and hd_grid(1000, 200, 4) == (4, 1)
  assert hd_grid(300, 300, 6) == (1, 1) and hd_grid(1000, 1000, 6) == (2, 2) and hd_grid(1280, 720, 1) == (1, 1)
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
  tiles = hd_clips(clip, 16, 6, grid=(3, 2))
  assert tiles.shape == (7, 2, 16, 16, 3)
  big = resize(clip, 32, 48)
  np.testing.assert_array_equal(tiles[4], big[:, 16:32, 16:32])  # row 1, column 1
  np.testing.assert_array_equal(tiles[-1], resize(clip, 16, 16))  # the global view last
  # each clip gives its own queries' tokens, concatenated in clip order
  c = stage3_config.get_config("size=tiny")
  model = VideoChat(c.model)
  video = jnp.asarray(rng.standard_normal((1, 3, 4, 32, 32, 3)), jnp.float32)
  ids = jnp.ones((1, 30), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), video[:, 0], ids, ids, ids.astype(bool)))["params"]
  toks = model.apply({"params": params}, video, method=VideoChat.encode_video)
  assert toks.shape == (1, 3 * 8, 64)
  one = model.apply({"params": params}, video[:, 1], method=VideoChat.encode_video)
  np.testing.assert_allclose(toks[:, 8:16], one, atol=1e-5)


def test_multiple_choice_prompts_and_scoring():
  from internvideo2_jax.data import instruct as I
  from internvideo2_jax.evaluate import qa
  turn = synthetic.multiple_choice("Which way does the shape move?", ["up", "left", "down", "right"], "down")
  assert turn["q"].startswith("Question: Which way does the shape move?\nOptions:\n(A) up\n(B) left\n")
  assert turn["q"].endswith("Only give the best option.") and turn["a"] == "Best option:(C) down"
  assert qa.is_multiple_choice(turn["q"]) and not qa.is_multiple_choice("What colour is it?")
  assert qa.choice_letter(turn["a"]) == "C" and qa.choice_letter("C) down") == "C" and qa.choice_letter("") == ""
  assert qa.normalise_answer(" It moves LEFT. </s>") == "it moves left"
  tok = I.load_llm_tokenizer()
  ids = I.tokenize_prompt(tok, turn["q"], "video", I.InstructSpec(visual_tokens=3), instruction=turn["i"],
                          answer_prompt=qa.ANSWER_PROMPT)
  assert (ids == -1).sum() == 3 and tok.decode(ids[ids >= 0]).endswith("[/INST] Best option:(")
  with pytest.raises(ValueError, match="question is empty"):
    I.tokenize_prompt(tok, " ", "video", I.InstructSpec())
