"""The `compile` job (a config's real step compiled ahead of time for a TPU topology this machine
does not have), the multi-host start settings, and sharded weight placement."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from internvideo2_jax.parallel import distributed, mesh as M, sharding as S
from internvideo2_jax.train import compile as C, flops


def _libtpu():
  try:
    return C.find_libtpu()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_tiny_stage2_step_compiles_for_a_v5p_topology(tmp_path):
  _libtpu()
  from configs import stage2 as stage2_config
  cfg = stage2_config.get_config("size=tiny")
  cfg.job = "compile"
  cfg.mesh.data, cfg.mesh.fsdp = 2, 2
  cfg.compile.topology = "v5p:2x2x1"
  res = C.run(cfg, str(tmp_path))
  assert res["device_kind"] == "TPU v5" and res["chips"] == 4 and res["mesh"]["fsdp"] == 2
  assert 0 < res["total_gib"] < 1 and res["fits"] and res["verdict"].startswith("FITS")
  assert res["hbm_gib"] == pytest.approx(95e9 / 2 ** 30)
  assert 0 < res["mfu_bound"] <= res["remat_bound"] <= 1 and res["xla_tflops_per_chip"] > 0
  assert json.loads((tmp_path / "compile_v5p_2x2x1.json").read_text())["chips"] == 4
  cfg.compile.topology = "v5p:banana"
  with pytest.raises(ValueError, match="compile.topology='v5p:banana'"):
    C.compile_config(cfg)


def test_meshes_follow_the_torus_and_the_slices(caplog):
  """Pod meshes map onto the physical topology: a 64-wide fsdp axis on the 16x16 v6e torus is a
  16 x 4 block of neighbours (split physical axes, no device-order fallback); on two slices
  only the data axis crosses between them."""
  _libtpu()
  torus = C.topology_devices("v6e:16x16")
  with caplog.at_level("WARNING"):
    mesh = M.make_mesh({"data": -1, "fsdp": 64}, torus)
  assert "does not map" not in caplog.text and dict(mesh.shape) == {"data": 4, "fsdp": 64, "tensor": 1}
  block = {tuple(d.coords[:2]) for d in mesh.devices[0, :, 0]}
  xs, ys = sorted({c[0] for c in block}), sorted({c[1] for c in block})
  assert len(block) == 64 and len(xs) * len(ys) == 64 and max(xs) - min(xs) + 1 == len(xs)
  sliced = C.topology_devices("v5p:2x2x2", num_slices=2)
  mesh = M.make_mesh({"data": -1, "fsdp": 8}, sliced)
  assert {d.slice_index for d in mesh.devices[0].flat} == {0}
  assert {d.slice_index for d in mesh.devices[:, 0, 0]} == {0, 1}
  with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of the slice count"):
    M.make_mesh({"data": 1, "fsdp": 16}, sliced)


def test_compile_needs_a_training_step():
  from configs import features
  cfg = features.get_config()
  with pytest.raises(ValueError, match="no training step to compile"):
    C.compile_config(cfg)


def test_chip_table_knows_the_kinds_devices_report():
  assert flops.chip("TPU v5").name == "v5p" and flops.chip("TPU v5 lite").name == "v5e"
  assert flops.chip("TPU v6 lite").name == "v6e" and flops.chip("TPU v4").peak_tflops == 275
  assert flops.chip("NVIDIA H100 80GB HBM3").name == "H100" and flops.chip("NVIDIA H200").hbm_gb == 141
  assert flops.chip("NVIDIA H100 PCIe").peak_tflops == 756 and flops.chip("cpu") is None


def test_distributed_settings_are_checked_before_starting(monkeypatch):
  for k in ("IV2_COORDINATOR_ADDRESS", "IV2_NUM_PROCESSES", "IV2_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  cfg = ml_collections.ConfigDict({"mode": "auto", "coordinator_address": "10.0.0.1:1234", "num_processes": 0,
                                   "process_id": -1, "local_device_ids": "", "timeout_s": 5})
  with pytest.raises(ValueError, match="distributed.num_processes and distributed.process_id"):
    distributed.initialize(cfg)
  monkeypatch.setenv("IV2_NUM_PROCESSES", "2")
  monkeypatch.setenv("IV2_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, 2\)"):
    distributed.initialize(cfg)
  with pytest.raises(ValueError, match="distributed.mode='on'"):
    distributed.initialize(ml_collections.ConfigDict({"mode": "on"}))
  monkeypatch.delenv("IV2_NUM_PROCESSES")
  monkeypatch.delenv("IV2_PROCESS_ID")
  cfg.coordinator_address = ""
  assert distributed.initialize(cfg) == "single process"  # no cluster here: nothing started


def test_placer_puts_host_weights_into_their_shards_and_names_bad_ones():
  mesh = M.make_mesh({"data": 2, "fsdp": 4})
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  abstract = {"enc": {"kernel": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sh),
                      "bias": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=S.NamedSharding(mesh, S.P()))}}
  placer = S.Placer(abstract)
  w = np.arange(24, dtype=np.float32).reshape(8, 3)
  placer.put_tree(("enc",), {"kernel": w})
  init = {"enc": {"kernel": jnp.zeros((8, 3)), "bias": jnp.ones((3,))}}
  merged = placer.merge(init)
  np.testing.assert_array_equal(merged["enc"]["kernel"], w)
  assert merged["enc"]["kernel"].sharding == sh and merged["enc"]["kernel"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(merged["enc"]["bias"], 1.0)  # not loaded: keeps its init
  with pytest.raises(ValueError, match="enc/kernel has shape \\(3, 8\\), the model expects \\(8, 3\\)"):
    placer.put(("enc", "kernel"), w.T)
  with pytest.raises(KeyError, match="the model has no enc/gamma"):
    placer.put(("enc", "gamma"), w)
