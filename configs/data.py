r"""Check a corpus through a stage's input pipeline (shapes, speed, skipped records, a picture).

Run:
  .venv/bin/iv2 --config=configs/data.py --workdir=runs/data        # synthetic corpus
  .venv/bin/iv2 --config=configs/data.py:stage=stage3 --workdir=runs/data3   # instruction rows
  .venv/bin/iv2 --config=configs/data.py:stage=stage2 --workdir=runs/data \
      --config.data.corpora='({"format": "json", "path": "/data/msrvtt/train.json", "data_root": "/data/msrvtt/videos"},)'

Takes ~20 s on 2 CPU cores with the defaults; prints batch shapes, examples/s and skip counts,
and writes runs/data/batch.png.
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.vit import vit_preset


def get_config(arg=None):
  a = parse_arg(arg, stage="stage2", size="tiny", frames=4, workers=0, eval=False)
  c = ml_collections.ConfigDict()
  c.job = "inspect_data"
  c.seed = 0
  c.stage = a.stage
  c.train = not a.eval
  c.num_batches = 4
  c.model = vit_preset(a.size, num_frames=a.frames)
  c.data = ml_collections.ConfigDict()
  c.data.batch_size = 8
  c.data.seed = 0
  c.data.num_workers = a.workers
  c.data.corpora = ()       # ({"format": json|csv|array_record|tfds, "path": ..., "data_root": ..., "weight": 1.0},)
  c.data.load = {"mask": "random", "audio": False, "caption_field": "captions", "max_txt_l": 32}
  if a.stage == "stage1":
    c.data.load = {"num_frames": 16}
  if a.stage == "stage3":  # 8 frames, conversation tokens (see data/instruct.py InstructSpec)
    c.data.load = {"num_frames": 8}
    c.data.instruct = {"max_txt_l": 512, "visual_tokens": 96, "time_msg": False}
  add_runtime(c, step="")
  return c
