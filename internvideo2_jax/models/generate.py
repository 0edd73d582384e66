"""Batched decoding with the KV cache: greedy or temperature / top-p sampling.

`Generator(llm, max_len)` jits two programs per (batch, prompt length): the prefill (the whole
prompt into the cache, the first token) and one decode step (a token in, the next out). The
Python loop between them only moves a (B,) token vector, so a reply streams token by token
(`on_token`) without re-tracing. Prompts are left-padded embeddings (the chat model splices
visual tokens into them) or token ids; position ids count real tokens, as HF's generate does.
A row stops at `eos_id`; the loop ends when every row has or after `max_new_tokens`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from internvideo2_jax.models.llm import LLM
from internvideo2_jax.parallel.sharding import to_host


def sample_token(logits, rng, temperature: float, top_p: float):
  """(B, V) fp32 logits -> (B,) ids: argmax when temperature == 0, else nucleus sampling."""
  if temperature <= 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    keep = jnp.zeros_like(logits, bool).at[jnp.arange(logits.shape[0])[:, None], order].set(
        sorted_logits > -jnp.inf)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Generator:
  """Decoding for an `LLM` (or a model whose LLM sits under `params_key` in its params)."""

  def __init__(self, llm: LLM, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
               eos_id: Optional[int] = None, pad_id: int = 0):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0.0 < top_p <= 1.0 or temperature < 0.0:
      raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    self.llm, self.max_new = llm, int(max_new_tokens)
    self.temperature, self.top_p, self.eos_id, self.pad_id = float(temperature), float(top_p), eos_id, pad_id
    self._prefill = jax.jit(self._prefill_fn)
    self._step = jax.jit(self._step_fn, donate_argnums=(1,))

  def _prefill_fn(self, params, embeds, mask, rng):
    b, p = mask.shape
    spec = self.llm.spec
    if p + self.max_new > spec.max_position_embeddings:
      raise ValueError(f"prompt of {p} tokens + {self.max_new} new ones exceeds the LLM's context "
                       f"(max_position_embeddings={spec.max_position_embeddings})")
    cache = self.llm.init_cache(b, p + self.max_new)
    buf_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.ones((b, self.max_new), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = self.llm.apply({"params": params}, embeds=embeds, mask=buf_mask, positions=positions,
                                   cache=cache, cache_index=0)
    token = sample_token(logits[:, -1], rng, self.temperature, self.top_p)
    return token, cache, buf_mask, jnp.sum(mask, axis=1).astype(jnp.int32)

  def _step_fn(self, params, cache, buf_mask, token, slot, position, rng):
    embeds = self.llm.apply({"params": params}, token[:, None], method=LLM.embed)
    logits, cache = self.llm.apply({"params": params}, embeds=embeds, mask=buf_mask,
                                   positions=position[:, None], cache=cache, cache_index=slot)
    return sample_token(logits[:, -1], rng, self.temperature, self.top_p), cache

  def __call__(self, params, *, ids=None, embeds=None, mask=None, rng=None,
               on_token: Optional[Callable[[np.ndarray], None]] = None) -> np.ndarray:
    """-> (B, n) new token ids (n <= max_new_tokens; rows that stopped are padded with pad_id).
    `ids`/`embeds` are left-padded prompts with `mask` (1 = real)."""
    if (ids is None) == (embeds is None):
      raise ValueError("generate: pass exactly one of ids or embeds")
    if embeds is None:
      ids = jnp.asarray(ids)
      embeds = self.llm.apply({"params": params}, ids, method=LLM.embed)
    b, p = embeds.shape[:2]
    if p == 0:
      raise ValueError("generate: the prompt is empty")
    mask = jnp.ones((b, p), jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    rng, sub = jax.random.split(rng)
    token, cache, buf_mask, n_real = self._prefill(params, embeds, mask, sub)
    out, done = [], np.zeros(b, bool)
    for i in range(self.max_new):
      tok = to_host(token)  # the same on every process (a gather when the array spans hosts)
      tok = np.where(done, self.pad_id, tok)
      out.append(tok)
      if on_token is not None:
        on_token(tok)
      if self.eos_id is not None:
        done |= tok == self.eos_id
      if done.all() or i == self.max_new - 1:
        break
      rng, sub = jax.random.split(rng)
      token, cache = self._step(params, cache, buf_mask, token, jnp.int32(p + i), n_real + i, sub)
    return np.stack(out, axis=1)
