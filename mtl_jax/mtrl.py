"""Multi-Task Relationship Learning: the objective, the Omega-step and Sigma (docs/mathematics.md, sections 1-3).

MTRL (Zhang and Yeung, UAI 2010), in the notation of DMTRL (Liu, Pan, Ho, KDD 2017). With ``m``
tasks, ``W`` (m, d) task-major and ``Omega`` (m, m) PSD with trace 1,

    P(W, Omega) = sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>)
                  + (lam1/2) ||W||_F^2 + (lam2/2) tr(W^T Omega^{-1} W).

Minimising over Omega gives ``Omega = (W W^T)^{1/2} / tr((W W^T)^{1/2})`` and
``tr(W^T Omega^{-1} W) = ||W||_*^2``, so P is minimised by minimising the strongly convex

    J(W) = sum_t (1/n_t) sum_i loss(...) + (lam1/2) ||W||_F^2 + (lam2/2) ||W||_*^2 ,

the yardstick of every solver here. Matrices that are functions of Omega are kept in the factored
form :class:`SpectralMatrix` ``U diag(a) U^T + b (I - U U^T)``: ``W W^T`` has rank at most d, so a
floored Omega, its inverse and Sigma all have that form and cost O(m r) memory, not O(m^2).

The two regularisers :class:`TraceNormSq` (of J) and :class:`SigmaQuadratic` (of P at fixed Omega)
share one small interface (value, prox, conjugate) that the solvers are written against.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.data.sites import feature_sums, margins, sample_weights
from mtl_jax.losses import Loss, get_loss

DEFAULT_EPS = 1e-8
#: ``FitResult.Omega`` refuses to materialise a dense (m, m) Omega above this many tasks (3.2 GB in
#: float64 at 20,000); the factors ``U, a, b`` and :meth:`SpectralMatrix.apply` serve any m.
DENSE_OMEGA_MAX_TASKS = 20_000


# --- factored symmetric matrices ------------------------------------------------------------------

class SpectralMatrix(NamedTuple):
    """A symmetric (m, m) matrix ``U diag(a) U^T + b (I - U U^T)`` stored factored.

    ``U`` (m, r) has orthonormal columns, ``a`` (r,), ``b`` () the eigenvalue of the complement
    (unused when r = m). Applying it to ``W`` (m, d) costs O(m r d); :meth:`dense` materialises it.
    """

    U: jax.Array
    a: jax.Array
    b: jax.Array

    def apply(self, W):
        """``M @ W`` for ``W`` (m, d)."""
        coef = self.U.T @ W
        return self.b * W + self.U @ ((self.a - self.b)[:, None] * coef)

    def map(self, fn):
        """The matrix function ``fn(M)``, applied to the eigenvalues."""
        return SpectralMatrix(self.U, fn(self.a), fn(self.b))

    def dense(self):
        """The (m, m) array. O(m^2) memory: for small m and for inspection."""
        m = self.U.shape[0]
        eye = jnp.eye(m, dtype=self.U.dtype)
        return self.b * eye + (self.U * (self.a - self.b)) @ self.U.T

    def trace(self):
        m, r = self.U.shape
        return jnp.sum(self.a) + (m - r) * self.b

    def max_eigenvalue(self):
        m, r = self.U.shape
        top = jnp.max(self.a)
        return top if r == m else jnp.maximum(top, self.b)


def as_spectral(M) -> SpectralMatrix:
    """A dense symmetric (m, m) array (or a :class:`SpectralMatrix`) as a :class:`SpectralMatrix`."""
    if isinstance(M, SpectralMatrix):
        return M
    M = jnp.asarray(M)
    w, U = jnp.linalg.eigh(0.5 * (M + M.T))
    return SpectralMatrix(U, w, jnp.zeros((), w.dtype))


# --- the Omega-step and Sigma ----------------------------------------------------------------------

def _floored_roots(roots, m, eps):
    """Floor the eigenvalues of (W W^T)^{1/2} and normalise them to a unit trace.

    The floor is ``eps`` times the mean eigenvalue (trace / m): relative, so that the (m - r)
    floored directions carry a fraction of about ``eps`` of the trace whatever m is (a fixed
    floor swamps Omega at m = 10^6). At W = 0 every root is 0 and Omega falls back to I / m.
    Returns (floored roots / trace, floor / trace).
    """
    total = jnp.sum(roots)
    floor = eps * total / m
    floored = jnp.maximum(roots, floor)
    trace = jnp.sum(floored) + (m - roots.shape[0]) * floor
    zero = total <= 0
    safe_trace = jnp.where(zero, 1.0, trace)
    a = jnp.where(zero, 1.0 / m, floored / safe_trace)
    b = jnp.where(zero, 1.0 / m, floor / safe_trace)
    return a, b


def omega_update(W, eps: float = DEFAULT_EPS):
    """Closed-form Omega-step, dense: ``Omega = (W W^T)^{1/2} / tr((W W^T)^{1/2})``, (m, m).

    Computed with ``eigh`` of ``W W^T`` (never ``sqrtm``); eigenvalues of the root are floored at
    ``eps`` times their mean so Omega stays positive definite (W = 0 gives I / m, no 0/0).
    O(m^2) memory: use :func:`omega_factored` for many tasks.

    Args:
      W: (m, d) task weights.
      eps: relative eigenvalue floor.
    """
    W = jnp.asarray(W)
    lam, U = jnp.linalg.eigh(W @ W.T)
    a, _ = _floored_roots(jnp.sqrt(jnp.maximum(lam, 0.0)), W.shape[0], eps)
    return (U * a) @ U.T


def omega_factored(W, eps: float = DEFAULT_EPS, num_tasks=None) -> SpectralMatrix:
    """The Omega-step of :func:`omega_update` in factored form, from the thin SVD of ``W`` (m, d).

    ``Omega = U diag(a) U^T + b (I - U U^T)`` with ``U`` (m, min(m, d)) the left singular vectors:
    O(m d) memory and O(m d^2) time. ``num_tasks`` (may be traced): the number of real tasks when
    ``W`` has extra all-zero rows (empty sites added for an even split over devices); the floor and
    the unit trace are those of the real tasks.
    """
    W = jnp.asarray(W)
    U, s, _ = jnp.linalg.svd(W, full_matrices=False)
    a, b = _floored_roots(s, W.shape[0] if num_tasks is None else num_tasks, eps)
    return SpectralMatrix(U, a, b)


def sigma_eigenvalues(omega_eig, lam1, lam2):
    """Eigenvalues of ``Sigma = Omega (lam1 Omega + lam2 I)^{-1}`` from those of Omega: w/(lam1 w + lam2)."""
    w = jnp.maximum(omega_eig, 0.0)
    return w / (lam1 * w + lam2)


def sigma(Omega, lam1, lam2):
    """``Sigma = (lam1 I + lam2 Omega^{-1})^{-1} = Omega (lam1 Omega + lam2 I)^{-1}``.

    Well defined when Omega is singular (a zero eigenvalue of Omega maps to a zero of Sigma). A dense
    (m, m) Omega gives a dense Sigma; a :class:`SpectralMatrix` gives a :class:`SpectralMatrix`.
    """
    out = as_spectral(Omega).map(lambda w: sigma_eigenvalues(w, lam1, lam2))
    return out if isinstance(Omega, SpectralMatrix) else out.dense()


def _inverse_quadratic(omega: SpectralMatrix, W):
    """``tr(W^T Omega^{-1} W)``: +inf when W has mass where Omega is singular, 0 when neither has.

    Masses below round-off (``100 r eps ||W||^2``, r the columns of U; never a multiple of m, which in
    float32 at m = 10^6 exceeds ``||W||^2`` itself and would call every mass zero) count as zero.
    """
    coef = omega.U.T @ W
    num = jnp.sum(coef**2, axis=1)
    den = omega.a
    if omega.U.shape[1] < omega.U.shape[0]:  # the complement of U, with eigenvalue b
        rest = W - omega.U @ coef
        num = jnp.concatenate([num, jnp.sum(rest**2)[None]])
        den = jnp.concatenate([den, omega.b[None]])
    tiny = 100 * jnp.finfo(W.dtype).eps * max(omega.U.shape[1], 1)
    singular = den <= 0
    massless = num <= tiny * jnp.sum(W**2)
    terms = jnp.where(singular, jnp.where(massless, 0.0, jnp.inf), num / jnp.where(singular, 1.0, den))
    return jnp.sum(terms)


# --- regularisers: value, prox, conjugate ------------------------------------------------------------

def prox_squared_l1(s, c):
    """``argmin_{x >= 0} ||x - s||^2 / 2 + (c/2) (sum x)^2`` for ``s`` sorted descending, ``s >= 0``.

    ``x_i = max(0, s_i - c S_k)``, ``S_k = (s_1 + ... + s_k) / (1 + k c)``, with ``k`` the smallest
    count for which ``s_{k+1} <= c S_k`` (or all): the KKT conditions with k active entries.
    """
    k = jnp.arange(1, s.shape[0] + 1, dtype=s.dtype)
    S = jnp.cumsum(s) / (1.0 + k * c)
    nxt = jnp.concatenate([s[1:], jnp.zeros((1,), s.dtype)])
    done = nxt <= c * S
    first = jnp.argmax(done)  # done[-1] is always true, so argmax finds the smallest k
    return jnp.maximum(0.0, s - c * S[first])


def _gram_eigh(Z):
    """Singular values (descending) and right (or left) singular vectors of ``Z`` (m, d) via ``eigh``.

    ``eigh`` of the small Gram matrix (``Z^T Z``, d x d, when m >= d; else ``Z Z^T``) costs
    O(m d min(m, d)), several times less than an SVD of the tall matrix, and the solvers only ever
    need ``Z`` mapped through a function of its singular values. Singular values come out accurate
    to about ``eps * s_max^2 / s``: exact enough for the large ones, and the small ones are shrunk
    to zero by every prox used here. ``Z`` is first scaled by a power of two (exact) so that the
    Gram matrix is representable at any scale of ``Z``.
    """
    m, d = Z.shape
    e = scale_exponent(Z)

    def roots_and_vectors(A):
        lam, Q = jnp.linalg.eigh(A.T @ A if m >= d else A @ A.T)
        return jnp.sqrt(jnp.maximum(lam[::-1], 0.0)), Q[:, ::-1]

    def scaled(Z):  # exact: the largest entry of Z 2^-e lies in [1/2, 1), so the Gram is representable
        s, Q = roots_and_vectors(jnp.ldexp(Z, -e))
        return jnp.ldexp(s, e), Q

    # A branch, not a multiplication by 1: the unscaled path stays the program it was, bit for bit.
    return jax.lax.cond(e == 0, roots_and_vectors, scaled, Z)


def scale_exponent(Z):
    """``e`` with ``max|Z|`` in ``[2^(e-1), 2^e)``, or 0 where no scaling is needed; ``Z 2^-e`` is exact.

    Without it the Gram matrix of a ``Z`` with entries below ~1e-154 (float64) underflows and one
    with entries above ~1e154 overflows (W and X^T alpha of features scaled by 1e-160 or 1e150).
    ``Z`` within a quarter of the exponent range of 1 (``|e| <= maxexp / 4``: 2^+-256 in float64,
    2^+-32 in float32) is left alone, so results there are bitwise those of the unscaled Gram (LAPACK's
    ``eigh`` is not exactly scale-equivariant). ``e`` is clamped so that the scale itself stays
    finite (a subnormal ``Z``); ``Z = 0`` gives 0.
    """
    maxexp = jnp.finfo(Z.dtype).maxexp
    _, e = jnp.frexp(jnp.max(jnp.abs(Z)))
    return jnp.where(jnp.abs(e) <= maxexp // 4, 0, jnp.maximum(e, 2 - maxexp))


#: Singular values below ``ZERO_RTOL_FACTOR * sqrt(k eps) * s_max`` count as zero in :func:`_svd_map`
#: (k = min(m, d), the Gram matrix's size): see :func:`zero_threshold`.
ZERO_RTOL_FACTOR = 1.0


def zero_threshold(s_max, k, dtype):
    """The singular value below which the Gram route of :func:`_gram_eigh` cannot tell ``s`` from 0.

    ``eigh`` of the (k, k) Gram matrix ``Z^T Z`` is backward stable: its eigenvalues carry an absolute
    error of about ``c k eps s_max^2`` with c of order one (the Gram itself is formed with a relative
    error of a few ``eps`` per entry: XLA's reductions are blocked, not one running sum of m terms), so a
    computed ``s = sqrt(lambda)`` below ``sqrt(c k eps) s_max`` is noise: its own error is as large
    as itself. The threshold is ``ZERO_RTOL_FACTOR * sqrt(k eps) * s_max`` (c = 1): relative to
    ``s_max`` and independent of m. At k = 5 that is ~3.3e-8 s_max in float64 and ~7.7e-4 s_max in
    float32. (The former threshold ``eps s_max max(m, d)`` grew with m and reached ~0.12 s_max in
    float32 at m = 10^6, discarding real directions.) Dropping the directions below it changes
    ``Z -> U fn(s) V^T`` by at most ``C sqrt(k)`` times the threshold (``fn(s) <= C s``), the size of
    the Gram route's own error there, and keeps noise singular values (~``sqrt(eps) s_max`` each) out
    of ``||W||_*`` when the shrinkage is too weak to remove them.
    """
    info = jnp.finfo(dtype)
    return ZERO_RTOL_FACTOR * jnp.sqrt(jnp.asarray(k * info.eps, dtype)) * jnp.maximum(s_max, info.tiny)


def _svd_map(Z, fn):
    """Apply ``fn`` to the singular values of ``Z``; returns (result, new singular values, old ones).

    ``fn`` must map 0 to 0 and satisfy ``0 <= fn(s) <= C s`` (true of the shrinkages used here), so
    that ``Z -> U diag(fn(s)) V^T = Z V diag(fn(s)/s) V^T`` needs only the Gram eigenvectors.
    Singular values below :func:`zero_threshold` (relative to ``s_max``, never growing with m) count
    as zero: they and their images are returned as 0 and their directions are dropped.
    """
    s, Q = _gram_eigh(Z)
    tiny = zero_threshold(s[0], min(Z.shape), s.dtype)
    s = jnp.where(s > tiny, s, 0.0)
    t = fn(s)
    ratio = jnp.where(s > tiny, t / jnp.where(s > tiny, s, 1.0), 0.0)
    M = (Q * ratio) @ Q.T
    out = Z @ M if Z.shape[0] >= Z.shape[1] else M @ Z
    return out, t, s


def singular_values(Z):
    """Singular values of ``Z`` in descending order, by LAPACK's SVD.

    Not through the Gram matrix: its eigenvalues carry an absolute error of about ``eps * s_max^2``,
    so singular values that should be zero come out near ``sqrt(eps) * s_max`` (~1e-8 relative in
    float64), which overstates ``||Z||_*`` of a low-rank ``Z`` (the usual case at the optimum of J)
    by a few 1e-9. The prox maps, which only need ``Z`` mapped through a shrinkage, keep the Gram route.

    A tall ``Z`` (m > d) is first reduced to the (d, d) ``R`` of its Householder QR (backward stable,
    so the singular values are as accurate as a direct SVD's): ``jnp.linalg.svd(Z, compute_uv=False)``
    of an (m, d) array allocates an (m, m) buffer in XLA's CPU lowering (80 GB at m = 10^5).
    """
    m, d = Z.shape
    if m > d:
        Z = jnp.linalg.qr(Z, mode="r")
    elif d > m:
        Z = jnp.linalg.qr(Z.T, mode="r")
    return jnp.linalg.svd(Z, compute_uv=False)


def prox_trace_norm_sq(Z, c):
    """``argmin_W ||W - Z||_F^2 / 2 + (c/2) ||W||_*^2``: singular vectors kept, values by :func:`prox_squared_l1`."""
    return _svd_map(Z, lambda s: prox_squared_l1(s, c))[0]


class TraceNormSq(NamedTuple):
    """``R(W) = (lam1/2) ||W||_F^2 + (lam2/2) ||W||_*^2``, the regulariser of J.

    ``R`` is lam1-strongly convex, so its conjugate is smooth: ``grad R*(V) = argmax <W, V> - R(W)``
    is the prox of ``(lam2 / lam1)/2 ||.||_*^2`` at ``V / lam1``, ``1 / lam1``-Lipschitz.
    """

    lam1: jax.Array
    lam2: jax.Array

    def _spectral_value(self, t):
        return 0.5 * self.lam1 * jnp.sum(t**2) + 0.5 * self.lam2 * jnp.sum(t) ** 2

    def value(self, W):
        return self._spectral_value(singular_values(W))

    def prox(self, Z, step):
        """``argmin_W ||W - Z||^2/2 + step R(W)``; returns (W, R(W))."""
        shrink = 1.0 / (1.0 + step * self.lam1)
        c = step * self.lam2 * shrink
        W, t, _ = _svd_map(Z, lambda s: prox_squared_l1(shrink * s, c))
        return W, self._spectral_value(t)

    def conjugate(self, V):
        """Returns ``(W, R*(V), R(W))`` with ``W = grad R*(V)`` (the primal point of a dual V)."""
        W, t, s = _svd_map(V, lambda s: prox_squared_l1(s / self.lam1, self.lam2 / self.lam1))
        reg = self._spectral_value(t)
        return W, jnp.sum(t * s) - reg, reg

    def conjugate_lipschitz(self):
        return 1.0 / self.lam1


class SigmaQuadratic(NamedTuple):
    """``R(W) = (lam1/2) ||W||_F^2 + (lam2/2) tr(W^T Omega^{-1} W) = (1/2) tr(W^T Sigma^{-1} W)``.

    The regulariser of P at a fixed Omega (the W-step); ``R*(V) = (1/2) tr(V^T Sigma V)`` and the
    primal-dual map is ``W = Sigma V`` (docs/mathematics.md, section 4).
    """

    omega: SpectralMatrix
    lam1: jax.Array
    lam2: jax.Array

    @property
    def sigma(self) -> SpectralMatrix:
        return self.omega.map(lambda w: sigma_eigenvalues(w, self.lam1, self.lam2))

    def value(self, W):
        """``R(W)`` for any ``W``. Ill-conditioned at a floored Omega: the complement term divides
        ``||W - U U^T W||^2`` by the floor ``b`` (~``eps / m``), so round-off of size ``eps_machine ||W||``
        in ``W`` (its float32 storage alone) is amplified by ``1 / b`` (at m = 10^6 in float32 this gave
        4.1e-3 for a true 1.2e-3 at ``W = Sigma V``). Where ``W = Sigma V``, use :meth:`conjugate`'s
        ``<V, Sigma V> / 2``, which is stable (and what DMTRL uses)."""
        return 0.5 * self.lam1 * jnp.sum(W**2) + 0.5 * self.lam2 * _inverse_quadratic(self.omega, W)

    def prox(self, Z, step):
        W = self.sigma.map(lambda s: s / (s + step)).apply(Z)
        return W, self.value(W)

    def conjugate(self, V):
        W = self.sigma.apply(V)
        half = 0.5 * jnp.sum(V * W)
        return W, half, half

    def conjugate_lipschitz(self):
        return self.sigma.max_eigenvalue()


# --- objectives on site-padded data ------------------------------------------------------------------

def empirical_loss(W, sites, loss: str | Loss, a=None):
    """``sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>)`` over real (unmasked) samples."""
    loss = get_loss(loss)
    a = margins(W, sites) if a is None else a
    return jnp.sum(sample_weights(sites) * loss.value(sites.y, a))


def objective_P(W, Omega, sites, *, lam1, lam2, loss: str | Loss = "squared"):
    """``P(W, Omega)``; ``Omega`` dense (m, m) or :class:`SpectralMatrix`. +inf off Omega's range."""
    reg = SigmaQuadratic(as_spectral(Omega), lam1, lam2)
    return empirical_loss(W, sites, loss) + reg.value(W)


def objective_J(W, sites, *, lam1, lam2, loss: str | Loss = "squared"):
    """``J(W) = min_Omega P(W, Omega)``, the squared-trace-norm form."""
    return empirical_loss(W, sites, loss) + TraceNormSq(lam1, lam2).value(W)


def dual_terms(alpha, sites, loss: str | Loss):
    """``sum_{t,i} -c_t loss*(-alpha_ti / c_t)``: the loss part of the dual objective (padding contributes 0)."""
    loss = get_loss(loss)
    safe_c = jnp.where(sites.mask > 0, sample_weights(sites), 1.0)
    return jnp.sum(sites.mask * loss.dual_term(alpha, sites.y, safe_c))


def dual_objective(alpha, sites, reg, loss: str | Loss, V=None):
    """``D(alpha) = sum_{t,i} -c_t loss*(-alpha_ti / c_t) - R*(V)``, ``V_t = sum_i alpha_ti x_ti``.

    ``alpha`` (m, n_max) must be dual feasible and zero at padding; pass ``V`` (m, d) when it is
    already known (it saves a pass over the data). Returns (D, W(alpha), R(W(alpha))).
    """
    conj = dual_terms(alpha, sites, loss)
    V = feature_sums(alpha, sites) if V is None else V
    W, reg_conj, reg_at_W = reg.conjugate(V)
    return conj - reg_conj, W, reg_at_W


def duality_gap(W, alpha, sites, reg, loss: str | Loss):
    """``P_R(W) - D_R(alpha) >= 0`` for the primal ``loss + R`` and its Fenchel dual; zero only at the optimum."""
    primal = empirical_loss(W, sites, loss) + reg.value(W)
    return primal - dual_objective(alpha, sites, reg, loss)[0]
