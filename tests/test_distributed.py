"""The DMTRL round over several devices: 4 host CPU devices (``--xla_force_host_platform_device_count``)
against one, in a subprocess (the device count is fixed when JAX starts)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mtl_jax import distributed

SCRIPT = textwrap.dedent('''
    import json, os, re, sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    import mtl_jax
    from mtl_jax.data.synthetic import make_clustered_tasks
    from mtl_jax.solvers import base
    out = {"devices": len(jax.devices())}
    # Many sites per device: each device lays out its share in several tiles of the local pass (410 sites per
    # device, 409 per tile at d = 20 in float64), which is not the tile count of all the sites in one layout.
    Xb, yb, taskb, _ = make_clustered_tasks(1640, 20, samples_per_task=(2, 4), seed=5)
    runs = {}
    for devices in (1, None):
        res = mtl_jax.fit(Xb, yb, taskb, lam1=0.1, lam2=1.0, solver="dmtrl", tol=0.0, max_iter=4, devices=devices)
        runs[devices] = dict(W=res.W.tolist(), J=res.objective, rounds=res.iterations, used=res.config["devices"],
                             bytes=res.history[-1].bytes, participants=[r.participants for r in res.history])
    out["many_tiles"] = {"one": runs[1], "all": runs[None]}
    X, y, task, _ = make_clustered_tasks(37, 5, samples_per_task=(6, 30), loss="hinge", seed=3)
    for name, kw in [("joint", {}), ("alternating", dict(scheme="alternating", q="factored")),
                     ("systems", dict(dropout_prob=0.3, straggler_prob=0.5, min_effort=0.5, seed=7)),
                     ("chunked", {"chunk": 8})]:
        chunk = kw.pop("chunk", None)
        runs = {}
        for devices in (1, None):
            if chunk:   # the chunked layout through the solver directly
                from mtl_jax.data.sites import to_sites
                from mtl_jax.solvers import dmtrl
                sites = to_sites(X, y, task, layout="chunked", chunk=chunk)
                res = dmtrl.solve(sites, lam1=0.1, lam2=1.0, loss="hinge", tol=1e-9, max_iter=400, devices=devices)
                runs[devices] = dict(W=res.W.tolist(), J=res.objective, rounds=res.iterations, used=None,
                                     bytes=res.history[-1].bytes, participants=[r.participants for r in res.history])
            else:
                res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", solver="dmtrl", tol=1e-9,
                                  max_iter=400, devices=devices, **kw)
                runs[devices] = dict(W=res.W.tolist(), J=res.objective, rounds=res.iterations,
                                     used=res.config["devices"], bytes=res.history[-1].bytes,
                                     participants=[r.participants for r in res.history])
        out[name] = {"one": runs[1], "all": runs[None]}
    # what crosses devices in the last compiled round program: only small collectives, never the data
    exe = [e for k, e in base._COMPILED.items() if getattr(k[0], "__name__", "") == "run_rounds"][-1]
    out["collectives"] = re.findall(r"= ([a-z0-9]+\\[[0-9,]*\\])[^=]*? (?:all-gather|all-reduce|all-to-all)\\(",
                                    exe.as_text())
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", MTL_JAX_NO_COMPILE_CACHE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["joint", "alternating", "systems", "chunked"])
def test_four_devices_give_the_one_device_answer_with_37_sites(four_devices, case):
    assert four_devices["devices"] == 4
    one, spread = four_devices[case]["one"], four_devices[case]["all"]
    W1, W4 = np.array(one["W"]), np.array(spread["W"])
    assert W1.shape == W4.shape == (37, 5)
    assert np.linalg.norm(W4 - W1) <= 1e-6 * np.linalg.norm(W1)
    assert spread["J"] == pytest.approx(one["J"], rel=1e-10)
    assert spread["rounds"] == one["rounds"]
    # empty sites pad the split but are never counted: same participants, same bytes
    assert spread["participants"] == one["participants"] and spread["bytes"] == one["bytes"]
    if one["used"] is not None:
        assert (one["used"], spread["used"]) == (1, 4)


@pytest.mark.slow
def test_four_devices_with_several_tiles_per_device(four_devices):
    # Regression: the per-device layout has more tiles than one layout of all the sites would (8 vs 5); the
    # sharded pass used to fail while tracing (its output shapes were taken from the global arrays).
    one, spread = four_devices["many_tiles"]["one"], four_devices["many_tiles"]["all"]
    W1, W4 = np.array(one["W"]), np.array(spread["W"])
    assert W1.shape == W4.shape == (1640, 20)
    assert np.linalg.norm(W4 - W1) <= 1e-6 * np.linalg.norm(W1)
    assert (one["rounds"], spread["rounds"]) == (4, 4) and (one["used"], spread["used"]) == (1, 4)
    assert spread["participants"] == one["participants"] and spread["bytes"] == one["bytes"]


@pytest.mark.slow
def test_only_small_vectors_cross_devices(four_devices):
    # sizes of the arrays in collectives: the d x d Gram, per-site (m, d) vectors, scalars; never (K, n, d) data
    for shape in four_devices["collectives"]:
        dims = [int(x) for x in shape[shape.index("[") + 1:-1].split(",") if x]
        assert np.prod(dims, dtype=np.int64) <= 40 * 5, shape


def test_pad_sites_adds_empty_sites_that_change_no_sum(rng):
    from mtl_jax.data.sites import feature_sums, to_sites
    X, y, task = rng.normal(size=(50, 3)), rng.normal(size=50), np.repeat(np.arange(7), [5, 9, 6, 8, 7, 10, 5])
    for layout in ("padded", "chunked"):
        sites = to_sites(X, y, task, layout=layout, **({"chunk": 4} if layout == "chunked" else {}))
        padded = distributed.pad_sites(sites, 4)
        assert padded.num_blocks % 4 == 0 and padded.num_blocks >= sites.num_blocks
        assert int(np.sum(np.asarray(padded.counts) > 0)) == 7
        alpha = rng.normal(size=padded.y.shape) * np.asarray(padded.mask)
        V = np.asarray(feature_sums(alpha, padded))
        V_ref = np.zeros((7, 3))
        index = np.asarray(padded.index)
        site = np.arange(padded.num_blocks) if padded.site is None else np.asarray(padded.site)
        for k in range(padded.num_blocks):
            for i in range(padded.n_max):
                if index[k, i] >= 0:
                    V_ref[site[k]] += alpha[k, i] * X[index[k, i]]
        np.testing.assert_allclose(V[:7], V_ref, atol=1e-12)
        assert np.all(V[7:] == 0)


def test_devices_option_is_checked():
    import mtl_jax
    X, y, task = np.ones((4, 2)), np.ones(4), np.array([0, 0, 1, 1])
    for bad in (0, 99, 1.5, "all"):
        with pytest.raises(ValueError, match="^devices"):
            mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, solver="dmtrl", devices=bad)
