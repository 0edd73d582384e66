"""Meshes, the rules table, sharded init and sharded forward on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from internvideo2_jax.models.vit import VisionEncoder, vit_preset
from internvideo2_jax.parallel import mesh as M
from internvideo2_jax.parallel import rules as R
from internvideo2_jax.parallel import sharding as S


def test_mesh_shape_fills_one_wildcard():
  assert M.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert M.mesh_shape({"fsdp": -1}, 256) == (1, 256, 1)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    M.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="cannot be split"):
    M.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ValueError, match="needs 4 devices, have 8"):
    M.mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    M.mesh_shape({"model": 2}, 8)


def test_mesh_has_auto_axes():
  mesh = M.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_overrides_are_checked():
  assert dict(R.rules_from_config({"embed": None}))["embed"] is None
  with pytest.raises(ValueError, match="unknown logical axis"):
    R.rules_from_config({"embeddings": None})
  with pytest.raises(ValueError, match="mesh axes are"):
    R.rules_from_config({"embed": "model"})


def test_fsdp_tp_forward_equals_single_device():
  cfg = vit_preset("tiny", return_layers=(0,))
  model = VisionEncoder(cfg)
  video = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 32, 32, 3)), jnp.float32)
  mask = np.zeros((4, 64), bool)
  mask[:, ::4] = True
  mesh = M.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params, shardings = S.init_sharded(lambda: model.init(jax.random.key(0), video), mesh)
  qkv = params["params"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)
  assert qkv.addressable_shards[0].data.shape == (2, 32, 3, 2, 16)  # a real shard, not a copy
  assert params["params"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")

  frames = S.shard_batch({"v": np.asarray(video)}, mesh)["v"]
  assert frames.sharding.spec == P(("data", "fsdp"), None, None, None, None)

  @jax.jit
  def fwd(p, v, m):
    return model.apply(p, v, mask=m, num_visible=48)

  with jax.set_mesh(mesh), nn.logical_axis_rules(R.DEFAULT_RULES):
    sharded = fwd(params, frames, jnp.asarray(mask))
  local = jax.tree.map(np.asarray, params)
  single = model.apply(local, video, mask=mask)
  for k in ("tokens", "pooled", "intermediates"):
    np.testing.assert_allclose(sharded[k], single[k], atol=1e-5, rtol=1e-5)
  assert sharded["tokens"].sharding.spec[0] == ("data", "fsdp")


def test_6b_layout_on_256_devices_without_allocating():
  cfg = vit_preset("6B", num_frames=4)
  abstract = S.abstract_init(
      lambda: VisionEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4, 224, 224, 3))))
  report = S.layout_report(abstract, {"data": 8, "fsdp": 32, "tensor": 1})
  assert report["total_bytes"] == 5_938_458_368 * 4
  assert report["replicated_fraction"] < 1e-3  # only norms / LayerScale vectors
  sharded = report["total_bytes"] - report["replicated_bytes"]
  assert report["per_device_bytes"] == sharded // 32 + report["replicated_bytes"]
  assert report["per_device_bytes"] < 0.76e9  # ~0.7 GiB of fp32 params per chip
  assert not report["uneven"]
  # 25 heads over tensor=4 does not divide: the report says so instead of failing later
  tp = S.layout_report(abstract, {"data": 4, "fsdp": 16, "tensor": 4})
  assert any("qkv/kernel dim 3 (25)" in u for u in tp["uneven"])
  assert "GiB per device" in S.format_report(report)
  assert "NOT DIVISIBLE" in S.format_report(tp) and "jit refuses" in S.format_report(tp)
  # fsdp over all 256 chips does not divide the 3200-wide weights; the configs' fsdp=64 does
  assert S.layout_report(abstract, {"data": 1, "fsdp": 256, "tensor": 1})["uneven"]
  assert not S.layout_report(abstract, {"data": 4, "fsdp": 64, "tensor": 1})["uneven"]


def test_indivisible_mesh_is_refused_before_jit_with_the_parameter_named():
  from internvideo2_jax.models.text import TextEncoder, text_preset
  mesh = M.make_mesh({"data": 1, "fsdp": 8})
  cfg = text_preset("tiny", hidden_size=36, num_heads=6, intermediate_size=72, encoder_width=36)
  ids = jnp.ones((1, 8), jnp.int32)
  init = lambda: TextEncoder(cfg).init(jax.random.key(0), ids, ids)  # noqa: E731 - 36 % 8 != 0
  with pytest.raises(ValueError, match=r"cannot be sharded over the mesh \(data=1, fsdp=8, tensor=1\).* dim .*\(36\) over fsdp \(8\)"):
    S.init_sharded(init, mesh)


def test_optimizer_state_is_sharded_like_the_params_on_8_devices():
  """Adam moments (and counters) get explicit shardings: each moment exactly its parameter's,
  so per-device optimizer bytes fall with FSDP instead of being replicated."""
  from configs import stage2 as stage2_config
  from internvideo2_jax.train import loop, optimizer as opt_lib, stage2
  cfg = stage2_config.get_config("size=tiny")
  cfg.mesh.data, cfg.mesh.fsdp = 1, 8
  mesh = M.make_mesh(cfg.mesh.to_dict())
  parts = stage2.step_parts(cfg, mesh)
  state = loop.materialize(parts, mesh)
  params = opt_lib.flatten(state.params)
  adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
  sharded = 0
  for moments in (adam.mu, adam.nu):
    for k, m in moments.items():
      assert m.sharding == params[k].sharding, k
      assert m.addressable_shards[0].data.shape == params[k].addressable_shards[0].data.shape, k
      sharded += "fsdp" in str(m.sharding.spec)
  assert sharded > 10  # the large kernels really are split over fsdp
  opt_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.opt_state))
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  assert opt_bytes < 0.3 * full_bytes  # per device, not a replica of the whole state


def test_batch_divisibility_is_checked():
  mesh = M.make_mesh({"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    M.global_batch_size_ok(mesh, 12)
