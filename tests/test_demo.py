"""jsta.demo runs end to end on a tiny config and reports a small error against the reference."""

from __future__ import annotations

import jsta.demo as demo


def test_demo_tiny(capsys):
  cfg = demo.DemoConfig((4, 8, 8), (2, 4, 4), (1, 1, 1), heads=2, head_dim=16, dtype="float32",
                        text_len=3, text_max_len=5)
  out = demo.run(cfg, backend="xla", iters=1)
  assert out["backend"] == "xla"
  assert out["sparsity"] == 1 - 1 / 8
  assert out["max_err"] < 1e-5 and out["rel_l2"] < 1e-5
  assert out["sta_ms"] > 0 and out["full_ms"] > 0
  printed = capsys.readouterr().out
  assert "sparsity (video tiles): 87.50%" in printed and "all queries" in printed


def test_check_rows_paper_shape():
  spec = demo.PAPER.spec()
  rows = demo.check_rows(spec, 128)
  assert rows.size == 3 * 128
  assert rows[0] == 0 and rows[-1] == spec.seq_len - 1
  assert rows[128] == 57_600
