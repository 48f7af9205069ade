"""Head-parallel STA on 8 host devices equals the single-device op (forward and gradients).

Runs in a subprocess so that XLA_FLAGS=--xla_force_host_platform_device_count=8 takes effect
whatever the test process imported before.
"""

import textwrap

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
            q, k, v, spec, mesh, seq_axis="seq", batch_axis="data", backend="xla"))
        f_one = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend="xla"))
        o_par, o_one = f_par(qs, ks_, vs), f_one(q, k, v)
        assert o_par.sharding.spec == P("data", "seq"), o_par.sharding
        np.testing.assert_allclose(o_par, o_one, atol=2e-5, rtol=2e-5)
        g_par = jax.grad(lambda *a: jnp.vdot(f_par(*a), do), argnums=(0, 1, 2))(qs, ks_, vs)
        g_one = jax.grad(lambda *a: jnp.vdot(f_one(*a), do), argnums=(0, 1, 2))(q, k, v)
        for a, r in zip(g_par, g_one):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=2e-5)
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
  with pytest.raises(ValueError, match="divisible"):
    local_head_specs(spec, 4, 3)
