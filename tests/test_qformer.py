"""The QFormer against transformers' InstructBLIP QFormer (the BLIP-2 QFormer with instruction
text; golden file from tests/golden/make_qformer_golden.py), its layer pattern and the
BLIP-2 / VideoChat2 key layout."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvideo2_jax.convert.io import CheckpointError
from internvideo2_jax.convert.qformer import qformer_from_state_dict, qformer_to_state_dict
from internvideo2_jax.models.qformer import QFormer, qformer_preset

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "qformer.npz")


def _golden_cfg(queries):
  return qformer_preset("tiny", vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                        max_position_embeddings=40, encoder_width=24, num_query_tokens=queries,
                        extra_query_tokens=0, hidden_dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0)


def _blip2_layout(g, prefix="Qformer."):
  """The golden's HF InstructBLIP keys in the BLIP-2 (LAVIS) layout our importer reads."""
  sd = {}
  for k in g.files:
    if not k.startswith("sd/"):
      continue
    name = k[3:].replace("embeddings.layernorm", "embeddings.LayerNorm").replace(".attention.attention.", ".attention.self.")
    name = name.replace(".crossattention.attention.", ".crossattention.self.")
    sd[prefix + "bert." + name] = g[k]
  return sd


def test_matches_the_instructblip_qformer_golden():
  g = np.load(GOLDEN)
  cfg = _golden_cfg(6)
  sd = _blip2_layout(g)
  for b in range(2):  # the golden's query embeddings differ per row: one row at a time
    sd_b = dict(sd, query_tokens=g["query_embeds"][b:b + 1])
    params = qformer_from_state_dict(sd_b, cfg)
    mem = jnp.asarray(g["encoder_hidden_states"][b:b + 1])
    out = QFormer(cfg).apply({"params": params}, mem, jnp.asarray(g["input_ids"][b:b + 1]),
                             jnp.asarray(g["text_mask"][b:b + 1]))
    np.testing.assert_allclose(np.asarray(out)[0], g["out_queries"][b], atol=1e-5)
    alone = QFormer(cfg).apply({"params": params}, mem)  # no instruction text
    np.testing.assert_allclose(np.asarray(alone)[0], g["query_only_out"][b], atol=1e-5)


def test_layer_pattern_queries_and_key_layout_round_trip():
  cfg = qformer_preset("tiny", num_layers=4, encoder_width=24)  # 4 + 4 queries
  params = jax.tree.map(np.asarray, nn.unbox(QFormer(cfg).init(jax.random.key(0), jnp.ones((1, 5, 24))))["params"])
  assert [("crossattention" in params[f"layer_{i}"]) for i in range(4)] == [True, False, True, False]
  assert all({"intermediate_query", "output_query", "intermediate", "output"} <= set(params[f"layer_{i}"]) for i in range(4))
  assert np.abs(params["query_tokens"]).max() > 0 and not params["extra_query_tokens"].any()  # extra: zeros
  out = QFormer(cfg).apply({"params": params}, jnp.ones((2, 5, 24)), jnp.ones((2, 3), jnp.int32))
  assert out.shape == (2, 8, 32)
  sd = qformer_to_state_dict(params, cfg)
  assert sd["query_tokens"].shape == (1, 4, 32) and sd["extra_query_tokens"].shape == (1, 4, 32)
  assert "qformer.bert.encoder.layer.2.crossattention.self.key.weight" in sd
  assert "qformer.bert.encoder.layer.1.crossattention.self.key.weight" not in sd
  assert sd["qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 24)
  back = qformer_from_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  del sd["qformer.bert.encoder.layer.3.output_query.dense.weight"]
  sd["qformer.bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(CheckpointError) as e:
    qformer_from_state_dict(sd, cfg)
  assert "layer.3.output_query.dense.weight" in str(e.value) and "(3, 3)" in str(e.value)
