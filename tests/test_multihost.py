"""Multi-host: 2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train
tiny stages 1, 2 and 3 with FSDP across the processes, are stopped (SIGTERM reaching both for
stage 2, `train.stop_at_step` for stages 1 and 3), continue on 1 process x 8 devices for a step,
and are finished by 2 processes again: each chain ends with the export and the (gathered)
evaluation of an uninterrupted single-process run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

# One worker runs these chains one after the other (launch/test.sh: --dist loadgroup): two
# 2-process runs at once on a 2-core machine oversubscribe it 8 device threads to a core, and
# CPU collectives then stall past their timeouts.
pytestmark = pytest.mark.xdist_group("multihost")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


CACHE = {}  # one persistent compilation cache for the module's runs (same programs recur)


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("IV2_")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=CACHE["dir"], **extra)
  return env


def _cmd(args, workdir):
  return [sys.executable, "-m", "internvideo2_jax.main", *args, f"--workdir={workdir}"]


def run_1x8(args, workdir):
  res = subprocess.run(_cmd(args, workdir), cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[:3000] + "\n...\n" + res.stderr[-1500:]
  return res.stdout


def start_2x4(args, workdir):
  port = _port()
  return [subprocess.Popen(_cmd(args, workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=_env(4, IV2_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                               IV2_NUM_PROCESSES="2", IV2_PROCESS_ID=str(i)))
          for i in range(2)]


def finish(procs, timeout=900):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    outs.append(out)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}\nthe other:\n{outs[1 - i][-2000:]}"
  return outs


def run_2x4(args, workdir):
  """2 processes to the end; returns (process 0's output of every attempt, of the last).

  CPU gloo collectives between two processes on an oversubscribed 2-core machine (the suite's
  other worker compiling alongside) now and then stall past the collective timeout. Such a run
  is started again (up to twice), as a cluster launcher restarts a job: it resumes from its own
  checkpoint, and everything the tests compare (exports, evaluation) must still be exact."""
  every = ""
  for attempt in range(3):
    procs = start_2x4(args, workdir)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    every += outs[0]
    if not (any(p.returncode for p in procs) and "Gloo" in "".join(outs)) or attempt == 2:
      break
    print(f"2-process run stalled in a CPU collective; restarting it:\n{outs[0][-1500:]}")
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}\nthe other:\n{outs[1 - i][-2000:]}"
  return every, outs[0]


def same_export(a, b, name):
  x, y = load_file(str(a / "export" / name)), load_file(str(b / "export" / name))
  assert set(x) == set(y)
  for k in x:
    np.testing.assert_allclose(x[k], y[k], atol=2e-5, rtol=1e-5, err_msg=k)


def two_one_two(args, workdir):
  """2 hosts stop at step 2, 1 host continues to step 3 (both planned stops: the SIGTERM path's
  agreement and save), 2 hosts finish the run: both directions of a resume on another process
  count, and the run's evaluation gathered across 2 hosts. Returns the last run's output."""
  every, _ = run_2x4(args + ["--config.train.stop_at_step=2"], workdir)
  assert "saved step 2" in every and "multi-host: process 0 of 2" in every, every[-3000:]
  out = run_1x8(args + ["--config.train.stop_at_step=3"], workdir)
  assert "at step 2 on 1 process(es)" in out and "saved step 3" in out
  every, last = run_2x4(args, workdir)
  assert "at step 3 on 2 process(es)" in every
  return last


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  from internvideo2_jax.data import synthetic
  root = tmp_path_factory.mktemp("syn")
  CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  synthetic.write_corpus(str(root), train=24, val=8, size=32, num_frames=32)
  return root


def test_stage2_sigterm_on_two_hosts_then_one_host_then_two(corpus, tmp_path):
  args = ["--config=configs/stage2.py:size=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8",
          f"--config.data.corpora=({{'format': 'json', 'path': '{corpus}/train.json', 'data_root': '{corpus}'}},)",
          f"--config.eval.corpus.path={corpus}/val.json", f"--config.eval.corpus.data_root={corpus}",
          "--config.train.total_steps=6", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
          "--config.train.keep_checkpoints=3"]
  ref = tmp_path / "ref"
  out = run_1x8(args, ref)
  assert "held-out retrieval after 6 steps" in out and "| match (ITM" in out
  assert (ref / "tensorboard").is_dir() and (ref / "metrics.jsonl").is_file()

  # 2 hosts, SIGTERM to both once training is under way: they agree on one step and save it
  a = tmp_path / "a"
  procs = start_2x4(args, a)
  lines, deadline = [], time.time() + 600
  for line in procs[0].stdout:
    lines.append(line)
    if line.startswith("step 1/6") or time.time() > deadline:
      for p in procs:
        p.send_signal(signal.SIGTERM)
      break
  outs = finish(procs)
  out0 = "".join(lines) + outs[0]
  assert "multi-host: process 0 of 2" in out0 and "exiting after SIGTERM" in out0, out0[-3000:]
  assert not re.search(r"^\[\s*\d+/6", outs[1], re.M)  # process 1 prints no metrics (process 0 does)
  stopped = int(out0.split("saved step ")[1].split()[0])
  assert 1 <= stopped <= 4
  records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # one writer
  assert records[0]["train/samples_per_s"] > 0
  # ... 1 host continues for a step, and 2 hosts finish the run with the gathered evaluation.
  # On a loaded 2-core machine the processes drift apart by minutes: `distributed.timeout_s`
  # covers the CPU collectives, barriers precede Orbax's first collective and the job's end.
  out = run_1x8(args + [f"--config.train.stop_at_step={stopped + 1}"], a)
  assert f"at step {stopped} on 1 process(es)" in out
  every, _ = run_2x4(args, a)
  assert f"at step {stopped + 1} on 2 process(es)" in every
  same_export(ref, a, "stage2_official_layout.safetensors")
  want = json.loads((ref / "eval_retrieval.json").read_text())
  got = json.loads((a / "eval_retrieval.json").read_text())
  for scores in ("itc", "match"):
    for k, v in want[scores].items():
      assert abs(got[scores][k] - v) < 1e-6, (scores, k)


def test_stage1_two_hosts_one_host_two_hosts(corpus, tmp_path):
  args = ["--config=configs/stage1.py:size=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8",
          f"--config.data.corpora=({{'format': 'csv', 'path': '{corpus}/train_stage1.csv', 'data_root': '{corpus}'}},)",
          f"--config.data.synthetic_dir={corpus}", "--config.data.batch_size=8", "--config.train.total_steps=4",
          "--config.train.log_every=1", "--config.train.checkpoint_every=2"]
  ref = tmp_path / "ref"
  run_1x8(args, ref)
  two_one_two(args, tmp_path / "a")
  same_export(ref, tmp_path / "a", "stage1_official_layout.safetensors")


def test_stage3_two_hosts_one_host_two_hosts_with_gathered_qa_eval(corpus, tmp_path):
  """Stage 3 (QFormer + LoRA LLM, FSDP over both hosts): 2 hosts -> 1 host -> 2 hosts gives the
  uninterrupted run's export; the QA evaluation's generation runs on global arrays across the
  hosts and agrees with the single-process one."""
  args = ["--config=configs/stage3.py:size=tiny", "--config.mesh.data=1", "--config.mesh.fsdp=8",
          f"--config.data.corpora=({{'format': 'json', 'path': '{corpus}/train_qa.json', 'data_root': '{corpus}'}},)",
          f"--config.eval.qa.path={corpus}/val_qa.json", f"--config.eval.qa.data_root={corpus}",
          "--config.eval.qa.limit=2", "--config.train.total_steps=4", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2"]
  ref = tmp_path / "ref"
  out = run_1x8(args, ref)
  assert "multiple choice:" in out
  last = two_one_two(args, tmp_path / "a")
  same_export(ref, tmp_path / "a", "stage3_official_layout.safetensors")
  pick = lambda text: [ln for ln in text.splitlines() if ln.startswith(("multiple choice", "free-form", "  Q:"))]  # noqa: E731
  assert pick(last) == pick(out) and pick(out)
