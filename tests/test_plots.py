"""The PNGs of the tools: drawn without pyplot (the caller's matplotlib backend and figures stay
as they are), readable axes, labels clear of the title."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from jsta.calibration import cli as calibrate_cli
from models import train as train_lib


@pytest.fixture
def svg_backend():
  """A caller that works with another matplotlib backend."""
  before = matplotlib.get_backend()
  matplotlib.use("svg", force=True)
  yield
  matplotlib.use(before, force=True)


def _e2e_result() -> dict:
  configs = [{"name": "full", "attention": "full", "step_ms": 10.0, "attn_total_ms": 4.0,
              "speedup": 1.0},
             {"name": "sta_3x3x3", "attention": "sta", "step_ms": 9.5, "attn_total_ms": 3.5,
              "speedup": 1.05},
             {"name": "sta_5x5x5", "attention": "sta", "step_ms": 10.2, "attn_total_ms": 4.2,
              "speedup": 0.98}]
  return {"preset": "tiny", "config": {"depth": 2}, "device": "cpu", "jax": "0.11.2",
          "amdahl_bound": 1.7, "configs": configs}


def test_plots_leave_the_callers_backend_alone(svg_backend, tmp_path):
  import benchmarks.e2e_bench as e2e
  import benchmarks.kernel_bench as kernel_bench
  import benchmarks.shapes_bench as shapes_bench
  assert calibrate_cli.main(["--synthetic", "--latent", "2,4,4", "--tile", "1,2,2", "--heads",
                             "2", "--head-dim", "8", "--depth", "1", "--num-inputs", "1",
                             "--candidates", "1,1,1;full", "--out", str(tmp_path / "cal")]) == 0
  train_lib.write_loss_curve(str(tmp_path), [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}],
                             {"attention": "sta", "device": "cpu"})
  e2e.plot(_e2e_result(), str(tmp_path / "e2e.png"))
  kernel_bench.plot([{"backend": "xla", "mode": "fwd", "sparsity": 0.5, "ms": 1.0}],
                    str(tmp_path / "kernel.png"))
  shapes_bench.plot([{"shape": "a", "mode": "fwd", "backend": "jsta", "tflops": 1.0}],
                    str(tmp_path / "shapes.png"))
  assert matplotlib.get_backend() == "svg"
  for name in ("cal/recall_heatmap.png", "loss.png", "e2e.png", "kernel.png", "shapes.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize("losses, scale", [
    (1.04 - 0.002 * np.arange(30), "linear"),                  # a narrow range: linear
    (2.0 * 0.7 ** np.arange(30), "log"),                       # over three decades: log
])
def test_loss_axis_is_readable(losses, scale):
  fig = train_lib.loss_figure([{"step": i, "loss": float(l)} for i, l in enumerate(losses)],
                              {"attention": "sta", "device": "cpu"})
  FigureCanvasAgg(fig).draw()
  ax = fig.axes[0]
  assert ax.get_yscale() == scale
  labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)
            if t.get_text()]
  assert labels and not any("times" in l or "^" in l or "\\" in l for l in labels), labels
  if scale == "log":
    assert {"1", "0.1", "0.01"} <= set(labels), labels


def test_e2e_bar_labels_stay_below_the_title():
  import benchmarks.e2e_bench as e2e
  fig = e2e.figure(_e2e_result())
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  renderer = canvas.get_renderer()
  ax = fig.axes[0]
  title = ax.title.get_window_extent(renderer)
  labels = [t for t in ax.texts if "ms" in t.get_text()]
  assert len(labels) == 3
  for t in labels:
    box = t.get_window_extent(renderer)
    assert box.y1 < title.y0, (t.get_text(), box, title)
    assert box.y1 <= ax.get_window_extent(renderer).y1             # inside the axes
  legend = ax.get_legend().get_window_extent(renderer)
  assert legend.y1 < title.y0
