"""pytest hooks: GPU-only tests (marked ``gpu`` or ``hopper``) are skipped where JAX sees no
such GPU, and the summary says how many and why; so are tests marked ``slow`` (below). Shared
helpers live in helpers.py.

Tests marked ``slow`` are skipped unless pytest gets ``--slow`` (``bash scripts/test.sh --slow``)
or ``JSTA_SLOW_TESTS=1`` is set: on a CPU they are the interpret-mode and CUDA-lowering checks
of kernel options that are off by default (``MosaicBackend``/``MosaicConfig`` fields "off until
timed"), further interpret-mode cases of a kernel path that a faster case already checks
(the GPU suite runs the compiled kernels of every path), and the benchmark scripts' own runs
on the CPU (their plumbing: the GPU runs them in full). Whoever changes such an option, a
kernel or a benchmark, runs them; without them the default run took about 10 minutes on two
cores (2026-12-07), 15 with them.

GPU interpret mode runs with the faster host callbacks of interpret_callbacks.py (its cases
took about a third of the time), unless ``JSTA_PLAIN_INTERPRET=1``.

``JSTA_TEST_SHARD=i/n`` (e.g. ``1/2``) keeps the i-th of n disjoint shares of the collected
tests (by a checksum of each test's id, the same in every pytest-xdist worker), so that a suite
too long for one run (the GPU tests compile 30-50 s of kernels each) runs in n.

On a CPU the suite compiles many small programs and runs each a few times: compilation, not
execution, takes most of its time. LLVM's optimization level 0 (``XLA_FLAGS``
``--xla_backend_optimization_level=0``, set here before JAX starts its backend, and passed on to
the subprocesses of tests/helpers.py) halves that; XLA's own passes (fusion, layout, the
programs' numerics) are the same as at the default level. On a GPU, XLA would also autotune
the float32 references' matrix products in every program (compiling and timing candidate
kernels); ``--xla_gpu_autotune_level=0`` takes its default algorithm instead, which only
differs in speed (the GPU suite's padding tests took 120-176 s each on 14 workers with
autotuning on). A flag given by the caller in ``XLA_FLAGS`` wins.

Where the pytest-xdist workers are at least as many as the cores, each worker (and the
subprocesses it starts) runs on one core of its own (see ``pin_worker``).
"""

from __future__ import annotations

import os
import zlib

TEST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_gpu_autotune_level=0")
for _flag in TEST_COMPILE_FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
# The Hopper kernels in GPU interpret mode run each simulated warpgroup as a program of its own
# that waits at barriers for the others, on PJRT's CPU thread pool, which has one thread per core.
# On 2 cores the waiting programs could hold every thread while the one they waited for found
# none: the run hung (futex waits, no CPU), about one run in four of such a test. 8 threads
# (PJRT_NPROC) let them all run: 16 runs of 16 passed. No measurable effect on other tests.
os.environ.setdefault("PJRT_NPROC", "8")


def pin_worker(worker: str | None, count: str | None, cores: set[int]) -> set[int] | None:
  """The cores a pytest-xdist worker (``PYTEST_XDIST_WORKER`` "gw<i>", of
  ``PYTEST_XDIST_WORKER_COUNT``) keeps, or None to keep them all: one core each where there are
  no more cores than workers, none outside xdist or where cores are to spare."""
  if not worker or not count or int(count) < len(cores) or not worker.startswith("gw"):
    return None
  ordered = sorted(cores)
  return {ordered[int(worker[2:]) % len(ordered)]}


# Where the workers fill every core, each keeps one. A test in one process spreads over all
# cores (XLA's thread pools, the interpret mode's threads), but that CPU time buys it little
# speed and is taken from the other worker: a Hopper interpret-mode case took 10.7 s on one
# core alone, 11.4 s on two (with twice the CPU time), 21 s beside the other worker. Two
# workers each on a core of their own ran two files of such cases in 48 and 39 s, against 71
# and 54 s unpinned. Set before JAX starts any thread (threads, and subprocesses, inherit it);
# every thread the worker already has is moved too.
_pinned = hasattr(os, "sched_setaffinity") and pin_worker(
    os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    os.sched_getaffinity(0))
if _pinned:
  for _tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(_tid), _pinned)
    except ProcessLookupError:  # a thread that ended since the listing
      pass

import jax  # noqa: E402  (after XLA_FLAGS)

# With asynchronous dispatch on the CPU (JAX's default), an interpret-mode kernel still runs
# when the Python call that launched it returns; its interpreter, from one of the kernel's host
# callbacks, dispatches small JAX computations of its own (thread ids, buffers). When the test
# dispatches an eager operation meanwhile, the interpreter's computation queues behind it and
# it behind the kernel: the process waits forever with no CPU time (seen 2026-12-07 in the
# whole suite, twice at the same test: test_padding_never_leaks's Mosaic interpret cases; a
# script that calls the op eagerly in a loop and dispatches small operations after each call
# hung in 4 processes of 4 within 40 calls, and in none of 4 with this setting). Inline
# dispatch runs each computation on the calling thread before the call returns. Read when JAX
# starts its CPU backend, so set before any computation (JAX 0.11.2 reads no environment
# variable for it).
jax.config.update("jax_cpu_enable_async_dispatch", False)
import pytest  # noqa: E402

import interpret_callbacks  # noqa: E402


def plain_interpret() -> bool:
  """Whether GPU interpret mode keeps JAX's own host callbacks: ``JSTA_PLAIN_INTERPRET=1``
  (another value than "", "0", "1" is a UsageError)."""
  plain = os.environ.get("JSTA_PLAIN_INTERPRET", "")
  if plain not in ("", "0", "1"):
    raise pytest.UsageError(f"JSTA_PLAIN_INTERPRET must be 0 or 1, got {plain!r}")
  return plain == "1"


def pytest_configure(config):
  # GPU interpret mode's host callbacks take their numpy arguments as they are (about 3x faster
  # interpret-mode cases; interpret_callbacks.py says why and what it replaces).
  if not plain_interpret():
    interpret_callbacks.install()


GPU_REASON = "needs an NVIDIA GPU"
HOPPER_REASON = "needs a compute capability 9.x GPU"
SLOW_REASON = "a slow check: run with --slow or JSTA_SLOW_TESTS=1"


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False,
                   help="also run the tests marked slow (as JSTA_SLOW_TESTS=1 does)")


def run_slow(config) -> bool:
  """Whether this run includes the tests marked ``slow``: ``--slow``, or ``JSTA_SLOW_TESTS``
  set to 1 (any other value than "", "0" is a UsageError: a typo must not skip silently)."""
  env = os.environ.get("JSTA_SLOW_TESTS", "")
  if env not in ("", "0", "1"):
    raise pytest.UsageError(f"JSTA_SLOW_TESTS must be 0 or 1, got {env!r}")
  return bool(config.getoption("--slow")) or env == "1"


def _device():
  dev = jax.devices()[0]
  cc = str(getattr(dev, "compute_capability", "") or "") if dev.platform == "gpu" else ""
  return dev, cc


def parse_shard(shard: str | None) -> tuple[int, int] | None:
  """(i, n) of a ``JSTA_TEST_SHARD`` value "i/n" (1 <= i <= n), None for none; ValueError
  naming the variable otherwise."""
  if not shard:
    return None
  try:
    i, n = (int(x) for x in shard.split("/"))
  except ValueError:
    i = n = 0
  if not 1 <= i <= n:
    raise ValueError(f"JSTA_TEST_SHARD must be 'i/n' with 1 <= i <= n, got {shard!r}")
  return i, n


def in_shard(nodeid: str, shard: tuple[int, int]) -> bool:
  i, n = shard
  return zlib.crc32(nodeid.encode()) % n == i - 1


def pytest_collection_modifyitems(config, items):
  try:
    shard = parse_shard(os.environ.get("JSTA_TEST_SHARD"))
  except ValueError as e:
    raise pytest.UsageError(str(e)) from None
  if shard:
    keep = [in_shard(item.nodeid, shard) for item in items]
    config.hook.pytest_deselected(items=[it for it, k in zip(items, keep) if not k])
    items[:] = [it for it, k in zip(items, keep) if k]
  dev, cc = _device()
  slow = run_slow(config)
  for item in items:
    if "slow" in item.keywords and not slow:
      item.add_marker(pytest.mark.skip(reason=SLOW_REASON))
    elif dev.platform != "gpu" and ("gpu" in item.keywords or "hopper" in item.keywords):
      item.add_marker(pytest.mark.skip(reason=GPU_REASON))
    elif "hopper" in item.keywords and not cc.startswith("9."):
      item.add_marker(pytest.mark.skip(reason=HOPPER_REASON))
    elif "cpu_only" in item.keywords and dev.platform == "gpu":
      item.add_marker(pytest.mark.skip(reason="a CPU-only case (interpret mode)"))


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr or "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  """One line on the slow tests skipped, and on the GPU tests skipped and why (also with
  pytest-xdist: the skips arrive here from the workers)."""
  skipped = terminalreporter.stats.get("skipped", [])
  slow = sum(SLOW_REASON in _skip_reason(r) for r in skipped)
  if slow:
    terminalreporter.write_line(f"{slow} slow tests skipped: run them with --slow")
  gpu = sum(GPU_REASON in _skip_reason(r) for r in skipped)
  hopper = sum(HOPPER_REASON in _skip_reason(r) for r in skipped)
  if not gpu and not hopper:
    return
  dev, cc = _device()
  platforms = ", ".join(sorted({d.platform for d in jax.devices()}))
  if gpu:
    terminalreporter.write_line(
        f"{gpu} GPU tests skipped: JAX sees no GPU (devices: {platforms})")
  if hopper:
    what = f"the GPU is compute capability {cc}" if cc else f"JAX sees no GPU (devices: {platforms})"
    terminalreporter.write_line(
        f"{hopper} Hopper tests skipped: they need compute capability 9.x, {what}")
