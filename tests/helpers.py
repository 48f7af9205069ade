"""Helpers shared by the tests: random inputs, error measures, the one "matches the float32
reference" check every backend runs, padding and NaN checks, and CPU-device subprocesses.

Imported as ``from helpers import ...`` (the tests directory is on sys.path under pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta.reference import reference_mask
from pallas_kernels.mosaic.backend import MosaicBackend



# The Hopper backend with its own config: kernels in GPU interpret mode (CPU tests), and the
# split (deterministic) backward. Passed as implementation= objects. The compiled ones below
# other than MOSAIC_PERSISTENT run the forward without persistent CTAs (persistent=False):
# the default ("auto") runs it persistent where work items are short, which most test cases'
# are, and the forward the long items of real shapes run must stay checked on them too.
MOSAIC_INTERPRET = MosaicBackend(interpret=True)
MOSAIC_SPLIT = MosaicBackend(backward_variant="split", persistent=False)
# The Hopper kernels on 128 x 128 blocks of consecutive rows where "auto" would gather work
# items (tiles of 64 or 192 tokens): both modes checked on the same cases.
MOSAIC_BLOCKS = MosaicBackend(key_steps="blocks", persistent=False)
# The options that are off until timed: no automatic barriers in the forward and the split
# backward (MosaicConfig.auto_barriers; the fused backward runs without them by default;
# interpret mode keeps them), the forward's softmax under P V (overlap_exp), its O rescale
# under Q K^T (rescale_under_qk) and the exponentials of 32 key columns a step on the FMA
# pipe (exp2_fma_columns: off, slower in the bf16 forward, undecided in the 8-bit one),
# compiled and in interpret mode.
MOSAIC_LEAN = MosaicBackend(auto_barriers=False, overlap_exp=True, rescale_under_qk=True,
                            exp2_fma_columns=32, persistent=False)
MOSAIC_INTERPRET_LEAN = MosaicBackend(interpret=True, auto_barriers=False, overlap_exp=True,
                                      rescale_under_qk=True, exp2_fma_columns=32)
# Each forward item's masked steps in a key loop of their own (MosaicConfig.masked_steps_apart;
# not with rescale_under_qk), with the other forward options off until timed.
MOSAIC_APART = MosaicBackend(masked_steps_apart=True, overlap_exp=True, auto_barriers=False,
                             persistent=False)
# The persistent forward (MosaicConfig.persistent) on 7 CTAs, so that each walks several work
# items at the test shapes (the real launch has one CTA per SM).
MOSAIC_PERSISTENT = MosaicBackend(persistent=True, persistent_ctas=7)
# The fused backward's float32 dQ (and grouped dK/dV) staged and added in the wgmma fragments'
# order (MosaicConfig.bwd_dq_fragments, off until timed), compiled and in interpret mode (where
# the parts are rearranged as values instead of stored by each thread).
MOSAIC_FRAGMENTS = MosaicBackend(bwd_dq_fragments=True, persistent=False)
MOSAIC_INTERPRET_FRAGMENTS = MosaicBackend(interpret=True, bwd_dq_fragments=True)


def backend_id(backend) -> str:
  """A short test id for a backend name or one of the backend objects above."""
  if isinstance(backend, str):
    return backend
  return {MOSAIC_INTERPRET: "pallas_mosaic_interpret", MOSAIC_SPLIT: "pallas_mosaic_split",
          MOSAIC_BLOCKS: "pallas_mosaic_blocks",
          MOSAIC_LEAN: "pallas_mosaic_lean", MOSAIC_PERSISTENT: "pallas_mosaic_persistent",
          MOSAIC_APART: "pallas_mosaic_apart", MOSAIC_FRAGMENTS: "pallas_mosaic_fragments",
          MOSAIC_INTERPRET_FRAGMENTS: "pallas_mosaic_interpret_fragments",
          MOSAIC_INTERPRET_LEAN: "pallas_mosaic_interpret_lean"}.get(
      backend, backend.name)


def random_qkv(seed: int, spec: jsta.STASpec, batch: int, heads: int, head_dim: int,
               dtype=jnp.float32):
  """q, k, v: [batch, spec.seq_len, heads, head_dim] standard normal, in ``dtype``."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, spec.seq_len, heads, head_dim)
  return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)


def np_f32(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32))


def rel_l2(got, want) -> float:
  """||got - want|| / ||want|| in float64 (0 when both are zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def interpreted(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` where Mosaic GPU kernels may run in GPU interpret mode: after an
  error the interpreter's global state must be reset before its next use."""
  try:
    return fn(*args, **kwargs)
  except Exception:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    raise


def run_on_cpu_devices(args: list[str], devices: int, timeout: float):
  """Runs ``python *args`` in a subprocess on ``devices`` fake CPU devices (XLA_FLAGS must be
  set before JAX starts, hence the subprocess); returns the CompletedProcess (text output)."""
  # The caller's XLA_FLAGS (conftest.py's compile flags) and the device count.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        timeout=timeout)


def _loss_and_grads(attend, w, *, one_program: bool = True, inference: bool = False):
  """jit(value_and_grad) of sum(attend(q, k, v) * w): returns ((loss, o), (dq, dk, dv)), and
  with ``inference`` a third result: attend(q, k, v) called outside any differentiation (the
  op's inference path, which need not run the same code as its VJP's forward).

  ``one_program=False`` runs the forward and the backward as separate calls (``jax.vjp``):
  kernels in GPU interpret mode block on host callbacks, and in one XLA program on a machine
  with few cores they can wait on each other for ever.
  """
  def loss(q, k, v):
    o = attend(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * w), o
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  if one_program:
    if inference:
      return jax.jit(lambda q, k, v: (*grad(q, k, v), attend(q, k, v)))
    return jax.jit(grad)

  def run(q, k, v):
    o, pull = jax.vjp(attend, q, k, v)
    out = (jnp.sum(o.astype(jnp.float32) * w), o), pull(w.astype(o.dtype))
    return (*out, attend(q, k, v)) if inference else out
  return run


def check_matches_reference(spec: jsta.STASpec, batch: int, heads: int, head_dim: int, dtype,
                            *, backend, block_q=None, block_kv=None, scale=None,
                            seed: int = 0, tol: float | None = None):
  """The op's output and the gradients of sum(o * w) match the dense float32 reference.

  Inputs are standard normal (the reference sees the same rounded values); w is random on
  every row. Also: shapes and dtypes, all finite, exact zeros at padded positions.
  ``tol`` (relative L2) defaults to 1e-4 for float32 and 2e-2 for bf16/fp16.
  """
  q, k, v = random_qkv(seed, spec, batch, heads, head_dim, dtype)
  w = jax.random.normal(jax.random.key(seed + 100), q.shape, jnp.float32)
  (_, o), grads = _loss_and_grads(lambda q, k, v: jsta.sliding_tile_attention(
      q, k, v, spec, scale=scale, implementation=backend, block_q=block_q,
      block_kv=block_kv),
      w, one_program=backend != MOSAIC_INTERPRET)(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  (_, ro), rgrads = _loss_and_grads(
      lambda q, k, v: jsta.reference_attention(q, k, v, spec, scale=scale), w)(*f32)
  chex.assert_shape([o, *grads], q.shape)
  chex.assert_type([o, *grads], dtype)
  tol = tol or (1e-4 if dtype == jnp.float32 else 2e-2)
  invalid = ~np.asarray(jsta.token_valid(spec))
  for name, got, want in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
    got = np_f32(got)
    assert np.isfinite(got).all(), f"{name}: {int((~np.isfinite(got)).sum())} non-finite values"
    assert (got[:, invalid] == 0).all(), f"{name}: non-zero values at padded positions"
    err = rel_l2(got, want)
    assert err < tol, f"{name}: relative L2 error {err:.3g} >= {tol} against the reference"


def padded_inputs(seed: int, spec: jsta.STASpec, batch: int, heads: int, head_dim: int, dtype,
                  *, scale: float, logit_std: float = 1.0, garbage: float | str = 10.0):
  """(q, k, v, valid) for checking that padded positions never matter.

  q is scaled so that the logits q.k * scale of valid tokens have standard deviation
  ``logit_std``; k, v are standard normal. Padded positions (``valid`` False: padded latent
  positions and padded text slots, bool[spec.seq_len]) hold ``garbage``: a float is the
  standard deviation of random values there (as a previous layer could leave), "nan" or
  "inf" fills them with that value.
  """
  valid = np.asarray(jsta.token_valid(spec))
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, spec.seq_len, heads, head_dim)
  q_std = logit_std / (scale * head_dim ** 0.5)
  clean = [jax.random.normal(kk, shape, jnp.float32) * s
           for kk, s in zip(keys[:3], (q_std, 1.0, 1.0))]
  if isinstance(garbage, str):
    junk = jnp.full(shape, {"nan": jnp.nan, "inf": jnp.inf}[garbage], jnp.float32)
  else:
    junk = jax.random.normal(keys[3], shape, jnp.float32) * garbage
  m = jnp.asarray(valid)[None, :, None, None]
  return (*(jnp.where(m, x, junk).astype(dtype) for x in clean), valid)


def check_padding_never_leaks(spec: jsta.STASpec, batch: int, heads: int, head_dim: int, dtype,
                              *, backend, scale: float, logit_std: float = 1.0,
                              garbage: float | str | tuple = (10.0, "nan"), block_q=None,
                              block_kv=None, seed: int = 0, tol: float = 2e-2):
  """The op's output and the gradients of sum(o * w) (w random, padded rows included) are
  finite, exactly zero at padded positions, and match the float32 reference on the valid ones;
  so is the output of an inference call (no VJP). The reference sees zeros at padded
  positions: what is stored there must not matter. ``garbage``: one kind of padding content
  (:func:`padded_inputs`) or several, each run through the same compiled programs (the valid
  positions hold the same values for every kind, so one reference serves them all)."""
  kinds = garbage if isinstance(garbage, tuple) else (garbage,)
  w = None
  run = reference = None
  for kind in kinds:
    q, k, v, valid = padded_inputs(seed, spec, batch, heads, head_dim, dtype, scale=scale,
                                   logit_std=logit_std, garbage=kind)
    if run is None:
      w = jax.random.normal(jax.random.key(seed + 1), q.shape, jnp.float32)
      run = _loss_and_grads(lambda q, k, v: jsta.sliding_tile_attention(
          q, k, v, spec, scale=scale, implementation=backend, block_q=block_q,
          block_kv=block_kv),
          w, one_program=backend != MOSAIC_INTERPRET, inference=True)
      m = jnp.asarray(valid)[None, :, None, None]
      clean = [jnp.where(m, x, 0).astype(jnp.float32) for x in (q, k, v)]
      (_, ro), rgrads = _loss_and_grads(
          lambda q, k, v: jsta.reference_attention(q, k, v, spec, scale=scale), w)(*clean)
      reference = (ro, *rgrads, ro)
    (_, o), grads, o_inference = run(q, k, v)
    for name, got, want in zip(("o", "dq", "dk", "dv", "o (inference)"),
                               (o, *grads, o_inference), reference):
      got, want = np_f32(got), np_f32(want)
      where = f"{name} with {kind!r} in the padding"
      assert np.isfinite(got).all(), (
          f"{where}: {int((~np.isfinite(got)).sum())} non-finite values")
      assert (got[:, ~valid] == 0).all(), f"{where}: non-zero values at padded positions"
      err = rel_l2(got[:, valid], want[:, valid])
      assert err < tol, f"{where}: relative L2 error {err:.3g} against the float32 reference"


def check_valid_nan_propagates(spec: jsta.STASpec, heads: int, head_dim: int, dtype, *,
                               backend, block_q=None, block_kv=None, seed: int = 0):
  """A NaN in one valid key (and, separately, one valid value) reaches exactly the queries
  that attend it, as in dense attention: real bugs upstream stay visible.

  Known exception (docs/SEMANTICS.md): where a block pair spans two tiles (the Hopper kernels'
  128-row blocks on tiles that are not a multiple of 128 tokens, or such blocks chosen
  explicitly), a NaN *value* also reaches the rows of that block that do not attend it (the
  block's P V product multiplies their zero probabilities by it); it never reaches other
  blocks.
  """
  q, k, v = random_qkv(seed, spec, 1, heads, head_dim, dtype)
  valid = np.flatnonzero(jsta.token_valid(spec))
  pos = int(valid[np.random.default_rng(seed).integers(valid.size)])
  attends = reference_mask(spec, heads)[:, :, pos]                  # [heads, seq]
  attend = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(
      q, k, v, spec, implementation=backend, block_q=block_q, block_kv=block_kv))
  plan = jsta.make_plan(spec, heads, head_dim, q.dtype, implementation=backend, block_q=block_q,
                        block_kv=block_kv)
  sched = plan.schedule
  spans = sched.has_partial_pairs
  for poisoned in ("k", "v"):
    args = dict(q=q, k=k, v=v)
    args[poisoned] = args[poisoned].at[:, pos].set(jnp.nan)
    o = np_f32(attend(**args))[0]                                    # [seq, heads, dim]
    nan_rows = np.isnan(o).any(axis=-1).T                            # [heads, seq]
    if poisoned == "v" and spans:
      # The rows of every query block that visits the poisoned key's block.
      j = pos // sched.block_kv
      blocks = np.zeros((heads, sched.num_q_blocks), bool)
      for h in range(heads):
        g = sched.head_to_group[h]
        for i in range(sched.num_q_blocks):
          blocks[h, i] = j in sched.kv_index[g, i, :sched.kv_count[g, i]]
      allowed = np.repeat(blocks, sched.block_q, axis=1)[:, :spec.seq_len]
      assert (nan_rows >= attends).all() and (nan_rows <= allowed).all(), (
          f"NaN in v[{pos}] reaches rows outside the blocks that visit it")
      continue
    np.testing.assert_array_equal(nan_rows, attends, err_msg=f"NaN in {poisoned}[{pos}]")
