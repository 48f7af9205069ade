"""Hopper STA forward (Mosaic GPU) with FA3's intra-warpgroup overlap.

Per CTA: one query block of ``block_q`` = 128 rows, one head, one batch entry. Two compute
warpgroups own 64-row slices of the query block (both slices sit in the same STA tile, so they
share one key list), and a producer warpgroup streams the scheduled K/V blocks with TMA,
``max_concurrent_steps`` stages deep. The key list ``kv_index[g, i, :kv_count[g, i]]`` and its
length are read from GMEM (Pallas has no scalar prefetch on the GPU), so one compiled kernel
serves every window and the loop bound is dynamic (text rows are dense, video rows are not).
Online softmax in registers with exp2 and the softmax scale folded into one FMA.
With ``MosaicConfig.persistent`` one CTA per SM runs such work items (query block, head,
batch entry) one after another: the producer takes the CTA's next item from a GMEM counter
before it streams the current item's keys and hands its index to the compute warpgroups
through two slots in shared memory; the K/V pipeline (and the ping-pong, where on) run on
across items.

Step j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits only for S_j
(``wgmma_accumulator_load(wait_n=1)``) and does softmax j while the PV product of step j-1 is
still running; then it waits for that product and rescales O by step j's correction. With
``MosaicConfig.use_schedule_barrier`` (off by default) a ping-pong keeps one warpgroup's issue
of both products between the other's (two mbarriers, FA3's warp-scheduler barrier). O lives
in one wgmma accumulator for the whole key loop (``run_scoped`` around the loop), so it is
never copied out between steps. With
``MosaicConfig.masked_steps_apart`` (operands with ``masked_steps``) an item's steps that
need a mask come first, in a loop with the mask code, the others in a second loop without
it; the first loop's last P V is waited for, and the second starts with S alone, as step 0.

Layouts as in :mod:`pallas_kernels.mosaic.common`; operands from ``schedule_operands``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.common import (LOG2E, allocated, bind_scratch, claim_work_item,
                                          compiler_params, cta_position, drain_kv,
                                          forward_key_loops,
                                          interpret_params, launch_grid, may_see_empty_steps,
                                          normalized_rows, padded_steps, present, slot_barrier,
                                          sm_count,
                                          smem_transforms, softmax_exp2, step_keys,
                                          step_scores, store_rows,
                                          stream_kv, work_counter)
from pallas_kernels.mosaic.config import SMEM_BUDGET, WG_ROWS, MosaicConfig, forward_smem_bytes


def forward_call(q, k, v, ops, *,
                 scale: float, config: MosaicConfig, masked: bool = True,
                 partial: bool = False, with_o_low: bool = False, gather: bool = False,
                 padded_keys=None):
  """o [B,S,H,D] q.dtype, lse [B,H,S] float32 (natural log; +inf and o = 0 on rows that attend
  nothing), and with ``with_o_low`` o_low [B,S,H,D] q.dtype, o's rounding error (for the
  backward's delta, :class:`jsta.ops.Backend`). ``ops``: the
  :class:`~pallas_kernels.mosaic.common.ForwardOperands` of the schedule.
  ``masked=False`` (no key block holds padding) compiles the key-mask path out;
  ``partial=True`` (some block pair is attended in part: blocks span tiles) compiles in the
  per-warpgroup unit masks and a running max that may stay -inf over whole masked steps (as
  does a run-time key bias, ``ops.key_bias`` [B, seq]: a sample's text slots may all be
  invalid, and its masked steps come first).
  ``gather=True``: gathered work items (operands of
  :func:`~pallas_kernels.mosaic.common.gathered_operands`): each warpgroup's 64 query rows
  from the ``query_pieces`` table, each step's keys two 64-key units. ``padded_keys``: None,
  or the :class:`~pallas_kernels.mosaic.common.PaddedKeys` of ``ops``
  (:func:`~pallas_kernels.mosaic.common.with_padded_key_pieces`): k and v may then hold
  anything in padded positions, the steps read the pieces that hold them from these zeroed
  copies."""
  head_dim = q.shape[-1]
  dtype = q.dtype
  # Grouped-query attention: k and v may have fewer heads; query head h reads head h // rep.
  rep = q.shape[2] // k.shape[2]
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  stages = config.max_concurrent_steps
  c2 = scale * LOG2E                       # scores in the log2 domain, scale folded in
  empty_steps = may_see_empty_steps(ops, partial)
  use_sb = config.use_schedule_barrier and wgs == 2
  R = WG_ROWS
  interpret = config.interpret
  # P's exponentials, some of them on the FMA pipe (config.exp2_fma_columns).
  exp2 = functools.partial(softmax_exp2, fma_columns=config.exp2_fma_columns,
                           interpret=interpret)
  kv_units = bk // WG_ROWS

  persistent = config.persistent
  if bk == 3 * WG_ROWS and (masked or partial or persistent or gather):
    # Two stages of 192-key K and V beside the query block: 224 KiB of the 227. (o_low
    # needs none: it leaves through o's staging buffer.)
    raise ValueError("block_kv=192 runs only the plain forward (no padded keys, no partial "
                     "pairs, no persistent CTAs, no gathered steps): its shared memory has no "
                     "room for more")
  # config.masked_steps_apart where some step needs a mask (the operands then hold the count
  # of each item's leading masked steps): two key loops.
  apart = ops.masked_steps is not None
  if padded_keys is not None and not masked:
    raise ValueError("padded_keys is given, but no key is padded (masked is False)")
  if apart and not (masked or partial):
    raise ValueError("ops.masked_steps is given, but no step needs a mask (masked and "
                     "partial are False)")
  if apart and persistent:
    raise ValueError("masked_steps_apart runs the single-item forward: not with persistent")
  if persistent and ops.work is None:
    raise ValueError("config.persistent needs the work items in ops (forward_operands(..., "
                     "batch=...))")
  # The persistent forward: ``ctas`` CTAs take the ``total`` work items from a counter.
  total = ops.work.shape[0] if persistent else 0
  ctas = max(1, min(config.persistent_ctas or sm_count(), total)) if persistent else 0
  # GPU interpret mode has no inline Mosaic GPU code: there CTA c takes the items c + n * ctas.
  counted = persistent and not interpret
  if persistent and forward_smem_bytes(bq, bk, head_dim, stages, q.dtype.itemsize,
                                       q_buffers=2) > SMEM_BUDGET:
    raise ValueError(f"the persistent forward's two query buffers and {stages} K/V stages "
                     f"do not fit shared memory at head_dim {head_dim}, block_kv {bk}: lower "
                     f"max_concurrent_steps (config.default_stages(..., q_buffers=2))")

  def kernel(q_ref, k_ref, v_ref, h2g_ref, idx_ref, cnt_ref, info_ref, bias_ref, unit_ref,
             order_ref, *refs):
    # Gathered work items: each warpgroup's query piece comes from a table.
    pieces_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    # config.masked_steps_apart: each item's leading steps that need a mask.
    nmask_ref, refs = (refs[0], refs[1:]) if apart else (None, refs)
    # The persistent forward: the work items, and the counter they are taken from.
    work_ref, refs = (refs[0], refs[1:]) if persistent else (None, refs)
    counter_ref, refs = (refs[0], refs[1:]) if counted else (None, refs)
    # k and v with padded keys left as they were: the zeroed copies of the pieces holding them.
    padded_refs, refs = (refs[:2], refs[2:]) if padded_keys is not None else (None, refs)
    o_ref, lse_ref, *refs = refs
    o_low_ref, refs = (refs[0], refs[1:]) if with_o_low else (None, refs)
    sc = bind_scratch(scratch, refs)
    if persistent:
      wg = lax.axis_index("wg")
      cta = lax.axis_index("c")

      def read_item(idx):
        # Clamped: past the last item the loops stop, but the read comes first.
        idx = jnp.minimum(idx, total - 1)
        return WorkItem(*(work_ref[idx, f] for f in range(len(WorkItem._fields))))
    else:
      qi, hi, bi, wg, grp, cnt = cta_position("q", h2g_ref, cnt_ref, order_ref)

    # FA3's warp-scheduler barrier: a warpgroup issues its products only after the other one
    # issued its own, so their tensor-core work alternates.
    def sched_wait():
      if use_sb:
        plgpu.barrier_wait(sc.sched_bar.at[wg])

    def sched_arrive():
      if use_sb:
        plgpu.barrier_arrive(sc.sched_bar.at[1 - wg])

    def scores(s, info, slot):
      return step_scores(s, info, wg, masked=masked, partial=partial,
                         kv_units=kv_units, bias_smem=sc.bias.at[slot],
                         bias_bar=sc.bias_bar.at[slot],
                         unit_smem=sc.unit.at[wg] if partial else None)

    def shift(m):
      # Where a warpgroup can see whole masked steps (``empty_steps``) m stays -inf there,
      # and exp2 must not see -inf - -inf.
      return jnp.where(m == -jnp.inf, 0.0, m) if empty_steps else m

    def pv(o_acc, p16, slot):
      """Issues O += P V on the GPU. GPU interpret mode has no register A operand nor stores
      into an accumulator: there O is a loop-carried value (``o_acc`` is None) and this
      returns P V computed on the spot, for the caller to add."""
      if not interpret:
        plgpu.wgmma(o_acc, p16, sc.v.at[slot])
        return None
      p_smem = sc.p.at[wg]
      p_smem[...] = p16
      plgpu.commit_smem()

      def product(acc):
        plgpu.wgmma(acc, p_smem, sc.v.at[slot])
        return acc[...]
      return pl.run_scoped(product, plgpu.ACC((R, head_dim), jnp.float32))

    def query_row(qi, grp):
      return pieces_ref[grp, qi, wg] * R if gather else qi * bq + wg * R

    def query_piece(qi, grp):
      # query_row // 64, carried across the persistent forward's items: the rows are then
      # piece * 64, a multiple of 64 that the TMA's layout inference can prove.
      return pieces_ref[grp, qi, wg] if gather else qi * (bq // R) + wg

    def compute_item(item, qo_smem, row0, base=None, before_loop=None):
      """One work item of a compute warpgroup, its q rows (from ``row0``) in ``qo_smem``
      (landed): the key
      loop, then o and lse out through ``qo_smem`` and the lse buffer. The single-item kernel
      (``base`` None) waits for its stores and brackets the ping-pong itself; the persistent
      one passes ``base`` (the steps of its earlier items: step j's slot is (base + j) %
      stages) and ``before_loop``, called once the lse buffer and the other q buffer may be
      reused (after step 0, or before an empty item's zeros)."""
      qi, hi, bi, grp, cnt = item

      def slot_of(step):
        return lax.rem(step if base is None else base + step, stages)

      def step_info(step):
        # Read before the step's products: the scalar's GMEM load completes under them.
        return info_ref[grp, qi, step] if (masked or partial) else None

      def write_out(o, lse):
        rows = pl.ds(row0, R)
        store_rows(o, lse, qo_smem, sc.lse.at[wg], o_ref.at[bi, rows, hi],
                   lse_ref.at[bi, hi, rows],
                   o_low_ref.at[bi, rows, hi] if with_o_low else None, wait=base is None)

      @pl.when(cnt == 0)
      def _empty():
        if before_loop is not None:
          before_loop()
        zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        write_out(zeros, plgpu.layout_cast(jnp.full((R,), jnp.inf, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)))

      @pl.when(cnt > 0)
      def _main():
        if use_sb and base is None:
          # Warpgroup 0 first.
          pl.when(wg == 1)(lambda: plgpu.barrier_arrive(sc.sched_bar.at[0]))

        def lone_scores(slot):
          """S = Q K^T of the keys in ``slot`` issued alone and waited for (an item's first
          step, or the first after a drained loop)."""
          plgpu.barrier_wait(sc.k_bar.at[slot])
          sched_wait()

          def qk(s_acc):
            plgpu.wgmma(s_acc, qo_smem, sc.k.at[slot].T)
            sched_arrive()
            return s_acc[...]

          s = pl.run_scoped(qk, plgpu.ACC((R, bk), jnp.float32))
          plgpu.barrier_arrive(sc.k_free.at[slot])
          return s

        def with_o(o_acc, o_val=None):
          # Step 0: S_0 alone.
          info = step_info(0)
          slot0 = 0 if base is None else slot_of(0)
          s = scores(lone_scores(slot0), info, slot0)
          m_i = s.max(axis=1) * c2
          p = exp2(s * c2 - lax.broadcast_in_dim(shift(m_i), s.shape, [0]))
          l_i = p.sum(axis=1)
          p16 = p.astype(dtype)

          early = config.rescale_under_qk

          def rescale(o_acc, o_val, alpha):
            """O *= alpha per row: ``o_val`` in interpret mode, else the accumulator (with
            ``early``, read without a wait: the S product is in flight, the P V before it is
            done)."""
            alpha_o = lax.broadcast_in_dim(alpha, (R, head_dim), [0])
            if interpret:
              return o_val * alpha_o
            o = plgpu.wgmma_accumulator_load(o_acc, wait_n=1) if early else o_acc[...]
            o_acc[...] = o * alpha_o
            return None

          def saved_correction():
            """The previous step's correction, read back from shared memory: held in
            registers, the rescale would be scheduled before the S product's issue (its
            operands are ready there); the load keeps it after."""
            return plgpu.load(sc.alpha.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

          if early:
            # Step 1's O is still zero: any factor will do.
            sc.alpha.at[wg][...] = plgpu.layout_cast(jnp.full((R,), 1.0, jnp.float32),
                                                     plgpu.Layout.WGMMA.reduce(1))
          if before_loop is not None:
            before_loop()

          def online_softmax(s, m_i, l_i):
            """(running max, its correction alpha, P, row sums) after the scores ``s``."""
            m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
            alpha = jnp.exp2(m_i - shift(m_new))
            p = exp2(s * c2 - lax.broadcast_in_dim(shift(m_new), s.shape, [0]))
            return m_new, alpha, p, l_i * alpha + p.sum(axis=1)

          def body(step, carry, masks=True):
            m_i, l_i, p16, o_val = carry
            slot = slot_of(step)
            pslot = slot_of(step - 1)
            info = step_info(step) if masks else None
            plgpu.barrier_wait(sc.k_bar.at[slot])
            plgpu.barrier_wait(sc.v_bar.at[pslot])
            sched_wait()

            def qk_and_pv(s_acc):
              plgpu.wgmma(s_acc, qo_smem, sc.k.at[slot].T)
              o_now = rescale(o_acc, o_val, saved_correction()) if early else o_val
              prod = pv(o_acc, p16, pslot)
              sched_arrive()
              # S_j; on the GPU PV_{j-1} is still running.
              return plgpu.wgmma_accumulator_load(s_acc, wait_n=1), prod, o_now

            s, prod, o_val = pl.run_scoped(qk_and_pv, plgpu.ACC((R, bk), jnp.float32))
            plgpu.barrier_arrive(sc.k_free.at[slot])
            if masks:
              s = scores(s, info, slot)
            m_new, alpha, p, l_i = online_softmax(s, m_i, l_i)
            p16 = p.astype(dtype)
            if config.overlap_exp:
              # A store that depends on every exponential keeps ptxas from hoisting the wait
              # below above them (lse's staging buffer: store_rows rewrites it at the end).
              sc.lse.at[wg][...] = l_i
            if early:
              sc.alpha.at[wg][...] = alpha
            plgpu.wgmma_wait(0)                                       # PV_{j-1} done
            plgpu.barrier_arrive(sc.v_free.at[pslot])
            if interpret:
              o_val = o_val + prod
            if not early:
              o_val = rescale(o_acc, o_val, alpha)
            return m_new, l_i, p16, o_val

          def drain(p16, o_val, last_step):
            """The P V of ``last_step`` (issued alone, waited for)."""
            last = slot_of(last_step)
            plgpu.barrier_wait(sc.v_bar.at[last])
            sched_wait()
            if early:
              o_val = rescale(o_acc, o_val, saved_correction())
            prod = pv(o_acc, p16, last)
            sched_arrive()
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(sc.v_free.at[last])
            return o_val + prod if interpret else o_val

          def restart(step, m_i, l_i, o_val):
            """Step ``step`` of the unmasked loop (masked_steps_apart), nothing in flight."""
            m_new, alpha, p, l_i = online_softmax(lone_scores(slot_of(step)), m_i, l_i)
            o_val = rescale(o_acc, o_val, alpha)   # (never rescale_under_qk: MosaicConfig)
            return m_new, l_i, p.astype(dtype), o_val

          m_i, l_i, o_val = forward_key_loops(body, drain, restart, (m_i, l_i, p16, o_val), cnt,
                                              nmask_ref[grp, qi] if apart else None)
          return (o_val if interpret else o_acc[...]), m_i, l_i

        if interpret:
          o, m_i, l_i = with_o(None, plgpu.layout_cast(
              jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA))
        else:
          o, m_i, l_i = pl.run_scoped(with_o, plgpu.ACC((R, head_dim), jnp.float32))
        if use_sb and base is None:
          # Warpgroup 1's last arrival (for a next step that does not come): observe it, so
          # every barrier phase is waited for (the interpreter checks this).
          pl.when(wg == 0)(lambda: plgpu.barrier_wait(sc.sched_bar.at[0]))
        write_out(*normalized_rows(o, m_i, l_i))

    def load_units():
      if partial:
        plgpu.copy_gmem_to_smem(unit_ref, sc.unit.at[wg], sc.unit_bar.at[wg])
        plgpu.barrier_wait(sc.unit_bar.at[wg])

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(config.forward_registers[0] if wgs == 2 else 240,
                              action="increase")
      if not persistent:
        qo_smem = sc.qo.at[wg]
        row0 = query_row(qi, grp)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, R), hi], qo_smem, sc.q_bar.at[wg])
        load_units()
        plgpu.barrier_wait(sc.q_bar.at[wg])
        compute_item((qi, hi, bi, grp, cnt), qo_smem, row0)
        return

      def load_q(item, piece, buf):
        plgpu.copy_gmem_to_smem(q_ref.at[item.bi, pl.ds(piece * R, R), item.hi],
                                sc.qo.at[buf, wg], sc.q_bar.at[buf * wgs + wg])

      first = read_item(cta)
      first_piece = query_piece(first.qi, first.grp)
      load_q(first, first_piece, 0)
      load_units()
      if use_sb:
        # Warpgroup 0 first; the ping-pong then runs on across the items (both warpgroups
        # issue the same products in every item).
        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(sc.sched_bar.at[0]))

      def item_body(carry):
        idx, n, base, piece, *fields = carry
        item = WorkItem(*fields)
        buf = lax.rem(n, 2)
        # The CTA's next item, which the producer took before streaming this one's keys; its
        # position is read now, so the loads complete under this item's steps.
        plgpu.barrier_wait(sc.item_full.at[buf])
        following_idx = sc.next_item[buf]
        plgpu.barrier_arrive(sc.item_free.at[buf])
        following = read_item(following_idx)
        following_piece = query_piece(following.qi, following.grp)

        def prefetch_next():
          # The other q buffer held o of item n - 1, the lse buffer its lse: their stores
          # must have read them.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          pl.when(following_idx < total)(
              lambda: load_q(following, following_piece, 1 - buf))

        plgpu.barrier_wait(sc.q_bar.at[buf * wgs + wg])
        compute_item(item, sc.qo.at[buf, wg], piece * R, base, prefetch_next)
        return (following_idx, n + 1, base + item.cnt, following_piece, *following)

      lax.while_loop(lambda carry: carry[0] < total, item_body,
                     (cta, jnp.int32(0), jnp.int32(0), first_piece, *first))
      if use_sb:
        pl.when(wg == 0)(lambda: plgpu.barrier_wait(sc.sched_bar.at[0]))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(config.forward_registers[1] if wgs == 2 else 40,
                              action="decrease")

      def stream(item, base=None):
        qi, hi, bi, grp, cnt = item
        stream_kv(k_ref, v_ref, bias_ref if masked else None, sc.k, sc.v, sc.bias, sc.k_bar,
                   sc.v_bar, sc.bias_bar, sc.k_free, sc.v_free,
                   step_keys(idx_ref, grp, qi, gather), cnt, stages, bk, bi,
                   lax.div(hi, rep) if rep > 1 else hi, gather=gather,
                   padded=padded_steps(info_ref, grp, qi), base=base,
                   padded_keys=padded_refs)

      if not persistent:
        stream((qi, hi, bi, grp, cnt))
        return

      def take_next(n):
        """The index of the CTA's item after its n-th, taken and published to the compute
        warpgroups through index slot n % 2 (two deep: the slot's previous index must have
        been read)."""
        slot = lax.rem(n, 2)
        pl.when(n >= 2)(lambda: plgpu.barrier_wait(sc.item_free.at[slot]))
        if counted:
          claim_work_item(counter_ref, sc.next_item.at[pl.ds(slot, 1)], ctas)
        else:
          sc.next_item[slot] = cta + (n + 1) * ctas
        plgpu.barrier_arrive(sc.item_full.at[slot])
        # Observed here too: the one thread that took it hands the index to the others.
        plgpu.barrier_wait(sc.item_full.at[slot])
        return sc.next_item[slot]

      def item_body(carry):
        idx, n, base = carry
        following = take_next(n)
        item = read_item(idx)
        stream(item, base)
        return following, n + 1, base + item.cnt

      _, n, base = lax.while_loop(lambda carry: carry[0] < total, item_body,
                                  (cta, jnp.int32(0), jnp.int32(0)))
      drain_kv(sc.k_free, sc.v_free, base, stages)
      # The compute warpgroups' last two reads of the index slots (every phase observed).
      for back in (2, 1):
        pl.when(n >= back)(lambda back=back: plgpu.barrier_wait(
            sc.item_free.at[lax.rem(n - back, 2)]))

  scratch = _forward_scratch(dtype, head_dim, config, bias_rows=masked, unit_rows=partial,
                             sched_barrier=plgpu.Barrier(num_barriers=2), gather=gather)
  counter = (work_counter(q),) if counted else ()
  extra = tuple(padded_keys) if padded_keys is not None else ()
  return _launch_forward(kernel, scratch, config, q, k, v, *present(ops), *counter, *extra,
                         with_o_low=with_o_low, ctas=ctas)


class WorkItem(NamedTuple):
  """A work item of the persistent forward: a row of its work list
  (:func:`~pallas_kernels.mosaic.common.persistent_work`), as int32 scalars."""

  qi: object     # query block (or, gathered, item) index
  hi: object     # query head
  bi: object     # batch entry
  grp: object    # head group (window)
  cnt: object    # steps


class ForwardScratch(NamedTuple):
  """Shared memory and barriers of the forward, allocated in this order (None: not allocated
  for this variant; :func:`~pallas_kernels.mosaic.common.bind_scratch` gives the kernel the
  refs by these names)."""

  qo: object          # [wgs, 64, D]: a warpgroup's q rows in, then its o rows out
                      # ([2, wgs, 64, D] in the persistent forward: the next item's q rows)
  k: object           # [stages, block_kv, D]
  v: object           # [stages, block_kv, D]
  lse: object         # [wgs, 64] float32: lse staging
  bias: object        # [stages, block_kv] float32 key-bias rows ([1, 32] when nothing is masked)
  k_bar: object       # [stages]: K landed
  v_bar: object       # [stages]: V landed
  q_bar: object       # [wgs] ([2 * wgs] persistent): a warpgroup's q rows landed
  k_free: object      # [stages], one arrival per compute warpgroup: K slot free again
  v_free: object      # [stages], likewise for V (and the bias row)
  sched_bar: object   # [2]: the two compute warpgroups' ping-pong
  bias_bar: object    # [stages]: bias row landed
  unit: object = None       # [wgs, 2 ** (block_kv // 64), block_kv] float32 (partial pairs)
  unit_bar: object = None   # [wgs]
  p: object = None          # [wgs, 64, block_kv]: P staged for P V (GPU interpret mode only)
  alpha: object = None      # [wgs, 64] float32: a step's O correction (rescale_under_qk)
  next_item: object = None  # int32[2] (persistent): the CTA's next work item, two slots
  item_full: object = None  # [2] (persistent): the producer published a slot's index
  item_free: object = None  # [2] (persistent), one arrival per compute warpgroup: read


def _forward_scratch(dtype, head_dim: int, config: MosaicConfig, *, bias_rows: bool,
                     unit_rows: bool, sched_barrier, gather: bool = False) -> ForwardScratch:
  """The forward's :class:`ForwardScratch`: key-bias rows only where ``bias_rows`` (else a
  token buffer), the unit bias rows where ``unit_rows``, P staging in interpret mode; slot
  barriers of two copies where ``gather`` (:func:`~pallas_kernels.mosaic.common.slot_barrier`)."""
  wgs, bk, stages = config.compute_wgs, config.block_kv, config.max_concurrent_steps
  tr = smem_transforms(dtype)
  q_buffers = (2,) if config.persistent else ()
  return ForwardScratch(
      qo=plgpu.SMEM((*q_buffers, wgs, WG_ROWS, head_dim), dtype, transforms=tr),
      k=plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      v=plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      lse=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
      # A token buffer when unused: shared memory decides the pipeline depth.
      bias=plgpu.SMEM((stages, bk) if bias_rows else (1, 32), jnp.float32),
      k_bar=slot_barrier(stages, gather),
      v_bar=slot_barrier(stages, gather),
      q_bar=plgpu.Barrier(num_barriers=2 * wgs if config.persistent else wgs),
      k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      sched_bar=sched_barrier,
      bias_bar=slot_barrier(stages, gather),
      unit=(plgpu.SMEM((wgs, 2 ** (bk // WG_ROWS), bk), jnp.float32) if unit_rows else None),
      unit_bar=plgpu.Barrier(num_barriers=wgs) if unit_rows else None,
      p=plgpu.SMEM((wgs, WG_ROWS, bk), dtype) if config.interpret else None,
      alpha=plgpu.SMEM((wgs, WG_ROWS), jnp.float32) if config.rescale_under_qk else None,
      next_item=plgpu.SMEM((2,), jnp.int32) if config.persistent else None,
      item_full=plgpu.Barrier(num_barriers=2) if config.persistent else None,
      item_free=(plgpu.Barrier(num_arrivals=wgs, num_barriers=2) if config.persistent
                 else None),
  )


def _launch_forward(kernel, scratch, config: MosaicConfig, q, *operands, with_o_low=False,
                    ctas: int = 0):
  """Runs a forward ``kernel`` over the grid (query block, head, batch), or (persistent) over
  ``ctas`` CTAs that take the work items, with one producer warpgroup after the compute ones:
  (o [B,S,H,D] in q.dtype, lse [B,H,S] float32[, o_low [B,S,H,D] in q.dtype])."""
  batch, seq, heads, _ = q.shape
  o_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
  out_type = (o_type, jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)) + (
      (o_type,) if with_o_low else ())
  grid = (dict(grid=(ctas,), grid_names=("c",)) if ctas
          else launch_grid(seq // config.block_q, heads, batch, "q"))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=allocated(scratch), **grid,
      num_threads=config.compute_wgs + 1, thread_name="wg",
      compiler_params=compiler_params(config), interpret=interpret_params(config),
  )(q, *operands)


@functools.partial(jax.jit, static_argnames=("scale", "config", "masked", "partial",
                                             "with_o_low", "gather"))
def forward_jit(q, k, v, ops, *, scale, config, masked=True, partial=False, with_o_low=False,
                gather=False, padded_keys=None):
  return forward_call(q, k, v, ops, scale=scale, config=config, masked=masked, partial=partial,
                      with_o_low=with_o_low, gather=gather, padded_keys=padded_keys)
