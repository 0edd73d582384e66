"""Stage 3: next-token training of the LLM connector (InternVideo2-Chat, reference §3).

The step: the clip through ViT -> LN -> QFormer -> project_up fills the prompt's visual slots,
the LLM predicts every next token, and the loss is the cross-entropy on the answer tokens
only (`llm_labels`, -100 elsewhere), averaged over the answer tokens of the global batch.
`train.max_label_tokens` > 0 runs the LM head only at that many label positions per row (the
same loss when no row has more; far less logits memory for a 32k vocabulary).

Which parts train is config: `freeze_vision`, `freeze_qformer`, `freeze_llm`, and LoRA
(`model.llm.lora_rank` > 0: the base LLM is frozen and only the adapters train, no optimizer
state for the base). The job is multi-host like stages 1 and 2: sharded init and weight
streaming, process-0 logs, gathered evaluation and export.
"""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.models.videochat import VideoChat, next_token_loss
from internvideo2_jax.parallel import distributed
from internvideo2_jax.train.state import TrainState, apply_gradients


# (No `from __future__ import annotations`: clu reads these annotations as classes.)
@flax.struct.dataclass
class Stage3Metrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  answer_tokens: clu_metrics.Average.from_output("answer_tokens")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  lr: clu_metrics.LastValue.from_output("lr")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def label_positions(labels, k: int):
  """Up to k positions per row whose *next* label counts (the shifted targets), in order, and
  their validity: (positions (B, k) int32, valid (B, k) bool)."""
  counted = jnp.concatenate([labels[:, 1:] >= 0, jnp.zeros_like(labels[:, :1], bool)], axis=1)
  order = jnp.argsort(~counted, axis=1, stable=True)[:, :k]
  return order.astype(jnp.int32), jnp.take_along_axis(counted, order, axis=1)


def stage3_loss(model: VideoChat, params, batch, rng, *, norm: str, max_label_tokens: int = 0):
  """(mean answer-token cross-entropy, answer-token count) of one global batch."""
  p = {"params": params}
  k_embed, k_llm, k_head = jax.random.split(rng, 3)
  video = normalize(batch["video"], norm, jnp.dtype(model.config.vision.dtype))
  embeds = model.apply(p, video, batch["llm_ids"], batch["llm_visual"], batch.get("instruction_ids"),
                       batch.get("instruction_mask"), method=VideoChat.embed_prompt, rngs={"dropout": k_embed})
  hidden, _ = model.apply(p, embeds, batch["llm_mask"], method=lambda m, e, msk: m.lm.hidden(e, msk),
                          rngs={"dropout": k_llm})
  labels = batch["llm_labels"]
  if max_label_tokens:
    pos, valid = label_positions(labels, max_label_tokens)
    h = jnp.take_along_axis(hidden, pos[..., None], axis=1)
    logits = model.apply(p, h, method=lambda m, x: m.lm.logits(x), rngs={"dropout": k_head})
    target = jnp.take_along_axis(labels, jnp.minimum(pos + 1, labels.shape[1] - 1), axis=1)
    target = jnp.where(valid, target, -100)
    # next_token_loss shifts by one: put each target one slot after its logits row
    total, count = next_token_loss(jnp.pad(logits, ((0, 0), (0, 1), (0, 0))),
                                   jnp.pad(target, ((0, 0), (1, 0)), constant_values=-100))
  else:
    logits = model.apply(p, hidden, method=lambda m, x: m.lm.logits(x), rngs={"dropout": k_head})
    total, count = next_token_loss(logits, labels)
  return total / jnp.maximum(count, 1), count


def make_step(model: VideoChat, tx: optax.GradientTransformation, *, norm: str, max_label_tokens: int,
              lr_fn=None):
  def step(state: TrainState, batch, rng, num_visible=None):
    del num_visible
    rng = jax.random.fold_in(rng, state.step)
    train, frozen = state.split()

    def loss_fn(train_params):
      return stage3_loss(model, TrainState.merge(train_params, frozen), batch, rng, norm=norm,
                         max_label_tokens=max_label_tokens)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new_state = apply_gradients(state, tx, grads, ok=ok)
    metrics = Stage3Metrics.single_from_model_output(
        loss=loss, answer_tokens=count.astype(jnp.float32) / batch["llm_ids"].shape[0], grad_norm=gnorm,
        lr=lr_fn(state.step) if lr_fn is not None else jnp.zeros(()), skipped_updates=new_state.skipped)
    return new_state, metrics

  return step


def freeze_patterns(model_cfg) -> tuple[list[str], list[str]]:
  """freeze_vision / freeze_qformer / freeze_llm and LoRA -> (freeze, unfreeze) regexes."""
  freeze, unfreeze = [], list(model_cfg.get("unfreeze_keys", ()))
  for flag, prefix in (("freeze_vision", "^vision_encoder/"), ("freeze_qformer", "^qformer/"),
                       ("freeze_llm", "^lm/")):
    if model_cfg.get(flag, False):
      freeze.append(prefix)
  if int(model_cfg.llm.get("lora_rank", 0)) > 0:  # peft: the base LLM is frozen, adapters train
    freeze.append("^lm/")
    unfreeze.append(r"^lm/.*/lora_[ab]$")
  return freeze + list(model_cfg.get("freeze", ())), unfreeze


def check_config(config) -> None:
  """Settings that must agree, checked before any work."""
  m, inst = config.model, config.data.instruct
  queries = int(m.qformer.num_query_tokens) + int(m.qformer.extra_query_tokens)
  clips = num_clips(config)
  if int(inst.get("visual_tokens", 96)) != queries * clips:
    raise ValueError(f"data.instruct.visual_tokens={inst.get('visual_tokens')} must equal the QFormer's "
                     f"num_query_tokens + extra_query_tokens = {queries}" +
                     (f" times the {clips} HD clips (data.load.hd_grid + the global clip)" if clips > 1 else ""))
  grid = tuple(config.data.get("load", {}).get("hd_grid", ()) or ())
  if grid and (len(grid) != 2 or grid[0] * grid[1] > int(m.get("hd_num", 0) or grid[0] * grid[1])):
    raise ValueError(f"data.load.hd_grid={grid} must be (columns, rows) with columns * rows <= "
                     f"model.hd_num={m.get('hd_num', 0)}")
  if int(m.qformer.encoder_width) != int(m.vision.embed_dim):
    raise ValueError(f"model.qformer.encoder_width={m.qformer.encoder_width} must equal "
                     f"model.vision.embed_dim={m.vision.embed_dim}")
  if m.vision.get("attn_pool", True):
    raise ValueError("model.vision.attn_pool must be False in stage 3 (the tokens feed the QFormer)")
  if bool(inst.get("qformer_text", True)) != bool(m.qformer.get("text_input", True)):
    raise ValueError(f"data.instruct.qformer_text={inst.get('qformer_text')} and model.qformer.text_input="
                     f"{m.qformer.get('text_input', True)} must agree")


def num_clips(config) -> int:
  """Clips per example: 1, or with HD tiling (data.load.hd_grid) the tiles + the global clip."""
  grid = tuple(config.data.get("load", {}).get("hd_grid", ()) or ())
  return grid[0] * grid[1] + 1 if len(grid) == 2 else 1


def batch_shapes(config) -> dict:
  m, inst = config.model, config.data.instruct
  v = m.vision
  b = int(config.data.batch_size)
  length = int(inst.get("max_txt_l", 512)) + int(inst.get("visual_tokens", 96))
  sds = jax.ShapeDtypeStruct
  clips = num_clips(config)
  frames = (v.num_frames, v.img_size, v.img_size, 3)
  batch = {"video": sds((b,) + ((clips,) if clips > 1 else ()) + frames, np.uint8),
           "llm_ids": sds((b, length), np.int32), "llm_mask": sds((b, length), np.int32),
           "llm_visual": sds((b, length), np.bool_), "llm_labels": sds((b, length), np.int32)}
  if inst.get("qformer_text", True):
    il = int(inst.get("instruction_l", 64))
    batch["instruction_ids"] = sds((b, il), np.int32)
    batch["instruction_mask"] = sds((b, il), np.int32)
  return batch


def step_parts(config, mesh):
  """Stage 3's training step with everything abstract (see loop.StepParts)."""
  from internvideo2_jax.parallel import mesh as mesh_lib, rules as rules_lib
  from internvideo2_jax.train import flops, loop, optimizer as opt_lib
  check_config(config)
  mc = config.model
  rules = rules_lib.rules_from_config(config.get("sharding_rules", {}).to_dict()
                                      if config.get("sharding_rules") else None)
  mesh_lib.global_batch_size_ok(mesh, int(config.data.batch_size))
  train_model = VideoChat(mc, deterministic=False)
  shapes = batch_shapes(config)
  dummy = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in shapes.items()}
  if num_clips(config) > 1:  # init on one clip: the params do not depend on the clip count
    dummy["video"] = dummy["video"][:, 0]

  def init_fn():
    return train_model.init({"params": jax.random.key(config.seed), "dropout": jax.random.key(1)},
                            dummy["video"].astype(jnp.float32), dummy["llm_ids"], dummy["llm_mask"],
                            dummy["llm_visual"], dummy.get("instruction_ids"), dummy.get("instruction_mask"))

  freeze, unfreeze = freeze_patterns(mc)
  oc = config.optimizer
  abstract, tx, trainable = loop.abstract_state(init_fn, mesh, rules, lambda tr: opt_lib.make_optimizer(oc, tr),
                                                freeze=freeze, unfreeze=unfreeze)
  lr_fn = opt_lib.lr_schedule(float(oc.lr), int(oc.total_steps), int(oc.warmup_steps),
                              float(oc.get("min_lr_multi", 0.25)), oc.get("schedule", "cosine"))
  k = int(config.train.get("max_label_tokens", 0))
  step_fn = make_step(train_model, tx, norm=config.data.get("norm", "imagenet"), max_label_tokens=k, lr_fn=lr_fn)
  n_trainable = sum(int(np.prod(x.shape)) for key, x in opt_lib.flatten(abstract.params).items() if key in trainable)

  def batch_flops(s, num_visible=None):
    del num_visible
    return flops.stage3_train_flops(mc, batch=s["video"].shape[0] * num_clips(config), text_len=s["llm_ids"].shape[1],
                                    head_tokens=k or s["llm_ids"].shape[1],
                                    instruction_len=s["instruction_ids"].shape[1] if "instruction_ids" in s else 0)

  return loop.StepParts(rules=rules, init_fn=init_fn, abstract=abstract, tx=tx, trainable=trainable,
                        step_fn=step_fn, batch=shapes, num_visible=None,
                        flops_per_step=lambda host: batch_flops({k2: v for k2, v in host.items()}),
                        batch_flops=batch_flops, extra={"n_trainable": n_trainable})


def load_weights(config, placer) -> list[str]:
  """Streams the configured pretrained parts into the sharded params; returns what was loaded."""
  from internvideo2_jax.convert.io import load_state_dict
  mc, done = config.model, []
  if mc.get("init"):
    from internvideo2_jax.convert.videochat import videochat_from_state_dict
    videochat_from_state_dict(load_state_dict(mc.init), mc, sink=placer.sink(()))
    done.append(f"the whole model from {mc.init}")
  if mc.get("vision_init"):
    from internvideo2_jax.convert.official import load_vision_init
    done.append(load_vision_init(mc.vision_init, mc.vision, partial=bool(mc.get("vision_init_partial", False)),
                                 sink=placer.sink(("vision_encoder",))))
  if mc.get("qformer_init"):
    from internvideo2_jax.convert.qformer import qformer_from_state_dict
    qformer_from_state_dict(load_state_dict(mc.qformer_init), mc.qformer, sink=placer.sink(("qformer",)))
    done.append(f"QFormer from {mc.qformer_init}")
  if mc.get("llm_init"):
    from internvideo2_jax.convert.llm import load_hf_llm
    load_hf_llm(mc.llm_init, mc.llm, sink=placer.sink(("lm",)))
    done.append(f"LLM from {mc.llm_init}")
  return done


def resolve_inits(config) -> None:
  """A default init file that does not exist (the demo's stage-2 export before the demo ran)
  is dropped with a note; one set explicitly must exist."""
  path = config.model.get("vision_init")
  from internvideo2_jax.convert.io import is_repo_id
  if path and not os.path.exists(path) and "://" not in path and not is_repo_id(path):
    if path == "runs/demo/export/stage2_official_layout.safetensors":
      print(f"note: {path} does not exist (run `bash launch/demo.sh` first for a trained vision "
            "encoder); the vision encoder starts from scratch and trains with the rest", flush=True)
      with config.unlocked():
        config.model.vision_init = ""
    else:
      raise FileNotFoundError(f"model.vision_init={path}: no such file")


def run(config, workdir: str) -> dict:
  """Stage-3 training job."""
  from internvideo2_jax.data import pipeline
  from internvideo2_jax.evaluate import qa as qa_eval
  from internvideo2_jax.parallel import mesh as mesh_lib, sharding
  from internvideo2_jax.train import loop

  from internvideo2_jax.train import corpus, preflight
  corpus.default_to_synthetic(config, "stage3")
  preflight.check(config)  # bad settings named before any model work
  distributed.make_dirs(workdir)
  check_config(config)
  resolve_inits(config)
  corpus.write_synthetic(config, "stage3")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  parts = step_parts(config, mesh)

  def make_state():
    loaded = []
    state = loop.materialize(parts, mesh, load=lambda placer: loaded.extend(load_weights(config, placer)))
    for line in loaded:
      print(f"initialised the {line}", flush=True)
    return state

  state = loop.LazyState(parts.abstract, make_state)
  n = lambda prefix: int(sum(x.size for x in jax.tree.leaves(state.abstract.params.get(prefix, {}))))  # noqa: E731
  print(f"model: vision {n('vision_encoder'):,} + QFormer {n('qformer'):,} + LLM {n('lm'):,} parameters; "
        f"training {parts.extra['n_trainable']:,} in {len(parts.trainable)} tensors; mesh {dict(mesh.shape)}",
        flush=True)
  v = config.model.vision
  ds = lambda start, report=None: pipeline.make_pipeline(  # noqa: E731
      config.data, v, stage="stage3", start_batch=start, report=report)

  eval_fn = None
  if config.eval.qa.get("path"):
    def eval_fn(params):
      return qa_eval.evaluate_qa(config, params, mesh)

  def finish(params, wd):
    from internvideo2_jax.convert.videochat import export_videochat
    host = jax.tree.map(sharding.to_host, params)  # a collective: every process gathers
    if jax.process_index() == 0:
      for line in export_videochat(host, config.model, os.path.join(wd, "export")):
        print(line, flush=True)

  setup = loop.Setup(mesh=mesh, rules=parts.rules, state=state, tx=parts.tx, step_fn=parts.step_fn, data=ds,
                     flops_per_step=parts.flops_per_step, evaluate=eval_fn, finish=finish)
  results = loop.train(config, workdir, setup)
  if jax.process_index() == 0 and "step" in results:
    print(f"\nafter {results.get('step')} steps ({loop.run_totals(results)}):")
    print(qa_eval.format_results(results))
    if eval_fn is not None:
      qa_eval.save_json(results, os.path.join(workdir, "eval_qa.json"))
  return results
