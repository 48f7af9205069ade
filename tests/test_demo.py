"""jsta.demo runs end to end on a tiny config and reports a small error against the reference."""

from __future__ import annotations

import pytest

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


def test_main_runs_the_tiny_config(capsys):
  assert demo.main(["--config", "tiny", "--backend", "xla", "--iters", "1"]) == 0
  printed = capsys.readouterr().out
  assert "tokens: 256 video + 3/5 text = seq 261" in printed
  assert "sparsity (video tiles): 87.50%" in printed and "finite: True" in printed


@pytest.mark.parametrize("argv, match", [
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--backend", "nope", "--config", "tiny"],
     "--backend nope with --config tiny: backend must be one of"),
    (["--config", "huge"], "argument --config: invalid choice: 'huge'"),
    # 2**32 ran seed 0 (jax.random.key keeps the low 32 bits), 10**20 a traceback.
    (["--seed", str(2 ** 32)], "--seed must be in [0, 2**32), got 4294967296"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", str(10 ** 20)], "--seed must be in [0, 2**32)"),
])
def test_main_usage_errors_are_one_line(argv, match, capsys):
  with pytest.raises(SystemExit) as info:
    demo.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("jsta-demo: error: ") and match in lines[0], lines[0]


def test_help_shows_defaults(capsys):
  with pytest.raises(SystemExit) as info:
    demo.main(["--help"])
  assert info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--iters ITERS timed calls (>= 1) (default: 5)" in text
  assert "(default: auto)" in text


def test_slower_reason_names_the_cause():
  dense = demo.TINY.spec().with_window((3, 3, 3))
  assert demo.slower_reason(dense, "cpu").startswith("the window covers the whole volume")
  assert "at 261 tokens" in demo.slower_reason(demo.TINY.spec(), "cpu")
  assert "block-sparse gathers" in demo.slower_reason(demo.SMALL.spec(), "cpu")


def test_time_ms_alternates_and_repeats_fast_calls():
  calls = []
  fns = {"a": lambda x: calls.append("a") or x, "b": lambda x: calls.append("b") or x}
  times = demo.time_ms(fns, (1.0,), iters=2)
  assert set(times) == {"a", "b"} and all(t[0] >= 0 and t[1] >= 0 for t in times.values())
  # First calls and warm-ups, then rounds that alternate a's and b's samples.
  assert calls[:4] == ["a", "a", "b", "b"]
  assert calls.count("a") > 4 and calls.count("b") > 4
