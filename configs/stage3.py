r"""Stage 3: the LLM connector (InternVideo2-Chat): video -> ViT -> LN -> QFormer -> LLM.

Run:
  .venv/bin/iv2 --config=configs/stage3.py --workdir=runs/chat_demo          # demo (synthetic QA)
  .venv/bin/iv2 --config=configs/stage3.py --config.job=chat --workdir=runs/chat_demo \
      --config.chat.video=data/synthetic/videos/val_0000.mp4 --config.chat.question="Which way does the shape move?"
  .venv/bin/iv2 --config=configs/stage3.py:size=7B --workdir=/ckpt/chat7b \
      --config.model.vision_init=/ckpt/s2_1b/export/stage2_official_layout.safetensors \
      --config.model.llm_init=/models/Mistral-7B-Instruct-v0.3 \
      --config.data.corpora='({"format": "json", "path": "/data/videochat2_it/train.json", "data_root": "/data"},)'

Presets: `demo` (default: a small ViT initialised from the stage-2 demo's export when it
exists, a small QFormer and a small Mistral-shaped LLM trained from scratch on the real
Mistral v0.3 tokenizer, on the synthetic QA corpus; ~10 min on 2 CPU cores, held-out
multiple-choice direction accuracy 100% (chance 25%), see README "Stage 3"), `tiny` (tests), `7B` (the 1B vision
encoder's first 39 blocks + BERT-base QFormer + Mistral-7B with LoRA r16/alpha32 on the 8
official targets, bf16, full remat). Official stage-3 recipe (reference §3): AdamW lr 2e-5,
betas (0.9, 0.999), wd 0.02, warm-up 0.6 epoch, cosine to 0.25x, 8 frames, max_txt_l 512.
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.llm import llm_preset
from internvideo2_jax.models.qformer import qformer_preset
from internvideo2_jax.models.vit import vit_preset


def get_config(arg=None):
  a = parse_arg(arg, size="demo", steps=0, batch=0, hd_num=0)
  c = ml_collections.ConfigDict()
  c.job = "train_stage3"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  m = c.model = ml_collections.ConfigDict()
  m.vision_init = ""        # stage-2 export / official checkpoint (vision_encoder.* keys)
  # The encoder is built only to the block whose output the connector reads (x_vis_return_idx=-2,
  # reference §3): a stage-2 checkpoint's later blocks (and its pooling head) are left out by
  # design, so stage 3 loads the matching part and lists what it left out.
  m.vision_init_partial = True
  m.qformer_init = ""       # BLIP-2 / VideoChat2 QFormer weights (Qformer.bert.* / qformer.bert.*)
  m.llm_init = ""           # HF directory of a Mistral / Llama / Qwen2 model
  m.init = ""               # a whole stage-3 model in the official InternVideo2-Chat layout
  m.freeze_vision = False
  m.freeze_qformer = False
  m.freeze_llm = False      # with LoRA (llm.lora_rank > 0) the base LLM is frozen regardless
  m.unfreeze_keys = ()
  m.freeze = ()
  m.hd_num = a.hd_num       # > 0: HD tiling into <= hd_num sub-clips + a global clip

  d = c.data = ml_collections.ConfigDict()
  d.batch_size = 4 * 32
  d.seed = 0
  d.num_workers = 4
  d.norm = "imagenet"
  d.corpora = ()
  d.load = {"sample": "middle", "crop": "squash", "flip": False}
  d.instruct = {"max_txt_l": 512, "visual_tokens": 96, "qformer_text": True, "instruction_l": 64}
  d.synthetic_dir = ""
  d.synthetic_train, d.synthetic_val, d.synthetic_size = 1500, 96, 32
  d.read_threads = 1

  t = c.train = ml_collections.ConfigDict()
  t.max_label_tokens = 0    # > 0: the LM head runs only at that many answer positions per row
  t.total_steps = 10000
  t.log_every = 50
  t.eval_every = 0
  t.checkpoint_every = 1000
  t.keep_checkpoints = 2
  t.stop_at_step = 0
  t.peak_tflops = 0.0

  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 2e-5
  o.min_lr_multi = 0.25
  o.warmup_steps = 600      # official: 0.6 epoch; set 0.6 x (corpus size / batch_size) for yours
  o.total_steps = t.get_ref("total_steps")
  o.schedule = "cosine"
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.02
  o.no_decay = ()
  o.max_grad_norm = -1.0
  o.grad_accum_steps = 1
  o.layer_decay = 1.0
  o.lr_mult = ()

  e = c.eval = ml_collections.ConfigDict()
  e.task = "qa"
  e.qa = ml_collections.ConfigDict({"path": "", "data_root": "", "limit": 0})  # official-format QA json
  e.batch_size = 16
  e.max_new_tokens = 16
  e.checkpoint_dir = ""

  ch = c.chat = ml_collections.ConfigDict()
  ch.video = ""
  ch.question = ""
  ch.interactive = False
  ch.max_new_tokens = 64
  ch.temperature = 0.0
  ch.top_p = 1.0
  ch.instruction = ""       # the official chat `instruction` prefix
  ch.checkpoint_dir = ""

  if a.size == "demo":
    m.vision = vit_preset("tiny", img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=4,
                          num_frames=4, tubelet_size=2, attn_pool=False, init_values=0.1)
    m.vision_init = "runs/demo/export/stage2_official_layout.safetensors"
    m.qformer = qformer_preset("tiny", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                               encoder_width=128, num_query_tokens=8, extra_query_tokens=8,
                               hidden_dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0,
                               max_position_embeddings=64)
    m.llm = llm_preset("small")
    d.synthetic_dir = "data/synthetic"   # the stage-2 demo's corpus (written here if missing)
    d.synthetic_radius = (0.22, 0.3)
    d.corpora = ({"format": "json", "path": "data/synthetic/train_qa.json", "data_root": "data/synthetic",
                  "cache_frames": 32},)
    d.batch_size = 16
    d.num_workers = 0
    d.read_threads = 2
    # whole conversations (6 turns, <= 150 text tokens, <= 35 answer tokens) fit untruncated
    d.instruct = {"max_txt_l": 160, "visual_tokens": 16, "qformer_text": True, "instruction_l": 16}
    t.max_label_tokens = 40
    t.total_steps = 600
    t.log_every = 25
    t.checkpoint_every = 200
    o.lr = 1e-3
    o.warmup_steps = 30
    o.min_lr_multi = 0.1
    o.max_grad_norm = 1.0
    e.qa = ml_collections.ConfigDict({"path": "data/synthetic/val_qa.json", "data_root": "data/synthetic",
                                      "limit": 0})
    e.batch_size = 48
    e.max_new_tokens = 8
  elif a.size == "tiny":
    m.vision = vit_preset("tiny", attn_pool=False, num_frames=4)
    m.qformer = qformer_preset("tiny", encoder_width=m.vision.embed_dim)
    m.llm = llm_preset("tiny", vocab_size=32768, lora_rank=4)
    d.batch_size, d.num_workers = 8, 0
    d.instruct = {"max_txt_l": 96, "visual_tokens": 8, "qformer_text": True, "instruction_l": 16}
    t.max_label_tokens = 24
    t.total_steps, t.log_every, t.checkpoint_every = 4, 2, 2
    o.warmup_steps = 1
    o.lr = 1e-3
    e.batch_size, e.max_new_tokens = 8, 4
  elif a.size == "7B":
    # InternVideo2-Chat-8B: the 1B encoder built to depth 39 (x_vis_return_idx=-2), 8 frames,
    # BERT-base QFormer (32 + 64 queries), Mistral-7B-Instruct-v0.3 with LoRA.
    m.vision = vit_preset("1B", depth=39, attn_pool=False, num_frames=8, sep_image_video_pos_embed=True,
                          dtype="bfloat16", remat_policy="full")
    m.qformer = qformer_preset("bert-base", encoder_width=1408, dtype="bfloat16")
    m.llm = llm_preset("mistral-7b", lora_rank=16, lora_alpha=32.0, lora_dropout=0.1,
                       dtype="bfloat16", remat_policy="full")
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8, "tensor": 1})
    d.batch_size = 4 * 64
    t.max_label_tokens = 256
  else:
    raise ValueError(f"unknown stage-3 size {a.size!r}: demo, tiny or 7B")
  if a.hd_num:
    # HD (the 8B-HD recipe): columns x rows sub-clips + a global clip per video, each through
    # ViT -> LN -> QFormer. Training batches need one fixed grid (the official fix_ratio (2, 1));
    # chat / QA evaluation pick the grid per video from hd_num unless data.load.hd_grid is set.
    d.load = dict(d.load, hd_grid=(2, 1))
    queries = m.qformer.num_query_tokens + m.qformer.extra_query_tokens
    d.instruct = dict(d.instruct, visual_tokens=queries * 3)
  if a.steps:
    t.total_steps = a.steps
  if a.batch:
    d.batch_size = a.batch
  add_runtime(c, step="train_stage3")
  return c
