r"""Feature extraction with the InternVideo2 video encoder: videos -> pooled embeddings (.npz).

Run:
  .venv/bin/iv2 --config=configs/features.py --workdir=runs/features
  .venv/bin/iv2 --config=configs/features.py:size=1B,frames=4 --config.init_from=/ckpt/1B_stage2.pth \
      --config.data.videos='("a.mp4", "b.mp4")'

Defaults: the `tiny` encoder (random weights) on 4 synthetic clips it writes to the workdir;
takes ~10 s on 2 CPU cores and prints pooled features and their cosine similarities.
With official weights (`init_from`, .pth/.safetensors/.npz, wrapped or not) the position
embedding is interpolated to `frames` automatically.
"""

import ml_collections

from internvideo2_jax.config_utils import add_runtime, parse_arg
from internvideo2_jax.models.vit import vit_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, size="tiny", frames=4, dtype="float32", gelu_tanh=True)
  c = ml_collections.ConfigDict()
  c.job = "features"
  c.seed = 0
  c.model = vit_preset(a.size, num_frames=a.frames, dtype=a.dtype, gelu_approximate=a.gelu_tanh)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.batch_size = 8
  c.init_from = ""
  c.checkpoint_num_frames = ml_collections.FieldReference(None, field_type=int)
  c.save_tokens = False
  c.data = ml_collections.ConfigDict()
  c.data.videos = ()
  c.data.norm = "imagenet"
  c.data.num_synthetic = 4
  c.data.synthetic_size = 64
  add_runtime(c, step="")
  return c
