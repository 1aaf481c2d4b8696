"""An adversarial review of second- and higher-order derivatives through
`lx.linear_solve`: `jax.hessian`, `jax.jvp` of `jax.grad`, `jax.grad` of
`jax.grad`, `jax.jacfwd(jax.jacrev(...))`, `vmap` of Hessian-vector products and
third derivatives, which differentiate the primitive's JVP and transpose rules
themselves.

Each Hessian is compared with the Hessian of a float64 reference built from
`jnp.linalg.solve`/`pinv` (differentiable at constant rank), and with central
finite differences of the first derivative along a random direction. The cases
cover the paper's equations: (4) square LU, Cholesky, triangular, tridiagonal,
diagonal, Kronecker, block-diagonal, low-rank update, sparse, complex; (2)/(3)
tall and wide least squares (QR, SVD, `Normal`, LSMR with and without a
differentiated `damp`); (1) rank-deficient operators of constant rank
(`A = U S V^T`, perturbing U, S's nonzero values and V, with an inconsistent
right-hand side, and LSMR from a differentiated `y0`). Operators: matrices
(real and complex), tagged, `FunctionLinearOperator` of a closure, a
`PyTreeLinearOperator` with dict structures, `JacobianLinearOperator`
(`jac="fwd"`/`"bwd"`, differentiated at its linearisation point) and the
structured ones. Krylov solves use `rtol=atol=1e-12` and bounded `max_steps`.

Reviewed and found to agree (measured, float64, n = 4..6): every case above,
Hessian against the reference to 1e-12 relative (most to 1e-15) and against
finite differences to 1e-8 (most to 1e-10); the five modes of one Hessian
agree to 1e-15; un-jitted `jax.hessian`/third derivatives of a Python-float
closure, a reused `state=`, `lx.invert`, `throw=False` (identical values, no
NaN, also for exactly zero right-hand sides), preconditioners and `y0` built
from the differentiated operator, and (LU, GMRES, SVD) reverse-over-forward
(`grad` of `jvp`), `jax.checkpoint`, a `lax.scan` of three dependent solves
and a `lax.cond` around the solve, all to 1e-15 of the reference. float32
with x64 off (n = 40 shifted Laplacian, cond 66, `rtol=1e-5`): second and
third derivatives of CG, MINRES, GMRES, BiCGStab and LU stay finite and
within 4e-4 of float64 (`Normal(CG)` too at n = 6; at n = 40 its cotangent
solve fails loudly, as it should: cond^2 = 4300 puts `rtol=1e-5` out of
float32's reach).

Found and left (see the report of this review): LSMR's third derivative of
that float32 problem raises "A tangent linear solve failed ... stagnated": one
of its 64 tangent solves has a smooth right-hand side (the low eigenvectors)
for which float32 LSMR ends 2% above `rtol=1e-5` (GMRES and CG meet it on the
same vector). The number of solves in a k-th derivative program is 2^k where
equation (4) applies (one tangent solve per JVP) and 4^k where equation (1)
does (LSMR, SVD: three): inherent to the pseudoinverse JVP nested k times;
`test_trace_growth_in_the_order` guards that it grows no faster. Compile
times of a Hessian (XLA's default flags, 4 x 4, this machine, loaded): LU
2 s, GMRES 13 s, CG 10 s, MINRES 19 s, LSMR 43 s (6 x 4 least squares: 78 s).
"""

import functools as ft
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EXHAUSTIVE
from helpers import float32_user
from jaxtyping import Array, Float

import lineax as lx


_RNG = np.random.default_rng(20261128)
_KRYLOV: dict[str, Any] = dict(rtol=1e-12, atol=1e-12, max_steps=300)
_PSD = lx.positive_semidefinite_tag
_EPS = 1e-5  # central differences of the gradient, float64


def _r(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape)


def _nl(x: Array) -> Array:
    """A loss that is not quadratic, so that every Hessian term shows."""
    return jnp.sum(jnp.sin(x)) + 0.5 * jnp.sum(x**2)


def _cl(x: Array) -> Array:
    return (
        jnp.sum(jnp.abs(x) ** 2) + jnp.sum(jnp.sin(x.real)) + jnp.sum(jnp.cos(x.imag))
    )


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))


@ft.partial(jax.jit, static_argnums=(0, 1))
def _second_order(loss: Callable, ref: Callable, p: Array, d: Array):
    """The Hessian of `loss`, of the reference, and the gradient at `p +- eps d`:
    one program per case."""
    grad = jax.grad(loss)
    return (
        jax.hessian(loss)(p),
        jax.hessian(ref)(p),
        grad(p + _EPS * d),
        grad(p - _EPS * d),
    )


def _check_second_order(
    loss: Callable, ref: Callable, size: int, ref_tol: float, fd_tol: float
) -> None:
    p = jnp.asarray(0.1 * _r(size))
    d = jnp.asarray(_r(size))
    hess, hess_ref, plus, minus = _second_order(loss, ref, p, d)
    assert np.all(np.isfinite(hess))
    assert _rel(hess, hess_ref) < ref_tol
    assert _rel(hess, hess.T) < ref_tol
    fd = (plus - minus) / (2 * _EPS)
    assert _rel(hess @ d, fd) < fd_tol


# --- The cases: `(loss, reference, number of parameters)`, built lazily. ------


def _square(solver, tags=(), spd=False, n=4):
    base = _r(n, n) + 3 * np.eye(n)
    if spd:
        base = base @ base.T + n * np.eye(n)
    b0 = _r(n)

    def build(p):
        a = base + 0.1 * p[: n * n].reshape(n, n)
        if spd:
            a = 0.5 * (a + a.T)
        return a, b0 + p[n * n :]

    def loss(p):
        a, b = build(p)
        return _nl(lx.linear_solve(lx.MatrixLinearOperator(a, tags), b, solver).value)

    return loss, lambda p: _nl(jnp.linalg.solve(*build(p))), n * n + n


def _lstsq(solver, m, n, damp=None):
    a0, b0 = _r(m, n), _r(m)
    size = m * n + m + (damp is not None)

    def build(p):
        return a0 + 0.1 * p[: m * n].reshape(m, n), b0 + p[m * n : m * n + m]

    def loss(p):
        a, b = build(p)
        # (A differentiated `damp`: LSMR's reformulation to `[A; damp I]`.)
        options = {} if damp is None else {"damp": damp + p[-1]}
        x = lx.linear_solve(lx.MatrixLinearOperator(a), b, solver, options=options)
        return _nl(x.value)

    def ref(p):
        a, b = build(p)
        if damp is None:
            return _nl(jnp.linalg.pinv(a) @ b)
        damped = a.T @ a + (damp + p[-1]) ** 2 * jnp.eye(n)
        return _nl(jnp.linalg.solve(damped, a.T @ b))

    return loss, ref, size


def _rank_deficient(solver, m, n, with_y0=False):
    """`A = U S V^T` of rank 2, perturbed in U, S and V (rank kept); `b` not in
    the range (the residual term of equation (1) is nonzero)."""
    r = 2
    u0, s0, v0, b0, y00 = _r(m, r), np.array([2.0, 0.7]), _r(n, r), _r(m), _r(n)
    size = m * r + r + n * r + m + (n if with_y0 else 0)

    def build(p):
        k = 0
        du = p[k : k + m * r].reshape(m, r)
        k += m * r
        ds = p[k : k + r]
        k += r
        dv = p[k : k + n * r].reshape(n, r)
        k += n * r
        a = (u0 + 0.1 * du) @ jnp.diag(s0 + 0.1 * ds) @ (v0 + 0.1 * dv).T
        y0 = y00 + jnp.sin(p[k + m :]) if with_y0 else None
        return a, b0 + p[k : k + m], y0

    def loss(p):
        a, b, y0 = build(p)
        options = {"y0": y0} if with_y0 else {}
        x = lx.linear_solve(lx.MatrixLinearOperator(a), b, solver, options=options)
        return _nl(x.value)

    def ref(p):
        a, b, y0 = build(p)
        pinv = jnp.linalg.pinv(a)
        if with_y0:  # LSMR from `y0`: `y0 + A^+ (b - A y0)`
            return _nl(y0 + pinv @ (b - a @ y0))
        return _nl(pinv @ b)

    return loss, ref, size


def _complex_square(solver, m=4, n=4):
    ar, ai, br, bi = _r(m, n) + 3 * np.eye(m, n), _r(m, n), _r(m), _r(m)
    k = m * n

    def build(p):
        a = lax.complex(
            ar + 0.1 * p[:k].reshape(m, n), ai + 0.1 * p[k : 2 * k].reshape(m, n)
        )
        b = lax.complex(br + p[2 * k : 2 * k + m], bi + p[2 * k + m :])
        return a, b

    def loss(p):
        a, b = build(p)
        return _cl(lx.linear_solve(lx.MatrixLinearOperator(a), b, solver).value)

    def ref(p):
        a, b = build(p)
        return _cl(jnp.linalg.pinv(a) @ b)

    return loss, ref, 2 * k + 2 * m


def _diagonal(solver, as_tag):
    n = 4
    d0, b0 = _r(n) + 3 * np.sign(_r(n)), _r(n)

    def loss(p):
        d, b = d0 + 0.3 * p[:n], b0 + p[n:]
        if as_tag:
            op = lx.MatrixLinearOperator(jnp.diag(d), lx.diagonal_tag)
        else:
            op = lx.DiagonalLinearOperator(d)
        return _nl(lx.linear_solve(op, b, solver).value)

    return loss, lambda p: _nl((b0 + p[n:]) / (d0 + 0.3 * p[:n])), 2 * n


def _triangular(solver, upper):
    n = 4
    l0, b0 = np.tril(_r(n, n)) + 3 * np.eye(n), _r(n)
    index = np.tril_indices(n)
    k = len(index[0])

    def build(p):
        a = jnp.asarray(l0).at[index].add(0.1 * p[:k])
        return (a.T if upper else a), b0 + p[k:]

    tag = lx.upper_triangular_tag if upper else lx.lower_triangular_tag

    def loss(p):
        a, b = build(p)
        return _nl(lx.linear_solve(lx.MatrixLinearOperator(a, tag), b, solver).value)

    return loss, lambda p: _nl(jnp.linalg.solve(*build(p))), k + n


def _tridiagonal(solver, as_tag):
    n = 5
    d0, l0, u0, b0 = _r(n) + 4, _r(n - 1), _r(n - 1), _r(n)

    def build(p):
        d = d0 + 0.1 * p[:n]
        lower = l0 + 0.1 * p[n : 2 * n - 1]
        upper = u0 + 0.1 * p[2 * n - 1 : 3 * n - 2]
        return d, lower, upper, b0 + p[3 * n - 2 :]

    def dense(d, lower, upper):
        return jnp.diag(d) + jnp.diag(lower, -1) + jnp.diag(upper, 1)

    def loss(p):
        d, lower, upper, b = build(p)
        if as_tag:
            op = lx.MatrixLinearOperator(dense(d, lower, upper), lx.tridiagonal_tag)
        else:
            op = lx.TridiagonalLinearOperator(d, lower, upper)
        return _nl(lx.linear_solve(op, b, solver).value)

    def ref(p):
        d, lower, upper, b = build(p)
        return _nl(jnp.linalg.solve(dense(d, lower, upper), b))

    return loss, ref, 4 * n - 2


def _kronecker(solver):
    a0, c0, b0 = _r(2, 2) + 2 * np.eye(2), _r(3, 3) + 3 * np.eye(3), _r(6)

    def build(p):
        return a0 + 0.1 * p[:4].reshape(2, 2), c0 + 0.1 * p[4:13].reshape(3, 3), p

    def loss(p):
        a, c, _ = build(p)
        op = lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(a), lx.MatrixLinearOperator(c)
        )
        return _nl(lx.linear_solve(op, b0 + p[13:], solver).value)

    def ref(p):
        a, c, _ = build(p)
        return _nl(jnp.linalg.solve(jnp.kron(a, c), b0 + p[13:]))

    return loss, ref, 19


def _block_diagonal(solver):
    a0, c0, b0 = _r(2, 2) + 2 * np.eye(2), _r(3, 3) + 3 * np.eye(3), _r(5)

    def build(p):
        a, c = a0 + 0.1 * p[:4].reshape(2, 2), c0 + 0.1 * p[4:13].reshape(3, 3)
        return a, c, b0 + p[13:]

    def loss(p):
        a, c, b = build(p)
        blocks = [lx.MatrixLinearOperator(a), lx.MatrixLinearOperator(c)]
        op = lx.BlockDiagonalLinearOperator(blocks)
        x = lx.linear_solve(op, (b[:2], b[2:]), solver).value
        return _nl(jnp.concatenate(x))

    def ref(p):
        a, c, b = build(p)
        return _nl(jnp.linalg.solve(jax.scipy.linalg.block_diag(a, c), b))

    return loss, ref, 18


def _low_rank(solver):
    n, k = 5, 2
    a0, u0, c0, v0 = (
        _r(n, n) + 4 * np.eye(n),
        _r(n, k),
        _r(k, k) + 2 * np.eye(k),
        _r(k, n),
    )
    b0 = _r(n)

    def build(p):
        a = a0 + 0.1 * p[:25].reshape(n, n)
        u = u0 + 0.1 * p[25:35].reshape(n, k)
        c = c0 + 0.1 * p[35:39].reshape(k, k)
        v = v0 + 0.1 * p[39:49].reshape(k, n)
        return a, u, c, v, b0 + p[49:]

    def loss(p):
        a, u, c, v, b = build(p)
        ops = [lx.MatrixLinearOperator(x) for x in (a, u, c, v)]
        op = lx.LowRankUpdateLinearOperator(*ops)
        return _nl(lx.linear_solve(op, b, solver).value)

    def ref(p):
        a, u, c, v, b = build(p)
        return _nl(jnp.linalg.solve(a + u @ c @ v, b))

    return loss, ref, 54


def _sparse(solver):
    from jax.experimental import sparse as jsparse

    n = 6
    dense0 = np.diag(_r(n) + 4) + np.diag(_r(n - 1), 1) + np.diag(_r(n - 1), -1)
    dense0[0, n - 1] = 0.5
    rows, cols = np.nonzero(dense0)
    values0, b0 = dense0[rows, cols], _r(n)
    k = len(values0)
    indices = np.stack([rows, cols], 1)

    def loss(p):
        # NumPy `indices` (a concrete pattern): JAX types them as arrays.
        matrix = jsparse.BCOO((values0 + 0.1 * p[:k], indices), shape=(n, n))  # pyright: ignore[reportArgumentType]
        op = lx.SparseLinearOperator(matrix)
        return _nl(lx.linear_solve(op, b0 + p[k:], solver).value)

    def ref(p):
        a = jnp.zeros((n, n)).at[rows, cols].set(values0 + 0.1 * p[:k])
        return _nl(jnp.linalg.solve(a, b0 + p[k:]))

    return loss, ref, k + n


def _preconditioned(solver):
    """A Jacobi preconditioner and a `y0` built from the differentiated operator:
    neither changes the answer, so neither may change its derivatives."""
    n = 5
    base = _r(n, n)
    base = base @ base.T + n * np.eye(n)
    b0 = _r(n)

    def build(p):
        c = 0.1 * p[: n * n].reshape(n, n)
        return base + c + c.T, b0 + p[n * n :]

    def loss(p):
        a, b = build(p)
        pre = lx.TaggedLinearOperator(lx.DiagonalLinearOperator(1 / jnp.diag(a)), _PSD)
        options = {"preconditioner": pre, "y0": jnp.sin(b)}
        op = lx.MatrixLinearOperator(a, _PSD)
        return _nl(lx.linear_solve(op, b, solver, options=options).value)

    return loss, lambda p: _nl(jnp.linalg.solve(*build(p))), n * n + n


# name: (factory, reference tolerance, finite-difference tolerance, default run)
_CASES = {
    "lu": (lambda: _square(lx.LU()), 1e-12, 1e-8, True),
    "cholesky_psd": (
        lambda: _square(lx.Cholesky(), _PSD, spd=True),
        1e-12,
        1e-8,
        False,
    ),
    "qr_tall_eq2": (lambda: _lstsq(lx.QR(), 6, 4), 1e-12, 1e-8, True),
    "qr_wide_eq3": (lambda: _lstsq(lx.QR(), 4, 6), 1e-12, 1e-8, True),
    "svd_rank_deficient_tall_eq1": (
        lambda: _rank_deficient(lx.SVD(), 5, 4),
        1e-12,
        1e-7,
        True,
    ),
    "diagonal_pinv_tag": (
        lambda: _diagonal(lx.Diagonal(well_posed=False), True),
        1e-12,
        1e-8,
        False,
    ),
    "triangular_upper": (
        lambda: _triangular(lx.Triangular(), True),
        1e-12,
        1e-8,
        False,
    ),
    "tridiagonal_operator": (
        lambda: _tridiagonal(lx.Tridiagonal(), False),
        1e-12,
        1e-8,
        False,
    ),
    "complex_lu": (lambda: _complex_square(lx.LU()), 1e-12, 1e-8, True),
    # The rest: the exhaustive grid.
    "qr_square": (lambda: _square(lx.QR()), 1e-12, 1e-8, False),
    "svd_square": (lambda: _square(lx.SVD()), 1e-12, 1e-8, False),
    "auto_true": (
        lambda: _square(lx.AutoLinearSolver(well_posed=True)),
        1e-12,
        1e-8,
        False,
    ),
    "auto_none_wide": (
        lambda: _lstsq(lx.AutoLinearSolver(well_posed=None), 4, 6),
        1e-12,
        1e-8,
        False,
    ),
    "auto_false_tall": (
        lambda: _lstsq(lx.AutoLinearSolver(well_posed=False), 6, 4),
        1e-12,
        1e-8,
        False,
    ),
    "svd_tall": (lambda: _lstsq(lx.SVD(), 6, 4), 1e-12, 1e-8, False),
    "normal_cholesky_tall": (
        lambda: _lstsq(lx.Normal(lx.Cholesky()), 6, 4),
        1e-12,
        1e-7,
        False,
    ),
    "normal_cholesky_wide": (
        lambda: _lstsq(lx.Normal(lx.Cholesky()), 4, 6),
        1e-12,
        1e-7,
        False,
    ),
    "svd_rank_deficient_square": (
        lambda: _rank_deficient(lx.SVD(), 4, 4),
        1e-12,
        1e-7,
        False,
    ),
    "svd_rank_deficient_wide": (
        lambda: _rank_deficient(lx.SVD(), 3, 5),
        1e-12,
        1e-7,
        False,
    ),
    "auto_false_rank_deficient": (
        lambda: _rank_deficient(lx.AutoLinearSolver(well_posed=False), 5, 4),
        1e-12,
        1e-7,
        False,
    ),
    "diagonal_operator": (lambda: _diagonal(lx.Diagonal(), False), 1e-12, 1e-8, False),
    "auto_none_diagonal": (
        lambda: _diagonal(lx.AutoLinearSolver(well_posed=None), True),
        1e-12,
        1e-8,
        False,
    ),
    "triangular_lower": (
        lambda: _triangular(lx.Triangular(), False),
        1e-12,
        1e-8,
        False,
    ),
    "tridiagonal_tag": (
        lambda: _tridiagonal(lx.Tridiagonal(), True),
        1e-12,
        1e-8,
        False,
    ),
    "complex_qr_tall": (lambda: _complex_square(lx.QR(), 6, 4), 1e-12, 1e-8, False),
    "complex_svd": (lambda: _complex_square(lx.SVD()), 1e-12, 1e-8, False),
    "kronecker": (lambda: _kronecker(lx.Kronecker()), 1e-12, 1e-8, False),
    "block_diagonal": (lambda: _block_diagonal(lx.BlockDiagonal()), 1e-12, 1e-8, False),
    "woodbury": (lambda: _low_rank(lx.Woodbury()), 1e-11, 1e-6, False),
    "sparse_auto": (
        lambda: _sparse(lx.AutoLinearSolver(well_posed=True)),
        1e-12,
        1e-8,
        False,
    ),
    # Krylov solvers (rtol 1e-12): a first derivative with 1e-13 noise gives
    # finite differences of the Hessian with about 1e-8 relative error.
    "cg_psd": (lambda: _square(lx.CG(**_KRYLOV), _PSD, spd=True), 1e-11, 1e-7, True),
    "gmres": (lambda: _square(lx.GMRES(**_KRYLOV)), 1e-11, 1e-7, EXHAUSTIVE),
    "minres_psd": (
        lambda: _square(lx.MINRES(**_KRYLOV), _PSD, spd=True),
        1e-11,
        1e-7,
        False,
    ),
    "bicgstab": (lambda: _square(lx.BiCGStab(**_KRYLOV)), 1e-11, 1e-7, False),
    "lsmr_square": (lambda: _square(lx.LSMR(**_KRYLOV)), 1e-11, 1e-7, False),
    "lsmr_wide": (lambda: _lstsq(lx.LSMR(**_KRYLOV), 4, 6), 1e-11, 1e-6, False),
    "lsmr_tall_damp": (
        lambda: _lstsq(lx.LSMR(**_KRYLOV), 6, 4, damp=0.5),
        1e-11,
        1e-6,
        False,
    ),
    "lsmr_rank_deficient_y0": (
        lambda: _rank_deficient(lx.LSMR(**_KRYLOV), 5, 4, with_y0=True),
        1e-10,
        1e-6,
        False,
    ),
    "normal_cg_tall": (
        lambda: _lstsq(lx.Normal(lx.CG(**_KRYLOV)), 6, 4),
        1e-11,
        1e-7,
        False,
    ),
    "gmres_sparse": (lambda: _sparse(lx.GMRES(**_KRYLOV)), 1e-11, 1e-7, False),
    "cg_preconditioned_y0": (
        lambda: _preconditioned(lx.CG(**_KRYLOV)),
        1e-11,
        1e-7,
        False,
    ),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if default else pytest.mark.exhaustive)
        for name, (_, _, _, default) in _CASES.items()
    ],
)
def test_hessian_against_reference_and_finite_differences(name: str):
    factory, ref_tol, fd_tol, _ = _CASES[name]
    loss, ref, size = factory()
    _check_second_order(loss, ref, size, ref_tol, fd_tol)


# --- The other second-order modes, third order, vmap, closures and PyTrees. ---

_N = 4
_M = _r(_N, _N) + 3 * np.eye(_N)
_NN = _r(_N, _N)
_B = _r(_N)


def _matrix_of(theta: Float[Array, " 2"]) -> Float[Array, "4 4"]:
    return jnp.asarray(_M) + jnp.sin(theta[0]) * _NN + theta[1] ** 2 * jnp.eye(_N)


def _function_loss(p: Float[Array, " 6"], throw: bool = True) -> Array:
    # A scalar parameter of a closure, through a `FunctionLinearOperator`.
    theta = p[:2]
    struct = jax.ShapeDtypeStruct((_N,), jnp.float64)
    op = lx.FunctionLinearOperator(lambda x: _matrix_of(theta) @ x, struct)
    return _nl(lx.linear_solve(op, _B + p[2:], lx.LU(), throw=throw).value)


def _pytree_loss(p: Float[Array, " 6"]) -> Array:
    a = _matrix_of(p[:2])
    tree = {
        "u": {"a": a[:2, :2], "b": a[:2, 2:]},
        "v": {"a": a[2:, :2], "b": a[2:, 2:]},
    }
    half = jax.ShapeDtypeStruct((2,), jnp.float64)
    op = lx.PyTreeLinearOperator(tree, {"u": half, "v": half})
    b = _B + p[2:]
    x = lx.linear_solve(op, {"u": b[:2], "v": b[2:]}, lx.QR()).value
    return _nl(jnp.concatenate([x["a"], x["b"]]))


def _reference_loss(p: Float[Array, " 6"]) -> Array:
    return _nl(jnp.linalg.solve(_matrix_of(p[:2]), _B + p[2:]))


def _modes(loss: Callable, p: Array, v: Array, ps: Array, vs: Array) -> dict:
    def hvp(q, w):
        return jax.jvp(jax.grad(loss), (q,), (w,))[1]

    def third(q, w):
        return jax.jvp(lambda r: hvp(r, w), (q,), (w,))[1]

    return {
        "hessian": jax.hessian(loss)(p),
        "jacfwd_jacrev": jax.jacfwd(jax.jacrev(loss))(p),
        "jvp_grad": hvp(p, v),
        "grad_grad": jax.grad(lambda q: jnp.dot(jax.grad(loss)(q), v))(p),
        "vmap_hvp": jax.vmap(hvp)(ps, vs),
        "vmap_hvp_directions": jax.vmap(hvp, in_axes=(None, 0))(p, vs),
        "third": third(p, v),
    }


@jax.jit
def _all_modes(p, v, ps, vs):
    hessian_of = {
        "throw_false": jax.hessian(ft.partial(_function_loss, throw=False))(p),
        "pytree": jax.hessian(_pytree_loss)(p),
    }
    return (
        _modes(_reference_loss, p, v, ps, vs),
        _modes(_function_loss, p, v, ps, vs),
        hessian_of,
    )


def test_every_mode_of_second_and_third_order():
    """Hessian, jacfwd(jacrev), jvp(grad), grad(grad), vmap of Hessian-vector
    products (over problems, and over directions) and a third derivative, of a
    closure's scalar parameter and the vector, through a function operator; its
    Hessian with `throw=False`, and through a dict PyTree operator."""
    p = jnp.asarray(np.concatenate([[0.3, 0.5], 0.1 * _r(_N)]))
    v = jnp.asarray(_r(6))
    ps = p[None] + 0.05 * jnp.asarray(_r(3, 6))
    vs = jnp.asarray(_r(3, 6))
    want, got, hessian_of = _all_modes(p, v, ps, vs)
    hess = np.asarray(want["hessian"])
    # (The reference's own modes agree with each other.)
    np.testing.assert_allclose(want["jvp_grad"], hess @ np.asarray(v), rtol=1e-12)
    for key, value in got.items():
        assert np.all(np.isfinite(value)), key
        assert _rel(value, want[key]) < 1e-12, key
    for key, value in hessian_of.items():
        assert np.all(np.isfinite(value)), key
        assert _rel(value, hess) < 1e-12, key


def _jacobian_case(jac: Literal["fwd", "bwd"]):
    w = _r(_N, _N)

    def fn(x, args):
        return jnp.tanh(w @ x) * args[0] + _M @ x + args[1] * x**3

    def loss(p):
        # Differentiated at its linearisation point `x` (the third derivative of
        # `fn`), its `args` and the vector.
        op = lx.JacobianLinearOperator(fn, p[:_N], p[_N : _N + 2], jac=jac)
        return _nl(lx.linear_solve(op, _B + p[_N + 2 :], lx.LU()).value)

    def ref(p):
        jacobian = jax.jacfwd(fn)(p[:_N], p[_N : _N + 2])
        return _nl(jnp.linalg.solve(jacobian, _B + p[_N + 2 :]))

    return loss, ref


@pytest.mark.parametrize(
    "jac", ["fwd", pytest.param("bwd", marks=pytest.mark.exhaustive)]
)
def test_jacobian_operator_hessian_at_its_linearisation_point(
    jac: Literal["fwd", "bwd"],
):
    loss, ref = _jacobian_case(jac)
    p = jnp.asarray(np.concatenate([0.3 * _r(_N), [1.2, 0.4], 0.1 * _r(_N)]))
    d = jnp.asarray(_r(2 * _N + 2))
    hess, hess_ref, plus, minus = _second_order(loss, ref, p, d)
    assert _rel(hess, hess_ref) < 1e-12
    assert _rel(hess @ d, (plus - minus) / (2 * _EPS)) < 1e-7


def test_un_jitted_hessian_of_a_python_float():
    """`jax.hessian` of a function of a Python float, run un-jitted (the entry
    point's cached transformed path)."""

    def loss(theta):
        a = _M + jnp.sin(theta) * _NN
        return _nl(lx.linear_solve(lx.MatrixLinearOperator(a), _B, lx.LU()).value)

    def ref(theta):
        return _nl(jnp.linalg.solve(_M + jnp.sin(theta) * _NN, _B))

    np.testing.assert_allclose(
        jax.hessian(loss)(0.3), jax.hessian(ref)(0.3), rtol=1e-12
    )


# --- float32 with x64 off: Krylov second and third derivatives. ---------------

_N32 = 40
_LAPLACIAN = 2 * np.eye(_N32) - np.eye(_N32, k=1) - np.eye(_N32, k=-1)
_B32 = np.random.default_rng(1).standard_normal(_N32)


def _shifted(t: float) -> np.ndarray:
    # cond about 66: float32 reaches a relative residual of about 1e-5.
    return _LAPLACIAN + (0.05 + 0.02 * np.sin(t)) * np.eye(_N32)


def _float64_derivatives(t: float) -> tuple[float, float]:
    def f(s):
        x = np.linalg.solve(_shifted(s), _B32)
        return np.sum(np.sin(0.1 * x))

    e = 1e-3
    second = (f(t + e) - 2 * f(t) + f(t - e)) / e**2
    third = (f(t + 2 * e) - 2 * f(t + e) + 2 * f(t - e) - f(t - 2 * e)) / (2 * e**3)
    return second, third


_F32_SOLVERS = {
    "CG": (lambda kw: lx.CG(**kw), True),
    "GMRES": (lambda kw: lx.GMRES(**kw, restart=_N32), EXHAUSTIVE),
    "MINRES": (lambda kw: lx.MINRES(**kw), False),
    "BiCGStab": (lambda kw: lx.BiCGStab(**kw), False),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if default else pytest.mark.exhaustive)
        for name, (_, default) in _F32_SOLVERS.items()
    ],
)
def test_float32_krylov_second_and_third_derivatives(name: str):
    solver = _F32_SOLVERS[name][0](dict(rtol=1e-5, atol=1e-5, max_steps=400))
    with float32_user():

        def loss(t):
            shift = (0.05 + 0.02 * jnp.sin(t)) * jnp.eye(_N32, dtype=jnp.float32)
            a = jnp.asarray(_LAPLACIAN, jnp.float32) + shift
            op = lx.MatrixLinearOperator(a, _PSD)
            x = lx.linear_solve(op, jnp.asarray(_B32, jnp.float32), solver).value
            return jnp.sum(jnp.sin(0.1 * x))

        second_order = jax.grad(jax.grad(loss))
        third_order = jax.grad(second_order)
        second, third = jax.jit(lambda t: (second_order(t), third_order(t)))(
            jnp.float32(0.3)
        )
    want_second, want_third = _float64_derivatives(0.3)
    assert second.dtype == jnp.float32
    # rtol 1e-5 at cond 66: measured errors 1e-5 (CG) to 4e-4 (BiCGStab).
    np.testing.assert_allclose(float(second), want_second, rtol=2e-3)
    np.testing.assert_allclose(float(third), want_third, rtol=2e-3)


# --- The size of the k-th derivative's program. -------------------------------


def _solves_in(jaxpr) -> int:
    return str(jaxpr).count("linear_solve[")


@pytest.mark.parametrize("solver, factor", [(lx.LU(), 2), (lx.LSMR(**_KRYLOV), 4)])
def test_trace_growth_in_the_order(solver, factor: int):
    """The k-th derivative of one solve binds `factor^k` solves: each solve's JVP
    adds one tangent solve (equation (4)), or three (equation (1): LSMR may meet
    dependent rows and columns). Traced only, not compiled."""
    matrix = jnp.asarray(_M)

    def f(t):
        op = lx.MatrixLinearOperator(matrix + t * jnp.eye(_N))
        return jnp.sum(jnp.sin(lx.linear_solve(op, _B, solver).value))

    fn = f
    for order in range(1, 3 if factor == 4 else 4):
        fn = jax.grad(fn)
        assert _solves_in(jax.make_jaxpr(fn)(0.1)) <= factor**order
