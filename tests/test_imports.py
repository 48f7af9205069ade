"""The import graph: no import circles (type-checking imports included), the library never
imports the demo model or the benchmarks nor names the kernels' package, only the backend modules
import the kernels, and no module imports another module's private names. A static scan (ast) of every .py file in the repository."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jsta", "pallas_kernels", "models", "benchmarks")
KERNELS = {"pallas_kernels.mosaic.forward", "pallas_kernels.mosaic.backward_split",
           "pallas_kernels.mosaic.backward_fused", "pallas_kernels.triton.forward",
           "pallas_kernels.triton.backward"}
BACKENDS = {"pallas_kernels.mosaic.backend", "pallas_kernels.triton.backend"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      out[_module_name(path)] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The repo module a dotted import name refers to (longest known prefix), or None."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    cand = ".".join(parts[:n])
    if cand in MODULES:
      return cand
  return None


def _imports(module: str):
  """(imported repo module, names taken from it, line) for every import in ``module``,
  function-level imports and ``if TYPE_CHECKING:`` blocks included: a circle that only type
  annotations close is still a circle for a reader."""
  tree = ast.parse(MODULES[module].read_text())
  is_pkg = MODULES[module].name == "__init__.py"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if (target := _resolve(a.name)):
          yield target, (), node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = module.split(".")
        pkg = pkg if is_pkg else pkg[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        sub = _resolve(f"{base}.{a.name}")
        if sub and sub != _resolve(base):
          yield sub, (), node.lineno             # "from pkg import module"
        elif (target := _resolve(base)):
          yield target, (a.name,), node.lineno
    elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("__import__",
                                                                    "importlib.import_module"):
      if node.args and isinstance(node.args[0], ast.Constant):
        if (target := _resolve(node.args[0].value)):
          yield target, (), node.lineno


GRAPH = {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def test_scan_sees_the_repository():
  assert {"jsta.ops", "jsta.spec", "pallas_kernels.mosaic.backend", "models.video_dit"} <= set(
      MODULES)
  assert "jsta.spec" in GRAPH["jsta.ops"]
  assert "jsta.backends" in GRAPH["jsta.ops"]


def test_no_import_circles():
  state: dict[str, int] = {}
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for t in sorted(GRAPH[m]):
      # A package's __init__ importing its own submodules is not a circle of modules.
      if m.startswith(t + ".") or state.get(t) == 2:
        continue
      if state.get(t) == 1:
        cycle = path[path.index(t):] + [t]
        pytest.fail("import circle: " + " -> ".join(cycle))
      visit(t)
    path.pop()
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


@pytest.mark.parametrize("library", ["jsta", "pallas_kernels"])
def test_library_never_imports_models_or_benchmarks(library):
  bad = [(m, t) for m, ts in GRAPH.items() if m.split(".")[0] == library for t in ts
         if t.split(".")[0] in ("models", "benchmarks")]
  assert not bad, bad


def test_jsta_never_names_pallas_kernels_in_code():
  # The kernels plug into jsta.backends through entry points (pyproject.toml): no import of
  # them, and no module path of theirs in a string (e.g. for importlib), anywhere in jsta/.
  bad = [(m, t) for m, ts in GRAPH.items() if m.split(".")[0] == "jsta" for t in ts
         if t.split(".")[0] == "pallas_kernels"]
  for m, path in MODULES.items():
    if m.split(".")[0] == "jsta":
      bad += [(m, node.value) for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and re.fullmatch(r"pallas_kernels(\.\w+)*(:\w+)?", node.value.strip())]
  assert not bad, bad


def test_only_backend_modules_import_kernels():
  bad = [(m, t) for m, ts in GRAPH.items() if m.split(".")[0] in ("jsta", "pallas_kernels",
                                                                  "models")
         for t in ts if t in KERNELS and m not in BACKENDS]
  assert not bad, bad


def test_no_private_names_across_modules():
  bad = []
  for m in MODULES:
    for target, names, line in _imports(m):
      bad += [f"{m}:{line} imports {target}.{n}" for n in names
              if target != m and n.startswith("_") and not n.startswith("__")]
  assert not bad, bad


def test_spec_layers_stack_without_circles():
  # grid (plain values) <- spec <- positions <- mask <- schedule: each imports only lower ones.
  order = ["jsta.checks", "jsta.grid", "jsta.spec", "jsta.positions", "jsta.mask",
           "jsta.schedule"]
  for i, m in enumerate(order):
    higher = set(order[i + 1:]) & GRAPH[m]
    assert not higher, f"{m} imports {sorted(higher)}, which sit above it"
  assert GRAPH["jsta.grid"] <= {"jsta.checks"}
