"""The `compile` job: proves that a config's real training step fits the hardware before any is
rented. It builds the step of the config's stage (same mesh, batch, remat, shardings, donation),
compiles it ahead of time for a named TPU topology (libtpu's topology descriptions; no TPU
needed) or for N fake CPU devices, and reports per-chip memory against the chip's HBM, FLOPs
per step and an MFU bound (remat recompute, HBM traffic of the state), with a verdict.

  iv2 --config=configs/stage2.py:size=6B --config.job=compile --config.compile.topology=v5p:4x8x8
  iv2 --config=configs/stage1.py:size=tiny --config.job=compile --config.compile.devices=8

libtpu: an installed `libtpu` package (TPU VMs, `setup.sh tpu`), `compile.libtpu`, env
TPU_LIBRARY_PATH, or the copy `launch/setup.sh` keeps in .venv/libtpu (outside site-packages,
so that ordinary CPU/GPU runs never load it).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import sys
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from internvideo2_jax.parallel import mesh as mesh_lib
from internvideo2_jax.parallel.mesh import batch_sharding
from internvideo2_jax.train import flops, loop

STEP_MODULES = {"train_stage1": "internvideo2_jax.train.stage1", "train_stage2": "internvideo2_jax.train.stage2",
                "train_stage3": "internvideo2_jax.train.stage3", "finetune": "internvideo2_jax.train.finetune"}
GIB = 2 ** 30


def find_libtpu(explicit: str = "") -> str:
  """Path of libtpu.so, or raises saying how to get one."""
  cands = [explicit, os.environ.get("TPU_LIBRARY_PATH", "")]
  try:
    import libtpu  # type: ignore
    cands.append(libtpu.get_library_path())
  except ImportError:
    pass
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for root in (os.path.join(repo, ".venv"), sys.prefix):
    cands += glob.glob(os.path.join(root, "libtpu", "libtpu", "libtpu.so"))
  for c in cands:
    if c and os.path.isfile(c):
      return c
  raise FileNotFoundError("compiling for a TPU topology needs libtpu: run `bash launch/setup.sh` (it keeps "
                          "a copy in .venv/libtpu), install the `tpu` extra, or set compile.libtpu / "
                          "TPU_LIBRARY_PATH to a libtpu.so")


def topology_devices(name: str, libtpu_path: str = "", num_slices: int = 1):
  """The devices of a named TPU topology such as 'v5p:4x8x8' or 'v6e:16x16' (no TPU needed);
  num_slices > 1: a multislice job of that many such slices."""
  os.environ["TPU_LIBRARY_PATH"] = find_libtpu(libtpu_path)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no chip is opened
  from jax.experimental import topologies
  try:
    extra = {"num_slices": int(num_slices)} if int(num_slices) > 1 else {}
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **extra).devices
  except Exception as e:  # noqa: BLE001 - libtpu's message, with the name we were given
    raise ValueError(f"compile.topology={name!r}: libtpu cannot build it ({type(e).__name__}: {e}); "
                     "names look like v5p:4x4x8 (v5p-256 = 128 chips), v5p:4x8x8 (v5p-512), "
                     "v6e:16x16, v5e:16x16, v4:8x8x8") from e


def compile_config(config) -> dict:
  """Compiles the config's training step for its target devices; returns the report."""
  cc = config.compile
  step = cc.get("step") or ""
  if step not in STEP_MODULES:
    raise ValueError(f"compile.step={step!r}: this config has no training step to compile "
                     f"(one of {sorted(STEP_MODULES)})")
  if cc.get("topology"):
    slices = int(cc.get("num_slices", 1))
    devices = topology_devices(cc.topology, cc.get("libtpu", ""), slices)
    target = cc.topology + (f" x {slices} slices" if slices > 1 else "")
  else:
    devices, target = jax.devices(), f"{jax.device_count()} {jax.devices()[0].platform} devices"
  mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices=devices)
  stage = importlib.import_module(STEP_MODULES[step])
  t0 = time.perf_counter()
  parts = stage.step_parts(config, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, len(v.shape)))
           for k, v in parts.batch.items()}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, P()))
  state_sh = jax.tree.map(lambda x: x.sharding, parts.abstract)
  try:
    exe = loop.compile_step(parts.step_fn, parts.abstract, batch, rng, mesh, parts.rules, state_sh,
                            {k: v.sharding for k, v in batch.items()}, parts.num_visible)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    return oom_report(str(e), devices, parts.batch_flops(parts.batch, parts.num_visible), config, target,
                      mesh, time.perf_counter() - t0)
  dt = time.perf_counter() - t0
  return report(exe, devices, parts.batch_flops(parts.batch, parts.num_visible), config, target, mesh, dt)


def oom_report(message: str, devices, step_flops: float, config, target: str, mesh, compile_s: float) -> dict:
  """XLA refused the program at compile time (its temporaries exceed the chip's HBM): the
  verdict, with XLA's figures."""
  line = next((ln for ln in message.splitlines() if "memory" in ln.lower()), message.splitlines()[0])
  res = {"target": target, "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": dict(mesh.shape),
         "global_batch": int(config.data.batch_size), "compile_s": round(compile_s, 1), "fits": False,
         "step_tflops_per_chip": step_flops / len(devices) / 1e12, "xla_error": line.strip()}
  m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
  if m:
    res["temporaries_gb"], res["available_gb"] = float(m.group(1)), float(m.group(2))
  res["verdict"] = f"DOES NOT FIT: XLA refuses the program for this chip ({line.strip()})"
  return res


def report(exe, devices, step_flops: float, config, target: str, mesh, compile_s: float) -> dict:
  kind = devices[0].device_kind
  c = flops.chip(kind)
  hbm = float(config.compile.get("hbm_gib") or 0) * GIB or (c.hbm_gb * 1e9 if c else 0.0)
  m = exe.memory_analysis()
  args, out, temp, alias = (float(getattr(m, f, 0) or 0) for f in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"))
  total = args + temp + out - alias  # donated state: outputs reuse the arguments' buffers
  n = len(devices)
  per_chip_flops = step_flops / n
  res = {"target": target, "device_kind": kind, "chips": n, "mesh": dict(mesh.shape),
         "global_batch": int(config.data.batch_size), "compile_s": round(compile_s, 1),
         "arguments_gib": args / GIB, "temporaries_gib": temp / GIB, "outputs_gib": out / GIB,
         "aliased_gib": alias / GIB, "total_gib": total / GIB, "hbm_gib": hbm / GIB if hbm else None,
         "step_tflops_per_chip": per_chip_flops / 1e12}
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost:  # XLA counts a scanned layer's body once, so this is far below the real figure
    res["xla_tflops_per_chip"] = float(cost.get("flops", 0.0)) / 1e12
  if c:
    # Bounds on MFU (model FLOPs / peak): full remat runs the forward twice (4 passes for 3
    # of model FLOPs: <= 75%); and a step cannot beat reading the state and writing it back
    # through HBM. Communication (FSDP all-gathers, gradient reduce-scatters) is not counted.
    main = config.model.get("llm") or config.model.vision  # the tower with most of the FLOPs
    policy = str(main.get("remat_policy", "none"))
    res["remat_bound"] = {"full": 0.75, "none": 1.0, "": 1.0}.get(policy, 1.0)
    t_compute = per_chip_flops / (c.peak_tflops * 1e12)
    t_state = 2 * args / (c.hbm_tbps * 1e12)
    res["min_step_s"] = max(t_compute / res["remat_bound"], t_state)
    res["mfu_bound"] = t_compute / max(res["min_step_s"], 1e-30)
  if hbm:
    res["fits"] = total <= 0.95 * hbm  # ~5% for the runtime, the program, fragmentation
    res["verdict"] = (f"FITS: {total / GIB:.1f} of {hbm / GIB:.1f} GiB per chip ({100 * total / hbm:.0f}%)"
                      if res["fits"] else
                      f"DOES NOT FIT: needs {total / GIB:.1f} GiB per chip, the chip has {hbm / GIB:.1f} GiB")
  else:
    res["verdict"] = f"{total / GIB:.2f} GiB per device (no HBM size known for {kind!r}; set compile.hbm_gib)"
  return res


def format_report(r: dict) -> str:
  if "xla_error" in r:
    return (f"compiling the {r['global_batch']}-clip step for {r['target']} ({r['chips']} x {r['device_kind']}, "
            f"mesh {r['mesh']}) stopped after {r['compile_s']:.0f}s\n{r['verdict']}")
  lines = [f"compiled the {r['global_batch']}-clip step for {r['target']} ({r['chips']} x {r['device_kind']}, "
           f"mesh {r['mesh']}) in {r['compile_s']:.0f}s",
           f"per chip: arguments {r['arguments_gib']:.2f} GiB + temporaries {r['temporaries_gib']:.2f} GiB "
           f"+ outputs {r['outputs_gib']:.2f} GiB - donated {r['aliased_gib']:.2f} GiB = {r['total_gib']:.2f} GiB"
           + (f" of {r['hbm_gib']:.1f} GiB HBM" if r.get("hbm_gib") else ""),
           f"FLOPs per step per chip: {r['step_tflops_per_chip']:.3g} TFLOP (analytic)"
           + (f"; XLA's cost analysis {r['xla_tflops_per_chip']:.3g} TFLOP (scanned layers counted once)"
              if "xla_tflops_per_chip" in r else "")]
  if "mfu_bound" in r:
    lines.append(f"bound: step >= {r['min_step_s'] * 1e3:.3g} ms, MFU <= {100 * r['mfu_bound']:.0f}% "
                 f"(peak compute with remat recompute, state read + written once through HBM; "
                 f"communication not counted)")
  lines.append(r["verdict"])
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  res = compile_config(config)
  print(format_report(res), flush=True)
  from etils import epath
  name = (config.compile.get("topology") or f"{res['chips']}dev").replace(":", "_")
  if int(config.compile.get("num_slices", 1)) > 1:
    name += f"_x{int(config.compile.num_slices)}"
  path = epath.Path(workdir) / f"compile_{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(res, indent=2))
  print(f"report: {path}", flush=True)
  return res
