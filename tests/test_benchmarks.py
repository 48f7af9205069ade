"""benchmarks/: the shared shapes, window parser, relative error and reference checks; the
benchmark scripts in their CPU modes (they run, check against the reference and write JSON);
the GPU benches and tools import, lower for CUDA and check in GPU interpret mode on the CPU."""

import importlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsta
from benchmarks import calibrated_sample, common, kernel_bench, shapes
from helpers import interpreted
from jsta.strategy import WindowStrategy
from models import train as train_lib
from models.video_dit import VideoDiT, video_dit_config


@pytest.mark.slow
def test_features_bench_quick(tmp_path):
  from benchmarks import features_bench
  features_bench.main(["--shape", "quick", "--backend", "xla", "--iters", "1", "--text-len", "5",
                       "--text-max-len", "16", "--kv-heads", "1", "--causal-window", "2",
                       "--rows", "16", "--only", "static", "text_lengths", "gqa",
                       "--out", str(tmp_path)])
  res = json.loads((tmp_path / "features_quick.json").read_text())
  assert [r["variant"] for r in res["results"]] == ["static", "text_lengths", "gqa"]
  for r in res["results"]:
    assert "error" not in r and r["fwd_ms"] > 0 and r["rel_l2_fwd"] < 1e-5


@pytest.mark.slow
def test_kernel_bench_quick(tmp_path):
  # fwd:qk_int8: xla has no 8-bit forward, so the mode adds no row.
  kernel_bench.main(["--quick", "--backends", "xla", "--windows", "1,1,1;dense",
                     "--modes", "fwd,fwdbwd,fwd:qk_int8", "--warmup", "0", "--iters", "1",
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
      assert r["finite"] and max(r["grad_rel_l2_err"]) < 1e-5
  sparse = next(r for r in rows if r["window"] == [1, 1, 1])
  assert abs(sparse["sparsity"] - (1 - 1 / 48)) < 1e-9
  for bad in ("fwd:int4", "fwd:default", "bwd"):
    with pytest.raises(SystemExit):
      kernel_bench.main(["--quick", "--modes", bad, "--out", str(tmp_path)])


def test_kernel_bench_registers_mosaic_option_backends(tmp_path):
  """--backends pallas_mosaic:F+G runs pallas_mosaic with its bool options F and G on (no_F:
  off), under that name; other bases, unknown or non-bool options are refused by the
  argument parser."""
  name = "pallas_mosaic:no_forward_192_keys+overlap_exp"
  kernel_bench.register_option_backend(name)
  impl = jsta.backends.get_backend(name)
  assert not impl.forward_192_keys and impl.overlap_exp and not impl.rescale_under_qk
  assert impl.bwd_early_loads            # the other options keep their defaults
  # Options whose default is "auto" take a bool the same way.
  kernel_bench.register_option_backend("pallas_mosaic:no_persistent")
  assert jsta.backends.get_backend("pallas_mosaic:no_persistent").persistent is False
  for bad in ("xla:overlap_exp", "pallas_mosaic:interpret", "pallas_mosaic:persistent_ctas",
              "pallas_mosaic:nope", "pallas_mosaic:no_nope", "pallas_mosaic:no_interpret"):
    with pytest.raises(SystemExit):
      kernel_bench.main(["--quick", "--backends", bad, "--out", str(tmp_path)])


def test_shapes_bench_quick_and_its_8bit_rows(tmp_path, capsys):
  """A CPU run of the shapes bench: checked fwd and fwd+bwd rows; the 8-bit precision gets a
  row that says why it was skipped (no 8-bit forward for float32 input on the CPU). The table
  shows the 8-bit columns when an 8-bit row ran."""
  from benchmarks import shapes_bench
  assert shapes_bench.main(["--shapes", "quick", "--warmup", "0", "--iters", "1",
                            "--check-rows", "16", "--no-cudnn", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "shapes_bench.json").read_text())["results"]
  by_mode = {(r["mode"], r.get("precision")): r for r in rows}
  assert by_mode[("fwd", None)]["rel_l2_err"] < 1e-5
  assert max(by_mode[("fwdbwd", None)]["grad_rel_l2_err"].values()) < 1e-5
  assert "8-bit forward" in by_mode[("fwd", "qk_int8")]["skipped"]
  assert "8-bit fwd ms" not in capsys.readouterr().out
  ran = dict(shape="s", backend="pallas_mosaic", mode="fwd", precision="qk_int8", ms=2.0,
             tflops=1.0, speedup_vs_bf16=1.5, rel_l2_err=0.012)
  text = shapes_bench.table([dict(shape="s", backend="pallas_mosaic", mode="fwd", ms=3.0,
                                  tflops=1.0, rel_l2_err=0.002), ran])
  assert "8-bit fwd ms" in text and "1.50" in text and "1.2e-02" in text
  with pytest.raises(SystemExit):
    shapes_bench.main(["--shapes", "quick", "--precisions", "default"])


def test_compile_bench_quick_xla(tmp_path, capsys):
  """Two fresh worker processes on one cache directory: the cold one compiles and writes, the
  warm one compiles nothing; phases, meta and the table are there."""
  from benchmarks import compile_bench
  rows = compile_bench.main(["--shape", "quick", "--impl", "xla", "--programs", "fwd",
                             "--runs", "cold,warm", "--out", str(tmp_path)])
  res = json.loads((tmp_path / "compile_bench.json").read_text())
  assert res["meta"]["jax"] == jax.__version__ and "commit" in res["meta"]
  assert res["results"] == rows and [r["run"] for r in rows] == ["cold", "warm"]
  cold, warm = rows
  assert cold["cache"] == dict(requests=1, hits=0, misses=1, writes=1)
  assert warm["cache"] == dict(requests=1, hits=1, misses=0, writes=0)
  assert cold["cache_dir"] == warm["cache_dir"]
  for r in rows:
    assert all(r[p] > 0 for p in compile_bench.PHASES) and r["process"] > r["first_call"]
    assert r["mosaic_kernels"] == 0 and r["stablehlo_bytes"] > 0
  out = capsys.readouterr().out
  assert "program  run" in out and "1/1/0/0" in out
  with pytest.raises(SystemExit, match="--runs takes a comma list"):
    compile_bench.main(["--runs", "hot"])
  # Kernel options reach the backend; they are refused for other implementations or unknown.
  from pallas_kernels.mosaic.backend import MosaicBackend
  assert compile_bench._implementation(
      "pallas_mosaic", None, compile_bench._backend_fields(["overlap_exp=True"])) == (
          MosaicBackend(overlap_exp=True))
  assert compile_bench._implementation("pallas_mosaic", None, {}) == "pallas_mosaic"
  with pytest.raises(SystemExit, match="only with --impl pallas_mosaic"):
    compile_bench.main(["--impl", "xla", "--set", "overlap_exp=True"])
  with pytest.raises(SystemExit, match="MosaicBackend field"):
    compile_bench.main(["--set", "no_such_field=1"])
  # The kernel count of a pallas_mosaic program (lowered for CUDA here).
  tiny = shapes.get("quick_bf16")
  x = jax.ShapeDtypeStruct(tiny.qkv_shape(), jnp.bfloat16)
  op = lambda q, k, v: jsta.sliding_tile_attention(
      q, k, v, tiny.spec(), implementation=MosaicBackend(device_check=False))
  text = jax.jit(op).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
  assert compile_bench.mosaic_kernel_count(text) == 1


def test_mosaic_compile_times_lowers_the_kernels_on_cpu(tmp_path):
  """Without a GPU the tool reports the lowering: the forward kernel, then the gradient's two
  (its forward kernel also stores o's rounding error for the backward: another module)."""
  from benchmarks.tools import mosaic_compile_times
  rows = mosaic_compile_times.main(["--shape", "quick_bf16", "--out", str(tmp_path)])
  assert [(r["program"], r["kernel"]) for r in rows] == [("fwd", 0), ("grad", 0), ("grad", 1)]
  assert len({r["fingerprint"] for r in rows}) == 3
  assert all(r["bytes"] > 10_000 and r["lines"] > 1000 and "compile_s" not in r for r in rows)
  saved = json.loads((tmp_path / "mosaic_compile_times.json").read_text())
  assert saved["results"] == rows and saved["meta"]["shape"]["name"] == "quick_bf16"


@pytest.mark.slow
def test_calibrated_sample_tiny(tmp_path):
  cfg = video_dit_config("tiny", window=(1, 1, 1))
  ckpt = str(tmp_path / "ckpt")
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
  from benchmarks.tools import ncu_summary
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


# ---- shared pieces ------------------------------------------------------------------------------
def test_shapes():
  assert set(shapes.SHAPES) == {"paper", "paper_text", "wan14b_720p", "wan1_3b_480p",
                                "hunyuan_544p", "image_2048", "paper_d64", "wan14b_720p_w311",
                                "tile128_720p", "quick", "quick_bf16"}
  for shape in shapes.SHAPES.values():
    spec = shape.spec()
    assert isinstance(spec, jsta.STASpec) and 0 < spec.sparsity() < 1
    assert shape.qkv_shape() == (shape.batch, spec.seq_len, shape.heads, shape.head_dim)
    assert shape.spec("dense").sparsity() == 0.0
    assert shape.name in shape.describe()
    if shape.name not in ("quick", "paper_d64"):
      assert (shape.head_dim, shape.dtype, shape.batch) == (128, "bfloat16", 1)
  # Beyond the table: the paper's FLOPs at head_dim 64, short key lists, 128-token tiles.
  from benchmarks import shapes_bench
  assert set(shapes_bench.BEYOND_TABLE) <= set(shapes.SHAPES)
  d64 = shapes.get("paper_d64")
  assert (d64.head_dim, d64.heads) == (64, 48) and d64.spec() == shapes.get("paper").spec()
  assert shapes.get("tile128_720p").spec().tile_size == 128
  assert shapes.get("wan14b_720p_w311").spec().window == (3, 1, 1)
  paper = shapes.get("paper")
  assert paper.spec().seq_len == paper.spec().video_len == 115_200
  assert paper.spec().sparsity() == pytest.approx(0.91)
  assert paper.spec((5, 5, 5)).window == (5, 5, 5)
  hy = shapes.get("hunyuan_544p").spec()
  assert (hy.text_len, hy.text_max_len) == (200, 256)
  assert hy.seq_len == hy.padded_video_len + 256
  assert shapes.get("wan14b_720p").spec().is_padded   # 45 rows of 8-row tiles
  assert shapes.get("image_2048").spec().rank == 2
  assert shapes.get("quick").dtype == "float32"
  with pytest.raises(ValueError, match="unknown shape 'nope'; known: paper"):
    shapes.get("nope")
  with pytest.raises(ValueError, match="'dense'"):
    paper.spec("full")


def test_parse_windows():
  assert common.parse_windows("3,3,3;5,5,5;dense") == [(3, 3, 3), (5, 5, 5), "dense"]
  assert common.parse_windows(" 7,7 ; ") == [(7, 7)]
  for bad in ("3x3x3", "3,3,a", "", ";"):
    with pytest.raises(ValueError, match="3,3,3;5,5,5"):
      common.parse_windows(bad)
  assert [common.window_name(w) for w in common.parse_windows("3,1,3;dense")] == ["3x1x3", "dense"]


def test_rel_l2():
  assert common.rel_l2([3.0, 4.0], [3.0, 4.0]) == 0.0
  assert common.rel_l2([0.0, 0.0], [0.0, 0.0]) == 0.0       # no division by zero
  assert common.rel_l2([3.0, 4.0], [0.0, 0.0]) == pytest.approx(5e30)
  assert common.rel_l2([1.0, 0.0], [0.0, 1.0]) == pytest.approx(np.sqrt(2))
  # float64 throughout: an error far below float32's resolution at 1.0 is still seen.
  assert common.rel_l2(np.array([1.0 + 1e-12]), np.array([1.0])) == pytest.approx(1e-12, rel=1e-3)
  assert common.rel_l2(jnp.ones(4, jnp.bfloat16), np.full(4, 1.01)) == pytest.approx(0.01 / 1.01)


def test_reference_checks_on_sampled_rows():
  """forward_error / grad_errors: small for the XLA backend, large for a wrong result; the
  gradient check sees dK/dV too (from the sampled rows alone), text padding included."""
  shape = shapes.BenchShape("t", (4, 8, 8), (2, 4, 4), (1, 3, 1), heads=2, head_dim=16,
                            text_len=5, text_max_len=8, dtype="float32")
  spec = shape.spec()
  q, k, v, do = common.random_inputs(shape)
  rows = common.sample_rows(spec, 24)
  assert len(rows) == 24 and jsta.token_valid(spec)[rows].all()
  assert (np.diff(rows) > 0).all()
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend="xla")
  assert common.forward_error(op(q, k, v), q, k, v, spec, rows, 0.25) < 1e-5
  assert common.forward_error(op(q, k, v) * 1.01, q, k, v, spec, rows, 0.25) > 5e-3
  grad = jax.jit(jax.grad(lambda q, k, v, do: jnp.vdot(op(q, k, v), do), argnums=(0, 1, 2)))
  errs = common.grad_errors(lambda d: grad(q, k, v, d), q, k, v, do, spec, rows, 0.25)
  assert max(errs) < 1e-5
  # The reference's rows in chunks (of 10: the last one short) add up to the same gradients.
  chunked = common.grad_errors(lambda d: grad(q, k, v, d), q, k, v, do, spec, rows, 0.25,
                               chunk=10)
  np.testing.assert_allclose(chunked, errs, atol=1e-6)
  wrong = lambda d: (lambda g: (g[0], g[1] * 1.01, g[2]))(grad(q, k, v, d))
  errs = common.grad_errors(wrong, q, k, v, do, spec, rows, 0.25)
  assert errs[0] < 1e-5 and errs[1] > 5e-3 and errs[2] < 1e-5


def test_record_rewrites_its_file(tmp_path, capsys):
  rec = common.Record(str(tmp_path / "sub" / "r.json"), common.run_meta(shapes.get("quick")))
  rec.add(dict(name="a", ms=1.0, ms_all=[1.0]))
  saved = json.loads((tmp_path / "sub" / "r.json").read_text())
  assert saved["meta"]["jax"] == jax.__version__ and saved["meta"]["shape"]["name"] == "quick"
  assert saved["results"][0]["name"] == "a" and saved["results"][0]["wall"] > 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"name": "a", "ms": 1.0}
  row = common.timed(lambda x: x + 1, jnp.ones(3), flops=2e9, warmup=0, iters=3)
  assert len(row["ms_all"]) >= 3 and row["tflops"] == pytest.approx(2 / row["ms"])
  # A call of microseconds repeats until its calls add up to MIN_TIMED_MS (or 200 calls).
  assert sum(row["ms_all"]) >= common.MIN_TIMED_MS or len(row["ms_all"]) == 200


def test_load_trace_phases_and_windows(tmp_path, capsys):
  from benchmarks.tools import load_trace
  # Windows: a median per window_ms of calls, stamped with the time since the phase began.
  calls = [(100.0 + 0.1 * i, 100.0 + i) for i in range(1, 11)]   # 10 calls of 100 ms + i
  rows = load_trace.windows(calls, 300.0)
  assert [n for _, _, n in rows] == [3, 3, 3, 1]
  assert rows[0][1] == 102.0 and rows[-1][1] == 110.0
  assert load_trace.windows([], 300.0) == []
  out = tmp_path / "t.json"
  assert load_trace.main(["--shape", "quick", "--seconds", "0.2", "--heat-seconds", "0.1",
                          "--idle", "0", "--window-ms", "100", "--out", str(out)]) == 0
  saved = json.loads(out.read_text())
  assert [p["name"] for p in saved["phases"]] == ["jsta", "cudnn_dense", "jsta_after_dense"]
  assert all(len(p["calls"]) >= 1 and all(ms > 0 for _, ms in p["calls"])
             for p in saved["phases"])
  assert "| jsta_after_dense |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    load_trace.main(["--seconds", "0"])


# ---- GPU benches and tools on the CPU -----------------------------------------------------------
@pytest.mark.parametrize("name", ["benchmarks.kernels.mosaic", "benchmarks.tools.clock_log",
                                  "benchmarks.tools.ncu_summary", "benchmarks.tools.profile_step",
                                  "benchmarks.e2e_bench", "benchmarks.scaling_bench"])
def test_gpu_benches_import_on_cpu(name):
  mod = importlib.import_module(name)
  assert mod.__doc__


def test_profile_step_sets_backend_fields():
  from benchmarks.tools.profile_step import backend_with_fields
  impl = backend_with_fields(["overlap_exp=True", "auto_barriers=False",
                              "backward_variant=split"])
  assert (impl.overlap_exp, impl.auto_barriers, impl.backward_variant) == (True, False, "split")
  with pytest.raises(SystemExit, match="MosaicBackend field"):
    backend_with_fields(["no_such_field=1"])


def test_profile_step_takes_an_8bit_precision_for_the_forward_only(capsys):
  from benchmarks.tools.profile_step import main
  with pytest.raises(SystemExit):
    main(["--precision", "fp8"])                       # the default mode is fwd+bwd
  assert "give --mode fwd" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["--mode", "fwd", "--precision", "int4"])
  assert "invalid choice" in capsys.readouterr().err


TINY_BF16 = shapes.BenchShape("tiny", (2, 8, 16), (1, 8, 8), (1, 1, 1), heads=1)


@pytest.mark.slow
def test_mosaic_bench_cases_lower_for_cuda(monkeypatch):
  """Every call the Mosaic bench times lowers for CUDA (the whole Mosaic GPU pipeline, no GPU
  needed: the backend's device check is off), with the kernels each should hold."""
  from benchmarks.kernels import mosaic
  from pallas_kernels.mosaic import backend as mosaic_backend
  monkeypatch.setattr(mosaic_backend, "check_device", lambda: None)
  x = mosaic.make_inputs(TINY_BF16, None, 16, forward=jsta.xla_backend.forward)
  cases = (mosaic.forward_cases(x, ["default", "kv64", "sb", "masked", "noab", "ox+noab"])
           + mosaic.backward_cases(x, ["fused", "split", "fused_hoisted_descriptors",
                                       "fused_auto_barriers", "fused_2026_12_04", "split_lean",
                                       "fused_writer", "fused_frag"],
                                   [2])
           + mosaic.op_cases(x, ["fused", "split"]) + mosaic.glue_cases(x))
  from benchmarks.tools.mosaic_fingerprint import captured_fingerprints
  kernels, modules = {}, {}
  for c in cases:
    # A case's kernels by fingerprint: the lowered text differs between any two lowerings.
    with captured_fingerprints() as found:
      text = c.fn.trace(*c.args).lower(lowering_platforms=("cuda",)).as_text()
    modules[c.name] = tuple(found)
    kernels[c.name] = text.count("stablehlo.custom_call @mosaic_gpu")
  # The tiny spec has no padded key: forcing the key-mask path compiles another kernel.
  assert not x.sched.has_masked_keys
  assert modules["fwd masked"] != modules["fwd default"]
  assert modules["fwd sb"] != modules["fwd default"]
  # The fused backward with hoisted descriptors is another kernel, with automatic barriers
  # another, with both another again; so is the forward without them.
  assert len({modules["bwd fused_hoisted_descriptors s2"], modules["bwd fused s2"],
              modules["bwd fused_auto_barriers s2"], modules["bwd fused_2026_12_04 s2"]}) == 4
  assert len({modules["fwd noab"], modules["fwd default"], modules["fwd ox+noab"]}) == 3
  assert modules["bwd split_lean s2"] != modules["bwd split s2"]
  assert modules["bwd fused_writer s2"] != modules["bwd fused s2"]
  assert modules["bwd fused_frag s2"] != modules["bwd fused s2"]
  assert kernels == {
      "fwd default": 1, "fwd kv64": 1, "fwd sb": 1, "fwd masked": 1, "fwd noab": 1,
      "fwd ox+noab": 1,
      "bwd fused s2": 1, "bwd split s2": 2, "bwd fused_hoisted_descriptors s2": 1,
      "bwd fused_auto_barriers s2": 1, "bwd fused_2026_12_04 s2": 1, "bwd split_lean s2": 2,
      "bwd fused_writer s2": 1, "bwd fused_frag s2": 1,
      "bwd split: dQ kernel": 1,
      "bwd split: dK/dV kernel": 1,
      "op fwd+bwd fused": 2, "op fwd+bwd split": 3, "op fwd": 1,
      "glue: fused kernel + zero fill": 1, "glue: delta einsum": 0, "glue: dQ zero fill": 0,
      "glue: dQ scale + cast": 0, "glue: dQ from fragments + scale + cast": 0}
  cfg = mosaic.fwd_config("kv64+s3+nosb", x.config, 128)
  assert (cfg.block_kv, cfg.max_concurrent_steps, cfg.use_schedule_barrier) == (64, 3, False)
  assert mosaic.fwd_config("sb", x.config, 128).use_schedule_barrier
  assert not x.config.use_schedule_barrier
  assert mosaic.fwd_config("blocks", x.config, 128).key_steps == "blocks"
  assert mosaic.fwd_config("gathered+s3", x.config, 128).key_steps == "gathered"
  assert mosaic.split_forced("partial+blocks+masked") == ("blocks", {"masked", "partial"})
  assert mosaic.split_forced("masked") == ("default", {"masked"})
  assert mosaic.split_forced("same_keys+blocks") == ("blocks", {"same_keys"})
  # The ablation's steps: the item's first key block (gathered: first two units) throughout.
  kv = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(mosaic.same_keys(kv, gather=False),
                                np.repeat(np.asarray(kv)[..., :1], 4, axis=-1))
  np.testing.assert_array_equal(mosaic.same_keys(kv, gather=True),
                                np.tile(np.asarray(kv)[..., :2], (1, 1, 2)))
  assert mosaic.variant_config("split", x.config).backward_variant == "split"
  cfg = mosaic.variant_config("fused", x.config)
  assert (cfg.backward_variant, cfg.bwd_step_descriptors, cfg.fused_bwd_auto_barriers) == (
      "fused", True, False)
  cfg = mosaic.variant_config("fused_2026_12_04", x.config)
  assert (cfg.backward_variant, cfg.bwd_step_descriptors, cfg.fused_bwd_auto_barriers) == (
      "fused", False, True)
  assert not mosaic.fwd_config("noab", x.config, 128).auto_barriers
  assert mosaic.fwd_config("ox", x.config, 128).overlap_exp
  # masked_steps_apart is the backend's default; 'together' turns it off, and the options it
  # does not combine with turn it off by themselves.
  assert x.config.masked_steps_apart
  assert not mosaic.fwd_config("together", x.config, 128).masked_steps_apart
  for token in ("pers", "rq", "ox+rq"):
    assert not mosaic.fwd_config(token, x.config, 128).masked_steps_apart
  assert not mosaic.variant_config("lean", x.config).masked_steps_apart
  assert mosaic.fwd_config("fma32", x.config, 128).exp2_fma_columns == 32
  cfg = mosaic.fwd_config("window+long4", x.config, 128)
  assert (cfg.launch_order, cfg.long_items_first) == ("window", 4.0)
  assert (x.config.launch_order, x.config.long_items_first) == ("sequence", 2.0)
  cfg = mosaic.variant_config("fused_window", x.config)
  assert (cfg.backward_variant, cfg.launch_order, cfg.long_items_first) == ("fused", "window", 4)
  assert mosaic.variant_config("fused_long4", x.config).launch_order == "sequence"
  with pytest.raises(ValueError, match="unknown backward variant"):
    mosaic.variant_config("fused+fast", x.config)
  with pytest.raises(ValueError, match="unknown forward config part"):
    mosaic.fwd_config("fast", x.config, 128)


def test_pv_quantization_error_emulates_the_recipes(capsys):
  """The 8-bit P V emulation: with exact quantizers its online softmax is attention; on random
  inputs bf16 P V is ~2e-3, the int8 Q K^T recipe ~1.2e-2 (the op's qk_int8 measures 1.2e-2),
  e4m3 P V ~3.7e-2 (the op's fp8 5.4e-2 adds e4m3 Q K^T), and int8 P V (P scaled per row and
  key step) under half of e4m3's: with int8 Q K^T under 3e-2. P relative to a running
  reference (one accumulator over all steps, shifted by whole powers of two) is attention
  without P's rounding, and with it worse than per-step int8 P, worse than e4m3 P V too."""
  from benchmarks.tools import pv_quantization_error as pvq
  rng = np.random.default_rng(1)
  s, v = rng.standard_normal((8, 300)), rng.standard_normal((300, 16))
  p = np.exp(s - s.max(axis=1, keepdims=True))
  exact = lambda x: x
  np.testing.assert_allclose(pvq.online_attention(s, v, exact, exact),
                             (p @ v) / p.sum(axis=1, keepdims=True), rtol=1e-12)
  got = pvq.errors(queries=64, keys=2048, head_dim=64)
  assert got["bf16 P V"] < 4e-3
  assert 8e-3 < got["int8 QK, bf16 P V"] < 1.6e-2
  assert 3e-2 < got["e4m3 P V"] < 5e-2 and 3e-2 < got["int8 QK, e4m3 P V"] < 5e-2
  assert got["int8 P V"] < got["e4m3 P V"] / 2
  assert got["int8 QK, int8 P V"] < 3e-2
  assert got["running int8 P V"] > got["e4m3 P V"] > got["int8 P V"]
  # Without P's rounding (2^40 levels) the running reference and its shifts are exact.
  s_big = 3.0 * rng.standard_normal((8, 600))          # running maxima that rise late
  p_big = np.exp(s_big - s_big.max(axis=1, keepdims=True))
  v_big = rng.standard_normal((600, 16))
  monkey = pytest.MonkeyPatch()
  monkey.setattr(pvq, "LEVELS", 2.0 ** 40)
  try:
    np.testing.assert_allclose(pvq.running_int8_attention(s_big, v_big, v_quant=exact),
                               (p_big @ v_big) / p_big.sum(axis=1, keepdims=True),
                               rtol=1e-9, atol=1e-9)
  finally:
    monkey.undo()
  assert pvq.main(["--queries", "8", "--keys", "256", "--head-dim", "16"]).keys() == got.keys()
  assert "int8 QK, int8 P V" in capsys.readouterr().out
  for bad in (["--keys", "0"], ["--logit-std", "0"]):
    with pytest.raises(SystemExit):
      pvq.main(bad)


@pytest.mark.slow
def test_mosaic_bench_spread_text_ablation(monkeypatch):
  """The backward ablation 'fused+spread_text': the text pieces of each video key block become
  video pieces that block does not stream (distinct, in its scheduled part only), a text key
  block keeps its list; the case lowers for CUDA to the fused kernel alone, on key blocks and
  on gathered work items; the op section and shapes without text leave it out; the variant
  part must be a known variant."""
  from benchmarks.kernels import mosaic
  from pallas_kernels.mosaic import backend as mosaic_backend
  index = np.array([[[0, 1, 4, 5], [2, 4, 5, 5], [0, 1, 2, 3]]], np.int32)
  count = np.array([[4, 3, 4]], np.int32)
  got = mosaic.spread_text_pieces(index, count, video_pieces=4)
  np.testing.assert_array_equal(got[0, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(got[0, 1], [2, 1, 3, 5])     # the unscheduled tail as it was
  np.testing.assert_array_equal(got[0, 2], index[0, 2])
  text_block = np.array([[[0, 1, 2, 3, 4]]], np.int32)      # streams every piece: unchanged
  np.testing.assert_array_equal(mosaic.spread_text_pieces(text_block, np.array([[5]]), 4),
                                text_block)
  assert mosaic.split_ablation("fused+spread_text") == ("fused", True)
  assert mosaic.variant_config("fused+spread_text", mosaic.config_lib.MosaicConfig()
                               ).backward_variant == "fused"
  with pytest.raises(ValueError, match="unknown backward variant"):
    mosaic.variant_config("fused+spread", mosaic.config_lib.MosaicConfig())
  monkeypatch.setattr(mosaic_backend, "check_device", lambda: None)
  text = shapes.BenchShape("tiny_text", (2, 8, 16), (1, 8, 8), (1, 1, 1), heads=1, text_len=40,
                           text_max_len=64)
  x = mosaic.make_inputs(text, None, 16, forward=jsta.xla_backend.forward)
  cases = mosaic.backward_cases(x, ["fused", "fused+spread_text"], [2])
  assert [c.name for c in cases] == ["bwd fused s2", "bwd fused+spread_text s2"]
  text_ops = mosaic.backend_lib.backward_operands(x.sched, x.config)[0]
  video_pieces = text.spec().padded_video_len // 64
  assert (np.asarray(text_ops.piece_index) >= video_pieces).any()
  lowered = cases[1].fn.trace(*cases[1].args).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered.count("stablehlo.custom_call @mosaic_gpu") == 1
  assert [c.name for c in mosaic.op_cases(x, ["fused+spread_text"])] == ["op fwd"]
  # Gathered dK/dV work items (192-token tiles paired across tiles): the same ablation.
  paired = shapes.BenchShape("tiny_paired", (6, 8, 16), (3, 8, 8), (3, 1, 1), heads=1,
                             text_len=20, text_max_len=64)
  xp = mosaic.make_inputs(paired, None, 16, forward=jsta.xla_backend.forward)
  assert mosaic.backend_lib.backward_operands(xp.sched, xp.config)[3]        # gathered
  (case,) = mosaic.backward_cases(xp, ["fused+spread_text"], [2])
  lowered = case.fn.trace(*case.args).lower(lowering_platforms=("cuda",)).as_text()
  assert lowered.count("stablehlo.custom_call @mosaic_gpu") == 1
  plain = mosaic.make_inputs(TINY_BF16, None, 16, forward=jsta.xla_backend.forward)
  assert mosaic.backward_cases(plain, ["fused+spread_text"], [2]) == []


def test_mosaic_bench_glue_checks_are_exact_for_the_scale_and_cast():
  """The glue's dQ scale and cast (rows, and the fragments' order) against float64 NumPy with
  the scale the programs use (float32): equal to the last bit of the bf16 output, so the 1e-5
  bound cannot fail on rounding ties (as with the float64 scale at wan14b_720p_w311)."""
  from benchmarks.kernels import mosaic
  # A million checked values: with the float64 scale some 16 of them flip a bf16 rounding.
  shape = shapes.BenchShape("glue", (4, 16, 16), (1, 8, 8), (1, 1, 1), heads=8)
  x = mosaic.make_inputs(shape, None, 1024, forward=jsta.xla_backend.forward)
  assert len(x.rows) == 1024
  cases = {c.name: c for c in mosaic.glue_cases(x)}
  for name in ("glue: dQ scale + cast", "glue: dQ from fragments + scale + cast"):
    row = cases[name].check()
    assert row["ok"] and row["rel_l2_err"] == 0.0, (name, row)


@pytest.mark.slow
def test_mosaic_bench_checks_in_interpret_mode(capsys):
  """The bench's reference checks on the Mosaic kernels, in GPU interpret mode on the CPU: the
  forward, and the fused kernel alone with the glue's zero fill, scale and cast around it."""
  from benchmarks.kernels import mosaic
  x = mosaic.make_inputs(TINY_BF16, None, 16, interpret=True)
  rec = common.Record(None, {})
  cases = (mosaic.forward_cases(x, ["default", "masked+partial"], interpret=True)
           + mosaic.glue_cases(x))
  for c in cases:
    mosaic.run_case(c, rec, warmup=0, iters=1, extra=dict(window="1x1x1"))
  rows = {r["name"]: r for r in rec.rows}
  assert not any("error" in r for r in rec.rows), rec.rows
  assert all(r["ok"] for r in rec.rows)
  assert 1e-4 < rows["fwd default"]["rel_l2_err"] < 1e-2     # bf16 against float32
  # Both paths compiled in, no step flagged: the same result.
  assert rows["fwd masked+partial"]["rel_l2_err"] == pytest.approx(rows["fwd default"]["rel_l2_err"],
                                                                   rel=1e-3)
  assert 1e-4 < max(rows["glue: fused kernel + zero fill"]["grad_rel_l2_err"]) < 1e-2
  assert "| 1x1x1 | fwd default |" in mosaic.table(rec.rows)


def test_clock_log_summary_splits_at_row_stamps(tmp_path, capsys):
  from benchmarks.tools import clock_log
  log = tmp_path / "clk.csv"
  log.write_text("".join(f"2026/11/23 10:00:0{i}.000, {1980 - 100 * i}, 2619, {300 + i}, 50, 0x0\n"
                         for i in range(6)))
  t = lambda s: __import__("datetime").datetime(2026, 11, 23, 10, 0, s).timestamp()
  bench = tmp_path / "bench.json"
  bench.write_text(json.dumps({"meta": {}, "results": [
      {"backend": "xla", "window": [3, 3, 3], "mode": "fwd", "ms": 2.0, "wall": t(2)},
      # Timed calls of 1.5 s in all before the stamp at 5 s: the samples at 4 and 5 s.
      {"name": "op fwd", "window": "3x3x3", "ms": 3.0, "ms_all": [500.0, 1000.0],
       "wall": t(5)}]}))
  clock_log.summary(str(log), str(bench))
  out = capsys.readouterr().out.splitlines()
  assert out[2].startswith("| xla [3, 3, 3] fwd | 2.0 | 1880 / 1780 | 301 |")
  assert out[2].endswith("| - | - |")                    # no ms_all: no timed window
  assert out[3].startswith("| op fwd 3x3x3 | 3.0 | 1580 / 1480 | 304 |")
  # Timed: clocks 1580 and 1480 (median 1530), power 304 and 305; 3.0 ms x 1530 MHz.
  assert out[3].endswith("| 1530 / 304 | 4.59 |")
  # Samples of 2 calls: 1.5 s of samples are 3 s of calls, the log's samples at 2-5 s
  # (clocks 1780, 1680, 1580, 1480: median 1630).
  bench.write_text(json.dumps({"meta": {}, "results": [
      {"name": "op fwd", "window": "5x5x5", "ms": 3.0, "ms_all": [500.0, 1000.0],
       "calls_per_sample": 2, "wall": t(5)}]}))
  clock_log.summary(str(log), str(bench))
  out = capsys.readouterr().out.splitlines()
  assert out[2].endswith("| 1630 / 304 | 4.89 |")


def test_clock_log_runs_the_command_without_nvidia_smi(tmp_path, monkeypatch, capsys):
  """Where nvidia-smi is missing the command still runs, with its exit status, unsampled."""
  from benchmarks.tools import clock_log
  monkeypatch.setenv("PATH", str(tmp_path))             # no nvidia-smi on it
  out = tmp_path / "ran"
  script = f"open({str(out)!r}, 'w').close(); raise SystemExit(3)"
  rc = clock_log.run(str(tmp_path / "clk.csv"), [sys.executable, "-c", script])
  assert rc == 3 and out.exists() and (tmp_path / "clk.csv").read_text() == ""
  assert "no nvidia-smi" in capsys.readouterr().err


def test_short_calls_are_timed_until_the_minimum_total():
  from jsta.timing import timed_calls_ms
  calls = []
  fn = lambda: calls.append(1) or jax.numpy.zeros(())
  assert len(timed_calls_ms(fn, warmup=1, iters=3)) == 3
  times = timed_calls_ms(fn, warmup=0, iters=3, min_total_ms=1e9, max_iters=17)
  assert len(times) == 17 and len(calls) == 1 + 3 + 17


def test_short_calls_are_sampled_several_at_a_time():
  """With min_sample_ms, a sample is as many back-to-back calls as last that long at the
  warm-up's speed, synchronised once; the times are per call."""
  from jsta.timing import timed_samples_ms
  calls, syncs = [], []

  class Result:
    def block_until_ready(self):
      syncs.append(len(calls))
      return self

  def fn():                                     # 2 ms a call
    calls.append(1)
    time.sleep(0.002)
    return Result()

  times, per_sample = timed_samples_ms(fn, warmup=2, iters=3, min_sample_ms=10.0)
  # ceil(10 ms / the warm-up's time a call): 5-6 at 2 ms; a loaded machine oversleeps.
  assert 2 <= per_sample <= 6
  assert len(times) == 3 and len(calls) == 2 + 3 * per_sample
  assert len(syncs) == 2 + 3                    # one synchronisation a warm-up call, a sample
  assert all(1.9 < t < 6.0 for t in times)      # milliseconds per call, not per sample
  # Calls as long as the sample or longer are timed one at a time.
  slow = lambda: (time.sleep(0.012), jax.numpy.zeros(()))[1]
  assert timed_samples_ms(slow, warmup=1, iters=2, min_sample_ms=10.0)[1] == 1
  # min_total_ms counts calls, not samples: 3 samples of 5-6 calls pass 20 ms.
  calls.clear()
  times, per_sample = timed_samples_ms(fn, warmup=1, iters=1, min_sample_ms=10.0,
                                       min_total_ms=20.0)
  assert len(times) * per_sample * 2.0 >= 20.0 and len(times) <= 3


def test_warmup_goes_on_until_its_minimum_total():
  """Warm-up calls continue past ``warmup`` until they add up to ``warmup_ms`` (so a GPU is
  timed at its sustained clock), capped by ``max_iters``; none of them is timed."""
  import time as time_lib

  from benchmarks import common
  from jsta.timing import timed_calls_ms
  calls = []

  def fn():
    calls.append(1)
    time_lib.sleep(0.002)
    return jax.numpy.zeros(())

  # Compiled before: else the first call's compile alone can exceed warmup_ms (this test run
  # alone, in a fresh process).
  jax.block_until_ready(jax.numpy.zeros(()))
  times = timed_calls_ms(fn, warmup=1, iters=2, warmup_ms=20.0)
  assert len(times) == 2 and 2 + 5 <= len(calls) <= 2 + 11   # >= 5 calls of >= 2 ms warm up
  calls.clear()
  timed_calls_ms(fn, warmup=0, iters=1, warmup_ms=1e9, max_iters=4)
  assert len(calls) == 4 + 1
  assert common.warmup_ms() == (common.GPU_WARMUP_MS if jax.default_backend() == "gpu" else 0.0)


def test_warmup_goes_on_until_the_call_time_settles():
  """With ``settle``, warm-up goes on in windows until a window's median call is within
  ``settle`` of the window's before (a device that speeds up for a while after idling), and
  stops at ``max_warmup_ms`` if it never settles; none of the warm-up calls is timed."""
  import time as time_lib

  from benchmarks import common
  from jsta.timing import timed_calls_ms
  durations = iter([0.008, 0.007, 0.006, 0.005, 0.004] + [0.002] * 1000)
  calls = []

  def speeding_up():
    calls.append(next(durations))
    time_lib.sleep(calls[-1])
    return jax.numpy.zeros(())

  times = timed_calls_ms(speeding_up, warmup=1, iters=3, settle=0.3, settle_window_ms=5.0,
                         max_warmup_ms=1e9)
  # Windows of at least 3 calls and 5 ms: the slow start is warm-up; two windows of 2 ms
  # calls end it, so the timed calls (the last three) are all of the settled speed. (Their
  # sleeps, not their measured times: a loaded machine stretches sleeps, by more than 75% in
  # a median of three once; a timed call cannot be shorter than its sleep.)
  assert len(times) == 3 and calls[-3:] == [0.002] * 3 and min(times) >= 2.0, (times, calls)
  assert 1 + 6 <= len(calls) - 3 <= 1 + 12
  calls.clear()

  def alternating(state=[0]):
    state[0] += 1
    time_lib.sleep(0.001 if state[0] % 6 < 3 else 0.004)
    return jax.numpy.zeros(())

  start = time_lib.perf_counter()
  timed_calls_ms(alternating, warmup=0, iters=1, settle=0.01, settle_window_ms=2.0,
                 max_warmup_ms=60.0)
  assert (time_lib.perf_counter() - start) * 1e3 < 60.0 + 40.0   # capped
  assert common.settle_kwargs()["warmup_ms"] == common.warmup_ms()


@pytest.mark.slow
def test_mosaic_fingerprints_count_the_kernels_and_repeat():
  """One module for the forward, two for the fused gradient (forward + fused backward), three
  for the split one; the same code gives the same fingerprints."""
  from benchmarks.tools import mosaic_fingerprint as fp
  specs = {"unpadded": fp.SPECS["unpadded"]}
  got = {name: fp.module_fingerprints(fn, *args)
         for name, fn, args in fp.cases(specs, head_dims=(128,))}
  assert [len(got[n]) for n in ("unpadded d128 fwd", "unpadded d128 auto grad",
                                "unpadded d128 split grad")] == [1, 2, 3]
  again = {name: fp.module_fingerprints(fn, *args)
           for name, fn, args in fp.cases(specs, head_dims=(128,))}
  assert got == again


@pytest.mark.slow
def test_fp8_sample_tiny(tmp_path, monkeypatch):
  """The comparison's plumbing on a CPU, with a backend whose FP8 forward is the xla forward
  (so the FP8 sample equals the bf16 one exactly)."""
  import dataclasses as dc
  from benchmarks import fp8_sample
  from jsta.ops import XlaBackend

  @dc.dataclass(frozen=True)
  class Fake(XlaBackend):
    name: str = "fake_fp8"

    def forward_quantized(self, q, k, v, sched, scale, key_valid=None, *, precision):
      return self.forward(q, k, v, sched, scale, key_valid)

  res = fp8_sample.run("tiny", steps=2, batch=1, depth=1, backend=Fake(), iters=1,
                       precisions=("fp8",))
  err = res["rel_l2"]
  assert err["fp8_vs_bf16"] == 0.0 and "qk_int8_vs_bf16" not in err
  assert 0.0 < err["bf16_vs_float32"] < 0.1 and err["fp8_vs_float32"] == err["bf16_vs_float32"]
  assert res["depth"] == 1
  assert res["step_ms"]["bf16"] > 0 and set(res["step_speedup"]) == {"fp8"}
  # The command line writes the JSON (the fake cannot be named there: "auto" has no FP8
  # forward on a CPU, which the command reports as the op's ValueError).
  with pytest.raises(ValueError, match="8-bit forward"):
    fp8_sample.main(["--preset", "tiny", "--steps", "1", "--iters", "1", "--out",
                     str(tmp_path)])


def test_test_shards_split_the_suite_disjointly():
  """JSTA_TEST_SHARD=i/n (tests/conftest.py): every test id lands in exactly one of the n
  shares, the shares are of similar size, and a bad value is refused naming the variable."""
  import conftest
  ids = [f"tests/test_attention.py::test_matches_reference[case{i}]" for i in range(400)]
  for n in (2, 3):
    shares = [[t for t in ids if conftest.in_shard(t, (i, n))] for i in range(1, n + 1)]
    assert sorted(sum(shares, [])) == sorted(ids)
    assert min(map(len, shares)) > 0.7 * len(ids) / n
  assert conftest.parse_shard(None) is None and conftest.parse_shard("2/3") == (2, 3)
  for bad in ("0/2", "3/2", "1", "a/b"):
    with pytest.raises(ValueError, match="JSTA_TEST_SHARD"):
      conftest.parse_shard(bad)


def test_slow_tests_run_with_the_option_or_the_variable(monkeypatch):
  """The slow tier (tests/conftest.py): off by default, on with --slow or JSTA_SLOW_TESTS=1,
  and a value of the variable other than 0 or 1 is refused naming it."""
  import conftest

  class Config:
    def __init__(self, slow):
      self.slow = slow

    def getoption(self, name):
      assert name == "--slow"
      return self.slow

  monkeypatch.delenv("JSTA_SLOW_TESTS", raising=False)
  assert not conftest.run_slow(Config(False)) and conftest.run_slow(Config(True))
  for value, want in (("0", False), ("1", True), ("", False)):
    monkeypatch.setenv("JSTA_SLOW_TESTS", value)
    assert conftest.run_slow(Config(False)) == want
  monkeypatch.setenv("JSTA_SLOW_TESTS", "yes")
  with pytest.raises(pytest.UsageError, match="JSTA_SLOW_TESTS"):
    conftest.run_slow(Config(False))


@pytest.mark.slow
def test_fp8_bench_kernel_only_lowers_for_cuda():
  """benchmarks.fp8_bench's kernel-only rows (quantized inputs, the 8-bit kernel alone) lower
  for CUDA for every recipe (its other rows go through the op, tested elsewhere)."""
  from benchmarks import fp8_bench
  spec = TINY_BF16.spec()
  sched = jsta.block_schedule(spec, 1, 128, 128, mask_unit=64)
  x = jnp.ones((1, sched.seq_len, 1, 128), jnp.bfloat16)
  for name, recipe in fp8_bench.RECIPES.items():
    fn, args = fp8_bench.kernel_only(x, x, x, sched, 128 ** -0.5, recipe)
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1, name


@pytest.mark.cpu_only
@pytest.mark.parametrize("recipe_name", ["int8 QK, bf16 PV (default)", "int8 QK, e4m3 PV"])
def test_fp8_bench_kernel_only_computes_the_ops_output(recipe_name):
  """The kernel-only row runs the kernel on the op's own inputs: with bf16 P V its V scales
  are ones (V is not quantized), so its output is the op's bit for bit (GPU interpret mode)."""
  from benchmarks import fp8_bench
  from pallas_kernels.mosaic import fp8
  recipe = fp8_bench.RECIPES[recipe_name]
  spec = TINY_BF16.spec()
  sched = jsta.block_schedule(spec, 1, 128, 128, mask_unit=64)
  q, k, v = jax.random.normal(jax.random.key(3), (3, 1, sched.seq_len, 1, 128), jnp.bfloat16)
  config = fp8.default_config(128, recipe, interpret=True)
  fn, args = fp8_bench.kernel_only(q, k, v, sched, 128 ** -0.5, recipe, config=config)
  o_kernel, _ = interpreted(fn, *args)
  o_op, _ = interpreted(fp8.fp8_forward, q, k, v, sched, 128 ** -0.5, config=config,
                        recipe=recipe)
  np.testing.assert_array_equal(np.asarray(o_kernel, np.float32), np.asarray(o_op, np.float32))
  assert float(jnp.abs(o_op.astype(jnp.float32)).max()) > 0.05


def test_fp8_bench_kernels_only_rounds(monkeypatch, tmp_path):
  """--kernels-only --rounds: the bf16 forward and each recipe's kernel alone, with the
  options for the chosen recipes, every case once per round in the same order, built and
  checked once (in the first round), and each row's speed against its own round's bf16 row.
  The kernels and the timer are stand-ins: what is tested is the bench's bookkeeping."""
  from benchmarks import fp8_bench
  from pallas_kernels.mosaic import backend as mosaic_backend
  built, checked = [], []
  times = iter(float(t) for t in range(10, 100))

  def fake_kernel_only(q, k, v, sched, scale, recipe, config=None):
    built.append((recipe, None if config is None else config.exp2_fma_columns))
    return (lambda *a: (a[0],)), (q,)

  def fake_timed(fn, *args, flops=0.0, warmup=2, iters=5):
    ms = next(times)
    return dict(ms=ms, ms_all=[ms], tflops=flops / ms / 1e9)

  def fake_errors(out, ref, rows):
    checked.append(out.shape)
    return dict(rel_l2_err=0.0)

  monkeypatch.setattr(fp8_bench, "kernel_only", fake_kernel_only)
  monkeypatch.setattr(fp8_bench, "timed", fake_timed)
  monkeypatch.setattr(fp8_bench, "row_errors", fake_errors)
  monkeypatch.setattr(mosaic_backend, "forward", lambda q, k, v, *a, **kw: (q,))
  record = common.Record(str(tmp_path / "fp8_bench.json"), {})
  qk_int8 = fp8_bench.RECIPE_NAMES["qk_int8"]
  rows = fp8_bench.run(TINY_BF16, 8, 1, 1, record, cudnn=False,
                       options=fp8_bench.parse_options("fma32"), option_recipes=(qk_int8,),
                       kernels_only=True, rounds=2)
  names = [f"{n}, kernel only" for n in fp8_bench.RECIPES]
  names.insert(1, f"{qk_int8}, fma32, kernel only")
  names.insert(0, "bf16 pallas_mosaic")
  assert [r["variant"] for r in rows] == names * 2
  assert [r["round"] for r in rows] == [0] * len(names) + [1] * len(names)
  assert len(built) == len(fp8_bench.RECIPES) + 1
  assert (fp8_bench.RECIPES[qk_int8], 32) in built
  assert len(checked) == len(names)
  assert all("rel_l2_err" in r for r in rows[:len(names)])
  assert not any("rel_l2_err" in r for r in rows[len(names):])
  for rnd in range(2):
    part = rows[rnd * len(names):(rnd + 1) * len(names)]
    assert all(r["speedup_vs_bf16"] == part[0]["ms"] / r["ms"] for r in part)
  assert json.load(open(tmp_path / "fp8_bench.json"))["results"][-1]["round"] == 1
  with pytest.raises(SystemExit):
    fp8_bench.main(["--rounds", "0"])


def test_fp8_bench_three_warpgroup_rows(monkeypatch, tmp_path):
  """The wg3 option's kernel-only row runs a schedule of 192-row query blocks with the
  config's block_q; where that schedule pads the shape to another length, the row is an
  error, not a comparison on other inputs. Stand-in kernels and timer, as above."""
  from benchmarks import fp8_bench
  from pallas_kernels.mosaic import backend as mosaic_backend
  blocks = []

  def fake_kernel_only(q, k, v, sched, scale, recipe, config=None):
    blocks.append((sched.block_q, None if config is None else config.block_q))
    return (lambda *a: (a[0],)), (q,)

  monkeypatch.setattr(fp8_bench, "kernel_only", fake_kernel_only)
  monkeypatch.setattr(fp8_bench, "timed", lambda fn, *a, flops=0.0, **kw: dict(ms=1.0))
  monkeypatch.setattr(fp8_bench, "row_errors", lambda out, ref, rows: {})
  monkeypatch.setattr(mosaic_backend, "forward", lambda q, k, v, *a, **kw: (q,))
  qk_int8 = fp8_bench.RECIPE_NAMES["qk_int8"]
  label = f"{qk_int8}, wg3, kernel only"
  same = shapes.BenchShape("tiny384", (2, 8, 24), (1, 8, 8), (1, 1, 1), heads=1)
  for shape, comparable in ((same, True), (TINY_BF16, False)):
    blocks.clear()
    record = common.Record(str(tmp_path / f"{shape.name}.json"), {})
    rows = fp8_bench.run(shape, 8, 1, 1, record, cudnn=False,
                         options=fp8_bench.parse_options("wg3"), option_recipes=(qk_int8,),
                         kernels_only=True)
    row = next(r for r in rows if r["variant"] == label)
    assert ((192, 192) in blocks) == comparable
    assert ("error" in row) == (not comparable), row
    if not comparable:
      assert "not comparable" in row["error"]


def test_fp8_bench_options():
  from benchmarks import fp8_bench
  from pallas_kernels.mosaic import fp8
  assert fp8_bench.parse_options("noab,noab+ox") == [
      ("noab", dict(auto_barriers=False)),
      ("noab+ox", dict(auto_barriers=False, overlap_exp=True))]
  assert fp8_bench.parse_options("") == []
  with pytest.raises(ValueError, match="unknown option"):
    fp8_bench.parse_options("noab+fast")
  assert fp8_bench.parse_options("sb+blocks+fma32") == [
      ("sb+blocks+fma32", dict(schedule_barrier=True, gather=False, exp2_fma_columns=32))]
  cfg = fp8.default_config(128, schedule_barrier=True, gather=False, exp2_fma_columns=32)
  assert (cfg.use_schedule_barrier, cfg.key_steps, cfg.exp2_fma_columns,
          cfg.masked_steps_apart) == (True, "blocks", 32, True)
  cfg = fp8.default_config(128)
  assert (cfg.use_schedule_barrier, cfg.key_steps) == (False, "auto")
  assert list(fp8_bench.RECIPE_NAMES.values()) == list(fp8_bench.RECIPES)
  with pytest.raises(SystemExit):
    fp8_bench.main(["--option-recipes", "qk_int8,bf16"])


def test_fp8_bench_quantization_rows(monkeypatch, tmp_path):
  """The quantization-only rows: XLA's first, then the Pallas passes per --quantize-configs
  launch, each compared with XLA's output (fractions of differing 8-bit values in the row and
  the table); a bad token fails before any work. Stand-ins for the kernels and the timer; the
  quantizations themselves run (Pallas interpreted) on the tiny shape."""
  import functools
  from benchmarks import fp8_bench
  from pallas_kernels.mosaic import backend as mosaic_backend
  from pallas_kernels.mosaic import fp8
  with pytest.raises(ValueError, match="unknown quantize config"):
    fp8_bench.parse_quantize_configs("w8,w3")
  configs = fp8_bench.parse_quantize_configs("default,blocks+w4")
  assert [c.heads_minor for _, c in configs] == [True, False] and configs[1][1].num_warps == 4
  monkeypatch.setattr(fp8, "quantize_with", functools.partial(fp8.quantize_with, interpret=True))
  monkeypatch.setattr(fp8, "fp8_forward", lambda q, *a, **kw: (q,))
  monkeypatch.setattr(fp8_bench, "kernel_only", lambda q, *a, **kw: ((lambda *x: x), (q,)))
  monkeypatch.setattr(fp8_bench, "timed", lambda fn, *a, **kw: dict(ms=1.0, tflops=0.0))
  monkeypatch.setattr(fp8_bench, "row_errors", lambda *a: dict(rel_l2_err=0.0))
  monkeypatch.setattr(mosaic_backend, "forward", lambda q, k, v, *a, **kw: (q,))
  record = common.Record(str(tmp_path / "fp8_bench.json"), {})
  rows = fp8_bench.run(TINY_BF16, 8, 1, 1, record, cudnn=False, quantize_configs=configs)
  quant = [r for r in rows if r["variant"].startswith("quantization only")]
  assert [r["variant"] for r in quant] == [
      "quantization only (default recipe, xla)",
      "quantization only (default recipe, pallas default)",
      "quantization only (default recipe, pallas blocks+w4)"]
  assert "q8_mismatch" not in quant[0] and "error" not in quant[0]
  for r in quant[1:]:
    assert r["q8_mismatch"] < 1e-3 and r["k8_mismatch"] < 1e-3 and r["scale_rel_diff"] < 1e-5
  assert fp8_bench.table(rows).count("differs from xla: q8") == 2


def test_git_tree_names_the_files_measured(tmp_path):
  """run_meta's tree is the git tree of the files as they are: the commit's tree when nothing
  changed, another one with a change or an untracked file (the tree a commit of them would
  have), and the checkout's index and objects untouched; None outside a checkout."""
  import shutil
  import subprocess
  if shutil.which("git") is None:
    pytest.skip("no git")
  git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True,
                                  capture_output=True, text=True).stdout.strip()
  git("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / ".gitignore").write_text("out/\n")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
  assert common.git_tree(str(tmp_path)) == git("rev-parse", "HEAD^{tree}")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "r.json").write_text("{}")                # ignored: not part of it
  assert common.git_tree(str(tmp_path)) == git("rev-parse", "HEAD^{tree}")
  (tmp_path / "a.py").write_text("x = 2\n")
  (tmp_path / "b.py").write_text("y = 1\n")
  status, objects = git("status", "--porcelain"), git("count-objects")
  tree = common.git_tree(str(tmp_path))
  assert git("status", "--porcelain") == status and git("count-objects") == objects
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
  assert tree == git("rev-parse", "HEAD^{tree}")
  import tempfile
  with tempfile.TemporaryDirectory() as elsewhere:
    assert common.git_tree(elsewhere) is None


def test_launch_order_l2_model_counts_reuse_within_the_cache():
  """The launch-order L2 model: one SM, items reading data 0,1 / 2,3 / 0,1: with a cache of
  two entries the third item hits only if it runs right after the first; unbounded, every
  read after the first of its datum hits. At a tiny bench shape every order is a valid
  model row (rates in [0, 1], growing with the cache)."""
  from benchmarks.tools import launch_order_l2 as model
  lists = np.array([[[0, 1], [2, 3], [0, 1]]])
  lengths = np.array([[2, 2, 2]])
  h2g = np.array([0])
  near = model.hit_rates(np.array([[0, 2, 1]]), lists, lengths, h2g, 1, (2, None), sms=1)
  far = model.hit_rates(np.array([[0, 1, 2]]), lists, lengths, h2g, 1, (2, None), sms=1)
  assert near == pytest.approx({2: 2 / 6, None: 2 / 6})
  assert far == pytest.approx({2: 0.0, None: 2 / 6})
  rows = model.main(["--shapes", "quick_bf16", "--orders", "sequence,window+long4",
                     "--l2-mb", "0.05,1"])
  assert [r["order"] for r in rows] == ["sequence", "window+long4"]
  for r in rows:
    for rates in (r["forward"], r["backward"]):
      small, big, unbounded = rates.values()
      assert 0 <= small <= big <= unbounded <= 1
  from pallas_kernels.mosaic.config import MosaicConfig
  assert model.order_config("window+long4", MosaicConfig()).long_items_first == 4.0
  with pytest.raises(ValueError, match="unknown order part"):
    model.order_config("hilbert", MosaicConfig())
