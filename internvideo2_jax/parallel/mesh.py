"""Device mesh from config: axes (data, fsdp, tensor), one size may be -1 (filled in)."""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from internvideo2_jax.parallel.rules import BATCH_AXES, MESH_AXES

log = logging.getLogger(__name__)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {'data': -1, 'fsdp': 2, 'tensor': 1} against a device count."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  wild = [i for i, s in enumerate(shape) if s == -1]
  if len(wild) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if wild:
    if num_devices % fixed:
      raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed sizes "
                       f"{dict(zip(MESH_AXES, shape))}")
    shape[wild[0]] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"have {num_devices}")
  return tuple(shape)


def _slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def physical_layout(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices arranged for `shape` along the physical topology, best layout first.

  1. jax.make_mesh: each mesh axis on whole torus axes / NVLink domains.
  2. several TPU slices (multislice, DCN between them): the data axis spans the slices
     (only data-parallel gradients cross the slow links), each slice laid out as in 1/3.
  3. split physical axes (e.g. fsdp=64 on a 16x16 v6e torus as 16 x 4 rows): still
     neighbours on the torus, unlike the device order.
  Raises ValueError when none applies; the caller falls back to the device order.
  """
  from jax.experimental import mesh_utils
  n_slices = _slices(devices)
  if n_slices > 1:
    data = MESH_AXES.index("data")
    if shape[data] % n_slices:
      raise ValueError(f"{n_slices} TPU slices: mesh.data={shape[data]} must be a multiple of the "
                       f"slice count so that only the data axis crosses the slow links between slices")
    dcn = tuple(n_slices if i == data else 1 for i in range(len(shape)))
    ici = tuple(s // d for s, d in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  errors = []
  try:
    return jax.make_mesh(shape, MESH_AXES, devices=devices).devices
  except (ValueError, NotImplementedError, AssertionError) as e:
    errors.append(str(e))
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError) as e:
    errors.append(str(e))
  raise ValueError("; ".join(errors))


def make_mesh(sizes: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with Auto axis types (GSPMD propagation + logical rules), default all-data."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(sizes or {"data": -1}), len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    return Mesh(physical_layout(shape, devices), MESH_AXES, axis_types=types)
  except (ValueError, NotImplementedError, AssertionError) as e:
    if _slices(devices) > 1:
      raise
    log.warning("mesh %s does not map onto the %d-device topology (%s); using the plain device "
                "order, whose collectives may cross slow links. Sizes that divide the torus "
                "axes map well (e.g. fsdp=64 on 4x8x8).", dict(zip(MESH_AXES, shape)), len(devices), e)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over every batch axis of the mesh, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch_size_ok(mesh: Mesh, batch: int) -> None:
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch % n:
    raise ValueError(f"global batch {batch} is not divisible by the {n} batch shards "
                     f"({', '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)})")
