"""Stage-2 objectives, optimizer rules, retrieval metrics and conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from internvideo2_jax.convert.official import stage2_from_state_dict, stage2_to_state_dict
from internvideo2_jax.evaluate.retrieval import dual_softmax, recall_metrics
from internvideo2_jax.models.stage2 import Stage2Model, stage2_config
from internvideo2_jax.models.text import text_preset
from internvideo2_jax.models.vit import vit_preset
from internvideo2_jax.ops import losses as L
from internvideo2_jax.parallel import mesh as M
from internvideo2_jax.train import optimizer as O, state as S


def test_vtc_soft_targets_treat_duplicates_as_positives():
  v = L.l2_normalize(jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
  t = v
  ids = jnp.asarray([7, 7, 9])
  loss = L.vtc_loss(v, t, ids, 1.0)
  sim = np.asarray(v @ t.T)
  logp = sim - np.log(np.exp(sim).sum(1, keepdims=True))
  tgt = np.array([[.5, .5, 0], [.5, .5, 0], [0, 0, 1]])
  want = -(logp * tgt).sum(1).mean()  # symmetric matrix: both directions equal
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert L.vtc_scale("official", 64) == 1 / 64 and L.vtc_scale("1.0", 64) == 1.0


def test_vtc_loss_and_gradients_on_8_devices_equal_single_device():
  rng = np.random.default_rng(0)
  v = rng.standard_normal((16, 8)).astype(np.float32)
  t = rng.standard_normal((16, 8)).astype(np.float32)
  ids = rng.integers(0, 10, 16).astype(np.int32)  # with duplicates

  def f(v, t, ids, temp):
    return L.vtc_loss(L.l2_normalize(v), L.l2_normalize(t), ids, temp)

  grad_fn = jax.value_and_grad(f, argnums=(0, 1, 3))
  single = grad_fn(v, t, ids, 0.07)
  mesh = M.make_mesh({"data": 4, "fsdp": 2})
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  args = [jax.device_put(x, sh) for x in (v, t, ids)]
  assert len(args[0].addressable_shards) == 8
  sharded = jax.jit(grad_fn)(*args, 0.07)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
  for a, b in zip(sharded[1], single[1]):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_hard_negatives_follow_the_official_weights():
  rng = np.random.default_rng(0)
  n, groups = 8, 2
  v = L.l2_normalize(jnp.asarray(rng.standard_normal((n, 4)), jnp.float32))
  t = L.l2_normalize(jnp.asarray(rng.standard_normal((n, 4)), jnp.float32))
  ids = jnp.asarray([0, 1, 1, 3, 4, 5, 6, 7])  # samples 1 and 2 are the same video
  draws = jax.vmap(lambda k: L.hard_negatives(k, v, t, ids, 0.5, groups))(jax.random.split(jax.random.key(0), 4000))
  neg_t, neg_v = (np.asarray(x) for x in draws)
  assert neg_t.min() >= 0 and neg_t.max() < 4  # indices within the local batch (group)
  for i in range(n):
    lo = (i // 4) * 4
    assert ids[i] not in np.asarray(ids)[lo + neg_t[:, i]]  # never a positive
  # the in-group gather is the global gather at offset group * b
  x = jnp.arange(n * 3.0).reshape(n, 3)
  np.testing.assert_array_equal(L.take_in_groups(x, jnp.asarray(neg_v[0]), groups),
                                np.asarray(x)[neg_v[0] + np.repeat([0, 4], 4)])
  # frequencies follow softmax(sim / temp) of the local batch with positives zeroed
  sim = np.asarray(v @ t.T)[0, :4] / 0.5
  w = np.exp(sim - sim.max())
  w[0] = 0
  freq = np.bincount(neg_t[:, 0], minlength=4) / len(neg_t)
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.03)
  np.testing.assert_array_equal(L.itm_labels(3), [1, 1, 1, 0, 0, 0, 0, 0, 0])


def test_mlm_masking_rules():
  ids = jnp.tile(jnp.asarray([[101, 2000, 2001, 2002, 2003, 102, 0, 0]]), (4000, 1))
  masked, targets, chosen = L.mlm_mask(jax.random.key(0), ids, vocab_size=30522, mask_token_id=103)
  chosen = np.asarray(chosen)
  assert not chosen[:, 0].any() and not chosen[:, 6:].any()  # never [CLS] or [PAD]
  assert chosen[:, 5].mean() == pytest.approx(0.5, abs=0.03)   # [SEP] can be chosen
  m = np.asarray(masked)[chosen]
  orig = np.asarray(ids)[chosen]
  assert (m == 103).mean() == pytest.approx(0.8, abs=0.02)
  assert ((m != 103) & (m == orig)).mean() == pytest.approx(0.1, abs=0.02)
  assert np.array_equal(np.asarray(masked)[~chosen], np.asarray(ids)[~chosen])
  pos, valid, dropped = L.select_positions(jnp.asarray(chosen[:3]), 4)
  for r in range(3):
    want = np.flatnonzero(chosen[r])[:4]
    np.testing.assert_array_equal(np.asarray(pos[r])[np.asarray(valid[r])], want)
  assert float(dropped) == np.maximum(chosen[:3].sum(1) - 4, 0).sum()
  # the default keeps every chosen position (31-token captions at prob 0.5: a 16 cap drops some)
  many = np.asarray(jax.random.bernoulli(jax.random.key(1), 0.5, (512, 32)))
  pos, valid, dropped = L.select_positions(jnp.asarray(many))
  assert float(dropped) == 0 and int(valid.sum()) == many.sum()
  assert float(L.select_positions(jnp.asarray(many), 16)[2]) > 0
  assert L.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32),
                         jnp.asarray([[1, 0, 0], [0, 0, 0]], jnp.float32)) == pytest.approx(np.log(5))


def test_recall_metrics_on_a_hand_made_matrix():
  # 3 videos, 4 texts; text 3 is a second caption of video 0
  txt2vid = np.array([0, 1, 2, 0])
  v2t = np.array([[0.1, 0.9, 0.0, 0.5],    # video 0: best gt (text 3) ranks 2nd -> R@1 miss
                  [0.0, 0.8, 0.1, 0.2],    # video 1: text 1 first
                  [0.3, 0.2, 0.6, 0.1]])   # video 2: text 2 first
  r = recall_metrics(v2t, v2t.T, txt2vid)
  assert r["v2t_r1"] == pytest.approx(200 / 3) and r["v2t_r5"] == 100
  # t2v: text 0 -> column [0.1, 0.0, 0.3]: video 2 first (miss); text 1 -> video 0 (miss);
  # text 2 -> video 2 (hit); text 3 -> video 0 (hit)
  assert r["t2v_r1"] == 50 and r["t2v_r5"] == 100
  ds = dual_softmax(v2t)
  np.testing.assert_allclose(ds[:, 0], v2t[:, 0] * np.exp(v2t[:, 0]) / np.exp(v2t[:, 0]).sum())


def test_optimizer_masks_schedule_and_freezing():
  flat = {"vision_encoder/blocks/attn/qkv/kernel": np.zeros((2, 4, 3, 2, 2)),
          "vision_encoder/blocks/attn/proj/bias": np.zeros((2, 4)),
          "vision_encoder/blocks/norm1/weight": np.zeros((2, 4)),
          "vision_encoder/pos_embed": np.zeros((1, 5, 4)),
          "vision_encoder/cls_token": np.zeros((1, 1, 4)),
          "vision_encoder/patch_embed/proj/kernel": np.zeros((1, 2, 2, 3, 4)),
          "text_encoder/bert/embeddings/word_embeddings/embedding": np.zeros((10, 4)),
          "temp": np.zeros(())}
  mask = O.decay_mask(flat)
  assert [k for k, v in mask.items() if v] == ["vision_encoder/blocks/attn/qkv/kernel",
                                               "vision_encoder/patch_embed/proj/kernel",
                                               "text_encoder/bert/embeddings/word_embeddings/embedding"]
  assert not any(O.decay_mask(flat, (r"^text_encoder/",))[k] for k in flat if k.startswith("text"))
  freeze, unfreeze = O.freeze_patterns(ml_collections.ConfigDict(
      {"freeze_vision": True, "freeze_text": False, "unfreeze_keys": (r"/pos_embed$",)}))
  assert O.trainable_keys(flat, freeze, unfreeze) == ["vision_encoder/pos_embed",
                                                      "text_encoder/bert/embeddings/word_embeddings/embedding", "temp"]
  sched = O.lr_schedule(1.0, 110, 10, 0.01)
  assert float(sched(0)) == pytest.approx(0.01) and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0) and float(sched(60)) == pytest.approx(0.5)
  assert float(sched(110)) == pytest.approx(0.01)
  scales = O.layer_decay_scales(flat, 0.9, depth=2)
  np.testing.assert_allclose(np.ravel(scales["vision_encoder/blocks/attn/qkv/kernel"]), [0.81, 0.9], rtol=1e-6)
  assert scales["vision_encoder/cls_token"] == pytest.approx(0.729) and scales["temp"] == 1.0


def test_frozen_params_have_no_optimizer_state_and_bad_updates_are_skipped():
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((3,))}}
  cfg = ml_collections.ConfigDict({"lr": 0.1, "total_steps": 10, "warmup_steps": 0, "weight_decay": 0.0,
                                   "max_grad_norm": 1.0})
  tx = O.make_optimizer(cfg, {"a/kernel": params["a"]["kernel"]})
  st = S.create(params, tx, ["a/kernel"])
  leaves = jax.tree.leaves(st.opt_state)
  assert all(x.size in (1, 4) for x in leaves)  # moments only for a/kernel (and scalar counts)
  good = S.apply_gradients(st, tx, {"a/kernel": jnp.ones((2, 2))}, ok=jnp.asarray(True))
  assert not np.allclose(good.params["a"]["kernel"], 1.0) and np.allclose(good.params["b"]["kernel"], 1.0)
  bad = S.apply_gradients(st, tx, {"a/kernel": jnp.full((2, 2), jnp.nan)}, ok=jnp.asarray(False))
  np.testing.assert_array_equal(bad.params["a"]["kernel"], 1.0)
  assert int(bad.skipped) == 1 and int(bad.step) == 1


def _tiny_stage2():
  cfg = stage2_config(vit_preset("tiny"), text_preset("tiny"), embed_dim=16)
  model = Stage2Model(cfg)
  video = jnp.ones((2, 4, 32, 32, 3))
  ids = jnp.ones((2, 6), jnp.int32)
  return cfg, model, video, ids


def test_stage2_official_round_trip_and_temperature_clamp():
  cfg, model, video, ids = _tiny_stage2()
  params = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), video, ids, ids)))
  sd = stage2_to_state_dict(params, cfg)
  for key in ("vision_encoder.blocks.1.attn.qkv.weight", "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
              "text_encoder.cls.predictions.decoder.weight", "vision_proj.weight", "text_proj.weight",
              "itm_head.weight", "temp"):
    assert key in sd
  assert sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"].shape == (48, 64)
  back = stage2_from_state_dict(sd, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  big = jax.tree.map(lambda x: x, params)
  big["params"]["temp"] = np.asarray(3.0, np.float32)
  assert float(model.apply(big, method=Stage2Model.get_temp)) == 0.5


def test_gradient_accumulation_applies_every_k_steps():
  params = {"a": {"kernel": jnp.ones((2,))}}
  cfg = ml_collections.ConfigDict({"lr": 0.1, "total_steps": 10, "warmup_steps": 0, "weight_decay": 0.0,
                                   "grad_accum_steps": 2, "schedule": "constant"})
  tx = O.make_optimizer(cfg, {"a/kernel": params["a"]["kernel"]})
  st = S.create(params, tx, ["a/kernel"])
  g = {"a/kernel": jnp.ones((2,))}
  st1 = S.apply_gradients(st, tx, g, ok=jnp.asarray(True))
  np.testing.assert_array_equal(st1.params["a"]["kernel"], 1.0)  # first micro-batch: no update
  st2 = S.apply_gradients(st1, tx, g, ok=jnp.asarray(True))
  assert (np.asarray(st2.params["a"]["kernel"]) < 1.0).all()     # second: the averaged update


def test_vtm_negatives_gather_within_each_batch_shard():
  """Per-group hard negatives on 8 devices give the loss of the one-device computation with the
  former global gather, and the compiled step has no all-gather of the video memory (which for
  the 6B at 16k clips meant 20-GiB buffers on every chip)."""
  from internvideo2_jax.train.stage2 import stage2_losses
  cfg, model, _, _ = _tiny_stage2()
  rng = np.random.default_rng(0)
  n, groups = 16, 8
  batch = {"video": rng.integers(0, 255, (n, 4, 32, 32, 3)).astype(np.uint8),
           "text_ids": rng.integers(1000, 2000, (n, 6)).astype(np.int32),
           "text_mask": np.ones((n, 6), np.int32), "sample_id": np.arange(n, dtype=np.int32)}
  params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 4, 32, 32, 3)), batch["text_ids"][:1],
                               batch["text_mask"][:1]))["params"]
  tcfg = ml_collections.ConfigDict({"loss": {"vtc": 1.0, "vtm": 1.0, "mlm": 0.0}, "data_norm": "imagenet"})
  det = Stage2Model(cfg, deterministic=True)

  def vtm(params, batch):
    return stage2_losses(det, params, batch, jax.random.key(1), tcfg, num_visible=None, groups=groups,
                         vtc_mult=1.0)["vtm"]

  one = float(jax.jit(vtm)(params, batch))
  # the former gather, x[global index], on one device gives the same value
  orig = L.take_in_groups
  try:
    L.take_in_groups = lambda x, i, g: x[i + jnp.repeat(jnp.arange(g) * (x.shape[0] // g), x.shape[0] // g)]
    assert float(jax.jit(vtm)(params, batch)) == pytest.approx(one, rel=1e-6)
  finally:
    L.take_in_groups = orig
  mesh = M.make_mesh({"data": 8})
  placed = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    compiled = jax.jit(vtm).lower(params, placed).compile()
  assert float(compiled(params, placed)) == pytest.approx(one, rel=1e-5)
  memory = f"f32[{n},{1 + 4 * 16},64]"  # (clips, 1 + tokens, width) of the tiny encoder
  hlo = compiled.as_text()
  assert f"f32[{n // 8},{1 + 4 * 16},64]" in hlo  # each device holds its 2 clips' memory ...
  gathers = [ln for ln in hlo.splitlines() if memory in ln]
  assert not gathers, gathers[:2]  # ... and no op ever holds the whole batch's
  # control: the global gather of the sharded batch does all-gather the memory
  x = jax.device_put(jnp.ones((n, 1 + 4 * 16, 64)), NamedSharding(mesh, P("data")))
  idx = jax.device_put(jnp.arange(n)[::-1], NamedSharding(mesh, P("data")))
  glob = jax.jit(lambda x, i: x[i] * 2).lower(x, idx).compile().as_text()
  assert any("all-gather" in ln and memory in ln for ln in glob.splitlines())
