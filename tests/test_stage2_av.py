"""The audio-visual stage-2 model and losses: silent clips are left out of every audio term."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from internvideo2_jax.models.audio import audio_preset
from internvideo2_jax.models.stage2_av import Stage2AVModel, av_stage2_config
from internvideo2_jax.models.text import text_preset
from internvideo2_jax.models.vit import vit_preset
from internvideo2_jax.ops import losses as L
from internvideo2_jax.train.stage2_av import AV_LOSSES, av_losses


def _setup():
  cfg = av_stage2_config(vit_preset("tiny"), text_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0),
                         audio_preset("tiny"), contra_dim=16, av_concat_dim=24)
  model = Stage2AVModel(cfg)
  rng = np.random.default_rng(0)
  b = 4
  batch = {"video": jnp.asarray(rng.integers(0, 255, (b, 4, 32, 32, 3), dtype=np.uint8)),
           # the silent clip's fbank is all zeros, as the pipeline gives it
           "audio": jnp.asarray(rng.standard_normal((b, 198, 64)), jnp.float32).at[2].set(0.0),  # 2 s
           "has_audio": jnp.asarray([True, True, False, True]),
           "text_ids": jnp.asarray(rng.integers(1000, 2000, (b, 8)), jnp.int32),
           "text_mask": jnp.ones((b, 8), jnp.int32), "sample_id": jnp.arange(b, dtype=jnp.int32)}
  params = nn.unbox(model.init(jax.random.key(0), batch["video"].astype(jnp.float32), batch["audio"],
                               batch["text_ids"], batch["text_mask"]))["params"]
  tcfg = ml_collections.ConfigDict({"loss": {k: 1.0 for k in AV_LOSSES}, "data_norm": "imagenet",
                                    "mask_token_id": 103, "cls_token_id": 101, "mlm_prob": 0.5,
                                    "mlm_max_positions": 4})
  return model, params, batch, tcfg


def test_all_terms_are_finite_and_silent_clips_do_not_reach_audio_terms():
  model, params, batch, tcfg = _setup()

  def total(p, fbank):  # (one compile: gradients for the parameters and the fbank together)
    o = av_losses(model, p, dict(batch, audio=fbank), jax.random.key(1), tcfg, num_visible=None, groups=1,
                  vtc_mult=1.0)
    return sum(o[k] for k in AV_LOSSES), o

  (_, out), (pg, g) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(params, batch["audio"])
  assert set(AV_LOSSES) <= set(out) and all(np.isfinite(float(out[k])) for k in AV_LOSSES)
  # the capped MLM (mlm_max_positions=4) counts the masked positions it leaves out, per term
  assert all(float(out[f"{k}_dropped"]) >= 0 for k in ("mlm", "amlm", "avmlm"))
  # only audio terms read the fbank: its gradient is theirs
  g = np.asarray(g)
  assert np.abs(g[2]).max() == 0.0           # the silent clip's (zero) features train nothing
  assert np.abs(g[0]).max() > 0.0
  # ... and the parameter gradients stay finite: at init a zero fbank gives an exactly zero
  # audio feature, whose normalisation once made every update NaN (skipped) in the AV demo.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(pg))


def test_masked_contrastive_equals_the_loss_over_valid_samples_only():
  rng = np.random.default_rng(0)
  a = L.l2_normalize(jnp.asarray(rng.standard_normal((5, 8)), jnp.float32))
  t = L.l2_normalize(jnp.asarray(rng.standard_normal((5, 8)), jnp.float32))
  ids = jnp.arange(5)
  valid = jnp.asarray([True, False, True, True, False])
  keep = np.flatnonzero(np.asarray(valid))
  np.testing.assert_allclose(L.vtc_loss(a, t, ids, 0.1, valid=valid), L.vtc_loss(a[keep], t[keep], ids[keep], 0.1),
                             rtol=1e-5)
  neg_t, _ = L.hard_negatives(jax.random.key(0), a, t, ids, 0.1, 1, valid)
  assert all(int(neg_t[i]) in keep for i in keep)


def test_official_audio_visual_keys_round_trip():
  from internvideo2_jax.convert.official import stage2_av_from_state_dict, stage2_av_to_state_dict
  model, params, batch, _ = _setup()
  params = jax.tree.map(np.asarray, params)
  sd = stage2_av_to_state_dict(params, model.config)
  for key in ("audio_encoder.encoder.pos_conv.0.weight_g", "av_concat_vision_proj.0.weight",
              "av_concat_audio_proj.1.bias", "av_fusion.weight", "avtm_head.weight", "audio_proj.weight",
              "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"):
    assert key in sd, key
  assert sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"].shape == (48, 24)
  del sd["atm_head.weight"], sd["atm_head.bias"]  # optional in the released recipe
  back = stage2_av_from_state_dict(sd, model.config, base={"params": params})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), back["params"], params)


def test_audio_visual_training_job_runs_and_evaluates(tmp_path):
  from configs import stage2 as stage2_config
  from internvideo2_jax.train import stage2
  c = stage2_config.get_config("size=tiny,av")
  syn = str(tmp_path / "syn")
  c.data.synthetic_dir, c.data.synthetic_train, c.data.synthetic_val, c.data.synthetic_size = syn, 8, 4, 32
  c.data.corpora = ({"format": "json", "path": f"{syn}/train.json", "data_root": syn},)
  c.train.total_steps, c.train.checkpoint_every = 2, 0
  c.data.synthetic_val_av = 4
  c.train.total_steps, c.train.checkpoint_every = 2, 2
  c.data.load = dict(c.data.load, audio_seconds=2.0)
  run_dir = str(tmp_path / "run")
  res = stage2.run(c, run_dir)
  directions = {f"text_to_{m}{s}" for m in ("video", "audio", "av") for s in ("", "_match")}
  assert res["step"] == 2 and directions <= set(res)
  assert res["num_with_audio"] <= res["num_videos"] == 4
  for k in directions:
    assert 0 <= res[k]["t2v_r1"] <= res[k]["t2v_r10"] <= 100

  # The standalone evaluate job on the Orbax checkpoint: AV retrieval, text-audio retrieval and
  # audio classification, here on audio-only rows (a .wav of each clip's track) plus a row whose
  # audio file is missing (skipped and listed).
  from internvideo2_jax.data import audio as audio_lib
  from internvideo2_jax.evaluate import run as eval_run
  rows = json.load(open(f"{syn}/val_av.json"))
  audio_rows = []
  for i, row in enumerate(rows):
    wav = f"{syn}/a{i}.wav"
    _write_wav(wav, audio_lib.load_waveform(f"{syn}/{row['video']}"))
    audio_rows.append({"audio": f"a{i}.wav", "caption": row["sound_caption"], "avs_captions": row["avs_captions"]})
  audio_rows.append({"audio": "missing.wav", "caption": "a low hum"})
  json.dump(audio_rows, open(f"{syn}/audio.json", "w"))
  c.eval.checkpoint_dir = f"{run_dir}/checkpoints"
  c.eval.corpus = {"format": "json", "path": f"{syn}/val_av.json", "data_root": syn}
  out = eval_run.run(c, str(tmp_path / "eval"))
  assert directions <= set(out) and out["num_videos"] == 4
  c.eval.corpus = {"format": "json", "path": f"{syn}/audio.json", "data_root": syn}
  c.eval.task = "audio_retrieval"
  out = eval_run.run(c, str(tmp_path / "eval"))
  assert out["num_audio"] == 4 and len(out["skipped"]) == 1 and "missing.wav" in out["skipped"][0]
  assert {"text_to_audio", "text_to_audio_match"} <= set(out)
  c.eval.task, c.eval.class_field = "audio_classification", "captions"
  out = eval_run.run(c, str(tmp_path / "eval"))
  assert out["num_examples"] == 4 and out["num_classes"] == len({r["sound_caption"] for r in rows})
  assert os.path.exists(tmp_path / "eval" / "eval_audio_classification.json")
  c.model = stage2_config.get_config("size=tiny").model
  with pytest.raises(ValueError, match="needs an audio-visual model"):
    eval_run.run(c, str(tmp_path / "eval"))


def _write_wav(path, wave, rate=16000):
  import wave as wave_lib
  with wave_lib.open(path, "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
    w.writeframes((np.clip(wave, -1, 1) * 32767).astype(np.int16).tobytes())
