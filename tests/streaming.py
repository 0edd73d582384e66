"""Checks that a weight converter streams: leaves are handed over one at a time."""

import jax
import numpy as np


class _CountingReads(dict):
  """A state dict that counts the tensors read so far."""
  reads = 0

  def __getitem__(self, key):
    self.reads += 1
    return super().__getitem__(key)


def assert_streams(convert, sd, want):
  """`convert(state_dict, sink)` hands over each leaf as soon as it is ready: the first arrives
  before most tensors are read, nothing is kept in the returned tree, and the leaves equal `want`."""
  src, got, reads_at_first = _CountingReads(sd), {}, []

  def sink(path, value):
    reads_at_first.append(src.reads)
    got[tuple(path)] = np.asarray(value)

  rest = convert(src, sink)
  assert not jax.tree.leaves(rest) and reads_at_first[0] < len(sd) // 2
  flat = {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  assert got.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(got[k], flat[k])
