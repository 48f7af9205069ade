"""Benchmark scripts in their CPU modes: they run, check against the reference and write JSON."""

import json

import jax
import numpy as np
from flax import nnx

from benchmarks import calibrated_sample, kernel_bench
from jsta.strategy import WindowStrategy
from models import train as train_lib
from models.video_dit import VideoDiT, video_dit_config


def test_kernel_bench_quick(tmp_path):
  kernel_bench.main(["--quick", "--backends", "xla", "--windows", "1,1,1;dense",
                     "--modes", "fwd,fwdbwd", "--warmup", "0", "--iters", "1",
                     "--check-rows", "64", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "kernel_bench.json").read_text())
  assert res["meta"]["jax"] == jax.__version__
  rows = res["results"]
  assert {(r["window_tokens"][0], r["mode"]) for r in rows} == {(2, "fwd"), (2, "fwdbwd"),
                                                               (6, "fwd"), (6, "fwdbwd")}
  for r in rows:
    assert "error" not in r and r["ms"] > 0
    if r["mode"] == "fwd":
      assert r["rel_l2_err"] < 1e-5
    else:
      assert r["finite"]
  sparse = next(r for r in rows if r["window"] == [1, 1, 1])
  assert abs(sparse["sparsity"] - (1 - 1 / 48)) < 1e-9


def test_calibrated_sample_tiny(tmp_path):
  cfg = video_dit_config("tiny", window=(1, 1, 1))
  ckpt = str(tmp_path / "ckpt.npz")
  model = VideoDiT(cfg, rngs=nnx.Rngs(0))
  # Zero-initialised output layers would make every velocity 0: perturb all parameters.
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
      x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  train_lib.save_checkpoint(ckpt, model)
  spec = cfg.spec((1, 1, 1))
  strategy = WindowStrategy.uniform(spec, cfg.depth, cfg.heads, window=(1, 1, 1))
  strategy.save(str(tmp_path / "strategy.json"))
  res = calibrated_sample.main(["--checkpoint", ckpt, "--strategy", str(tmp_path / "strategy.json"),
                                "--steps", "2", "--batch", "1", "--out", str(tmp_path)])
  # The same uniform window as the config: the calibrated and uniform samples agree.
  np.testing.assert_allclose(res["calibrated_rel_l2"], res["uniform_rel_l2"], rtol=1e-5)
  assert res["calibrated_rel_l2"] > 1e-4  # a 1x1x1 window of 2x2x2 tiles is not full attention
  assert res["calibrated_sparsity"] == res["uniform_sparsity"] > 0
  assert json.loads((tmp_path / "calibrated_sample.json").read_text())["steps"] == 2


def test_ncu_summary_ranks_sass_lines_per_kernel(tmp_path, capsys):
  """The Nsight Compute source-page summary: one section per kernel, stall reasons and lines
  ranked by their share of that kernel's samples (synthetic CSV in ncu's layout)."""
  from pallas_kernels import ncu_summary
  hdr = '"Address","Source","Warp Stall Sampling (All Samples)","stall_barrier","stall_long_sb"'
  csv_text = "\n".join([
      '"Kernel Name","fusion_a",', hdr, '"0x1","NOP","1","0","1"',
      '"Kernel Name","mosaic_kernel",', hdr,
      '"0x10","HGMMA.64x64x16","10","0","0"', '"0x20","WARPGROUP.DEPBAR.LE gsb0","30","30","0"',
      '"0x30","@!P2 BRA","60","0","60"'])
  path = tmp_path / "source.csv"
  path.write_text(csv_text + "\n")
  ncu_summary.source(str(path), top=2)
  out = capsys.readouterr().out
  assert "## fusion_a: 1 samples" in out and "## mosaic_kernel: 100 samples" in out
  lines = out[out.index("## mosaic_kernel"):].splitlines()
  assert "stall_long_sb" in lines[1] and "60.0%" in lines[1]
  ranked = [ln for ln in lines if ln.strip().startswith("line")]
  assert len(ranked) == 2 and "BRA" in ranked[0] and "DEPBAR" in ranked[1]
