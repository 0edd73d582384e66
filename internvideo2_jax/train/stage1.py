"""Stage 1: unmasked-token distillation from a CLIP teacher and a VideoMAE teacher.

Per step (official engine_for_pretraining): 16-frame clips; the MAE teacher sees all 16, the
student and the CLIP teacher every second frame; the CLIP teacher's pooling attention picks the
visible tokens (attention masking, 80%); the student's decoders are pulled to the teachers'
features at the visible positions with 2 - 2 cos. Teachers are frozen parameters of the state
(`teachers/...`, no gradients, no optimizer state) or, with cached targets, not run at all.
"""

import os

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics

from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.stage1 import Stage1Student, stage1_config, stage1_loss
from internvideo2_jax.models.teachers import CLIPTeacher, MAETeacher
from internvideo2_jax.ops import masking
from internvideo2_jax.train.state import TrainState, apply_gradients
import optax


# (No `from __future__ import annotations`: clu reads these annotations as classes.)
@flax.struct.dataclass
class Stage1Metrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  clip: clu_metrics.Average.from_output("clip")
  clip_final: clu_metrics.Average.from_output("clip_final")
  mae: clu_metrics.Average.from_output("mae")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  lr: clu_metrics.LastValue.from_output("lr")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def teacher_targets(params, video16, clip_teacher, mae_teacher, dtype=None):
  """Both teachers on a normalised 16-frame clip -> targets (optionally rounded to `dtype`)."""
  ct = clip_teacher.apply({"params": params["clip"]}, video16[:, ::2])
  mt = mae_teacher.apply({"params": params["mae"]}, video16)
  out = {"clip_tokens": ct["tokens"], "clip_final": ct["pooled"], "clip_attn": ct["attn"],
         "mae_tokens": mt["tokens"]}
  if dtype is not None:  # what the offline cache stores; the online path can match it exactly
    out = {k: v.astype(dtype).astype(jnp.float32) for k, v in out.items()}
  return jax.lax.stop_gradient(out)


def make_step(student, clip_teacher, mae_teacher, tx, cfg, *, lr_fn=None):
  """Pure `(state, batch, rng, num_visible=None) -> (state, metrics)`; batches carry `video`
  (B, 16, S, S, 3) uint8 and, for cached targets, `clip_tokens`, `clip_final`, `clip_attn`,
  `mae_tokens` (then the teachers are not run)."""
  s = student.config.vision
  hw = (s.img_size // s.patch_size) ** 2
  t = s.num_frames // s.tubelet_size
  n_vis = t * masking.visible_per_frame(hw, cfg.mask_ratio)
  weights = (cfg.loss.clip, cfg.loss.clip_final, cfg.loss.mae)
  tdtype = {"": None, "bfloat16": jnp.bfloat16, "float32": jnp.float32}[cfg.get("targets_dtype", "")]

  def step(state: TrainState, batch, rng, num_visible=None):
    del num_visible  # fixed by the mask ratio
    rng = jax.random.fold_in(rng, state.step)
    k_mask, k_drop = jax.random.split(rng)
    video16 = normalize(batch["video"], cfg.data_norm)
    if "clip_tokens" in batch:  # cached per example: (B, K, N, D) tokens, (B, T, HW) attention
      tg = {k: batch[k].astype(jnp.float32) for k in ("clip_tokens", "clip_final", "clip_attn", "mae_tokens")}
      tg["clip_tokens"] = jnp.swapaxes(tg["clip_tokens"], 0, 1)
      tg["mae_tokens"] = jnp.swapaxes(tg["mae_tokens"], 0, 1)
      tg["clip_attn"] = tg["clip_attn"].reshape(-1, tg["clip_attn"].shape[-1])
    else:
      tg = teacher_targets(state.params["teachers"], video16, clip_teacher, mae_teacher, tdtype)
    b = video16.shape[0]
    if cfg.mask_type == "attention":
      mask = masking.attention_mask(k_mask, tg["clip_attn"], cfg.mask_ratio, b)
    elif cfg.mask_type == "tube":
      mask = masking.tube_mask(k_mask, b, (t, int(hw ** 0.5), int(hw ** 0.5)), cfg.mask_ratio)
    else:
      mask = masking.random_mask(k_mask, b, t * hw, cfg.mask_ratio)
    train, frozen = state.split()

    def loss_fn(train_params):
      params = TrainState.merge(train_params, frozen)
      out = student.apply({"params": params["student"]}, video16[:, ::2], mask, n_vis,
                          rngs={"dropout": k_drop})
      parts = stage1_loss(out, tg["clip_tokens"], tg["clip_final"], tg["mae_tokens"], weights)
      return parts["loss"], parts

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new_state = apply_gradients(state, tx, grads, ok=ok)
    zero = jnp.zeros((), jnp.float32)
    metrics = Stage1Metrics.single_from_model_output(
        loss=loss, clip=parts["clip"], clip_final=parts.get("clip_final", zero), mae=parts["mae"],
        grad_norm=gnorm, lr=lr_fn(state.step) if lr_fn is not None else zero,
        skipped_updates=new_state.skipped)
    return new_state, metrics

  return step


def build_models(config):
  tc, mc = config.model.clip_teacher, config.model.mae_teacher
  mcfg = stage1_config(config.model.vision, clip_teacher_dim=tc.embed_dim,
                       clip_teacher_final_dim=tc.clip_embed_dim, mae_teacher_dim=mc.embed_dim,
                       clip_return_layer=len(tc.return_layers),
                       clip_student_return_interval=config.model.clip_student_return_interval,
                       mae_return_layer=mc.return_layers)
  return Stage1Student(mcfg), CLIPTeacher(tc), MAETeacher(mc)


def batch_shapes(config) -> dict:
  """The global batch of a stage-1 step (16-frame clips for the online teachers)."""
  v = config.model.vision
  b = int(config.data.batch_size)
  return {"video": jax.ShapeDtypeStruct((b, 2 * v.num_frames, v.img_size, v.img_size, 3), np.uint8)}


def step_parts(config, mesh):
  """Stage 1's training step with everything abstract (see loop.StepParts)."""
  from internvideo2_jax.parallel import mesh as mesh_lib, rules as rules_lib
  from internvideo2_jax.train import flops, loop, optimizer as opt_lib
  student, clip_t, mae_t = build_models(config)
  rules = rules_lib.DEFAULT_RULES
  mesh_lib.global_batch_size_ok(mesh, int(config.data.batch_size))
  v = config.model.vision
  n_vis = (v.num_frames // v.tubelet_size) * masking.visible_per_frame((v.img_size // v.patch_size) ** 2,
                                                                      config.train.mask_ratio)
  v16 = jnp.zeros((1, 2 * v.num_frames, v.img_size, v.img_size, 3))
  mask0 = jnp.zeros((1, (v.num_frames // v.tubelet_size) * (v.img_size // v.patch_size) ** 2), bool)
  mask0 = mask0.at[:, n_vis:].set(True)

  def init_fn():
    k = jax.random.key(config.seed)
    return {"params": {
        "student": student.init({"params": k, "dropout": k}, v16[:, ::2], mask0, n_vis)["params"],
        "teachers": {"clip": clip_t.init(k, v16[:, ::2])["params"], "mae": mae_t.init(k, v16)["params"]}}}

  oc = config.optimizer
  abstract, tx, trainable = loop.abstract_state(
      init_fn, mesh, rules, lambda tr: opt_lib.make_optimizer(oc, tr, vision_depth=v.depth),
      freeze=(r"^teachers/",))
  lr_fn = opt_lib.lr_schedule(float(oc.lr), int(oc.total_steps), int(oc.warmup_steps),
                              float(oc.min_lr_multi), oc.schedule)
  tcfg = ml_collections.ConfigDict(dict(config.train.to_dict(), data_norm=config.data.get("norm", "imagenet")))
  step_fn = make_step(student, clip_t, mae_t, tx, tcfg, lr_fn=lr_fn)
  d, depth = v.embed_dim, v.depth
  per_clip = 3.0 * flops.vit_forward(1 + n_vis, d, depth, int(d * v.mlp_ratio),
                                     3 * v.patch_size ** 2 * v.tubelet_size, v.clip_embed_dim)
  # student only (the teachers' forward is not counted)
  return loop.StepParts(rules=rules, init_fn=init_fn, abstract=abstract, tx=tx, trainable=trainable,
                        step_fn=step_fn, batch=batch_shapes(config), num_visible=None,
                        flops_per_step=lambda host: per_clip * len(host["video"]),
                        batch_flops=lambda shapes, _: per_clip * shapes["video"].shape[0],
                        extra={"student": student, "n_vis": n_vis})


def run(config, workdir: str) -> dict:
  from internvideo2_jax.convert.io import load_state_dict, save_state_dict
  from internvideo2_jax.convert.official import stage1_to_state_dict
  from internvideo2_jax.convert import teachers as teacher_conv
  from internvideo2_jax.data import pipeline
  from internvideo2_jax.parallel import distributed, mesh as mesh_lib, sharding
  from internvideo2_jax.train import loop

  from internvideo2_jax.train import corpus, preflight
  corpus.default_to_synthetic(config, "stage1")
  preflight.check(config)  # bad settings named before any model work
  distributed.make_dirs(workdir)
  data = config.data
  corpus.write_synthetic(config, "stage1")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  parts = step_parts(config, mesh)
  student, n_vis = parts.extra["student"], parts.extra["n_vis"]
  v = config.model.vision

  def load(placer):  # the teachers stream leaf by leaf into their shards (no whole-teacher host copy)
    if config.model.clip_teacher_init:
      teacher_conv.clip_teacher_from_state_dict(load_state_dict(config.model.clip_teacher_init),
                                                config.model.clip_teacher, sink=placer.sink(("teachers", "clip")))
    if config.model.mae_teacher_init:
      teacher_conv.mae_teacher_from_state_dict(load_state_dict(config.model.mae_teacher_init),
                                               config.model.mae_teacher, sink=placer.sink(("teachers", "mae")))

  state = loop.LazyState(parts.abstract, lambda: loop.materialize(parts, mesh, load=load))
  model_cfg = ml_collections.ConfigDict(dict(v.to_dict(), num_frames=2 * v.num_frames))
  ds = lambda start, report=None: pipeline.make_pipeline(  # noqa: E731
      data, model_cfg, stage="stage1", start_batch=start, report=report)

  def finish(params, wd):
    host = jax.tree.map(sharding.to_host, params["student"])  # a collective: every process gathers
    if jax.process_index() == 0:
      path = os.path.join(wd, "export", "stage1_official_layout.safetensors")
      save_state_dict(stage1_to_state_dict(host, student.config), path)
      print(f"exported the student in the official stage-1 key layout: {path}", flush=True)

  shapes = state.abstract.params
  print(f"student {sum(x.size for x in jax.tree.leaves(shapes['student'])):,} parameters; teachers "
        f"{sum(x.size for x in jax.tree.leaves(shapes['teachers'])):,} (frozen); {n_vis} visible tokens",
        flush=True)
  setup = loop.Setup(mesh=mesh, rules=parts.rules, state=state, tx=parts.tx, step_fn=parts.step_fn, data=ds,
                     flops_per_step=parts.flops_per_step, finish=finish)
  res = loop.train(config, workdir, setup)
  if "step" in res:
    print(f"stage 1 done: {res['step']} steps ({loop.run_totals(res)})")
  return res
