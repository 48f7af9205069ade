"""The wheel: what it ships and requires, and its commands run from a fresh virtual environment.

The wheel is built from a copy of the repository (nothing is written into the checkout) and
installed with --no-deps into a new venv; a .pth file there points at this interpreter's
site-packages for the third-party dependencies only, so jsta itself comes from the wheel alone.
Every command runs in an empty directory with a clean PYTHONPATH: the repository root is never on
sys.path, so models/ (not shipped) is not importable there.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jsta", "pallas_kernels")  # what the wheel ships
# Not copied into the build tree: environments, caches, build output.
_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "runs", "out", ".whl")
_TIMEOUT = 300


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd, *, cwd, env, timeout=_TIMEOUT) -> subprocess.CompletedProcess:
  proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, (
      f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
      f"\n--- stderr\n{proc.stderr[-3000:]}")
  return proc


class Installed:
  """The built wheel and a venv with it installed."""

  def __init__(self, tmp: pathlib.Path):
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    wheel_dir = tmp / "wheel"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", wheel_dir, src], cwd=tmp, env=env)
    (self.wheel,) = wheel_dir.glob("jsta-*.whl")
    self.venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", self.venv], cwd=tmp, env=env)
    self.bin = self.venv / "bin"
    self.python = self.bin / "python"
    _run([sys.executable, "-m", "pip", "--python", self.python, "install", "--no-deps",
          "--no-index", "-q", self.wheel], cwd=tmp, env=env)
    purelib = _run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=tmp, env=env).stdout.strip()
    self.site = pathlib.Path(purelib)
    # The dependencies (jax, flax, matplotlib, ...) from this interpreter's site-packages; .pth
    # files in there are not processed, so its editable jsta (if any) stays out.
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_path("purelib")]
            if os.path.isdir(p)]
    (self.site / "_test_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    self.work = tmp / "work"
    self.work.mkdir()

  def env(self, pythonpath: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XLA_FLAGS", "PYTHONSTARTUP")}
    env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    if pythonpath:
      env["PYTHONPATH"] = pythonpath
    return env

  def run(self, *cmd, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    return _run(cmd, cwd=self.work, env=self.env(pythonpath))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
  return Installed(tmp_path_factory.mktemp("packaging"))


def _wheel_names(installed) -> list[str]:
  with zipfile.ZipFile(installed.wheel) as z:
    return z.namelist()


def _metadata(installed, name: str) -> str:
  with zipfile.ZipFile(installed.wheel) as z:
    (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
    return z.read(path).decode()


# ---- what the wheel holds -------------------------------------------------------------------------

def test_wheel_ships_the_library_packages_and_not_models(installed):
  names = _wheel_names(installed)
  tops = {n.split("/")[0] for n in names}
  assert tops == {"jsta", "pallas_kernels", "jsta-0.1.0.dist-info"}, tops
  assert not any(n.startswith("models/") for n in names)
  # Every module of the shipped packages, subpackages included, is in the wheel.
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      rel = path.relative_to(ROOT)
      if all((ROOT / p / "__init__.py").exists() for p in rel.parents if str(p) != "."):
        assert rel.as_posix() in names, f"{rel} is missing from the wheel"
  assert "jsta-0.1.0.dist-info/licenses/LICENSE" in names
  # PEP 561: type checkers use jsta's annotations when this marker is installed.
  assert "jsta/py.typed" in names


def test_wheel_metadata_scripts_extras_and_license(installed):
  meta = _metadata(installed, "METADATA")
  assert "License-Expression: MIT" in meta
  assert "Project-URL: Repository, https://github.com/jsta-dev/jsta" in meta
  for c in ("Programming Language :: Python :: 3.12", "Programming Language :: Python :: 3.13",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
            "Development Status :: 3 - Alpha"):
    assert f"Classifier: {c}" in meta
  extras: dict[str, set[str]] = {}
  for line in meta.splitlines():
    m = re.match(r'Requires-Dist: ([A-Za-z0-9._-]+).*; extra == "(\w+)"', line)
    if m:
      extras.setdefault(m.group(2), set()).add(_norm(m.group(1)))
  assert {"optax", "tqdm", "orbax-checkpoint", "matplotlib"} <= extras["models"]
  assert extras["plot"] == {"matplotlib"}
  # `pip install -e ".[test]"` (scripts/env.sh) must make every README command work, models/ too.
  assert extras["models"] | extras["plot"] <= extras["test"]
  assert {"pytest", "pytest-xdist", "hypothesis", "chex", "setuptools"} <= extras["test"]
  for cuda in ("cuda12", "cuda13"):
    assert f'Requires-Dist: jax[{cuda}]<0.12,>=0.11.2; extra == "{cuda}"' in meta, cuda
  assert 'Requires-Dist: jax[cuda13]<0.12,>=0.11.2; extra == "cuda"' in meta
  assert not re.search(r"^Requires-Dist: matplotlib\b(?!.*extra ==)", meta, re.M)
  assert "Requires-Dist: jax<0.12,>=0.11.2" in meta
  assert "Requires-Dist: jaxlib<0.12,>=0.11.2" in meta
  scripts = _metadata(installed, "entry_points.txt")
  assert "jsta-demo = jsta.demo:main" in scripts
  assert "jsta-calibrate = jsta.calibration.cli:main" in scripts
  # The kernels plug into jsta's backend registry as entry points.
  plugins = scripts.split("[jsta.backends]", 1)[1].split("\n[", 1)[0]
  assert "pallas_triton = pallas_kernels.triton.backend:BACKEND" in plugins
  assert "pallas_mosaic = pallas_kernels.mosaic.backend:BACKEND" in plugins


def _third_party_imports() -> dict[str, str]:
  """{top-level module: first file importing it} over jsta/ and pallas_kernels/, leaving out
  the standard library, the shipped packages and imports guarded by ``except ImportError``."""
  found: dict[str, str] = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      tree = ast.parse(path.read_text(), str(path))
      guarded = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers):
          guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
      for node in ast.walk(tree):
        if id(node) in guarded:
          continue
        if isinstance(node, ast.Import):
          mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          mods = [node.module]
        else:
          continue
        for mod in mods:
          top = mod.split(".")[0]
          if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
            continue
          found.setdefault(top, str(path.relative_to(ROOT)))
  return found


def test_requires_dist_covers_every_third_party_import(installed):
  required = set()
  for line in _metadata(installed, "METADATA").splitlines():
    if line.startswith("Requires-Dist: ") and "extra ==" not in line:
      required.add(_norm(re.match(r"Requires-Dist: ([A-Za-z0-9._-]+)", line).group(1)))
  imports = _third_party_imports()
  assert {"jax", "numpy", "einops", "flax"} <= set(imports), imports
  # matplotlib is the plot extra: imported only under `except ImportError` (the heatmap).
  assert "matplotlib" not in imports, imports["matplotlib"]
  assert "models" not in imports, f"{imports.get('models')} imports models/, which is not shipped"
  providers = importlib.metadata.packages_distributions()
  for mod, where in imports.items():
    dists = {_norm(d) for d in providers.get(mod, [])}
    assert dists, f"{where} imports {mod!r}, which no installed distribution provides"
    assert dists & required, (f"{where} imports {mod!r} (distribution {sorted(dists)}) but the "
                              f"wheel requires only {sorted(required)}")
  # Nothing required that the code does not import (jaxlib: jax's compiled half, pinned with it).
  imported = {_norm(d) for mod in imports for d in providers.get(mod, [])}
  assert required - imported <= {"jaxlib"}, required - imported


def test_installed_version_is_the_distribution_version(installed):
  out = installed.run(installed.python, "-c", "import jsta; print(jsta.__version__)").stdout
  version = re.search(r"^Version: (.+)$", _metadata(installed, "METADATA"), re.M).group(1)
  assert out.strip() == version == "0.1.0"


def test_version_without_package_metadata():
  # A source tree imported without an install has no metadata: __version__ says so.
  code = ("import importlib.metadata as m\n"
          "def version(name, _v=m.version):\n"
          "  if name == 'jsta': raise m.PackageNotFoundError(name)\n"
          "  return _v(name)\n"
          "m.version = version\n"
          "import jsta; print(jsta.__version__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert out.strip() == "0+unknown"


# ---- the installed commands -----------------------------------------------------------------------

def test_installed_jsta_comes_from_the_wheel_and_models_is_not_importable(installed):
  out = installed.run(installed.python, "-c", (
      "import importlib.util, json, sys, jsta; "
      "print(json.dumps({'jsta': jsta.__file__, 'path': sys.path, "
      "'backends': jsta.ops.backend_names(), "
      "'triton': type(jsta.get_backend('pallas_triton')).__module__, "
      "'models': importlib.util.find_spec('models') is not None}))")).stdout
  info = json.loads(out.strip().splitlines()[-1])
  assert pathlib.Path(info["jsta"]).is_relative_to(installed.site), info["jsta"]
  # The installed entry points (not a checkout's pyproject.toml) bring the kernels' backends.
  assert info["backends"] == ["auto", "pallas_mosaic", "pallas_triton", "xla"]
  assert info["triton"] == "pallas_kernels.triton.backend"
  assert str(ROOT) not in info["path"]
  assert not info["models"]


def test_jsta_demo_console_script(installed):
  out = installed.run(installed.bin / "jsta-demo", "--config", "tiny", "--backend", "xla",
                      "--iters", "1").stdout
  assert "sparsity (video tiles): 87.50%" in out and "finite: True" in out
  m = re.search(r"max \|err\| ([0-9.e+-]+)", out)
  assert m and float(m.group(1)) < 1e-5, out


def test_jsta_calibrate_console_script_synthetic(installed):
  out_dir = installed.work / "synthetic"
  out = installed.run(installed.bin / "jsta-calibrate", "--synthetic", "--latent", "4,8,8",
                      "--tile", "2,4,4", "--heads", "2", "--head-dim", "16", "--depth", "1",
                      "--num-inputs", "1", "--candidates", "1,1,1;full", "--out", out_dir).stdout
  assert "layer | head 0" in out
  strategy = json.loads((out_dir / "strategy.json").read_text())
  assert strategy["num_layers"] == 1 and strategy["num_heads"] == 2
  assert (out_dir / "recall_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_jsta_with_an_unrelated_models_package_first_on_sys_path(installed):
  shadow = installed.work / "shadow"
  (shadow / "models").mkdir(parents=True)
  (shadow / "models" / "__init__.py").write_text('"""Someone else\'s package called models."""\n')
  # Every jsta module imports, and `models` stays the unrelated one.
  out = installed.run(installed.python, "-c", (
      "import importlib, pkgutil, jsta, models; "
      "[importlib.import_module(m.name) for m in pkgutil.walk_packages(jsta.__path__, 'jsta.')]; "
      "import sys; print(models.__file__); print(sorted(n for n in sys.modules "
      "if n.startswith('models.')))"), pythonpath=str(shadow)).stdout.splitlines()
  assert out[-2] == str(shadow / "models" / "__init__.py") and out[-1] == "[]", out
  # The calibration command on q/k/v files.
  rng = np.random.default_rng(0)
  qkv = installed.work / "qkv.npz"
  np.savez(qkv, **{f"{n}0": rng.normal(size=(1, 256, 2, 8)).astype(np.float32) for n in "qkv"})
  out_dir = installed.work / "from_files"
  out = installed.run(installed.python, "-m", "jsta.calibration", "--qkv", qkv, "--latent",
                      "4,8,8", "--tile", "2,4,4", "--candidates", "1,1,1;full", "--out", out_dir,
                      pythonpath=str(shadow)).stdout
  assert f"q/k/v files {qkv}" in out
  strategy = json.loads((out_dir / "strategy.json").read_text())
  assert strategy["spec"]["latent_shape"] == [4, 8, 8] and strategy["num_heads"] == 2
