"""The stage-2 job end to end on CPU: training, eval, export, and exact resume after SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, syn):
  return [sys.executable, "-m", "internvideo2_jax.main", "--config=configs/stage2.py:size=tiny",
          f"--workdir={workdir}", f"--config.data.synthetic_dir={syn}",
          "--config.data.synthetic_train=16", "--config.data.synthetic_val=8",
          "--config.data.synthetic_size=32",
          f"--config.data.corpora=({{'format': 'json', 'path': '{syn}/train.json', 'data_root': '{syn}'}},)",
          "--config.train.total_steps=8", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.mesh.data=2"]


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
              PYTHONUNBUFFERED="1")


def test_sigterm_then_resume_gives_the_uninterrupted_result(tmp_path):
  syn = str(tmp_path / "syn")
  full = subprocess.run(_cmd(tmp_path / "full", syn), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  assert "held-out retrieval after 8 steps" in full.stdout and "| match |" in full.stdout
  assert os.path.exists(tmp_path / "full" / "tensorboard")
  assert os.path.exists(tmp_path / "full" / "metrics.jsonl")

  run = tmp_path / "interrupted"
  proc = subprocess.Popen(_cmd(run, syn), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 300
  for line in proc.stdout:  # wait until training is under way, then preempt
    lines.append(line)
    if line.startswith("[2/8") or time.time() > deadline:
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=300)
  out = "".join(lines) + rest
  assert proc.returncode == 0, out[-3000:]
  assert "exiting after SIGTERM" in out
  stopped = int(out.split("saved step ")[1].split()[0])
  assert 2 <= stopped < 8

  again = subprocess.run(_cmd(run, syn), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from" in again.stdout and f"at step {stopped}" in again.stdout
  a = load_file(str(tmp_path / "full" / "export" / "stage2_official_layout.safetensors"))
  b = load_file(str(run / "export" / "stage2_official_layout.safetensors"))
  assert set(a) == set(b)
  for k in a:  # same weights: the state and the data position were both restored exactly
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_evaluate_job_on_exported_weights_and_checkpoints(tmp_path):
  """The evaluate command reads official-layout weights (our export) or Orbax checkpoints."""
  from configs import stage2 as stage2_config
  from internvideo2_jax.data import synthetic
  from internvideo2_jax.evaluate import run as eval_run
  syn = tmp_path / "syn"
  synthetic.write_corpus(str(syn), train=0, val=6, size=32)
  cfg = stage2_config.get_config("size=tiny")
  cfg.eval.corpus.path, cfg.eval.corpus.data_root = str(syn / "val.json"), str(syn)
  cfg.eval.k_test = 3
  # weights in the official layout, as exported by training (here: a fresh tiny model)
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from internvideo2_jax.convert.io import save_state_dict
  from internvideo2_jax.convert.official import stage2_to_state_dict
  from internvideo2_jax.models.stage2 import Stage2Model
  from internvideo2_jax.train.stage2 import build_model_config
  mcfg = build_model_config(cfg.model)
  ids = jnp.ones((1, 12), jnp.int32)
  params = nn.unbox(Stage2Model(mcfg).init(jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3)), ids, ids))
  save_state_dict(stage2_to_state_dict(jax.tree.map(np.asarray, params), mcfg), tmp_path / "w.safetensors")
  cfg.eval.weights = str(tmp_path / "w.safetensors")
  res = eval_run.run(cfg, str(tmp_path / "eval"))
  assert res["num_videos"] == 6 and res["num_texts"] == 12 and 0 <= res["match"]["t2v_r1"] <= 100
  assert (tmp_path / "eval" / "eval_retrieval.json").exists()
  cfg.eval.weights = ""
  cfg.eval.checkpoint_dir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    eval_run.run(cfg, str(tmp_path / "eval"))
