"""Window calibration (jsta.calibrate) and strategy files (jsta.strategy). CPU, small shapes.

Local and global heads are built by construction: with q_i = a * [2 p_i, -1] and
k_j = [p_j, |p_j|^2] (p = token coordinates in tile units), q_i . k_j = -a |p_i - p_j|^2 + const_i,
so softmax(q k^T) is a Gaussian of width ~ 1/sqrt(a) tiles around the query; q = 0 gives uniform
(global) attention.
"""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta import calibrate as cal
from jsta import mask as mask_lib
from jsta.strategy import WindowStrategy

from conftest import random_qkv

# 4x4x4 tiles of 2x2x2 tokens: 512 tokens. (5, 5, 5) covers the whole volume.
SPEC = jsta.STASpec((8, 8, 8), (2, 2, 2), (3, 3, 3))
CANDS = ((1, 1, 1), (3, 3, 3), (5, 5, 5))
HEAD_DIM = 8
# Head kinds: very local (adjacent-token weight exp(-50)), local (exp(-2) across a tile border,
# but exp(-18) two tiles away), global (uniform).
ALPHAS = (200.0, 8.0, 0.0)


def _coords(spec: jsta.STASpec) -> np.ndarray:
  """[padded_video_len, rank] token coordinates in tile units, tile order."""
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in spec.padded_latent_shape], indexing="ij"),
                  axis=-1).reshape(1, -1, spec.rank)
  coords = jsta.tile_order(jnp.asarray(grid, jnp.float32), spec)[0]
  return np.asarray(coords) / np.asarray(spec.tile_shape, np.float32)


def local_qkv(spec, alphas, batch=2, seed=0):
  """q, k: [batch, seq, heads, HEAD_DIM] with Gaussian locality alphas[h] (0: uniform); v random.

  Use with scale=1.0. Text slots get random q/k (their rows are dense under every window).
  """
  p = _coords(spec)                                                   # [nv, 3]
  nv, s, h = spec.padded_video_len, spec.seq_len, len(alphas)
  kfeat = np.zeros((nv, HEAD_DIM), np.float32)
  kfeat[:, :3] = p
  kfeat[:, 3] = (p ** 2).sum(-1)
  qfeat = np.zeros((nv, HEAD_DIM), np.float32)
  qfeat[:, :3] = 2 * p
  qfeat[:, 3] = -1.0
  q = np.zeros((batch, s, h, HEAD_DIM), np.float32)
  k = np.zeros((batch, s, h, HEAD_DIM), np.float32)
  q[:, :nv] = np.asarray(alphas, np.float32)[None, None, :, None] * qfeat[None, :, None]
  k[:, :nv] = kfeat[None, :, None]
  rng = np.random.default_rng(seed)
  q[:, nv:] = rng.normal(size=q[:, nv:].shape)
  k[:, nv:] = rng.normal(size=k[:, nv:].shape)
  v = rng.normal(size=(batch, s, h, HEAD_DIM)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _brute_force(q, k, v, spec, window, scale):
  """Numpy float64: (recall [H], relative L2 error [H]) of one window over valid video queries."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  valid = mask_lib.token_valid(spec)
  win = mask_lib.token_mask(spec, window)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  logits = np.where(valid, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  pw = np.where(win, p, 0.0)
  mass = pw.sum(-1)                                                   # [B,H,S]
  o_full = np.einsum("bhqk,bkhd->bhqd", p, v)
  o_win = np.einsum("bhqk,bkhd->bhqd", pw / np.where(mass > 0, mass, 1)[..., None], v)
  qmask = np.zeros(spec.seq_len, bool)
  qmask[:spec.padded_video_len] = mask_lib.video_token_valid(spec)
  recall = mass[:, :, qmask].mean(axis=(0, 2))
  err = np.sqrt(((o_win - o_full) ** 2)[:, :, qmask].sum(axis=(0, 2, 3))
                / (o_full ** 2)[:, :, qmask].sum(axis=(0, 2, 3)))
  return recall, err


# ---- recall -------------------------------------------------------------------------------------

def test_recall_local_and_global_heads():
  q, k, _ = local_qkv(SPEC, ALPHAS)
  whole = jsta.full_window(SPEC.latent_shape, SPEC.tile_shape)
  r_whole = cal.attention_recall(q, k, SPEC, whole, scale=1.0, block_q=64)
  chex.assert_shape(r_whole, (3,))
  chex.assert_type(r_whole, jnp.float32)
  np.testing.assert_allclose(r_whole, 1.0, atol=1e-6)
  r3 = np.asarray(cal.attention_recall(q, k, SPEC, (3, 3, 3), scale=1.0, block_q=64))
  r1 = np.asarray(cal.attention_recall(q, k, SPEC, (1, 1, 1), scale=1.0, block_q=64))
  # Uniform attention: the share of key tiles in the window, 27/64 and 1/64 (centers clamped).
  np.testing.assert_allclose(r3[2], 27 / 64, rtol=1e-5)
  np.testing.assert_allclose(r1[2], 1 / 64, rtol=1e-5)
  assert r3[0] > 1 - 1e-6 and r1[0] > 1 - 1e-6       # very local: one tile suffices
  assert r3[1] > 1 - 1e-6 and r1[1] < 0.95           # local: needs the neighbouring tiles


def test_recall_per_head_window_and_block_size_invariance():
  q, k, _ = local_qkv(SPEC, ALPHAS)
  per_head = cal.attention_recall(q, k, SPEC, ((1, 1, 1), (3, 3, 3), (1, 1, 1)), scale=1.0)
  r1 = cal.attention_recall(q, k, SPEC, (1, 1, 1), scale=1.0, block_q=512)
  r3 = cal.attention_recall(q, k, SPEC, (3, 3, 3), scale=1.0, block_q=24)  # 512 % 24 != 0
  np.testing.assert_allclose(per_head, [r1[0], r3[1], r1[2]], rtol=1e-5)


@pytest.mark.parametrize("window", [(1, 1, 3), (3, 1, 1)])
def test_recall_and_error_match_brute_force_with_padding_and_text(window):
  # Latent axes not tile multiples (padded keys masked) and 3 valid of 5 text slots.
  spec = jsta.STASpec((3, 5, 6), (2, 2, 4), window, text_len=3, text_max_len=5)
  q, k, v = random_qkv(3, spec, batch=2, heads=2, head_dim=8)
  recall_ref, err_ref = _brute_force(q, k, v, spec, window, scale=8 ** -0.5)
  np.testing.assert_allclose(cal.attention_recall(q, k, spec, block_q=16), recall_ref, rtol=1e-5)
  whole = jsta.full_window(spec.latent_shape, spec.tile_shape)
  for backend in (None, "xla"):
    stats = cal.layer_stats(q, k, v, spec, [window, whole], block_q=16, sta_backend=backend)
    chex.assert_shape(stats.error, (2, 2))
    np.testing.assert_allclose(stats.error[0], err_ref, rtol=1e-4)
    np.testing.assert_allclose(stats.error[1], 0.0, atol=1e-5)
    np.testing.assert_allclose(stats.mean_recall[0], recall_ref, rtol=1e-5)
    # Valid video queries: 3*5*6 per sample.
    assert stats.count == 2 * 3 * 5 * 6


def test_recall_fits_long_sequences_blockwise():
  # 16K tokens: a dense [heads, seq, seq] float32 would be 2 GiB; blockwise is 8 MiB per block.
  spec = jsta.STASpec((16, 32, 32), (4, 8, 8), (3, 3, 3))
  q, k, _ = local_qkv(spec, (0.0, 50.0), batch=1)
  r = cal.attention_recall(q, k, spec, scale=1.0, block_q=64)
  np.testing.assert_allclose(r[0], 27 / 64, rtol=1e-4)
  assert r[1] > 1 - 1e-5


# ---- calibration ----------------------------------------------------------------------------------

def test_calibrate_layer_picks_small_windows_for_local_heads_and_whole_volume_for_global():
  q, k, v = local_qkv(SPEC, ALPHAS)
  res = cal.calibrate_layer(q, k, v, SPEC, CANDS, error_budget=0.05, scale=1.0)
  assert res.windows == ((1, 1, 1), (3, 3, 3), (5, 5, 5))
  assert res.met.all()
  chex.assert_shape([res.error, res.recall], (3, 3))
  np.testing.assert_allclose(res.sparsity, [63 / 64, 37 / 64, 0.0])
  assert res.error[0, 1] > 0.05 and res.error[1, 1] < 1e-3      # local head: (1,1,1) too small
  assert res.error[1, 2] > 0.5                                  # global head: (3,3,3) far off
  np.testing.assert_allclose(res.error[2], 0.0, atol=1e-5)      # whole volume is exact


def test_calibrate_layer_sparsity_budget():
  q, k, v = local_qkv(SPEC, ALPHAS)
  res = cal.calibrate_layer(q, k, v, SPEC, CANDS, sparsity_budget=0.5, scale=1.0)
  # Candidates with sparsity >= 0.5 are (1,1,1) and (3,3,3); the lower-error one per head.
  assert res.windows[1:] == ((3, 3, 3), (3, 3, 3))
  assert res.windows[0] in ((1, 1, 1), (3, 3, 3))  # both exact for the very local head
  assert res.met.all()
  res = cal.calibrate_layer(q, k, v, SPEC, CANDS, sparsity_budget=0.99, scale=1.0)
  assert res.windows == ((1, 1, 1),) * 3 and not res.met.any()  # none qualifies: the sparsest


def test_select_windows_fallbacks_and_ties():
  sparsity = np.array([0.9, 0.5, 0.0])
  error = np.array([[0.2, 0.01, 0.3], [0.1, 0.01, 0.2], [0.0, 0.0, 0.25]])  # [C, H]
  chosen, met = cal.select_windows(sparsity, error, error_budget=0.05)
  # Head 0: only the whole volume qualifies; head 1: the sparsest qualifies; head 2: none
  # qualifies, so the lowest error.
  np.testing.assert_array_equal(chosen, [2, 0, 1])
  np.testing.assert_array_equal(met, [True, True, False])
  # Equal errors: the sparser candidate wins, whether or not the budget is met.
  chosen, met = cal.select_windows(sparsity, np.full((3, 2), 0.5), error_budget=0.05)
  np.testing.assert_array_equal(chosen, [0, 0])
  assert not met.any()
  chosen, _ = cal.select_windows(sparsity, np.zeros((3, 2)), error_budget=0.05)
  np.testing.assert_array_equal(chosen, [0, 0])
  # Sparsity budget 0.5: lowest error among candidates 0 and 1.
  chosen, met = cal.select_windows(sparsity, error, sparsity_budget=0.5)
  np.testing.assert_array_equal(chosen, [1, 0, 1])
  assert met.all()
  with pytest.raises(ValueError, match="exactly one"):
    cal.select_windows(sparsity, error)
  with pytest.raises(ValueError, match="exactly one"):
    cal.select_windows(sparsity, error, error_budget=0.1, sparsity_budget=0.5)
  with pytest.raises(ValueError, match="sparsity_budget"):
    cal.select_windows(sparsity, error, sparsity_budget=1.5)


def test_calibrate_aggregates_inputs_and_the_strategy_meets_the_budget_with_the_op(tmp_path):
  # Two layers with different head orders, two inputs with different values.
  def capture_fn(seed):
    q, k, v = local_qkv(SPEC, ALPHAS, seed=seed)
    perm = np.array([2, 0, 1])
    return [(q, k, v), (q[:, :, perm], k[:, :, perm], v[:, :, perm])]

  strat = cal.calibrate(capture_fn, [0, 1], SPEC, CANDS, error_budget=0.05, scale=1.0)
  assert strat.num_layers == 2 and strat.num_heads == 3
  assert strat.windows[0] == ((1, 1, 1), (3, 3, 3), (5, 5, 5))
  assert strat.windows[1] == ((5, 5, 5), (1, 1, 1), (3, 3, 3))
  assert strat.metrics["num_inputs"] == 2
  # Aggregation is a ratio of sums of squares over both inputs.
  s0, s1 = (cal.layer_stats(*capture_fn(i)[0], SPEC, CANDS, scale=1.0) for i in (0, 1))
  np.testing.assert_allclose(cal.layer_calibrations(strat)[0].error, (s0 + s1).error, rtol=1e-5)
  # The per-head spec runs through the op and stays within the budget of full attention.
  q, k, v = capture_fn(0)[1]
  spec = strat.spec_for_layer(SPEC, 1)
  o = jsta.sliding_tile_attention(q, k, v, spec, scale=1.0, backend="xla")
  full = jsta.reference_attention(q, k, v, SPEC.with_window((5, 5, 5)), scale=1.0)
  err = jnp.sqrt(((o - full) ** 2).sum((0, 1, 3)) / (full ** 2).sum((0, 1, 3)))
  assert (err <= 0.05).all(), err
  path = tmp_path / "s.json"
  strat.save(path)
  assert WindowStrategy.load(path) == strat


def test_calibrate_errors():
  q, k, v = local_qkv(SPEC, ALPHAS)
  with pytest.raises(ValueError, match="odd"):
    cal.calibrate_layer(q, k, v, SPEC, [(2, 2, 2)], error_budget=0.1)
  with pytest.raises(ValueError, match="at least one"):
    cal.calibrate_layer(q, k, v, SPEC, [], error_budget=0.1)
  with pytest.raises(ValueError, match="distinct"):
    cal.calibrate_layer(q, k, v, SPEC, [(3, 3, 3), (3, 3, 3)], error_budget=0.1)
  with pytest.raises(ValueError, match="seq_len"):
    cal.attention_recall(q[:, :-8], k[:, :-8], SPEC)
  with pytest.raises(ValueError, match="block_q"):
    cal.attention_recall(q, k, SPEC, block_q=0)
  with pytest.raises(ValueError, match="heads"):
    cal.calibrate(lambda i: [(q, k, v), (q[:, :, :2], k[:, :, :2], v[:, :, :2])], [0], SPEC,
                  CANDS, error_budget=0.1)
  other = jsta.STASpec((8, 8, 8), (2, 2, 4), (1, 1, 1))
  with pytest.raises(ValueError, match="text lengths only"):
    cal.calibrate(lambda i: [(q, k, v, other)], [0], SPEC, CANDS, error_budget=0.1)
  with pytest.raises(ValueError, match="at least one calibration input"):
    cal.calibrate(lambda i: [(q, k, v)], [], SPEC, CANDS, error_budget=0.1)


# ---- strategy files -------------------------------------------------------------------------------

def _strategy(metrics=None):
  return WindowStrategy((8, 8, 8), (2, 2, 2),
                        (((1, 1, 1), (3, 3, 3)), ((5, 5, 5), (3, 3, 3)), ((3, 3, 3),) * 2),
                        metrics=metrics)


def test_strategy_round_trip_and_spec_for_layer(tmp_path):
  s = _strategy(metrics={"error": [[0.1, 0.2]], "note": (1, 2)})
  path = tmp_path / "strategy.json"
  s.save(path)
  loaded = WindowStrategy.load(path)
  assert loaded == s and hash(loaded) == hash(s)
  d = json.loads(path.read_text())
  assert d["version"] == 1 and d["num_layers"] == 3 and d["num_heads"] == 2
  assert d["windows"]["1"]["0"] == [5, 5, 5]
  assert d["spec"] == {"latent_shape": [8, 8, 8], "tile_shape": [2, 2, 2], "text_len": 0,
                       "text_max_len": 0}
  # Lists instead of objects load the same.
  d["windows"] = [[list(w) for w in layer] for layer in s.windows]
  assert WindowStrategy.from_dict(d).windows == s.windows
  # numpy windows (e.g. from an argmin) are accepted and normalized to int tuples.
  assert WindowStrategy((8, 8, 8), (2, 2, 2), np.asarray(s.windows), metrics=s.metrics) == s
  spec = s.spec_for_layer(SPEC, 0)
  assert spec.window == ((1, 1, 1), (3, 3, 3)) and spec.latent_shape == SPEC.latent_shape
  s.validate(3, 2, SPEC)
  np.testing.assert_allclose(s.sparsity(), np.mean([63 / 64, 37 / 64, 0, 37 / 64, 37 / 64,
                                                     37 / 64]))


@pytest.mark.parametrize("args, match", [
    ((4, 2, SPEC), "3 layers but the model has num_layers=4"),
    ((3, 4, SPEC), "2 heads per layer but the model has num_heads=4"),
    ((3, 2, jsta.STASpec((8, 8, 16), (2, 2, 2), (3, 3, 3))), "latent_shape"),
    ((3, 2, jsta.STASpec((8, 8, 8), (2, 2, 4), (3, 3, 3))), "tile_shape"),
])
def test_strategy_validate_mismatch(args, match):
  with pytest.raises(ValueError, match=match):
    _strategy().validate(*args)


def test_strategy_spec_for_layer_errors():
  s = _strategy()
  with pytest.raises(ValueError, match="layer must be an int in"):
    s.spec_for_layer(SPEC, 3)
  with pytest.raises(ValueError, match="latent_shape"):
    s.spec_for_layer(jsta.STASpec((8, 8, 4), (2, 2, 2), (1, 1, 1)), 0)


def _dict(**changes):
  d = _strategy().to_dict()
  d.update(changes)
  return d


@pytest.mark.parametrize("d, match", [
    (_dict(version=2), "unknown strategy version 2"),
    ({k: v for k, v in _dict().items() if k != "version"}, "unknown strategy version None"),
    (_dict(windows={"0": {"0": [2, 3, 3], "1": [3, 3, 3]}}, num_layers=1), "odd"),
    (_dict(windows={"0": {"0": [0, 3, 3], "1": [3, 3, 3]}}, num_layers=1), "positive odd"),
    (_dict(windows={"0": {"0": [3, 3], "1": [3, 3, 3]}}, num_layers=1), "rank 2"),
    (_dict(windows={"0": {"0": [3, 3, 3]}, "1": {"0": [1, 1, 1], "1": [3, 3, 3]}}),
     "windows\\[1\\] has 2 heads but windows\\[0\\] has 1"),
    (_dict(windows={"0": {"0": [3, 3, 3], "2": [3, 3, 3]}}, num_layers=1), "missing \\[1\\]"),
    (_dict(num_layers=5), "num_layers=5 but 'windows' holds 3"),
    (_dict(num_heads=3), "num_heads=3 but 'windows' holds 2"),
    ({k: v for k, v in _dict().items() if k != "windows"}, "missing the 'windows'"),
    (_dict(spec={"latent_shape": [8, 8, 8]}), "missing 'tile_shape'"),
    (_dict(windows={"0": {"0": "333", "1": [3, 3, 3]}}, num_layers=1), "list of ints"),
])
def test_strategy_from_dict_errors(d, match):
  with pytest.raises(ValueError, match=match):
    WindowStrategy.from_dict(d)


def test_strategy_load_rejects_non_json(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="not a JSON strategy"):
    WindowStrategy.load(path)


# ---- capture hook and CLI -------------------------------------------------------------------------

def _tiny_dit(seed):
  from flax import nnx
  from models import video_dit
  cfg = video_dit.video_dit_config("tiny")
  return video_dit.VideoDiT(cfg, rngs=nnx.Rngs(seed)), cfg


def _dit_inputs(cfg, batch=1):
  kx, kt = jax.random.split(jax.random.key(7))
  x = jax.random.normal(kx, (batch,) + cfg.latent_shape)
  text = jax.random.normal(kt, (batch, cfg.text_max_len, cfg.text_dim))
  return x, jnp.full((batch,), 0.5), text


def test_capture_qkv_and_checkpoint_round_trip(tmp_path):
  from models import attention as attn_lib
  from models import capture, train
  original = attn_lib.joint_attention
  model, cfg = _tiny_dit(1)
  inputs = _dit_inputs(cfg)
  layers, spec = capture.capture_qkv(model, *inputs)
  assert attn_lib.joint_attention is original  # the hook is removed afterwards
  assert len(layers) == cfg.depth
  assert spec.latent_shape == cfg.grid and spec.text_len == cfg.text_max_len
  for q, k, v in layers:
    chex.assert_shape([q, k, v], (1, spec.seq_len, cfg.heads, cfg.head_dim))
  # The recorded layer input reproduces the model's own full attention call.
  q, k, v = layers[1]
  np.testing.assert_allclose(
      attn_lib.full_attention(q, k, v, spec),
      jsta.reference_attention(q, k, v, spec), atol=1e-4)
  # Valid text prefix of 3 slots: the spec says so, and matches the model's masked attention.
  x, t, text = inputs
  mask = jnp.arange(cfg.text_max_len)[None] < 3
  layers3, spec3 = capture.capture_qkv(model, x, t, text, mask)
  assert spec3.text_len == 3 and spec3.text_max_len == cfg.text_max_len
  q, k, v = layers3[0]
  full = attn_lib.full_attention(q, k, v, spec3, mask)
  nv = spec3.padded_video_len
  np.testing.assert_allclose(full[:, :nv], jsta.reference_attention(q, k, v, spec3)[:, :nv],
                             atol=1e-4)
  path = tmp_path / "ck.npz"
  train.save_checkpoint(str(path), model)
  loaded = capture.load_checkpoint(path)
  other, _ = _tiny_dit(2)
  for (a, _, _), (b, _, _), (c, _, _) in zip(
      layers, capture.capture_qkv(loaded, *inputs)[0], capture.capture_qkv(other, *inputs)[0]):
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)  # a different init gives different activations
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a models.train checkpoint"):
    capture.load_checkpoint(tmp_path / "bad.npz")


def test_cli_on_the_tiny_dit(tmp_path, capsys):
  from jsta import calibrate_cli
  from models import train
  model, cfg = _tiny_dit(3)
  train.save_checkpoint(str(tmp_path / "ck.npz"), model)
  out = tmp_path / "out"
  rc = calibrate_cli.main(["--checkpoint", str(tmp_path / "ck.npz"), "--num-inputs", "2",
                           "--candidates", "1,1,1;3,3,3;full", "--error-budget", "0.1",
                           "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "layer | head 0" in text and "covers the same tiles" in text  # full == 3x3x3 here
  strat = WindowStrategy.load(out / "strategy.json")
  strat.validate(cfg.depth, cfg.heads, cfg.base_spec())
  assert (out / "recall_heatmap.png").read_bytes()[:4] == b"\x89PNG"
  errs = np.array([c.error[c.chosen, np.arange(cfg.heads)]
                   for c in cal.layer_calibrations(strat)])
  met = np.array([c.met for c in cal.layer_calibrations(strat)])
  assert (errs[met] <= 0.1).all()
  with pytest.raises(SystemExit):
    calibrate_cli.main(["--candidates", "2,2,2", "--out", str(out)])


def test_calibrate_per_call_text_lengths():
  # Inputs with 2 and 5 valid text slots of 6: each call's own spec masks its text keys.
  base = jsta.STASpec((4, 4, 4), (2, 2, 2), (1, 1, 1), text_len=6, text_max_len=6)
  specs = [jsta.STASpec((4, 4, 4), (2, 2, 2), (3, 3, 3), text_len=n, text_max_len=6)
           for n in (2, 5)]
  qkvs = [random_qkv(i, base, batch=1, heads=2, head_dim=8) for i in (0, 1)]
  strat = cal.calibrate(lambda i: [(*qkvs[i], specs[i])], [0, 1], base, [(1, 1, 1), (3, 3, 3)],
                        error_budget=0.05)
  s0, s1 = (cal.layer_stats(*qkvs[i], specs[i], [(1, 1, 1), (3, 3, 3)]) for i in (0, 1))
  total = s0 + s1
  np.testing.assert_allclose(cal.layer_calibrations(strat)[0].error, total.error, rtol=1e-5)
  # Masking text keys matters: the all-valid base spec gives other errors.
  wrong = cal.layer_stats(*qkvs[0], base, [(1, 1, 1)])
  assert not np.allclose(wrong.error[0], cal.layer_stats(*qkvs[0], specs[0], [(1, 1, 1)]).error[0])
