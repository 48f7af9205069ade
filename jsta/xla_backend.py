"""Block-sparse STA in plain XLA (any device), driven by the static schedule, in bounded memory.

Every query block walks its scheduled key blocks with an online softmax, as the kernels do.
Query blocks are processed a chunk at a time (``lax.scan``) and each chunk walks its key list a
few key blocks at a time, so the live intermediates are a chunk of gathered key blocks and their
scores, whatever the sequence length: the memory beyond the inputs and outputs (and, in the
backward pass, float32 dK/dV accumulators of the input's size) is bounded by ``memory_bytes``.
Chunks and steps are also no larger than the input needs (a short sequence is one chunk of its
own blocks, not a chunk padded to the budget).
Video and text query blocks are walked separately, because text rows are dense (they visit every
key block) and would otherwise set the loop length of every video row.

The forward saves the log-sum-exp; the backward recomputes probabilities from it and
scatter-adds key/value gradients into their blocks.

All layouts: q, k, v, o: [batch, seq, heads, head_dim]; lse: [batch, heads, seq] float32,
where seq is the schedule's padded ``seq_len``.
"""

from __future__ import annotations


import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsta.schedule import BlockSchedule

# Default bound on the float32 intermediates of one step (gathered key blocks, scores, ...).
DEFAULT_MEMORY_BYTES = 64 * 2 ** 20
# On a CPU, steps that stay nearer the caches run faster: 16 MiB steps were 10-30% faster than
# 64 MiB ones on 2,000-16,000-token inputs, forward and backward (smaller ones lose again).
CPU_MEMORY_BYTES = 16 * 2 ** 20


def default_memory_bytes() -> int:
  """The step budget when none is given: ``CPU_MEMORY_BYTES`` where JAX's default backend is
  the CPU, ``DEFAULT_MEMORY_BYTES`` elsewhere."""
  return CPU_MEMORY_BYTES if jax.default_backend() == "cpu" else DEFAULT_MEMORY_BYTES


def _dot(spec: str, a, b):
  precision = lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
  return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _chunk_sizes(batch: int, heads: int, bq: int, bk: int, d: int, num_blocks: int,
                 max_count: int, memory_bytes: int) -> tuple[int, int]:
  """(query blocks per chunk, key blocks per step) for ``num_blocks`` query blocks that visit
  up to ``max_count`` key blocks each: as large as the budget allows (per (query block, key
  block) pair about 4 [bq, bk] float32 tiles: scores, probabilities and their gradients; and 4
  [bk, D] ones: gathered K and V, dK and dV contributions), but never larger than the input
  needs, and evened out so that the last chunk and the last step are not mostly padding (a
  261-token input must not pay for a chunk sized for the whole budget)."""
  per_pair = batch * heads * (4 * bq * bk + 4 * bk * d) * 4
  pairs = max(1, memory_bytes // per_pair)
  max_count, num_blocks = max(1, max_count), max(1, num_blocks)
  kv_step = min(max_count, pairs)
  kv_step = -(-max_count // -(-max_count // kv_step))          # even steps over the count
  qc = min(num_blocks, max(1, pairs // kv_step))
  qc = -(-num_blocks // -(-num_blocks // qc))                  # even chunks over the blocks
  return qc, kv_step


def _ranges(sched: BlockSchedule):
  """The query-block ranges walked separately: video blocks, then text blocks."""
  nqv, nq = sched.num_video_q_blocks, sched.num_q_blocks
  return [(a, b) for a, b in ((0, nqv), (nqv, nq)) if b > a]


def _range_tables(sched: BlockSchedule, start: int, stop: int, qc: int, kc: int):
  """Per-head schedule of query blocks [start, stop), padded to whole chunks and steps:
  idx, bits int32[nchunks, qc, H, steps * kc] (key blocks and their unit masks),
  cnt int32[nchunks, qc, H] (counts; 0 on padding blocks), and the number of key steps."""
  cnt = sched.kv_count[sched.head_to_group][:, start:stop]               # [H, n]
  c = max(int(cnt.max()), 1)
  steps = -(-c // kc)
  n = stop - start
  nchunks = -(-n // qc)
  pad = nchunks * qc - n
  out = []
  for table in (sched.kv_index, sched.kv_bits):
    t = table[sched.head_to_group][:, start:stop, :c]                    # [H, n, c]
    t = np.pad(t, ((0, 0), (0, 0), (0, steps * kc - c)), mode="edge")
    t = np.pad(t, ((0, 0), (0, pad), (0, 0)))
    out.append(jnp.asarray(einops.rearrange(t, "h (n c) k -> n c h k", c=qc), jnp.int32))
  cnt = einops.rearrange(np.pad(cnt, ((0, 0), (0, pad))), "h (n c) -> n c h", c=qc)
  return out[0], out[1], jnp.asarray(cnt, jnp.int32), steps


def _query_chunks(x, start: int, stop: int, block: int, qc: int):
  """x[:, start*block:stop*block] of [B, S, H, ...] as [nchunks, qc, B, H, block, ...]."""
  x = x[:, start * block:stop * block]
  x = einops.rearrange(x, "b (n x) h ... -> n b h x ...", x=block)
  pad = -(-(stop - start) // qc) * qc - (stop - start)
  x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape((-1, qc) + x.shape[1:])


def _unchunk(x, n: int):
  """[nchunks, qc, B, H, block, ...] -> [B, n * block, H, ...] (padding blocks dropped)."""
  x = x.reshape((-1,) + x.shape[2:])[:n]
  return einops.rearrange(x, "n b h x ... -> b (n x) h ...")


class _Keys:
  """Key/value blocks and the per-step gather of a chunk's scheduled key blocks."""

  def __init__(self, k, v, sched: BlockSchedule, key_valid=None):
    bk = sched.block_kv
    self.kb = einops.rearrange(k, "b (n y) h d -> b h n y d", y=bk)
    self.vb = einops.rearrange(v, "b (n y) h d -> b h n y d", y=bk)
    # [1 or B, nkv, bk]: the schedule's validity, or the run-time one per batch entry.
    valid = sched.key_valid[None] if key_valid is None else key_valid
    self.valid = jnp.asarray(valid).reshape(-1, sched.num_kv_blocks, bk)
    self.heads = jnp.arange(k.shape[2])[None, :, None]
    self.partial = sched.has_partial_pairs
    self.units = (sched.q_units, sched.kv_units, sched.mask_unit)

  def step(self, idx, bits, cnt, j, kc):
    """Key step j of a chunk: (ids int32[qc, H, kc], kg, vg [B, qc, H, kc, bk, D], mask of the
    scores [qc, 1 or B, H, bq or 1, kc, bk]: scheduled (below the count), in the block pair's
    unit mask and a valid key)."""
    ids = lax.dynamic_slice_in_dim(idx, j * kc, kc, axis=2)
    live = (j * kc + jnp.arange(kc))[None, None, :] < cnt[:, :, None]
    valid = jnp.moveaxis(self.valid[:, ids], 0, 1)                     # [qc, B', H, kc, bk]
    entry = (live[:, None, :, :, None] & valid)[:, :, :, None]           # [qc, B', H, 1, kc, bk]
    if self.partial:
      ru, rk, unit = self.units
      b = lax.dynamic_slice_in_dim(bits, j * kc, kc, axis=2)
      shift = (jnp.arange(ru)[:, None] * rk + jnp.arange(rk)[None, :])      # [ru, rk]
      on = (b[..., None, None] >> shift) & 1                                 # [qc, H, kc, ru, rk]
      on = jnp.repeat(jnp.repeat(on != 0, unit, axis=-2), unit, axis=-1)     # [.., bq, bk]
      entry = entry & jnp.moveaxis(on, 2, 3)[:, None]                     # [qc, B', H, bq, kc, bk]
    return ids, self.kb[:, self.heads, ids], self.vb[:, self.heads, ids], entry


def forward(q, k, v, sched: BlockSchedule, scale: float,
            memory_bytes: int | None = None, key_valid=None, with_o_low: bool = False):
  """Returns (o [B, S, H, D] in q.dtype, lse [B, H, S] float32) and, ``with_o_low``, o_low
  [B, S, H, D] in q.dtype: the rounding error of o (o in float32 is o + o_low to about twice
  the dtype's precision; the backward's delta needs it, :class:`jsta.ops.Backend`).
  ``key_valid`` (bool [B, S] or None for the schedule's): run-time key validity (per-sample
  text lengths). ``memory_bytes``: the step budget (None: :func:`default_memory_bytes`)."""
  b, s, h, d = q.shape
  memory_bytes = memory_bytes or default_memory_bytes()
  bq, bk = sched.block_q, sched.block_kv
  keys = _Keys(k, v, sched, key_valid)
  outs, lses, lows = [], [], []
  for start, stop in _ranges(sched):
    count = int(sched.kv_count[:, start:stop].max())
    qc, kc = _chunk_sizes(b, h, bq, bk, d, stop - start, count, memory_bytes)
    idx, bits, cnt, steps = _range_tables(sched, start, stop, qc, kc)
    qs = _query_chunks(q, start, stop, bq, qc)                     # [n, qc, B, H, bq, D]

    def chunk(_, xs):
      qi, idx_c, bits_c, cnt_c = xs

      def step(carry, j):
        acc, m, l = carry
        _, kg, vg, msk = keys.step(idx_c, bits_c, cnt_c, j, kc)
        sc = _dot("cbhxd,bchkyd->cbhxky", qi, kg) * scale           # [qc, B, H, bq, kc, bk]
        sc = jnp.where(msk, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=(-2, -1)))
        # Rows that have seen no key yet keep m = -inf: shift by 0 there (no inf - inf).
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - shift))
        p = jnp.where(msk, jnp.exp(sc - shift[..., None, None]), 0.0)
        l = l * alpha + p.sum(axis=(-2, -1))
        acc = acc * alpha[..., None] + _dot("cbhxky,bchkyd->cbhxd", p, vg)
        return (acc, m_new, l), None

      # *_like: under shard_map the carries must vary over the same mesh axes as the inputs.
      row = qi[..., 0].astype(jnp.float32)
      init = (jnp.zeros_like(qi, jnp.float32), jnp.full_like(row, -jnp.inf),
              jnp.zeros_like(row))
      (acc, m, l), _ = lax.scan(step, init, jnp.arange(steps))
      # l == 0: the row attends nothing (o = 0, lse = +inf). A NaN l (a NaN in an attended
      # valid key or value) stays NaN, as in dense attention.
      o = acc / jnp.where(l == 0, 1.0, l)[..., None]
      lse = jnp.where(l == 0, jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
      o_high = o.astype(q.dtype)
      low = (o - o_high.astype(jnp.float32)).astype(q.dtype) if with_o_low else None
      return None, (o_high, lse, low)

    _, (o, lse, low) = lax.scan(chunk, None, (qs, idx, bits, cnt))
    outs.append(_unchunk(o, stop - start))
    if with_o_low:
      lows.append(_unchunk(low, stop - start))
    lses.append(einops.rearrange(_unchunk(lse[..., None], stop - start)[..., 0],
                                 "b s h -> b h s"))
  o, lse = jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)
  return (o, lse, jnp.concatenate(lows, axis=1)) if with_o_low else (o, lse)


def backward(q, k, v, o, lse, do, sched: BlockSchedule, scale: float,
             memory_bytes: int | None = None, key_valid=None, dlse=None):
  """Gradients (dq, dk, dv) in the input dtypes, from the saved lse. ``key_valid`` as in
  :func:`forward`; ``dlse`` (float32 [B, H, S] or None): the cotangent of the lse."""
  b, s, h, d = q.shape
  memory_bytes = memory_bytes or default_memory_bytes()
  bq, bk = sched.block_q, sched.block_kv
  f32 = jnp.float32
  keys = _Keys(k, v, sched, key_valid)
  delta = jnp.einsum("bshd,bshd->bsh", o.astype(f32), do.astype(f32))   # [B, S, H]
  if dlse is not None:
    # A cotangent g of the lse adds p * g to dS: the same as delta - g.
    delta = delta - einops.rearrange(dlse, "b h s -> b s h")
  lse_bsh = einops.rearrange(lse, "b h s -> b s h")
  dkb = jnp.zeros_like(keys.kb, f32)
  dvb = jnp.zeros_like(keys.vb, f32)
  dqs = []
  for start, stop in _ranges(sched):
    count = int(sched.kv_count[:, start:stop].max())
    qc, kc = _chunk_sizes(b, h, bq, bk, d, stop - start, count, memory_bytes)
    idx, bits, cnt, steps = _range_tables(sched, start, stop, qc, kc)
    qs, dos = (_query_chunks(x, start, stop, bq, qc) for x in (q, do))
    ls, dl = (_query_chunks(x[..., None], start, stop, bq, qc)[..., 0]
              for x in (lse_bsh, delta))                              # [n, qc, B, H, bq]

    def chunk(carry, xs):
      dkb, dvb = carry
      qi, doi, lse_i, delta_i, idx_c, bits_c, cnt_c = xs

      def step(carry, j):
        dq, dkb, dvb = carry
        ids, kg, vg, msk = keys.step(idx_c, bits_c, cnt_c, j, kc)
        sc = _dot("cbhxd,bchkyd->cbhxky", qi, kg) * scale
        p = jnp.where(msk, jnp.exp(sc - lse_i[..., None, None]), 0.0)
        dp = _dot("cbhxd,bchkyd->cbhxky", doi, vg)
        ds = p * (dp - delta_i[..., None, None])
        dq = dq + _dot("cbhxky,bchkyd->cbhxd", ds, kg.astype(f32)) * scale
        dk_c = _dot("cbhxky,cbhxd->bchkyd", ds, qi.astype(f32)) * scale
        dv_c = _dot("cbhxky,cbhxd->bchkyd", p, doi.astype(f32))
        dkb = dkb.at[:, keys.heads, ids].add(dk_c)
        dvb = dvb.at[:, keys.heads, ids].add(dv_c)
        return (dq, dkb, dvb), None

      (dq, dkb, dvb), _ = lax.scan(step, (jnp.zeros_like(qi, f32), dkb, dvb),
                                   jnp.arange(steps))
      return (dkb, dvb), dq

    (dkb, dvb), dq = lax.scan(chunk, (dkb, dvb), (qs, dos, ls, dl, idx, bits, cnt))
    dqs.append(_unchunk(dq, stop - start))
  dq = jnp.concatenate(dqs, axis=1)
  dk = einops.rearrange(dkb, "b h n y d -> b (n y) h d")
  dv = einops.rearrange(dvb, "b h n y d -> b (n y) h d")
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
