"""Multi-host start: `jax.distributed.initialize` once, in `main`, before any device use.

Where the settings come from, first match wins:
1. explicit: `distributed.coordinator_address` (+ `num_processes`, `process_id`,
   `local_device_ids`) in the config, or the env vars IV2_COORDINATOR_ADDRESS,
   IV2_NUM_PROCESSES, IV2_PROCESS_ID, IV2_LOCAL_DEVICE_IDS (what launchers and tests set);
2. `mode="auto"` (default): a cluster that jax recognises and that runs more than one process:
   a SLURM step (srun with several tasks: coordinator from the node list), a multi-worker
   Cloud TPU VM slice, Open MPI, Kubernetes; a single process starts nothing;
3. `mode="off"`: never initialise (each process is its own job).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_ENV = {"coordinator_address": "IV2_COORDINATOR_ADDRESS", "num_processes": "IV2_NUM_PROCESSES",
        "process_id": "IV2_PROCESS_ID", "local_device_ids": "IV2_LOCAL_DEVICE_IDS"}


def _explicit(cfg) -> dict:
  out = {}
  for key, env in _ENV.items():
    value = cfg.get(key) if cfg is not None else None
    if value in (None, "") or (key, value) in (("num_processes", 0), ("process_id", -1)):
      value = os.environ.get(env, "")  # unset in the config
    if value not in ("", None):
      out[key] = value
  if not out.get("coordinator_address"):
    return {}
  missing = [k for k in ("num_processes", "process_id") if k not in out]
  if missing:
    raise ValueError(f"distributed.coordinator_address={out['coordinator_address']!r} also needs "
                     f"{' and '.join('distributed.' + m for m in missing)} (or env "
                     f"{', '.join(_ENV[m] for m in missing)})")
  out["num_processes"], out["process_id"] = int(out["num_processes"]), int(out["process_id"])
  if not 0 <= out["process_id"] < out["num_processes"]:
    raise ValueError(f"distributed.process_id={out['process_id']} is not in [0, {out['num_processes']})")
  ids = out.get("local_device_ids")
  if isinstance(ids, str):
    out["local_device_ids"] = [int(x) for x in ids.split(",") if x.strip()]
  return out


def _detected_cluster():
  """The jax cluster environment present here with more than one process, or None."""
  try:
    from jax._src import clusters  # jax's own SLURM / TPU-pod / MPI / k8s detection
    for env in clusters.ClusterEnv._cluster_types:
      if getattr(env, "opt_in_only_method", False) or not env.is_env_present():
        continue
      if env.get_process_count() > 1:
        return env
  except Exception as e:  # noqa: BLE001 - detection is best effort; say why it was skipped
    log.warning("multi-host detection skipped: %s: %s", type(e).__name__, e)
  return None


def initialize(cfg=None) -> str:
  """Initialises the distributed runtime if this is a multi-process run; returns a description."""
  mode = (cfg.get("mode", "auto") if cfg is not None else "auto") or "auto"
  if mode not in ("auto", "off"):
    raise ValueError(f"distributed.mode={mode!r}: 'auto' or 'off' (explicit settings work in both)")
  if jax.distributed.is_initialized():
    return f"process {jax.process_index()} of {jax.process_count()} (already initialised)"
  kwargs = _explicit(cfg)
  timeout = int(cfg.get("timeout_s", 300)) if cfg is not None else 300
  _cpu_collective_timeout(timeout)  # also for one process over several CPU devices
  if not kwargs and not (mode == "auto" and (env := _detected_cluster()) is not None):
    return "single process"
  jax.distributed.initialize(**kwargs, initialization_timeout=timeout, shutdown_timeout_seconds=timeout)
  how = f"coordinator {kwargs['coordinator_address']}" if kwargs else f"{env.__name__} detected"
  return (f"process {jax.process_index()} of {jax.process_count()} ({how}); "
          f"{jax.local_device_count()} local of {jax.device_count()} devices")


def _cpu_collective_timeout(seconds: int) -> None:
  """CPU collectives (gloo between processes, rendezvous between the devices of one process)
  give up when the participants arrive more than 30 s apart, which a loaded host reaches easily
  (one process compiling or writing files while the others wait): the same
  `distributed.timeout_s` applies to them. XLA reads XLA_FLAGS when the backend starts,
  which is after this point; the flag is a no-op on GPU and TPU. A value already set wins."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_cpu_collective_timeout_seconds" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_collective_timeout_seconds={seconds}".strip()


def is_main() -> bool:
  """True on the process that writes logs, metrics, exports and result files."""
  return jax.process_index() == 0


_barriers: dict = {}


def sync(name: str, timeout_s: int = 3600) -> None:
  """Every process waits here (e.g. until process 0 has written a file the others read, or until
  all have compiled a program: the first collective of a program must not start while another
  host is still compiling, as CPU collectives give up after 30 s). Uses the coordination
  service's barrier, which involves no device."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the barrier jax's own serialization uses
  client = jax_distributed.global_state.client
  n = _barriers[name] = _barriers.get(name, 0) + 1
  if client is None:  # not started by jax.distributed (e.g. an external runtime)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"{name}/{n}")
    return
  client.wait_at_barrier(f"iv2/{name}/{n}", timeout_in_ms=timeout_s * 1000)


def compiled(jitted, *args):
  """`jitted` compiled for `args` (ahead of time) once every process has compiled it too."""
  exe = jitted.lower(*args).compile()
  sync("compiled")
  return exe


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process, the same answer everywhere (a tiny collective: every
  process must call it at the same point). Lets all hosts stop at one step after a signal
  that reached only some of them."""
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  if "any_process" not in _barriers:  # the first call compiles: let every host get here first
    sync("any_process")
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def sum_processes(values):
  """The elementwise sum of a small host vector over all processes, the same everywhere (a
  collective: every process calls it at the same point, e.g. the data counts at a log step)."""
  import numpy as np
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  if "sum_processes" not in _barriers:  # the first call compiles: let every host get here first
    sync("sum_processes")
  return np.asarray(multihost_utils.process_allgather(values)).reshape(-1, *values.shape).sum(axis=0)


def make_dirs(path: str) -> None:
  """Creates a directory (local or gs://...) once, on process 0."""
  if is_main():
    from etils import epath
    epath.Path(path).mkdir(parents=True, exist_ok=True)


__all__ = ["initialize", "is_main", "sync", "compiled", "any_process", "sum_processes", "make_dirs"]
