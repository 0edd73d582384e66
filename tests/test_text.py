"""The BERT text tower: golden outputs of transformers' PyTorch BertModel on real MiniLM weights,
fusion layers, masks, the tied MLM head, HF import errors and the official key round trip."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from streaming import assert_streams

from internvideo2_jax.convert import bert as B
from internvideo2_jax.convert.io import CheckpointError
from internvideo2_jax.models.text import TextEncoder, text_preset

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "bert_minilm.npz")


def _minilm(fusion_layer=6, num_layers=None, encoder_width=64):
  d = B.minilm_dir()
  cfg = B.hf_text_config(d, fusion_layer=fusion_layer, encoder_width=encoder_width, num_layers=num_layers)
  model = TextEncoder(cfg)
  ids = jnp.ones((1, 8), jnp.int32)
  base = nn.unbox(model.init(jax.random.key(0), ids, ids, jnp.ones((1, 3, encoder_width))))["params"]
  return cfg, model, B.load_hf_bert(d, cfg, base)


def test_matches_transformers_bert_golden():
  g = np.load(GOLDEN)
  cfg, model, params = _minilm()
  out = model.apply({"params": params}, g["input_ids"], g["attention_mask"], method=TextEncoder.encode_text)
  real = g["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out)[real], g["last_hidden_state"][real], atol=2e-4, rtol=1e-4)
  # a 4-layer text part (fusion from layer 4, as the stage-2 split) gives BertModel's hidden state 4
  cfg4, model4, params4 = _minilm(fusion_layer=4)
  out4 = model4.apply({"params": params4}, g["input_ids"], g["attention_mask"], method=TextEncoder.encode_text)
  np.testing.assert_allclose(np.asarray(out4)[real], g["hidden_layer_4"][real], atol=2e-4, rtol=1e-4)
  # the training path: no base, fusion layers kept as initialised, leaves streamed to a sink
  cfg7 = B.hf_text_config(B.minilm_dir(), fusion_layer=6, encoder_width=64, num_layers=7)
  got = {}
  partial = B.load_hf_bert(B.minilm_dir(), cfg7, sink=lambda path, value: got.setdefault(tuple(path), value))
  assert not jax.tree.leaves(partial) and ("bert", "encoder", "text_layers", "attention", "self",
                                           "query", "kernel") in got
  assert not any("fusion_layers" in k for k in got)
  np.testing.assert_array_equal(got[("bert", "embeddings", "word_embeddings", "embedding")],
                                params["bert"]["embeddings"]["word_embeddings"]["embedding"])


def test_fusion_layers_read_the_memory_and_padding_is_ignored():
  cfg = text_preset("tiny", encoder_width=16, hidden_dropout=0.0, attention_dropout=0.0)
  model = TextEncoder(cfg)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, 2000, (2, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
  memory = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  params = model.init(jax.random.key(0), ids, mask, memory)
  fused = lambda m, i=ids: model.apply(params, model.apply(params, i, mask, method=TextEncoder.encode_text),  # noqa: E731
                                       mask, m, method=TextEncoder.fuse)
  a, b = fused(memory), fused(memory * 2.0)
  assert np.abs(a - b).max() > 1e-3  # cross-attention sees the memory
  # changing padded tokens changes nothing at the real positions
  other = ids.at[1, 4:].set(7)
  np.testing.assert_allclose(fused(memory, other)[1, :4], a[1, :4], atol=1e-5)
  # a memory mask hides masked memory entries completely
  mm = jnp.asarray([[1, 1, 1, 0, 0]] * 2)
  hidden = model.apply(params, ids, mask, method=TextEncoder.encode_text)
  m1 = model.apply(params, hidden, mask, memory, mm, method=TextEncoder.fuse)
  m2 = model.apply(params, hidden, mask, memory.at[:, 3:].set(9.0), mm, method=TextEncoder.fuse)
  np.testing.assert_allclose(m1, m2, atol=1e-5)


def test_mlm_decoder_is_tied_to_word_embeddings():
  cfg = text_preset("tiny", encoder_width=16)
  model = TextEncoder(cfg)
  ids = jnp.ones((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids, ids))["params"]
  assert "decoder" not in str(jax.tree_util.tree_structure(params["cls"]))

  def loss(p):
    _, logits = model.apply({"params": p}, ids, ids)
    return logits[..., 5].sum()
  g = jax.grad(loss)(params)
  # the word-embedding row of token 5 gets gradient only through the tied decoder here
  assert np.abs(g["bert"]["embeddings"]["word_embeddings"]["embedding"][5]).sum() > 0


def test_official_text_keys_round_trip_and_errors():
  cfg = text_preset("tiny", encoder_width=16)
  model = TextEncoder(cfg)
  ids = jnp.ones((1, 4), jnp.int32)
  params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(1), ids, ids, jnp.ones((1, 2, 16))))["params"])
  sd = B.bert_to_state_dict(params, cfg)
  assert sd["bert.encoder.layer.3.crossattention.self.key.weight"].shape == (48, 16)
  assert "bert.encoder.layer.2.crossattention.self.key.weight" not in sd
  back = B.bert_from_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert_streams(lambda src, sink: B.bert_from_state_dict(src, cfg, sink=sink), sd, params)
  del sd["bert.encoder.layer.3.crossattention.self.key.weight"]
  sd["bert.encoder.layer.0.output.dense.weight"] = np.zeros((48, 10), np.float32)
  with pytest.raises(CheckpointError) as e:
    B.bert_from_state_dict(sd, cfg)
  assert "crossattention.self.key.weight" in str(e.value) and "(48, 10)" in str(e.value)


def test_hf_directory_errors(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    B.hf_text_config(str(tmp_path))
  (tmp_path / "config.json").write_text('{"hidden_act": "relu"}')
  with pytest.raises(CheckpointError, match="hidden_act"):
    B.hf_text_config(str(tmp_path))
