"""Many tasks (m >= 10^5): no m x m array on the DMTRL path, m-free zero thresholds, float32 certificates.

docs/mathematics.md, section 7. The float32 checks build float32 ``Sites`` explicitly (conftest enables
float64) and compare the float32 run's own certificates with a float64 evaluation of its iterate.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from mtl_jax import mtrl
from mtl_jax.api import FitResult
from mtl_jax.data.sites import Sites, to_sites
from mtl_jax.solvers import dmtrl

BIG_M = 50_000


# --- no m x m intermediate -----------------------------------------------------------------------------

def _sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _big(shape, m):
    return sum(int(s) >= m for s in shape) >= 2


def jaxpr_offenders(jaxpr, m, path=""):
    """(primitive path, shape) of every variable with two dimensions >= m, sub-jaxprs (while, scan,
    cond, pjit, shard_map, custom rules) included."""
    out = []
    for eqn in jaxpr.eqns:
        for v in list(eqn.invars) + list(eqn.outvars):
            shape = getattr(getattr(v, "aval", None), "shape", ())
            if _big(shape, m):
                out.append((path + eqn.primitive.name, tuple(shape)))
        for sub in _sub_jaxprs(eqn.params):
            out += jaxpr_offenders(sub, m, path + eqn.primitive.name + "/")
    return out


def hlo_offenders(text, m):
    """Shapes with two dimensions >= m in StableHLO (``tensor<AxBxf64>``) or HLO (``f64[A,B]``) text.

    Needed besides the jaxpr: a primitive's lowering may allocate what its jaxpr does not show
    (``jnp.linalg.svd(Z, compute_uv=False)`` of an (m, d) Z lowers to an (m, m) buffer on CPU).
    """
    shapes = [s.split("x") for s in re.findall(r"tensor<([0-9x]+)x[a-z]+\d*>", text)]
    shapes += [s.split(",") for s in re.findall(r"\b[a-z]+\d+\[([0-9,]+)\]", text)]
    return sorted({tuple(s) for s in shapes if _big(s, m)})


def _programs(m, d, n, scheme, q_rule, dtype=jnp.float64):
    """(init_state, its args), (run_rounds, its args) at m sites, as solve() calls them."""
    sites = Sites(jnp.zeros((m, n, d), dtype), jnp.zeros((m, n), dtype), jnp.ones((m, n), dtype),
                  jnp.full((m,), n, jnp.int32), jnp.zeros((m, n), jnp.int32))
    params = dmtrl.Params(*(jnp.asarray(v, dtype) for v in (0.1, 0.1, 1e-6, 1e-8)), jnp.asarray(10, jnp.int32),
                          jnp.asarray(1e-3, dtype))
    systems = dmtrl.Systems(jnp.ones((m,), jnp.int32), *(jnp.asarray(v, dtype) for v in (1.0, 0.0, 0.25, 0.0)),
                            jnp.full((m,), 1e6, dtype), jnp.asarray(0.05, dtype), jnp.asarray(1e7, dtype))
    static = dict(loss="squared", scheme=scheme, q_rule=q_rule)

    def init(*a):
        return dmtrl.init_state(*a, **static)

    def run(*a):
        return dmtrl.run_rounds(*a, order="random", history_size=8, **static)

    init_args = (sites, params, jnp.zeros((m, n), dtype), jnp.asarray(0, jnp.uint32))
    state = jax.eval_shape(init, *init_args)
    run_args = (state, sites, params, systems, jnp.asarray(3, jnp.int32), jnp.asarray(False))
    return (init, init_args), (run, run_args)


PROGRAMS = [("joint", "lambda_max"), ("joint", "factored"), ("alternating", "factored"),
            ("alternating", "lambda_max")]


@pytest.mark.parametrize("scheme,q_rule", PROGRAMS)
def test_dmtrl_programs_have_no_m_by_m_intermediate(scheme, q_rule):
    for fn, args in _programs(BIG_M, 4, 2, scheme, q_rule):
        assert jaxpr_offenders(jax.make_jaxpr(fn)(*args).jaxpr, BIG_M) == []
        assert hlo_offenders(jax.jit(fn).lower(*args).as_text(), BIG_M) == []


@pytest.mark.slow
@pytest.mark.parametrize("scheme,q_rule", [("joint", "lambda_max"), ("alternating", "factored")])
def test_compiled_dmtrl_programs_have_no_m_by_m_buffer(scheme, q_rule):
    for fn, args in _programs(BIG_M, 4, 2, scheme, q_rule):
        assert hlo_offenders(jax.jit(fn).lower(*args).compile().as_text(), BIG_M) == []


def test_offender_detectors_see_m_by_m():
    """The walkers are not vacuous: an outer product inside a loop, and the (m, m) buffer that the
    CPU lowering of an SVD without vectors allocates, are both found."""
    m = 1000
    z = jnp.zeros((m, 3))

    def outer_in_loop(z):
        return jax.lax.fori_loop(0, 2, lambda i, acc: acc + jnp.sum(z[:, :1] * z[:, 0][None, :]), 0.0)

    assert jaxpr_offenders(jax.make_jaxpr(outer_in_loop)(z).jaxpr, m) != []
    assert hlo_offenders(jax.jit(lambda z: jnp.linalg.svd(z, compute_uv=False)).lower(z).as_text(), m) != []
    assert hlo_offenders(jax.jit(mtrl.singular_values).lower(z).as_text(), m) == []


def test_singular_values_of_tall_and_wide(rng):
    for shape in [(300, 5), (5, 300), (6, 6)]:
        Z = rng.normal(size=shape)
        Z = Z * np.array([1.0, 1e-3, 1e-6, 1.0, 2.0, 3.0])[: shape[1]] if shape[1] <= 6 else Z
        np.testing.assert_allclose(np.asarray(mtrl.singular_values(jnp.asarray(Z))),
                                   np.linalg.svd(Z, compute_uv=False), rtol=1e-12, atol=1e-14)


# --- thresholds that do not grow with m --------------------------------------------------------------------

def _tall_with_spectrum(m, s, rng):
    """An (m, len(s)) float64 matrix with singular values ``s`` (orthonormal U by QR)."""
    U, _ = np.linalg.qr(rng.normal(size=(m, len(s))))
    V, _ = np.linalg.qr(rng.normal(size=(len(s), len(s))))
    return (U * np.asarray(s)) @ V.T


@pytest.mark.parametrize("m", [1000, 1_000_000])
def test_svd_map_keeps_small_real_directions_in_float32(m, rng):
    """s = (1, 0.05, 0.01, 0): the former threshold eps * s_max * m is 0.12 at m = 10^6 in float32 and
    dropped the 0.05 and 0.01 directions. With lam2 = 0 the joint map is V / lam1 exactly."""
    Z = _tall_with_spectrum(m, [1.0, 0.05, 0.01, 0.0], rng)
    Z32 = jnp.asarray(Z, jnp.float32)
    W, t, s = mtrl._svd_map(Z32, lambda s: 2.0 * s)
    np.testing.assert_allclose(np.asarray(s), [1.0, 0.05, 0.01, 0.0], atol=3e-6)
    err = np.linalg.norm(np.asarray(W, np.float64) - 2.0 * Z) / np.linalg.norm(2.0 * Z)
    assert err < 1e-5
    # the prox of the squared trace norm, against the float64 one
    ref = np.asarray(mtrl.prox_trace_norm_sq(jnp.asarray(Z), 0.01))
    got = np.asarray(mtrl.prox_trace_norm_sq(Z32, jnp.float32(0.01)), np.float64)
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)


def test_zero_threshold_is_relative_and_m_free():
    for dtype in (jnp.float32, jnp.float64):
        eps = float(jnp.finfo(dtype).eps)
        thr = float(mtrl.zero_threshold(jnp.asarray(2.0, dtype), 5, dtype))
        assert thr == pytest.approx(2.0 * mtrl.ZERO_RTOL_FACTOR * np.sqrt(5 * eps), rel=1e-6)
    # noise from the Gram route is removed: a rank-2 float32 matrix keeps exactly 2 singular values
    rng = np.random.default_rng(1)
    Z = jnp.asarray(_tall_with_spectrum(200_000, [3.0, 1.0, 0.0, 0.0, 0.0], rng), jnp.float32)
    _, t, s = mtrl._svd_map(Z, lambda s: s)
    assert np.count_nonzero(np.asarray(s)) == 2 and np.count_nonzero(np.asarray(t)) == 2


def test_inverse_quadratic_threshold_does_not_grow_with_m():
    """Mass off the range of a singular Omega is +inf at m = 10^6 in float32 (100 eps m was 12 > 1 there,
    so every mass counted as round-off and P came out finite)."""
    m = 1_000_000
    U = jnp.zeros((m, 1), jnp.float32).at[0, 0].set(1.0)
    omega = mtrl.SpectralMatrix(U, jnp.ones((1,), jnp.float32), jnp.zeros((), jnp.float32))
    W = jnp.zeros((m, 2), jnp.float32).at[0].set(1.0).at[1, 0].set(0.5)
    assert np.isinf(float(mtrl._inverse_quadratic(omega, W)))
    assert float(mtrl._inverse_quadratic(omega, W.at[1, 0].set(0.0))) == pytest.approx(2.0)


def test_omega_floor_in_float32_at_a_million_tasks(rng):
    m, d = 1_000_000, 5
    W = jnp.asarray(rng.normal(size=(m, 2)) @ rng.normal(size=(2, d)), jnp.float32)
    om = mtrl.omega_factored(W, 1e-8)
    assert float(om.b) > 0
    assert float(om.trace()) == pytest.approx(1.0, rel=1e-5)
    mean = 1.0 / m
    assert float(om.b) == pytest.approx(1e-8 * mean, rel=1e-3)  # the floor is eps times the mean root
    assert np.all(np.asarray(om.a) >= float(om.b))


# --- float32 certificates at many sites ----------------------------------------------------------------------

def _dataset(m, d, n, loss, seed=0):
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(m), n)
    W = rng.normal(size=(m, 2)) @ rng.normal(size=(2, d)) + 0.1 * rng.normal(size=(m, d))
    X = rng.normal(size=(m * n, d))
    a = np.einsum("nd,nd->n", X, W[task])
    if loss == "squared":
        y = a + 0.5 * rng.normal(size=a.shape)
    else:
        y = np.where(a + 0.3 * rng.normal(size=a.shape) > 0, 1.0, -1.0)
    return X, y, task


def _float32(sites):
    return sites._replace(X=jnp.asarray(sites.X, jnp.float32), y=jnp.asarray(sites.y, jnp.float32),
                          mask=jnp.asarray(sites.mask, jnp.float32), counts=jnp.asarray(sites.counts, jnp.int32),
                          index=jnp.asarray(sites.index, jnp.int32))


def _check_float32_certificate(m, loss, scheme, q=None, rounds=10, lam1=0.1, lam2=0.1):
    X, y, task = _dataset(m, 5, 5, loss)
    s64 = to_sites(X, y, task, num_tasks=m)
    s32 = _float32(s64)
    opts = {} if q is None else {"q": q}
    out = dmtrl.solve(s32, lam1=lam1, lam2=lam2, loss=loss, tol=0.0, max_iter=rounds, scheme=scheme, **opts)
    assert out.W.dtype == np.float32 and out.alpha.dtype == np.float32
    W, alpha = jnp.asarray(out.W, jnp.float64), jnp.asarray(out.alpha, jnp.float64)
    J64 = float(mtrl.objective_J(W, s64, lam1=lam1, lam2=lam2, loss=loss))
    D64 = float(mtrl.dual_objective(alpha, s64, mtrl.TraceNormSq(lam1, lam2), loss)[0])
    assert abs(out.objective - J64) <= 1e-4 * J64
    assert abs(out.gap - (J64 - D64)) <= 1e-4 * J64
    assert J64 - D64 > 0
    return out.objective, J64, out.gap, J64 - D64


@pytest.mark.parametrize("loss,scheme,q", [("squared", "joint", None), ("hinge", "alternating", "factored")])
def test_float32_certificates_at_1e5_sites(loss, scheme, q):
    _check_float32_certificate(100_000, loss, scheme, q)


@pytest.mark.slow
@pytest.mark.parametrize("loss,scheme,q", [("hinge", "joint", None), ("squared", "alternating", "lambda_max")])
def test_float32_certificates_at_1e5_sites_slow(loss, scheme, q):
    _check_float32_certificate(100_000, loss, scheme, q)


# --- FitResult.Omega ----------------------------------------------------------------------------------------

def _result(m, r=2):
    U, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(m, r)))
    omega = mtrl.SpectralMatrix(U, np.full((r,), 0.4), np.asarray(0.2 / max(m - r, 1)))
    return FitResult(W=np.zeros((m, 3)), omega=omega, history=(), objective=1.0, gap=0.0, converged=True,
                     iterations=1)


def test_fit_result_omega_refuses_above_the_limit():
    m = mtrl.DENSE_OMEGA_MAX_TASKS + 1
    res = _result(m)
    with pytest.raises(ValueError, match=r"res\.omega\.U.*res\.omega\.a.*res\.omega\.b.*res\.omega\.apply"):
        res.Omega
    M = np.ones((m, 1))
    out = np.asarray(res.omega.apply(M))  # the factored route works at any m
    assert out.shape == (m, 1) and np.all(np.isfinite(out))


def test_fit_result_omega_dense_at_the_limit_and_below(monkeypatch):
    res = _result(50)
    np.testing.assert_allclose(res.Omega, np.asarray(res.omega.dense()))
    assert np.trace(res.Omega) == pytest.approx(1.0)
    monkeypatch.setattr(mtrl, "DENSE_OMEGA_MAX_TASKS", 50)  # the boundary, without a 3.2 GB array
    assert _result(50).Omega.shape == (50, 50)
    with pytest.raises(ValueError, match="DENSE_OMEGA_MAX_TASKS"):
        _result(51).Omega
