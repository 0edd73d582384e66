"""The Llama-family LLM: golden logits and greedy tokens against transformers (Mistral, Llama,
Qwen2; files from tests/golden/make_llm_golden.py), the KV cache, LoRA merge, HF import/export."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.convert import llm as C
from internvideo2_jax.convert.io import CheckpointError, load_state_dict
from internvideo2_jax.models.generate import Generator, sample_token
from internvideo2_jax.models.llm import LLM, llm_preset, merge_lora, unmerge_lora

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _load(family, directory=None):
  d = directory or os.path.join(GOLDEN, f"llm_{family}")
  cfg = C.llm_config_from_hf(d)
  return cfg, LLM(cfg), C.load_hf_llm(d, cfg)


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
def test_logits_and_greedy_tokens_match_transformers(family):
  g = np.load(os.path.join(GOLDEN, f"llm_{family}.npz"))
  cfg, model, params = _load(family)
  assert cfg["family"] == family and cfg["tie_word_embeddings"] == (family == "qwen2")
  logits, _ = model.apply({"params": params}, jnp.asarray(g["input_ids"]), mask=jnp.asarray(g["attention_mask"]))
  real = g["attention_mask"].astype(bool)
  assert np.abs(np.asarray(logits)[real] - g["logits"][real]).max() < 1e-4
  # greedy decoding with the KV cache (prefill + 19 one-token steps) gives transformers' tokens
  gen = Generator(model, 20)
  tokens = gen(params, ids=g["greedy_prompt"])
  np.testing.assert_array_equal(tokens, g["greedy_tokens"])


def test_sharded_checkpoint_loads_like_the_single_file_and_exports_back(tmp_path):
  _, _, single = _load("mistral")
  cfg, _, sharded = _load("mistral", os.path.join(GOLDEN, "llm_mistral_sharded"))
  jax.tree.map(np.testing.assert_array_equal, single, sharded)
  written = C.save_hf_llm(sharded, cfg, str(tmp_path / "out"), max_shard_bytes=100_000)
  assert "model.safetensors.index.json" in written and len(written) > 3
  orig = load_state_dict(os.path.join(GOLDEN, "llm_mistral", "model.safetensors"))
  back = C.ShardedSafetensors(str(tmp_path / "out"))
  assert set(back) == set(orig)
  for k in orig:
    np.testing.assert_array_equal(back[k], orig[k])
  assert C.llm_config_from_hf(str(tmp_path / "out")) == cfg


def test_streaming_import_hands_over_leaf_by_leaf():
  from streaming import assert_streams
  cfg, _, params = _load("qwen2")
  sd = dict(load_state_dict(os.path.join(GOLDEN, "llm_qwen2", "model.safetensors")))
  assert_streams(lambda src, sink: C.llm_from_state_dict(src, cfg, sink=sink), sd, params)


def test_wrong_architecture_and_mismatched_checkpoints_are_named(tmp_path):
  d = tmp_path / "bert"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
  with pytest.raises(CheckpointError, match="BertForMaskedLM.*not a supported LLM"):
    C.llm_config_from_hf(str(d))
  cfg = C.llm_config_from_hf(os.path.join(GOLDEN, "llm_llama"))
  with pytest.raises(CheckpointError, match="num_layers: config 3"):
    C.load_hf_llm(os.path.join(GOLDEN, "llm_llama"), dict(cfg, num_layers=3))
  sd = dict(load_state_dict(os.path.join(GOLDEN, "llm_llama", "model.safetensors")))
  sd["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 64), np.float32)
  del sd["model.norm.weight"]
  with pytest.raises(CheckpointError) as e:
    C.llm_from_state_dict(sd, cfg)
  assert "model.norm.weight" in str(e.value) and "up_proj" in str(e.value) and "(5, 64)" in str(e.value)


def test_kv_cache_decoding_equals_the_full_forward_with_left_padding_and_a_window():
  cfg = llm_preset("tiny", sliding_window=5)
  model = LLM(cfg)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 128, (2, 9)), jnp.int32)
  mask = jnp.asarray([[1] * 9, [0] * 3 + [1] * 6], jnp.int32)  # row 1 left-padded
  params = nn.unbox(model.init(jax.random.key(0), ids))["params"]
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)  # sharper logits
  full, _ = model.apply({"params": params}, ids, mask=mask)
  # prefill the first 6 tokens, then feed the last 3 one at a time through the cache
  cache = model.init_cache(2, 9)
  out, cache = model.apply({"params": params}, ids[:, :6], mask=mask, cache=cache, cache_index=0,
                           positions=jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)[:, :6])
  steps = [out]
  for t in range(6, 9):
    pos = (jnp.cumsum(mask, 1) - 1)[:, t:t + 1]
    o, cache = model.apply({"params": params}, ids[:, t:t + 1], mask=mask, cache=cache, cache_index=t,
                           positions=pos)
    steps.append(o)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1))[real], np.asarray(full)[real],
                             atol=2e-5, rtol=1e-5)


def test_lora_starts_as_the_base_model_and_merging_keeps_the_function():
  base_cfg = llm_preset("tiny")
  lora_cfg = llm_preset("tiny", lora_rank=4, lora_alpha=8.0)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 128, (2, 7)), jnp.int32)
  p = nn.unbox(LLM(lora_cfg).init(jax.random.key(0), ids))["params"]
  base = merge_lora(p, lora_cfg)  # B = 0: merging changes nothing yet
  assert "lora_a" not in base["layers"]["self_attn"]["q_proj"] and "lora_a" in p["lm_head"]
  np.testing.assert_allclose(LLM(base_cfg).apply({"params": base}, ids)[0], LLM(lora_cfg).apply({"params": p}, ids)[0],
                             atol=1e-5)
  trained = jax.tree_util.tree_map_with_path(  # a trained adapter: B != 0
      lambda path, x: x + 0.3 if "lora_b" in jax.tree_util.keystr(path) else x, p)
  lora_out = LLM(lora_cfg).apply({"params": trained}, ids)[0]
  merged = merge_lora(trained, lora_cfg)
  merged_out = LLM(base_cfg).apply({"params": merged}, ids)[0]
  assert np.abs(np.asarray(lora_out) - np.asarray(LLM(base_cfg).apply({"params": base}, ids)[0])).max() > 1e-2
  np.testing.assert_allclose(merged_out, lora_out, atol=1e-4, rtol=1e-4)
  kept = merge_lora(trained, lora_cfg, keep_adapters=True)
  again = unmerge_lora(kept, lora_cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), again, trained)


def test_sampling_respects_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 400))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  greedy = sample_token(logits, keys, 0.0, 1.0)
  assert set(np.asarray(greedy).tolist()) == {0}
  drawn = np.asarray(sample_token(logits, keys, 1.0, 0.7))  # nucleus {0, 1}: 0.5 + 0.3 >= 0.7
  assert set(drawn.tolist()) == {0, 1}
  drawn = np.asarray(sample_token(logits, keys, 1.0, 1.0))
  assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_generation_stops_at_eos_and_refuses_an_overlong_prompt():
  cfg = llm_preset("tiny")
  model = LLM(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
  first = Generator(model, 3)(params, ids=np.array([[5, 6, 7]]))
  eos = int(first[0, 1])
  out = Generator(model, 10, eos_id=eos)(params, ids=np.array([[5, 6, 7]]))
  assert out.shape[1] == 2 and out[0, -1] == eos
  with pytest.raises(ValueError, match="exceeds the LLM's context"):
    Generator(model, 100)(params, ids=np.ones((1, 40), np.int32))
