"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 2
  scope: dict = {}
  exec(compile("\n".join(blocks), str(README), "exec"), scope)
  assert scope["o_video"].shape == scope["video"].shape
  seq = scope["spec"].seq_len
  assert scope["y"].shape == (1, seq, 256)
  assert scope["y2"].shape == scope["z"].shape == (2, seq, 256)
  assert scope["lse"].shape == (1, seq, 4)


def test_readme_quick_start_commands():
  text = README.read_text()
  quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
  cmds = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip().splitlines()
  assert cmds == ["bash scripts/demo.sh", "bash scripts/test.sh"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert "\nbash scripts/test.sh\n" in ci
