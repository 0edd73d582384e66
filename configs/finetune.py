r"""Fine-tuning and probing the video encoder on action recognition (official single-modality
recipe: reference §5.3, §8; `internvideo2_jax/train/finetune.py`).

Run:
  .venv/bin/iv2 --config=configs/finetune.py --workdir=runs/ft_demo              # demo (synthetic)
  .venv/bin/iv2 --config=configs/finetune.py:mode=attentive --workdir=runs/ap_demo
  .venv/bin/iv2 --config=configs/finetune.py:size=1B,num_classes=710 --workdir=/ckpt/ft_k710 \
      --config.model.init_from=/ckpt/s2_1b/export/stage2_official_layout.safetensors \
      --config.data.corpora='({"format": "labels", "path": "/data/k710/train.txt", "data_root": "/data/k710"},)' \
      --config.eval.corpus.path=/data/k400/val.txt --config.eval.corpus.data_root=/data/k400

Data: the official classification lists (`path label` lines; a label may be a class name when
the corpus names a class-index file: {"format": "labels", ..., "classes": "classes.txt"}), or
JSON rows with an integer "label".

Presets: `demo` (default: the stage-2 demo's small encoder, initialised from its export when
`bash launch/demo.sh` ran, on the synthetic clips' direction of motion, 4 classes; ~2 min on 2
CPU cores), `tiny` (tests), `S`/`B`/`L`/`1B`/`6B` with the official 1B recipe
(`1B_ft_k710_f8.sh`: lr 1e-4 effective, min lr 1e-6, 9 epochs with 2 of warm-up, layer decay
0.9, drop path 0.3, weight decay 0.05, AdamW (0.9, 0.999), 8 frames, mixup 0.8, cutmix 1.0,
label smoothing 0.1, RandAugment rand-m7-n4-mstd0.5-inc1, random erasing 0.25, 4 x 3 test views;
the official scripts give no other sizes' values, so they share it). Modes: `full` (default),
`attentive` (`--open_clip_projector`: lr 2e-4, weight decay 0, layer decay 1, 1 x 3 views),
`linear` (frozen encoder, cached features, 1 x 3 views). Steps: set `train.total_steps` to
epochs x clips / batch for your corpus (and `optimizer.warmup_steps` to 2 epochs).
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.vit import vit_preset


def get_config(arg=None):
  a = parse_arg(arg, size="demo", mode="full", num_classes=0, frames=0, task="direction", steps=0, batch=0)
  c = ml_collections.ConfigDict()
  c.job = "finetune"
  c.mode = a.mode           # full | attentive | linear
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  m = c.model = ml_collections.ConfigDict()
  m.num_classes = 400
  m.fc_drop_rate = 0.0
  m.init_from = ""          # stage-1/2/CLIP/fine-tuned checkpoint file (encoder keys), or a workdir
  m.init_partial = False    # True: load the matching part of a different-shaped encoder

  d = c.data = ml_collections.ConfigDict()
  d.batch_size = 8 * 2 * 32
  d.seed = 0
  d.num_workers = 4
  d.norm = "imagenet"
  d.read_threads = 1
  d.corpora = ()            # ({"format": "labels", "path": ..., "data_root": ..., "classes": ...},)
  d.load = {"sample": "segments", "crop": "rrc", "rrc_scale": (0.08, 1.0), "flip": True,
            "rand_augment": "rand-m7-n4-mstd0.5-inc1"}
  d.synthetic_dir = ""
  d.synthetic_task = a.task  # direction | shape | colour (the synthetic corpus's label lists)
  d.synthetic_train, d.synthetic_val, d.synthetic_size = 1500, 96, 32
  d.synthetic_radius = (0.22, 0.3)

  g = c.augment = ml_collections.ConfigDict()
  g.mixup, g.cutmix, g.switch_prob, g.smoothing, g.reprob = 0.8, 1.0, 0.5, 0.1, 0.25

  t = c.train = ml_collections.ConfigDict()
  t.total_steps = 10000
  t.log_every = 50
  t.eval_every = 0
  t.checkpoint_every = 1000
  t.keep_checkpoints = 2
  t.stop_at_step = 0
  t.peak_tflops = 0.0

  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 1e-4
  o.min_lr_multi = 1e-6 / 1e-4
  o.warmup_steps = 1000
  o.total_steps = t.get_ref("total_steps")
  o.schedule = "cosine_min"  # SM cosine_scheduler: linear warm-up from 0, cosine to min_lr
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.05
  o.no_decay = ()
  o.max_grad_norm = 0.0      # the fine-tuning scripts set no clipping
  o.grad_accum_steps = 1
  o.layer_decay = 0.9
  o.lr_mult = ()

  e = c.eval = ml_collections.ConfigDict()
  e.corpus = ml_collections.ConfigDict({"format": "labels", "path": "", "data_root": "", "classes": ""})
  e.num_segments, e.num_crops = 4, 3
  e.batch_size = 8

  c.linear = ml_collections.ConfigDict({"epochs": 100, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0})

  if a.size == "demo":
    m.vision = vit_preset("tiny", img_size=32, patch_size=8, embed_dim=128, depth=3, num_heads=4,
                          num_frames=4, tubelet_size=2, attn_pool_num_heads=4, clip_embed_dim=128,
                          init_values=0.1, drop_path_rate=0.1)
    m.init_from = "runs/demo/export/stage2_official_layout.safetensors"
    m.num_classes = 4
    d.synthetic_dir = "data/synthetic"
    d.batch_size, d.num_workers, d.read_threads = 32, 0, 2
    # a mirrored clip of a shape moving right moves left: like the official SSv2 fine-tuning,
    # no horizontal flip for direction labels
    d.load = dict(d.load.to_dict(), flip=a.task != "direction")
    root, task = "data/synthetic", a.task   # written at start when missing (as the stage-2 demo's)
    d.corpora = ({"format": "labels", "path": f"{root}/train_{task}.txt", "data_root": root,
                  "classes": f"{root}/classes_{task}.txt", "cache_frames": 32},)
    e.corpus = ml_collections.ConfigDict({"format": "labels", "path": f"{root}/val_{task}.txt",
                                          "data_root": root, "classes": f"{root}/classes_{task}.txt"})
    t.total_steps, t.log_every, t.checkpoint_every = 300, 25, 150
    o.lr, o.warmup_steps = 1e-3, 30
    e.batch_size = 32
    c.linear.epochs, c.linear.batch_size, c.linear.lr = 100, 128, 3e-3
  elif a.size == "tiny":
    m.vision = vit_preset("tiny", attn_pool_num_heads=4)
    m.num_classes = 4
    d.batch_size, d.num_workers = 8, 0
    t.total_steps, t.log_every, t.checkpoint_every = 4, 2, 2
    o.warmup_steps = 1
    e.num_segments, e.num_crops, e.batch_size = 2, 3, 4
    c.linear.epochs, c.linear.batch_size = 3, 8
  else:
    size = {"S": "S", "B": "B", "L": "L", "1B": "1B", "6B": "6B"}.get(a.size)
    if size is None:
      raise ValueError(f"unknown fine-tuning size {a.size!r}: demo, tiny, S, B, L, 1B or 6B")
    m.vision = vit_preset(size, num_frames=8, dtype="bfloat16", remat_policy="full", drop_path_rate=0.3)
    t.total_steps = 9 * 650000 // d.batch_size   # K710: ~650k clips, 9 epochs
    o.warmup_steps = 2 * 650000 // d.batch_size
    if size in ("1B", "6B"):
      c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8 if size == "1B" else 64, "tensor": 1})
  if a.mode == "attentive":
    o.lr, o.weight_decay, o.layer_decay = 2e-4, 0.0, 1.0
    m.vision.drop_path_rate = 0.0
    e.num_segments = 1
  elif a.mode == "linear":
    e.num_segments = 1
  elif a.mode != "full":
    raise ValueError(f"unknown fine-tuning mode {a.mode!r}: full, attentive or linear")
  if a.frames:
    m.vision.num_frames = a.frames
  if a.num_classes:
    m.num_classes = a.num_classes
  if a.batch:
    d.batch_size = a.batch
  if a.steps:
    t.total_steps = a.steps
  add_runtime(c, step="finetune")
  return c
