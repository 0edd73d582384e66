"""Loss math of the stage-2 objectives (plain JAX).

All functions take *global* arrays; under `jax.jit` with a sharded batch, XLA inserts the
all-gathers, so VTC over the whole mesh is just the global computation and its gradient is
exact. `vtc_loss` supports the official world-size scaling explicitly (see `vtc_scale`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(|x|, eps) (torch F.normalize), with a finite gradient at x = 0: the norm's own
  gradient is NaN there, and 0 * NaN survives any masking (a silent clip's all-zero fbank gives
  an exactly zero audio feature at init, which used to turn every AV update into NaN)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def vtc_loss(vision, text, sample_ids, temp, valid=None):
  """Symmetric contrastive loss with soft targets from sample ids (duplicates all positive).

  vision, text: (N, D) L2-normalised; sample_ids: (N,); temp: scalar. Returns the mean of
  CE(v->t) and CE(t->v) with targets `ids_i == ids_j` row-normalised (official vtc_loss).
  `valid` (N,) bool leaves samples out entirely (rows and columns), e.g. clips without audio in
  the audio losses; with no valid sample the loss is 0.
  """
  sim = vision @ text.T / temp  # (N, N) fp32
  pos = (sample_ids[:, None] == sample_ids[None, :]).astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(sim.shape[0], bool)
  both = valid[:, None] & valid[None, :]
  sim = jnp.where(both, sim, -1e9)
  pos = pos * both
  targets = pos / jnp.maximum(pos.sum(axis=1, keepdims=True), 1.0)
  w = valid.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  loss_v2t = -jnp.sum(jnp.sum(jax.nn.log_softmax(sim, axis=1) * targets, axis=1) * w) / n
  loss_t2v = -jnp.sum(jnp.sum(jax.nn.log_softmax(sim.T, axis=1) * targets, axis=1) * w) / n
  return (loss_v2t + loss_t2v) / 2


def vtc_scale(mode, num_batch_shards: int) -> float:
  """Multiplier of the VTC loss. "official" reproduces the released recipe, where every rank
  computes the full gathered loss, the gather's backward keeps only local slices and gradients
  are averaged over ranks: VTC's effective gradient is 1 / world_size of the global loss's
  (reference §11.1). 1.0 (default) is the world-size-independent global loss."""
  if mode == "official":
    return 1.0 / num_batch_shards
  return float(mode)


def hard_negatives(key, vision, text, sample_ids, temp, groups: int, valid=None):
  """Official VTM hard-negative sampling, within each of `groups` local batches.

  Weights are softmax(sim / temp) over the local batch with positives (same sample id) zeroed;
  one negative text per video and one negative video per text is drawn in proportion to them
  (torch.multinomial normalises, so no renormalisation is needed). Returns indices *within each
  group* (neg_text_for_video (N,), neg_video_for_text (N,)); gather with `take_in_groups`.
  """
  n = vision.shape[0]
  if n % groups:
    raise ValueError(f"batch {n} not divisible into {groups} local groups")
  b = n // groups
  v = vision.reshape(groups, b, -1)
  t = text.reshape(groups, b, -1)
  ids = sample_ids.reshape(groups, b)
  sim_v2t = jnp.einsum("gid,gjd->gij", v, t) / temp
  pos = ids[:, :, None] == ids[:, None, :]
  if valid is not None:  # samples left out (e.g. no audio) are never drawn as negatives
    vg = valid.reshape(groups, b)
    pos = pos | ~(vg[:, :, None] & vg[:, None, :])
  k1, k2 = jax.random.split(key)

  def draw(k, s):
    w = jnp.where(pos, 0.0, jax.nn.softmax(s, axis=-1))
    # A row with no negative at all (every sample identical) falls back to uniform, like the
    # official NaN -> 1e-2 replacement.
    w = jnp.where(w.sum(-1, keepdims=True) > 0, w, jnp.ones_like(w))
    return jax.random.categorical(k, jnp.log(w), axis=-1)  # (G, b) local indices

  neg_t = draw(k1, sim_v2t)
  neg_v = draw(k2, jnp.swapaxes(sim_v2t, 1, 2))
  return neg_t.reshape(n), neg_v.reshape(n)


def take_in_groups(x, local_idx, groups: int):
  """x[i] for every row i of each of `groups` contiguous groups, `local_idx` counted within the
  row's group: (N, ...) -> (N, ...). With the batch sharded group by group (one group per batch
  shard) this is a gather local to each device: taking x[global_idx] instead makes every device
  all-gather the whole batch (for the 6B VTM: f32[8192, 206, 3200], 20 GiB per buffer)."""
  n = x.shape[0]
  b = n // groups
  xg = x.reshape((groups, b) + x.shape[1:])
  out = jax.vmap(lambda xs, i: jnp.take(xs, i, axis=0))(xg, local_idx.reshape(groups, b))
  return out.reshape(x.shape)


def itm_labels(n: int):
  """Labels of the 3N pairs [(v, t), (v_neg, t), (v, t_neg)]: [1]*N + [0]*2N."""
  return jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((2 * n,), jnp.int32)])


def cross_entropy(logits, labels, weights=None):
  """Mean cross-entropy (fp32); `weights` (same shape as labels) selects / weights terms."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if weights is None:
    return nll.mean()
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mlm_mask(key, ids, *, vocab_size: int, mask_token_id: int, pad_token_id: int = 0,
             cls_token_id: int = 101, prob: float = 0.5):
  """Official MLM masking: each token except [PAD] and [CLS] ([SEP] included) is chosen with
  `prob`; of those 80% become [MASK], 10% a random id (any id, specials included), 10% stay.

  Returns (masked_ids, targets (original ids), chosen (bool)).
  """
  k1, k2, k3 = jax.random.split(key, 3)
  chosen = jax.random.bernoulli(k1, prob, ids.shape) & (ids != pad_token_id) & (ids != cls_token_id)
  r = jax.random.uniform(k2, ids.shape)
  to_mask = chosen & (r < 0.8)
  to_random = chosen & (r >= 0.8) & (r < 0.9)
  random_ids = jax.random.randint(k3, ids.shape, 0, vocab_size, dtype=ids.dtype)
  masked = jnp.where(to_mask, mask_token_id, jnp.where(to_random, random_ids, ids))
  return masked, ids, chosen


def select_positions(chosen, max_positions: int = 0):
  """The chosen positions of each row (first ones first), a validity mask, and how many chosen
  positions did not fit (summed over the batch).

  The vocab projection of the MLM head is then computed only there. `max_positions <= 0` keeps
  room for every position (exact: the official loss averages over all masked tokens); a smaller
  bound is a speed option that drops the positions beyond it from the loss (counted).
  """
  length = chosen.shape[1]
  keep = length if max_positions <= 0 else min(max_positions, length)
  order = jnp.argsort(~chosen, axis=1, stable=True)[:, :keep]
  valid = jnp.take_along_axis(chosen, order, axis=1)
  dropped = chosen.sum() - valid.sum()
  return order.astype(jnp.int32), valid, dropped.astype(jnp.float32)
