"""Writes llm_{mistral,llama,qwen2}.npz and the tiny checkpoints they come from.

For each family a tiny random decoder (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128) is
built with transformers' PyTorch class, every parameter (norm weights included) re-drawn from
normal(0, 0.5) with torch seed 0 so the logits are far from uniform (std ~2) and greedy decoding
varies (0.2 gave greedy runs stuck on one token), and saved with save_pretrained as
tests/golden/llm_<family>/ (config.json + model.safetensors, ~330 KB each: 84k fp32 params;
generation_config.json is deleted). Mistral is also saved sharded (max_shard_size="100KB") as
tests/golden/llm_mistral_sharded/ (model-0000x-of-0000y.safetensors + model.safetensors.index.json).
Each npz holds input_ids (2, 12) int32, attention_mask (2, 12) int32 (row 1 right-padded: last 4
zeros), logits (2, 12, 128) float32 (eager attention, no_grad), greedy_prompt (1, 8) int32
(= input_ids[:1, :8]), greedy_tokens (1, 20) int32 (model.generate, do_sample=False,
max_new_tokens=20, no EOS stop) and transformers_version (0-d str array).

Run once, on CPU, with torch 2.13.0+cpu, transformers 5.24.0 (same as the project venv),
safetensors 0.8.0, numpy 2.4.6 under Python 3.11.7, from the repository root:
  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
  /tmp/torchenv/bin/python tests/golden/make_llm_golden.py
The output is bit-for-bit reproducible across runs. transformers 5 writes rope_theta inside
config.json's "rope_parameters"; the tied Qwen2 checkpoint has no lm_head.weight.
The tests run our JAX port on the same checkpoints and ids without torch.
"""

import os
import shutil

import numpy as np
import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
INIT_STD = 0.5  # 0.2 gave near-uniform logits (std ~0.3) and greedy runs stuck on one token

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM,
                dict(rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                     sliding_window=None)),
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def build(family):
  config_cls, model_cls, extra = FAMILIES[family]
  extra = dict(extra)
  theta = extra.pop("rope_theta")
  # transformers 5 keeps rope_theta inside rope_parameters.
  config = config_cls(**COMMON, **extra,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = model_cls(config)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():  # tied lm_head/embedding appear once
      p.copy_(torch.normal(0.0, INIT_STD, size=p.shape, generator=gen))
  return model.float().eval()


def inputs():
  rng = np.random.RandomState(0)
  input_ids = rng.randint(3, 128, size=(2, 12)).astype(np.int64)
  attention_mask = np.ones((2, 12), np.int64)
  attention_mask[1, -4:] = 0
  return input_ids, attention_mask


def save_checkpoint(model, path, **kw):
  if os.path.isdir(path):
    shutil.rmtree(path)
  model.save_pretrained(path, **kw)
  # Drop generation_config.json: the tests only read config.json + safetensors.
  gc = os.path.join(path, "generation_config.json")
  if os.path.exists(gc):
    os.remove(gc)


def main():
  input_ids, attention_mask = inputs()
  for family in FAMILIES:
    model = build(family)
    save_checkpoint(model, os.path.join(HERE, f"llm_{family}"))
    if family == "mistral":
      save_checkpoint(model, os.path.join(HERE, "llm_mistral_sharded"), max_shard_size="100KB")
    with torch.no_grad():
      logits = model(input_ids=torch.from_numpy(input_ids),
                     attention_mask=torch.from_numpy(attention_mask)).logits
      prompt = torch.from_numpy(input_ids[:1, :8])
      model.generation_config.eos_token_id = None  # no early stop, even if None kwargs are ignored
      out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           output_scores=True, return_dict_in_generate=True)
    new = out.sequences[:, prompt.shape[1]:].numpy()
    assert new.shape == (1, 20), new.shape
    assert len(set(new[0].tolist())) > 1, new
    top2 = torch.stack(out.scores)[:, 0].topk(2, -1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())  # smallest greedy top-1/top-2 logit gap
    np.savez(os.path.join(HERE, f"llm_{family}.npz"),
             input_ids=input_ids.astype(np.int32),
             attention_mask=attention_mask.astype(np.int32),
             logits=logits.numpy().astype(np.float32),
             greedy_prompt=prompt.numpy().astype(np.int32),
             greedy_tokens=new.astype(np.int32),
             transformers_version=np.array(transformers.__version__))
    print(family, f"logits std {float(logits.std()):.3f}", f"min greedy margin {margin:.4f}",
          "greedy", new.tolist())


if __name__ == "__main__":
  main()
