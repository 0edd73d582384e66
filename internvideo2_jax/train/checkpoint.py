"""The one module that talks to Orbax: train state + data iterator + config, resumable.

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    ckpt.save(step, state, iterator, config)          # async; data iterator state included
    state, step = ckpt.restore(abstract_state, iterator)  # latest; iterator continues exactly

Items on disk: `state` (arrays, restored straight into the target shardings given by the
abstract tree), `data` (grain iterator state, one small JSON per process), `config` (JSON).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             save_interval_steps=save_interval_steps,
                                             enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Optional[grain.DatasetIterator] = None,
           config: Any = None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      log.info("checkpoint %d -> %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iterator: Optional[grain.DatasetIterator] = None,
              step: Optional[int] = None) -> tuple[Any, int]:
    """Restores `step` (default latest) into the shapes/shardings of `abstract_state`.

    `data_iterator` (a fresh iterator of the same pipeline) is advanced in place to where the
    saved run stopped.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
