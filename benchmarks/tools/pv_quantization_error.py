"""The error of 8-bit P V recipes, emulated in float64 NumPy over one row block of attention
with the kernels' online softmax (key steps of 128, running max, O rescaled per step), on
random inputs: which quantization of P and V could meet an error budget before a kernel is
written for it. Runs on a CPU in seconds.

    python -m benchmarks.tools.pv_quantization_error [--queries 256] [--keys 10368]

Q K^T is exact or the kernels' int8 recipe (K smoothed by its mean, Q per token, K per
128-key block, 127 levels); P V is bf16, e4m3 (the kernels' ``"fp8"`` recipes: P as it is, V
per channel scaled to e4m3's 448) or int8 (P scaled per row and key step by its largest
value, V per channel and 128-key block, 127 levels each; or P relative to a running
reference instead of each step's maximum, one integer accumulator over all steps: "running
int8 P V"). Prints the relative L2 error of each against exact float64 attention.
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

STEP = 128          # keys per step of the kernels' online softmax
LEVELS = 127        # int8's symmetric range


def _bf16(x):
  return x.astype(ml_dtypes.bfloat16).astype(np.float64)


def _e4m3(x):
  return x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _scaled(x, absmax, quantize):
  absmax = np.where(absmax == 0, 1.0, absmax)
  return quantize(x / absmax) * absmax


def _int8(x):
  return np.round(x * LEVELS) / LEVELS


def p_int8_per_row(p):
  """P of one key step in int8, one scale per row (its largest value)."""
  return _scaled(p, np.abs(p).max(axis=1, keepdims=True), _int8)


def p_e4m3(p):
  """P of one key step in e4m3 as it is (P <= 1: no scale)."""
  return _e4m3(p)


def v_e4m3_per_channel(v):
  """V in e4m3, one scale per channel: its absmax to e4m3's largest value, 448."""
  return _scaled(v, np.abs(v).max(axis=0, keepdims=True) / 448.0, _e4m3)


def v_int8_per_channel_block(v, block: int = STEP):
  """V in int8, one scale per channel and ``block`` keys."""
  out = np.empty_like(v)
  for i in range(0, v.shape[0], block):
    part = v[i:i + block]
    out[i:i + block] = _scaled(part, np.abs(part).max(axis=0, keepdims=True), _int8)
  return out


def v_int8_per_channel(v):
  """V in int8, one scale per channel over all keys (as the all-int8 kernel keeps it)."""
  return _scaled(v, np.abs(v).max(axis=0, keepdims=True), _int8)


def scores_int8(q, k, scale: float):
  """Q K^T as the kernels' int8 recipe (K minus its mean, Q per token, K per 128-key block;
  the mean's row constant drops out of the softmax)."""
  k = k - k.mean(axis=0, keepdims=True)
  qq = _scaled(q, np.abs(q).max(axis=1, keepdims=True), _int8)
  kq = np.empty_like(k)
  for i in range(0, k.shape[0], STEP):
    part = k[i:i + STEP]
    kq[i:i + STEP] = _scaled(part, np.abs(part).max(), _int8)
  return (qq @ kq.T) * scale


def online_attention(s, v, p_quant, v_quant):
  """softmax(s) @ v with the kernels' key steps: per step the running max, P =
  exp(s - max) quantized by ``p_quant``, O rescaled by the step's correction; V quantized
  once by ``v_quant``."""
  rows = s.shape[0]
  m = np.full((rows, 1), -np.inf)
  l = np.zeros((rows, 1))
  o = np.zeros((rows, v.shape[1]))
  vq = v_quant(v)
  for j in range(0, s.shape[1], STEP):
    sj = s[:, j:j + STEP]
    m_new = np.maximum(m, sj.max(axis=1, keepdims=True))
    c = np.exp(m - m_new)
    p = np.exp(sj - m_new)
    l = l * c + p.sum(axis=1, keepdims=True)
    o = o * c + p_quant(p) @ vq[j:j + STEP]
    m = m_new
  return o / l


def running_int8_attention(s, v, p_quant=None, v_quant=v_int8_per_channel):
  """softmax(s) @ v with int8 P relative to a running reference instead of each step's
  maximum: P = round(127 exp(s - ref)), one accumulator of P V over all steps (no fold of a
  step's product into O), the reference raised by whole powers of two where a row's running
  max passes it and the accumulator shifted right by as many bits (exact up to the bits an
  integer accumulator would drop, which do not change the result measurably). The row sums
  are not quantized, so they are taken once from the final max. ``p_quant`` is unused (the
  rounding is part of the scheme)."""
  del p_quant
  ln2 = np.log(2.0)
  m = ref = None
  acc = np.zeros((s.shape[0], v.shape[1]))
  vq = v_quant(v)
  for j in range(0, s.shape[1], STEP):
    sj = s[:, j:j + STEP]
    step_max = sj.max(axis=1, keepdims=True)
    m = step_max if m is None else np.maximum(m, step_max)
    rise = 0.0 if ref is None else np.ceil(np.maximum(m - ref, 0.0) / ln2)  # powers of two
    ref = m.copy() if ref is None else ref + rise * ln2
    acc = acc * np.exp2(-rise) + np.round(LEVELS * np.exp(sj - ref)) @ vq[j:j + STEP]
  l = np.exp(s - m).sum(axis=1, keepdims=True)
  return acc / LEVELS * np.exp(ref - m) / l


RECIPES = {
    # name: (int8 Q K^T, P quantizer, V quantizer)
    "bf16 P V": (False, _bf16, _bf16),
    "e4m3 P V": (False, p_e4m3, v_e4m3_per_channel),
    "int8 P V": (False, p_int8_per_row, v_int8_per_channel_block),
    "int8 QK, bf16 P V": (True, _bf16, _bf16),
    "int8 QK, e4m3 P V": (True, p_e4m3, v_e4m3_per_channel),
    "int8 QK, int8 P V": (True, p_int8_per_row, v_int8_per_channel_block),
    "running int8 P V": (False, None, v_int8_per_channel),
}
# Recipes with a loop of their own (default: online_attention).
LOOPS = {"running int8 P V": running_int8_attention}


def errors(queries: int = 256, keys: int = 10368, head_dim: int = 128,
           seed: int = 0, logit_std: float = 1.0) -> dict[str, float]:
  """{recipe: relative L2 error against float64 attention} on standard normal q, k, v
  (``keys`` attended by every query: 10,368 is the paper shape's 3x3x3 window), the scores
  scaled so that their standard deviation is about ``logit_std``."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((n, head_dim)) for n in (queries, keys, keys))
  scale = head_dim ** -0.5 * logit_std
  s = (q @ k.T) * scale
  p = np.exp(s - s.max(axis=1, keepdims=True))
  want = (p @ v) / p.sum(axis=1, keepdims=True)
  s8 = scores_int8(q, k, scale)
  out = {}
  for name, (qk_int8, p_quant, v_quant) in RECIPES.items():
    got = LOOPS.get(name, online_attention)(s8 if qk_int8 else s, v, p_quant, v_quant)
    out[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
  return out


def main(argv=None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--queries", type=int, default=256)
  p.add_argument("--keys", type=int, default=10368)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--logit-std", type=float, default=1.0,
                 help="the scores' standard deviation (1: q, k standard normal, 1/sqrt(d))")
  a = p.parse_args(argv)
  if min(a.queries, a.keys, a.head_dim) < 1:
    p.error("--queries, --keys and --head-dim must be >= 1")
  if not a.logit_std > 0:
    p.error("--logit-std must be > 0")
  got = errors(a.queries, a.keys, a.head_dim, a.seed, a.logit_std)
  for name, err in got.items():
    print(f"{name:22s} {err:.2e}")
  return got


if __name__ == "__main__":
  main()
