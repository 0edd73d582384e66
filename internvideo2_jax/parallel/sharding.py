"""Sharded initialisation without materialising, and reports on how parameters are laid out.

    abstract = eval_shape(init)               # shapes + logical names, no memory
    shardings = logical_to_mesh_sharding(...)  # through the one rules table
    params = jit(init, out_shardings=shardings)()   # each device builds only its shard
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from internvideo2_jax.parallel.mesh import batch_sharding
from internvideo2_jax.parallel.rules import DEFAULT_RULES


def logical_specs(abstract_boxed) -> Any:
  """PartitionSpecs of logical names for a boxed (LogicallyPartitioned) tree."""
  return nn.get_partition_spec(abstract_boxed)


def mesh_specs(abstract_boxed, rules=DEFAULT_RULES) -> Any:
  """PartitionSpecs over mesh axes for a boxed tree."""
  return nn.logical_to_mesh(logical_specs(abstract_boxed), rules)


def shardings_for(init_fn: Callable[[], Any], mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings (through the rules table) for the variables `init_fn()` would create."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn)
    return nn.logical_to_mesh_sharding(logical_specs(abstract), mesh, rules)


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=DEFAULT_RULES):
  """Runs `init_fn()` (returning boxed variables) so each device materialises only its shard.

  Returns (variables unboxed, shardings tree).
  """
  shardings = shardings_for(init_fn, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
  return variables, shardings


def abstract_init(init_fn: Callable[[], Any]):
  """Boxed abstract variables (ShapeDtypeStructs with logical names); nothing is allocated."""
  return jax.eval_shape(init_fn)


def param_count(abstract_or_params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_or_params)))


def _shard_shape(shape, spec: P, mesh_shape: Mapping[str, int]):
  out = []
  for i, n in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    k = math.prod(mesh_shape[a] for a in axes)
    out.append(-(-n // k))  # uneven shards are padded to the ceiling
  return tuple(out)


def layout_report(abstract_boxed, mesh_shape: Mapping[str, int], rules=DEFAULT_RULES) -> dict:
  """Per-device parameter bytes and how much is replicated, for any mesh size (no devices).

  `mesh_shape` maps axis name -> size, e.g. {'data': 8, 'fsdp': 32, 'tensor': 1} for 256 chips.
  Returns totals plus the largest replicated parameters (candidates for a rule change).
  """
  specs = mesh_specs(abstract_boxed, rules)
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_boxed))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  total = per_device = replicated = 0
  uneven, big_replicated = [], []
  for (path, leaf), spec in zip(leaves, spec_leaves):
    itemsize = np.dtype(leaf.dtype).itemsize
    nbytes = math.prod(leaf.shape) * itemsize
    shard = _shard_shape(leaf.shape, spec, mesh_shape)
    total += nbytes
    per_device += math.prod(shard) * itemsize
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if math.prod(shard) == math.prod(leaf.shape):  # e.g. only over axes of size 1
      replicated += nbytes
      big_replicated.append((nbytes, name))
    for i, n in enumerate(leaf.shape):
      axes = spec[i] if i < len(spec) else None
      if axes is not None:
        k = math.prod(mesh_shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if n % k:
          uneven.append(f"{name} dim {i} ({n}) over {axes} ({k})")
  big_replicated.sort(reverse=True)
  return {
      "total_bytes": total,
      "per_device_bytes": per_device,
      "replicated_bytes": replicated,
      "replicated_fraction": replicated / max(total, 1),
      "largest_replicated": [f"{n} ({b / 2**20:.1f} MiB)" for b, n in big_replicated[:5]],
      "uneven": uneven,
  }


def format_report(report: dict) -> str:
  gib = 2 ** 30
  lines = [f"params {report['total_bytes'] / gib:.3f} GiB total, "
           f"{report['per_device_bytes'] / gib:.3f} GiB per device, "
           f"{100 * report['replicated_fraction']:.2f}% replicated"]
  if report["largest_replicated"]:
    lines.append("largest replicated: " + ", ".join(report["largest_replicated"]))
  if report["uneven"]:
    lines.append("padded (uneven) shards: " + "; ".join(report["uneven"][:5]))
  return "\n".join(lines)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host batch (this process's rows) -> global jax.Arrays split over the batch axes."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


__all__ = ["shardings_for", "init_sharded", "abstract_init", "param_count", "layout_report", "format_report",
           "shard_batch", "logical_specs", "mesh_specs"]
