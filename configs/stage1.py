r"""Stage 1: unmasked-token distillation from a CLIP teacher and a VideoMAE teacher.

Run:
  .venv/bin/iv2 --config=configs/stage1.py:size=tiny --workdir=runs/stage1_tiny     # CPU, ~2 min
  .venv/bin/iv2 --config=configs/stage1.py:size=1B --workdir=/ckpt/s1_1b \
      --config.data.corpora='({"format": "csv", "path": "/data/k710/train.csv", "data_root": "/data"},)' \
      --config.model.clip_teacher_init=/ckpt/internvl_c_13b_224px.pth \
      --config.model.mae_teacher_init=/ckpt/vit_g_hybrid_1200e_pre.pth
Then stage 2 from it: --config.model.vision_init=<workdir>/export/stage1_official_layout.safetensors
(only the encoder is read; 8 -> 4 frames interpolated; decoders dropped).

Official recipe (reference §1.9, §8): 16 frames (the student and CLIP teacher see every second
one), attention masking 80%, 6 CLIP layers at interval 1 and 4 MAE layers, loss 1/1/1, AdamW
(0.9, 0.98, eps 1e-6), lr 1.5e-4 x batch / 256, min lr 1e-5 x batch / 256, 40 of 301 epochs of
warm-up, cosine, weight decay 0.05, clip 3.0, drop path 0.25 (1B) / 0.3 (6B).
The tiny preset trains on the synthetic corpus with small random teachers (a smoke test of the
whole path: loss goes down, checkpoints, resumes; not a real distillation).
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.teachers import clip_teacher_preset, mae_teacher_preset
from internvideo2_jax.models.vit import vit_preset


def get_config(arg=None):
  a = parse_arg(arg, size="tiny", steps=0, batch=0)
  c = ml_collections.ConfigDict()
  c.job = "train_stage1"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  m = c.model = ml_collections.ConfigDict()
  m.clip_student_return_interval = 1.0
  m.clip_teacher_init = ""
  m.mae_teacher_init = ""
  d = c.data = ml_collections.ConfigDict()
  d.seed, d.num_workers, d.norm, d.read_threads = 0, 4, "imagenet", 1
  d.corpora = ()
  d.load = {"num_frames": 16, "sample": "segments", "crop": "multiscale", "text": False}
  d.synthetic_dir, d.synthetic_train, d.synthetic_size = "", 64, 32
  c.cache = ml_collections.ConfigDict({"views": 1, "num_shards": 4, "dtype": "bfloat16"})  # cache_targets job
  t = c.train = ml_collections.ConfigDict()
  t.mask_type, t.mask_ratio = "attention", 0.8
  t.loss = ml_collections.ConfigDict({"clip": 1.0, "clip_final": 1.0, "mae": 1.0})
  t.targets_dtype = ""
  t.log_every, t.eval_every, t.checkpoint_every, t.keep_checkpoints = 50, 0, 1000, 2
  t.stop_at_step = 0        # > 0: save and exit after this step (a planned stop; resume later)
  t.peak_tflops = 0.0
  o = c.optimizer = ml_collections.ConfigDict()
  o.b1, o.b2, o.eps, o.weight_decay, o.max_grad_norm = 0.9, 0.98, 1e-6, 0.05, 3.0
  o.schedule = "cosine_min"
  o.grad_accum_steps, o.layer_decay = 1, 1.0
  if a.size == "tiny":
    m.vision = vit_preset("tiny", num_frames=8, init_values=0.1)
    m.clip_teacher = clip_teacher_preset("tiny", return_layers=2)
    m.mae_teacher = mae_teacher_preset("tiny", return_layers=2)
    d.batch_size, d.num_workers = 8, 0
    d.synthetic_dir = "data/synthetic_stage1"
    d.corpora = ({"format": "csv", "path": "data/synthetic_stage1/train_stage1.csv",
                  "data_root": "data/synthetic_stage1"},)
    t.total_steps, t.log_every, t.checkpoint_every = 60, 10, 30
    base_lr = 1e-3
  else:
    size = {"1B": "1B", "6B": "6B"}.get(a.size)
    if size is None:
      raise ValueError(f"unknown stage-1 size {a.size!r}: tiny, 1B or 6B")
    m.vision = vit_preset(size, num_frames=8, dtype="bfloat16", remat_policy="full")
    m.clip_teacher = clip_teacher_preset("6B", return_layers=6, dtype="bfloat16")
    m.mae_teacher = mae_teacher_preset("g", return_layers=4, dtype="bfloat16")
    d.batch_size = 32 * 128 if size == "1B" else 8 * 256
    t.total_steps = 100000
    t.targets_dtype = "bfloat16"
    base_lr = 1.5e-4
    # FSDP over 8 (1B: width 1408) or 64 chips (6B: width 3200, teachers 3200 / 1408), data
    # parallel over the rest: 64 divides the widths and maps onto v5p 4x4x8 / 4x8x8 and v6e
    # 16x16 (fsdp over all 256 chips would not divide 3200). 32 chips: --config.mesh.fsdp=32.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8 if size == "1B" else 64, "tensor": 1})
  if a.batch:
    d.batch_size = a.batch
  if a.steps:
    t.total_steps = a.steps
  scale = d.batch_size / 256 if a.size != "tiny" else 1.0
  o.lr = base_lr * scale
  o.min_lr_multi = 1e-5 / 1.5e-4                      # min lr 1e-5 x batch / 256
  o.total_steps = t.get_ref("total_steps")
  o.warmup_steps = int(t.total_steps * 40 / 301)      # 40 of 301 epochs
  add_runtime(c, step="train_stage1")
  return c
