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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from internvideo2_jax.parallel.mesh import batch_sharding
from internvideo2_jax.parallel.rules import DEFAULT_RULES


def logical_specs(abstract_boxed) -> Any:
  """PartitionSpecs of logical names for a boxed (LogicallyPartitioned) tree."""
  return nn.get_partition_spec(abstract_boxed)


def mesh_specs(abstract_boxed, rules=DEFAULT_RULES) -> Any:
  """PartitionSpecs over mesh axes for a boxed tree."""
  return nn.logical_to_mesh(logical_specs(abstract_boxed), rules)


def abstract_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules=DEFAULT_RULES):
  """ShapeDtypeStructs (unboxed) with the NamedShardings the rules give `init_fn()`'s variables;
  nothing is allocated. Indivisible layouts are refused with a clear message."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn)
  check_divisible(abstract, dict(mesh.shape), rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(logical_specs(abstract), mesh, rules)
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      nn.unbox(abstract), nn.unbox(shardings))


def shardings_for(init_fn: Callable[[], Any], mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings (through the rules table) for the variables `init_fn()` would create."""
  return jax.tree.map(lambda x: x.sharding, abstract_sharded(init_fn, mesh, rules))


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
    out.append(-(-n // k))  # an indivisible dim is reported in `uneven` (jit refuses it)
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
      "uneven": uneven,          # dims not divisible by their mesh axes: not a valid layout
  }


def format_report(report: dict) -> str:
  gib = 2 ** 30
  lines = [f"params {report['total_bytes'] / gib:.3f} GiB total, "
           f"{report['per_device_bytes'] / gib:.3f} GiB per device, "
           f"{100 * report['replicated_fraction']:.2f}% replicated"]
  if report["largest_replicated"]:
    lines.append("largest replicated: " + ", ".join(report["largest_replicated"]))
  if report["uneven"]:
    lines.append(f"NOT DIVISIBLE ({len(report['uneven'])} parameters; jit refuses such shardings, "
                 "change the mesh sizes or the sharding rules): " + "; ".join(report["uneven"][:5]))
  return "\n".join(lines)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Host batch (this process's rows) -> global jax.Arrays split over the batch axes."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, v.ndim)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def check_divisible(abstract_boxed, mesh_shape: Mapping[str, int], rules=DEFAULT_RULES, what: str = "model") -> None:
  """Raises a clear error (parameter, dim, mesh axes, fitting sizes) before jit's IndivisibleError."""
  report = layout_report(abstract_boxed, mesh_shape, rules)
  if report["uneven"]:
    sizes = ", ".join(f"{a}={n}" for a, n in mesh_shape.items())
    raise ValueError(f"the {what} cannot be sharded over the mesh ({sizes}): "
                     f"{len(report['uneven'])} parameter dims are not divisible by their mesh axes, e.g. "
                     + "; ".join(report["uneven"][:4])
                     + ". Pick mesh sizes that divide these dims (e.g. fsdp a power of two dividing the "
                       "width) or change config.sharding_rules.")


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh: Mesh):
  """Optimizer-state shardings: every copy of the params in the state (Adam moments, gradient
  accumulators) sharded exactly like its parameter; counters and other scalars replicated."""
  import optax
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated)


class Placer:
  """Puts host (numpy) weights into the sharded arrays of an abstract params tree, leaf by leaf.

  Each process builds only the shards its own devices hold (`make_array_from_callback`), so a
  multi-host load never fetches a global array to a host, and the host copy of a leaf can be
  dropped as soon as it is placed. Paths are tuples of keys; `merge` swaps the placed leaves
  into the initialised params (everything not loaded keeps its sharded init).
  """

  def __init__(self, abstract):
    self.abstract = abstract
    self.placed: dict[tuple, jax.Array] = {}

  def put(self, path: tuple, value) -> None:
    leaf = self.abstract
    for i, k in enumerate(path):
      if not isinstance(leaf, Mapping) or k not in leaf:
        raise KeyError(f"loaded weight {'/'.join(path)}: the model has no {'/'.join(path[:i + 1])}")
      leaf = leaf[k]
    value = np.asarray(value)
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"loaded weight {'/'.join(path)} has shape {value.shape}, the model "
                            f"expects {tuple(leaf.shape)}")
    dtype = leaf.dtype
    self.placed[tuple(path)] = jax.make_array_from_callback(
        tuple(leaf.shape), leaf.sharding, lambda idx: np.asarray(value[idx], dtype))

  def sink(self, prefix: tuple):
    """`sink(path, value)` for the streaming converters: places each leaf under `prefix`."""
    return lambda path, value: self.put(tuple(prefix) + tuple(path), value)

  def put_tree(self, prefix: tuple, tree: Mapping) -> None:
    """Places every leaf of a nested dict under `prefix`, releasing each host leaf once placed."""
    for k in list(tree):
      v = tree.pop(k) if isinstance(tree, dict) else tree[k]
      if isinstance(v, Mapping):
        self.put_tree(prefix + (k,), v)
      else:
        self.put(prefix + (k,), v)

  def merge(self, params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    treedef = jax.tree.structure(params)
    leaves = [self.placed.get(tuple(getattr(k, "key", k) for k in path), v) for path, v in flat]
    return jax.tree.unflatten(treedef, leaves)


def global_from_host(array: np.ndarray, sharding_: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full: each process transfers
  only the shards of its own devices (no cross-host traffic)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding_, lambda idx: array[idx])


def to_host(x) -> np.ndarray:
  """The whole value of a global array as numpy, on every process. Arrays held entirely by this
  process are read directly; others are gathered with `process_allgather`, a collective: every
  process must make the same call."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  from internvideo2_jax.parallel import distributed
  distributed.sync("gather")  # all hosts arrive before the gather (CPU collectives wait 30 s only)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on its leading (batch) axis, in global order: the
  counterpart of `shard_batch` for outputs (no cross-host traffic)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  seen, parts = set(), []
  for sh in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = sh.index[0].start or 0
    if start not in seen:  # replicas over non-batch axes hold the same rows
      seen.add(start)
      parts.append(np.asarray(sh.data))
  return np.concatenate(parts)


__all__ = ["abstract_sharded", "shardings_for", "init_sharded", "check_divisible", "opt_state_shardings", "Placer",
           "global_from_host", "to_host", "local_rows", "abstract_init", "param_count", "layout_report", "format_report",
           "shard_batch", "logical_specs", "mesh_specs"]
