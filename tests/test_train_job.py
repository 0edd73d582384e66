"""The evaluate job on exported weights and checkpoints (training, SIGTERM and exact resume:
test_multihost.py, which runs the CLI on 1 and 2 processes)."""

import os

import numpy as np
import pytest


def test_evaluate_job_on_exported_weights_and_checkpoints(tmp_path):
  """The evaluate command reads official-layout weights (our export) or Orbax checkpoints."""
  from configs import stage2 as stage2_config
  from internvideo2_jax.data import synthetic
  from internvideo2_jax.evaluate import run as eval_run
  syn = tmp_path / "syn"
  synthetic.write_corpus(str(syn), train=0, val=6, size=32)
  # captions that once crashed the job after every video was decoded: refused at parse time
  import json
  rows = json.loads((syn / "val.json").read_text())
  rows += [dict(rows[0], captions="lone \ud800 surrogate"), dict(rows[1], captions="?!"),
           dict(rows[2], captions=["", 5])]
  (syn / "val.json").write_text(json.dumps(rows))
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
  saved = json.loads((tmp_path / "eval" / "eval_retrieval.json").read_text())
  assert saved["data"] == {"items": 6, "refused_at_parse": {"bad_caption": 3}, "skipped": {}}
  cfg.eval.weights = ""
  cfg.eval.checkpoint_dir = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    eval_run.run(cfg, str(tmp_path / "eval"))


def test_bad_settings_are_named_before_any_model_work(tmp_path):
  from configs import stage2 as stage2_config, stage3 as stage3_config
  from internvideo2_jax.train import preflight
  cases = [("data.batch_size", -8, "config.data.batch_size=-8 must be a positive integer"),
           ("data.batch_size", 7, "batch_size=7 is not divisible by the 8 batch shards"),
           ("data.corpora", ({"format": "json", "path": str(tmp_path / "nope.json")},), "corpora\\[0\\].path=.*nope.json: no such file"),
           ("mesh.fsdp", 3, "config.mesh=.*fsdp.*3"),
           ("eval.corpus.path", str(tmp_path / "val.json"), "config.eval.corpus.path=.*val.json")]
  for key, value, message in cases:
    c = stage2_config.get_config("size=tiny")
    section, name = key.rsplit(".", 1)
    target = c
    for part in section.split("."):
      target = target[part]
    target[name] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      preflight.check(c)
  c = stage3_config.get_config("size=tiny")
  c.eval.qa.path = str(tmp_path / "qa.json")
  with pytest.raises(FileNotFoundError, match="config.eval.qa.path=.*qa.json: no such file"):
    preflight.check(c)


def test_a_typo_in_a_config_key_is_one_clear_line(tmp_path):
  import subprocess
  import sys
  res = subprocess.run([sys.executable, "-m", "internvideo2_jax.main", "--config=configs/stage2.py:size=tiny",
                        "--config.train.totl_steps=5", f"--workdir={tmp_path}"],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert res.stderr.strip().splitlines()[-1] == (
      "unknown config key 'totl_steps' in --config.train.totl_steps: Did you mean \"total_steps\" instead "
      "of \"totl_steps\"? (the config file's keys are the valid ones)")
