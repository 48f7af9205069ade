"""Sharded STA on 8 host devices equals the single-device op (forward, lse and gradients):
head-parallel (Ulysses) attention, and the plain op under jax.jit on q, k, v sharded over batch
and/or heads (no all-gather in the compiled program). docs/SHARDING.md's examples run.

Runs in subprocesses so that XLA_FLAGS=--xla_force_host_platform_device_count=8 takes effect
whatever the test process imported before.
"""

import pathlib
import textwrap

import numpy as np
import pytest

from helpers import run_on_cpu_devices

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jsta
    from jsta.sharding import head_parallel_attention

    assert len(jax.devices()) == 8, jax.devices()
    cases = [
        (jsta.STASpec((4, 8, 8), (2, 4, 4), ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 3)),
                      text_len=5, text_max_len=16), 4, (2, 4)),
        (jsta.STASpec((3, 8, 6), (2, 4, 4), (1, 1, 1)), 8, (1, 8)),
    ]
    for spec, heads, (nb, ns) in cases:
        mesh = Mesh(np.array(jax.devices()[:nb * ns]).reshape(nb, ns), ("data", "seq"))
        b = 2 * nb
        ks = jax.random.split(jax.random.key(0), 4)
        shape = (b, spec.seq_len, heads, 16)
        q, k, v, do = (jax.random.normal(kk, shape, jnp.float32) for kk in ks)
        sh = NamedSharding(mesh, P("data", "seq"))
        qs, ks_, vs = (jax.device_put(x, sh) for x in (q, k, v))
        f_par = jax.jit(lambda q, k, v: head_parallel_attention(
            q, k, v, spec, mesh, seq_axis="seq", batch_axis="data", implementation="xla"))
        f_one = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend="xla"))
        o_par, o_one = f_par(qs, ks_, vs), f_one(q, k, v)
        assert o_par.sharding.spec == P("data", "seq"), o_par.sharding
        np.testing.assert_allclose(o_par, o_one, atol=2e-5, rtol=2e-5)
        g_par = jax.grad(lambda *a: jnp.vdot(f_par(*a), do), argnums=(0, 1, 2))(qs, ks_, vs)
        g_one = jax.grad(lambda *a: jnp.vdot(f_one(*a), do), argnums=(0, 1, 2))(q, k, v)
        for a, r in zip(g_par, g_one):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=2e-5)
    # Per-sample text lengths shard with the batch (data-parallel axis), under jit too.
    spec, heads = cases[0][0], cases[0][1]
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "seq"))
    q, k, v = (jax.random.normal(kk, (4, spec.seq_len, heads, 16)) for kk in ks[:3])
    lengths = jnp.array([0, 16, 5, 9])
    sh = NamedSharding(mesh, P("data", "seq"))
    par = jax.jit(lambda q, k, v, n: head_parallel_attention(
        q, k, v, spec, mesh, seq_axis="seq", batch_axis="data", text_lengths=n,
        implementation="xla"))
    one = jax.jit(lambda q, k, v, n: jsta.sliding_tile_attention(q, k, v, spec, text_lengths=n,
                                                                 implementation="xla"))
    o_par = par(*(jax.device_put(x, sh) for x in (q, k, v)), lengths)
    np.testing.assert_allclose(o_par, one(q, k, v, lengths), atol=2e-5, rtol=2e-5)
    o_eager = head_parallel_attention(q, k, v, spec, mesh, seq_axis="seq", batch_axis="data",
                                      text_lengths=[0, 16, 5, 9], backend="xla")
    np.testing.assert_allclose(o_eager, o_par, atol=2e-5, rtol=2e-5)
    for bad, exc in (([0, 17, 5, 9], ValueError), ([1, 2], ValueError), ([0.5] * 4, TypeError)):
        try:
            head_parallel_attention(q, k, v, spec, mesh, seq_axis="seq", batch_axis="data",
                                    text_lengths=bad)
        except exc as e:
            assert "text_lengths" in str(e), e
        else:
            raise AssertionError(f"expected {exc.__name__} for text_lengths={bad}")
    # Grouped k/v whose heads divide over the sequence axis (as q's): each device holds the
    # key/value heads of its query heads.
    spec = cases[1][0]
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "seq"))
    q = jax.random.normal(ks[0], (2, spec.seq_len, 4, 16))
    k, v = (jax.random.normal(kk, (2, spec.seq_len, 2, 16)) for kk in ks[1:3])
    o_par = head_parallel_attention(q, k, v, spec, mesh, seq_axis="seq", batch_axis="data",
                                    implementation="xla")
    np.testing.assert_allclose(o_par, jsta.sliding_tile_attention(q, k, v, spec, backend="xla"),
                               atol=2e-5, rtol=2e-5)
    # Bad input: heads not divisible by the sequence shards.
    spec = cases[0][0]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("data", "seq"))
    x = jnp.zeros((1, spec.seq_len, 4, 32))
    try:
        head_parallel_attention(x, x, x, spec, mesh, seq_axis="seq")
    except ValueError as e:
        assert "heads" in str(e), e
    else:
        raise AssertionError("expected ValueError for heads % shards")
    print("SHARDING_OK")
""")


def test_head_parallel_matches_single_device():
  r = run_on_cpu_devices(["-c", SCRIPT], devices=8, timeout=600)
  assert r.returncode == 0 and "SHARDING_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_local_head_specs():
  import jsta
  from jsta.sharding import local_head_specs
  spec = jsta.STASpec((4, 8, 8), (2, 4, 4), ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 3)))
  s = local_head_specs(spec, 4, 2)
  assert s[0].window == ((1, 1, 1), (3, 3, 3)) and s[1].window == ((1, 3, 1), (3, 1, 3))
  with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_shards \(3\)"):
    local_head_specs(spec, 4, 3)
  assert local_head_specs(spec, np.int64(4), np.int32(2)) == s
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec, got NoneType"):
    local_head_specs(None, 4, 2)


@pytest.mark.parametrize("args, error, match", [
    ((4, -2), ValueError, "num_shards must be >= 1, got -2"),
    ((0, 1), ValueError, "num_heads must be >= 1, got 0"),
    ((2, 0), ValueError, "num_shards must be >= 1, got 0"),
    ((True, 1), TypeError, "num_heads must be an int, got bool"),
    ((4, 2.0), TypeError, "num_shards must be an int, got float"),
])
def test_local_head_specs_bad_counts(args, error, match):
  import jsta
  from jsta.sharding import local_head_specs
  spec = jsta.STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3))
  with pytest.raises(error, match=match):
    local_head_specs(spec, *args)


def test_head_parallel_bad_inputs_raise_before_shard_map():
  """Checked on the global shapes and arguments, before any mesh work: one device (or an
  AbstractMesh, for a sequence axis of 2) is enough."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AbstractMesh, Mesh
  import jsta
  from jsta.sharding import head_parallel_attention, ulysses
  spec = jsta.STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3), text_len=5, text_max_len=16)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "seq"))
  q = jnp.zeros((2, spec.seq_len, 2, 8))
  hpa = lambda q, k, v, spec=spec, mesh=mesh, **kw: head_parallel_attention(
      q, k, v, spec, mesh, **{"seq_axis": "seq", **kw})
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh .* got NoneType"):
    hpa(q, q, q, mesh=None)
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec, got NoneType"):
    hpa(q, q, q, spec=None)
  with pytest.raises(TypeError, match="q must be a jax or numpy array, got list"):
    hpa(q.tolist(), q, q)
  with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\], got shape "
                                       r"\(272, 2, 8\)"):
    hpa(q[0], q, q)
  with pytest.raises(ValueError, match="batch_axis must be None or a mesh axis other than "
                                       "seq_axis, got 'seq' for both"):
    hpa(q, q, q, batch_axis="seq")
  with pytest.raises(TypeError, match="seq_axis must be a str"):
    hpa(q, q, q, seq_axis=None)
  # Global shapes in the message, not those of a shard.
  with pytest.raises(ValueError, match=r"got q \(2, 272, 2, 8\), k \(2, 272, 2, 4\)"):
    hpa(q, q[..., :4], q[..., :4])
  with pytest.raises(ValueError, match=r"k and v must have the same shape .* got "
                                       r"k \(2, 272, 2, 8\), v \(2, 272, 1, 8\)"):
    hpa(q, q, q[:, :, :1])
  # Grouped k/v: their heads are split over the sequence axis as q's are.
  kv = jnp.zeros((2, spec.seq_len, 1, 8))
  with pytest.raises(ValueError, match=r"k: heads \(1\) must be divisible by the 'seq' mesh "
                                       r"size \(2\); for fewer key/value heads, repeat"):
    hpa(q, kv, kv, mesh=AbstractMesh((1, 2), ("data", "seq")))
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    ulysses(lambda *a: a[1], None, seq_axis="seq")
  with pytest.raises(TypeError, match="k must be a jax or numpy array, got NoneType"):
    ulysses(lambda *a: a[1], mesh, seq_axis="seq")(q, None, q)


JIT_SCRIPT = textwrap.dedent(r"""
    import re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jsta

    assert len(jax.devices()) == 8, jax.devices()
    # Per-head windows: each head shard needs its own heads' schedule.
    spec = jsta.STASpec((2, 8, 8), (2, 4, 4), ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 3)),
                        text_len=5, text_max_len=16)
    B, H, D = 4, 4, 16
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, spec.seq_len, H, D))
    do = jax.random.normal(ks[3], q.shape)
    lengths = jnp.array([3, 16, 0, 9])

    def run(q, k, v, lengths):
        def loss(q, k, v):
            o, lse = jsta.sliding_tile_attention(q, k, v, spec, text_lengths=lengths,
                                                 return_lse=True, implementation="xla")
            return (o * do).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum(), (o, lse)
        (_, (o, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        return o, lse, grads

    def collectives(hlo):
        # (result shape, kind) of every collective of the compiled program.
        return re.findall(r"= (.+?) (all-gather|all-reduce|all-to-all|collective-permute|"
                          r"reduce-scatter)(?:-start)?\(", hlo)

    def check(mesh, q_spec, kv_heads, kv_spec, name, replicated_kv=False):
        k, v = (jax.random.normal(kk, (B, spec.seq_len, kv_heads, D)) for kk in ks[1:3])
        want = jax.jit(run)(q, k, v, lengths)
        shard = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
        args = (shard(q, q_spec), shard(k, kv_spec), shard(v, kv_spec),
                shard(lengths, P(q_spec[0])))
        # One compile: the program that runs is the one whose collectives are checked.
        compiled = jax.jit(run).lower(*args).compile()
        o, lse, grads = compiled(*args)
        # No all-gather of q, k, v (nor of any other array): the only collectives are the
        # loss's scalar sums, and the sums of dk, dv over the head shards when k and v are
        # replicated over them.
        for shape, op in collectives(compiled.as_text()):
            scalar = re.fullmatch(r"\(?(\w+\[\](, )?)+\)?", shape)
            assert op == "all-reduce" and (scalar or replicated_kv), (name, shape, op)
        if replicated_kv:
            # The gradient's dk, dv sums over the head shards may hide a collective of the
            # forward it holds: the forward alone has none (elsewhere the check above holds
            # the forward too).
            fwd = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec,
                                                                      implementation="xla"))
            assert not collectives(fwd.lower(*args[:3]).compile().as_text()), name
        norm = lambda s: tuple(s) + (None,) * (4 - len(s))
        assert norm(o.sharding.spec) == norm(q_spec), (name, o.sharding)
        assert norm(lse.sharding.spec)[:3] == norm(q_spec)[:3], (name, lse.sharding)
        assert norm(grads[0].sharding.spec) == norm(q_spec), (name, grads[0].sharding)
        for got, ref in zip((o, lse, *grads), (want[0], want[1], *want[2])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5,
                                       err_msg=name)
        print("ok", name)

    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    check(auto, P("data"), H, P("data"), "auto batch")
    check(auto, P(None, None, "model"), H, P(None, None, "model"), "auto heads")
    check(auto, P("data", None, "model"), H, P("data", None, "model"), "auto batch+heads")
    gqa = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    check(gqa, P("data", None, "model"), 2, P("data", None, "model"), "auto gqa sharded kv")
    check(gqa, P("data", None, "model"), 1, P("data"), "auto mqa replicated kv",
          replicated_kv=True)
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    check(explicit, P("data", None, "model"), H, P("data", None, "model"), "explicit")
    # Grouped k/v on explicit axes, sharded over heads or replicated over them, also under
    # jax.set_mesh (where the k/v copy per query head needs its sharding spelled out).
    explicit_gqa = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    for kv_heads, kv_spec in ((2, P("data", None, "model")), (1, P("data"))):
        name = f"explicit kv_heads={kv_heads}"
        check(explicit_gqa, P("data", None, "model"), kv_heads, kv_spec, name,
              replicated_kv=kv_heads == 1)
        k, v = (jax.random.normal(kk, (B, spec.seq_len, kv_heads, D)) for kk in ks[1:3])
        want = jax.jit(run)(q, k, v, lengths)
        shard = lambda x, s: jax.device_put(x, NamedSharding(explicit_gqa, s))
        args = (shard(q, P("data", None, "model")), shard(k, kv_spec), shard(v, kv_spec),
                shard(lengths, P("data")))
        with jax.set_mesh(explicit_gqa):
            got = jax.jit(run)(*args)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, rtol=2e-5,
                                       err_msg=name + " set_mesh")

    # vmap under jit: the vmapped axis joins the batch of each shard.
    qs = jax.device_put(q, NamedSharding(auto, P("data", None, "model")))
    per_sample = lambda x: jsta.sliding_tile_attention(x[None], x[None], x[None], spec,
                                                       implementation="xla")[0]
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(per_sample))(qs)),
                               np.asarray(jax.vmap(per_sample)(q)), atol=2e-5, rtol=2e-5)
    print("SHARDED_JIT_OK")
""")


def test_plain_jit_partitions_the_op_over_batch_and_heads():
  """Under jax.jit, q, k, v sharded by NamedSharding over batch, heads or both (auto and
  explicit mesh axes, grouped k/v sharded or replicated): the op runs per shard, with no
  collective but the loss's scalar sums (and the sums of dk, dv over the head shards where k, v
  are replicated over them); o, lse and the gradients equal the unsharded ones and come out
  sharded as q."""
  r = run_on_cpu_devices(["-c", JIT_SCRIPT], devices=8, timeout=900)
  assert r.returncode == 0 and "SHARDED_JIT_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "SHARDING.md"
RUN_DOC = textwrap.dedent(r"""
    import pathlib, re, sys
    path = pathlib.Path(sys.argv[1])
    scope = {"__name__": "docs_SHARDING"}
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
        exec(compile(block, str(path), "exec"), scope)
    print("DOC_OK", scope["jax"].device_count())
""")


@pytest.mark.parametrize("devices", [8])
def test_sharding_doc_examples_run(devices):
  """docs/SHARDING.md's examples, as written, on eight devices (on one device:
  tests/test_readme.py, which runs every document's examples)."""
  r = run_on_cpu_devices(["-c", RUN_DOC, str(DOC)], devices=devices, timeout=600)
  assert r.returncode == 0 and f"DOC_OK {devices}" in r.stdout, (
      r.stdout[-3000:] + r.stderr[-5000:])


KERNELS_SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, PartitionSpec as P
    import jsta
    from jsta.sharding import head_parallel_attention

    spec = jsta.STASpec((4, 4, 8), (2, 2, 4), (1, 3, 1), text_len=3, text_max_len=4)
    q, k, v = (jax.random.normal(kk, (2, spec.seq_len, 4, 24))
               for kk in jax.random.split(jax.random.key(0), 3))
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    plain = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation="xla")
    want, want_g = plain(q, k, v), jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)

    def check(attend, put):
        args = [put(x) for x in (q, k, v)]
        o = jax.jit(attend)(*args)
        g = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=2e-5)
        for a, b in zip(g, want_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4)

    triton = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec,
                                                         implementation="pallas_triton")
    mesh = jax.make_mesh((2, 2), ("b", "h"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        check(triton, lambda x: jax.device_put(x, P("b", None, "h")))
    # Head-parallel attention on explicit axes (jax.make_mesh's default) with a batch axis:
    # run-time text lengths made on one device, q, k, v on one device too (shard_map took
    # neither until they were resharded).
    lengths = jnp.array([1, 4])
    with_text = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, text_lengths=lengths,
                                                            implementation="xla")
    want, want_g = with_text(q, k, v), jax.grad(loss(with_text), argnums=(0, 1, 2))(q, k, v)
    data_seq = jax.make_mesh((2, 2), ("d", "s"), axis_types=(AxisType.Explicit,) * 2)
    check(lambda q, k, v: head_parallel_attention(q, k, v, spec, data_seq, seq_axis="s",
                                                  batch_axis="d", text_lengths=lengths,
                                                  implementation="pallas_triton"),
          lambda x: x)
    print("KERNELS_OK")
""")


def test_pallas_kernels_run_in_both_shard_maps():
  """The Pallas kernels (here the portable ones in interpret mode, head_dim 24 zero-padded to
  32) inside the op's shard_map over explicit mesh axes and inside head-parallel attention's:
  a pallas_call does not say how its outputs vary over mesh axes, which shard_map's default
  check (check_vma) required of them, so both failed at trace time. And head-parallel
  attention on explicit axes with inputs not yet sharded as it shards them (text lengths)."""
  r = run_on_cpu_devices(["-c", KERNELS_SCRIPT], devices=4, timeout=600)
  assert r.returncode == 0 and "KERNELS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def _hopper_under_explicit_mesh(program: str):
  """(result, want) of the op's forward or gradient with the Hopper kernels on q, k, v put on
  a one-device mesh of explicit axes (size-one axes still go through the op's shard_map),
  and of the float32 xla backend unsharded."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, PartitionSpec as P

  import jsta
  spec = jsta.STASpec((3, 8, 16), (1, 8, 8), (3, 1, 1), text_len=20, text_max_len=64)
  q, k, v = (jax.random.normal(kk, (1, spec.seq_len, 2, 96)).astype(jnp.bfloat16)
             for kk in jax.random.split(jax.random.key(1), 3))
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2)
  pick = (lambda f: f) if program == "fwd" else (
      lambda f: jax.grad(loss(f), argnums=(0, 1, 2)))
  want = pick(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation="xla"))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  mesh = jax.make_mesh((1, 1), ("b", "h"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, P("b", None, "h")) for x in (q, k, v)]
    got = jax.jit(pick(lambda q, k, v: jsta.sliding_tile_attention(
        q, k, v, spec, implementation="pallas_mosaic")))(*args)
  return got, want


def _rel(a, b) -> float:
  import jax.numpy as jnp
  return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))


@pytest.mark.gpu
@pytest.mark.hopper
def test_hopper_forward_runs_in_the_ops_shard_map_on_one_gpu():
  """The Hopper kernels' forward inside the op's shard_map (head_dim 96 zero-padded)."""
  o, want = _hopper_under_explicit_mesh("fwd")
  assert _rel(o, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.xfail(strict=True, reason="on an H100 (JAX 0.11.2, 2026-12-08) the gradient with "
                   "the fused backward inside the op's shard_map raised 'UNIMPLEMENTED: NVSHMEM "
                   "is not supported in XLA' at run time; not diagnosed yet")
def test_hopper_gradient_in_the_ops_shard_map_on_one_gpu():
  grads, want = _hopper_under_explicit_mesh("grad")
  assert all(_rel(a, b) < 3e-2 for a, b in zip(grads, want))
