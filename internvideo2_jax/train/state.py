"""Train state: all parameters, the optimizer state of the trainable ones, counters.

Frozen parameters live in `params` but never in `opt_state`; the step differentiates only the
trainable subset (`trainable` flat paths), so frozen towers cost no gradient computation.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from internvideo2_jax.train.optimizer import flatten, unflatten


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array            # updates skipped because the loss or gradients were non-finite
  trainable: tuple = flax.struct.field(pytree_node=False, default=())

  def split(self):
    flat = flatten(self.params)
    train = {k: flat[k] for k in self.trainable}
    frozen = {k: v for k, v in flat.items() if k not in train}
    return train, frozen

  @staticmethod
  def merge(train, frozen):
    return unflatten({**frozen, **train})


def create(params, tx: optax.GradientTransformation, trainable) -> TrainState:
  flat = flatten(params)
  missing = sorted(set(trainable) - set(flat))
  if missing:
    raise ValueError(f"trainable paths not in the params: {missing[:5]}")
  train = {k: flat[k] for k in trainable}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(train),
                    skipped=jnp.zeros((), jnp.int32), trainable=tuple(trainable))


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads, *, ok,
                    post_update=None) -> TrainState:
  """One optimizer update of the trainable params; skipped entirely (params, moments, step of
  the schedule) when `ok` is False, which is counted in `skipped`."""
  train, frozen = state.split()
  updates, new_opt = tx.update(grads, state.opt_state, train)
  new_train = optax.apply_updates(train, updates)
  if post_update is not None:
    new_train = post_update(new_train)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
  return state.replace(step=state.step + 1, params=TrainState.merge(keep(new_train, train), frozen),
                       opt_state=keep(new_opt, state.opt_state),
                       skipped=state.skipped + (1 - ok.astype(jnp.int32)))
