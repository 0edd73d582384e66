"""What a run reports: the progress line (elapsed, ETA), run.json, curves.png, the synthetic
fallback for configs without a corpus, and the evaluate job's default held-out set."""

import io
import json
import os

import pytest

from internvideo2_jax.train import metrics


class _Clock:
  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_eta_excludes_compile_time_and_counts_earlier_starts(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(metrics.time, "perf_counter", clock)
  out = _Tty()
  p = metrics.Progress(1000, 200, elapsed_before=3600.0, keys=("loss", "vtc"), stream=out)
  clock.t += 20.0
  p.exclude(20.0)                     # compiling: not in the rate
  clock.t += 100.0                    # 100 s of steps ...
  line = p.line(400, {"loss": 0.5, "vtc": 0.25, "grad_norm": 3.0, "data_skipped/missing": 2.0})
  # ... 200 steps in them: 2 steps/s, 600 left -> 300 s; elapsed 1 h + 120 s
  assert line.startswith("step  400/1000  40% | 1:02:00 elapsed | ETA 0:05:00 | 2.00 steps/s")
  assert "loss 0.5  vtc 0.25" in line and "grad_norm" not in line and "data_skipped/missing 2" in line
  p.tick(401)                         # a terminal gets a live line, overwritten in place
  assert out.getvalue().startswith("\rstep  401/1000")
  p.log(450, {"loss": 0.4})
  assert out.getvalue().endswith("loss 0.4\n") and "\r\x1b[K" in out.getvalue()
  quiet = io.StringIO()               # not a terminal (a log file): only the interval lines
  q = metrics.Progress(10, 0, stream=quiet)
  q.tick(1)
  assert quiet.getvalue() == ""
  assert "ETA ?" in q.line(0)


def test_eval_line_shows_the_headline_numbers():
  line = metrics.eval_line(500, {"itc/t2v_r1": 85.41, "itc/t2v_r5": 99.0, "match/v2t_r1": 20.0,
                                 "eval_time_s": 12.3, "eval_data/items": 96})
  assert line == "eval at step 500: itc/t2v R@1 85.4  match/v2t R@1 20.0  (12 s)"


def test_run_record_keeps_totals_and_final_results(tmp_path):
  r = metrics.RunRecord(str(tmp_path))
  assert r.finished_at(0) is None and r.train_s == 0.0
  r.update(starts=1, step=10, train_s=12.5)
  r.update(step=20, finished=True, results={"itc": {"t2v_r1": 90.0}}, train_s=30.0)
  again = metrics.RunRecord(str(tmp_path))
  assert again.finished_at(20) == {"itc": {"t2v_r1": 90.0}} and again.finished_at(10) is None
  assert again.train_s == 30.0 and not (tmp_path / "run.json.tmp").exists()
  (tmp_path / "run.json").write_text('{"starts": 1, "st')   # cut by a kill: totals start over
  assert metrics.RunRecord(str(tmp_path)).data == {}
  off = metrics.RunRecord(str(tmp_path / "other"), enabled=False)  # processes other than 0
  off.update(step=1)
  assert not (tmp_path / "other").exists()


def test_curves_png_from_metrics_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  recs = [{"step": s, "train/loss": 2.0 / s, "train/vtc": 1.0 / s, "train/lr": 1e-3} for s in (1, 2, 3)]
  recs.append({"step": 3, "eval/itc/t2v_r1": 50.0, "eval/eval_time_s": 3.0})
  path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 4, "tra')  # a cut last line
  out = metrics.plot_curves(str(path), str(tmp_path / "curves.png"))
  assert out and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  (tmp_path / "empty.jsonl").write_text("")
  assert metrics.plot_curves(str(tmp_path / "empty.jsonl"), str(tmp_path / "none.png")) is None


def test_a_config_without_corpora_trains_on_the_synthetic_corpus(tmp_path, capsys, monkeypatch):
  from configs import stage1 as stage1_config, stage2 as stage2_config, stage3 as stage3_config
  from internvideo2_jax.train import corpus, preflight
  monkeypatch.chdir(tmp_path)
  c = stage2_config.get_config("size=tiny")
  assert not c.data.corpora and corpus.default_to_synthetic(c, "stage2")
  assert c.data.corpora[0]["path"] == os.path.join("data", "synthetic", "train.json")
  assert "training on the synthetic corpus in data/synthetic" in capsys.readouterr().out
  preflight.check(c)                  # files still to be written are fine
  assert corpus.eval_corpus(c)["path"] == os.path.join("data", "synthetic", "val.json")
  s1 = stage1_config.get_config("size=1B")
  assert corpus.default_to_synthetic(s1, "stage1") and s1.data.corpora[0]["format"] == "csv"
  s3 = stage3_config.get_config("size=tiny")
  assert corpus.default_to_synthetic(s3, "stage3") and s3.data.corpora[0]["path"].endswith("train_qa.json")
  named = stage2_config.get_config("size=demo")   # a config that names its corpus keeps it
  before = named.data.corpora
  assert not corpus.default_to_synthetic(named, "stage2") and named.data.corpora == before


def test_evaluate_finds_the_runs_held_out_set():
  from configs import stage2 as stage2_config
  from internvideo2_jax.evaluate.run import eval_set
  c = stage2_config.get_config("size=tiny")
  saved = {"eval": {"corpus": {"format": "json", "path": "/d/test.json", "data_root": "/d"}}}
  assert eval_set(c, saved)["path"] == "/d/test.json"
  synthetic_run = {"eval": {"corpus": {"path": ""}}, "data": {"synthetic_dir": "data/syn"}}
  assert eval_set(c, synthetic_run) == {"format": "json", "path": "data/syn/val.json", "data_root": "data/syn"}
  c.eval.corpus.path = "/mine.json"     # what the command line names wins
  assert eval_set(c, saved)["path"] == "/mine.json"
  c.eval.corpus.path = ""
  with pytest.raises(ValueError, match="set config.eval.corpus.path"):
    eval_set(c, None)


def test_preflight_takes_shard_prefixes(tmp_path):
  from configs import stage1 as stage1_config
  from internvideo2_jax.train import preflight
  c = stage1_config.get_config("size=tiny")
  c.data.corpora = ({"format": "targets", "path": str(tmp_path / "targets")},)
  with pytest.raises(FileNotFoundError, match="targets: no shards match"):
    preflight.check(c)
  (tmp_path / "targets-00000-of-00001").write_bytes(b"")
  preflight.check(c)
