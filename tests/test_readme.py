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
  # The layer took MultiHeadAttention's weights as they are.
  from flax import nnx
  import jax
  loaded, source = nnx.state(scope["layer2"], nnx.Param), nnx.state(scope["gqa"], nnx.Param)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), loaded, source))


def test_readme_has_no_relative_links():
  # The README is also the package page (pyproject's readme), where links relative to the
  # repository do not resolve: it names the docs by path instead.
  text = README.read_text()
  assert not re.findall(r"\]\((?!https?://)[^)]*\)", text)


def test_readme_quick_start_commands():
  text = README.read_text()
  quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
  cmds = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip().splitlines()
  assert cmds == ["bash scripts/demo.sh", "bash scripts/test.sh"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert "\nbash scripts/test.sh\n" in ci
