"""The training loop (stage 2 now; stage 1 plugs into the same loop).

    mesh -> model + sharded init (+ pretrained towers) -> optimizer/state -> resume from the
    workdir -> AOT compile with a memory report -> steps with metrics, evals, checkpoints

SIGTERM (preemption, `kill`) finishes the current step, saves a checkpoint and exits cleanly;
the next run with the same workdir resumes exactly there, on any number of processes: the data
position is the step (the pipeline is random access, see data/pipeline.py) and Orbax restores
the state into whatever sharding the new mesh gives it. `train.stop_at_step` does the same at a
chosen step (a planned stop). Multi-host: every process runs this loop on its slice of the
data; process 0 alone writes metrics, TensorBoard and exports; throughput is global.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from internvideo2_jax.data.accounting import DataReport
from internvideo2_jax.ops import platform
from internvideo2_jax.parallel import distributed, sharding
from internvideo2_jax.train import optimizer as opt_lib, state as state_lib
from internvideo2_jax.train.checkpoint import Checkpointer
from internvideo2_jax.train.flops import peak_flops
from internvideo2_jax.train.metrics import MetricWriter, Progress, RunRecord, eval_line, plot_curves

log = logging.getLogger(__name__)

DEVICE_KEYS = ("video", "mask", "text_ids", "text_mask", "sample_id", "audio", "has_audio", "label",
               "clip_tokens", "clip_final", "clip_attn", "mae_tokens",
               "llm_ids", "llm_mask", "llm_visual", "llm_labels", "instruction_ids", "instruction_mask")


@dataclasses.dataclass
class Setup:
  """Everything a stage provides to the loop."""
  mesh: Any
  rules: Any
  state: Any                            # a TrainState, or a LazyState (built only when no checkpoint)
  tx: optax.GradientTransformation
  step_fn: Callable                     # pure (state, batch, rng, num_visible) -> (state, metrics)
  data: Callable[..., Any]              # (start batch, report=DataReport) -> dataset of host batches
  flops_per_step: Callable[[dict], float]  # host batch -> FLOPs of one step
  evaluate: Optional[Callable[[Any], dict]] = None   # params -> {name: scalar}
  finish: Optional[Callable[[Any, str], None]] = None  # (params, workdir) after training


@dataclasses.dataclass
class LazyState:
  """The state to train when no checkpoint exists: `make()` does the sharded init and loads the
  pretrained weights (tens of seconds of compiling, minutes at scale), which a resumed run skips
  (it restores the whole state into `abstract`'s shapes and shardings)."""
  abstract: Any                         # TrainState of ShapeDtypeStructs with shardings
  make: Callable[[], Any]


class _Preempted:
  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._old = None
    return self

  def _handle(self, *_):
    print("SIGTERM: finishing this step, saving a checkpoint, then exiting", flush=True)
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def device_batch(host: dict, mesh) -> dict:
  arrays = {k: (v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in host.items() if k in DEVICE_KEYS}
  return sharding.shard_batch(arrays, mesh)


def _num_visible(host: dict) -> Optional[int]:
  if "mask" not in host:
    return None
  return int((~host["mask"][0]).sum())


def memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports
    return "memory analysis unavailable on this backend"
  if m is None:
    return "memory analysis unavailable on this backend"
  gib = 2 ** 30
  fields = [("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
            ("temporaries", "temp_size_in_bytes"), ("generated code", "generated_code_size_in_bytes")]
  return "per-device memory: " + ", ".join(
      f"{name} {getattr(m, attr, 0) / gib:.3f} GiB" for name, attr in fields)


def train(cfg, workdir: str, setup: Setup) -> dict:
  """Runs (or resumes) training; returns the last eval results."""
  tc = cfg.train
  writer = MetricWriter(workdir, tensorboard=bool(tc.get("tensorboard", True)),
                        enabled=jax.process_index() == 0)
  try:  # the writers' threads are closed on every path, failed starts included
    return _train(cfg, workdir, setup, writer)
  finally:
    writer.close()


def _train(cfg, workdir: str, setup: Setup, writer: MetricWriter) -> dict:
  tc = cfg.train
  mesh, rules = setup.mesh, setup.rules
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(tc.get("keep_checkpoints", 2)),
                      async_save=bool(tc.get("async_checkpoints", True)))
  try:  # the checkpointer closed on every path
    lazy = isinstance(setup.state, LazyState)
    target = setup.state.abstract if lazy else setup.state
    state_sh = jax.tree.map(lambda x: x.sharding, target)
    start = 0
    if ckpt.latest_step() is not None:
      state, start = ckpt.restore(target)
      print(f"resumed from {ckpt.directory} at step {start} on {jax.process_count()} process(es) x "
            f"{jax.local_device_count()} devices" + (" (initialisation and pretrained weights skipped)"
                                                     if lazy else ""), flush=True)
    record = RunRecord(workdir, enabled=jax.process_index() == 0)
    if start == 0:
      record.data = {}  # a fresh run (no checkpoint): no totals of an earlier one
    total = int(tc.total_steps)
    done = record.finished_at(start) if start >= total else None
    if done is not None:  # nothing to train, evaluate or export again
      print(f"this run already finished at step {start} ({_totals(record.data)}); its results from "
            f"{record.path} follow (evaluate again with --config.job=evaluate)", flush=True)
      return done
    if ckpt.latest_step() is None:
      state = setup.state.make() if lazy else setup.state
    record.update(starts=int(record.data.get("starts", 0)) + 1, total_steps=total, finished=False)
    writer.truncate_after(start)  # records of steps the resumed run will redo are dropped
    report = DataReport()
    end = min(total, int(tc.get("stop_at_step", 0)) or total)
    # the data pipeline (a corpus decode for cached corpora) only when there are steps to run
    it = iter(setup.data(start, report=report)) if start < end else None
    if report.corpora and jax.process_index() == 0:
      print(report.table(), flush=True)
    if jax.process_index() == 0:
      print(platform.describe(), flush=True)
    rng = jax.random.key(int(cfg.seed))
    peak = peak_flops(tc.get("peak_tflops"))
    keys = ("loss",) + tuple(k for k, w in tc.get("loss", {}).items() if w)[:5]
    progress = Progress(total, start, elapsed_before=record.train_s, keys=keys,
                        enabled=jax.process_index() == 0)
    compiled = {}
    compile_time = [0.0]  # excluded from the throughput numbers

    def get_step(host):
      batch = device_batch(host, mesh)
      nv = _num_visible(host)
      key = (tuple((k, v.shape) for k, v in sorted(batch.items())), nv)
      if key not in compiled:
        batch_sh = jax.tree.map(lambda x: x.sharding, batch)
        t0 = time.perf_counter()
        exe = compile_step(setup.step_fn, state, batch, rng, mesh, rules, state_sh, batch_sh, nv)
        dt = time.perf_counter() - t0
        compile_time[0] += dt
        progress.exclude(dt)
        progress.print(f"compiled the step for {dict((k, v.shape) for k, v in batch.items())} in "
                       f"{dt:.1f}s; {memory_report(exe)}")
        compiled[key] = exe
      return compiled[key], batch

    results = _loop(cfg, workdir, setup, state, it, ckpt, writer, get_step, start, rng, peak, compile_time,
                    report, progress, record)
    if jax.process_index() == 0 and writer.jsonl_path.endswith("metrics.jsonl"):
      try:
        png = plot_curves(writer.jsonl_path, os.path.join(workdir, "curves.png"))
        if png:
          print(f"curves: {png}", flush=True)
      except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
        print(f"could not plot the curves: {type(e).__name__}: {e}", flush=True)
    return results
  finally:
    ckpt.close()


def compile_step(step_fn, state, batch, rng, mesh, rules, state_sh, batch_sh, num_visible):
  """Ahead-of-time compile of a step with explicit shardings and the state donated. `state`,
  `batch` may be arrays or ShapeDtypeStructs (the `compile` job lowers for devices it lacks)."""
  repl = NamedSharding(mesh, P())
  jitted = jax.jit(functools.partial(step_fn, num_visible=num_visible),
                   in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    exe = jitted.lower(state, batch, rng).compile()
  distributed.sync("step compiled")  # no host starts the step's collectives before the others
  return exe


def run_totals(results: dict) -> str:
  """'N start(s), M min in all' of a finished run's results."""
  return _totals(results.get("run", {}))


def _totals(data: dict) -> str:
  return f"{int(data.get('starts', 1))} start(s), {float(data.get('train_s', 0.0)) / 60:.1f} min in all"


def _loop(cfg, workdir, setup, state, it, ckpt, writer, get_step, start, rng, peak, compile_time,
          report: DataReport, progress: Progress, record: RunRecord):
  tc = cfg.train
  total = int(tc.total_steps)
  stop_at = int(tc.get("stop_at_step", 0)) or total
  log_every, eval_every = int(tc.log_every), int(tc.get("eval_every", 0))
  ckpt_every = int(tc.get("checkpoint_every", 0))
  results = {}
  acc = None
  t_log, n_log, flops_log, log_start = time.perf_counter(), 0, 0.0, start
  procs = jax.process_count()
  writer_started = False
  with _Preempted() as pre:
    step = saved = start
    stop = False
    while step < min(total, stop_at) and not stop:
      host = next(it)
      exe, batch = get_step(host)
      state, metrics = exe(state, batch, rng)
      acc = metrics if acc is None else acc.merge(metrics)
      report.add_batch(host)
      step += 1
      progress.tick(step)
      n_log += len(host["video"]) * procs            # every process loads an equal slice
      flops_log += setup.flops_per_step(host) * procs
      if step % log_every == 0 or step == total:
        values = {k: float(v) for k, v in acc.compute().items()}
        dt = time.perf_counter() - t_log - compile_time[0]
        compile_time[0] = 0.0
        values.update(samples_per_s=n_log / dt, step_time_s=dt / max(step - log_start, 1))
        values["tflops_per_s"] = flops_log / dt / 1e12
        if peak:
          values["mfu"] = flops_log / dt / peak
        values.update(report.flush(distributed.sum_processes))  # the interval's, all processes
        if not writer_started:  # the first record of the run
          writer_started = True
          values.update({f"data_refused_at_parse/{k}": float(v) for k, v in report.parse_dropped().items()})
        writer.write(step, values, prefix="train/")
        progress.log(step, values)
        record.update(step=step, train_s=progress.elapsed())
        acc, t_log, n_log, flops_log, log_start = None, time.perf_counter(), 0, 0.0, step
      if setup.evaluate and eval_every and step % eval_every == 0 and step < total:
        results = _evaluate(setup, state, writer, step, progress)
        t_log, n_log, flops_log, log_start = time.perf_counter(), 0, 0.0, step
        acc = None
      if ckpt_every and step % ckpt_every == 0 and ckpt.save(step, state, cfg):
        saved = step
      stop = distributed.any_process(pre.flag)  # every host stops after the same step
    ckpt.wait()
    # Decided from what this loop saved, identically on every host (the directory may not yet
    # show another host's finalised step: a save only some hosts join would hang them all).
    if saved != step:
      ckpt.save(step, state, cfg, force=True)
      ckpt.wait()
    report.flush(distributed.sum_processes)  # steps after the last log line
    progress.print(report.summary_line())
    record.update(step=step, train_s=progress.elapsed())
    if stop or step < total:
      why = "after SIGTERM" if stop else f"at train.stop_at_step={stop_at}"
      progress.print(f"saved step {step} to {ckpt.directory}; exiting {why} ({_totals(record.data)})")
      return {"preempted_at": step, "data": report.summary()}
  if setup.evaluate:
    results = _evaluate(setup, state, writer, step, progress)
  if setup.finish:
    setup.finish(state.params, workdir)
  results["step"] = step
  results["data"] = report.summary()
  results["run"] = {"starts": int(record.data.get("starts", 1)), "train_s": round(progress.elapsed(), 1)}
  record.update(step=step, finished=True, results=results, train_s=results["run"]["train_s"])
  return results


def _evaluate(setup: Setup, state, writer: MetricWriter, step: int, progress: Progress) -> dict:
  t0 = time.perf_counter()
  res = setup.evaluate(state.params)
  flat = {k: v for k, v in _flatten(res).items() if isinstance(v, (int, float))}
  flat["eval_time_s"] = time.perf_counter() - t0
  progress.exclude(flat["eval_time_s"])
  writer.write(step, flat, prefix="eval/")
  progress.print(eval_line(step, flat))
  return res


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def abstract_state(init_fn: Callable, mesh, rules, tx_factory: Callable, *, freeze=(), unfreeze=()):
  """The state's shapes and shardings without allocating anything (also for devices this
  machine does not have). Optimizer moments are sharded exactly like their parameters.

  Returns (abstract TrainState of ShapeDtypeStructs with shardings, tx, trainable keys).
  """
  params = sharding.abstract_sharded(init_fn, mesh, rules)["params"]
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  flat = opt_lib.flatten(params)
  trainable = opt_lib.trainable_keys(flat, freeze, unfreeze)
  if not trainable:
    raise ValueError("every parameter is frozen (check freeze_* / unfreeze_keys)")
  tx = tx_factory({k: flat[k] for k in trainable})
  abstract = jax.eval_shape(lambda p: state_lib.create(p, tx, trainable), params)
  flat_sh = opt_lib.flatten(param_sh)
  repl = NamedSharding(mesh, P())
  shardings = state_lib.TrainState(
      step=repl, params=param_sh, skipped=repl, trainable=tuple(trainable),
      opt_state=sharding.opt_state_shardings(tx, abstract.opt_state, {k: flat_sh[k] for k in trainable}, mesh))
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)
  return abstract, tx, trainable


@dataclasses.dataclass
class StepParts:
  """A stage's training step with everything abstract: what its `run` materialises and the
  `compile` job lowers for devices it does not have."""
  rules: Any
  init_fn: Callable                       # () -> boxed variables {"params": ...}
  abstract: Any                           # TrainState of ShapeDtypeStructs with shardings
  tx: optax.GradientTransformation
  trainable: list
  step_fn: Callable                       # pure (state, batch, rng, num_visible) -> (state, metrics)
  batch: dict                             # the global batch: key -> ShapeDtypeStruct
  num_visible: Optional[int]              # static visible-token count of the batch's mask
  flops_per_step: Callable[[dict], float]  # host batch -> FLOPs of this process's share
  batch_flops: Callable[[dict, Optional[int]], float]  # (global batch shapes, num_visible) -> FLOPs
  extra: dict = dataclasses.field(default_factory=dict)


def materialize(parts: StepParts, mesh, load: Optional[Callable[[sharding.Placer], None]] = None):
  """Sharded init -> optional weight loading -> optimizer state -> the TrainState, each array
  created directly in its sharding (optimizer moments like their parameters).

  `load(placer)` puts pretrained weights into the sharded params (a converter's
  `sink=placer.sink(prefix)`, leaf by leaf, or `placer.put_tree(prefix, numpy_subtree)`): each
  process transfers only its devices' shards, and nothing global is ever fetched to a host.
  """
  params, _ = sharding.init_sharded(parts.init_fn, mesh, parts.rules)
  params = nn.unbox(params)["params"]
  if load is not None:
    placer = sharding.Placer(parts.abstract.params)
    load(placer)
    params = placer.merge(params)
  out_sh = jax.tree.map(lambda x: x.sharding, parts.abstract)
  tx, trainable = parts.tx, parts.trainable
  with jax.set_mesh(mesh):
    return jax.jit(lambda p: state_lib.create(p, tx, trainable), out_shardings=out_sh)(params)


__all__ = ["Setup", "LazyState", "run_totals", "StepParts", "train", "materialize", "abstract_state", "compile_step", "device_batch",
           "memory_report"]
