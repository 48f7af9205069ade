"""Every code block of README.md and docs/*.md runs as written.

Blocks are found as Markdown defines them: fenced (```lang ... ```) and indented (4 or more
spaces after a blank line). Each one is either run here or named in ``NOT_RUN`` with the reason:
  - fenced ``python`` blocks run in order, in one namespace per document, in a temporary
    working directory (what they write lands there);
  - shell commands (``jsta-calibrate ...``, ``python -m models.calibrate ...``) run in this
    process through their ``main(argv)``, with output folders under the temporary directory;
  - a Python snippet that needs the reader's data (``layers`` from a model) runs on data this
    test makes (the inputs the commands after it read).
A block that is neither run nor listed fails the test, so a new example cannot go unchecked.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jsta

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README] + sorted((ROOT / "docs").glob("*.md"))

# (document, first line of the block) -> why it is not run here.
NOT_RUN = {
    ("README.md", "bash scripts/demo.sh"):
        "the quick-start commands: the demo (run by tests/test_demo.py through jsta.demo.main) "
        "and the whole test suite itself; test_readme_quick_start_commands checks their text",
    ("SEMANTICS.md", "half_d   = w_d // 2"): "formulas of the tile rule, not a program",
    ("SEMANTICS.md", "q_d - (w_d - 1) <= k_d <= q_d"): "a formula of the causal rule",
    ("SEMANTICS.md", "o_i = sum_{j in K(i)} softmax_j(scale * q_i . k_j) v_j"):
        "the formula of the output",
}


def code_blocks(path: pathlib.Path) -> list[tuple[str, str, int]]:
  """(language, text, first line number) of every code block: fenced blocks with their
  language ("" if none), indented blocks with language "indented"."""
  lines = path.read_text().split("\n")
  out, i = [], 0
  while i < len(lines):
    fence = re.match(r"^\s*```(\S*)\s*$", lines[i])
    if fence:
      j = i + 1
      while not re.match(r"^\s*```\s*$", lines[j]):
        j += 1
      out.append((fence.group(1), "\n".join(lines[i + 1:j]), i + 2))
      i = j + 1
      continue
    if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
      indent = len(lines[i]) - len(lines[i].lstrip())
      j = i
      while j < len(lines) and (lines[j].startswith(" " * indent) or (
          not lines[j].strip() and j + 1 < len(lines) and lines[j + 1].startswith(" " * indent))):
        j += 1
      text = "\n".join(l[indent:] for l in lines[i:j]).strip("\n")
      out.append(("indented", text, i + 1))
      i = j
      continue
    i += 1
  return out


def _argv(command: str, tmp: pathlib.Path) -> list[str]:
  """A documented command line -> argv: continuation lines joined, optional ``[...]`` groups
  taken as written, output folders under ``tmp``."""
  text = command.replace("\\\n", " ").replace("[", "").replace("]", "")
  return [a.replace("/tmp/calib", str(tmp / "calib")) for a in shlex.split(text)]


def _run_command(command: str, tmp: pathlib.Path) -> None:
  from jsta.calibration import cli as calibrate_cli
  from models import calibrate as dit_calibrate
  for line in command.split("\n"):
    if line.startswith((" ", "\t")) or not line.strip():
      continue                                   # continuation of the previous command
    full = command[command.index(line):]
    # The command ends at the first line that does not end with a backslash.
    parts = []
    for part in full.split("\n"):
      parts.append(part)
      if not part.rstrip().endswith("\\"):
        break
    argv = _argv("\n".join(parts), tmp)
    if argv[0] == "jsta-calibrate":
      assert calibrate_cli.main(argv[1:]) == 0, argv
    elif argv[:3] == ["python", "-m", "models.calibrate"]:
      assert dit_calibrate.main(argv[3:]) == 0, argv
    else:
      raise AssertionError(f"no way to run the command {argv[:3]}: run it in {__name__} or "
                           f"list it in NOT_RUN with the reason")


def _prepare_calibration_inputs(snippet: str, scope: dict, tmp: pathlib.Path) -> None:
  """The np.savez snippet of docs/CALIBRATION.md on one recorded layer of random q, k, v at the
  layout its commands name (latent 8x16x16, tile 2x4x4, 32 text slots), for both prompt files;
  and the checkpoint its models.calibrate command names (a tiny-preset DiT, so that the command
  runs in seconds)."""
  from flax import nnx
  from models import train
  from models.video_dit import VideoDiT, video_dit_config
  spec = jsta.STASpec((8, 16, 16), (2, 4, 4), (3, 3, 3), text_len=32, text_max_len=32)
  keys = jax.random.split(jax.random.key(0), 3)
  layers = [tuple(jax.random.normal(k, (1, spec.seq_len, 2, 16)) for k in keys)]
  scope.update(np=np, layers=layers)
  exec(compile(snippet, "CALIBRATION.md", "exec"), scope)
  shutil.copy(tmp / "prompt0.npz", tmp / "prompt1.npz")
  (tmp / "runs" / "small").mkdir(parents=True)
  model = VideoDiT(video_dit_config("tiny"), rngs=nnx.Rngs(0))
  train.save_checkpoint(str(tmp / "runs" / "small" / "ckpt"), model)


def _check_readme(scope: dict) -> None:
  assert scope["o_video"].shape == scope["video"].shape
  seq = scope["spec"].seq_len
  assert scope["y"].shape == (1, seq, 256)
  assert scope["y2"].shape == scope["z"].shape == (2, seq, 256)
  assert scope["lse"].shape == (1, seq, 4)
  # The compilation cache block wrote its program (the test runs in a temporary directory).
  assert scope["o_cached"].shape == scope["x_cached"].shape and os.listdir("jax_cache")
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


def _check_models(scope: dict) -> None:
  cfg = scope["cfg"]
  assert scope["v"].shape == (2, *cfg.latent_shape)
  assert scope["cfg2"].layer_windows() == ((((1, 3, 3),) * cfg.heads),) * cfg.depth


CHECKS = {"README.md": _check_readme, "MODELS.md": _check_models}


_CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_compilation_cache():
  """A document may enable the persistent compilation cache (jsta.enable_compilation_cache):
  JAX's settings go back afterwards, so the later tests of this process write no entries."""
  before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  yield
  if any(getattr(jax.config, name) != value for name, value in before.items()):
    for name, value in before.items():
      jax.config.update(name, value)
    from jax._src import compilation_cache
    compilation_cache.reset_cache()


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_code_block_runs(path, tmp_path, monkeypatch, restore_compilation_cache):
  monkeypatch.chdir(tmp_path)
  if path.name == "INTEGRATIONS.md" and importlib.util.find_spec("maxdiffusion") is None:
    # Its MaxDiffusion recipe runs against the stand-in registry where maxdiffusion is not
    # installed (tests/test_integrations.py runs it against both).
    import maxdiffusion_standin
    for name, module in maxdiffusion_standin.modules().items():
      monkeypatch.setitem(sys.modules, name, module)
  blocks = code_blocks(path)
  scope: dict = {"__name__": f"docs_{path.stem}"}
  commands = []
  for lang, text, line in blocks:
    first = text.strip().split("\n")[0].strip()
    if (path.name, first) in NOT_RUN:
      continue
    if lang == "python":
      exec(compile(text, f"{path.name}:{line}", "exec"), scope)
    elif lang == "indented" and first.startswith("np.savez("):
      _prepare_calibration_inputs(text, scope, tmp_path)
    elif lang in ("bash", "sh", "indented"):
      commands.append(text)
      continue
    else:
      raise AssertionError(f"{path.name}:{line}: a ```{lang} block, neither run nor listed in "
                           f"NOT_RUN: {first!r}")
  for text in commands:             # after the snippets that make their inputs
    _run_command(text, tmp_path)
  if path.name in CHECKS:
    CHECKS[path.name](scope)


def test_not_run_list_is_current():
  """Every NOT_RUN entry still names a block of its document (no stale exclusions)."""
  firsts = {(p.name, t.strip().split("\n")[0].strip()) for p in DOCUMENTS
            for _, t, _ in code_blocks(p)}
  assert set(NOT_RUN) <= firsts, set(NOT_RUN) - firsts


def test_code_blocks_are_found():
  blocks = code_blocks(ROOT / "docs" / "CALIBRATION.md")
  assert [b[0] for b in blocks][:2] == ["indented"] * 2
  assert blocks[0][1].startswith("jsta-calibrate --qkv prompt0.npz")
  assert blocks[1][1].startswith("np.savez(")
  assert [b[0] for b in code_blocks(README)][:2] == ["bash", "python"]


def test_readme_quick_start_commands():
  text = README.read_text()
  quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
  cmds = re.findall(r"```bash\n(.*?)```", quick, re.S)[0].strip().splitlines()
  assert cmds == ["bash scripts/demo.sh", "bash scripts/test.sh"]
  ci = (README.parent / ".ci" / "run").read_text()
  assert "\nbash scripts/test.sh\n" in ci


def test_lazy_submodules_after_a_plain_import():
  """`import jsta` then jsta.strategy / calibrate / sharding / nnx, as the README's table writes
  them, in a fresh interpreter; the import itself loads none of them (nor flax)."""
  code = ("import sys, jsta\n"
          "lazy = {'flax', 'jsta.nnx', 'jsta.calibration', 'jsta.sharding'}\n"
          "assert not lazy & set(sys.modules)\n"
          "jsta.strategy.WindowStrategy; jsta.calibrate.calibrate\n"
          "jsta.sharding.head_parallel_attention; jsta.nnx.SlidingTileAttention\n"
          "assert {'calibration', 'strategy', 'calibrate', 'sharding', 'nnx'} <= set(dir(jsta))\n"
          "try:\n  jsta.no_such_name\nexcept AttributeError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "module 'jsta' has no attribute 'no_such_name'"
