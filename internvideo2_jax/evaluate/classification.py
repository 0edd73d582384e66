"""Zero-shot classification with the 16 ActionCLIP prompt templates (official
`kinetics_templates_action_clip`): every prompt is encoded and normalised on its own, video-text
similarities are averaged over the prompts (not the embeddings), top-1/top-5 in percent.

Audio classification uses the same rule with AUDIO_TEMPLATES (ours: the official code has no
audio protocol)."""

from __future__ import annotations

import numpy as np

from internvideo2_jax.data import text as text_lib

TEMPLATES = (
    "a photo of action {}", "a picture of action {}", "Human action of {}", "{}, an action",
    "{} this is an action", "{}, a video of action", "Playing action of {}", "{}",
    "Playing a kind of action, {}", "Doing a kind of action, {}", "Look, the human is {}",
    "Can you recognize the action of {}?", "Video classification of {}", "A video of {}",
    "The man is {}", "The woman is {}",
)


AUDIO_TEMPLATES = ("{}", "the sound of {}", "a recording of {}", "this is the sound of {}",
                   "a video with the sound of {}")


def zero_shot_classify(encoder, videos: np.ndarray, labels: np.ndarray, class_names, *, tokenizer,
                       max_txt_l: int = 32, templates=TEMPLATES) -> dict:
  _, vfeat = encoder.videos(videos)                        # (N, E), normalised
  return classify_features(encoder, vfeat, labels, class_names, tokenizer=tokenizer,
                           max_txt_l=max_txt_l, templates=templates)


def classify_features(encoder, feats: np.ndarray, labels: np.ndarray, class_names, *, tokenizer,
                      max_txt_l: int = 32, templates=TEMPLATES) -> dict:
  """Top-1/top-5 of L2-normalised media features `feats` (N, E) against the class prompts."""
  prompts = [text_lib.pre_text(t.format(c)) for c in class_names for t in templates]
  ids, mask = text_lib.tokenize(tokenizer, prompts, max_txt_l)
  _, tfeat = encoder.texts(ids, mask)                      # (C * P, E), normalised
  order = np.argsort(-prompt_similarity(feats, tfeat, len(class_names)), axis=1)
  labels = np.asarray(labels)
  top1 = float(np.mean(order[:, 0] == labels)) * 100
  top5 = float(np.mean([labels[i] in order[i, :5] for i in range(len(labels))])) * 100
  return {"top1": top1, "top5": top5, "num_examples": int(len(feats)), "num_classes": len(class_names)}


def prompt_similarity(feats: np.ndarray, prompt_feats: np.ndarray, num_classes: int) -> np.ndarray:
  """(N, C) similarities of normalised features to C classes whose prompts (C * P, E) are listed
  class by class, averaged over each class's P prompts (the similarities, not the embeddings)."""
  sim = feats @ prompt_feats.T
  return sim.reshape(len(feats), num_classes, -1).mean(-1)
