"""Window calibration (jsta.calibration.search), strategy files (jsta.calibration.strategy) and the calibration
command lines (jsta-calibrate, python -m models.calibrate). CPU, small shapes.

Local and global heads are built by construction: with q_i = a * [2 p_i, -1] and
k_j = [p_j, |p_j|^2] (p = token coordinates in tile units), q_i . k_j = -a |p_i - p_j|^2 + const_i,
so softmax(q k^T) is a Gaussian of width ~ 1/sqrt(a) tiles around the query; q = 0 gives uniform
(global) attention.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta.calibration import search as cal
from jsta import mask as mask_lib
from jsta.calibration import cli as calibrate_cli
from jsta.calibration.strategy import WindowStrategy

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 4x4x4 tiles of 2x2x2 tokens: 512 tokens. (5, 5, 5) covers the whole volume.
SPEC = jsta.STASpec((8, 8, 8), (2, 2, 2), (3, 3, 3))
CANDS = ((1, 1, 1), (3, 3, 3), (5, 5, 5))
HEAD_DIM = 8
# Head kinds: very local (adjacent-token weight exp(-50)), local (exp(-2) across a tile border,
# but exp(-18) two tiles away), global (uniform).
ALPHAS = (200.0, 8.0, 0.0)


def random_qkv(seed: int, spec: jsta.STASpec, batch: int, heads: int, head_dim: int):
  """q, k, v: [batch, spec.seq_len, heads, head_dim] standard normal float32."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, spec.seq_len, heads, head_dim)
  return tuple(jax.random.normal(kk, shape, jnp.float32) for kk in keys)


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
  # 8K tokens: a dense [heads, seq, seq] float32 would be 512 MiB; blockwise is 4 MiB per block.
  # (Each query's window holds 2 x 3 x 3 of the 2 x 4 x 4 tiles.)
  spec = jsta.STASpec((8, 32, 32), (4, 8, 8), (3, 3, 3))
  q, k, _ = local_qkv(spec, (0.0, 50.0), batch=1)
  r = cal.attention_recall(q, k, spec, scale=1.0, block_q=64)
  np.testing.assert_allclose(r[0], 18 / 32, rtol=1e-4)
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
                       "text_max_len": 0, "text_position": "last"}
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


@pytest.mark.parametrize("content, match", [
    (b"{not json", "malformed or truncated JSON"),
    (None, "malformed or truncated JSON"),                      # a valid file cut in half
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xa7\x9d", "not UTF-8 text"),  # a zip (.npz)
    (b"[1, 2, 3]", "a strategy must be a JSON object"),
    (b"", "malformed or truncated JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),     # RecursionError in json
    (b'{"version": 1, "spec": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (json.dumps(_dict(spec={"latent_shape": [8, 8, 8], "tile_shape": [2, 2, 2],
                            "text_len": "3", "text_max_len": 4})).encode(),
     "text_len must be a non-negative int, got '3'"),
    (json.dumps(_dict(spec={"latent_shape": [8, 8, 8], "tile_shape": [2, 2, 2],
                            "text_position": 1})).encode(), "text_position must be one of"),
    (json.dumps(_dict(num_layers="3")).encode(), "'num_layers' must be an int, got '3'"),
    (json.dumps(_dict(version=True)).encode(), "unknown strategy version True"),
])
def test_strategy_load_rejects_files_that_are_not_strategies(tmp_path, content, match):
  path = tmp_path / "bad.json"
  if content is None:
    _strategy().save(path)
    content = path.read_bytes()[:len(path.read_bytes()) // 2]
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match) as info:
    WindowStrategy.load(path)
  msg = str(info.value)
  assert msg.startswith(f"{path}: not a valid strategy JSON file"), msg
  assert "\n" not in msg


def test_strategy_load_missing_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    WindowStrategy.load(tmp_path / "nope.json")


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
  path = tmp_path / "ck"
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


def _bad_checkpoints(tmp_path, good):
  """{name: (path, what the error says)} of paths that are not models.train checkpoints."""
  text = tmp_path / "notes.txt"
  text.write_text("step 10: loss 0.3\n")
  js = tmp_path / "strategy.json"
  _strategy().save(js)
  truncated = tmp_path / "truncated"
  shutil.copytree(good, truncated)
  index = truncated / "params" / "_METADATA"           # orbax's index of the arrays
  index.write_text(index.read_text()[:100])
  empty = tmp_path / "empty"
  empty.mkdir()
  no_config = tmp_path / "no_config"
  shutil.copytree(good, no_config)
  (no_config / "meta" / "metadata").write_text(json.dumps({"format": "models.train"}))
  return {"text": (text, "it is a file, not a directory"),
          "json": (js, "it is a file, not a directory"),
          "truncated": (truncated, "incomplete or corrupt"),
          "empty": (empty, "it has no 'meta' item"),
          "no_config": (no_config, "its config is not a VideoDiTConfig")}


def test_load_checkpoint_names_the_path_for_files_that_are_not_checkpoints(tmp_path):
  from models import capture, train
  model, _ = _tiny_dit(0)
  good = tmp_path / "ck"
  train.save_checkpoint(str(good), model)
  for name, (path, match) in _bad_checkpoints(tmp_path, good).items():
    with pytest.raises(ValueError, match=match) as info:
      capture.load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a models.train checkpoint"), (name, msg)
    assert "pickle" not in msg, (name, msg)
  with pytest.raises(FileNotFoundError, match="missing"):
    capture.load_checkpoint(tmp_path / "missing")


def test_models_calibrate_cli_on_the_tiny_dit(tmp_path, capsys):
  from models import calibrate as dit_cli
  from models import train
  model, cfg = _tiny_dit(3)
  train.save_checkpoint(str(tmp_path / "ck"), model)
  out = tmp_path / "out"
  rc = dit_cli.main(["--checkpoint", str(tmp_path / "ck"), "--num-inputs", "2",
                     "--candidates", "1,1,1;3,3,3;full", "--error-budget", "0.1",
                     "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "layer | head 0" in text and "covers the same tiles" in text  # full == 3x3x3 here
  assert f"VideoDiT from {tmp_path / 'ck'}" in text
  strat = WindowStrategy.load(out / "strategy.json")
  strat.validate(cfg.depth, cfg.heads, cfg.base_spec())
  assert strat.metrics["num_inputs"] == 2
  assert (out / "recall_heatmap.png").read_bytes()[:4] == b"\x89PNG"
  errs = np.array([c.error[c.chosen, np.arange(cfg.heads)]
                   for c in cal.layer_calibrations(strat)])
  met = np.array([c.met for c in cal.layer_calibrations(strat)])
  assert (errs[met] <= 0.1).all()


def _usage_error(main, argv, capsys) -> str:
  """Runs a CLI that must fail with a usage error; returns its one error line."""
  with pytest.raises(SystemExit) as info:
    main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_models_calibrate_cli_bad_checkpoints_are_one_error_line(tmp_path, capsys):
  from models import calibrate as dit_cli
  from models import train
  model, _ = _tiny_dit(0)
  good = tmp_path / "ck"
  train.save_checkpoint(str(good), model)
  out = str(tmp_path / "out")
  for name, (path, match) in _bad_checkpoints(tmp_path, good).items():
    line = _usage_error(dit_cli.main, ["--checkpoint", str(path), "--out", out], capsys)
    assert f"--checkpoint {path}: not a models.train checkpoint" in line and match in line, line
  line = _usage_error(dit_cli.main, ["--checkpoint", str(tmp_path / "missing.npz"), "--out",
                                     out], capsys)
  assert "missing.npz: No such file or directory" in line
  assert "2,2,2" in _usage_error(
      dit_cli.main, ["--candidates", "2,2,2", "--out", out], capsys)
  assert "--num-inputs must be >= 1, got 0" in _usage_error(
      dit_cli.main, ["--num-inputs", "0", "--out", out], capsys)
  # int() would read "1_1" as 11 (ASCII digits only, as jsta-calibrate).
  for flag in ("--num-inputs", "--seed"):
    assert "invalid int value: '1_1'" in _usage_error(
        dit_cli.main, [flag, "1_1", "--out", out], capsys)
  assert "--sparsity-budget must be in [0, 1], got 1.5" in _usage_error(
      dit_cli.main, ["--sparsity-budget", "1.5", "--out", out], capsys)
  assert "not allowed with argument" in _usage_error(
      dit_cli.main, ["--sparsity-budget", "0.5", "--error-budget", "0.1", "--out", out], capsys)
  assert not (tmp_path / "out").exists()


# ---- jsta-calibrate (model-agnostic) --------------------------------------------------------------

# 2x2x2 tiles of 2x4x4 tokens, 2 valid of 3 text slots: 256 + 3 tokens.
CLI_SPEC = jsta.STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3), text_len=2, text_max_len=3)
CLI_LAYOUT = ["--latent", "4,8,8", "--tile", "2,4,4", "--text-len", "2", "--text-max-len", "3"]


def _write_qkv(path, layers, **extra):
  arrays = {}
  for li, (q, k, v) in enumerate(layers):
    arrays |= {f"q{li}": np.asarray(q), f"k{li}": np.asarray(k), f"v{li}": np.asarray(v)}
  np.savez(path, **arrays, **extra)
  return str(path)


def test_jsta_calibrate_qkv_files_match_the_library(tmp_path, capsys):
  # Two inputs of two layers; the second input has 1 valid text slot (its own text_len key).
  inputs = [[random_qkv(10 * i + l, CLI_SPEC, batch=1, heads=2, head_dim=8) for l in range(2)]
            for i in range(2)]
  files = [_write_qkv(tmp_path / "in0.npz", inputs[0]),
           _write_qkv(tmp_path / "in1.npz", inputs[1], text_len=np.int64(1))]
  out = tmp_path / "out"
  rc = calibrate_cli.main(sum([["--qkv", f] for f in files], []) + CLI_LAYOUT + [
      "--candidates", "1,1,1;full", "--error-budget", "0.5", "--out", str(out)])
  assert rc == 0
  assert "q/k/v files" in capsys.readouterr().out
  got = WindowStrategy.load(out / "strategy.json")
  specs = [CLI_SPEC, jsta.STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3), 1, 3)]
  want = cal.calibrate(lambda i: [(*qkv, specs[i]) for qkv in inputs[i]], [0, 1], CLI_SPEC,
                       [(1, 1, 1), (3, 3, 3)], error_budget=0.5)
  assert got.windows == want.windows and got.num_layers == 2 and got.num_heads == 2
  for a, b in zip(cal.layer_calibrations(got), cal.layer_calibrations(want)):
    np.testing.assert_allclose(a.error, b.error, rtol=1e-5)
  # The per-file text length matters: with text_len 2 for both, the errors differ.
  same = cal.calibrate(lambda i: inputs[i], [0, 1], CLI_SPEC, [(1, 1, 1), (3, 3, 3)],
                       error_budget=0.5)
  assert not np.allclose(cal.layer_calibrations(same)[0].error,
                         cal.layer_calibrations(got)[0].error)
  assert (out / "recall_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_jsta_calibrate_synthetic(tmp_path, capsys):
  out = tmp_path / "out"
  rc = calibrate_cli.main(["--synthetic", "--latent", "4,8,8", "--tile", "2,4,4", "--heads",
                           "3", "--head-dim", "16", "--depth", "2", "--num-inputs", "1",
                           "--candidates", "1,1,1;3,3,3", "--sparsity-budget", "0.5",
                           "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "synthetic random-projection heads (2 layers x 3 heads, head_dim 16)" in text
  strat = WindowStrategy.load(out / "strategy.json")
  assert (strat.latent_shape, strat.tile_shape) == ((4, 8, 8), (2, 4, 4))
  assert (strat.num_layers, strat.num_heads) == (2, 3)
  # Sparsity budget 0.5 on 2x2x2 tiles: only 1x1x1 (87.5% sparse) qualifies.
  assert all(w == (1, 1, 1) for layer in strat.windows for w in layer)
  assert strat.metrics["source"].startswith("synthetic")


def test_heatmap_without_matplotlib(tmp_path, capsys, monkeypatch):
  # matplotlib is an extra: without it save_heatmap says which extra to install, and the
  # command still writes strategy.json (the result) with a note instead of the picture.
  monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` fails
  out = tmp_path / "out"
  rc = calibrate_cli.main(["--synthetic", "--latent", "4,8", "--tile", "2,4", "--heads", "1",
                           "--head-dim", "8", "--depth", "1", "--num-inputs", "1",
                           "--candidates", "1,1;full", "--out", str(out)])
  assert rc == 0
  captured = capsys.readouterr()
  assert f"wrote {out / 'strategy.json'}\n" in captured.out
  assert "recall_heatmap.png not written: the recall heatmap needs matplotlib" in captured.err
  assert "pip install 'jsta[plot]'" in captured.err
  assert (out / "strategy.json").exists() and not (out / "recall_heatmap.png").exists()
  with pytest.raises(ImportError, match=r"install the plot extra, pip install 'jsta\[plot\]'"):
    calibrate_cli.save_heatmap(WindowStrategy.load(out / "strategy.json"), tmp_path / "h.png")


def test_jsta_calibrate_usage_errors_are_one_line(tmp_path, capsys):
  main = calibrate_cli.main
  out = str(tmp_path / "out")
  good = _write_qkv(tmp_path / "good.npz",
                    [random_qkv(0, CLI_SPEC, batch=1, heads=2, head_dim=8)])
  text = tmp_path / "notes.txt"
  text.write_text("hello\n")
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(pathlib.Path(good).read_bytes()[:300])
  gap = _write_qkv(tmp_path / "gap.npz", [random_qkv(0, CLI_SPEC, 1, 2, 8)] * 2)
  with np.load(gap) as z:
    np.savez(gap, **{k.replace("1", "2"): z[k] for k in z.files})  # layers 0 and 2
  no_v = tmp_path / "no_v.npz"
  q, k, _ = random_qkv(0, CLI_SPEC, 1, 2, 8)
  np.savez(no_v, q0=q, k0=k)
  two_layers = _write_qkv(tmp_path / "two.npz", [random_qkv(0, CLI_SPEC, 1, 2, 8)] * 2)
  cases = [
      ([], "one of the arguments --qkv --synthetic is required"),
      (["--qkv", good], "--qkv needs the layout: --latent and --tile"),
      (["--qkv", str(text)] + CLI_LAYOUT, f"{text}: not a q/k/v .npz file"),
      (["--qkv", str(truncated)] + CLI_LAYOUT, f"{truncated}: not a readable q/k/v .npz file"),
      (["--qkv", str(tmp_path / "missing.npz")] + CLI_LAYOUT, "missing.npz: cannot read"),
      (["--qkv", gap] + CLI_LAYOUT, "layer indices must be 0..1 without gaps, got [0, 2]"),
      (["--qkv", str(no_v)] + CLI_LAYOUT, "layer 0 lacks v0"),
      (["--qkv", good, "--qkv", two_layers] + CLI_LAYOUT, "holds 2 layers but"),
      (["--qkv", good, "--latent", "4,8,8", "--tile", "2,4,4"], "q0 has seq 259 but the layout"),
      (["--qkv", good, "--latent", "4,8", "--tile", "2,4,4"], "--latent/--tile"),
      (["--synthetic", "--latent", "4,x,8"], "--latent must be 1 to 3 comma-separated"),
      (["--synthetic", "--text-len", "4", "--text-max-len", "3"], "--text-len must be in [0,"),
      (["--synthetic", "--heads", "0"], "--heads must be >= 1, got 0"),
      (["--synthetic", "--candidates", "2,2,2"], "--candidates: '2,2,2'"),
      (["--synthetic", "--candidates", ";"], "--candidates must name at least one window"),
      (["--synthetic", "--error-budget", "-1"], "--error-budget must be >= 0"),
      (["--synthetic", "--block-q", "0"], "--block-q must be >= 1"),
      (["--synthetic", "--sta-backend", "nope"], "--sta-backend: backend must be one of"),
      (["--synthetic", "--scale", "0"], "--scale must be > 0"),
      (["--synthetic", "--out", good], "exists and is not a directory"),
  ]
  for argv, match in cases:
    argv = argv if "--out" in argv else argv + ["--out", out]
    line = _usage_error(main, argv, capsys)
    assert line.startswith("jsta-calibrate: error: ") and match in line, (argv, line)
  assert not (tmp_path / "out").exists()


def _help(main, capsys) -> str:
  with pytest.raises(SystemExit) as info:
    main(["--help"])
  assert info.value.code == 0
  return " ".join(capsys.readouterr().out.split())


def test_calibration_help_shows_defaults(capsys):
  from models import calibrate as dit_cli
  text = _help(calibrate_cli.main, capsys)
  assert "(default: 1,1,1;3,3,3;5,5,5;full)" in text and "(default: None)" not in text
  assert "--head-dim HEAD_DIM q/k/v width per head (default: 64)" in text
  assert "keys ``q{layer}``, ``k{layer}``, ``v{layer}``" in text  # the file format
  text = _help(dit_cli.main, capsys)
  assert "(default: 1,1,1;3,3,3;5,5,5;full)" in text and "(default: None)" not in text
  assert "--num-inputs NUM_INPUTS calibration inputs" in text and "(default: 4)" in text


def test_jsta_does_not_import_models_and_calibrate_has_no_cli_import():
  # jsta must work when an unrelated top-level `models` package comes first on sys.path, and
  # the calibration library must not import its command line (python -m jsta.calibrate would
  # load the library twice; the command is the only importer of matplotlib).
  for path in sorted((ROOT / "jsta").rglob("*.py")):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      names += [f"{n}.{a.name}" for n in names[:1] if isinstance(node, ast.ImportFrom)
                for a in node.names]
      for name in names:
        assert name.split(".")[0] != "models", f"{path.name} imports {name}"
        if path.name in ("calibrate.py", "search.py", "strategy.py") or (
            path.name == "__init__.py" and path.parent.name == "calibration"):
          assert "cli" not in name.split("."), f"{path} imports {name}"


def test_calibration_modules_keep_their_short_names():
  # jsta.strategy and jsta.calibrate are the calibration subpackage's modules themselves.
  import jsta.calibrate
  import jsta.strategy
  assert jsta.strategy is jsta.calibration.strategy and jsta.calibrate is cal
  assert WindowStrategy is jsta.strategy.WindowStrategy


def test_python_m_jsta_calibrate_points_to_the_commands(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jsta.calibrate", "--synthetic"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("python -m jsta.calibrate: error: ")
  assert "jsta-calibrate" in proc.stderr and "python -m models.calibrate" in proc.stderr
  assert "Traceback" not in proc.stderr


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


# ---- the text position, and inputs that would give NaN -------------------------------------------

FIRST = dataclasses.replace(CLI_SPEC, text_position="first")


def _first(x):
  """Text-last tokens -> the same tokens with the text slots first."""
  return jnp.roll(jnp.asarray(x), CLI_SPEC.text_max_len, axis=1)


def test_calibrate_honours_text_position_first(tmp_path):
  """The same tokens, text last or text first: the same recall, errors and windows, and the
  strategy records (and reads back) where the text was."""
  layers = [random_qkv(l, CLI_SPEC, batch=2, heads=2, head_dim=8) for l in range(2)]
  cands = [(1, 1, 1), (3, 3, 3)]
  want = cal.calibrate(lambda i: layers, [0], CLI_SPEC, cands, error_budget=0.3)
  got = cal.calibrate(lambda i: [tuple(map(_first, qkv)) for qkv in layers], [0], FIRST, cands,
                      error_budget=0.3)
  assert got.windows == want.windows
  for a, b in zip(cal.layer_calibrations(got), cal.layer_calibrations(want)):
    np.testing.assert_allclose(a.error, b.error, rtol=1e-5)
    np.testing.assert_allclose(a.recall, b.recall, rtol=1e-5)
  q, k, _ = layers[0]
  np.testing.assert_allclose(cal.attention_recall(_first(q), _first(k), FIRST, (1, 1, 1)),
                             cal.attention_recall(q, k, CLI_SPEC, (1, 1, 1)), rtol=1e-5)
  # Through the op too (sta_backend).
  a = cal.layer_stats(*map(_first, layers[0]), FIRST, cands[:1], sta_backend="xla")
  b = cal.layer_stats(*layers[0], CLI_SPEC, cands[:1], sta_backend="xla")
  np.testing.assert_allclose(a.error, b.error, rtol=1e-4)
  assert (got.text_position, want.text_position) == ("first", "last")
  got.save(tmp_path / "s.json")
  assert json.loads((tmp_path / "s.json").read_text())["spec"]["text_position"] == "first"
  back = WindowStrategy.load(tmp_path / "s.json")
  assert back == got and back.base_spec().text_position == "first"
  # Files written before the text position was recorded read as text last.
  d = want.to_dict()
  del d["spec"]["text_position"]
  assert WindowStrategy.from_dict(d).text_position == "last"
  with pytest.raises(ValueError, match="text_position must be one of"):
    WindowStrategy.from_dict(d | {"spec": d["spec"] | {"text_position": "middle"}})


def test_jsta_calibrate_text_position_first(tmp_path, capsys):
  layers = [random_qkv(l, CLI_SPEC, batch=1, heads=2, head_dim=8) for l in range(2)]
  last = _write_qkv(tmp_path / "last.npz", layers)
  first = _write_qkv(tmp_path / "first.npz", [tuple(map(_first, qkv)) for qkv in layers])
  args = CLI_LAYOUT + ["--candidates", "1,1,1;full", "--error-budget", "0.5"]
  calibrate_cli.main(["--qkv", last, "--out", str(tmp_path / "a")] + args)
  calibrate_cli.main(["--qkv", first, "--text-position", "first",
                      "--out", str(tmp_path / "b")] + args)
  assert "text slots 3 (first)" in capsys.readouterr().out
  a, b = (WindowStrategy.load(tmp_path / d / "strategy.json") for d in "ab")
  assert (a.text_position, b.text_position) == ("last", "first")
  assert a.windows == b.windows
  for x, y in zip(cal.layer_calibrations(a), cal.layer_calibrations(b)):
    np.testing.assert_allclose(x.error, y.error, rtol=1e-5)
  # The synthetic model puts its text slots where the layout says.
  calibrate_cli.main(["--synthetic", "--latent", "4,8,8", "--tile", "2,4,4", "--text-max-len",
                      "3", "--text-position", "first", "--heads", "1", "--head-dim", "8",
                      "--depth", "1", "--num-inputs", "1", "--candidates", "1,1,1",
                      "--out", str(tmp_path / "c")])
  assert WindowStrategy.load(tmp_path / "c" / "strategy.json").text_position == "first"


def test_calibration_refuses_what_would_give_nan():
  q, k, v = random_qkv(0, CLI_SPEC, batch=1, heads=2, head_dim=8)
  cands = [(1, 1, 1)]
  with pytest.raises(ValueError, match=r"batch \(axis 0\) must be >= 1"):
    cal.layer_stats(q[:0], k[:0], v[:0], CLI_SPEC, cands)
  with pytest.raises(ValueError, match=r"head_dim \(axis 3\) must be >= 1"):
    cal.attention_recall(q[..., :0], k[..., :0], CLI_SPEC)
  for scale in (float("inf"), float("nan"), 1e39):
    with pytest.raises(ValueError, match="scale must be finite"):
      cal.layer_stats(q, k, v, CLI_SPEC, cands, scale=scale)
  bad = q.at[0, 5, 1, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="input 0, layer 0: the calibration's .* not finite"):
    cal.calibrate(lambda i: [(bad, k, v)], [0], CLI_SPEC, cands, error_budget=0.1)
  # NaN or inf in padded positions (of partial edge tiles, and text slots beyond text_len)
  # change nothing.
  padded = jsta.STASpec((3, 5, 4), (2, 2, 2), (1, 1, 1), text_len=1, text_max_len=3)
  q, k, v = random_qkv(1, padded, batch=1, heads=2, head_dim=8)
  pad = ~mask_lib.token_valid(padded)
  noisy = [jnp.where(pad[None, :, None, None], jnp.inf if i else jnp.nan, x)
           for i, x in enumerate((q, k, v))]
  clean = [jnp.where(pad[None, :, None, None], 0.0, x) for x in (q, k, v)]
  a, b = (cal.layer_stats(*xs, padded, [(1, 1, 1), (3, 3, 3)]) for xs in (noisy, clean))
  np.testing.assert_array_equal(a.error, b.error)
  np.testing.assert_array_equal(a.recall, b.recall)


def test_jsta_calibrate_refuses_what_would_give_nan(tmp_path, capsys):
  main = calibrate_cli.main
  out = str(tmp_path / "out")
  q, k, v = (np.asarray(x) for x in random_qkv(0, CLI_SPEC, batch=1, heads=2, head_dim=8))
  empty = _write_qkv(tmp_path / "batch0.npz", [(q[:0], k[:0], v[:0])])
  dim0 = _write_qkv(tmp_path / "dim0.npz", [(q[..., :0], k[..., :0], v[..., :0])])
  nan = _write_qkv(tmp_path / "nan.npz", [(q, np.where(np.arange(q.shape[1])[:, None, None] == 7,
                                                       np.nan, k), v)])
  good = _write_qkv(tmp_path / "good.npz", [(q, k, v)])
  three = _write_qkv(tmp_path / "three.npz", [(np.concatenate([q, q[:, :, :1]], 2),) * 3])
  cases = [
      (["--qkv", empty], "batch0.npz: q0: batch (axis 0) must be >= 1"),
      (["--qkv", dim0], "dim0.npz: q0: head_dim (axis 3) must be >= 1"),
      (["--qkv", nan], "nan.npz: k0 holds 16 NaN or inf values at valid positions (the first at "
                       "sequence position 7)"),
      (["--qkv", good, "--qkv", three], f"--qkv {three}: has 3 heads per layer but {good} has 2"),
      (["--qkv", good, "--scale", "inf"], "--scale must be finite, got inf"),
      (["--qkv", good, "--scale", "nan"], "--scale must be finite, got nan"),
      (["--qkv", good, "--scale", "1e39"], "--scale must be finite in float32"),
      (["--synthetic", "--seed", "-1"], "--seed must be >= 0, got -1"),
      (["--synthetic", "--text-position", "middle"], "--text-position: invalid choice"),
  ]
  for argv, match in cases:
    line = _usage_error(main, argv + CLI_LAYOUT * ("--qkv" in argv) + ["--out", out], capsys)
    assert line.startswith("jsta-calibrate: error: ") and match in line, (argv, line)
  assert not (tmp_path / "out").exists()
  # NaN in a padded text slot (text_len 2 of 3) is fine.
  pad = np.arange(q.shape[1])[:, None, None] == CLI_SPEC.padded_video_len + 2
  ok = _write_qkv(tmp_path / "ok.npz", [(np.where(pad, np.nan, q), k, v)])
  assert main(["--qkv", ok, "--candidates", "1,1,1", "--out", out] + CLI_LAYOUT) == 0
  assert "NaN" not in (tmp_path / "out" / "strategy.json").read_text()


# ---- bad arguments: refused up front, naming the argument ---------------------------------------

# 4x1x1 tiles of 2x4x4 tokens (128), causal in time: 3x1x1 keeps 1 + 2 + 3 + 3 of 16 tile pairs
# (0.4375 sparse; 0.25 centered, without the causal axis).
CAUSAL = jsta.STASpec((8, 4, 4), (2, 4, 4), (3, 1, 1), causal_axes=(0,))
NONCAUSAL = dataclasses.replace(CAUSAL, causal_axes=())
SMALL_CANDS = [(1, 1, 1), (3, 1, 1), (5, 1, 1)]


def _small_qkv(dtype=jnp.float32):
  return tuple(x.astype(dtype) for x in random_qkv(0, CAUSAL, batch=1, heads=2, head_dim=8))


def test_calibrate_refuses_a_per_call_spec_that_differs_beyond_the_text_lengths():
  q, k, v = _small_qkv()
  with pytest.raises(ValueError, match=r"input 0, layer 0: a per-call spec may change the text "
                     r"lengths only .* causal_axes=\(0,\) where spec_base has causal_axes=\(\)"):
    cal.calibrate(lambda i: [(q, k, v, CAUSAL)], [0], NONCAUSAL, SMALL_CANDS, error_budget=0.1)
  first = dataclasses.replace(NONCAUSAL, text_position="first")
  with pytest.raises(ValueError, match="text_position='first' where spec_base has "
                     "text_position='last'"):
    cal.calibrate(lambda i: [(q, k, v, first)], [0], NONCAUSAL, SMALL_CANDS, error_budget=0.1)
  with pytest.raises(TypeError, match="per-call spec .* must be a jsta.STASpec, got str"):
    cal.calibrate(lambda i: [(q, k, v, "spec")], [0], NONCAUSAL, SMALL_CANDS, error_budget=0.1)
  # The window of a per-call spec is ignored, as the base's.
  strat = cal.calibrate(lambda i: [(q, k, v, NONCAUSAL.with_window((1, 1, 1)))], [0],
                        NONCAUSAL, SMALL_CANDS, error_budget=0.1)
  assert strat.num_heads == 2


def test_strategy_keeps_causal_axes(tmp_path):
  uniform = WindowStrategy.uniform(CAUSAL, 2, 2)
  assert uniform.causal_axes == (0,)
  assert uniform.sparsity() == pytest.approx(CAUSAL.sparsity()) == pytest.approx(0.4375)
  assert WindowStrategy.uniform(NONCAUSAL, 2, 2).sparsity() == pytest.approx(0.25)
  # Calibration on the causal spec: even windows on the causal axis are candidates like others,
  # and the strategy's sparsity is that of the chosen windows under the causal rule.
  q, k, v = _small_qkv()
  cands = [(1, 1, 1), (2, 1, 1), (4, 1, 1)]
  strat = cal.calibrate(lambda i: [(q, k, v)] * 2, [0], CAUSAL, cands, sparsity_budget=0.3)
  assert strat.causal_axes == (0,)
  chosen = [w for layer in strat.windows for w in layer]
  assert set(chosen) <= set(cands)
  assert strat.sparsity() == pytest.approx(np.mean([CAUSAL.sparsity(w) for w in chosen]))
  np.testing.assert_allclose(strat.metrics["candidate_sparsity"],
                             [CAUSAL.sparsity(w) for w in cands])
  spec = strat.spec_for_layer(CAUSAL, 1)
  assert spec.causal_axes == (0,) and spec.window == strat.windows[1]
  strat.save(tmp_path / "s.json")
  assert json.loads((tmp_path / "s.json").read_text())["spec"]["causal_axes"] == [0]
  back = WindowStrategy.load(tmp_path / "s.json")
  assert back == strat and back.base_spec().causal_axes == (0,)
  # The windows mean other tiles without the causal axis: refused, not reinterpreted.
  with pytest.raises(ValueError, match=r"calibrated for causal_axes \(0,\) but spec has \(\)"):
    strat.spec_for_layer(NONCAUSAL, 0)
  with pytest.raises(ValueError, match=r"causal_axes \(0,\) but spec has \(\)"):
    strat.validate(2, 2, NONCAUSAL)
  with pytest.raises(ValueError, match=r"calibrated for causal_axes \(\) but spec has \(0,\)"):
    WindowStrategy.uniform(NONCAUSAL, 1, 2).validate(1, 2, CAUSAL)
  with pytest.raises(ValueError, match=r"positive odd ints \(in tiles\), got 2 on axis 0"):
    WindowStrategy((8, 4, 4), (2, 4, 4), (((2, 1, 1),),))
  with pytest.raises(ValueError, match="got 2 on axis 1"):
    WindowStrategy((8, 4, 4), (2, 4, 4), (((2, 2, 1),),), causal_axes=(0,))
  with pytest.raises(ValueError, match="causal_axes must be distinct axes"):
    WindowStrategy((8, 4, 4), (2, 4, 4), (((1, 1, 1),),), causal_axes=(3,))


@pytest.mark.parametrize("dtypes, match", [
    ((jnp.complex64,) * 3, "dtype must be float32, bfloat16 or float16 .* got complex64"),
    ((jnp.bool_,) * 3, "dtype must be float32, bfloat16 or float16 .* got bool"),
    ((jnp.int8,) * 3, "dtype must be float32, bfloat16 or float16 .* got int8"),
    ((jnp.float32, jnp.bfloat16, jnp.float32), "must share a dtype, got q float32, k bfloat16"),
])
def test_calibration_refuses_dtypes_the_op_refuses(dtypes, match):
  q, k, v = (x.astype(d) for x, d in zip(_small_qkv(), dtypes))
  with pytest.raises(TypeError, match=match):
    cal.attention_recall(q, k, NONCAUSAL)
  with pytest.raises(TypeError, match=match):
    cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, error_budget=0.1)
  with pytest.raises(TypeError, match="input 0, layer 0: .*" + match):
    cal.calibrate(lambda i: [(q, k, v)], [0], NONCAUSAL, SMALL_CANDS, error_budget=0.1)


def test_calibration_takes_float64_numpy_as_float32():
  q, k, v = _small_qkv()
  q64, k64 = (np.asarray(x, np.float64) for x in (q, k))
  np.testing.assert_allclose(cal.attention_recall(q64, k64, NONCAUSAL),
                             cal.attention_recall(q, k, NONCAUSAL), rtol=1e-6)
  np.testing.assert_allclose(cal.layer_stats(q64, k, v, NONCAUSAL, SMALL_CANDS).error,
                             cal.layer_stats(q, k, v, NONCAUSAL, SMALL_CANDS).error, rtol=1e-6)


def test_numbers_are_not_bools_and_numpy_scalars_are_numbers():
  q, k, v = _small_qkv()
  for kw in ({"error_budget": True}, {"sparsity_budget": True}, {"error_budget": "0.1"},
             {"sparsity_budget": np.bool_(False)}):
    with pytest.raises(TypeError, match=f"{next(iter(kw))} must be a real number"):
      cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, **kw)
  with pytest.raises(ValueError, match="error_budget must be a non-negative number"):
    cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, error_budget=-0.1)
  want = cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, error_budget=0.1).windows
  assert cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS,
                             error_budget=np.float32(0.1)).windows == want
  strat = cal.calibrate(lambda i: [(q, k, v)], [0], NONCAUSAL, SMALL_CANDS,
                        sparsity_budget=np.float64(0.5))
  assert strat.metrics["sparsity_budget"] == 0.5
  with pytest.raises(TypeError, match="num_layers must be an int, got bool True"):
    WindowStrategy.uniform(NONCAUSAL, True, 2)
  with pytest.raises(TypeError, match="num_layers must be an int, got float 2.0"):
    WindowStrategy.uniform(NONCAUSAL, 2.0, 2)
  assert WindowStrategy.uniform(NONCAUSAL, np.int64(2), 2).num_layers == 2
  s = WindowStrategy.uniform(NONCAUSAL, 2, 2)
  with pytest.raises(TypeError, match="num_heads must be an int, got float 2.0"):
    s.validate(2, 2.0, NONCAUSAL)
  with pytest.raises(TypeError, match="num_layers must be an int, got str '2'"):
    s.validate("2", 2, NONCAUSAL)
  s.validate(np.int64(2), np.int32(2), NONCAUSAL)
  assert s.spec_for_layer(NONCAUSAL, np.int64(1)).window == ((3, 1, 1),) * 2
  with pytest.raises(TypeError, match="layer must be an int, got bool True"):
    s.spec_for_layer(NONCAUSAL, True)
  with pytest.raises(TypeError, match="base_spec must be a jsta.STASpec, got NoneType"):
    s.spec_for_layer(None, 0)
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec, got NoneType"):
    s.validate(2, 2, None)


def test_select_windows_checks_shapes():
  with pytest.raises(ValueError, match=r"error must be \[candidates, heads\] = \[3, heads\] .* "
                     r"got shape \(3,\)"):
    cal.select_windows(np.zeros(3), np.zeros(3), error_budget=0.1)
  with pytest.raises(ValueError, match=r"got shape \(2, 4\)"):
    cal.select_windows(np.zeros(3), np.zeros((2, 4)), error_budget=0.1)
  with pytest.raises(ValueError, match="sparsity must be \\[candidates\\] with at least one"):
    cal.select_windows([], np.zeros((0, 2)), error_budget=0.1)
  with pytest.raises(ValueError, match="error must be finite"):
    cal.select_windows([0.5, 0.0], [[np.nan], [0.0]], error_budget=0.1)
  with pytest.raises(TypeError, match="sparsity must be an array of real numbers"):
    cal.select_windows(["a"], [[0.0]], error_budget=0.1)


def test_calibration_argument_types():
  q, k, v = _small_qkv()
  run = lambda fn, inputs=(0,), **kw: cal.calibrate(fn, inputs, NONCAUSAL, SMALL_CANDS,
                                                     error_budget=0.1, **kw)
  with pytest.raises(TypeError, match="capture_fn must be callable"):
    run(None)
  with pytest.raises(TypeError, match="inputs must be an iterable .* got int 3"):
    run(lambda i: [(q, k, v)], 3)
  with pytest.raises(TypeError, match="capture_fn must return a list .* got NoneType for "
                     "input 0"):
    run(lambda i: None)
  with pytest.raises(TypeError, match="input 0, layer 1 is a int"):
    run(lambda i: [(q, k, v), 3])
  with pytest.raises(TypeError, match="spec_base must be a jsta.STASpec, got NoneType"):
    cal.calibrate(lambda i: [(q, k, v)], [0], None, SMALL_CANDS, error_budget=0.1)
  with pytest.raises(TypeError, match="spec_base must be a jsta.STASpec"):
    cal.calibrate_layer(q, k, v, None, SMALL_CANDS, error_budget=0.1)
  with pytest.raises(TypeError, match="q must be a jax or numpy array, got list"):
    cal.attention_recall(q.tolist(), k, NONCAUSAL)
  with pytest.raises(TypeError, match="strategy must be a jsta.strategy.WindowStrategy"):
    cal.layer_calibrations(None)
  with pytest.raises(TypeError, match="candidates must be a list of windows .* got int 3"):
    cal.calibrate_layer(q, k, v, NONCAUSAL, 3, error_budget=0.1)
  with pytest.raises(TypeError, match=r"candidates\[1\]: window must be a tuple"):
    cal.calibrate_layer(q, k, v, NONCAUSAL, [(1, 1, 1), "3"], error_budget=0.1)
  for block_q in ("8", True, 1.5):
    with pytest.raises(TypeError, match="block_q must be an int"):
      cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, error_budget=0.1, block_q=block_q)
  with pytest.raises(ValueError, match="block_q must be >= 1, got 0"):
    cal.attention_recall(q, k, NONCAUSAL, block_q=0)
  assert cal.attention_recall(q, k, NONCAUSAL, block_q=np.int64(16)).shape == (2,)
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec, got NoneType"):
    WindowStrategy.uniform(None, 1, 2)
  with pytest.raises(ValueError, match=r"window \(3,\) has rank 1 but the latent/tile rank is 3"):
    WindowStrategy.uniform(NONCAUSAL, 1, 2, window=3)
  one_d = jsta.STASpec((8,), (2,), (1,))
  assert WindowStrategy.uniform(one_d, 1, 2, window=3).windows == (((3,), (3,)),)
  with pytest.raises(ValueError, match="not per-head windows"):
    WindowStrategy.uniform(NONCAUSAL, 1, 2, window=((1, 1, 1), (3, 1, 1)))


def test_calibration_options_are_checked_before_any_work(monkeypatch):
  q, k, v = _small_qkv()
  calls = []

  def capture_fn(i):
    calls.append(i)
    return [(q, k, v)]

  def no_work(*args, **kwargs):
    raise AssertionError("the blockwise pass ran before the options were checked")

  monkeypatch.setattr(cal, "_run", no_work)
  for kw, err, match in [
      ({"sta_backend": "bogus"}, ValueError, "sta_backend must be one of .* got 'bogus'"),
      ({"sta_backend": 3}, TypeError, "sta_backend must be None, a backend name"),
      ({"progress": 3}, TypeError, "progress must be None or callable"),
      ({"block_q": "8"}, TypeError, "block_q must be an int"),
      ({"scale": float("nan")}, ValueError, "scale must be finite"),
  ]:
    if "progress" not in kw:
      with pytest.raises(err, match=match):
        cal.calibrate_layer(q, k, v, NONCAUSAL, SMALL_CANDS, error_budget=0.1, **kw)
    with pytest.raises(err, match=match):
      cal.calibrate(capture_fn, [0, 1], NONCAUSAL, SMALL_CANDS, error_budget=0.1, **kw)
  assert not calls


def test_suggest_tile_spec_takes_a_bare_int_latent():
  suggestion = jsta.suggest_tile((64,), (64,))
  assert suggestion.spec(64) == suggestion.spec((64,)) == jsta.STASpec((64,), (64,), (1,))
  with pytest.raises(TypeError, match="latent_shape must be a tuple of ints"):
    suggestion.spec("64")


# ---- probe findings: silent misreads and late errors ---------------------------------------------

def _strategy_file(tmp_path, text: str) -> pathlib.Path:
  path = tmp_path / "s.json"
  path.write_text(text)
  return path


@pytest.mark.parametrize("key", ["01", " 1", "1 ", "+1", "-1", "1_0", "1.0", "\u0661", "1\n"])
def test_strategy_index_keys_must_be_canonical(tmp_path, key):
  # int() reads all of these as an index: "01" beside "1" would silently replace head 1.
  d = _strategy().to_dict()
  d["windows"]["0"][key] = [5, 5, 5]
  with pytest.raises(ValueError, match=r"windows\[0\] keys must be indices written as decimal "
                     r"ints without sign, spaces or leading zeros .* got " + re.escape(repr(key))):
    WindowStrategy.from_dict(d)
  d = _strategy().to_dict()
  d["windows"] = {("0" if k == "0" else key if k == "1" else k): v
                  for k, v in d["windows"].items()}
  path = _strategy_file(tmp_path, json.dumps(d))
  with pytest.raises(ValueError, match=f"^{path}: not a valid strategy JSON file: windows keys "
                     "must be indices"):
    WindowStrategy.load(path)


def test_strategy_refuses_repeated_json_keys(tmp_path):
  text = json.dumps(_strategy().to_dict())
  assert '"1": [3, 3, 3]' in text
  path = _strategy_file(tmp_path, text.replace('"1": [3, 3, 3]', '"1": [3, 3, 3], "1": [5, 5, 5]',
                                               1))
  with pytest.raises(ValueError, match=f"^{path}: not a valid strategy JSON file: the key '1' "
                     "appears twice in one JSON object$"):
    WindowStrategy.load(path)
  # Python mappings: an int key and its string are one index.
  with pytest.raises(ValueError, match=r"windows\[0\] has index 1 twice"):
    WindowStrategy((8, 8, 8), (2, 2, 2), [{0: (1, 1, 1), 1: (1, 1, 1), "1": (3, 3, 3)}])
  assert WindowStrategy((8, 8, 8), (2, 2, 2), {0: {0: (1, 1, 1), "1": (3, 3, 3)}}).windows == (
      ((1, 1, 1), (3, 3, 3)),)


@pytest.mark.parametrize("where, key, match", [
    (None, "causal_axes", r"strategy has unknown entries \['causal_axes'\]; allowed: .* the "
                          r"layout's entries belong in 'spec'"),
    (None, "notes", r"strategy has unknown entries \['notes'\]"),
    ("spec", "causal_axis", r"strategy 'spec' has unknown entries \['causal_axis'\]; allowed: "
                            r"\['latent_shape', 'tile_shape', 'text_len', 'text_max_len', "
                            r"'text_position', 'causal_axes'\]"),
    ("spec", "text_positon", r"strategy 'spec' has unknown entries \['text_positon'\]"),
])
def test_strategy_refuses_unknown_entries(tmp_path, where, key, match):
  d = _strategy().to_dict()
  (d if where is None else d[where])[key] = "first" if "posit" in key else [0]
  path = _strategy_file(tmp_path, json.dumps(d))
  with pytest.raises(ValueError, match=f"^{path}: not a valid strategy JSON file: " + match):
    WindowStrategy.load(path)


def test_every_file_save_writes_loads(tmp_path):
  # The optional entries save() writes (metrics, causal_axes, text_position) are known entries.
  for s in (_strategy(), _strategy(metrics={"a": [1, 2]}),
            WindowStrategy.uniform(CAUSAL, 2, 2),
            WindowStrategy((8, 8, 8), (2, 2, 2), [[(1, 1, 1)]], 1, 3, metrics={"x": None},
                           text_position="first")):
    s.save(tmp_path / "s.json")
    assert WindowStrategy.load(tmp_path / "s.json") == s


def test_strategy_numpy_text_lengths_are_stored_as_ints_and_save_is_atomic(tmp_path,
                                                                            monkeypatch):
  s = WindowStrategy((8, 8, 8), (2, 2, 2), [[(1, 1, 1)]], np.int64(1), np.int32(3))
  assert type(s.text_len) is int and type(s.text_max_len) is int
  path = tmp_path / "s.json"
  s.save(path)
  assert WindowStrategy.load(path) == s
  before = path.read_bytes()

  def fail(*args):
    raise OSError(28, "No space left on device")

  # A failure while writing leaves the old file as it was, and no temporary file behind.
  from jsta.calibration import strategy as strategy_lib
  monkeypatch.setattr(strategy_lib.os, "replace", fail)
  with pytest.raises(OSError, match="No space left"):
    _strategy().save(path)
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_strategy_load_of_a_huge_integer_names_the_file(tmp_path):
  text = json.dumps(_strategy().to_dict()).replace('"num_layers": 3', '"num_layers": ' + "9" * 5000)
  path = _strategy_file(tmp_path, text)
  with pytest.raises(ValueError, match=f"^{path}: not a valid strategy JSON file \\(a number in "
                     "it is too long to read"):
    WindowStrategy.load(path)


def _one_layer_qkv(seed=0, spec=CLI_SPEC):
  return random_qkv(seed, spec, batch=1, heads=2, head_dim=8)


def test_jsta_calibrate_qkv_layer_keys_must_be_canonical(tmp_path, capsys):
  q, k, v = (np.asarray(x) for x in _one_layer_qkv())
  out = str(tmp_path / "out")
  beside = tmp_path / "beside.npz"          # q0..v1 and q01: q01 was ignored
  np.savez(beside, q0=q, k0=k, v0=v, q1=q, k1=k, v1=v, q01=q * 100)
  instead = tmp_path / "instead.npz"        # q01..v01 for layer 1: a KeyError traceback
  np.savez(instead, q0=q, k0=k, v0=v, q01=q, k01=k, v01=v)
  for path, keys in ((beside, "['q01']"), (instead, "['k01', 'q01', 'v01']")):
    line = _usage_error(calibrate_cli.main, ["--qkv", str(path), "--out", out] + CLI_LAYOUT,
                        capsys)
    assert f"error: --qkv {path}: unexpected keys {keys}; a q/k/v file holds" in line, line
  assert not (tmp_path / "out").exists()


def test_jsta_calibrate_numbers_are_ascii_digits(tmp_path, capsys):
  out = str(tmp_path / "out")
  cases = [
      (["--candidates", "1_1,1"], "--candidates: '1_1,1' is not a comma-separated window"),
      (["--latent", "1_6,16", "--tile", "4,4"], "--latent must be 1 to 3 comma-separated"),
      (["--latent", "\u0668,16", "--tile", "4,4"], "--latent must be 1 to 3 comma-separated"),
      (["--heads", "1_0"], "argument --heads: invalid int value: '1_0'"),
      (["--text-max-len", "\u0663"], "argument --text-max-len: invalid int value: '\u0663'"),
      (["--block-q", "6_4"], "argument --block-q: invalid int value: '6_4'"),
      (["--error-budget", "0_1"], "argument --error-budget: invalid float value: '0_1'"),
      (["--scale", "\u0661.0"], "argument --scale: invalid float value"),
  ]
  for argv, match in cases:
    line = _usage_error(calibrate_cli.main, ["--synthetic"] + argv + ["--out", out], capsys)
    assert match in line, (argv, line)
  assert calibrate_cli.parse_shape(" 8, 16 ", "--latent") == (8, 16)
  assert not (tmp_path / "out").exists()


def test_jsta_calibrate_synthetic_with_partial_edge_tiles(tmp_path):
  # 3x4 tokens on 2x2 tiles: the last tile row is half padding, as q/k/v files may have.
  spec = jsta.STASpec((3, 4), (2, 2), (1, 1))
  capture_fn, inputs = calibrate_cli.synthetic_capture(spec, heads=1, head_dim=4, depth=1,
                                                       num_inputs=1)
  (q, k, v), = capture_fn(0)
  chex.assert_shape([q, k, v], (1, spec.seq_len, 1, 4))
  assert np.isfinite(np.asarray(q)).all()
  out = tmp_path / "out"
  assert calibrate_cli.main(["--synthetic", "--latent", "3,4", "--tile", "2,2", "--heads", "1",
                             "--head-dim", "4", "--depth", "1", "--num-inputs", "1",
                             "--candidates", "1,1", "--out", str(out)]) == 0
  assert WindowStrategy.load(out / "strategy.json").latent_shape == (3, 4)


def test_jsta_calibrate_npz_member_that_is_not_npy(tmp_path, capsys):
  import zipfile
  q, k, v = (np.asarray(x) for x in _one_layer_qkv())
  for name, member in (("raw.npz", "q0"), ("rawnpy.npz", "q0.npy")):
    path = tmp_path / name
    _write_qkv(path, [(q, k, v)])
    with np.load(path) as z:
      arrays = {key: z[key] for key in z.files if key != "q0"}
    with zipfile.ZipFile(path, "w") as z:
      z.writestr(member, b"raw bytes, not an array")
      for key, x in arrays.items():
        with z.open(key + ".npy", "w") as f:
          np.lib.format.write_array(f, x)
    line = _usage_error(calibrate_cli.main, ["--qkv", str(path), "--out", str(tmp_path / "o")]
                        + CLI_LAYOUT, capsys)
    assert line.endswith(f"error: --qkv {path}: q0 is not a .npy array"), line
    with pytest.raises(ValueError, match="q0 is not a .npy array"):
      calibrate_cli.load_qkv(path, CLI_SPEC)


def test_jsta_calibrate_checks_out_before_any_work(tmp_path, capsys, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("calibration ran before --out was checked")

  monkeypatch.setattr(cal, "calibrate", no_work)
  main = calibrate_cli.main
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  heatmap_dir = tmp_path / "res"
  (heatmap_dir / "recall_heatmap.png").mkdir(parents=True)
  cases = [
      ("", "--out must name a directory, got ''"),
      (str(a_file / "sub" / "deeper"), f"cannot be created: {a_file} is not a directory"),
      (str(heatmap_dir), f"{heatmap_dir / 'recall_heatmap.png'} is a directory; the results "
                         "are written as recall_heatmap.png"),
  ]
  for out, match in cases:
    line = _usage_error(main, ["--synthetic", "--out", out], capsys)
    assert match in line, (out, line)
  assert not (heatmap_dir / "strategy.json").exists()
  # Root may write anywhere, so "not writable" is what os.access says.
  monkeypatch.setattr(calibrate_cli.os, "access", lambda *args, **kwargs: False)
  line = _usage_error(main, ["--synthetic", "--out", str(tmp_path / "new" / "out")], capsys)
  assert f"--out {tmp_path / 'new' / 'out'}: cannot write there: {tmp_path} is not writable" \
      in line, line
  assert not (tmp_path / "new").exists()


def test_jsta_calibrate_says_strategy_was_written_when_the_heatmap_fails(tmp_path, capsys,
                                                                         monkeypatch):
  def fail(strategy, path):
    raise IsADirectoryError(21, "Is a directory")

  monkeypatch.setattr(calibrate_cli, "save_heatmap", fail)
  out = tmp_path / "out"
  line = _usage_error(calibrate_cli.main,
                      ["--synthetic", "--latent", "4,4", "--tile", "2,2", "--heads", "1",
                       "--head-dim", "4", "--depth", "1", "--num-inputs", "1", "--candidates",
                       "1,1", "--out", str(out)], capsys)
  assert (f"--out {out}: wrote {out / 'strategy.json'} but cannot write "
          f"{out / 'recall_heatmap.png'} (Is a directory)") in line, line
  assert WindowStrategy.load(out / "strategy.json").num_heads == 1


def test_jsta_calibrate_checks_every_qkv_file_before_any_work(tmp_path, capsys, monkeypatch):
  def no_work(*args, **kwargs):
    raise AssertionError("the blockwise pass ran before every file was checked")

  monkeypatch.setattr(cal, "_run", no_work)
  q, k, v = (np.asarray(x) for x in _one_layer_qkv())
  good = _write_qkv(tmp_path / "good.npz", [(q, k, v)])
  cases = [
      (_write_qkv(tmp_path / "seq.npz", [(q[:, 1:], k[:, 1:], v[:, 1:])]), "q0 has seq 258"),
      (_write_qkv(tmp_path / "f64k.npz", [(q, k.astype(np.complex64), v)]),
       "k0 must be a float array, got dtype complex64"),
      (_write_qkv(tmp_path / "vshape.npz", [(q, k, v[..., :4])]),
       "q0, k0, v0 must have one shape"),
  ]
  for bad, match in cases:
    line = _usage_error(calibrate_cli.main, ["--qkv", good, "--qkv", bad, "--out",
                                             str(tmp_path / "out")] + CLI_LAYOUT, capsys)
    assert f"error: --qkv {bad}: {match}" in line, line
  assert not (tmp_path / "out").exists()


def test_jsta_calibrate_clamps_a_huge_block_q(tmp_path, monkeypatch):
  seen = []
  real = cal.calibrate

  def spy(*args, block_q=None, **kwargs):
    seen.append(block_q)
    assert block_q <= 16, "an unclamped --block-q would allocate ~block_q query rows"
    return real(*args, block_q=block_q, **kwargs)

  monkeypatch.setattr(cal, "calibrate", spy)
  assert calibrate_cli.main(["--synthetic", "--latent", "4,4", "--tile", "2,2", "--heads", "1",
                             "--head-dim", "4", "--depth", "1", "--num-inputs", "1",
                             "--candidates", "1,1", "--block-q", "999999999",
                             "--out", str(tmp_path / "out")]) == 0
  assert seen == [16]


def test_jsta_calibrate_synthetic_options_need_synthetic(tmp_path, capsys):
  good = _write_qkv(tmp_path / "good.npz", [_one_layer_qkv()])
  out = str(tmp_path / "out")
  for extra, match in ((["--heads", "0"], "--heads needs --synthetic"),
                       (["--depth", "2", "--head-dim", "64"], "--head-dim, --depth need "
                                                             "--synthetic"),
                       (["--num-inputs", "2"], "--num-inputs needs --synthetic"),
                       (["--seed", "0"], "--seed needs --synthetic")):
    line = _usage_error(calibrate_cli.main, ["--qkv", good, "--out", out] + CLI_LAYOUT + extra,
                        capsys)
    assert match in line, (extra, line)
  assert not (tmp_path / "out").exists()


def test_jsta_calibrate_qkv_value_errors_are_clear(tmp_path, capsys):
  q, k, v = (np.asarray(x) for x in _one_layer_qkv())
  huge = _write_qkv(tmp_path / "huge.npz", [(q.astype(np.float64) * 1e300, k, v)])
  nan = _write_qkv(tmp_path / "nan.npz", [(q, np.where(np.arange(q.shape[1])[:, None, None] == 7,
                                                       np.nan, k), v)])
  neg = _write_qkv(tmp_path / "neg.npz", [(q, k, v)], text_len=np.int64(-1))
  out = str(tmp_path / "out")
  cases = [
      (huge, f"q0 holds {258 * 2 * 8} values beyond the float32 range (|x| > 3.4e+38) at "
             "valid positions (the first at sequence position 0); calibration computes in "
             "float32"),
      # Read late (values are not checked up front), in the same form as the up-front errors.
      (nan, "k0 holds 16 NaN or inf values at valid positions"),
      (neg, "text_len must be a non-negative int, got -1"),
  ]
  for path, match in cases:
    line = _usage_error(calibrate_cli.main, ["--qkv", path, "--out", out] + CLI_LAYOUT, capsys)
    assert line.startswith(f"jsta-calibrate: error: --qkv {path}: {match}"), line
  assert not (tmp_path / "out").exists()


def test_a_block_q_beyond_the_video_is_the_video():
  """Rows are padded up to a multiple of block_q: block_q=10**9 asked for hundreds of GB."""
  spec = jsta.STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3))
  q, k, _ = local_qkv(spec, (0.0, 50.0), batch=1)
  np.testing.assert_array_equal(cal.attention_recall(q, k, spec, scale=1.0, block_q=10 ** 9),
                                cal.attention_recall(q, k, spec, scale=1.0,
                                                     block_q=spec.padded_video_len))
