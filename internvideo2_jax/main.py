"""Command-line entry point: `iv2 --config=configs/FILE.py[:args] --workdir=DIR [--config.x=y]`.

The config's `job` picks what runs. Without --config the embedded default runs: the stage-2 demo
(a small model trained on a synthetic corpus it generates, then held-out retrieval).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

# transformers' "PyTorch was not found" advice reads like an error in every job (we use its
# tokenizers only); other warnings stay.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "stage2.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to an ml-collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where outputs, logs and checkpoints go.")

# job name -> module with `run(config, workdir)`; imported lazily so a job pulls in only its deps.
JOBS = {
    "features": "internvideo2_jax.evaluate.features",
    "inspect_data": "internvideo2_jax.data.inspect",
    "train_stage2": "internvideo2_jax.train.stage2",
    "evaluate": "internvideo2_jax.evaluate.run",
    "train_stage1": "internvideo2_jax.train.stage1",
    "train_stage3": "internvideo2_jax.train.stage3",
    "chat": "internvideo2_jax.evaluate.chat",
    "cache_targets": "internvideo2_jax.train.cache_targets",
    "compile": "internvideo2_jax.train.compile",
    "finetune": "internvideo2_jax.train.finetune",
}


def main(argv) -> None:
  del argv
  config = flags.FLAGS.config
  job = config.get("job")
  if job not in JOBS:
    raise app.UsageError(f"config.job={job!r} is not a known job; known: {sorted(JOBS)}")
  # Our modules report at INFO; libraries (orbax, jax backend probing) only warnings, also
  # those that log through absl (its `I1202 ...` lines).
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  ours = logging.getLogger("internvideo2_jax")
  ours.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stderr)  # plain lines, not absl's `I1202 12:00:00 file:line]`
  handler.setFormatter(_PlainFormatter())
  ours.addHandler(handler)
  ours.propagate = False
  start_runtime(config, job)
  importlib.import_module(JOBS[job]).run(config, flags.FLAGS.workdir)
  from internvideo2_jax.parallel import distributed
  # Process 0 may still be writing exports and results long after the others are done; jax's
  # shutdown barrier allows only `distributed.timeout_s`, this one an hour.
  distributed.sync("job finished")


class _PlainFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    msg = super().format(record)
    return msg if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {msg}"


def start_runtime(config, job: str) -> None:
  """Before any device use: fake devices for `compile`, the multi-host start, the compilation
  cache; then only process 0 prints (the others keep warnings and errors on stderr)."""
  import jax
  from internvideo2_jax.parallel import distributed
  if job == "compile":
    n = int(config.compile.get("devices", 0))
    if n and not config.compile.get("topology"):
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", n)
    where = "single process (compile job)"
  else:
    where = distributed.initialize(config.get("distributed"))
  cache = config.get("runtime", {}).get("compilation_cache_dir", "auto")
  if cache == "auto":
    cache = (os.path.expanduser("~/.cache/internvideo2_jax/jax_cache")
             if jax.default_backend() in ("gpu", "tpu") else "")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  if jax.process_count() > 1:
    if jax.process_index() != 0:
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
      logging.getLogger("internvideo2_jax").setLevel(logging.WARNING)
    print(f"multi-host: {where}", flush=True)


def _parse_flags(argv):
  """absl's parsing, with ml-collections' unknown-key errors (an escaped KeyError inside an
  AttributeError, then a traceback) turned into one line naming the flag and the suggestion."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, BaseException) and inner.args else str(inner)
    key = str(text).split("\n")[0].strip("'\"")
    culprit = next((a for a in argv[1:] if a.startswith("--config.") and key and key in a), "")
    hint = " ".join(line for line in str(text).split("\n")[1:] if line)
    sys.exit(f"unknown config key {key!r}" + (f" in {culprit.split('=')[0]}" if culprit else "")
             + (f": {hint}" if hint else "") + " (the config file's keys are the valid ones)")
  except flags.Error as e:
    sys.exit(f"bad command line: {e}")


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
