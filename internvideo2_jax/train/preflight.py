"""Checks a training config before any work (model init takes tens of seconds at scale): one
message naming the key and the value that is wrong.

  preflight.check(config)        # raises ValueError / FileNotFoundError

Covers the batch size, the mesh against the devices and the batch, the corpora (annotation
files or shard globs exist, data_root directories exist) and the evaluation corpus. Corpora
the synthetic-data option writes at start (`data.synthetic_dir`) are allowed to be missing.
"""

from __future__ import annotations

import math
import os

import jax

from internvideo2_jax.data.sources import shard_paths


def check(config) -> None:
  from internvideo2_jax.parallel import mesh as mesh_lib
  data = config.data
  b = data.get("batch_size")
  if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
    raise ValueError(f"config.data.batch_size={b!r} must be a positive integer")
  sizes = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
  try:
    shape = mesh_lib.mesh_shape(sizes, jax.device_count())
  except ValueError as e:
    raise ValueError(f"config.mesh={sizes}: {e}") from None
  shards = math.prod(s for a, s in zip(mesh_lib.MESH_AXES, shape) if a in mesh_lib.BATCH_AXES)
  if b % shards:
    raise ValueError(f"config.data.batch_size={b} is not divisible by the {shards} batch shards of "
                     f"config.mesh={dict(zip(mesh_lib.MESH_AXES, shape))}")
  synthetic = data.get("synthetic_dir") or ""
  for n, corpus in enumerate(data.get("corpora", ()) or ()):
    _check_corpus(dict(corpus), f"config.data.corpora[{n}]", synthetic)
  ev = config.get("eval")
  if ev is not None:
    corpus = ev.get("corpus")
    if corpus is not None and corpus.get("path"):
      _check_corpus(dict(corpus), "config.eval.corpus", synthetic)
    qa = ev.get("qa")
    if qa is not None and qa.get("path"):
      _check_corpus(dict(qa, format="json"), "config.eval.qa", synthetic)


def _check_corpus(c: dict, where: str, synthetic: str) -> None:
  fmt, path, root = c.get("format", "json"), c.get("path", ""), c.get("data_root", "")
  if not path:
    raise ValueError(f"{where} needs a 'path'")
  if fmt in ("tfds",) or "://" in path:
    return  # a dataset name, or an object store: the reader reports it
  pending = bool(synthetic) and os.path.abspath(path).startswith(os.path.abspath(synthetic))
  if fmt in ("json", "csv", "labels") and not os.path.exists(path) and not pending:
    raise FileNotFoundError(f"{where}.path={path}: no such file")
  classes = c.get("classes", "")
  if classes and not os.path.exists(classes) and not (
      synthetic and os.path.abspath(classes).startswith(os.path.abspath(synthetic))):
    raise FileNotFoundError(f"{where}.classes={classes}: no such file")
  if fmt in ("array_record", "targets") and not pending:
    try:  # a glob, a directory or a `name-*-of-*` prefix, as the reader takes it
      shard_paths(path)
    except FileNotFoundError:
      raise FileNotFoundError(f"{where}.path={path}: no shards match (a glob, a directory of "
                              "*.array_record files or a name-*-of-* prefix)") from None
  if fmt not in ("json", "csv", "labels", "array_record", "tfds", "targets"):
    raise ValueError(f"{where}.format={fmt!r}: use json, csv, labels, array_record, tfds or targets")
  if root and "://" not in root and not os.path.isdir(root) and not pending and not (
      synthetic and os.path.abspath(root).startswith(os.path.abspath(synthetic))):
    raise FileNotFoundError(f"{where}.data_root={root}: no such directory")
