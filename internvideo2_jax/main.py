"""Command-line entry point: `iv2 --config=configs/FILE.py[:args] --workdir=DIR [--config.x=y]`.

The config's `job` picks what runs. Without --config the embedded default runs: the stage-2 demo
(a small model trained on a synthetic corpus it generates, then held-out retrieval).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

# transformers' "PyTorch was not found" advice reads like an error in every job (we use its
# tokenizers only); other warnings stay.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "configs", "stage2.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Path to an ml-collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where outputs, logs and checkpoints go.")


def main(argv) -> None:
  del argv
  from internvideo2_jax import api  # the same entry point as notebooks use
  config = flags.FLAGS.config
  if config.get("job") not in api.JOBS:
    raise app.UsageError(f"config.job={config.get('job')!r} is not a known job; known: {sorted(api.JOBS)}")
  api.train(config, flags.FLAGS.workdir)


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
