"""The DiT on a (data, seq) mesh of 4 host devices equals the single-device model: forward for
each attention kind (STA with per-head windows, full attention; text masks) and one training
step (STA).

Runs in a subprocess (tests/helpers.py: run_on_cpu_devices) so that
XLA_FLAGS=--xla_force_host_platform_device_count=4 takes effect.
"""

import textwrap

import pytest

from helpers import run_on_cpu_devices

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from models import data as data_lib, train as train_lib
    from models.parallel import make_mesh
    from models.video_dit import VideoDiT, video_dit_config

    assert len(jax.devices()) == 4
    par = make_mesh(data=2, seq=2)
    per_head = ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 3))
    for kind, window in (("sta", (per_head, (3, 3, 3))), ("full", None)):
        cfg = video_dit_config("tiny", attention=kind, window=window)
        model = VideoDiT(cfg, rngs=nnx.Rngs(0))
        # Zero-initialised output layers would make every output 0: perturb all params.
        state = nnx.state(model, nnx.Param)
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(tree, leaves))
        batch = data_lib.make_batch(jax.random.key(2), data_lib.BlobDataConfig.for_model(cfg), 4)
        mask = np.ones((4, cfg.text_max_len), bool); mask[1, 5:] = False
        batch["text_mask"] = jnp.asarray(mask)
        t = jnp.linspace(0.2, 0.8, 4)
        tl = cfg.text_max_len
        graphdef, st = nnx.split(model)
        f = jax.jit(lambda st, x, text, m, par: nnx.merge(graphdef, st)(
            x, t, text, m, text_len=tl, parallel=par), static_argnums=4)
        one = f(st, batch["latent"], batch["text"], batch["text_mask"], None)
        sb = par.shard_batch(batch)
        many = f(st, sb["latent"], sb["text"], sb["text_mask"], par)
        np.testing.assert_allclose(many, one, atol=1e-5, rtol=1e-5, err_msg=f"{kind} {window}")
        assert float(jnp.abs(one).max()) > 1e-3

        # One training step, sharded vs not, from identical states (its sharding does not
        # depend on the attention kind, whose sharded forward is checked above: STA only).
        if kind != "sta":
            continue
        m1, m2 = VideoDiT(cfg, rngs=nnx.Rngs(3)), VideoDiT(cfg, rngs=nnx.Rngs(3))
        o1, o2 = train_lib.make_optimizer(m1), train_lib.make_optimizer(m2)
        key = jax.random.key(4)
        l1, g1 = train_lib.train_step(m1, o1, batch, key, text_len=tl)
        l2, g2 = train_lib.train_step(m2, o2, sb, key, text_len=tl, parallel=par)
        np.testing.assert_allclose(l2, l1, rtol=1e-5)
        np.testing.assert_allclose(g2, g1, rtol=1e-4)
        for a, b in zip(jax.tree.leaves(nnx.state(m2, nnx.Param)),
                        jax.tree.leaves(nnx.state(m1, nnx.Param))):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    print("MODEL_PARALLEL_OK")
""")


@pytest.mark.slow
def test_sharded_dit_matches_single_device():
  r = run_on_cpu_devices(["-c", SCRIPT], devices=4, timeout=900)
  assert r.returncode == 0 and "MODEL_PARALLEL_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_parallelism_errors():
  import jax
  from models.parallel import Parallelism, make_mesh
  with pytest.raises(ValueError, match="mesh"):
    Parallelism(mesh="not a mesh")
  with pytest.raises(ValueError, match="devices"):
    make_mesh(data=len(jax.devices()) + 1, seq=1)


@pytest.mark.slow
def test_scaling_bench_tiny(tmp_path):
  r = run_on_cpu_devices(["-m", "benchmarks.scaling_bench", "--preset", "tiny", "--warmup", "1",
                          "--iters", "1", "--out", str(tmp_path)], devices=2, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  import json
  res = json.loads((tmp_path / "scaling_bench.json").read_text())
  assert [row["devices"] for row in res["results"]] == [1, 2]
  assert all(row["step_ms"] > 0 and "error" not in row for row in res["results"])
