"""Our video-encoder training step against the official PyTorch encoder on the same machine.

    bash launch/setup.sh cpu torch          # torch is a benchmark extra
    .venv/bin/python benchmarks/encoder_step.py                     # small and B configs, CPU
    .venv/bin/python benchmarks/encoder_step.py --config small --rounds 9 --variants none,dots
    .venv/bin/python benchmarks/encoder_step.py --device gpu        # when a GPU is there

The step: the vision encoder on 80%-masked clips (fp32, exact GELU), a loss on the visible tokens
and the pooled embedding (mean squared error against fixed targets), gradients, global-norm
clipping and AdamW. Both sides start from the same weights (ours exported to the official layout
and loaded into `torch_encoder.py`, a transcription of the official modules) and the first
losses are checked to agree. Rounds interleave the two (ours, official, ours, ...) so a change in
machine load hits both; the ratio official time / ours (> 1: we are faster) is printed per round
with its median and range, for the train step and the eval forward (no mask, no gradient).
Memory: each side in a fresh process, peak resident memory of building the state and running
the steps above the process's memory after imports (and, for us, after compiling), on GPU the
allocators' peaks.

`--variants` lists our settings to measure: `default` (the platform's defaults,
models/defaults.py), a remat policy name (models/remat.py: none, dots, full, ...) and/or
`unroll=N` (scan unroll), joined with `+`, e.g. `none+unroll=2`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    # name: (encoder settings, batch)
    "small": (dict(img_size=112, patch_size=14, embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0,
                   num_frames=4, attn_pool_num_heads=6, clip_embed_dim=384), 8),
    "B": (dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
               num_frames=4, attn_pool_num_heads=12, clip_embed_dim=768), 2),
}
MASK_RATIO = 0.8


def _variant(spec: str) -> dict:
  """'dots+unroll=2' -> {'remat_policy': 'dots', 'scan_unroll': 2}; 'default' -> {}."""
  out = {}
  for part in spec.split("+"):
    if part == "default":
      continue
    if part.startswith("unroll="):
      out["scan_unroll"] = int(part.split("=", 1)[1])
    else:
      out["remat_policy"] = part
  return out


def _data(name: str, seed: int = 0):
  import numpy as np
  enc, batch = CONFIGS[name]
  rng = np.random.default_rng(seed)
  t, s, p = enc["num_frames"], enc["img_size"], enc["patch_size"]
  n = t * (s // p) ** 2
  keep = n - int(n * MASK_RATIO)
  video = rng.standard_normal((batch, t, s, s, 3)).astype(np.float32)
  mask = np.ones((batch, n), bool)
  for b in range(batch):
    mask[b, rng.permutation(n)[:keep]] = False
  tgt_tokens = rng.standard_normal((batch, 1 + keep, enc["embed_dim"])).astype(np.float32)
  tgt_pooled = rng.standard_normal((batch, enc["clip_embed_dim"])).astype(np.float32)
  return video, mask, keep, tgt_tokens, tgt_pooled


# ----------------------------------------------------------------------------- ours


def ours(name: str, variant: str, device: str):
  """(train_step(), eval_forward(), first loss, official-layout weights, compile seconds)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from internvideo2_jax.convert.official import vision_to_state_dict
  from internvideo2_jax.models.vit import VisionEncoder, vit_preset

  enc, _ = CONFIGS[name]
  cfg = vit_preset("tiny", **enc, gelu_approximate=False, dtype="float32", **_variant(variant))
  model = VisionEncoder(cfg)
  video, mask, keep, tgt_tokens, tgt_pooled = _data(name)
  dev = jax.devices(device)[0]
  video, mask, tgt_tokens, tgt_pooled = jax.device_put((video, mask, tgt_tokens, tgt_pooled), dev)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), video[:1]))["params"]
  tx = optax.chain(optax.clip_by_global_norm(3.0),
                   optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05))
  opt = jax.jit(tx.init)(params)

  def loss_fn(p):
    out = model.apply({"params": p}, video, mask=mask, num_visible=keep)
    return jnp.mean((out["tokens"] - tgt_tokens) ** 2) + jnp.mean((out["pooled"] - tgt_pooled) ** 2)

  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  t0 = time.perf_counter()
  train = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt).compile()
  evalf = jax.jit(lambda p: model.apply({"params": p}, video)["pooled"]).lower(params).compile()
  compile_s = time.perf_counter() - t0
  weights = vision_to_state_dict(jax.device_get(params), cfg)
  first = float(loss_fn(params))
  state = [params, opt]

  def train_step():
    state[0], state[1], loss = train(*state)
    return loss

  return train_step, lambda: evalf(state[0]), first, weights, compile_s


# ----------------------------------------------------------------------------- official


def official(name: str, weights, device: str, sdpa: bool = False):
  """(train_step(), eval_forward(), first loss) of the torch transcription."""
  import numpy as np
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_encoder

  enc, _ = CONFIGS[name]
  d = enc["embed_dim"]
  model = torch_encoder.VisionEncoder(
      img_size=enc["img_size"], patch_size=enc["patch_size"], embed_dim=d, depth=enc["depth"],
      num_heads=enc["num_heads"], mlp_hidden=int(d * enc["mlp_ratio"]), num_frames=enc["num_frames"],
      tubelet_size=1, attn_pool_num_heads=enc["attn_pool_num_heads"], clip_embed_dim=enc["clip_embed_dim"],
      gelu_approximate=False, sdpa=sdpa)
  if weights is not None:
    torch_encoder.load_official(model, weights)
  dev = torch.device("cuda" if device == "gpu" else "cpu")
  model = model.to(dev).train()
  video, mask, _, tgt_tokens, tgt_pooled = _data(name)
  video = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).to(dev)  # B C T H W
  mask = torch.from_numpy(np.concatenate([np.zeros((len(mask), 1), bool), mask], 1)).to(dev)
  tgt_tokens, tgt_pooled = torch.from_numpy(tgt_tokens).to(dev), torch.from_numpy(tgt_pooled).to(dev)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

  def loss_fn():
    x, pooled = model(video, mask)
    return ((x - tgt_tokens) ** 2).mean() + ((pooled - tgt_pooled) ** 2).mean()

  with torch.no_grad():
    first = float(loss_fn())

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
    opt.step()
    return loss

  no_mask = torch.zeros_like(mask)

  def eval_forward():
    with torch.no_grad():
      return model(video, no_mask)[1]

  return train_step, eval_forward, first


# ----------------------------------------------------------------------------- timing


def _sync(x, device):
  if device == "gpu":
    import torch
    torch.cuda.synchronize()
  if hasattr(x, "block_until_ready"):
    x.block_until_ready()  # torch on CPU computes eagerly: its result is ready


def _time(fn, n, device):
  _sync(fn(), device)  # warm-up
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn()
  _sync(out, device)
  return (time.perf_counter() - t0) / n


def compare(name: str, variant: str, rounds: int, steps: int, device: str, sdpa: bool) -> dict:
  tr_o, ev_o, first_o, weights, compile_s = ours(name, variant, device)
  tr_t, ev_t, first_t = official(name, weights, device, sdpa)
  rel = abs(first_o - first_t) / abs(first_t)
  train_r, eval_r, times = [], [], []
  for _ in range(rounds):
    a, b = _time(tr_o, steps, device), _time(tr_t, steps, device)
    c, d = _time(ev_o, steps, device), _time(ev_t, steps, device)
    train_r.append(b / a)
    eval_r.append(d / c)
    times.append((a, b, c, d))
  med = [statistics.median(t[i] for t in times) for i in range(4)]
  return {"config": name, "variant": variant, "first_loss_rel_diff": rel, "compile_s": compile_s,
          "train_ratio": statistics.median(train_r), "train_range": (min(train_r), max(train_r)),
          "eval_ratio": statistics.median(eval_r), "eval_range": (min(eval_r), max(eval_r)),
          "ours_train_ms": med[0] * 1e3, "official_train_ms": med[1] * 1e3,
          "ours_eval_ms": med[2] * 1e3, "official_eval_ms": med[3] * 1e3,
          "load": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
    f.write("5")


def memory_child(side: str, name: str, variant: str, device: str, steps: int) -> None:
  """Runs in a fresh process; prints {"peak_mib": ...} as its last line."""
  if side == "ours":
    import jax  # noqa: F401 - imported before the baseline, as torch is
    if device == "cpu":
      tr, *_ = ours(name, variant, device)  # compiles; the compiler's memory is not the step's
      del tr
    base = _rss_kib("VmRSS")
    _reset_peak()
    tr, *_ = ours(name, variant, device)
  else:
    import torch  # noqa: F401
    base = _rss_kib("VmRSS")
    _reset_peak()
    tr, *_ = official(name, None, device)
  for _ in range(steps):
    out = tr()
  _sync(out, device)
  if device == "gpu":
    if side == "ours":
      import jax
      peak = jax.devices("gpu")[0].memory_stats()["peak_bytes_in_use"] / 2**20
    else:
      import torch
      peak = torch.cuda.max_memory_allocated() / 2**20
  else:
    peak = (_rss_kib("VmHWM") - base) / 1024
  print(json.dumps({"peak_mib": peak}))


def memory(name: str, variant: str, device: str, steps: int = 3) -> dict:
  out = {}
  for side in ("ours", "official"):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", side, "--config", name,
           "--variants", variant, "--device", device, "--steps", str(steps)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out[side] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
  out["ratio"] = out["ours"] / out["official"]
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="small,B", help="comma-separated: " + ", ".join(CONFIGS))
  ap.add_argument("--variants", default="default", help="comma-separated settings of ours (see above)")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps", type=int, default=3, help="steps per timing")
  ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  ap.add_argument("--sdpa", action="store_true", help="torch side with F.scaled_dot_product_attention "
                  "(not the official CPU path)")
  ap.add_argument("--no-memory", action="store_true")
  ap.add_argument("--memory-child", choices=("ours", "official"), help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.memory_child:
    memory_child(a.memory_child, a.config, a.variants, a.device, a.steps)
    return
  bad = [c for c in a.config.split(",") if c not in CONFIGS]
  if bad:
    ap.error(f"--config {','.join(bad)}: not one of {', '.join(CONFIGS)}")
  for v in a.variants.split(","):
    try:
      _variant(v)
    except ValueError:
      ap.error(f"--variants {v!r}: unroll=N needs an integer")
  import torch
  print(f"device {a.device}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
  for name in a.config.split(","):
    for variant in a.variants.split(","):
      r = compare(name, variant, a.rounds, a.steps, a.device, a.sdpa)
      line = (f"{name:>5} {variant:>16}: train official/ours {r['train_ratio']:.2f} "
              f"({r['train_range'][0]:.2f}-{r['train_range'][1]:.2f}; {r['ours_train_ms']:.0f} vs "
              f"{r['official_train_ms']:.0f} ms) | eval {r['eval_ratio']:.2f} ({r['eval_range'][0]:.2f}-"
              f"{r['eval_range'][1]:.2f}; {r['ours_eval_ms']:.0f} vs {r['official_eval_ms']:.0f} ms) | "
              f"first-loss rel diff {r['first_loss_rel_diff']:.1e} | compile {r['compile_s']:.1f}s | "
              f"load {r['load']:.1f}")
      if not a.no_memory:
        m = memory(name, variant, a.device)
        line += f" | peak memory ours/official {m['ratio']:.2f} ({m['ours']:.0f} / {m['official']:.0f} MiB)"
      print(line, flush=True)


if __name__ == "__main__":
  main()
