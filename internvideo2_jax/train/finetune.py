"""Fine-tuning and probing the video encoder on a labelled video task (the official
single-modality recipe, reference §5.3 and §8; `configs/finetune.py`).

Modes (`config.mode`):
- `full`: every parameter trains; layer-wise lr decay 0.9 (layer id 0 for cls / position / patch
  embedding, i + 1 for block i, scale 1 for the pooling head, fc_norm and head), drop path,
  RandAugment (the same ops over a clip's frames), random erasing, mixup / cutmix with label
  smoothing (ops/mixup.py), AdamW (0.9, 0.999), warm-up then cosine to min_lr.
- `attentive`: the official `--open_clip_projector` probe: the encoder is frozen (no gradient,
  no optimizer state) except its attention-pooling head, which trains with fc_norm and the
  linear classifier (lr 2e-4, weight decay 0).
- `linear`: the encoder is frozen and run once: the pooled features of every training clip
  are cached (one test view each) and fc_norm + the linear classifier train on them.

Evaluation (`evaluate/views.py`): `eval.num_segments` x `eval.num_crops` views per video,
softmax-averaged; top-1/5, per-class accuracy and the confusion matrix go to
`WORKDIR/eval_classification.json` and `WORKDIR/confusion.png`. The export is the official
fine-tuning key layout (`WORKDIR/export/finetune_official_layout.safetensors`).
"""

# (no `from __future__ import annotations`: clu builds the metric collections from the
# annotations at runtime)

import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from internvideo2_jax.data.transforms import normalize
from internvideo2_jax.evaluate import views
from internvideo2_jax.ops import mixup as mixup_lib
from internvideo2_jax.parallel import distributed
from internvideo2_jax.train.state import TrainState, apply_gradients

MODES = ("full", "attentive", "linear")


@flax.struct.dataclass
class FinetuneMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  lr: clu_metrics.LastValue.from_output("lr")
  skipped_updates: clu_metrics.LastValue.from_output("skipped_updates")


def soft_cross_entropy(logits, targets):
  """timm SoftTargetCrossEntropy: mean over the batch of -sum(target * log_softmax)."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


def build_model_config(config):
  from internvideo2_jax.models.classifier import classifier_config
  m = config.model
  return classifier_config(m.vision, int(m.num_classes), fc_drop_rate=float(m.get("fc_drop_rate", 0.0)))


def freeze_for_mode(mode: str) -> tuple[list[str], list[str]]:
  """(freeze, unfreeze) regexes: the probes freeze the encoder (the attentive one keeps its
  attention pool trainable); fc_norm and the head always train."""
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r}: one of {MODES}")
  if mode == "full":
    return [], []
  if mode == "attentive":
    return ["^vision_encoder/"], ["^vision_encoder/clip_projector/"]
  return ["^vision_encoder/"], []


def make_step(model, tx, config, *, groups: int, lr_fn):
  """The pure step `(state, batch, rng, num_visible) -> (state, metrics)`: normalise, random
  erasing, mixup / cutmix (per batch shard), forward with drop path, soft-target CE."""
  aug, norm = config.augment, config.data.get("norm", "imagenet")
  c = int(config.model.num_classes)
  dtype = jnp.dtype(config.model.vision.get("dtype", "float32"))

  def step(state: TrainState, batch, rng, num_visible=None):
    del num_visible
    k_erase, k_mix, k_drop = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    video = normalize(batch["video"], norm, dtype)
    video = mixup_lib.random_erasing(k_erase, video, float(aug.reprob))
    video, targets, _ = mixup_lib.mixup_cutmix(
        k_mix, video, batch["label"], c, groups=groups, mixup_alpha=float(aug.mixup),
        cutmix_alpha=float(aug.cutmix), switch_prob=float(aug.switch_prob), smoothing=float(aug.smoothing))
    train, frozen = state.split()

    def loss_fn(train_params):
      params = TrainState.merge(train_params, frozen)
      logits = model.apply({"params": params}, video, train=True, rngs={"dropout": k_drop})
      return soft_cross_entropy(logits, targets)

    loss, grads = jax.value_and_grad(loss_fn)(train)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    new_state = apply_gradients(state, tx, grads, ok=ok)
    metrics = FinetuneMetrics.single_from_model_output(
        loss=loss, grad_norm=gnorm, lr=lr_fn(state.step), skipped_updates=new_state.skipped)
    return new_state, metrics

  return step


def step_parts(config, mesh, mcfg=None):
  """The fine-tuning step with everything abstract (loop.StepParts)."""
  from internvideo2_jax.models.classifier import VideoClassifier
  from internvideo2_jax.parallel import mesh as mesh_lib, rules as rules_lib
  from internvideo2_jax.train import flops, loop, optimizer as opt_lib
  mcfg = mcfg or build_model_config(config)
  v = mcfg.vision
  rules = rules_lib.rules_from_config(None)
  b = int(config.data.batch_size)
  mesh_lib.global_batch_size_ok(mesh, b)
  groups = mesh.shape["data"] * mesh.shape["fsdp"]
  model = VideoClassifier(mcfg)
  dummy = jnp.zeros((1, v.num_frames, v.img_size, v.img_size, 3), jnp.float32)
  init_fn = lambda: model.init({"params": jax.random.key(config.seed), "dropout": jax.random.key(1)}, dummy)  # noqa: E731
  freeze, unfreeze = freeze_for_mode(config.mode)
  oc = config.optimizer
  abstract, tx, trainable = loop.abstract_state(
      init_fn, mesh, rules, lambda tr: opt_lib.make_optimizer(oc, tr, vision_depth=v.depth),
      freeze=freeze, unfreeze=unfreeze)
  lr_fn = opt_lib.lr_schedule(float(oc.lr), int(oc.total_steps), int(oc.warmup_steps),
                              float(oc.get("min_lr_multi", 0.01)), oc.get("schedule", "cosine_min"))
  step_fn = make_step(model, tx, config, groups=groups, lr_fn=lr_fn)
  sds = jax.ShapeDtypeStruct
  batch = {"video": sds((b, v.num_frames, v.img_size, v.img_size, 3), np.uint8), "label": sds((b,), np.int32)}
  per_clip = flops.classifier_train_flops(v, full=config.mode == "full")
  return loop.StepParts(rules=rules, init_fn=init_fn, abstract=abstract, tx=tx, trainable=trainable,
                        step_fn=step_fn, batch=batch, num_visible=None,
                        flops_per_step=lambda host: per_clip * len(host["video"]),
                        batch_flops=lambda shapes, _: per_clip * shapes["video"].shape[0],
                        extra={"mcfg": mcfg, "model": model})


def class_names(config) -> list[str]:
  """Names from the evaluation (or first training) corpus's class-index file, else 0..C-1."""
  from internvideo2_jax.data import sources
  c = int(config.model.num_classes)
  for corpus in [config.eval.corpus.to_dict()] + [dict(x) for x in config.data.corpora]:
    if corpus.get("classes"):
      names = sources.load_classes(corpus["classes"])
      if len(names) != c:
        raise ValueError(f"model.num_classes={c} but {corpus['classes']} lists {len(names)} classes")
      return names
  return [str(i) for i in range(c)]


def check_labels(records, num_classes: int, where: str) -> None:
  """Labels outside 0..num_classes-1 would train as all-zero targets: an error naming the row."""
  for i in range(len(records)):
    label = int(records[i]["label"])
    if not 0 <= label < num_classes:
      raise ValueError(f"{where}: {records[i]['key']} has label {label}, outside 0..{num_classes - 1} "
                       f"(model.num_classes={num_classes})")


def check_settings(config) -> None:
  """Before any model work: the mode, the RandAugment string, and the labels of the annotation
  lists (parsed once more here; packed shards are checked when read)."""
  import collections
  from internvideo2_jax.data import sources
  from internvideo2_jax.data.randaugment import RandAugmentSpec
  freeze_for_mode(config.mode)
  ra = config.data.load.get("rand_augment", "")
  if ra:
    try:
      RandAugmentSpec.parse(ra)
    except ValueError as e:
      raise ValueError(f"config.data.load.rand_augment: {e}") from None
  for n, c in enumerate(config.data.corpora):
    c = dict(c)
    if c.get("format", "json") in ("labels", "json") and os.path.exists(c.get("path", "")):
      check_labels(sources.open_corpus(dict(c, cache_frames=0), skipped=collections.Counter(), uses=()),
                   int(config.model.num_classes), f"config.data.corpora[{n}] {c['path']}")


def load_init(config, vision_cfg, placer) -> str:
  """`model.init_from`: an official-layout / exported checkpoint file (stage 1, stage 2, CLIP,
  a fine-tuned classifier: only the encoder's keys are read), a workdir (its export), a
  directory laid out like a Hugging Face repo, or a repo id."""
  from internvideo2_jax.convert.official import load_vision_init
  path = config.model.get("init_from", "")
  if not path:
    return ""
  if os.path.isdir(path):
    found = [os.path.join(path, "export", f) for f in ("stage2_official_layout.safetensors",
                                                        "stage1_official_layout.safetensors",
                                                        "finetune_official_layout.safetensors")]
    found = [f for f in found if os.path.exists(f)]
    if found:  # else a directory laid out like a Hugging Face repo (convert.io.resolve_weights)
      path = found[0]
  return load_vision_init(path, vision_cfg, partial=bool(config.model.get("init_partial", False)),
                          sink=placer.sink(("vision_encoder",)))


def evaluate(model, params, mesh, config, spec, records, labels, names, *, num_segments=None, num_crops=None):
  """Multi-view evaluation of a classifier's params; returns the metrics dict (+ data counts)."""
  e = config.eval
  norm = config.data.get("norm", "imagenet")
  dtype = jnp.dtype(model.config.vision.get("dtype", "float32"))
  fn = jax.jit(lambda p, v: jax.nn.softmax(model.apply({"params": p}, normalize(v, norm, dtype)), axis=-1))
  probs, valid, reasons = views.view_outputs(
      lambda batch: fn(params, batch), records, spec, mesh,
      num_segments=int(num_segments or e.num_segments), num_crops=int(num_crops or e.num_crops),
      batch_size=int(e.batch_size))
  res = views.classification_metrics(probs[valid], np.asarray(labels)[valid], names)
  res["views"] = f"{int(num_segments or e.num_segments)} x {int(num_crops or e.num_crops)}"
  res["data"] = {"items": int(valid.sum()), "skipped": dict(reasons)}
  return res


def _eval_setup(config, vision):
  """(records, labels, LoadSpec) of the evaluation corpus, or None when there is none."""
  import dataclasses
  import collections
  from internvideo2_jax.data import sources
  from internvideo2_jax.data.pipeline import _spec_from_config
  corpus = config.eval.corpus.to_dict()
  if not corpus.get("path"):
    return None
  refused = collections.Counter()
  records = sources.open_corpus(corpus, skipped=refused, uses=())
  check_labels(records, int(config.model.num_classes), f"config.eval.corpus {corpus['path']}")
  spec = dataclasses.replace(_spec_from_config(config.data, vision, "finetune", train=False))
  labels = [int(records[i]["label"]) for i in range(len(records))]
  if refused and jax.process_index() == 0:
    print(f"eval: {dict(refused)} rows of {corpus['path']} refused at parse time", flush=True)
  return records, labels, spec


def run(config, workdir: str) -> dict:
  """The fine-tuning job (modes full / attentive / linear)."""
  from internvideo2_jax.data import pipeline
  from internvideo2_jax.parallel import mesh as mesh_lib
  from internvideo2_jax.train import corpus, loop, preflight
  corpus.default_to_synthetic(config, "finetune")
  preflight.check(config)
  distributed.make_dirs(workdir)
  corpus.write_synthetic(config, "finetune")
  resolve_init(config)
  names = class_names(config)
  check_settings(config)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  if config.mode == "linear":
    return run_linear(config, workdir, mesh, names)
  parts = step_parts(config, mesh)
  mcfg, model = parts.extra["mcfg"], parts.extra["model"]
  eval_model = type(model)(mcfg)

  def make_state():
    msg = []
    state = loop.materialize(parts, mesh, load=lambda placer: msg.append(load_init(config, mcfg.vision, placer)))
    if msg and msg[0]:
      print(f"initialised the {msg[0]}", flush=True)
    elif jax.process_index() == 0:
      print("the encoder starts from scratch (model.init_from is empty)", flush=True)
    return state

  state = loop.LazyState(parts.abstract, make_state)
  ds = lambda start, report=None: pipeline.make_pipeline(  # noqa: E731
      config.data, mcfg.vision, stage="finetune", start_batch=start, report=report)
  n_train = sum(int(np.prod(x.shape)) for k, x in _flat(parts.abstract.params).items() if k in set(parts.trainable))
  print(f"{config.mode} fine-tuning: {len(names)} classes; training {n_train:,} parameters in "
        f"{len(parts.trainable)} tensors; mesh {dict(mesh.shape)}", flush=True)
  ev = _eval_setup(config, mcfg.vision)
  eval_fn = None
  if ev is not None:
    def eval_fn(params):
      return evaluate(eval_model, params, mesh, config, ev[2], ev[0], ev[1], names)

  def finish(params, wd):
    _export(params, mcfg, wd)

  setup = loop.Setup(mesh=mesh, rules=parts.rules, state=state, tx=parts.tx, step_fn=parts.step_fn, data=ds,
                     flops_per_step=parts.flops_per_step, evaluate=eval_fn, finish=finish)
  results = loop.train(config, workdir, setup)
  if jax.process_index() == 0 and "top1" in results:
    print(f"\nheld-out classification after {results['step']} steps ({loop.run_totals(results)}):")
    _report(results, workdir)
  return results


def _flat(tree):
  from internvideo2_jax.train.optimizer import flatten
  return flatten(tree)


def _export(params, mcfg, wd):
  from internvideo2_jax.convert.io import save_state_dict
  from internvideo2_jax.convert.official import classifier_to_state_dict
  from internvideo2_jax.parallel import sharding
  host = jax.tree.map(sharding.to_host, params)  # a collective: every process gathers
  if jax.process_index() == 0:
    path = os.path.join(wd, "export", "finetune_official_layout.safetensors")
    save_state_dict(classifier_to_state_dict(host, mcfg), path)
    print(f"exported the classifier in the official fine-tuning key layout: {path}", flush=True)


def _report(results: dict, workdir: str) -> None:
  from internvideo2_jax.evaluate import retrieval
  print(f"top-1 {results['top1']:.1f}%  top-5 {results['top5']:.1f}%  mean class accuracy "
        f"{results['mean_class_accuracy']:.1f}%  ({results['num_videos']} videos, {results['views']} views)")
  for name, acc in results["per_class"].items():
    print(f"  {name}: {'-' if acc is None else f'{acc:.1f}%'}")
  retrieval.save_json(results, os.path.join(workdir, "eval_classification.json"))
  print(f"confusion matrix: {views.save_confusion_png(results, os.path.join(workdir, 'confusion.png'))}")


def resolve_init(config) -> None:
  """The demo's default init (the stage-2 demo's export) may not exist yet: then the encoder
  starts from scratch, with a note; an init set explicitly must exist."""
  path = config.model.get("init_from", "")
  from internvideo2_jax.convert.io import is_repo_id
  if path and not os.path.exists(path) and "://" not in path and not is_repo_id(path):
    if path == "runs/demo/export/stage2_official_layout.safetensors":
      print(f"note: {path} does not exist (run `bash launch/demo.sh` first for a pretrained encoder); "
            "the encoder starts from scratch", flush=True)
      config.model.init_from = ""
    else:
      raise FileNotFoundError(f"model.init_from={path}: no such file or directory")


def run_linear(config, workdir: str, mesh, names) -> dict:
  """Linear probe: pooled features of the training clips computed once (one test view each),
  then fc_norm + head trained on them with AdamW (full passes, shuffled minibatches)."""
  from internvideo2_jax.data import sources
  from internvideo2_jax.data.pipeline import _spec_from_config
  from internvideo2_jax.models.classifier import VideoClassifier
  from internvideo2_jax.parallel import sharding
  from internvideo2_jax.train import loop
  import collections
  parts = step_parts(config, mesh)
  mcfg = parts.extra["mcfg"]
  model = VideoClassifier(mcfg)
  t0 = time.perf_counter()
  state = loop.materialize(parts, mesh, load=lambda placer: load_init(config, mcfg.vision, placer))
  params = state.params
  spec = _spec_from_config(config.data, mcfg.vision, "finetune", train=False)
  records, labels = [], []
  refused = collections.Counter()
  for c in config.data.corpora:
    recs = sources.open_corpus(dict(c), skipped=refused, uses=())
    records += [recs[i] for i in range(len(recs))]
  labels = np.asarray([int(r["label"]) for r in records])
  norm = config.data.get("norm", "imagenet")
  dtype = jnp.dtype(mcfg.vision.get("dtype", "float32"))
  from internvideo2_jax.models.vit import VisionEncoder
  enc = VisionEncoder(mcfg.vision)
  feat = jax.jit(lambda p, v: enc.apply({"params": p}, normalize(v, norm, dtype))["pooled"])
  feats, valid, reasons = views.view_outputs(lambda b: feat(params["vision_encoder"], b), records, spec, mesh,
                                             num_segments=1, num_crops=1, batch_size=int(config.eval.batch_size))
  feats, labels = feats[valid], labels[valid]
  print(f"linear probe: features of {len(feats)} training clips in {time.perf_counter() - t0:.0f}s"
        + (f" (skipped {dict(reasons)})" if reasons else ""), flush=True)
  head = {k: jax.tree.map(sharding.to_host, params[k]) for k in ("fc_norm", "head")}
  head, history = _train_linear(head, feats, labels, config)
  if jax.process_index() == 0:
    print(f"linear probe: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs", flush=True)
  # back into global arrays of the params' own shardings (every process holds the same head)
  params = dict(params, **{k: jax.tree.map(lambda new, old: sharding.global_from_host(np.asarray(new), old.sharding),
                                           v, params[k]) for k, v in head.items()})
  results = {"step": len(history), "linear_loss": history}
  ev = _eval_setup(config, mcfg.vision)
  if ev is not None:
    results.update(evaluate(model, params, mesh, config, ev[2], ev[0], ev[1], names))
  _export(params, mcfg, workdir)
  if jax.process_index() == 0 and "top1" in results:
    print("\nheld-out classification (linear probe):")
    _report(results, workdir)
  return results


def _train_linear(head: dict, feats: np.ndarray, labels: np.ndarray, config):
  """fc_norm + head on cached features: replicated (small), the same on every process."""
  from internvideo2_jax.models.layers import LayerNorm
  lc = config.linear
  c = int(config.model.num_classes)
  steps_per_epoch = max(1, len(feats) // int(lc.batch_size))
  total = steps_per_epoch * int(lc.epochs)
  sched = optax.cosine_decay_schedule(float(lc.lr), total)
  tx = optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=float(lc.weight_decay))
  smoothing = float(config.augment.smoothing)

  def loss_fn(h, x, y):
    z = LayerNorm(1e-5).apply({"params": h["fc_norm"]}, x)
    logits = z @ h["head"]["kernel"] + h["head"]["bias"]
    return soft_cross_entropy(logits, mixup_lib.smooth_one_hot(y, c, smoothing))

  @jax.jit
  def epoch(h, opt, key, x, y):
    perm = jax.random.permutation(key, len(x))[: steps_per_epoch * int(lc.batch_size)]
    xb = x[perm].reshape(steps_per_epoch, -1, x.shape[-1])
    yb = y[perm].reshape(steps_per_epoch, -1)

    def body(carry, batch):
      h, opt = carry
      loss, g = jax.value_and_grad(loss_fn)(h, *batch)
      upd, opt = tx.update(g, opt, h)
      return (optax.apply_updates(h, upd), opt), loss

    (h, opt), losses = jax.lax.scan(body, (h, opt), (xb, yb))
    return h, opt, losses.mean()

  opt = tx.init(head)
  x, y = jnp.asarray(feats, jnp.float32), jnp.asarray(labels, jnp.int32)
  history = []
  for e in range(int(lc.epochs)):
    head, opt, loss = epoch(head, opt, jax.random.key(e), x, y)
    history.append(float(loss))
  return jax.tree.map(np.asarray, head), history
