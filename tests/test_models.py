"""Video DiT (models/): shapes per attention kind, STA == full for a whole-volume window, text
masking, rotary tables, training, checkpoints, sampler, and the e2e benchmark's tiny mode (CPU)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsta
from models import attention as attn_lib
from models import data as data_lib
from models import rope as rope_lib
from models import sampling
from models import train as train_lib
from models.video_dit import VideoDiT, VideoDiTConfig, video_dit_config


def _perturbed(cfg: VideoDiTConfig, seed: int = 0) -> VideoDiT:
  """A model whose zero-initialised (AdaLN-Zero) weights are made non-zero, so every block and
  the output layer actually act: with the init weights the output is identically 0 and any
  comparison between attention kinds would pass trivially."""
  model = VideoDiT(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [l + (0.1 * jax.random.normal(k, l.shape)).astype(l.dtype)
            for l, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _inputs(cfg: VideoDiTConfig, batch: int = 2, seed: int = 1, valid=None):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, *cfg.latent_shape), jnp.float32)
  text = jax.random.normal(k2, (batch, cfg.text_max_len, cfg.text_dim), jnp.float32)
  valid = [cfg.text_max_len] * batch if valid is None else valid
  mask = np.arange(cfg.text_max_len)[None] < np.asarray(valid)[:, None]
  return x, jnp.linspace(0.2, 0.8, batch), text, jnp.asarray(mask)


@pytest.fixture(scope="module")
def tiny():
  cfg = video_dit_config("tiny")
  return cfg, _perturbed(cfg)


# ---- config ---------------------------------------------------------------------------------------
def test_presets_geometry():
  h = video_dit_config("hunyuan-shape")
  assert h.grid == (30, 48, 80) and h.head_dim == 128 and h.heads == 24 and h.depth == 2
  assert h.base_spec().num_tiles == (5, 6, 10) and h.base_spec().seq_len == 115200 + 256
  assert h.rope_axes_dim == (16, 56, 56) and h.dtype == "bfloat16"
  assert h.spec((3, 3, 3)).sparsity() == pytest.approx(0.91)
  s = video_dit_config("small", depth=3)
  assert s.grid == (8, 16, 16) and s.depth == 3 and s.base_spec().num_tiles == (4, 4, 2)
  assert s.base_spec().tile_size % 64 == 0
  assert s.spec(s.window).sparsity() == pytest.approx(1 - 9 / 32)
  assert VideoDiTConfig.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize("overrides, match", [
    (dict(window=(2, 3, 3)), "odd"),
    (dict(window=((3, 3, 3),) * 3), "per-layer"),
    (dict(window=((3, 3, 3), ((1, 1, 1),) * 3)), "per-head"),
    (dict(attention="flash"), "attention"),
    (dict(patch=(1, 3, 2)), "patch"),
    (dict(hidden=60), "hidden"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_axes_dim=(4, 4, 4)), "rope_axes_dim"),
])
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    video_dit_config("tiny", **overrides)


def test_layer_windows_forms():
  cfg = video_dit_config("tiny")
  assert cfg.layer_windows() == ((3, 3, 3), (3, 3, 3))  # whole volume: 2x2x2 tiles -> 3
  assert cfg.layer_windows((1, 1, 1)) == ((1, 1, 1), (1, 1, 1))
  per_head = ((1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1))
  assert cfg.layer_windows([[1, 1, 1], per_head]) == ((1, 1, 1), per_head)


def test_with_strategy():
  from jsta.strategy import WindowStrategy
  cfg = video_dit_config("tiny", attention="sta")
  per_head = ((1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1))
  strat = WindowStrategy(cfg.grid, cfg.tile, (per_head, ((1, 1, 1),) * 4))
  assert cfg.with_strategy(strat).layer_windows() == (per_head, ((1, 1, 1),) * 4)
  with pytest.raises(ValueError, match="tile_shape"):
    video_dit_config("tiny", tile=(2, 2, 4)).with_strategy(strat)
  with pytest.raises(ValueError, match="layers"):
    video_dit_config("tiny", depth=3).with_strategy(strat)


# ---- forward --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", attn_lib.ATTENTION_KINDS)
def test_shapes_each_attention_kind(tiny, kind):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[5, 3])
  out = model(x, t, text, mask, attention=kind)
  chex.assert_shape(out, (2, *cfg.latent_shape))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert float(jnp.abs(out).mean()) > 1e-3  # the perturbed model is not the zero map


def test_bf16_compute_and_short_text():
  cfg = video_dit_config("tiny", dtype="bfloat16")
  model = _perturbed(cfg)
  x, t, text, _ = _inputs(cfg)
  out = model(x, t, text[:, :5])  # 5 of 8 text slots given: padded and masked inside
  chex.assert_shape(out, (2, *cfg.latent_shape))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(l.dtype == jnp.float32 for l in leaves)  # params stay float32


def test_hunyuan_shape_traces():
  # Abstract (no FLOPs, no memory) trace at the real 115,456-token shape: shapes, tile order,
  # rotary tables and the (3, 3, 3) block schedule all work at scale.
  cfg = video_dit_config("hunyuan-shape", depth=1, backend="xla")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoDiT(cfg, rngs=nnx.Rngs(0))))
  x = jax.ShapeDtypeStruct((1, *cfg.latent_shape), jnp.float32)
  text = jax.ShapeDtypeStruct((1, cfg.text_max_len, cfg.text_dim), jnp.float32)
  for kind in ("full", "sta"):
    out = jax.eval_shape(lambda s, x, text: nnx.merge(graphdef, s)(
        x, jnp.ones((1,)), text, attention=kind), state, x, text)
    chex.assert_shape(out, (1, 30, 96, 160, 16))


@pytest.mark.parametrize("tile, valid", [((2, 2, 2), [8, 8]), ((3, 3, 2), [6, 2])])
def test_sta_whole_volume_window_equals_full(tile, valid):
  # (3, 3, 2) pads the 4x4x4 token grid to 6x6x4: padded video keys must be masked in both.
  cfg = video_dit_config("tiny", tile=tile, window=None)
  assert cfg.layer_windows()[0] == jsta.full_window(cfg.grid, tile)
  model = _perturbed(cfg, seed=3)
  x, t, text, mask = _inputs(cfg, valid=valid)
  full = model(x, t, text, mask, attention="full")
  sta = model(x, t, text, mask, attention="sta")
  ref = model(x, t, text, mask, attention="reference")
  np.testing.assert_allclose(sta, full, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(ref, full, atol=2e-5, rtol=2e-5)


def test_small_window_differs_and_matches_reference(tiny):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[6, 6])
  per_head = ((1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1))
  window = ((1, 1, 1), per_head)
  sta = model(x, t, text, mask, attention="sta", window=window)
  ref = model(x, t, text, mask, attention="reference", window=window)
  full = model(x, t, text, mask, attention="full")
  np.testing.assert_allclose(sta, ref, atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(sta - full).max()) > 1e-2


@pytest.mark.parametrize("kind", attn_lib.ATTENTION_KINDS)
def test_padded_text_slots_are_masked(tiny, kind):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[5, 5])
  garbage = text.at[:, 5:].set(100.0)
  a = model(x, t, text, mask, attention=kind)
  b = model(x, t, garbage, mask, attention=kind)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  c = model(x, t, text.at[:, 2].set(3.0), mask, attention=kind)  # a valid slot does matter
  assert float(jnp.abs(a - c).max()) > 1e-3


def test_full_attention_uses_exact_per_sample_text_mask(tiny):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[6, 3])
  a = model(x, t, text, mask, attention="full")
  b = model(x, t, text.at[1, 3:].set(50.0), mask, attention="full")
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_static_text_len():
  m = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
  assert attn_lib.static_text_len(m, 4) == 3  # batch maximum
  assert attn_lib.static_text_len(None, 4) == 4
  assert attn_lib.static_text_len(m, 4, text_len=2) == 2
  with pytest.raises(ValueError, match="text_len"):
    attn_lib.static_text_len(m, 4, text_len=5)
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda mm: attn_lib.static_text_len(mm, 4))(m)


def test_sta_under_jit_one_executable_for_every_text_length(tiny):
  cfg, model = tiny
  x, t, text, _ = _inputs(cfg, valid=[5, 5])
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, m: nnx.merge(graphdef, s)(x, t, text, m, attention="sta"))
  for valid in ([5, 5], [8, 1], [0, 3]):
    mask = jnp.asarray(np.arange(cfg.text_max_len)[None] < np.array(valid)[:, None])
    np.testing.assert_allclose(f(state, mask), model(x, t, text, mask, attention="reference"),
                               atol=1e-5, rtol=1e-5)
  assert f._cache_size() == 1


@pytest.mark.parametrize("kind", ["sta", "reference"])
def test_sta_masks_each_sample_text_exactly(tiny, kind):
  # Sample 1 has 3 valid text slots of 6 in the batch: garbage in its slots 3.. changes nothing.
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[6, 3])
  a = model(x, t, text, mask, attention=kind)
  b = model(x, t, text.at[1, 3:].set(50.0), mask, attention=kind)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  full = model(x, t, text, mask, attention="full", window=None)
  whole = model(x, t, text, mask, attention=kind, window=jsta.full_window(cfg.grid, cfg.tile))
  np.testing.assert_allclose(whole, full, atol=2e-5, rtol=2e-5)


def test_text_len_caps_the_attended_text_slots(tiny):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg, valid=[6, 3])
  want = model(x, t, text, mask, attention="sta")
  np.testing.assert_array_equal(model(x, t, text, mask, attention="sta", text_len=6), want)
  assert float(jnp.abs(model(x, t, text, mask, attention="sta", text_len=2) - want).max()) > 1e-4


def test_text_first_dit_equals_text_last(tiny):
  cfg, model = tiny
  first_cfg = dataclasses.replace(cfg, text_position="first")
  first = VideoDiT(first_cfg, rngs=nnx.Rngs(0))
  nnx.update(first, nnx.state(model))
  x, t, text, mask = _inputs(cfg, valid=[6, 3])
  for kind in ("sta", "full"):
    np.testing.assert_allclose(first(x, t, text, mask, attention=kind),
                               model(x, t, text, mask, attention=kind), atol=2e-5, rtol=2e-5)


def test_one_compiled_sampler_serves_three_prompt_lengths(tiny):
  from models import sampling
  cfg, model = tiny
  noise = jax.random.normal(jax.random.key(5), (1, *cfg.latent_shape))
  text = jax.random.normal(jax.random.key(6), (1, cfg.text_max_len, cfg.text_dim))
  sampling._euler_step.clear_cache()
  outs = []
  for n in (2, 5, 8):
    outs.append(sampling.euler_sample(model, noise, text[:, :n], steps=2))
  assert sampling._euler_step._cache_size() == 1
  assert float(jnp.abs(outs[0] - outs[2]).max()) > 1e-5   # the prompts do differ


def test_input_errors(tiny):
  cfg, model = tiny
  x, t, text, mask = _inputs(cfg)
  with pytest.raises(ValueError, match="x must be"):
    model(x[:, :2], t, text, mask)
  with pytest.raises(ValueError, match="text must be"):
    model(x, t, jnp.zeros((2, 9, cfg.text_dim)), None)
  with pytest.raises(ValueError, match="attention"):
    model(x, t, text, mask, attention="dense")


# ---- rotary ---------------------------------------------------------------------------------------
def test_rope_tables_in_tile_order():
  spec = jsta.STASpec((4, 6, 4), (2, 3, 2), (1, 1, 1))
  dims = (4, 6, 6)
  cos, _ = rope_lib.rope_tables(spec, dims, 10.0)
  chex.assert_shape(cos, (spec.padded_video_len, 8))
  # Tile order of a row-major position table, per axis: the first pair of each axis chunk has
  # frequency 1, so its angle is the position itself.
  pos = np.stack(np.meshgrid(*[np.arange(s) for s in (4, 6, 4)], indexing="ij"), -1)
  pos_tiled = np.asarray(jsta.tile_order(jnp.asarray(pos.reshape(1, -1, 3), jnp.float32), spec))[0]
  np.testing.assert_allclose(cos[:, 0], np.cos(pos_tiled[:, 0]), atol=1e-6)
  np.testing.assert_allclose(cos[:, 2], np.cos(pos_tiled[:, 1]), atol=1e-6)
  np.testing.assert_allclose(cos[:, 5], np.cos(pos_tiled[:, 2]), atol=1e-6)


def test_rope_is_relative():
  # <rope(q, p), rope(k, p')> depends only on p - p' (per axis): shift both positions by one
  # frame and the logits of a token pair stay the same.
  spec = jsta.STASpec((4, 2, 2), (1, 2, 2), (1, 1, 1))
  cos, sin = (jnp.asarray(a) for a in rope_lib.rope_tables(spec, (4, 6, 6), 10.0))
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  rot = lambda x, i: rope_lib.apply_rope(x, cos[i:i + 1], sin[i:i + 1])
  # tile (1, 2, 2) keeps row-major order here: token index = t * 4 + h * 2 + w
  d1 = jnp.sum(rot(q, 0) * rot(k, 4 + 3))  # q at (0,0,0), k at (1,1,1)
  d2 = jnp.sum(rot(q, 8) * rot(k, 12 + 3))  # q at (2,0,0), k at (3,1,1)
  np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)), jnp.linalg.norm(q), rtol=1e-6)


# ---- data -----------------------------------------------------------------------------------------
def test_blob_data():
  cfg = video_dit_config("tiny")
  dcfg = data_lib.BlobDataConfig.for_model(cfg)
  b = data_lib.make_batch(jax.random.key(0), dcfg, 6)
  chex.assert_shape(b["latent"], (6, *cfg.latent_shape))
  chex.assert_shape(b["text"], (6, cfg.text_max_len, cfg.text_dim))
  chex.assert_shape(b["text_mask"], (6, cfg.text_max_len))
  m = np.asarray(b["text_mask"])
  n = m.sum(1)
  assert ((n >= 2) & (n <= 1 + dcfg.max_blobs)).all()
  assert (m == (np.arange(cfg.text_max_len)[None] < n[:, None])).all()  # valid slots first
  assert float(jnp.abs(b["text"] * ~b["text_mask"][..., None]).max()) == 0.0
  assert float(b["latent"].std()) > 0.05
  # blobs move: consecutive frames differ
  assert float(jnp.abs(b["latent"][:, 1:] - b["latent"][:, :-1]).mean()) > 1e-3
  b2 = data_lib.make_batch(jax.random.key(0), dcfg, 6)
  np.testing.assert_array_equal(b["latent"], b2["latent"])
  with pytest.raises(ValueError, match="text_max_len"):
    data_lib.BlobDataConfig((4, 8, 8, 4), text_max_len=3, text_dim=8, max_blobs=3)


# ---- training, checkpoints, CLI -------------------------------------------------------------------
def test_train_cli_reduces_loss_and_init_from(tmp_path, capsys):
  out = tmp_path / "run"
  # bf16 compute with float32 parameters (mixed precision).
  # --text-len 4 (1 global + 3 blob tokens, the data's maximum): one executable for all batches.
  common = ["--preset", "tiny", "--batch", "8", "--dtype", "bfloat16", "--text-len", "4",
            "--lr", "2e-3", "--no-progress"]
  assert train_lib.main(common + ["--steps", "30", "--out", str(out)]) == 0
  # The attention it trains with comes first: the tiny preset's STA window covers the volume.
  printed = capsys.readouterr().out
  assert printed.startswith("attention: sta, token grid (4, 4, 4) in tiles of (2, 2, 2)")
  assert "warning: the STA window covers the whole volume" in printed
  rec = json.loads((out / "loss.json").read_text())
  losses = [p["loss"] for p in rec["losses"]]
  assert len(losses) >= 4 and all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  assert (out / "loss.png").stat().st_size > 1000
  saved = train_lib.read_checkpoint(out / "ckpt")
  params = [v for k, v in saved.items() if k.startswith("params/")]
  assert params and all(p.dtype == np.float32 for p in params)
  assert any(k.startswith("opt/") for k in saved) and saved["step"] == 30
  assert rec["meta"]["config"]["dtype"] == "bfloat16"
  # Continue from the checkpoint: the first loss is already low.
  out2 = tmp_path / "run2"
  train_lib.main(common + ["--steps", "2", "--out", str(out2),
                           "--init-from", str(out / "ckpt")])
  rec2 = json.loads((out2 / "loss.json").read_text())
  assert rec2["losses"][0]["loss"] < 0.8 * losses[0]


def test_checkpoint_round_trip(tmp_path, tiny):
  cfg, model = tiny
  opt = train_lib.make_optimizer(model)
  path = str(tmp_path / "c")
  train_lib.save_checkpoint(path, model, opt, step=7)
  train_lib.save_checkpoint(path, model, opt, step=7)     # over an existing checkpoint
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
  assert train_lib.load_config(path) == cfg
  other = VideoDiT(cfg, rngs=nnx.Rngs(42))
  other_opt = train_lib.make_optimizer(other)
  assert train_lib.restore_checkpoint(path, other, other_opt) == 7
  x, t, text, mask = _inputs(cfg, valid=[4, 6])
  np.testing.assert_array_equal(model(x, t, text, mask), other(x, t, text, mask))
  wrong = VideoDiT(video_dit_config("tiny", hidden=32), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not match"):
    train_lib.restore_checkpoint(path, wrong)


def _bad_checkpoints(tmp_path, good):
  """(path, what the error says, whether load_config sees it too) for what is not a
  models.train checkpoint."""
  text = tmp_path / "notes.txt"
  text.write_text("loss 0.3\n")
  old = tmp_path / "ckpt.npz"                     # the format of earlier versions
  np.savez(old, config=np.asarray(json.dumps(video_dit_config("tiny").to_json())))
  empty = tmp_path / "empty"
  empty.mkdir()
  foreign = tmp_path / "foreign"
  shutil.copytree(good, foreign)
  (foreign / "meta" / "metadata").write_text(json.dumps({"step": 3}))
  bad_config = tmp_path / "bad_config"
  shutil.copytree(good, bad_config)
  meta = json.loads((good / "meta" / "metadata").read_text())
  meta["config"]["hidden"] = 0
  (bad_config / "meta" / "metadata").write_text(json.dumps(meta))
  truncated = tmp_path / "truncated"
  shutil.copytree(good, truncated)
  index = truncated / "params" / "_METADATA"           # orbax's index of the arrays
  index.write_text(index.read_text()[:100])
  return [(text, "it is a file, not a directory", True),
          (old, r"\.npz checkpoints of earlier versions are not read", True),
          (empty, "it has no 'meta' item", True),
          (foreign, "its 'meta' item is not a models.train one", True),
          (bad_config, "its config is not a VideoDiTConfig", True),
          (truncated, "the checkpoint is incomplete or corrupt", False)]


def test_checkpoint_loader_errors_name_the_path(tmp_path, tiny):
  cfg, model = tiny
  good = tmp_path / "good"
  train_lib.save_checkpoint(str(good), model)
  for path, match, in_config in _bad_checkpoints(tmp_path, good):
    loads = [lambda p: train_lib.restore_checkpoint(p, model)]
    loads += [train_lib.load_config] if in_config else []
    for load in loads:
      with pytest.raises(ValueError, match=match) as info:
        load(path)
      assert str(info.value).startswith(f"{path}: not a models.train checkpoint"), info.value
  with pytest.raises(FileNotFoundError, match="missing"):
    train_lib.load_config(tmp_path / "missing")
  # A real checkpoint of another model: the mismatch names the checkpoint too.
  wrong = VideoDiT(video_dit_config("tiny", hidden=32), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=f"^{good}: checkpoint does not match the model"):
    train_lib.restore_checkpoint(good, wrong)
  assert train_lib.load_config(good) == cfg


def _train_usage_error(argv, capsys) -> str:
  with pytest.raises(SystemExit) as info:
    train_lib.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_train_cli_rejects_bad_options_before_training(tmp_path, capsys):
  out = tmp_path / "run"
  base = ["--preset", "tiny", "--no-progress", "--out", str(out)]
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint\n")
  cases = [
      (["--batch", "0"], "--batch must be >= 1, got 0"),
      (["--batch", "-3"], "--batch must be >= 1, got -3"),
      (["--steps", "0"], "--steps must be >= 1, got 0"),
      (["--depth", "0"], "--depth must be >= 1, got 0"),
      (["--log-every", "0"], "--log-every must be >= 1, got 0"),
      (["--save-every", "0"], "--save-every must be >= 1, got 0"),
      (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
      (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
      (["--text-len", "99"], "--text-len must be in [0, 8]"),
      (["--window", "3,x,3"], "--window must be comma-separated ints"),
      (["--window", "2,2,2"], "odd"),
      (["--backend", "nope"], "--backend: backend must be one of"),
      (["--init-from", str(text)], f"--init-from {text}: not a models.train checkpoint"),
      (["--init-from", str(tmp_path / "missing.npz")], "No such file or directory"),
      (["--batch", "two"], "argument --batch: invalid int value: 'two'"),
  ]
  for argv, match in cases:
    line = _train_usage_error(base + argv, capsys)
    assert line.startswith("python -m models.train: error: ") and match in line, (argv, line)
  assert not out.exists()  # nothing was trained or written
  with pytest.raises(SystemExit) as info:
    train_lib.main(["--help"])
  assert info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "--batch BATCH samples per step (>= 1) (default: 8)" in text
  assert "(default: None)" not in text


def test_train_library_argument_errors():
  cfg = video_dit_config("tiny")
  with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
    train_lib.train(cfg, steps=1, batch=0, progress=False)
  with pytest.raises(TypeError, match="batch must be an int, got str"):
    train_lib.train(cfg, steps=1, batch="8", progress=False)
  with pytest.raises(TypeError, match="steps must be an int, got bool"):
    train_lib.train(cfg, steps=True, progress=False)
  with pytest.raises(ValueError, match="lr must be a positive finite number"):
    train_lib.train(cfg, steps=1, lr=float("inf"), progress=False)


def _nan_from_step(monkeypatch, bad_step: int) -> None:
  """Replaces train_step by one that leaves the model alone and reports loss 1.0, then NaN from
  its call ``bad_step`` on (0-based): the loop's divergence handling without compiling a step."""
  calls = []

  def step(model, optimizer, batch, key, **kwargs):
    calls.append(None)
    loss = jnp.float32(jnp.nan if len(calls) > bad_step else 1.0)
    return loss, jnp.float32(0.5)

  monkeypatch.setattr(train_lib, "train_step", step)


def test_train_stops_on_a_non_finite_loss_and_keeps_the_good_checkpoint(tmp_path, monkeypatch,
                                                                        capsys):
  cfg = video_dit_config("tiny")  # the CLI's tiny preset: one train_step executable for all
  out = tmp_path / "run"
  out.mkdir()
  # A good checkpoint from before: a diverged run must not replace it.
  (out / "ckpt").mkdir()
  (out / "ckpt" / "previous").write_text("good checkpoint")
  _nan_from_step(monkeypatch, 3)
  with pytest.raises(FloatingPointError, match="loss nan .* at step 3 of 6") as info:
    train_lib.train(cfg, steps=6, batch=1, out=str(out), progress=False, log_every=4, text_len=4)
  assert "ckpt was not written" in str(info.value)
  assert [p.name for p in (out / "ckpt").iterdir()] == ["previous"]
  assert not (out / "loss.json").exists()
  # With periodic saves the checkpoint holds the last good step.
  out2 = tmp_path / "run2"
  _nan_from_step(monkeypatch, 3)
  with pytest.raises(FloatingPointError, match="at step 3 of 6.*holds step 2, the last good"):
    train_lib.train(cfg, steps=6, batch=1, out=str(out2), progress=False, save_every=2,
                    text_len=4)
  saved = train_lib.read_checkpoint(out2 / "ckpt")
  assert saved["step"] == 2
  assert all(np.isfinite(v).all() for k, v in saved.items() if k.startswith("params/"))
  # The command line: one error line, exit status 1, no traceback.
  _nan_from_step(monkeypatch, 0)
  with pytest.raises(SystemExit) as exit_info:
    train_lib.main(["--preset", "tiny", "--steps", "5", "--batch", "1", "--text-len", "4",
                    "--no-progress", "--out", str(tmp_path / "run3")])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m models.train: error: training diverged: loss nan")
  assert err.count("\n") == 1 and "Traceback" not in err
  assert not (tmp_path / "run3" / "ckpt").exists()


# ---- sampler --------------------------------------------------------------------------------------
def test_sampler_shape_and_full_attention_steps():
  cfg = video_dit_config("tiny", window=(1, 1, 1))
  model = _perturbed(cfg, seed=5)
  x, _, text, mask = _inputs(cfg, valid=[4, 4])
  noise = 0.5 * x
  out = sampling.euler_sample(model, noise, text, mask, steps=3, shift=2.0)
  chex.assert_shape(out, noise.shape)
  chex.assert_tree_all_finite(out)
  # All steps with full attention == the same model configured for full attention.
  all_full = sampling.euler_sample(model, noise, text, mask, steps=3, shift=2.0,
                                   full_attention_steps=3)
  full_model = nnx.merge(*nnx.split(model))
  full_model.config = video_dit_config("tiny", attention="full")
  ref = sampling.euler_sample(full_model, noise, text, mask, steps=3, shift=2.0)
  np.testing.assert_allclose(all_full, ref, atol=1e-5, rtol=1e-5)
  one_full = sampling.euler_sample(model, noise, text, mask, steps=3, shift=2.0,
                                   full_attention_steps=1)
  assert float(jnp.abs(one_full - out).max()) > 1e-4  # the first step really changed
  assert float(jnp.abs(one_full - all_full).max()) > 1e-4
  np.testing.assert_allclose(sampling.timesteps(4), [1.0, 0.75, 0.5, 0.25, 0.0])
  with pytest.raises(ValueError, match="full_attention_steps"):
    sampling.euler_sample(model, noise, text, mask, steps=2, full_attention_steps=3)


# ---- benchmark ------------------------------------------------------------------------------------
def test_e2e_bench_tiny(tmp_path):
  import benchmarks.e2e_bench as bench
  res = bench.main(["--preset", "tiny", "--steps", "2", "--out", str(tmp_path)])  # the CPU mode
  names = [e["name"] for e in res["configs"]]
  assert names == ["full", "sta_1x1x1", "sta_3x3x3"]
  for e in res["configs"]:
    assert "error" not in e, e
    assert e["step_ms"] > 0 and e["attn_op_ms"] > 0 and e["speedup"] > 0
  assert res["configs"][1]["sparsity"] == pytest.approx(0.875)
  files = sorted(os.listdir(tmp_path))
  assert any(f.endswith(".json") for f in files) and any(f.endswith(".png") for f in files)
  saved = json.loads((tmp_path / [f for f in files if f.endswith(".json")][0]).read_text())
  assert saved["device"] and saved["jax"] == jax.__version__ and saved["date"]


def test_e2e_bench_time_budget_skips(tmp_path):
  import benchmarks.e2e_bench as bench
  res = bench.main(["--preset", "tiny", "--steps", "1", "--time-budget", "0",
                    "--out", str(tmp_path)])
  assert all(e["error"].startswith("skipped") for e in res["configs"])
  assert "amdahl_bound" not in res
  assert any(f.endswith(".json") for f in os.listdir(tmp_path))


def test_wan14b_720p_shape_preset_geometry():
  from models.video_dit import video_dit_config
  cfg = video_dit_config("wan14b-720p-shape")
  assert cfg.grid == (21, 45, 80) and cfg.hidden == 5120 and cfg.heads == 40
  spec = cfg.base_spec().with_window(cfg.window)
  assert spec.video_len == 75_600 and spec.tile_shape == (3, 8, 8)
  assert spec.padded_video_len == 76_160      # the partial H tiles hold 5 rows of 8


@pytest.mark.parametrize("text_position", ["last", "first"])
@pytest.mark.parametrize("valid", [None, [4, 1]])
def test_full_attention_is_dense_attention_over_the_real_tokens(text_position, valid):
  """With padded video positions (partial edge tiles) the full-attention baseline attends the
  real tokens only, with no broadcast mask where the text is whole; padded rows are zeros."""
  spec = jsta.STASpec((3, 5, 6), (2, 2, 4), (1, 1, 1), text_len=4, text_max_len=5,
                      text_position=text_position)
  assert not jsta.mask.video_token_valid(spec).all()
  b, h, d = 2, 2, 8
  q, k, v = (jax.random.normal(kk, (b, spec.seq_len, h, d)) for kk in
             jax.random.split(jax.random.key(0), 3))
  mask = None if valid is None else jnp.asarray(np.arange(5)[None] < np.array(valid)[:, None])
  got = attn_lib.full_attention(q, k, v, spec, mask)
  lengths = None if valid is None else jnp.asarray(valid)
  dense = spec.with_window(jsta.full_window(spec.latent_shape, spec.tile_shape))
  want = jsta.reference_attention(q, k, v, dense, text_lengths=lengths)
  # The real queries: valid video tokens and each sample's valid text slots.
  slot = np.arange(spec.seq_len) - spec.text_offset
  is_text = (slot >= 0) & (slot < spec.text_max_len)
  n_text = np.full(b, spec.text_len) if valid is None else np.asarray(valid)
  rows = np.where(is_text[None], slot[None] < n_text[:, None],
                  jsta.token_valid(spec)[None])                     # [b, seq]
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5, rtol=1e-5)
  video = np.zeros(spec.seq_len, bool)
  video[spec.video_offset:spec.video_offset + spec.padded_video_len] = ~jsta.mask.video_token_valid(spec)
  assert not np.asarray(got)[:, video].any()


@pytest.mark.parametrize("impl", ["cudnn", "xla"])
def test_full_attention_on_a_padded_layout_passes_no_broadcast_mask(impl, monkeypatch):
  """cuDNN refuses a [batch, 1, 1, keys] mask ("Bias must have same seq length as QKV"): on a
  padded layout with whole text the baseline attends the gathered real tokens with no mask, and
  with a per-sample text mask cuDNN gets key lengths."""
  calls = []

  def record(q, k, v, **kwargs):
    calls.append((q.shape, kwargs))
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  spec = jsta.STASpec((3, 5, 6), (2, 2, 4), (1, 1, 1), text_len=5, text_max_len=5)
  x = jnp.zeros((2, spec.seq_len, 2, 8))
  attn_lib.full_attention(x, x, x, spec, implementation=impl)
  assert calls[-1] == ((2, spec.video_len + 5, 2, 8), {"implementation": impl})
  mask = jnp.asarray([[True] * 5, [True] * 2 + [False] * 3])
  attn_lib.full_attention(x, x, x, spec, mask, implementation=impl)
  shape, kwargs = calls[-1]
  assert shape == (2, spec.video_len + 5, 2, 8)
  if impl == "cudnn":
    assert set(kwargs) == {"key_value_seq_lengths", "implementation"}
    assert np.asarray(kwargs["key_value_seq_lengths"]).tolist() == [spec.video_len + 5,
                                                                    spec.video_len + 2]


def test_train_says_the_window_and_warns_when_it_covers_the_volume():
  whole = train_lib.describe_attention(video_dit_config("tiny", attention="sta"))
  assert whole[1] == "  every layer: window (3, 3, 3) (tiles), 0.0% sparse"
  assert whole[-1].startswith("warning: the STA window covers the whole volume")
  small = train_lib.describe_attention(video_dit_config(
      "tiny", attention="sta", window=((1, 1, 1), ((1, 1, 1), (3, 3, 3), (1, 3, 3), (1, 1, 1)))))
  assert small[1] == "  layer 0: window (1, 1, 1) (tiles), 87.5% sparse"
  assert small[2].startswith("  layer 1: window ((1, 1, 1), (3, 3, 3), (1, 3, 3), (1, 1, 1))")
  assert not any(l.startswith("warning") for l in small)
  assert train_lib.describe_attention(video_dit_config("tiny", attention="full"))[0].startswith(
      "attention: full")

