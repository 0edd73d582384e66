"""The video encoder: official parameter counts, parity with the official forward, masking,
intermediate layers, image inputs, remat, dtypes, init and config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import official_reference as ref
from internvideo2_jax.convert.official import vision_from_state_dict
from internvideo2_jax.models.embeddings import sincos_3d
from internvideo2_jax.models.vit import VisionEncoder, last_layers, vit_preset
from internvideo2_jax.parallel.sharding import param_count


def abstract_params(cfg, frames=None, size=None):
  frames = frames or cfg.num_frames
  size = size or cfg.img_size
  x = jnp.zeros((1, frames, size, size, 3))
  return jax.eval_shape(lambda: VisionEncoder(cfg).init(jax.random.key(0), x))


@pytest.mark.parametrize("size,count", [("S", 22_650_624), ("B", 88_652_544), ("L", 307_880_704),
                                        ("1B", 1_019_266_816), ("6B", 5_938_458_368)])
def test_official_parameter_counts(size, count):
  assert param_count(abstract_params(vit_preset(size, num_frames=4))) == count


def test_tiny_layout_matches_official_clip_tower():
  p = nn.unbox(abstract_params(vit_preset("tiny")))["params"]
  assert param_count(p) == 131_360  # official tiny CLIP tower (reference §7)
  assert p["pos_embed"].shape == (1, 65, 64)
  assert p["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 3, 4, 16)  # leading layers axis
  assert p["blocks"]["ls1"]["gamma"].shape == (2, 64)
  assert set(p["clip_projector"]["cross_attn"]) == {"q", "k", "v", "q_bias", "k_bias", "v_bias", "proj"}


def _tiny_official(seed=0, **over):
  rng = np.random.default_rng(seed)
  cfg = vit_preset("tiny", **over)
  sd = ref.random_state_dict(rng, d=64, depth=2, mlp_hidden=256, clip_dim=32)
  video = rng.standard_normal((2, 4, 32, 32, 3)).astype(np.float32)
  return cfg, sd, video, rng


def _ref(sd, video, gelu, mask=None, image=False):
  return ref.forward(sd, video.transpose(0, 4, 1, 2, 3), num_heads=4, depth=2, pool_heads=4,
                     tubelet=1, patch=8, gelu_approximate=gelu, mask=mask, image_mean_pos=image)


@pytest.mark.parametrize("gelu_tanh", [True, False])
def test_matches_official_forward(gelu_tanh):
  cfg, sd, video, rng = _tiny_official(gelu_approximate=gelu_tanh)
  params = vision_from_state_dict(sd, cfg)
  model = VisionEncoder(cfg)
  out = model.apply(params, video)
  x, pooled = _ref(sd, video, gelu_tanh)
  np.testing.assert_allclose(out["tokens"], x, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(out["pooled"], pooled, atol=1e-4, rtol=1e-5)
  # the other GELU form gives measurably different outputs: the switch is live
  other, _ = _ref(sd, video, not gelu_tanh)
  assert np.abs(other - x).max() > 1e-3

  mask = np.zeros((2, 64), bool)
  for b in range(2):
    mask[b, rng.choice(64, 48, replace=False)] = True
  out = model.apply(params, video, mask=mask)
  x, pooled = _ref(sd, video, gelu_tanh, mask=np.concatenate([np.zeros((2, 1), bool), mask], 1))
  assert out["tokens"].shape == (2, 17, 64)
  np.testing.assert_allclose(out["tokens"], x, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(out["pooled"], pooled, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(out["visible_index"], np.stack([np.flatnonzero(~m) for m in mask]))


def test_image_input_uses_mean_of_video_table():
  cfg, sd, video, _ = _tiny_official()
  params = vision_from_state_dict(sd, cfg)
  image = video[:, :1]
  out = VisionEncoder(cfg).apply(params, image)
  x, pooled = _ref(sd, image, True, image=True)
  assert out["tokens"].shape == (2, 17, 64)
  np.testing.assert_allclose(out["tokens"], x, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(out["pooled"], pooled, atol=1e-4, rtol=1e-5)


def test_separate_image_table():
  cfg = vit_preset("tiny", sep_image_video_pos_embed=True)
  model = VisionEncoder(cfg)
  video = jnp.ones((1, 4, 32, 32, 3))
  params = nn.unbox(model.init(jax.random.key(0), video))
  np.testing.assert_allclose(params["params"]["img_pos_embed"][0], sincos_3d(64, 1, 4, 4))
  changed = jax.tree.map(lambda a: a, params)
  changed["params"]["img_pos_embed"] = params["params"]["img_pos_embed"] + 1.0
  a = model.apply(params, video[:, :1])["tokens"]
  b = model.apply(changed, video[:, :1])["tokens"]
  assert np.abs(a - b).max() > 0.1  # images read img_pos_embed ...
  np.testing.assert_array_equal(model.apply(params, video)["tokens"],
                                model.apply(changed, video)["tokens"])  # ... videos do not


def test_separable_position_embedding():
  cfg = vit_preset("tiny", sep_pos_embed=True)
  p = nn.unbox(VisionEncoder(cfg).init(jax.random.key(0), jnp.ones((1, 4, 32, 32, 3))))["params"]
  assert p["pos_embed_spatial"].shape == (1, 16, 64)
  assert p["pos_embed_temporal"].shape == (1, 4, 64)
  assert p["pos_embed_cls"].shape == (1, 1, 64)


def test_intermediates_are_the_requested_layers():
  cfg, sd, video, _ = _tiny_official(return_layers=(0, -1))
  params = vision_from_state_dict(sd, cfg)
  out = VisionEncoder(cfg).apply(params, video)
  assert out["intermediates"].shape == (2, 2, 65, 64)
  np.testing.assert_array_equal(out["intermediates"][1], out["tokens"])
  one = vit_preset("tiny", depth=1, attn_pool=False)
  first = jax.tree.map(lambda a: a[:1], params["params"]["blocks"])
  p1 = {"params": {k: v for k, v in params["params"].items() if k not in ("blocks", "clip_projector")}}
  p1["params"]["blocks"] = first
  np.testing.assert_allclose(out["intermediates"][0], VisionEncoder(one).apply(p1, video)["tokens"],
                             atol=1e-5)
  assert last_layers(40, 6) == (34, 35, 36, 37, 38, 39)
  assert last_layers(40, 6, 3.34) == (23, 26, 29, 33, 36, 39)  # official distillation teacher layers


def test_compiled_program_does_not_grow_with_depth():
  def n_eqns(depth):
    cfg = vit_preset("tiny", depth=depth, return_layers=(0,))
    model = VisionEncoder(cfg)
    x = jnp.ones((1, 4, 32, 32, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return len(jax.make_jaxpr(lambda p: model.apply(p, x))(params).eqns)
  assert n_eqns(2) == n_eqns(7)


def test_remat_policies_and_drop_path_gradients():
  video = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 32, 32, 3)), jnp.float32)
  grads = {}
  # "auto": the platform's measured choice (CPU: dots_no_batch); unrolled scans compute the same
  for policy, unroll in (("none", 1), ("full", 1), ("minimal", 1), ("auto", "auto"), ("none", 2)):
    cfg = vit_preset("tiny", remat_policy=policy, drop_path_rate=0.3, scan_unroll=unroll)
    model = VisionEncoder(cfg)
    params = model.init(jax.random.key(0), video)

    def loss(p):
      out = model.apply(p, video, train=True, rngs={"dropout": jax.random.key(1)})
      return jnp.sum(out["pooled"] ** 2)

    grads[policy, unroll] = jax.jit(jax.grad(loss))(params)
  for key in (("full", 1), ("minimal", 1), ("auto", "auto"), ("none", 2)):
    for a, b in zip(jax.tree.leaves(grads["none", 1]), jax.tree.leaves(grads[key])):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_drop_path_is_random_in_training_only():
  cfg = vit_preset("tiny", drop_path_rate=0.5, init_values=1.0)
  model = VisionEncoder(cfg)
  video = jnp.ones((4, 4, 32, 32, 3))
  params = model.init(jax.random.key(0), video)
  a = model.apply(params, video, train=True, rngs={"dropout": jax.random.key(1)})["tokens"]
  b = model.apply(params, video, train=True, rngs={"dropout": jax.random.key(2)})["tokens"]
  assert np.abs(a - b).max() > 1e-3
  e1, e2 = (model.apply(params, video)["tokens"] for _ in range(2))
  np.testing.assert_array_equal(e1, e2)


def test_init_follows_official_recipe():
  cfg = vit_preset("tiny", embed_dim=128, num_heads=4, depth=3)
  p = nn.unbox(VisionEncoder(cfg).init(jax.random.key(0), jnp.ones((1, 4, 32, 32, 3))))["params"]
  np.testing.assert_allclose(p["pos_embed"][0], sincos_3d(128, 4, 4, 4))
  np.testing.assert_allclose(p["blocks"]["ls1"]["gamma"], 1e-5)
  proj = np.asarray(p["blocks"]["attn"]["proj"]["kernel"])
  fc1 = np.asarray(p["blocks"]["mlp"]["fc1"]["kernel"])
  for i in range(3):  # fix_init_weight: proj / fc2 of block i divided by sqrt(2 (i + 1))
    assert proj[i].std() == pytest.approx(0.02 / np.sqrt(2 * (i + 1)), rel=0.08)
    assert fc1[i].std() == pytest.approx(0.02, rel=0.05)


def test_bf16_compute_keeps_fp32_params_and_is_close():
  video = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 32, 32, 3)), jnp.float32)
  m32 = VisionEncoder(vit_preset("tiny", init_values=0.5))
  m16 = VisionEncoder(vit_preset("tiny", init_values=0.5, dtype="bfloat16"))
  params = m32.init(jax.random.key(0), video)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(m16.init(jax.random.key(0), video))))
  a, b = m32.apply(params, video)["pooled"], m16.apply(params, video)["pooled"]
  assert b.dtype == jnp.float32
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_traced_mask_needs_num_visible():
  cfg = vit_preset("tiny")
  model = VisionEncoder(cfg)
  video = jnp.ones((2, 4, 32, 32, 3))
  params = model.init(jax.random.key(0), video)
  mask = jnp.zeros((2, 64), bool).at[:, :48].set(True)
  with pytest.raises(ValueError, match="num_visible"):
    jax.jit(lambda p, m: model.apply(p, video, mask=m))(params, mask)
  out = jax.jit(lambda p, m: model.apply(p, video, mask=m, num_visible=16))(params, mask)
  assert out["tokens"].shape == (2, 17, 64)
  uneven = mask.at[0, 50].set(True)
  with pytest.raises(ValueError, match="same number of tokens"):
    model.apply(params, video, mask=uneven)


@pytest.mark.parametrize("over,match", [
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(patch_size=7), "img_size=32 must be divisible by patch_size=7"),
    (dict(dtype="fp8"), "dtype"),
    (dict(remat_policy="sometimes"), "unknown remat_policy"),
    (dict(scan_unroll=0), "scan_unroll=0 must be 'auto' or an integer >= 1"),
    (dict(return_layers=(5,)), "return_layers entry 5"),
])
def test_bad_config_values_are_named(over, match):
  with pytest.raises(ValueError, match=match):
    VisionEncoder(vit_preset("tiny", **over)).init(jax.random.key(0), jnp.ones((1, 4, 32, 32, 3)))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="unknown ViT config keys"):
    vit_preset("tiny", emb_dim=3)
  with pytest.raises(ValueError, match="unknown ViT preset"):
    vit_preset("XXL")
  model = VisionEncoder(vit_preset("tiny"))
  with pytest.raises(ValueError, match="8 frames but the model is configured for num_frames=4"):
    model.init(jax.random.key(0), jnp.ones((1, 8, 32, 32, 3)))
  with pytest.raises(ValueError, match="patch grid"):
    model.init(jax.random.key(0), jnp.ones((1, 4, 48, 48, 3)))
