"""The stage-3 model (InternVideo2-Chat): vision encoder -> LayerNorm -> QFormer -> project_up
-> the LLM, whose visual slots take the QFormer outputs (reference §3).

* Vision: the stage-2 encoder with `x_vis_return_idx=-2` = only depth-1 blocks built, all
  1 + T*N tokens (cls included), no attention pooling (`attn_pool=False`); the config's
  `vision.depth` is the number of blocks *built* (39 for the 1B).
* `vision_layernorm`: LayerNorm(eps 1e-12) (`vit_add_ln`).
* QFormer (models/qformer.py) over those tokens, with the instruction as its text input.
* `project_up`: Linear(QFormer width -> LLM width); its V = queries x clips outputs fill the
  `llm_visual` slots of the prompt in order (HD: one clip per sub-image plus the global view).
* The LLM (models/llm.py), fed embeddings.

Call: `__call__(video, llm_ids, llm_mask, llm_visual, instruction_ids=None, instruction_mask=None)`
-> logits (B, M, V) fp32; `video` is normalised float frames, (B, T, S, S, 3) for one clip or
(B, clips, T, S, S, 3) for HD tiles.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from internvideo2_jax.models.layers import LayerNorm, Linear
from internvideo2_jax.models.llm import LLM, LLMSpec
from internvideo2_jax.models.qformer import QFormer
from internvideo2_jax.models.vit import VisionEncoder, ViTSpec


def splice_visual(embeds, visual, slots):
  """embeds (B, M, D) with the slots (B, M bool) replaced, in order, by visual (B, V, D).
  A row with fewer slots than V uses the first ones; more slots than V is an error upstream."""
  idx = jnp.clip(jnp.cumsum(slots.astype(jnp.int32), axis=1) - 1, 0, visual.shape[1] - 1)
  picked = jnp.take_along_axis(visual, idx[..., None], axis=1)
  return jnp.where(slots[..., None], picked.astype(embeds.dtype), embeds)


class VideoChat(nn.Module):
  """Config: {vision, qformer, llm} (model sub-configs)."""
  config: Any
  deterministic: bool = True

  def setup(self):
    c = self.config
    v = ViTSpec.from_config(c.vision)
    if v.attn_pool:
      raise ValueError("model.vision.attn_pool must be False for stage 3 (x_vis_only: the tokens feed the QFormer)")
    if int(c.qformer.encoder_width) != v.embed_dim:
      raise ValueError(f"model.qformer.encoder_width={c.qformer.encoder_width} must equal the vision "
                       f"embed_dim={v.embed_dim}")
    self.vision_encoder = VisionEncoder(c.vision)
    self.vision_layernorm = LayerNorm(1e-12)
    self.qformer = QFormer(c.qformer, deterministic=self.deterministic)
    llm = LLMSpec.from_config(c.llm)
    self.project_up = Linear(llm.hidden_size, ("embed_out", "embed"), dtype=llm.dtype)
    self.lm = LLM(c.llm, deterministic=self.deterministic)

  def encode_video(self, video, instruction_ids=None, instruction_mask=None):
    """(B, [clips,] T, S, S, 3) -> (B, clips * queries, LLM width): each clip through ViT -> LN
    -> QFormer (with the instruction) -> project_up, the clips' tokens concatenated."""
    if video.ndim == 5:
      video = video[:, None]
    b, n = video.shape[:2]
    flat = video.reshape((b * n,) + video.shape[2:])
    tokens = self.vision_encoder(flat, train=not self.deterministic)["tokens"]
    tokens = self.vision_layernorm(tokens)
    rep = lambda x: None if x is None else jnp.repeat(x, n, axis=0)  # noqa: E731
    q = self.qformer(tokens, rep(instruction_ids), rep(instruction_mask))
    up = self.project_up(q)
    return up.reshape((b, n * up.shape[1], up.shape[-1]))

  def embed_prompt(self, video, llm_ids, llm_visual, instruction_ids=None, instruction_mask=None):
    visual = self.encode_video(video, instruction_ids, instruction_mask)
    return splice_visual(self.lm.embed(llm_ids), visual, llm_visual)

  def __call__(self, video, llm_ids, llm_mask, llm_visual, instruction_ids=None, instruction_mask=None):
    embeds = self.embed_prompt(video, llm_ids, llm_visual, instruction_ids, instruction_mask)
    logits, _ = self.lm(embeds=embeds, mask=llm_mask)
    return logits

  def decode(self, embeds, mask, cache, cache_index, positions):
    """One LLM call over embeddings with the KV cache (prefill or a step): (logits, cache)."""
    return self.lm(embeds=embeds, mask=mask, cache=cache, cache_index=cache_index, positions=positions)

  def embed_tokens(self, ids):
    return self.lm.embed(ids)


def next_token_loss(logits, labels):
  """HF causal-LM loss: logits at t predict labels at t + 1; -100 ignored; the mean over the
  counted tokens (returns (sum, count) so callers can take a global mean across shards)."""
  logits, labels = logits[:, :-1], labels[:, 1:]
  valid = labels >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)
