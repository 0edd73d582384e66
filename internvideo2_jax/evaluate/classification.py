"""Zero-shot classification with the 16 ActionCLIP prompt templates (official
`kinetics_templates_action_clip`): every prompt is encoded and normalised on its own, video-text
similarities are averaged over the prompts (not the embeddings), top-1/top-5 in percent."""

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


def zero_shot_classify(encoder, videos: np.ndarray, labels: np.ndarray, class_names, *, tokenizer,
                       max_txt_l: int = 32, templates=TEMPLATES) -> dict:
  prompts = [text_lib.pre_text(t.format(c)) for c in class_names for t in templates]
  ids, mask = text_lib.tokenize(tokenizer, prompts, max_txt_l)
  _, tfeat = encoder.texts(ids, mask)                      # (C * P, E), normalised
  _, vfeat = encoder.videos(videos)                        # (N, E)
  sim = (vfeat @ tfeat.T).reshape(len(videos), len(class_names), len(templates)).mean(-1)
  order = np.argsort(-sim, axis=1)
  labels = np.asarray(labels)
  top1 = float(np.mean(order[:, 0] == labels)) * 100
  top5 = float(np.mean([labels[i] in order[i, :5] for i in range(len(labels))])) * 100
  return {"top1": top1, "top5": top5, "num_videos": int(len(videos)), "num_classes": len(class_names)}
