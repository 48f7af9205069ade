"""The Hopper (pallas_mosaic) kernels at a benchmark shape, section by section.

    python -m benchmarks.kernels.mosaic --out ./out                   # paper shape, all sections
    python -m benchmarks.kernels.mosaic --sections fwd --windows "3,3,3;5,5,5;dense"
    python -m benchmarks.kernels.mosaic --shape wan14b_720p --sections bwd,op

Sections (--sections, default all four):
  fwd   the forward kernel (``backend.forward``) per config of --fwd-configs ("masked" and
        "partial" compile that mask path in where the schedule needs none: its cost per step,
        e.g. ``--fwd-configs default,masked,partial,masked+partial`` at the paper shape;
        "same_keys": every step reads its item's first key block again, unchecked: K/V always
        in L2, the same arithmetic);
  bwd   the fused and the split backward (``backend.backward`` with a ``MosaicConfig`` whose
        ``backward_variant`` picks it) per --bwd-stages, and the split backward's dQ and dK/dV
        kernels alone;
  op    the op's fwd+bwd (jax.grad of sum(o * do) through ``jsta.sliding_tile_attention``) with
        each backward, and the op's forward;
  glue  what the fused backward adds around its kernel, each as its own jitted call: the delta
        reduction (einsum), the dQ accumulator's zero fill, its scale and cast; and the kernel
        with its zero fill alone.
The fwd, bwd and op sections run their cases in --rounds interleaved rounds (the GPU drifts
by a few percent over minutes). Before it is timed every kernel result is checked against the
float32 reference on sampled
query rows (the output; for the backward and the op the gradients of those rows), the glue
against float64 NumPy on the same rows. TFLOP/s counts attended pairs (``spec.flops``); the
backward counts 2.5x the forward, fwd+bwd 3.5x, the dQ kernel 1.5x, the dK/dV kernel 2x.
Writes TAG.json (--tag, default mosaic) into --out after every row and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import (WINDOWS_HELP, Record, forward_error, grad_errors, parse_windows,
                               random_inputs, rel_l2, run_meta, sample_rows, timed, window_name)
from pallas_kernels.mosaic import backend as backend_lib
from pallas_kernels.mosaic import config as config_lib
from pallas_kernels.mosaic import dq_fragments
from pallas_kernels.mosaic.backward_fused import (dq_acc_shape, fused_backward_call,
                                                  fused_backward_jit)
from pallas_kernels.mosaic.backward_split import dkdv_call, dq_call
from pallas_kernels.mosaic.forward import forward_jit

SECTIONS = ("fwd", "bwd", "op", "glue")
TOL = 2e-2   # relative L2 against the float32 reference (bf16 inputs give ~2e-3)
F32 = jnp.float32


@dataclasses.dataclass
class Case:
  """One timed call: ``fn(*args)`` (jitted), its FLOPs, and the check to run before timing
  (returns the row's error fields)."""

  section: str
  name: str
  fn: Callable
  args: tuple
  flops: float = 0.0
  check: Callable[[], dict] | None = None
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The paper-style inputs of one window: q, k, v, do on the default schedule's sequence
  (the spec's plus any block padding), the forward's o and lse, sampled check rows."""

  spec: jsta.STASpec
  sched: jsta.BlockSchedule
  config: config_lib.MosaicConfig
  q: jax.Array
  k: jax.Array
  v: jax.Array
  do: jax.Array
  o: jax.Array
  lse: jax.Array
  rows: np.ndarray
  scale: float

  @property
  def fwd_flops(self) -> float:
    return float(self.spec.flops(self.q.shape[-1], self.q.shape[2]) * self.q.shape[0])


def fwd_config(token: str, base: config_lib.MosaicConfig, head_dim: int) -> config_lib.MosaicConfig:
  """A forward config from ``base`` (the backend's default for the shape) and '+'-joined
  changes: 'default', 'kv64'/'kv128'/'kv192' (key block; 192 only where no key is padded and
  no pair is partial, e.g. the paper shape; the pipeline depth follows default_stages unless
  given), 's2'..'s4' (pipeline depth), 'sb' / 'nosb' (the ping-pong of the compute
  warpgroups on, or off: the default), 'noab' (no automatic barriers:
  MosaicConfig.auto_barriers), 'ox' (the softmax under the previous P V:
  MosaicConfig.overlap_exp), 'rq' (O's rescale under the step's Q K^T:
  MosaicConfig.rescale_under_qk), 'pers' (the persistent forward:
  MosaicConfig.persistent), 'apart' / 'together' (each item's masked steps in a loop of
  their own, the backend's default where it applies, or in one loop with the others:
  MosaicConfig.masked_steps_apart), 'fma32' (the exponentials of a step's last 32 key
  columns on the FMA pipe: MosaicConfig.exp2_fma_columns), 'r240' (240
  registers per compute thread, the rest to the producer),
  'blocks' / 'gathered' (a key step is a 128-key block / two gathered 64-key units; the
  default picks by the schedule, see MosaicConfig.key_steps), 'window' (the work items
  launched in the window's order: MosaicConfig.launch_order), 'long<N>' (items whose lists
  are longer than N times the median first: MosaicConfig.long_items_first). E.g. 'kv64', 'nosb',
  'kv128+s3', 'r240', 'blocks'. (:func:`forward_cases` also takes the FORCED_PATHS
  'masked' and 'partial', which are not config changes.)"""
  changes, stages = {}, None
  for part in token.split("+"):
    if part == "default":
      continue
    if part in ("sb", "nosb"):
      changes["use_schedule_barrier"] = part == "sb"
    elif part == "noab":
      changes["auto_barriers"] = False
    elif part == "ox":
      changes["overlap_exp"] = True
    elif part == "rq":
      changes["rescale_under_qk"] = True
    elif part == "pers":
      changes["persistent"] = True
    elif part == "apart":
      changes["masked_steps_apart"] = True
    elif part == "together":
      changes["masked_steps_apart"] = False
    elif part in ("blocks", "gathered"):
      changes["key_steps"] = part
    elif part == "window":
      changes["launch_order"] = "window"
    elif part.startswith("long") and part[4:].isdigit():
      changes["long_items_first"] = float(part[4:])
    elif part.startswith("fma") and part[3:].isdigit():
      changes["exp2_fma_columns"] = int(part[3:])
    elif part.startswith("r") and part[1:].isdigit():
      compute = int(part[1:])
      producer = (config_lib.LAUNCH_REGISTERS - 2 * 128 * compute) // 128 // 8 * 8
      changes["forward_registers"] = (compute, producer)
    elif part.startswith("kv") and part[2:].isdigit():
      changes["block_kv"] = int(part[2:])
    elif part.startswith("s") and part[1:].isdigit():
      stages = int(part[1:])
    else:
      raise ValueError(f"unknown forward config part {part!r} in {token!r} "
                       "(default, kv64, kv128, kv192, s2..s4, sb, nosb, noab, ox, rq, pers, "
                       "apart, together, fma<N>, window, long<N>, "
                       "r232/r240 (compute registers), "
                       "blocks, gathered, and in forward cases masked, partial, joined by '+')")
  if (changes.get("persistent") or changes.get("rescale_under_qk")) and (
      "masked_steps_apart" not in changes):
    changes["masked_steps_apart"] = False   # the backend's "auto" does not combine with them
  cfg = dataclasses.replace(base, **changes)
  if stages is None and ("block_kv" in changes or "persistent" in changes):
    stages = config_lib.default_stages(cfg.block_q, cfg.block_kv, head_dim,
                                       q_buffers=2 if cfg.persistent else 1)
  return dataclasses.replace(cfg, max_concurrent_steps=stages) if stages else cfg


def _fit(x, n: int):
  """x with n positions on axis 1 (zero padding at the end, or cut)."""
  if x.shape[1] >= n:
    return x[:, :n]
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _grad_check(x: Inputs, grad_fn) -> Callable[[], dict]:
  def check():
    errs = grad_errors(grad_fn, x.q, x.k, x.v, x.do, x.spec, x.rows, x.scale)
    return dict(grad_rel_l2_err=list(errs), ok=max(errs) <= TOL)
  return check


def _rows_check(got_fn, want_fn) -> Callable[[], dict]:
  """Glue checks: float32 result on the sampled rows against float64 NumPy."""
  def check():
    err = rel_l2(got_fn(), want_fn())
    return dict(rel_l2_err=err, ok=err <= 1e-5)
  return check


# Forward tokens that are not config changes: compile the key-mask path ("masked") or the
# per-warpgroup unit masks ("partial") into the kernel whether or not the schedule needs them.
# No step is flagged where the schedule needs neither, so the result is the same: the rows time
# what the compiled-in paths cost per step (docs/PERFORMANCE.md, "Where the time goes").
FORCED_PATHS = ("masked", "partial")
# A forward ablation token: every step of a work item reads the item's first key block (or
# first two 64-key units) again, so the same kernel does the same arithmetic with its K/V
# always in L2 (and mostly in the SM's path to it): what the schedule's spread of keys costs
# against K/V that stay close, in time and, under the clock log, in the clock the GPU holds at
# its power cap. Its result is not attention: no check.
SAME_KEYS = "same_keys"


def _split_token(token: str, names, empty: str) -> tuple[str, frozenset]:
  """(``token``'s '+'-joined parts other than ``names``, or ``empty`` where none is left; the
  parts that are in ``names``)."""
  parts = token.split("+")
  rest = "+".join(p for p in parts if p not in names)
  return rest or empty, frozenset(p for p in parts if p in names)


def split_forced(token: str) -> tuple[str, frozenset]:
  """(the config part of a forward token, the FORCED_PATHS and SAME_KEYS it names):
  'partial+blocks' -> ('blocks', {'partial'})."""
  return _split_token(token, FORCED_PATHS + (SAME_KEYS,), "default")


def same_keys(kv_index: jax.Array, gather: bool) -> jax.Array:
  """kv_index [G, nq, steps] (gathered: [G, nq, 2 * steps], two units a step) with every step
  replaced by the item's first (:data:`SAME_KEYS`)."""
  first = kv_index[..., :2] if gather else kv_index[..., :1]
  return jnp.tile(first, (1, 1, kv_index.shape[-1] // first.shape[-1]))


# A backward ablation token (``--variants fused+spread_text``): each key block's text query
# pieces are replaced by video pieces spread over the sequence, so that the dQ reduce-adds of
# a text piece, which every video key block of a head adds into the same 64 rows, land on
# rows that few key blocks share; the same kernel, pieces and products. What the text rows'
# shared dQ rows cost (reduce-adds to the same L2 lines from every CTA of a head). Its result
# is not the gradient: no check.
SPREAD_TEXT = "spread_text"


def spread_text_pieces(piece_index: np.ndarray, piece_count: np.ndarray,
                       video_pieces: int) -> np.ndarray:
  """piece_index [G, nkv, max_pieces] (64-row query pieces of each key block or gathered
  dK/dV work item, the first
  ``piece_count`` of them scheduled) with every scheduled text piece (index >=
  ``video_pieces``) of a video key block (one that streams fewer than all the pieces) replaced
  by a video piece not in its list, chosen from a spread of the sequence
  (:data:`SPREAD_TEXT`); a list of more pieces than there are video pieces (a text key block,
  which every query attends) is left as it is."""
  out = np.array(piece_index, copy=True)
  groups, nkv, _ = out.shape
  for g in range(groups):
    for j in range(nkv):
      n = int(piece_count[g, j])
      row = out[g, j, :n]
      text = np.flatnonzero(row >= video_pieces)
      if text.size == 0 or n > video_pieces:       # no room: a text key block (every piece)
        continue
      taken = set(row[row < video_pieces].tolist())
      candidate = (j * 977) % video_pieces          # a stride coprime to the usual lengths
      for t in text:
        while candidate in taken:
          candidate = (candidate + 1) % video_pieces
        row[t] = candidate
        taken.add(candidate)
      out[g, j, :n] = row
  return out


def forward_cases(x: Inputs, tokens, interpret: bool = False) -> list[Case]:
  head_dim = x.q.shape[-1]
  cases = []
  for token in tokens:
    config_token, forced = split_forced(token)
    cfg = dataclasses.replace(fwd_config(config_token, x.config, head_dim), interpret=interpret)
    sched = jsta.block_schedule(x.spec, x.sched.num_heads, cfg.block_q, cfg.block_kv)
    q, k, v = (_fit(a, sched.seq_len) for a in (x.q, x.k, x.v))
    if forced:
      ops, partial, gather = backend_lib.forward_operands(sched, cfg, batch=q.shape[0])
      if SAME_KEYS in forced:
        ops = ops._replace(kv_index=same_keys(ops.kv_index, gather))
      fn = jax.jit(lambda q, k, v, ops=ops, cfg=cfg, gather=gather, masked=(
          sched.has_masked_keys or "masked" in forced), partial=partial or "partial" in forced:
          forward_jit(q, k, v, ops, scale=float(x.scale), config=cfg, masked=masked,
                      partial=partial, gather=gather))
    else:
      fn = jax.jit(lambda q, k, v, sched=sched, cfg=cfg: backend_lib.forward(
          q, k, v, sched, x.scale, cfg))

    def check(fn=fn, q=q, k=k, v=v, ablation=SAME_KEYS in forced):
      if ablation:
        return dict(ok=bool(jnp.isfinite(fn(q, k, v)[0]).all()), check="none: same_keys")
      err = forward_error(fn(q, k, v)[0], q, k, v, x.spec, x.rows, x.scale)
      return dict(rel_l2_err=err, ok=err <= TOL)
    cases.append(Case("fwd", f"fwd {token}", fn, (q, k, v), x.fwd_flops, check,
                      dict(config=dataclasses.asdict(cfg), forced_paths=sorted(forced))))
  return cases


# Backward variant tokens of --variants: the config fields each sets.
VARIANTS = {
    # The fused backward as it runs by default: K, V and key-column descriptors derived in
    # every step, no automatic barriers (MosaicConfig.bwd_step_descriptors,
    # fused_bwd_auto_barriers).
    "fused": dict(backward_variant="fused"),
    "split": dict(backward_variant="split"),
    # The fused backward with each of those two defaults undone, and with both (as it ran
    # before 2026-12-05).
    "fused_hoisted_descriptors": dict(backward_variant="fused", bwd_step_descriptors=False),
    "fused_auto_barriers": dict(backward_variant="fused", fused_bwd_auto_barriers=True),
    "fused_2026_12_04": dict(backward_variant="fused", bwd_step_descriptors=False,
                             fused_bwd_auto_barriers=True),
    # The fused backward with each piece's lse and dQ row loaded before its products are
    # waited for (MosaicConfig.bwd_early_loads, the default since 2026-12-06), and without.
    "fused_early": dict(backward_variant="fused", bwd_early_loads=True),
    "fused_late": dict(backward_variant="fused", bwd_early_loads=False),
    # The dQ reduce-adds issued by the producer warpgroup (MosaicConfig.bwd_dq_writer).
    "fused_writer": dict(backward_variant="fused", bwd_dq_writer=True),
    # The dQ parts staged and added in the wgmma fragments' order (MosaicConfig.
    # bwd_dq_fragments), alone and with the dQ writer.
    "fused_frag": dict(backward_variant="fused", bwd_dq_fragments=True),
    "fused_frag_writer": dict(backward_variant="fused", bwd_dq_fragments=True,
                              bwd_dq_writer=True),
    # The work items launched with only lists over 4x the median first (the text's), in the
    # sequence's order or the window's (MosaicConfig.long_items_first, launch_order).
    "fused_long4": dict(backward_variant="fused", long_items_first=4.0),
    "fused_window": dict(backward_variant="fused", launch_order="window", long_items_first=4.0),
    # The text rows' dQ in 8 copies (MosaicConfig.bwd_text_dq_copies; shapes with text).
    "fused_text8": dict(backward_variant="fused", bwd_text_dq_copies=8),
    # The split backward's dQ kernel with dP issued under the exponentials (overlap_exp).
    "split_lean": dict(backward_variant="split", overlap_exp=True, auto_barriers=False),
    # Every option that is off until timed, forward and fused backward (in the op section the
    # forward runs with it too).
    "lean": dict(backward_variant="fused", auto_barriers=False, overlap_exp=True,
                 rescale_under_qk=True),
}


def split_ablation(token: str) -> tuple[str, bool]:
  """(the variant part of a backward token, whether it names :data:`SPREAD_TEXT`):
  'fused+spread_text' -> ('fused', True)."""
  rest, named = _split_token(token, (SPREAD_TEXT,), "fused")
  return rest, bool(named)


def variant_config(token: str, base: config_lib.MosaicConfig) -> config_lib.MosaicConfig:
  """The config of a backward variant token (:data:`VARIANTS`)."""
  token = split_ablation(token)[0]
  if token not in VARIANTS:
    raise ValueError(f"unknown backward variant {token!r} ({', '.join(VARIANTS)})")
  changes = dict(VARIANTS[token])
  if changes.get("rescale_under_qk"):
    changes.setdefault("masked_steps_apart", False)   # as the backend's "auto" does
  return dataclasses.replace(base, **changes)


def _transposed(x: Inputs):
  """(dK/dV key block, their operands, partial, gather) as ``backend.backward`` builds them."""
  t_ops, bkd, partial, gather = backend_lib.backward_operands(x.sched, x.config)
  return bkd, t_ops, partial, gather


def backward_cases(x: Inputs, variants, stages) -> list[Case]:
  cases = []
  head_dim = x.q.shape[-1]
  bkd, t_ops, partial_t, gather_t = _transposed(x)
  for variant in variants:
    base = variant_config(variant, x.config)
    if (base.backward_variant == "fused"
        and not backend_lib.use_fused_backward(head_dim, bkd, x.config)):
      print(f"bwd: no fused backward at head_dim {head_dim} with {bkd}-row key blocks", flush=True)
      continue
    spread = split_ablation(variant)[1]
    if spread and (base.backward_variant != "fused" or not x.spec.text_max_len):
      print(f"bwd: {variant} needs the fused backward and text slots", flush=True)
      continue
    if spread:
      spread_ops = t_ops._replace(piece_index=jnp.asarray(spread_text_pieces(
          np.asarray(t_ops.piece_index), np.asarray(t_ops.piece_count),
          x.spec.padded_video_len // config_lib.WG_ROWS)))
    for st in stages:
      cfg = dataclasses.replace(base, bwd_max_concurrent_steps=st)
      args = (x.q, x.k, x.v, x.o, x.lse, x.do)
      info = dict(variant=variant, config=dataclasses.asdict(cfg))
      if spread:
        fn = jax.jit(lambda q, k, v, o, lse, do, cfg=cfg, ops=spread_ops: fused_backward_jit(
            q, k, v, o, lse, do, ops, scale=float(x.scale), config=cfg, block_kv=bkd,
            masked=x.sched.has_masked_keys, partial=partial_t, gather=gather_t))

        def check(fn=fn, args=args):
          finite = all(bool(jnp.isfinite(g).all()) for g in fn(*args))
          return dict(ok=finite, check=f"none: {SPREAD_TEXT}")
        cases.append(Case("bwd", f"bwd {variant} s{st}", fn, args, 2.5 * x.fwd_flops, check,
                          info))
        continue
      fn = jax.jit(lambda q, k, v, o, lse, do, cfg=cfg: backend_lib.backward(
          q, k, v, o, lse, do, x.sched, x.scale, cfg))
      cases.append(Case("bwd", f"bwd {variant} s{st}", fn, args, 2.5 * x.fwd_flops,
                        _grad_check(x, lambda d, fn=fn: fn(x.q, x.k, x.v, x.o, x.lse, d)),
                        info))
  if "split" in variants:
    # The split backward's two kernels alone (delta precomputed), checked together.
    # (Its default config; "split_lean" runs only as a whole backward.)
    cfg = dataclasses.replace(x.config, backward_variant="split")
    masked = x.sched.has_masked_keys
    ops, partial, gather = backend_lib.forward_operands(x.sched, cfg)
    dq = jax.jit(lambda q, k, v, do, lse, delta: dq_call(
        q, k, v, do, lse, delta, ops, scale=x.scale, config=cfg, masked=masked,
        partial=partial, gather=gather))
    dkdv = jax.jit(lambda q, k, v, do, lse, delta: dkdv_call(
        q, k, v, do, lse, delta, t_ops, scale=x.scale, block_kv=bkd, config=cfg, masked=masked,
        partial=partial_t, gather=gather_t))
    delta = _delta(x.o, x.do)

    def both(d):
      dl = _delta(x.o, d)
      return (dq(x.q, x.k, x.v, d, x.lse, dl), *dkdv(x.q, x.k, x.v, d, x.lse, dl))
    args = (x.q, x.k, x.v, x.do, x.lse, delta)
    info = dict(variant="split", config=dataclasses.asdict(cfg))
    cases.append(Case("bwd", "bwd split: dQ kernel", dq, args, 1.5 * x.fwd_flops,
                      _grad_check(x, both), info))
    cases.append(Case("bwd", "bwd split: dK/dV kernel", dkdv, args, 2.0 * x.fwd_flops, None,
                      info))
  return cases


def _variant_backend(variant: str, x: Inputs, interpret: bool):
  """(a label for the records, the pallas_mosaic backend whose config for this shape's blocks
  takes ``variant``'s backward), the backend object passed to the op as ``implementation``."""
  head_dim = x.q.shape[-1]
  key = (x.sched.block_q, x.sched.block_kv, head_dim)
  name = (f"pallas_mosaic_bench_{variant}_{'x'.join(map(str, key))}"
          + ("_interpret" if interpret else ""))
  cfg = dataclasses.replace(variant_config(variant, x.config), interpret=interpret)
  return name, dataclasses.replace(backend_lib.BACKEND, interpret=interpret,
                                   configs=((key, cfg),))


def op_cases(x: Inputs, variants, interpret: bool = False) -> list[Case]:
  s = x.spec.seq_len
  q, k, v, do = (a[:, :s] for a in (x.q, x.k, x.v, x.do))
  cases = []
  name, impl = "pallas_mosaic", "pallas_mosaic"
  for variant in variants:
    if split_ablation(variant)[1]:
      continue                      # an ablation of the bwd section's kernel, not an op
    name, impl = _variant_backend(variant, x, interpret)

    def loss(q, k, v, do, impl=impl):
      o = jsta.sliding_tile_attention(q, k, v, x.spec, implementation=impl)
      return jnp.sum(o.astype(F32) * do.astype(F32))
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    cases.append(Case("op", f"op fwd+bwd {variant}", g, (q, k, v, do), 3.5 * x.fwd_flops,
                      _grad_check(x, lambda d, g=g: g(q, k, v, d[:, :s])),
                      dict(variant=variant, backend=name)))
  fw = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, x.spec,
                                                           implementation=impl))

  def check():
    err = forward_error(fw(q, k, v), q, k, v, x.spec, x.rows, x.scale)
    return dict(rel_l2_err=err, ok=err <= TOL)
  cases.append(Case("op", "op fwd", fw, (q, k, v), x.fwd_flops, check, dict(backend=name)))
  return cases


def _delta(o, do):
  return jnp.einsum("bshd,bshd->bhs", o.astype(F32), do.astype(F32))


def glue_cases(x: Inputs) -> list[Case]:
  head_dim = x.q.shape[-1]
  bkd, t_ops, partial_t, gather_t = _transposed(x)
  cfg = dataclasses.replace(x.config, backward_variant="fused")
  if not backend_lib.use_fused_backward(head_dim, bkd, cfg):
    print(f"glue: no fused backward at head_dim {head_dim} with {bkd}-row key blocks", flush=True)
    return []
  acc_shape = dq_acc_shape(x.q.shape, bkd)
  masked = x.sched.has_masked_keys
  rows = x.rows
  q_shape, q_dtype, scale = x.q.shape, x.q.dtype, x.scale

  @jax.jit
  def kernel(q, k, v, do, lse, delta):
    acc = jax.new_ref(jnp.zeros(acc_shape, F32))
    dk, dv = fused_backward_call(q, k, v, do, lse, delta, t_ops, acc, scale=scale,
                                 block_kv=bkd, config=cfg, masked=masked,
                                 partial=partial_t, gather=gather_t)
    return dk, dv, acc[...]

  delta_fn = jax.jit(_delta)
  zero_fill = jax.jit(lambda: jnp.zeros(acc_shape, F32))
  scale_cast = jax.jit(lambda a: (a.reshape(q_shape) * scale).astype(q_dtype))

  def kernel_grads(d):
    dk, dv, acc = kernel(x.q, x.k, x.v, d, x.lse, _delta(x.o, d))
    return scale_cast(acc), dk, dv

  delta = _delta(x.o, x.do)
  acc = jax.random.normal(jax.random.key(1), acc_shape, F32)   # a dQ accumulator to scale
  f64 = lambda a: np.asarray(a, np.float64)
  # The programs multiply in float32 by the scale rounded to float32; so do the references (a
  # float64 product of two float32 values is exact, and rounds to the float32 product), or
  # about one value in 2 ** 16 lands on the other side of a bf16 rounding tie and the check
  # fails on a bf16 output (1.5e-5 against 1e-5 at wan14b_720p_w311, 2026-12-07).
  scale32 = float(np.float32(scale))
  # The same in the fragments' order (MosaicConfig.bwd_dq_fragments): put back into rows too.
  frag_acc = jax.random.normal(jax.random.key(2), dq_acc_shape(q_shape, bkd, True), F32)
  frag_cast = jax.jit(lambda a: (dq_fragments.from_fragments(a, q_shape) * scale).astype(
      q_dtype))

  def frag_rows_want():
    """The sampled rows from the 64-row pieces that hold them, put back in float64 NumPy."""
    pieces = sorted({r // 64 for r in rows})
    sub = f64(frag_acc[:, np.asarray(pieces)])
    got = dq_fragments.from_fragments(sub, (q_shape[0], 64 * len(pieces), *q_shape[2:]))
    at = [pieces.index(r // 64) * 64 + r % 64 for r in rows]
    return (np.asarray(got)[:, at] * scale32).astype(np.float32).astype(
        jnp.dtype(q_dtype)).astype(np.float64)
  return [
      Case("glue", "glue: fused kernel + zero fill", kernel,
           (x.q, x.k, x.v, x.do, x.lse, delta), 2.5 * x.fwd_flops, _grad_check(x, kernel_grads),
           dict(config=dataclasses.asdict(cfg))),
      Case("glue", "glue: delta einsum", delta_fn, (x.o, x.do), 0.0, _rows_check(
          lambda: delta_fn(x.o, x.do)[:, :, rows],
          lambda: np.einsum("bshd,bshd->bhs", f64(x.o[:, rows]), f64(x.do[:, rows])))),
      Case("glue", "glue: dQ zero fill", zero_fill, (), 0.0, _rows_check(
          lambda: zero_fill()[:, rows],
          lambda: np.zeros((acc_shape[0], len(rows), *acc_shape[2:])))),
      Case("glue", "glue: dQ scale + cast", scale_cast, (acc,), 0.0, _rows_check(
          lambda: scale_cast(acc)[:, rows],
          lambda: (f64(acc).reshape(q_shape)[:, rows] * scale32).astype(np.float32).astype(
              jnp.dtype(q_dtype)).astype(np.float64))),
      Case("glue", "glue: dQ from fragments + scale + cast", frag_cast, (frag_acc,), 0.0,
           _rows_check(lambda: frag_cast(frag_acc)[:, rows], frag_rows_want)),
  ]


def make_inputs(shape: shapes_lib.BenchShape, window, check_rows: int, interpret=False,
                seed=0, forward=None, key_steps: str = "auto") -> Inputs:
  """Inputs of one window at the backend's default blocks and config for the shape (with
  ``key_steps``, see MosaicConfig); o and lse from ``forward(q, k, v, sched, scale)``
  (default: the Mosaic forward with that config)."""
  spec = shape.spec(window)
  bq, bk = config_lib.default_blocks(spec, shape.head_dim, shape.dtype)
  cfg = dataclasses.replace(backend_lib.BACKEND.config(bq, bk, shape.head_dim),
                            interpret=interpret, key_steps=key_steps)
  sched = jsta.block_schedule(spec, shape.heads, bq, bk)
  q, k, v, do = random_inputs(shape, seq_len=sched.seq_len, seed=seed)
  scale = shape.head_dim ** -0.5
  forward = forward or (lambda q, k, v, sched, scale: backend_lib.forward(q, k, v, sched, scale,
                                                                          cfg))
  o, lse = jax.jit(lambda q, k, v: forward(q, k, v, sched, scale))(q, k, v)
  return Inputs(spec, sched, cfg, q, k, v, do, o, lse, sample_rows(spec, check_rows, seed),
                scale)


def run_case(case: Case, record: Record, *, warmup: int, iters: int, check: bool = True,
             extra: dict | None = None) -> dict:
  row = dict(section=case.section, name=case.name, **case.info, **(extra or {}))
  try:
    if check and case.check is not None:
      row.update(case.check())
    row.update(timed(case.fn, *case.args, flops=case.flops, warmup=warmup, iters=iters))
  except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
    traceback.print_exc()
    row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  return record.add(row)


def run_rounds(cases, record: Record, rounds: int, extra: dict, **kw) -> None:
  """Each case in turn, ``rounds`` times (checked in the first round only): the GPU's speed
  drifts over a run, so variants compare best as medians of interleaved rounds."""
  for rnd in range(rounds):
    for c in cases:
      run_case(c, record, check=rnd == 0, extra=dict(extra, round=rnd), **kw)


def table(rows) -> str:
  lines = ["| window | what | ms | TFLOP/s | check (rel. L2) |", "|---|---|---|---|---|"]
  for r in rows:
    errs = r.get("grad_rel_l2_err") or ([r["rel_l2_err"]] if "rel_l2_err" in r else [])
    chk = "/".join(f"{e:.1e}" for e in errs) + ("" if r.get("ok", True) else " FAIL")
    if "error" in r:
      lines.append(f"| {r['window']} | {r['name']} | ERROR | | {r['error'][:80]} |")
    else:
      lines.append(f"| {r['window']} | {r['name']} | {r['ms']:.2f} | {r['tflops']:.0f} | {chk} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--windows", default=None, help=f"{WINDOWS_HELP} (default: the shape's)")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help="comma list of " + ",".join(SECTIONS))
  p.add_argument("--fwd-configs", default="default,kv64,sb",
                 help="forward configs, comma-separated (see fwd_config: default, kv64, s3, "
                      "sb, nosb, blocks, gathered, joined by '+'; 'masked' / 'partial' compile "
                      "that path in where the schedule does not need it)")
  p.add_argument("--variants", default="fused,split",
                 help="backward variants of the bwd and op sections: " + ", ".join(VARIANTS)
                      + f"; in the bwd section 'fused+{SPREAD_TEXT}' is an ablation (text "
                      "pieces' dQ rows spread, unchecked)")
  p.add_argument("--bwd-stages", default="2", help="bwd_max_concurrent_steps values (bwd section)")
  p.add_argument("--key-steps", default="auto", choices=("auto", "blocks", "gathered"),
                 help="MosaicConfig.key_steps of every section (run twice to compare gathered "
                      "work items with 128 x 128 blocks where tiles are 64 or 192 tokens)")
  p.add_argument("--rounds", type=int, default=2,
                 help="interleaved rounds of every section (each case checked in the first)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-rows", type=int, default=256)
  p.add_argument("--hlo", action="store_true",
                 help="also write the optimized HLO of the op's fwd+bwd (TAG_op_grad_hlo.txt)")
  p.add_argument("--interpret", action="store_true",
                 help="GPU interpret mode (no GPU needed; tiny shapes only, slow)")
  p.add_argument("--out", default="out")
  p.add_argument("--tag", default="mosaic")
  a = p.parse_args(argv)
  shape = shapes_lib.get(a.shape)
  sections = a.sections.split(",")
  if unknown := set(sections) - set(SECTIONS):
    raise ValueError(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
  windows = parse_windows(a.windows) if a.windows else [shape.window]
  variants = a.variants.split(",")
  for v in variants:
    variant_config(v, config_lib.MosaicConfig())   # a bad token fails before any GPU work
  record = Record(os.path.join(a.out, f"{a.tag}.json"), run_meta(shape, sections=sections))
  kw = dict(warmup=a.warmup, iters=a.iters)
  for window in windows:
    wname = window_name(window)
    try:
      x = make_inputs(shape, window, a.check_rows, a.interpret, key_steps=a.key_steps)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      record.add(dict(section="inputs", name="forward for o, lse", window=wname,
                      error=f"{type(e).__name__}: {str(e)[:2000]}"))
      continue
    extra = dict(window=wname, sparsity=x.spec.sparsity())
    if "fwd" in sections:
      run_rounds(forward_cases(x, a.fwd_configs.split(","), a.interpret), record, a.rounds,
                 extra, **kw)
    if "bwd" in sections:
      run_rounds(backward_cases(x, variants, [int(s) for s in a.bwd_stages.split(",")]),
                 record, a.rounds, extra, **kw)
    if "op" in sections:
      cases = op_cases(x, variants, a.interpret)
      if a.hlo:
        with open(os.path.join(a.out, f"{a.tag}_op_grad_hlo.txt"), "w") as f:
          f.write(cases[0].fn.lower(*cases[0].args).compile().as_text())
      run_rounds(cases, record, a.rounds, extra, **kw)
    if "glue" in sections:
      for c in glue_cases(x):
        run_case(c, record, extra=extra, **kw)
  print(f"\n{record.meta['gpu']}  JAX {record.meta['jax']}  {record.meta['date']}  "
        f"{shape.describe()}")
  print(table(record.rows))
  return record.rows


if __name__ == "__main__":
  main()
