"""The stage-2 objectives and step: VTC (gathered over the mesh), VTM with hard negatives,
MLM, weighted by `config.loss`.

`make_step` returns a pure `(state, batch, rng) -> (state, metrics)`; the loop jits it with
shardings and donation. Batches are global arrays (see data/pipeline.BATCH_SPEC).
"""


import os
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.stage2 import TEMP_MAX, TEMP_MIN, Stage2Model
from internvideo2_jax.ops import losses as L
from internvideo2_jax.parallel import distributed
from internvideo2_jax.train.state import TrainState, apply_gradients

LOSSES = ("vtc", "vtm", "mlm")


# (No `from __future__ import annotations` in this module: clu reads these annotations as
# classes at runtime.)
@flax.struct.dataclass
class Stage2Metrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  vtc: clu_metrics.Average.from_output("vtc")
  vtm: clu_metrics.Average.from_output("vtm")
  mlm: clu_metrics.Average.from_output("mlm")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  temp: clu_metrics.LastValue.from_output("temp")
  lr: clu_metrics.LastValue.from_output("lr")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def stage2_losses(model: Stage2Model, params, batch, rng, cfg, *, num_visible, groups: int,
                  vtc_mult: float) -> dict:
  """Per-objective losses (unweighted) of one batch."""
  k_drop_v, k_drop_t, k_neg, k_mlm, k_drop_f, k_drop_m = jax.random.split(rng, 6)
  p = {"params": params}
  vdtype = model.config.vision.dtype
  video = normalize(batch["video"], cfg.data_norm, jnp.dtype(vdtype))
  mask = batch.get("mask")
  x_vis, v_feat = model.apply(p, video, mask, num_visible, method=Stage2Model.encode_vision,
                              rngs={"dropout": k_drop_v})
  ids, tmask = batch["text_ids"], batch["text_mask"]
  hidden, t_feat = model.apply(p, ids, tmask, method=Stage2Model.encode_text, rngs={"dropout": k_drop_t})
  temp = model.apply(p, method=Stage2Model.get_temp)
  v, t = L.l2_normalize(v_feat), L.l2_normalize(t_feat)
  sid = batch["sample_id"]
  w = cfg.loss
  out = {}
  if w.vtc:
    out["vtc"] = L.vtc_loss(v, t, sid, temp) * vtc_mult
  if w.vtm:
    neg_t, neg_v = L.hard_negatives(k_neg, jax.lax.stop_gradient(v), jax.lax.stop_gradient(t), sid,
                                    jax.lax.stop_gradient(temp), groups)
    take = lambda x, i: L.take_in_groups(x, i, groups)  # noqa: E731 - local to each batch shard
    text_h = jnp.concatenate([hidden, hidden, take(hidden, neg_t)])
    text_m = jnp.concatenate([tmask, tmask, take(tmask, neg_t)])
    memory = jnp.concatenate([x_vis, take(x_vis, neg_v), x_vis])
    logits = model.apply(p, text_h, text_m, memory, method=Stage2Model.itm_logits,
                         rngs={"dropout": k_drop_f})
    out["vtm"] = L.cross_entropy(logits, L.itm_labels(ids.shape[0]))
  if w.mlm:
    tc = model.config.text
    masked, targets, chosen = L.mlm_mask(k_mlm, ids, vocab_size=tc.vocab_size,
                                         mask_token_id=cfg.mask_token_id, pad_token_id=tc.pad_token_id,
                                         cls_token_id=cfg.cls_token_id, prob=cfg.mlm_prob)
    pos, valid, out["mlm_dropped"] = L.select_positions(chosen, cfg.get("mlm_max_positions", 0))
    logits = model.apply(p, masked, tmask, x_vis, pos, method=Stage2Model.mlm_logits,
                         rngs={"dropout": k_drop_m})
    out["mlm"] = L.cross_entropy(logits, jnp.take_along_axis(targets, pos, axis=1),
                                 valid.astype(jnp.float32))
  out["temp"] = temp
  return out


@flax.struct.dataclass
class AVMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  vtc: clu_metrics.Average.from_output("vtc")
  vtm: clu_metrics.Average.from_output("vtm")
  mlm: clu_metrics.Average.from_output("mlm")
  atc: clu_metrics.Average.from_output("atc")
  atm: clu_metrics.Average.from_output("atm")
  amlm: clu_metrics.Average.from_output("amlm")
  avc: clu_metrics.Average.from_output("avc")
  avtc: clu_metrics.Average.from_output("avtc")
  avtm: clu_metrics.Average.from_output("avtm")
  avmlm: clu_metrics.Average.from_output("avmlm")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  temp: clu_metrics.LastValue.from_output("temp")
  lr: clu_metrics.LastValue.from_output("lr")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def make_step(model, tx: optax.GradientTransformation, cfg, *, groups: int,
              vtc_mult: float, lr_fn=None, losses_fn=None, names=LOSSES, metrics_cls=Stage2Metrics):
  """The pure train step `(state, batch, rng, num_visible) -> (state, metrics)`; the loop jits it
  with shardings and donation (`num_visible` is static: a mask ratio gives a fixed count)."""
  losses_fn = losses_fn or stage2_losses
  weights = {k: float(cfg.loss.get(k, 0.0)) for k in names}
  # with the speed option mlm_max_positions > 0, positions it dropped from the loss are counted
  capped = int(cfg.get("mlm_max_positions", 0)) > 0 and any(weights.get(k) for k in names if "mlm" in k)
  if capped:
    metrics_cls = clu_metrics.Collection.create(
        **metrics_cls.__annotations__, mlm_dropped=clu_metrics.Average.from_output("mlm_dropped"))

  def step(state: TrainState, batch, rng, num_visible=None):
    rng = jax.random.fold_in(rng, state.step)
    train, frozen = state.split()

    def loss_fn(train_params):
      params = TrainState.merge(train_params, frozen)
      parts = losses_fn(model, params, batch, rng, cfg, num_visible=num_visible,
                        groups=groups, vtc_mult=vtc_mult)
      total = sum(weights[k] * parts[k] for k in names if k in parts)
      return total, parts

    (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(total) & jnp.isfinite(gnorm)

    def clamp_temp(p):  # the official clamp_ acts on the stored parameter
      if "temp" in p:
        p = dict(p, temp=jnp.clip(p["temp"], TEMP_MIN, TEMP_MAX))
      return p

    new_state = apply_gradients(state, tx, grads, ok=ok, post_update=clamp_temp)
    zero = jnp.zeros((), jnp.float32)
    metrics = metrics_cls.single_from_model_output(
        loss=total, **{k: parts.get(k, zero) for k in names}, grad_norm=gnorm, temp=parts["temp"],
        lr=lr_fn(state.step) if lr_fn is not None else zero,
        skipped_updates=new_state.skipped,
        **({"mlm_dropped": sum(v for k, v in parts.items() if k.endswith("mlm_dropped"))} if capped else {}))
    return new_state, metrics

  return step


__all__ = ["Stage2Metrics", "stage2_losses", "make_step", "LOSSES"]


# ----------------------------------------------------------------------------- the stage-2 job


def build_model_config(mc):
  """Model config from the job config: vision preset + text tower (preset or HF directory)."""
  from internvideo2_jax.convert import bert as bert_conv
  from internvideo2_jax.models.stage2 import stage2_config
  from internvideo2_jax.models.text import text_preset
  vision = mc.vision
  if mc.text_init:
    d = bert_conv.minilm_dir() if mc.text_init == "minilm" else mc.text_init
    text = bert_conv.hf_text_config(d, fusion_layer=mc.text.fusion_layer, num_layers=mc.text.num_layers,
                                    encoder_width=vision.embed_dim, dtype=mc.text.dtype,
                                    remat_policy=mc.text.remat_policy)
  else:
    text = text_preset("bert-base", **mc.text.to_dict())
  if mc.get("audio"):
    from internvideo2_jax.models.stage2_av import av_stage2_config
    return av_stage2_config(vision, text, mc.audio, contra_dim=mc.embed_dim,
                            av_concat_dim=mc.get("av_concat_dim", mc.embed_dim), temp=mc.temp)
  return stage2_config(vision, text, embed_dim=mc.embed_dim, temp=mc.temp)


def is_audio(config) -> bool:
  return bool(config.model.get("audio"))


def batch_shapes(config, mcfg) -> tuple[dict, Optional[int]]:
  """The global batch of a training step as ShapeDtypeStructs (data/pipeline.BATCH_SPEC), and
  the static visible-token count of its mask."""
  from internvideo2_jax.data.audio import fbank_frames
  from internvideo2_jax.data.masks import visible_count
  v, load = mcfg.vision, config.data.load
  b = int(config.data.batch_size)
  sds = jax.ShapeDtypeStruct
  batch = {"video": sds((b, v.num_frames, v.img_size, v.img_size, 3), np.uint8),
           "text_ids": sds((b, int(load.max_txt_l)), np.int32),
           "text_mask": sds((b, int(load.max_txt_l)), np.int32),
           "sample_id": sds((b,), np.int32)}
  nv = None
  if load.get("mask", "none") != "none":
    grid = (v.num_frames // v.tubelet_size, v.img_size // v.patch_size, v.img_size // v.patch_size)
    batch["mask"] = sds((b, int(np.prod(grid))), np.bool_)
    nv = visible_count(load.mask, grid, float(load.get("mask_ratio", 0.0)))
  if is_audio(config):
    batch["audio"] = sds((b, fbank_frames(float(load.get("audio_seconds", 10.0))), 64), np.float32)
    batch["has_audio"] = sds((b,), np.bool_)
  return batch, nv


def step_parts(config, mesh, mcfg=None):
  """Stage 2's training step with everything abstract (see loop.StepParts)."""
  import ml_collections
  from internvideo2_jax.data import text as text_lib
  from internvideo2_jax.data.audio import fbank_frames
  from internvideo2_jax.ops.losses import vtc_scale
  from internvideo2_jax.parallel import mesh as mesh_lib, rules as rules_lib
  from internvideo2_jax.train import flops, loop, optimizer as opt_lib
  mcfg = mcfg or build_model_config(config.model)
  data = config.data
  rules = rules_lib.rules_from_config(config.get("sharding_rules", {}).to_dict()
                                      if config.get("sharding_rules") else None)
  groups = mesh.shape["data"] * mesh.shape["fsdp"]
  mesh_lib.global_batch_size_ok(mesh, int(data.batch_size))
  audio = is_audio(config)
  if audio:
    from internvideo2_jax.models.stage2_av import Stage2AVModel
    from internvideo2_jax.train.stage2_av import AV_LOSSES, av_losses
    model_cls = Stage2AVModel
  else:
    model_cls = Stage2Model
  train_model = model_cls(mcfg, deterministic=False)
  v = mcfg.vision
  t_len = int(data.load.max_txt_l)
  dummy_video = jnp.zeros((1, v.num_frames, v.img_size, v.img_size, 3), jnp.float32)
  dummy_ids = jnp.ones((1, t_len), jnp.int32)
  dummy_fbank = jnp.zeros((1, fbank_frames(float(data.load.get("audio_seconds", 10.0))), 64))
  dummy_inputs = ((dummy_video, dummy_fbank, dummy_ids, dummy_ids) if audio
                  else (dummy_video, dummy_ids, dummy_ids))
  init_fn = lambda: train_model.init({"params": jax.random.key(config.seed), "dropout": jax.random.key(1)},  # noqa: E731
                                     *dummy_inputs)
  freeze, unfreeze = opt_lib.freeze_patterns(config.model)
  oc = config.optimizer
  abstract, tx, trainable = loop.abstract_state(
      init_fn, mesh, rules, lambda tr: opt_lib.make_optimizer(oc, tr, vision_depth=v.depth),
      freeze=freeze, unfreeze=unfreeze)
  lr_fn = opt_lib.lr_schedule(float(oc.lr), int(oc.total_steps), int(oc.warmup_steps),
                              float(oc.get("min_lr_multi", 0.01)), oc.get("schedule", "cosine"))
  tok = text_lib.load_tokenizer(data.load.get("tokenizer", ""))
  tcfg = ml_collections.ConfigDict(dict(config.train.to_dict(), data_norm=data.get("norm", "imagenet"),
                                        mask_token_id=tok.mask_token_id, cls_token_id=tok.cls_token_id))
  step_kw = dict(losses_fn=av_losses, names=AV_LOSSES, metrics_cls=AVMetrics) if audio else {}
  step_fn = make_step(train_model, tx, tcfg, groups=groups,
                      vtc_mult=vtc_scale(config.train.vtc_scale, groups), lr_fn=lr_fn, **step_kw)
  batch, nv = batch_shapes(config, mcfg)

  def flops_per_step(host):
    vis = int((~host["mask"][0]).sum()) if "mask" in host else int(np.prod(host["video"].shape[1:4])) // (
        v.tubelet_size * v.patch_size ** 2)
    return flops.stage2_train_flops(ml_collections.ConfigDict({"model": mcfg, "train": config.train}),
                                    batch=len(host["video"]), frames=host["video"].shape[1],
                                    visible_tokens=vis, text_len=host["text_ids"].shape[1])

  def batch_flops(shapes, num_visible):
    n = int(np.prod(shapes["video"].shape[2:4])) * shapes["video"].shape[1] // (v.tubelet_size * v.patch_size ** 2)
    return flops.stage2_train_flops(ml_collections.ConfigDict({"model": mcfg, "train": config.train}),
                                    batch=shapes["video"].shape[0], frames=shapes["video"].shape[1],
                                    visible_tokens=num_visible or n, text_len=shapes["text_ids"].shape[1])

  return loop.StepParts(rules=rules, init_fn=init_fn, abstract=abstract, tx=tx, trainable=trainable,
                        step_fn=step_fn, batch=batch, num_visible=nv, flops_per_step=flops_per_step,
                        batch_flops=batch_flops, extra={"mcfg": mcfg, "tokenizer": tok, "model_cls": model_cls})


def run(config, workdir: str) -> dict:
  """Stage-2 training job (main job of the README)."""
  from internvideo2_jax.convert import bert as bert_conv
  from internvideo2_jax.convert.official import load_vision_init
  from internvideo2_jax.data import pipeline
  from internvideo2_jax.data.loader import LoadSpec
  from internvideo2_jax.evaluate import retrieval
  from internvideo2_jax.parallel import mesh as mesh_lib, sharding
  from internvideo2_jax.train import loop, optimizer as opt_lib

  from internvideo2_jax.train import corpus, preflight
  corpus.default_to_synthetic(config, "stage2")
  preflight.check(config)  # bad settings named before any model work
  distributed.make_dirs(workdir)
  data = config.data
  corpus.write_synthetic(config, "stage2")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  parts = step_parts(config, mesh)
  mcfg, tok, model_cls = parts.extra["mcfg"], parts.extra["tokenizer"], parts.extra["model_cls"]
  audio = is_audio(config)
  eval_model = model_cls(mcfg, deterministic=True)
  v = mcfg.vision

  def load(placer):
    if config.model.text_init:
      d = bert_conv.minilm_dir() if config.model.text_init == "minilm" else config.model.text_init
      bert_conv.load_hf_bert(d, mcfg.text, sink=placer.sink(("text_encoder",)))  # leaf by leaf
      print(f"text tower initialised from {d}", flush=True)
    if config.model.get("vision_init"):
      print(load_vision_init(config.model.vision_init, mcfg.vision,  # leaf by leaf into the shards
                             partial=bool(config.model.get("vision_init_partial", False)),
                             sink=placer.sink(("vision_encoder",))), flush=True)

  state = loop.LazyState(parts.abstract, lambda: loop.materialize(parts, mesh, load=load))
  ds = lambda start, report=None: pipeline.make_pipeline(  # noqa: E731
      data, mcfg.vision, stage="stage2", start_batch=start, report=report)
  shapes = state.abstract.params
  print(f"model: vision {sum_params(shapes, 'vision_encoder'):,} + text "
        f"{sum_params(shapes, 'text_encoder'):,} parameters; training {len(parts.trainable)} of "
        f"{len(opt_lib.flatten(shapes))} tensors; mesh {dict(mesh.shape)}", flush=True)

  eval_fn = None
  eval_set = corpus.eval_corpus(config)
  if eval_set:
    spec = LoadSpec(num_frames=v.num_frames, size=v.img_size, patch_size=v.patch_size,
                    tubelet_size=v.tubelet_size, max_txt_l=int(config.eval.max_txt_l), audio=audio,
                    audio_seconds=float(data.load.get("audio_seconds", 10.0)))
    rset = retrieval.load_retrieval_set(eval_set, spec, caption_field=config.eval.get("caption_field", "captions"))
    dropped = {**rset.data["refused_at_parse"], **rset.data["skipped"]}
    print(f"eval: {len(rset.videos)} held-out videos, {len(rset.texts)} captions"
          + (f"; left out: {dropped}" if dropped else ""), flush=True)

    def eval_fn(params):
      enc_cls = retrieval.AVEncoder if audio else retrieval.Encoder
      enc = enc_cls(eval_model, params, mesh, batch_size=int(config.eval.batch_size),
                    norm=data.get("norm", "imagenet"))
      evaluate = retrieval.evaluate_av_retrieval if audio else retrieval.evaluate_retrieval
      res = evaluate(enc, rset, tokenizer=tok, max_txt_l=int(config.eval.max_txt_l),
                     k_test=int(config.eval.k_test))
      res["eval_data"] = rset.data  # what the held-out set refused / skipped (counts)
      return res

  def finish(params, wd):
    from internvideo2_jax.convert.official import stage2_av_to_state_dict, stage2_to_state_dict
    from internvideo2_jax.convert.io import save_state_dict
    to_sd = stage2_av_to_state_dict if audio else stage2_to_state_dict
    host = jax.tree.map(sharding.to_host, params)  # a collective: every process gathers
    if jax.process_index() == 0:
      path = os.path.join(wd, "export", "stage2_official_layout.safetensors")
      save_state_dict(to_sd(host, mcfg), path)
      print(f"exported the weights in the official key layout: {path}", flush=True)

  setup = loop.Setup(mesh=mesh, rules=parts.rules, state=state, tx=parts.tx, step_fn=parts.step_fn, data=ds,
                     flops_per_step=parts.flops_per_step, evaluate=eval_fn, finish=finish)
  results = loop.train(config, workdir, setup)
  if jax.process_index() == 0 and ("match" in results or "text_to_audio" in results):
    print(f"\nheld-out retrieval after {results['step']} steps ({loop.run_totals(results)}):")
    print(retrieval.format_table(results))
    retrieval.save_json(results, os.path.join(workdir, "eval_retrieval.json"))
  import importlib.util
  view = f"tensorboard --logdir {workdir}"
  if importlib.util.find_spec("tensorboard") is None:  # the event files need no TensorBoard to write
    view = f"pip install tensorboard && {view}"
  print(f"\nTensorBoard logs: {os.path.join(workdir, 'tensorboard')}  ({view})")
  print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}; checkpoints: {os.path.join(workdir, 'checkpoints')}")
  return results


def sum_params(params, prefix: str) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params.get(prefix, {}))))
