r"""Stage 2: video-text alignment (VTC + VTM + MLM), official hyperparameters per size.

Run (the README's first command runs the `demo` preset):
  .venv/bin/iv2 --config=configs/stage2.py --workdir=runs/stage2_demo                # demo
  .venv/bin/iv2 --config=configs/stage2.py:size=1B --workdir=/ckpt/s2_1b \
      --config.data.corpora='({"format": "array_record", "path": "/data/webvid/shards/train"},)' \
      --config.model.vision_init=/ckpt/1B_stage1.pth --config.eval.corpus.path=/data/msrvtt/test.json
  .venv/bin/iv2 --config=configs/stage2.py:size=1B,clip ...   # CLIP-style post-pretraining

Presets: `demo` (default: a small video ViT from scratch + a text tower initialised from the
offline MiniLM weights, trained on the generated synthetic corpus; ~8 min on 2 CPU cores and
held-out text-to-video R@1 well above 80%, see README), `tiny` (tests), and `B`/`L`/`1B`/`6B`
with the official recipe (reference §8: AdamW 0.9/0.98, lr 5e-5, wd 0.05, warmup 1 epoch,
cosine to 1%, clip 3.0, 4 frames, 80% random token masking, bert-large fusion from layer 19,
vtc = vtm = mlm = 1, batch 64 per device). `clip` switches to the CLIP-style variant: VTC only,
vision and text frozen except the attention pool and the temperature (init 0.01).
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.text import text_preset
from internvideo2_jax.models.vit import vit_preset


def get_config(arg=None):
  a = parse_arg(arg, size="demo", clip=False, av=False, steps=0, batch=0, dtype="")
  c = ml_collections.ConfigDict()
  c.job = "train_stage2"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  m = c.model = ml_collections.ConfigDict()
  m.embed_dim = 512
  m.temp = 0.07
  m.text_init = ""          # "minilm" | a HF BERT directory | "" (random init from m.text)
  m.vision_init = ""        # official vision checkpoint (.pth/.safetensors/.npz), e.g. stage 1
  m.vision_init_partial = False  # True: load the matching part of a different-shaped checkpoint
  m.freeze_vision = False
  m.freeze_text = False
  m.unfreeze_keys = ()
  m.freeze = ()

  d = c.data = ml_collections.ConfigDict()
  d.batch_size = 64 * 8
  d.seed = 0
  d.num_workers = 4
  d.norm = "imagenet"
  d.corpora = ()            # ({"format": json|csv|array_record|tfds, "path": ..., "data_root": ..., "weight": 1.0}, ...)
  d.load = {"mask": "random", "mask_ratio": 0.8, "image_mask_ratio": 0.5, "max_txt_l": 32,
            "caption_field": "captions", "sample": "rand", "crop": "rrc"}
  d.synthetic_dir = ""      # if set: write the synthetic corpus there when it is missing
  d.synthetic_train, d.synthetic_val, d.synthetic_size = 1500, 96, 32
  d.synthetic_radius = (0.22, 0.3)  # shapes of 14-19 px at 32 px (one data/synthetic for stages 2, 3)
  d.synthetic_val_av = 0    # > 0: also val_av.json (visual twins told apart by their sound)
  d.read_threads = 1

  t = c.train = ml_collections.ConfigDict()
  t.loss = ml_collections.ConfigDict({"vtc": 1.0, "vtm": 1.0, "mlm": 1.0})
  t.vtc_scale = "1.0"       # "official" = 1 / number of data shards (reference §11.1)
  t.mlm_prob = 0.5
  t.mlm_max_positions = 0   # 0: every masked position in the loss (exact); > 0: a speed cap
                            # (positions beyond it are dropped and counted as mlm_dropped)
  t.total_steps = 10000
  t.log_every = 50
  t.eval_every = 1000
  t.checkpoint_every = 1000
  t.keep_checkpoints = 2
  t.stop_at_step = 0        # > 0: save and exit after this step (a planned stop; resume later)
  t.peak_tflops = 0.0

  o = c.optimizer = ml_collections.ConfigDict()
  o.lr = 5e-5
  o.min_lr_multi = 0.01
  o.warmup_steps = 1000
  o.total_steps = t.get_ref("total_steps")
  o.schedule = "cosine"
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-8
  o.weight_decay = 0.05
  o.no_decay = ()
  o.max_grad_norm = 3.0
  o.grad_accum_steps = 1
  o.layer_decay = 1.0
  o.lr_mult = ()            # ((regex, multiplier), ...), e.g. (("^text_encoder/", 0.1),)

  e = c.eval = ml_collections.ConfigDict()
  e.corpus = ml_collections.ConfigDict({"format": "json", "path": "", "data_root": ""})  # "" = no eval
  e.k_test = 128
  e.max_txt_l = 32
  e.batch_size = 64
  e.caption_field = "captions"
  e.task = "retrieval"      # the `evaluate` job: retrieval | classification | audio_retrieval | audio_classification
  e.class_field = "captions"  # classification: the row field holding the class name
  e.weights = ""            # the `evaluate` job: official-layout weights instead of checkpoints
  e.weights_num_frames = ml_collections.FieldReference(None, field_type=int)
  e.checkpoint_dir = ""

  if a.size == "demo":
    # A small tubelet-2 ViT learns the direction of motion quickly (demo_feasibility.md).
    # Text: all 6 MiniLM layers form the text part (its [CLS] only becomes informative at the
    # last layer), frozen so no gradient flows through them on 2 CPU cores, plus one fresh
    # fusion layer with cross-attention; text_proj, the fusion layer and the ITM head train.
    m.vision = vit_preset("tiny", img_size=32, patch_size=8, embed_dim=128, depth=3, num_heads=4,
                          num_frames=4, tubelet_size=2, attn_pool_num_heads=4, clip_embed_dim=128,
                          init_values=0.1)
    m.text = text_preset("minilm", num_layers=7, fusion_layer=6, hidden_dropout=0.0,
                         attention_dropout=0.0)
    m.text_init = "minilm"
    m.freeze_text = True
    m.unfreeze_keys = (r"^text_encoder/bert/encoder/fusion_layers/",)
    m.embed_dim = 128
    d.synthetic_dir = "data/synthetic"
    d.synthetic_radius = (0.22, 0.3)  # shapes of 14-19 px: tellable apart through 8-px patches
    d.corpora = ({"format": "json", "path": "data/synthetic/train.json",
                  "data_root": "data/synthetic", "cache_frames": 32},)
    d.batch_size = 48
    d.num_workers = 0
    d.read_threads = 2
    d.load = {"mask": "none", "max_txt_l": 12, "caption_field": "captions", "sample": "rand",
              "crop": "squash", "flip": False, "sample_id": "caption"}
    t.loss = ml_collections.ConfigDict({"vtc": 1.0, "vtm": 1.0, "mlm": 0.0})
    t.total_steps = 1000
    t.log_every = 50
    t.eval_every = 500
    t.checkpoint_every = 250
    o.lr = 1e-3
    o.warmup_steps = 50
    o.weight_decay = 0.05
    o.max_grad_norm = 1.0
    o.schedule = "constant"
    e.k_test = 16
    e.max_txt_l = 12
    e.batch_size = 96
  elif a.size == "tiny":
    m.vision = vit_preset("tiny", attn_pool_num_heads=4)
    m.text = text_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    m.embed_dim = 16
    d.batch_size, d.num_workers = 8, 0
    d.load = {"mask": "random", "mask_ratio": 0.75, "max_txt_l": 12, "sample": "rand", "crop": "rrc"}
    t.total_steps, t.log_every, t.eval_every, t.checkpoint_every = 4, 2, 0, 2
    o.warmup_steps = 1
    e.k_test, e.max_txt_l, e.batch_size = 4, 12, 8
  else:
    size = {"B": "B", "L": "L", "1B": "1B", "6B": "6B"}.get(a.size)
    if size is None:
      raise ValueError(f"unknown stage-2 size {a.size!r}: demo, tiny, B, L, 1B or 6B")
    m.vision = vit_preset(size, num_frames=4, dtype="bfloat16", remat_policy="full",
                          sep_image_video_pos_embed=size == "1B")
    m.text = text_preset("bert-large", dtype="bfloat16", remat_policy="full")
    m.embed_dim = 512 if size != "6B" else 768
    d.batch_size = 64 * 64 if size != "6B" else 64 * 256
    if size in ("1B", "6B"):
      # FSDP over 8 (1B) or 64 chips (6B), data parallel over the rest: 64 divides the 6B's
      # 3200 width and maps onto v5p 4x4x8 / 4x8x8 and v6e 16x16 (fsdp over all 256 chips does
      # not divide 3200). Fewer chips: e.g. --config.mesh.fsdp=32 on 32.
      c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 8 if size == "1B" else 64, "tensor": 1})
  if a.av:
    # Audio-visual stage 2 (the 6B recipe): BEATs tower (frozen), [audio; video] fusion memory,
    # the `avs_captions` field, official loss weights.
    from internvideo2_jax.models.audio import audio_preset
    small = a.size in ("demo", "tiny")
    m.audio = audio_preset("tiny" if small else "beats")
    m.av_concat_dim = m.embed_dim if small else 768
    m.embed_dim = m.embed_dim if small else 768
    m.freeze_audio = not small
    d.load = dict(d.load, audio=True, caption_field="avs_captions")
    e.caption_field = "avs_captions"
    t.loss = ml_collections.ConfigDict({"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "avtc": 1.0, "avtm": 1.0,
                                        "avmlm": 1.0, "atc": 0.0, "avc": 0.0, "atm": 0.0, "amlm": 0.0})
    if a.size == "demo":
      # The synthetic clips last 2 s: a 2-s fbank (198 frames -> 48 BEATs tokens) instead of
      # zero-padding to 10 s (248 tokens). Audio-text contrast on (atc) so the audio feature
      # alone can be evaluated; no MLM terms (cost, as in the video demo). The held-out set is
      # val_av.json: every visual combination twice with two different sounds.
      d.load = dict(d.load, audio_seconds=2.0)
      d.synthetic_val_av = 96
      t.loss = ml_collections.ConfigDict({"vtc": 1.0, "vtm": 1.0, "mlm": 0.0, "avtc": 1.0, "avtm": 1.0,
                                          "avmlm": 0.0, "atc": 1.0, "avc": 0.0, "atm": 0.0, "amlm": 0.0})
      e.corpus = ml_collections.ConfigDict({"format": "json", "path": "data/synthetic/val_av.json",
                                            "data_root": "data/synthetic"})
  if a.clip:
    t.loss = ml_collections.ConfigDict({"vtc": 1.0, "vtm": 0.0, "mlm": 0.0})
    m.freeze_vision, m.freeze_text = True, True
    m.unfreeze_keys = (r"^vision_encoder/clip_projector/", r"^temp$")
    m.temp = 0.01
    o.lr, o.weight_decay, o.max_grad_norm = 4e-4, 0.2, -1.0
    o.no_decay = (r"^text_encoder/",)
  if a.steps:
    t.total_steps = a.steps
  if a.batch:
    d.batch_size = a.batch
  if a.dtype:
    m.vision.dtype = m.text.dtype = a.dtype
  add_runtime(c, step="train_stage2")
  return c
