"""A model of what the Hopper kernels' launch order does to L2 reuse, from the schedule alone.

    python -m benchmarks.tools.launch_order_l2 --shapes wan14b_720p_w311,wan14b_720p \
        --orders sequence,sequence+long4,window+long4

For each shape and launch order (``MosaicConfig.launch_order`` and ``long_items_first``, as
'sequence', 'window', each with an optional '+long<N>'), the work items of the forward (query
items reading key units) and of the dK/dV kernels (key items reading 64-row query pieces)
are dispatched greedily to ``--sms`` SMs in launch order, every item reading one list entry
a step (a step: one time unit; items take as long as their lists), and the reads go through
an LRU cache of ``--l2-mb`` MB (H100 and H200: 50 MB in two halves, hence 25 and 50). Each
forward entry is a 64-key unit's K and V (a 128-key block's with 128-key steps), each
backward entry a query piece's q, dO and float32 dQ rows. Printed: the hit rate of those
reads, against the hit rate with an unbounded cache (every first read misses). It leaves out
everything else the kernels move (q and o rows, lse, dK/dV), the GPU's real cache policy and
its timing: it ranks orders, it does not predict times.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq

import numpy as np

MB = 1 << 20


def dispatch(order: np.ndarray, lengths: np.ndarray, head_to_group: np.ndarray,
             sms: int) -> np.ndarray:
  """float[heads * blocks]: each item's start time (steps), items taken in ``order``
  (int[heads, blocks], ``head * blocks + block``) by the SM that gets free first."""
  blocks = order.shape[1]
  free = [(0, s) for s in range(sms)]
  start = np.zeros(order.size, np.int64)
  for item in order.reshape(-1):
    t, s = heapq.heappop(free)
    start[item] = t
    n = int(lengths[head_to_group[item // blocks], item % blocks])
    heapq.heappush(free, (t + max(n, 1), s))
  return start


def hit_rates(order, lists, lengths, head_to_group, entry_bytes: int, capacities,
              sms: int = 132) -> dict:
  """{capacity in bytes (None: unbounded): hit rate} of the reads of ``lists`` (int[G,
  blocks, width], the first ``lengths`` int[G, blocks] of each item) in time order."""
  heads, blocks = order.shape
  start = dispatch(order, lengths, head_to_group, sms)
  times, data = [], []
  for h in range(heads):
    g = head_to_group[h]
    for b in range(blocks):
      n = int(lengths[g, b])
      if n:
        times.append(start[h * blocks + b] + np.arange(n))
        data.append(h * (1 << 32) + lists[g, b, :n].astype(np.int64))
  stream = np.concatenate(data)[np.argsort(np.concatenate(times), kind="stable")].tolist()
  out = {}
  for cap in capacities:
    if cap is None:
      out[None] = 1 - len(set(stream)) / len(stream)
      continue
    slots, lru, hits = max(cap // entry_bytes, 1), collections.OrderedDict(), 0
    for d in stream:
      if d in lru:
        hits += 1
        lru.move_to_end(d)
      else:
        lru[d] = None
        if len(lru) > slots:
          lru.popitem(last=False)
    out[cap] = hits / len(stream)
  return out


def order_config(token: str, base):
  """A MosaicConfig from ``base`` with 'sequence' or 'window' and an optional '+long<N>'."""
  changes = {}
  for part in token.split("+"):
    if part in ("sequence", "window"):
      changes["launch_order"] = part
    elif part.startswith("long") and part[4:].replace(".", "", 1).isdigit():
      changes["long_items_first"] = float(part[4:])
    else:
      raise ValueError(f"unknown order part {part!r} in {token!r} (sequence, window, long<N>)")
  return dataclasses.replace(base, **changes)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="wan14b_720p_w311")
  p.add_argument("--orders", default="sequence,sequence+long4,window+long4")
  p.add_argument("--l2-mb", default="25,50", help="cache sizes, MB, comma separated")
  p.add_argument("--sms", type=int, default=132)
  args = p.parse_args(argv)
  from benchmarks import shapes as shapes_lib
  from jsta.schedule import block_schedule
  from pallas_kernels.mosaic import backend
  from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig
  caps = [int(float(c) * MB) for c in args.l2_mb.split(",")] + [None]
  rows = []
  for name in args.shapes.split(","):
    shape = shapes_lib.get(name)
    sched = block_schedule(shape.spec(), shape.heads, 128, 128, mask_unit=64)
    h2g = np.asarray(sched.head_to_group)
    for token in args.orders.split(","):
      cfg = order_config(token, MosaicConfig())
      f_ops, _, gather = backend.forward_operands(sched, cfg)
      t_ops, _, _, _ = backend.backward_operands(sched, cfg)
      f_lists, f_steps = np.asarray(f_ops.kv_index), np.asarray(f_ops.kv_count)
      f_len = np.minimum(f_steps * (2 if gather else 1), f_lists.shape[2])
      unit_keys = WG_ROWS if gather else sched.block_kv
      fwd = hit_rates(np.asarray(f_ops.launch_order), f_lists, f_len, h2g,
                      unit_keys * shape.head_dim * 2 * 2, caps, args.sms)
      bwd = hit_rates(np.asarray(t_ops.launch_order), np.asarray(t_ops.piece_index),
                      np.asarray(t_ops.piece_count), h2g, WG_ROWS * shape.head_dim * (2 + 2 + 4),
                      caps, args.sms)
      row = dict(shape=name, order=token, forward=fwd, backward=bwd)
      rows.append(row)
      fmt = lambda r: " ".join(f"{('inf' if c is None else f'{c // MB}MB')} {r[c]:.3f}"
                               for c in caps)
      print(f"{name:18s} {token:16s} forward: {fmt(fwd)} | dK/dV: {fmt(bwd)}", flush=True)
  return rows


if __name__ == "__main__":
  main()
