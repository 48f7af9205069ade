"""The backend registry, jsta.backends: names listed without importing backend code, backends
made on first use, plugins found through entry points or a source checkout's pyproject.toml,
and explicit registrations winning over plugins."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

import jsta
from jsta import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUP = backends.ENTRY_POINT_GROUP

PLUGIN = '''
import jsta.ops
LOADS = []
BACKEND = jsta.ops.XlaBackend(name="{name}")
def make():
  LOADS.append(1)
  return jsta.ops.XlaBackend(name="{name}")
NOT_A_BACKEND = 42
'''


@pytest.fixture
def registry(monkeypatch, tmp_path):
  """A fresh registry (only "xla", plugins not read yet), restored afterwards; no installed
  entry points and no checkout pyproject.toml unless the test gives them."""
  monkeypatch.setattr(backends, "_FACTORIES", {"xla": backends._FACTORIES["xla"]})
  monkeypatch.setattr(backends, "_BACKENDS", {})
  monkeypatch.setattr(backends, "_plugins_read", False)
  monkeypatch.setattr(backends, "CHECKOUT_PYPROJECT", tmp_path / "no_pyproject.toml")
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
  return monkeypatch


def _plugin_module(monkeypatch, tmp_path, module: str, name: str) -> None:
  (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))
  monkeypatch.syspath_prepend(str(tmp_path))


def _installed(monkeypatch, **values) -> None:
  eps = [importlib.metadata.EntryPoint(name=n, value=v, group=GROUP) for n, v in values.items()]
  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda **kw: eps if kw.get("group") == GROUP else [])


def test_installed_plugin_is_listed_then_made_on_first_use(registry, tmp_path):
  _plugin_module(registry, tmp_path, "jsta_plugin_a", "plugged")
  _installed(registry, plugged="jsta_plugin_a:BACKEND", made="jsta_plugin_a:make")
  assert backends.backend_names() == ["auto", "made", "plugged", "xla"]
  assert "jsta_plugin_a" not in sys.modules                  # listed, not imported
  assert jsta.get_backend("plugged").name == "plugged"
  assert jsta.get_backend("made").name == "plugged"          # a factory: called once
  jsta.get_backend("made")
  assert sys.modules["jsta_plugin_a"].LOADS == [1]
  assert backends.auto_chain() == ["xla"]                    # not one of AUTO_ORDER's names


def test_plugin_that_is_not_a_backend_raises_on_use(registry, tmp_path):
  _plugin_module(registry, tmp_path, "jsta_plugin_b", "b")
  _installed(registry, broken="jsta_plugin_b:NOT_A_BACKEND")
  with pytest.raises(TypeError, match="backend 'broken' returned int, not a backend object"):
    jsta.get_backend("broken")


def test_register_backend_wins_over_a_plugin_of_the_same_name(registry, tmp_path):
  _plugin_module(registry, tmp_path, "jsta_plugin_c", "from_plugin")
  _installed(registry, mine="jsta_plugin_c:BACKEND")
  jsta.register_backend("mine", lambda: jsta.ops.XlaBackend(name="registered"))
  assert jsta.get_backend("mine").name == "registered"
  assert backends.backend_names().count("mine") == 1
  assert "jsta_plugin_c" not in sys.modules


def test_source_checkout_reads_its_pyproject_without_installed_metadata(registry):
  registry.setattr(backends, "CHECKOUT_PYPROJECT", ROOT / "pyproject.toml")
  assert {ep.name: ep.value for ep in backends.checkout_entry_points()} == {
      "pallas_triton": "pallas_kernels.triton.backend:BACKEND",
      "pallas_mosaic": "pallas_kernels.mosaic.backend:BACKEND"}
  assert backends.backend_names() == ["auto", "pallas_mosaic", "pallas_triton", "xla"]
  assert jsta.get_backend("pallas_triton").name == "pallas_triton"


def test_checkout_table_wins_over_stale_installed_metadata(registry, tmp_path):
  _plugin_module(registry, tmp_path, "jsta_plugin_d", "fresh")
  (tmp_path / "pyproject.toml").write_text(
      '[project]\nname = "jsta"\n[project.entry-points."jsta.backends"]\n'
      'shared = "jsta_plugin_d:BACKEND"\n')
  registry.setattr(backends, "CHECKOUT_PYPROJECT", tmp_path / "pyproject.toml")
  _installed(registry, shared="no_such_module:BACKEND")
  assert jsta.get_backend("shared").name == "fresh"


@pytest.mark.parametrize("text", ['[project]\nname = "other"\n[project.entry-points."jsta.'
                                  'backends"]\nx = "m:B"\n', "not [ toml", ""])
def test_checkout_pyproject_of_another_project_or_broken_is_ignored(tmp_path, text):
  (tmp_path / "pyproject.toml").write_text(text)
  assert backends.checkout_entry_points(tmp_path / "pyproject.toml") == []
  assert backends.checkout_entry_points(tmp_path / "missing.toml") == []


def test_naming_backends_imports_no_kernel_code():
  code = ("import sys, jsta\n"
          "names = jsta.ops.backend_names(); jsta.ops.check_backend('pallas_mosaic')\n"
          "assert {'pallas_triton', 'pallas_mosaic'} <= set(names), names\n"
          "assert not [m for m in sys.modules if m.startswith('pallas_kernels')]\n"
          "jsta.get_backend('pallas_triton')\n"
          "assert 'pallas_kernels.triton.backend' in sys.modules\n"
          "assert 'pallas_kernels.mosaic.backend' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
