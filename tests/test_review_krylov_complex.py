"""An adversarial review, as a user, of the Krylov solvers on complex operators,
of derivatives through Krylov solves, and of `state=` reuse.

Every expected value comes from NumPy in float64/complex128 (`solve`, `pinv`, or
their analytic derivatives), never from lineax itself. Small sizes; the solves
converge well within their step limits (no subprocess needed).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import krylov_sample, sample

import lineax as lx


_RNG = np.random.default_rng(20261127)
_N = 6
_PSD = lx.positive_semidefinite_tag


def _complex(*shape):
    return _RNG.standard_normal(shape) + 1j * _RNG.standard_normal(shape)


_M = _complex(_N, _N)
_HPD = _M @ _M.conj().T + _N * np.eye(_N)  # Hermitian positive definite
_GEN = _M + 4 * np.eye(_N)  # general, well conditioned
_TALL = _complex(9, 4)  # least squares
_WIDE = _complex(4, 9)  # minimum norm
_B = _complex(_N)
_B_TALL = _complex(9)
_B_WIDE = _complex(4)

_TIGHT = {np.complex128: 1e-11, np.complex64: 1e-6}
# Relative error against NumPy that each dtype must reach.
_ACCURACY = {np.complex128: 1e-8, np.complex64: 5e-4}

_COMPLEX_CASES = {
    "CG": (lambda t: lx.CG(rtol=t, atol=t), _HPD, _PSD, _B),
    "PipelinedCG": (lambda t: lx.PipelinedCG(rtol=t, atol=t), _HPD, _PSD, _B),
    "FlexibleCG": (lambda t: lx.FlexibleCG(rtol=t, atol=t), _HPD, _PSD, _B),
    "MINRES": (lambda t: lx.MINRES(rtol=t, atol=t), _HPD, _PSD, _B),
    "GMRES": (lambda t: lx.GMRES(rtol=t, atol=t), _GEN, (), _B),
    "FGMRES": (lambda t: lx.FGMRES(rtol=t, atol=t), _GEN, (), _B),
    "BiCGStab": (lambda t: lx.BiCGStab(rtol=t, atol=t), _GEN, (), _B),
    "LSMR-square": (lambda t: lx.LSMR(rtol=t, atol=t), _GEN, (), _B),
    "LSMR-tall": (lambda t: lx.LSMR(rtol=t, atol=t), _TALL, (), _B_TALL),
    "LSMR-wide": (lambda t: lx.LSMR(rtol=t, atol=t), _WIDE, (), _B_WIDE),
    "NormalCG-tall": (lambda t: lx.Normal(lx.CG(rtol=t, atol=t)), _TALL, (), _B_TALL),
    "NormalCG-wide": (lambda t: lx.Normal(lx.CG(rtol=t, atol=t)), _WIDE, (), _B_WIDE),
}


def _relative_error(actual, desired):
    return np.abs(np.asarray(actual) - desired).max() / np.abs(desired).max()


# Each case in one of the two dtypes, alternating (a fixed-seed slice of the two;
# both with LINEAX_EXHAUSTIVE=1): each compiles a solve of its own.
@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(name, dtype, id=f"{name}-c{np.dtype(dtype).itemsize * 8}")
        for i, name in enumerate(_COMPLEX_CASES)
        for dtype in sample([np.complex128, np.complex64], i % 2)
    ],
)
def test_complex_krylov_solve_matches_numpy(name, dtype):
    make, matrix, tags, vector = _COMPLEX_CASES[name]
    solver = make(_TIGHT[dtype])
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix.astype(dtype)), tags)
    solution = jax.jit(lambda op, b: lx.linear_solve(op, b, solver, throw=False))(
        operator, jnp.asarray(vector.astype(dtype))
    )
    assert solution.result == lx.RESULTS.successful
    assert solution.value.dtype == dtype
    expected = np.linalg.pinv(matrix) @ vector
    assert _relative_error(solution.value, expected) < _ACCURACY[dtype]


def test_minres_on_a_complex_hermitian_indefinite_operator():
    # lineax has no Hermitian tag: MINRES's documented way in for a complex
    # Hermitian indefinite operator is a semidefinite tag, which MINRES does not
    # rely on. Solve, gradient in b (A^{-T} conj(w)) and JVP in A, against NumPy.
    m = _complex(_N, _N)
    matrix = (m + m.conj().T) / 2 + np.diag(np.linspace(-3, 3, _N))
    assert np.linalg.eigvalsh(matrix).min() < 0 < np.linalg.eigvalsh(matrix).max()
    h1 = (lambda k: (k + k.conj().T) / 2)(_complex(_N, _N))
    weights = _complex(_N)
    solver = lx.MINRES(**_DTOL)

    def solve(t, b):
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix) + t * h1, _PSD)
        return lx.linear_solve(operator, b, solver).value

    @jax.jit
    def everything(b):
        value, tangent = jax.jvp(lambda t: solve(t, b), (0.0,), (1.0,))
        grad = jax.grad(
            lambda v: jnp.real(jnp.vdot(jnp.asarray(weights), solve(0.0, v)))
        )(b)
        return value, tangent, grad

    value, tangent, grad = everything(jnp.asarray(_B))
    x = np.linalg.solve(matrix, _B)
    assert _relative_error(value, x) < 1e-10
    assert _relative_error(tangent, -np.linalg.solve(matrix, h1 @ x)) < 1e-9
    assert _relative_error(grad, np.linalg.solve(matrix.T, weights.conj())) < 1e-9


@pytest.mark.parametrize("name", ["CG", "MINRES", "GMRES", "BiCGStab", "Normal"])
def test_complex_preconditioned_gradient_matches_numpy(name):
    # The cotangent solve is a solve with A^T (not A^H) and the transposed
    # preconditioner; for complex operators the two differ.
    tol: dict[str, Any] = dict(rtol=1e-12, atol=1e-12)
    solver, matrix, tags = {
        "CG": (lx.CG(**tol), _HPD, _PSD),
        "MINRES": (lx.MINRES(**tol), _HPD, _PSD),
        "GMRES": (lx.GMRES(**tol), _GEN, ()),
        "BiCGStab": (lx.BiCGStab(**tol), _GEN, ()),
        "Normal": (lx.Normal(lx.CG(**tol)), _GEN, ()),
    }[name]
    # A Hermitian positive definite preconditioner that is not real: its transpose
    # (conj(P)) differs from P, so a cotangent solve with the wrong one shows.
    k = _complex(_N, _N)
    pre = lx.MatrixLinearOperator(
        jnp.asarray(np.eye(_N) + 0.05 * (k + k.conj().T)), _PSD
    )
    weights = _complex(_N)

    def loss(b):
        x = lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(matrix), tags),
            b,
            solver,
            options={"preconditioner": pre},
        ).value
        return jnp.real(jnp.vdot(jnp.asarray(weights), x))

    grad = jax.jit(jax.grad(loss))(jnp.asarray(_B))
    # loss(b) = Re(g^H b) with g = A^{-H} w; JAX's gradient of a real function
    # of a complex b is d/d Re(b) - i d/d Im(b) = conj(g) = A^{-T} conj(w).
    expected = np.linalg.solve(matrix.T, weights.conj())
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-9, atol=1e-9)


# Derivatives: A(t) = A0 + t A1 and b(t) = b0 + (t + t^2) b1 both depend on t.
_R = _RNG.standard_normal
_S0 = (lambda m: m @ m.T + _N * np.eye(_N))(_R((_N, _N)))
_S1 = (lambda m: m + m.T)(_R((_N, _N)))
_G0 = _R((_N, _N)) + 4 * np.eye(_N)
_G1 = _R((_N, _N))
_I0 = (lambda m: (m + m.T) / 2 + np.diag(np.linspace(-3, 3, _N)))(_R((_N, _N)))
_T0, _T1 = _R((9, 4)), _R((9, 4))
_V0, _V1, _VT0, _VT1, _VW0, _VW1 = (_R(k) for k in (_N, _N, 9, 9, 4, 4))
_DTOL: dict[str, Any] = dict(rtol=1e-13, atol=1e-13)

_DERIVATIVE_CASES = {
    "CG": (lx.CG(**_DTOL), _S0, _S1, _V0, _V1, _PSD),
    "GMRES": (lx.GMRES(**_DTOL), _G0, _G1, _V0, _V1, ()),
    "BiCGStab": (lx.BiCGStab(**_DTOL), _G0, _G1, _V0, _V1, ()),
    "MINRES-indefinite": (lx.MINRES(**_DTOL), _I0, _S1, _V0, _V1, lx.symmetric_tag),
    "LSMR-least-squares": (lx.LSMR(**_DTOL), _T0, _T1, _VT0, _VT1, ()),
    "LSMR-minimum-norm": (lx.LSMR(**_DTOL), _T0.T, _T1.T, _VW0, _VW1, ()),
    "NormalCG-minimum-norm": (
        lx.Normal(lx.CG(**_DTOL)),
        _T0.T,
        _T1.T,
        _VW0,
        _VW1,
        (),
    ),
}


def _pinv_solution(a0, a1, b0, b1, t):
    return np.linalg.pinv(a0 + t * a1) @ (b0 + (t + t**2) * b1)


def _pinv_derivatives(a0, a1, b0, b1, t):
    """First and second derivatives of `pinv(A(t)) b(t)` (for rectangular A these
    include the terms of the paper's equations (3)-(4)), by fourth-order central
    differences of NumPy's `pinv`."""
    h = 1e-3
    f = [_pinv_solution(a0, a1, b0, b1, t + k * h) for k in (-2, -1, 0, 1, 2)]
    d1 = (f[0] - 8 * f[1] + 8 * f[3] - f[4]) / (12 * h)
    d2 = (-f[0] + 16 * f[1] - 30 * f[2] + 16 * f[3] - f[4]) / (12 * h**2)
    return d1, d2


# Second order and `vmap` for one solver of a symmetric and one of a general
# operator (fixed-seed slices; all four with LINEAX_EXHAUSTIVE=1): each compiles a
# JVP of a JVP. (Not for LSMR or Normal: LSMR's compile is slow.)
_HIGHER = sample(["CG", "MINRES-indefinite"], 0) + sample(["GMRES", "BiCGStab"], 1)


# The cases whose float64 JVP against the pseudoinverse's the default run checks
# in `test_jvp.py::test_krylov_jvp_matches_dense` (its sample, `krylov_sample(0)`:
# MINRES, GMRES and LSMR on a wide matrix) run with LINEAX_EXHAUSTIVE=1 only: each
# case here compiles a JVP and a gradient of its own (LSMR's slowly).
_IN_TEST_JVP = {
    "cg": "CG",
    "gmres": "GMRES",
    "bicgstab": "BiCGStab",
    "minres": "MINRES-indefinite",
    "lsmr_tall": "LSMR-least-squares",
    "lsmr_wide": "LSMR-minimum-norm",
}
_DERIVATIVES_ALSO_IN_TEST_JVP = {
    _IN_TEST_JVP[case.name] for case in krylov_sample(0) if case.name in _IN_TEST_JVP
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=[pytest.mark.exhaustive]
            if name in _DERIVATIVES_ALSO_IN_TEST_JVP and name not in _HIGHER
            else [],
        )
        for name in _DERIVATIVE_CASES
    ],
)
def test_krylov_derivatives_match_pseudoinverse(name):
    solver, a0, a1, b0, b1, tags = _DERIVATIVE_CASES[name]
    higher = name in _HIGHER

    def solve(t):
        operator = lx.MatrixLinearOperator(jnp.asarray(a0) + t * a1, tags)
        return lx.linear_solve(
            operator, jnp.asarray(b0) + (t + t**2) * b1, solver
        ).value

    first = lambda t: jax.jvp(solve, (t,), (jnp.ones_like(t),))  # noqa: E731
    weights = _R(a0.shape[1])

    @jax.jit
    def everything(t, ts):
        value, tangent = first(t)
        grad = jax.grad(lambda s: solve(s) @ weights)(t)
        if not higher:
            return value, tangent, None, grad, None
        second = jax.jvp(lambda s: first(s)[1], (t,), (jnp.ones_like(t),))[1]
        batched = jax.vmap(lambda s: first(s)[1])(ts)
        return value, tangent, second, grad, batched

    t0 = 0.3
    ts = np.array([0.1, 0.5])
    value, tangent, second, grad, batched = everything(t0, ts)
    d1, d2 = _pinv_derivatives(a0, a1, b0, b1, t0)
    assert _relative_error(value, _pinv_solution(a0, a1, b0, b1, t0)) < 1e-10
    assert _relative_error(tangent, d1) < 1e-6
    assert (
        abs(float(grad) - d1 @ weights)
        <= 1e-6 * np.abs(d1).max() * np.abs(weights).sum()
    )
    if higher:
        assert _relative_error(second, d2) < 1e-5
        for s, row in zip(ts, np.asarray(batched)):
            d1s = _pinv_derivatives(a0, a1, b0, b1, s)[0]
            assert _relative_error(row, d1s) < 1e-6


def test_complex_krylov_jvp_in_a_real_parameter():
    # A(t) = H + t H1 (Hermitian for real t), b(t) = b + t b1; dx = A^{-1}(b1 - H1 x).
    h1 = (lambda m: (m + m.conj().T) / 2)(_complex(_N, _N))
    b1 = _complex(_N)
    x = np.linalg.solve(_HPD + 0.1 * h1, _B + 0.1 * b1)
    expected = np.linalg.solve(_HPD + 0.1 * h1, b1 - h1 @ x)
    for solver in (lx.CG(**_DTOL), lx.MINRES(**_DTOL), lx.GMRES(**_DTOL)):

        def solve(t, solver=solver):
            operator = lx.MatrixLinearOperator(jnp.asarray(_HPD) + t * h1, _PSD)
            return lx.linear_solve(operator, jnp.asarray(_B) + t * b1, solver).value

        # (Compiled once, not op by op: the library traces the same path.)
        _, tangent = jax.jit(lambda t: jax.jvp(solve, (t,), (1.0,)))(0.1)
        assert _relative_error(tangent, expected) < 1e-9, solver


def test_failed_tangent_solve_is_reported_as_nan():
    # Member 0's right-hand side lies in a 3-dimensional Krylov space (its solves
    # converge in 3 steps); member 1's does not (primal and tangent solves hit
    # `max_steps`). With `throw=False` the primal failure is reported in `result`
    # and the failed tangent solve, whose failure cannot be reported, gives NaN;
    # under `vmap` only for the member that failed.
    d = np.arange(1.0, 9.0)
    b = np.zeros((2, 8))
    b[0, :3] = 1.0
    b[1] = 1.0
    tol: dict[str, Any] = dict(rtol=1e-10, atol=1e-10, max_steps=3)
    for solver in (lx.CG(**tol), lx.GMRES(restart=3, **tol)):

        def solve(t, v, solver=solver):
            operator = lx.MatrixLinearOperator(jnp.diag(jnp.asarray(d)) * (1 + t), _PSD)
            solution = lx.linear_solve(operator, v, solver, throw=False)
            return solution.value, solution.result

        def tangents(v):
            (value, result), (tangent, _) = jax.jvp(
                lambda t: solve(t, v), (0.0,), (1.0,)
            )
            return value, result, tangent

        value, result, tangent = jax.jit(jax.vmap(tangents))(jnp.asarray(b))
        max_steps = lx.RESULTS.max_steps_reached._value
        np.testing.assert_array_equal(result._value, [0, max_steps])
        np.testing.assert_allclose(np.asarray(value[0]), b[0] / d, atol=1e-12)
        np.testing.assert_allclose(np.asarray(tangent[0]), -b[0] / d, atol=1e-12)
        assert np.isnan(np.asarray(tangent[1])).all(), solver


_STATE_CASES = {
    "CG": (lx.CG(**_DTOL), _S0, _PSD),
    "GMRES": (lx.GMRES(**_DTOL), _G0, ()),
    "Normal": (lx.Normal(lx.CG(**_DTOL)), _G0, ()),
}


@pytest.mark.parametrize("name", list(_STATE_CASES))
def test_state_reuse_in_scan_and_while_loop_under_jit_vmap_grad(name):
    solver, matrix, tags = _STATE_CASES[name]
    vectors = _R((3, _N))

    def total(t):
        # sum_i sum(A(t)^{-1} b_i), A(t) = (1 + t) A, one state for all solves.
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix) * (1 + t), tags)
        state = solver.init(operator, {})

        def body(carry, b):
            x = lx.linear_solve(operator, b, solver, state=state).value
            return carry + x.sum(), None

        return jax.lax.scan(body, jnp.zeros(()), jnp.asarray(vectors))[0]

    def fixed_point(b):
        # x <- A^{-1}(b + x / 10), three times, with the state in the loop carry
        # (through `stop_gradient`, as client libraries pass it).
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)

        def step(carry):
            i, x, state = carry
            solution = lx.linear_solve(
                operator, b + x / 10, solver, state=jax.lax.stop_gradient(state)
            )
            return i + 1, solution.value, state

        init = (0, jnp.zeros(_N), solver.init(operator, {}))
        return jax.lax.while_loop(lambda c: c[0] < 3, step, init)[1]

    value, grad = jax.jit(jax.value_and_grad(total))(0.2)
    grads = jax.jit(jax.vmap(jax.grad(total)))(jnp.array([0.2, 0.7]))
    loops = jax.jit(jax.vmap(fixed_point))(jnp.asarray(vectors))

    def reference(t):
        a = matrix * (1 + t)
        x = np.linalg.solve(a, vectors.T)
        return x.sum(), -np.linalg.solve(a, matrix @ x).sum()

    np.testing.assert_allclose(value, reference(0.2)[0], rtol=1e-10)
    np.testing.assert_allclose(grad, reference(0.2)[1], rtol=1e-9)
    np.testing.assert_allclose(grads, [reference(0.2)[1], reference(0.7)[1]], rtol=1e-9)
    for b, x in zip(vectors, np.asarray(loops)):
        expected = np.zeros(_N)
        for _ in range(3):
            expected = np.linalg.solve(matrix, b + expected / 10)
        np.testing.assert_allclose(x, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", [lx.GMRES(**_DTOL), lx.LSMR(**_DTOL)], ids=str)
def test_state_of_another_operator_structure_is_a_clear_error(solver):
    operator = lx.MatrixLinearOperator(jnp.asarray(_G0))
    others = [
        lx.MatrixLinearOperator(jnp.ones((_N + 1, _N + 1))),
        lx.DiagonalLinearOperator(jnp.ones(_N)),
        lx.MatrixLinearOperator(jnp.asarray(_G0, jnp.float32)),
    ]
    for other in others:
        state = solver.init(other, {})
        with pytest.raises(ValueError, match="`state` does not match"):
            lx.linear_solve(operator, jnp.ones(_N), solver, state=state, throw=False)
