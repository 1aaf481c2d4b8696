"""Solvers that compute a matrix from the operator's entries (the Gram matrix of
`lx.Normal`, `A⁻¹U` of `lx.Woodbury`, `A⁻¹B` of `lx.Schur`) rescale by a power of
two, so that a well-conditioned problem whose entries are near the dtype's
limits (`1e±20` in float32, whose squares are not representable) is solved, not
reported `singular` (or, by SVD, answered `0` as a success). A power of two
scales exactly: in range, the solution is bitwise that of the unscaled solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _complex_dtype(dtype):
    return jnp.complex64 if dtype == jnp.float32 else jnp.complex128


def _random(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x


# (real dtype, factor): entries of `A` about `factor`, whose squares over- or
# underflow the dtype.
_EXTREMES = [
    (jnp.float32, 1e-20),
    (jnp.float32, 1e20),
    (jnp.float32, 3e37),
    (jnp.float64, 1e-160),
    (jnp.float64, 1e160),
]
_INNER = {
    "cholesky": lx.Cholesky(),
    "lu": lx.LU(),
    "svd": lx.SVD(),
    "auto": lx.AutoLinearSolver(well_posed=True),
}


@pytest.mark.parametrize("real_dtype,factor", _EXTREMES)
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
@pytest.mark.parametrize("inner", list(_INNER))
def test_normal_extreme_entries(real_dtype, factor, complex_, shape, inner):
    # Before: `Normal(Cholesky())`, `Normal(LU())` reported `singular`;
    # `Normal(SVD())` answered `0` for 1e-20 and `singular` for 1e20.
    dtype = _complex_dtype(real_dtype) if complex_ else real_dtype
    rng = np.random.default_rng(sum(shape) + complex_)
    base = _random(rng, shape, dtype) + 3 * np.eye(*shape)  # well-conditioned
    matrix = jnp.asarray(base * factor, dtype)
    b = jnp.asarray(_random(rng, shape[0], dtype) * factor, dtype)
    want = np.linalg.lstsq(np.asarray(matrix, np.complex128) / factor, b / factor)[0]
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(matrix), b, lx.Normal(_INNER[inner]), throw=False
    )
    assert sol.result == lx.RESULTS.successful
    tol = 1e-4 if real_dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(sol.value), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64, jnp.float64])
def test_normal_rescaling_is_exact(dtype):
    # `A 2^k` is solved to `x 2^-k` bitwise: the power of two only moves
    # exponents. (And `A` with its largest entry in `[1, 2)` is not scaled.)
    rng = np.random.default_rng(0)
    matrix = jnp.asarray(_random(rng, (7, 4), dtype), dtype)
    b = jnp.asarray(_random(rng, 7, dtype), dtype)
    solve = jax.jit(
        lambda m: lx.linear_solve(lx.MatrixLinearOperator(m), b, lx.Normal(lx.LU()))
    )
    x = solve(matrix).value
    for k in (-40, -3, 5, 40):
        xk = solve(matrix * 2.0**k).value
        np.testing.assert_array_equal(np.asarray(xk) * 2.0**k, np.asarray(x))


@pytest.mark.parametrize("factor", [1e-160, 1e160])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_normal_extreme_entries_derivatives(factor, shape):
    # Forward and reverse mode through the rescaled solve, against central
    # differences, float64. (A tall `A` with `b` in its range: the JVP's term
    # `(A⁺)ᴴ Vᴴ (b − A x)` multiplies the tangent `V` (1e-160) by the residual
    # (1e-160) before `(A⁺)ᴴ` (1e160), and underflows for any solver, QR's
    # too; its transpose, in reverse mode, overflows to NaN. Not this change's:
    # reverse mode is checked for the square and wide shapes.)
    rng = np.random.default_rng(1)
    base = jnp.asarray(rng.standard_normal(shape) + 3 * np.eye(*shape))
    direction = jnp.asarray(rng.standard_normal(shape))
    b = base @ jnp.asarray(rng.standard_normal(shape[1]))
    cotangent = jnp.asarray(rng.standard_normal(shape[1]))

    def solve(t):
        matrix = (base + t * direction) * factor
        op = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(op, b * factor, lx.Normal(lx.Cholesky())).value

    _, tangent = jax.jvp(solve, (0.0,), (1.0,))
    step = 1e-6
    fd = (solve(step) - solve(-step)) / (2 * step)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-8)
    if shape[0] > shape[1]:
        return
    grad = jax.grad(lambda t: jnp.vdot(cotangent, solve(t)))(0.0)
    np.testing.assert_allclose(grad, jnp.vdot(cotangent, fd), rtol=1e-6)


def _woodbury_case(real_dtype, complex_, big):
    """`M = 0.01 I + (big e₁)(0.99 / big e₁)ᵀ + u vᵀ` (`n = 5`, `u`, `v` random
    of size 0.1): cond(M) about 100, `A⁻¹U` about `100 big`. (A narrow window:
    `A⁻¹U` overflows and `0.99 / big` is normal for `big` in about `(3.4e36,
    8e37)` in float32, `(1.8e306, 4.5e307)` in float64.)"""
    dtype = _complex_dtype(real_dtype) if complex_ else real_dtype
    rng = np.random.default_rng(3)
    n = 5
    a = 0.01 * np.eye(n)
    u = np.zeros((n, 2), dtype)
    v = np.zeros((2, n), dtype)
    u[:, 1] = 0.1 * _random(rng, n, dtype)
    v[1, :] = 0.1 * _random(rng, n, dtype)
    u[0, 0], v[0, 0] = big, 0.99 / big
    dense = a + np.outer(u[:, 1], v[1, :])
    dense[0, 0] += 0.99
    op = lx.LowRankUpdateLinearOperator(
        lx.MatrixLinearOperator(jnp.asarray(a, dtype), lx.diagonal_tag),
        lx.MatrixLinearOperator(jnp.asarray(u, dtype)),
        lx.IdentityLinearOperator(jax.ShapeDtypeStruct((2,), dtype)),
        lx.MatrixLinearOperator(jnp.asarray(v, dtype)),
    )
    # For a solution of real entries `±[0.5, 1]`: `V x` must not underflow.
    x = rng.uniform(0.5, 1, n) * rng.choice([-1, 1], n)
    b = jnp.asarray(dense @ x, dtype)
    return op, dense, b


@pytest.mark.parametrize(
    "real_dtype,big", [(jnp.float32, 5e36), (jnp.float32, 2e36), (jnp.float64, 1e307)]
)
@pytest.mark.parametrize("complex_", [False, True])
def test_woodbury_large_update_factor(real_dtype, big, complex_):
    # Before: `A⁻¹U` (100 big) overflowed, and the solve was `singular` (for
    # float32 3e37 and float64 1e307; 2e36 was solved before too). (The
    # transposed state is checked by reverse mode, below.)
    op, dense, b = _woodbury_case(real_dtype, complex_, big)
    sol = lx.linear_solve(op, b, lx.Woodbury(), throw=False)
    assert sol.result == lx.RESULTS.successful
    want = np.linalg.solve(dense, np.asarray(b, np.complex128))
    tol = 1e-3 if real_dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(sol.value), want, rtol=tol, atol=tol)


def _schur_case(real_dtype, complex_, big):
    """`[[A, B big], [C / big, D]]`, with `A = 0.01 I` (3×3), `B`, `C` of entries
    `±[0.5, 1]` and `D` (2×2) about `100 I`: `diag(I, 1/big) M' diag(I, big)` for
    a well-conditioned `M'` (whose solve gives the reference), with `A⁻¹B` about
    `100 big`. (A narrow window: `A⁻¹B` overflows and `C / big` is normal for
    `big` in about `(3.4e36, 4e37)` in float32, `(1.8e306, 2.2e307)` in
    float64.)"""
    dtype = _complex_dtype(real_dtype) if complex_ else real_dtype
    rng = np.random.default_rng(4)

    def entries(shape):
        sizes = rng.uniform(0.5, 1, shape)
        if complex_:
            return sizes * np.exp(2j * np.pi * rng.uniform(size=shape))
        return sizes * rng.choice([-1, 1], shape)

    a = 0.01 * np.eye(3)
    b = entries((3, 2))
    c = entries((2, 3))
    d = 100 * np.eye(2) + entries((2, 2))
    blocks = [
        [lx.MatrixLinearOperator(jnp.asarray(m, dtype)) for m in row]
        for row in ((a, b * big), (c / big, d))
    ]
    op = lx.BlockLinearOperator(blocks)
    rhs = (
        jnp.asarray(_random(rng, 3, dtype), dtype),
        # (`x₂` about `100 / big`, a normal number)
        jnp.asarray(entries(2) * 1e4 / big, dtype),
    )
    # `M x = r` is `M' (x₁, big x₂) = (r₁, big r₂)`.
    scaled = np.concatenate(
        [np.asarray(rhs[0]), np.asarray(rhs[1], np.complex128) * big]
    )
    y = np.linalg.solve(np.block([[a, b], [c, d]]), scaled)
    return op, (y[:3], y[3:] / big), rhs


@pytest.mark.parametrize(
    "real_dtype,big", [(jnp.float32, 2e37), (jnp.float32, 1e35), (jnp.float64, 1e307)]
)
@pytest.mark.parametrize("complex_", [False, True])
def test_schur_large_off_diagonal_block(real_dtype, big, complex_):
    # Before: `A⁻¹B` overflowed, and the solve was `singular` (float32 2e37,
    # float64 1e307).
    op, want, rhs = _schur_case(real_dtype, complex_, big)
    sol = lx.linear_solve(op, rhs, lx.Schur(), throw=False)
    assert sol.result == lx.RESULTS.successful
    tol = 1e-4 if real_dtype == jnp.float32 else 1e-12
    for got, part in zip(sol.value, want):
        got = np.asarray(got, np.complex128)
        np.testing.assert_allclose(got, part, rtol=tol, atol=tol * np.abs(part).max())


def _woodbury_of(t, big):
    """`_woodbury_case`'s structure (float64, real) along a path `t`: the large
    and small entries move relative to their size, the others by `O(t)`."""
    rng = np.random.default_rng(6)
    n = 5
    u = 0.1 * (rng.standard_normal(n) + t * rng.standard_normal(n))
    v = 0.1 * (rng.standard_normal(n) + t * rng.standard_normal(n))
    e1 = jnp.zeros(n).at[0].set(1.0)
    u_matrix = jnp.stack([big * (1 + 0.3 * t) * e1, u], axis=1)
    v_matrix = jnp.stack([0.99 * (1 + 0.2 * t) / big * e1, v])
    a = lx.MatrixLinearOperator((0.01 + 0.001 * t) * jnp.eye(n), lx.diagonal_tag)
    op = lx.LowRankUpdateLinearOperator(
        a,
        lx.MatrixLinearOperator(u_matrix),
        lx.IdentityLinearOperator(jax.ShapeDtypeStruct((2,), jnp.float64)),
        lx.MatrixLinearOperator(v_matrix),
    )
    b = jnp.asarray(rng.uniform(0.5, 1, n))
    return op, b


def _schur_of(t, big):
    """`_schur_case`'s structure (float64, real) along a path `t` of `M'`."""
    rng = np.random.default_rng(7)

    def entries(shape):
        return rng.uniform(0.5, 1, shape) * rng.choice([-1, 1], shape)

    def moving(matrix):
        # (Relative, by at least a quarter: the tangent of `C / big` stays a
        # normal number.)
        return matrix * (1 + t * entries(matrix.shape) / 2)

    a = 0.01 * jnp.eye(3)
    b = entries((3, 2))
    b[0, 0] = 1.0  # (`A⁻¹B` overflows for `big` above 1.8e306)
    b = moving(b) * big
    c = moving(entries((2, 3))) / big
    d = moving(100 * np.eye(2) + entries((2, 2)))
    op = lx.BlockLinearOperator(
        [[lx.MatrixLinearOperator(m) for m in row] for row in ((a, b), (c, d))]
    )
    rhs = (jnp.asarray(entries(3)), jnp.asarray(entries(2) * 1e4 / big))
    return op, rhs


@pytest.mark.parametrize("solver", ["woodbury", "schur"])
@pytest.mark.parametrize("big", [1e10, 2e306])
def test_structured_large_entries_derivatives(solver, big):
    # Along a path of the operator, against central differences, float64: forward
    # mode at the limit (2e306: `A⁻¹U`, `A⁻¹B` overflow, and the tangents of
    # the small entries are normal numbers); reverse mode (the transposed state,
    # with its row and column scalings) at 1e10, where the scaling is active
    # too. (At the limit the cotangent of the small block, `big` times that of
    # the solution, is not representable: reverse mode there overflows in
    # exact arithmetic.)
    make = _woodbury_of if solver == "woodbury" else _schur_of
    lx_solver = lx.Woodbury() if solver == "woodbury" else lx.Schur()
    scale = 1.0 if solver == "woodbury" else big

    def loss(t):
        op, b = make(t, big)
        x = lx.linear_solve(op, b, lx_solver).value
        # (Schur's `x₂` is of size `1 / big`: weighted to count.)
        leaves = jax.tree_util.tree_leaves(x)
        return jnp.sum(leaves[0] * jnp.arange(1.0, 1 + leaves[0].size)) + sum(
            jnp.sum(leaf) * scale for leaf in leaves[1:]
        )

    step = 1e-6
    fd = (loss(step) - loss(-step)) / (2 * step)
    _, tangent = jax.jvp(loss, (0.0,), (1.0,))
    np.testing.assert_allclose(tangent, fd, rtol=1e-6)
    if big < 1e300:
        np.testing.assert_allclose(jax.grad(loss)(0.0), fd, rtol=1e-6)


def test_unjitted_solve_with_empty_stats():
    # `lx.Schur` and `lx.Woodbury` return no statistics (`{}`); the un-jitted
    # entry point's layout of the compiled outputs took that empty dict for a
    # single leaf, and a solve with `throw=False` (after the first, compiled
    # one) failed with `IndexError: list index out of range`.
    schur = lx.BlockLinearOperator(
        [
            [
                lx.MatrixLinearOperator(jnp.eye(2)),
                lx.MatrixLinearOperator(jnp.ones((2, 1))),
            ],
            [
                lx.MatrixLinearOperator(jnp.ones((1, 2))),
                lx.MatrixLinearOperator(3 * jnp.eye(1)),
            ],
        ]
    )
    woodbury, _, b = _woodbury_case(jnp.float64, False, 1.0)
    cases = [
        (schur, (jnp.ones(2), jnp.ones(1)), lx.Schur()),
        (woodbury, b, lx.Woodbury()),
    ]
    for op, rhs, solver in cases:
        want = lx.linear_solve(op, rhs, lx.AutoLinearSolver(well_posed=True)).value
        for _ in range(3):
            sol = lx.linear_solve(op, rhs, solver, throw=False)
            assert sol.result == lx.RESULTS.successful
            assert sol.stats == {}
            for got, part in zip(
                jax.tree_util.tree_leaves(sol.value), jax.tree_util.tree_leaves(want)
            ):
                np.testing.assert_allclose(got, part, rtol=1e-10)
