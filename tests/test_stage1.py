"""Stage 1: attention masking, teachers, converters, the loss, cached targets, compile, a run."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import stage1 as stage1_config
from streaming import assert_streams
from internvideo2_jax.convert.official import vision_to_state_dict
from internvideo2_jax.convert import teachers as TC
from internvideo2_jax.models import teachers as T
from internvideo2_jax.models.stage1 import cosine_distance, stage1_loss
from internvideo2_jax.ops import masking
from internvideo2_jax.data import targets
from internvideo2_jax.train import stage1


def test_attention_mask_counts_determinism_and_preference():
  hw, t, b = 16, 4, 3
  attn = jnp.tile(jnp.linspace(0.01, 1.0, hw)[None], (b * t, 1))
  attn = attn / attn.sum(-1, keepdims=True)
  m = masking.attention_mask(jax.random.key(0), attn, 0.75, b)
  assert m.shape == (b, t * hw)
  per_frame = (~np.asarray(m)).reshape(b, t, hw).sum(-1)
  assert (per_frame == hw - int(hw * 0.75)).all()
  np.testing.assert_array_equal(m, masking.attention_mask(jax.random.key(0), attn, 0.75, b))
  kept = np.zeros(hw)
  for s in range(200):
    kept += (~np.asarray(masking.attention_mask(jax.random.key(s), attn, 0.75, b))).reshape(-1, hw).sum(0)
  assert kept[-4:].sum() > 3 * kept[:4].sum()  # high-attention tokens are kept far more often
  assert (~np.asarray(masking.tube_mask(jax.random.key(1), 2, (4, 4, 4), 0.75))).reshape(2, 4, 16).sum(-1).tolist() == [[4] * 4] * 2


def test_teacher_outputs():
  ct = T.CLIPTeacher(T.clip_teacher_preset("tiny", return_layers=2))
  video = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
  p = ct.init(jax.random.key(1), video)
  out = ct.apply(p, video)
  assert out["tokens"].shape == (2, 2, 1 + 4 * 16, 48) and out["attn"].shape == (8, 16)
  np.testing.assert_allclose(np.linalg.norm(out["tokens"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["pooled"], axis=-1), 1.0, rtol=1e-5)
  assert (np.asarray(out["attn"]).sum(-1) < 1.0).all()  # the cls column was dropped
  tab = T.sinusoid_table(5, 8)
  assert tab[3, 2] == pytest.approx(np.sin(3 / 10000 ** (2 / 8))) and tab[3, 3] == pytest.approx(np.cos(3 / 10000 ** (2 / 8)))
  mt = T.MAETeacher(T.mae_teacher_preset("tiny", return_layers=2))
  v16 = jax.random.normal(jax.random.key(2), (2, 8, 32, 32, 3))
  mo = mt.apply(mt.init(jax.random.key(3), v16), v16)
  assert mo["tokens"].shape == (2, 2, 4 * 16, 40)


def test_teacher_converters_from_official_layouts():
  cfg = T.clip_teacher_preset("tiny", return_layers=2)
  ct = T.CLIPTeacher(cfg)
  params = jax.tree.map(np.asarray, nn.unbox(ct.init(jax.random.key(0), jnp.ones((1, 2, 32, 32, 3)))))["params"]
  sd = {f"vision_model.{k}": v for k, v in vision_to_state_dict(params["encoder"], cfg).items()}
  sd["vision_model.patch_embed.proj.weight"] = sd["vision_model.patch_embed.proj.weight"][:, :, 0]  # 2-D conv
  jax.tree.map(np.testing.assert_array_equal, TC.clip_teacher_from_state_dict(sd, cfg), params)
  assert_streams(lambda src, sink: TC.clip_teacher_from_state_dict(src, cfg, sink=sink), sd, params)

  mc = T.mae_teacher_preset("tiny", return_layers=2)
  d, h, depth, mlp = 40, 4, 3, 80
  rng = np.random.default_rng(0)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  sd = {"patch_embed.proj.weight": r(d, 3, 2, 8, 8), "patch_embed.proj.bias": r(d),
        "norm.weight": r(d), "norm.bias": r(d)}
  for i in range(depth):
    sd.update({f"blocks.{i}.norm1.weight": r(d), f"blocks.{i}.norm1.bias": r(d),
               f"blocks.{i}.attn.qkv.weight": r(3 * d, d), f"blocks.{i}.attn.q_bias": r(d),
               f"blocks.{i}.attn.v_bias": r(d), f"blocks.{i}.attn.proj.weight": r(d, d),
               f"blocks.{i}.attn.proj.bias": r(d), f"blocks.{i}.norm2.weight": r(d),
               f"blocks.{i}.norm2.bias": r(d), f"blocks.{i}.mlp.fc1.weight": r(mlp, d),
               f"blocks.{i}.mlp.fc1.bias": r(mlp), f"blocks.{i}.mlp.fc2.weight": r(d, mlp),
               f"blocks.{i}.mlp.fc2.bias": r(d)})
  p = TC.mae_teacher_from_state_dict(sd, mc)
  np.testing.assert_array_equal(p["blocks"]["qkv"]["kernel"][1, :, 2, 3], sd["blocks.1.attn.qkv.weight"][2 * d + 30:2 * d + 40].T)
  np.testing.assert_array_equal(p["blocks"]["v_bias"][2].reshape(-1), sd["blocks.2.attn.v_bias"])
  assert_streams(lambda src, sink: TC.mae_teacher_from_state_dict(src, mc, sink=sink), sd, p)
  out = T.MAETeacher(mc).apply({"params": p}, jnp.ones((1, 8, 32, 32, 3)))
  assert out["tokens"].shape == (2, 1, 64, 40)
  del sd["norm.bias"]
  with pytest.raises(ValueError, match="missing .*norm.bias"):
    TC.mae_teacher_from_state_dict(sd, mc)


def test_loss_is_zero_for_perfect_students_and_gathers_visible_positions():
  rng = np.random.default_rng(0)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.standard_normal(s))  # noqa: E731
  clip_t, mae_t, final_t = unit(2, 3, 1 + 10, 4), unit(2, 3, 10, 5), unit(3, 6)
  idx = np.array([[0, 4, 7], [2, 3, 9], [1, 5, 8]])
  student = {"visible_index": jnp.asarray(idx),
             "clip": jnp.concatenate([clip_t[:, :, :1], np.take_along_axis(clip_t[:, :, 1:], idx[None, :, :, None], 2)], 2),
             "mae": np.take_along_axis(mae_t, idx[None, :, :, None], 2), "final": jnp.asarray(final_t)}
  out = stage1_loss(student, jnp.asarray(clip_t), jnp.asarray(final_t), jnp.asarray(mae_t), (1.0, 1.0, 1.0))
  assert float(out["loss"]) == pytest.approx(0.0, abs=1e-6)
  assert float(cosine_distance(jnp.asarray(final_t), -jnp.asarray(final_t))) == pytest.approx(4.0)


def _tiny():
  c = stage1_config.get_config("size=tiny")
  student, clip_t, mae_t = stage1.build_models(c)
  return c, student, clip_t, mae_t


def test_cached_targets_give_the_same_loss_as_online_teachers():
  c, student, clip_t, mae_t = _tiny()
  c.train.targets_dtype = "bfloat16"
  video = np.random.default_rng(0).integers(0, 255, (4, 16, 32, 32, 3), dtype=np.uint8)
  k = jax.random.key(0)
  teachers = {"clip": clip_t.init(k, jnp.zeros((1, 8, 32, 32, 3)))["params"],
              "mae": mae_t.init(k, jnp.zeros((1, 16, 32, 32, 3)))["params"]}
  mask0 = jnp.zeros((1, 128), bool).at[:, 32:].set(True)
  sp = student.init({"params": k, "dropout": k}, jnp.zeros((1, 8, 32, 32, 3)), mask0, 32)["params"]
  from internvideo2_jax.train import optimizer as O, state as S
  params = {"student": sp, "teachers": teachers}
  flat = O.flatten(params)
  trainable = [key for key in flat if not key.startswith("teachers/")]
  tx = O.make_optimizer(ml_collections.ConfigDict({"lr": 1e-3, "total_steps": 10, "warmup_steps": 1,
                                                   "weight_decay": 0.05}), {key: flat[key] for key in trainable})
  state = S.create(params, tx, trainable)
  tcfg = ml_collections.ConfigDict(dict(c.train.to_dict(), data_norm="imagenet"))
  step = jax.jit(stage1.make_step(student, clip_t, mae_t, tx, tcfg))
  _, online = step(state, {"video": jnp.asarray(video)}, jax.random.key(5))
  tg = jax.tree.map(np.asarray, stage1.teacher_targets(teachers, __import__("internvideo2_jax.data.transforms", fromlist=["x"]).normalize(jnp.asarray(video)), clip_t, mae_t))
  examples = [targets.decode_example(targets.encode_example({
      "video": video[i], "label": 0, "clip_tokens": tg["clip_tokens"][:, i], "mae_tokens": tg["mae_tokens"][:, i],
      "clip_final": tg["clip_final"][i], "clip_attn": tg["clip_attn"].reshape(4, 8, -1)[i]})) for i in range(4)]
  batch = {key: jnp.asarray(np.stack([e[key] for e in examples])) for key in ("video",) + targets.TARGET_KEYS}
  _, cached = step(state, batch, jax.random.key(5))
  assert float(online.compute()["loss"]) == pytest.approx(float(cached.compute()["loss"]), rel=1e-6)


def test_1b_stage1_step_compiles_abstractly_with_a_memory_report():
  from internvideo2_jax.parallel import mesh as M, sharding
  from internvideo2_jax.train import optimizer as O, state as S
  from internvideo2_jax.train.loop import memory_report
  c = stage1_config.get_config("size=1B")
  c.model.vision.remat_policy = "full"
  student, clip_t, mae_t = stage1.build_models(c)
  mesh = M.make_mesh({"fsdp": 8})
  n_vis = 8 * masking.visible_per_frame(256, 0.8)
  mask0 = jnp.zeros((1, 2048), bool).at[:, n_vis:].set(True)
  init = lambda: {"params": {"student": student.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},  # noqa: E731
                                                     jnp.zeros((1, 8, 224, 224, 3)), mask0, n_vis)["params"]}}
  shard = sharding.shardings_for(init, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(jax.eval_shape(init)), nn.unbox(shard))
  flat = O.flatten(abstract["params"])
  tx = O.make_optimizer(ml_collections.ConfigDict({"lr": 1e-3, "total_steps": 10, "warmup_steps": 1,
                                                   "weight_decay": 0.05}), flat)
  state = jax.eval_shape(lambda p: S.create(p, tx, list(flat)), abstract["params"])
  b = 8
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  batch = {"video": jax.ShapeDtypeStruct((b, 16, 224, 224, 3), jnp.uint8, sharding=batch_sh),
           "clip_tokens": jax.ShapeDtypeStruct((b, 6, 2049, 3200), jnp.bfloat16, sharding=batch_sh),
           "clip_final": jax.ShapeDtypeStruct((b, 768), jnp.bfloat16, sharding=batch_sh),
           "clip_attn": jax.ShapeDtypeStruct((b, 8, 256), jnp.bfloat16, sharding=batch_sh),
           "mae_tokens": jax.ShapeDtypeStruct((b, 4, 2048, 1408), jnp.bfloat16, sharding=batch_sh)}
  tcfg = ml_collections.ConfigDict(dict(c.train.to_dict(), data_norm="imagenet"))
  step = stage1.make_step(student, clip_t, mae_t, tx, tcfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(__import__("internvideo2_jax.parallel.rules", fromlist=["x"]).DEFAULT_RULES):
    compiled = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
  report = memory_report(compiled)
  assert "per-device memory" in report and "temporaries" in report, report


def test_tiny_stage1_run_learns_resumes_and_hands_over_to_stage2(tmp_path):
  from configs import stage2 as stage2_config
  from internvideo2_jax.train import stage2
  c = stage1_config.get_config("size=tiny")
  syn = str(tmp_path / "syn")
  c.data.synthetic_dir, c.data.synthetic_train = syn, 16
  c.data.corpora = ({"format": "csv", "path": f"{syn}/train_stage1.csv", "data_root": syn},)
  c.train.total_steps, c.train.log_every, c.train.checkpoint_every = 16, 4, 8
  wd = str(tmp_path / "s1")
  stage1.run(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
  assert losses[-1] < 0.7 * losses[0]
  c.train.total_steps = 20
  assert stage1.run(c, wd)["step"] == 20  # resumed from step 16
  run = json.load(open(os.path.join(wd, "run.json")))
  assert run["starts"] == 2 and run["finished"] and run["step"] == 20 and run["train_s"] > 0
  s2 = stage2_config.get_config("size=tiny")
  s2.model.vision_init = os.path.join(wd, "export", "stage1_official_layout.safetensors")
  s2.data.synthetic_dir, s2.data.synthetic_train, s2.data.synthetic_val, s2.data.synthetic_size = syn + "2", 8, 4, 32
  s2.data.corpora = ({"format": "json", "path": f"{syn}2/train.json", "data_root": syn + "2"},)
  s2.train.total_steps, s2.train.log_every, s2.train.mlm_max_positions = 1, 1, 4
  # a caption with a lone surrogate is refused when parsed, and the run says so
  from internvideo2_jax.data import synthetic
  synthetic.write_corpus(syn + "2", train=8, val=4, size=32)
  rows = json.load(open(f"{syn}2/train.json"))
  json.dump(rows + [dict(rows[0], captions="broken \ud800")], open(f"{syn}2/train.json", "w"))
  res = stage2.run(s2, str(tmp_path / "s2"))
  assert res["step"] == 1 and "match" in res
  assert res["data"]["refused_at_parse"] == {"bad_caption": 1} and res["data"]["examples_loaded"] == 8
  record = json.loads(open(tmp_path / "s2" / "metrics.jsonl").readline())
  assert record["train/data_refused_at_parse/bad_caption"] == 1
  assert record["train/mlm_dropped"] >= 0  # the capped MLM (a speed option) counts what it drops
  saved = json.load(open(tmp_path / "s2" / "eval_retrieval.json"))
  assert saved["data"]["refused_at_parse"] == {"bad_caption": 1}
  assert os.path.getsize(tmp_path / "s2" / "curves.png") > 1000
  # started again once finished, a run only reports its results: no data pipeline (its
  # annotation file is gone), no training, evaluation or export
  os.remove(f"{syn}2/train.json")
  again = stage2.run(s2, str(tmp_path / "s2"))
  assert again["step"] == 1 and again["match"] == json.loads(json.dumps(res["match"]))
  assert again["run"]["starts"] == 1
