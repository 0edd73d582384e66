"""The one module that talks to Orbax: train state + config, resumable on any mesh.

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3)
    ckpt.save(step, state, config)              # async; every process writes its own shards
    state, step = ckpt.restore(abstract_state)  # latest, into the shardings of abstract_state

Items on disk: `state` (arrays, restored straight into the target shardings given by the
abstract tree, so a checkpoint written by 2 hosts restores on 1 and the reverse) and `config`
(JSON, written by process 0). The data position is the step itself (the pipeline is random
access), so no iterator state is stored. Directories may be local or `gs://...` (Orbax's own
filesystem layer; never `open`/`os.path` on them).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none of them restores (each step and its problem are named)."""


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def resolve_dir(directory) -> str:
  """Local paths made absolute (Orbax needs that); URLs such as gs://bucket/x kept as they are."""
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
  def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = resolve_dir(directory)
    from internvideo2_jax.parallel import distributed
    # Orbax's first cross-process collective (in the manager's constructor) sets up a CPU (gloo)
    # context that waits only 30 s for the other processes, whatever the collective timeout:
    # on a loaded host they can be minutes apart after model set-up, so they meet here first.
    distributed.sync("checkpoint manager")
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

  def save(self, step: int, state: Any, config: Any = None, *, force: bool = False) -> bool:
    """Every process must call this (each writes the shards it holds)."""
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved and jax.process_index() == 0:
      log.debug("checkpoint %d -> %s", step, self.directory)  # the console keeps the progress lines
    return saved

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """Restores `step` (default: the newest that restores) into the shapes/shardings of
    `abstract_state` (arrays or ShapeDtypeStructs with shardings), whatever mesh or process
    count wrote it. A newest checkpoint that is damaged (truncated or overwritten array files,
    broken metadata) is reported in one line and the next older one is tried; when none
    restores, CheckpointRestoreError lists every step and why, so a run never silently
    starts over while checkpoints exist."""
    from internvideo2_jax.parallel import distributed
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for s in steps:
      error = None
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # noqa: BLE001 - any damage: report it and try an older step
        error = f"{type(e).__name__}: {_first_line(e)}"
      # every host takes the same step (a shard only one host reads may be the damaged one)
      if not distributed.any_process(error is not None):
        if failures:
          self._set_aside([f for f, _ in failures])
        return restored["state"], s
      error = error or "damaged on another host"
      failures.append((s, error))
      if step is None and s != steps[-1]:
        print(f"checkpoint {s} in {self.directory} cannot be restored ({error}); trying an older one",
              flush=True)
    raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} could be restored: "
        + "; ".join(f"step {s}: {why}" for s, why in failures)
        + ". Move the damaged step directories away to start over, or restore a backup.")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories to `<step>.damaged` (kept for inspection) so the run
    can save those steps again."""
    from etils import epath
    from internvideo2_jax.parallel import distributed
    if jax.process_index() == 0:
      for s in steps:
        src = epath.Path(self.directory) / str(s)
        dst = epath.Path(self.directory) / f"{s}.damaged"
        if dst.exists():
          dst.rmtree()
        src.rename(dst)
        print(f"moved the damaged checkpoint {s} to {dst}", flush=True)
    distributed.sync("damaged checkpoints set aside")
    self.manager.reload()

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
