"""The README's marked commands run as written (with small overrides), so the documentation
cannot silently break.

A block is tested when the line before its fence is a marker comment:

    <!-- docs-test -->                                   run as is
    <!-- docs-test: append="--config.train.total_steps=2" sub="400=>16" -->

`append` goes after every `iv2` command of the block (absl: the last value of a flag wins),
`sub` replaces text in the block (several `A=>B` pairs separated by `;`). Bash blocks run in
order in one scratch directory (later blocks use what earlier ones made, as a reader would),
with `configs/` linked and `.venv/bin/...` pointing at this checkout's virtual environment;
the synthetic corpora are made small up front. Python blocks run with this interpreter.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"^<!-- docs-test(?::(?P<opts>.*))? -->$")


def marked_blocks(text: str) -> list[dict]:
  """[{lang, code, append, subs, line}] for each fenced block right after a marker."""
  lines = text.splitlines()
  blocks = []
  for i, line in enumerate(lines):
    m = MARKER.match(line.strip())
    if not m:
      continue
    fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
    if not fence.startswith("```"):
      raise ValueError(f"README.md:{i + 1}: a docs-test marker must be followed by a fenced block")
    end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
    opts = dict(kv.split("=", 1) for kv in shlex.split(m.group("opts") or ""))
    subs = [tuple(p.split("=>", 1)) for p in opts.get("sub", "").split(";") if p.strip()]
    code = "\n".join(lines[i + 2:end])
    for a, b in subs:
      if a not in code:
        raise ValueError(f"README.md:{i + 1}: sub {a!r} does not occur in the block")
      code = code.replace(a, b)
    blocks.append({"lang": fence[3:].strip(), "code": code, "append": opts.get("append", ""), "line": i + 1})
  return blocks


def test_marker_parsing():
  text = "\n".join(["x", '<!-- docs-test: append="--a=1" sub="400=>16;foo=>bar" -->', "```bash",
                    "iv2 --train 400 foo", "```", "<!-- docs-test -->", "```python", "print(1)", "```"])
  b = marked_blocks(text)
  assert [x["lang"] for x in b] == ["bash", "python"]
  assert b[0]["code"] == "iv2 --train 16 bar" and b[0]["append"] == "--a=1"
  with pytest.raises(ValueError, match="does not occur"):
    marked_blocks(text.replace("400=>16", "401=>16"))


def _script(block: dict) -> str:
  venv = os.path.join(REPO, ".venv", "bin")
  code = block["code"].replace(".venv/bin/iv2", "iv2_docs").replace(".venv/bin/", venv + "/")
  return ("set -euo pipefail\n"
          f'iv2_docs() {{ "{venv}/iv2" "$@" {block["append"]}; }}\n' + code + "\n")


def test_readme_commands(tmp_path):
  blocks = marked_blocks(open(os.path.join(REPO, "README.md")).read())
  assert len(blocks) >= 5, "the README lost its tested blocks"
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  from internvideo2_jax.data import synthetic  # small corpora where the commands expect them
  synthetic.write_corpus(str(tmp_path / "data" / "synthetic"), train=24, val=8, seed=0, num_frames=16,
                         size=32, radius=(0.22, 0.3))
  synthetic.write_corpus(str(tmp_path / "data" / "synthetic_stage1"), train=16, val=0, seed=0,
                         num_frames=32, size=32)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  for block in blocks:
    where = f"README.md:{block['line']}"
    if block["lang"] == "python":
      cmd = [sys.executable, "-c", block["code"]]
    else:
      assert block["lang"] == "bash", f"{where}: only bash and python blocks are run"
      cmd = ["bash", "-c", _script(block)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{where} failed:\n{block['code']}\n--- output ---\n{(p.stdout + p.stderr)[-6000:]}"
