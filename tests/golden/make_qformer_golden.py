"""Writes qformer.npz: outputs of transformers' InstructBlipQFormerModel (QFormer + instruction).

A tiny random InstructBlipQFormerModel (vocab 100, hidden 32, 3 layers, 4 heads, FFN 64,
40 positions, cross_attention_frequency 2 -> cross-attention in layers 0 and 2 only,
encoder_hidden_size 24, exact-erf gelu, layer_norm_eps 1e-12, dropout 0, pad_token_id 0) is built
with torch seed 0; every parameter (LayerNorm weights/biases and the padding row of word_embeddings
included) is re-drawn from normal(0, 0.3) with a torch.Generator seeded 0 (named_parameters order);
eval(), fp32, eager attention. Inputs come from np.random.RandomState(0): query_embeds (2, 6, 32)
normal, input_ids (2, 5) in [1, 100), encoder_hidden_states (2, 7, 24) normal; text_mask rows
[1,1,1,1,1] and [0,0,1,1,1] (LEFT padding, like VideoChat2's QFormer tokenizer);
encoder_attention_mask all ones.

InstructBlipQFormerModel.forward takes ONE attention_mask over the whole embedded sequence
[queries; text] (length 6 + 5); InstructBlipForConditionalGeneration builds it as
cat([ones(query), qformer_attention_mask], 1), and so does this script. Semantics (checked below
by a from-scratch torch re-implementation, `reference`, that must match to 1e-5):
  * embeddings: text = word_emb(ids) + pos_emb(arange(5)) (positions start at 0 whatever
    the left padding; queries get no position embedding); LayerNorm (embeddings.layernorm) is
    applied to the concatenation [queries; text]; no LayerNorm before that on the queries.
  * each layer: BERT post-LN self-attention over all 11 positions, key-padding mask only; then
    the query slice [:, :6] alone goes through cross-attention (layers 0 and 2) and the
    intermediate_query/output_query FFN, the text slice [:, 6:] through intermediate/output;
    the two are concatenated back.
  * masks are additive, torch.finfo(float32).min where masked (transformers 5 eager mask), not
    the -10000 of BLIP-2/LAVIS; with no fully-masked row the outputs are the same in fp32.
Keys: sd/<torch state-dict key> (float32, 90 tensors, 50496 params), query_embeds, input_ids
(int32), text_mask (int32 (2, 5)), encoder_hidden_states, out_queries = last_hidden_state[:, :6]
(2, 6, 32), out_full = last_hidden_state (2, 11, 32), query_only_out (2, 6, 32: input_ids=None,
attention_mask=None, only queries; layers then use only the query FFNs) and transformers_version
(0-d str). ~240 KB.

Run once, on CPU, with torch 2.13.0+cpu, transformers 5.24.0, numpy 2.4.6 under Python 3.11.7,
from the repository root:
  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
  /tmp/torchenv/bin/python tests/golden/make_qformer_golden.py
The output is bit-for-bit reproducible across runs. The tests run our JAX port on the same
weights and inputs without torch.
"""

import os

import numpy as np
import torch
import transformers
from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel
from transformers.masking_utils import create_bidirectional_mask

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_STD = 0.3
NQ, NT, NE = 6, 5, 7  # query tokens, text tokens, encoder tokens

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, cross_attention_frequency=2,
              encoder_hidden_size=24, hidden_act="gelu", layer_norm_eps=1e-12,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


def build():
  config = InstructBlipQFormerConfig(**CONFIG)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = InstructBlipQFormerModel(config)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.normal(0.0, INIT_STD, size=p.shape, generator=gen))
  return model.float().eval()


def inputs():
  rng = np.random.RandomState(0)
  query_embeds = rng.randn(2, NQ, 32).astype(np.float32)
  input_ids = rng.randint(1, 100, size=(2, NT)).astype(np.int64)
  encoder_hidden_states = rng.randn(2, NE, 24).astype(np.float32)
  text_mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int64)  # left padding
  return query_embeds, input_ids, text_mask, encoder_hidden_states


def reference(sd, query_embeds, input_ids, mask, enc, enc_mask, heads=4, eps=1e-12, freq=2):
  """Plain-torch re-implementation used only to check the semantics stated in the docstring."""
  f = torch.nn.functional
  ln = lambda x, p: f.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)
  lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]

  def attn(x, kv, m, p):  # m: (B, Lk) 1/0 key mask
    b, lq, d = x.shape
    split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)
    q, k, v = split(lin(x, p + ".query")), split(lin(kv, p + ".key")), split(lin(kv, p + ".value"))
    s = q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + (1.0 - m[:, None, None, :]) * -10000.0
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)

  if input_ids is None:
    x = query_embeds
  else:
    pos = torch.arange(input_ids.shape[1])  # from 0, ignores the left padding
    text = (sd["embeddings.word_embeddings.weight"][input_ids]
            + sd["embeddings.position_embeddings.weight"][pos])
    x = torch.cat([query_embeds, text], 1)
  x = ln(x, "embeddings.layernorm")  # on [queries; text]
  if mask is None:
    mask = torch.ones(x.shape[:2])
  mask = mask.float()
  nq = query_embeds.shape[1]
  n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
  for i in range(n_layers):
    p = f"encoder.layer.{i}"
    x = ln(lin(attn(x, x, mask, p + ".attention.attention"), p + ".attention.output.dense") + x,
           p + ".attention.output.LayerNorm")
    q, t = x[:, :nq], x[:, nq:]
    if i % freq == 0:
      q = ln(lin(attn(q, enc, enc_mask.float(), p + ".crossattention.attention"),
                 p + ".crossattention.output.dense") + q, p + ".crossattention.output.LayerNorm")
    ffn = lambda h, a, o: ln(lin(f.gelu(lin(h, a + ".dense")), o + ".dense") + h, o + ".LayerNorm")
    q = ffn(q, p + ".intermediate_query", p + ".output_query")
    t = ffn(t, p + ".intermediate", p + ".output")
    x = torch.cat([q, t], 1)
  return x


def main():
  model = build()
  query_embeds, input_ids, text_mask, enc = inputs()
  qe, ids, tm, eh = map(torch.from_numpy, (query_embeds, input_ids, text_mask, enc))
  enc_mask = torch.ones(2, NE, dtype=torch.long)
  full_mask = torch.cat([torch.ones(2, NQ, dtype=torch.long), tm], 1)  # queries + text
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=full_mask, query_embeds=qe,
                encoder_hidden_states=eh, encoder_attention_mask=enc_mask).last_hidden_state
    q_only = model(input_ids=None, attention_mask=None, query_embeds=qe,
                   encoder_hidden_states=eh, encoder_attention_mask=enc_mask).last_hidden_state
    q_only_ones = model(input_ids=None, attention_mask=torch.ones(2, NQ, dtype=torch.long),
                        query_embeds=qe, encoder_hidden_states=eh,
                        encoder_attention_mask=enc_mask).last_hidden_state
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    ref = reference(sd, qe, ids, full_mask, eh, enc_mask)
    ref_q = reference(sd, qe, None, None, eh, enc_mask)
    # Row 1 without its 2 pad tokens: its text positions must be passed as 2,3,4 explicitly to
    # reproduce the padded row, i.e. the padded call numbers text positions 0..4 from the pad.
    kw = dict(attention_mask=torch.ones(1, NQ + 3, dtype=torch.long), query_embeds=qe[1:],
              encoder_hidden_states=eh[1:], encoder_attention_mask=enc_mask[1:])
    unpad_pos = model(input_ids=ids[1:, 2:], position_ids=torch.arange(2, NT)[None], **kw)
    unpad_pos0 = model(input_ids=ids[1:, 2:], **kw)
    mask4d = create_bidirectional_mask(config=model.config, attention_mask=full_mask,
                                       inputs_embeds=torch.zeros(2, NQ + NT, 32))
  assert out.shape == (2, NQ + NT, 32) and q_only.shape == (2, NQ, 32)
  err, err_q = float((out - ref).abs().max()), float((q_only - ref_q).abs().max())
  assert err < 1e-5 and err_q < 1e-5, (err, err_q)
  assert torch.equal(q_only, q_only_ones)
  kept = [*range(NQ), NQ + 2, NQ + 3, NQ + 4]  # row 1's queries + its 3 real text tokens
  pos_err = float((unpad_pos.last_hidden_state[0] - out[1, kept]).abs().max())
  pos0_diff = float((unpad_pos0.last_hidden_state[0, :NQ] - out[1, :NQ]).abs().max())
  assert pos_err < 1e-5 and pos0_diff > 1e-4, (pos_err, pos0_diff)
  assert set(mask4d.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
  np.savez(os.path.join(HERE, "qformer.npz"),
           **{f"sd/{k}": v.numpy().astype(np.float32) for k, v in sd.items()},
           query_embeds=query_embeds, input_ids=input_ids.astype(np.int32),
           text_mask=text_mask.astype(np.int32), encoder_hidden_states=enc,
           out_queries=out[:, :NQ].numpy().astype(np.float32),
           out_full=out.numpy().astype(np.float32),
           query_only_out=q_only.numpy().astype(np.float32),
           transformers_version=np.array(transformers.__version__))
  print("state dict:", len(sd), "tensors,", sum(v.numel() for v in sd.values()), "params")
  print(f"ref max err {err:.2e} / query-only {err_q:.2e}; out std {float(out.std()):.3f};"
        f" unpadded row 1 vs padded: positions 2..4 {pos_err:.1e}, positions 0..2 {pos0_diff:.1e};"
        f" with-text vs query-only diff {float((out[:, :NQ] - q_only).abs().max()):.3f}")


if __name__ == "__main__":
  main()
