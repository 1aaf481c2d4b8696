"""Edge inputs of the direct solvers that broke them: operators with no rows or
columns, the unpivoted tridiagonal solve that GPUs run for n <= 2, the
statistics the published package reports, and the rank flags of a Kronecker
product solved by a pseudoinverse solver."""

import functools as ft
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lineax as lx


def test_qr_of_an_operator_with_no_rows_solves_to_zero():
    # The minimum-norm solution of a `0×3` system is zero. QR's wide path applied
    # `Q` with LAPACK's `ormqr` to the `(3, 0)` reflectors, which killed the
    # process with SIGFPE inside XLA:CPU's compiled solve (the un-jitted call,
    # and `jit` returning the whole `Solution`); hence the subprocess.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        import lineax as lx
        for solver in (lx.QR(), lx.AutoLinearSolver(well_posed=None)):
            op = lx.MatrixLinearOperator(np.zeros((0, 3)))
            sol = lx.linear_solve(op, np.zeros(0), solver)
            assert sol.value.shape == (3,) and not np.any(sol.value), sol.value
            sol = jax.jit(lambda a, b: lx.linear_solve(a, b, solver))(
                op, jnp.zeros(0)
            )
            assert sol.value.shape == (3,) and not np.any(sol.value), sol.value
            # The transposed solve of a `3×0` one (reverse mode) is `0×3`.
            f = lambda a, b: jnp.sum(
                lx.linear_solve(lx.MatrixLinearOperator(a), b, solver).value
            )
            grads = jax.jit(jax.grad(f, argnums=(0, 1)))(
                jnp.zeros((3, 0)), jnp.ones(3)
            )
            assert grads[0].shape == (3, 0) and not np.any(grads[1]), grads
        print("ok")
        """
    )
    # At XLA's default flags, as users run: the crash needs XLA:CPU's fusion
    # emitters, which the test run turns off (see conftest.py).
    from conftest import run_at_default_flags

    completed = run_at_default_flags(code)
    assert completed.returncode == 0, (completed.returncode, completed.stderr[-3000:])
    assert completed.stdout.strip().endswith("ok")


def test_tridiagonal_of_size_zero():
    # The bands of a `0×0` operator are empty; padding them to length `n + 1`
    # made `tridiagonal_solve` refuse the shapes (a TypeError).
    operator = lx.MatrixLinearOperator(jnp.zeros((0, 0)), lx.tridiagonal_tag)
    for solver in (lx.Tridiagonal(), lx.AutoLinearSolver(well_posed=True)):
        solution = lx.linear_solve(operator, jnp.zeros(0), solver)
        assert solution.value.shape == (0,)

    def f(matrix, b):
        operator = lx.MatrixLinearOperator(matrix, lx.tridiagonal_tag)
        return jnp.sum(lx.linear_solve(operator, b, lx.Tridiagonal()).value)

    grads = jax.grad(f, argnums=(0, 1))(jnp.zeros((0, 0)), jnp.zeros(0))
    assert grads[0].shape == (0, 0) and grads[1].shape == (0,)


def _thomas_without_pivoting(lower, diagonal, upper, b):
    # What JAX runs on GPUs for `tridiagonal_solve` with n <= 2 (cuSPARSE's
    # pivoting `gtsv2` needs n >= 3), and on other platforms at every n.
    from jax._src.lax.linalg import _tridiagonal_solve_jax

    return _tridiagonal_solve_jax(lower, diagonal, upper, b, perturb_singular=False)


@pytest.mark.parametrize("n", [1, 2])
def test_tridiagonal_with_zero_leading_diagonal_is_solved_for_n_up_to_2(n, monkeypatch):
    # `[[0, 1], [1, 0]]` is perfectly conditioned, but elimination without
    # pivoting divides by its zero diagonal: NaN, reported singular, on a GPU.
    # The GPU's lowering is simulated on the CPU by replacing `tridiagonal_solve`
    # with JAX's unpivoted implementation, which JAX's GPU lowering calls.
    monkeypatch.setattr(jax.lax.linalg, "tridiagonal_solve", _thomas_without_pivoting)
    matrix = np.array([[2.0]]) if n == 1 else np.array([[0.0, 1.0], [1.0, 0.0]])
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), lx.tridiagonal_tag)
    b = jnp.arange(1.0, n + 1.0)
    solution = lx.linear_solve(operator, b, lx.Tridiagonal(), throw=False)
    assert solution.result == lx.RESULTS.successful
    np.testing.assert_allclose(
        solution.value, np.linalg.solve(matrix, np.asarray(b)), rtol=1e-14
    )
    # The transposed solve of reverse mode, and the condition estimate.
    grad = jax.grad(
        lambda b: jnp.sum(lx.linear_solve(operator, b, lx.Tridiagonal()).value)
    )(b)
    np.testing.assert_allclose(grad, np.linalg.solve(matrix.T, np.ones(n)), rtol=1e-14)
    assert solution.stats["rcond"] > 0.1


def test_svd_reports_the_rank_as_the_published_package():
    # lineax 0.1.1's SVD returns `stats["rank"]`, the number of singular values
    # kept; code reading it failed with a KeyError.
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 4))
    vector = jnp.asarray(rng.standard_normal(6))
    for solver in (lx.SVD(), lx.AutoLinearSolver(well_posed=False)):
        solution = lx.linear_solve(lx.MatrixLinearOperator(matrix), vector, solver)
        assert int(solution.stats["rank"]) == 2
    zero = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.zeros((3, 3))), jnp.ones(3), lx.SVD()
    )
    assert int(zero.stats["rank"]) == 0
    full = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.eye(3) * 1e-30), jnp.ones(3), lx.SVD()
    )
    assert int(full.stats["rank"]) == 3


def test_default_cutoff_is_the_published_packages():
    # lineax 0.1.1 cuts singular values (and diagonal entries) at or below
    # `2 eps max(m, n)` of the largest; this library cut at half that (NumPy's),
    # and kept one in between: Optimistix's IndirectLevenbergMarquardt then ran to
    # its step limit on a float32 fit that 0.1.1 solves in 10 steps. A value at
    # 1.5 eps max(m, n) is now cut, one at 2.5 eps max(m, n) kept.
    eps = float(jnp.finfo(jnp.float64).eps)
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((5, 3)))
    v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    vector = jnp.asarray(rng.standard_normal(5))
    for factor, rank in ((1.5, 2), (2.5, 3)):
        s = np.array([1.0, 0.5, factor * eps * 5])
        matrix = lx.MatrixLinearOperator(jnp.asarray(u * s @ v.T))
        solution = lx.linear_solve(matrix, vector, lx.SVD())
        assert int(solution.stats["rank"]) == rank, factor
        d = lx.DiagonalLinearOperator(jnp.asarray([1.0, 0.5, factor * eps * 3]))
        x = lx.linear_solve(d, jnp.ones(3), lx.Diagonal()).value
        assert (x[2] != 0) == (rank == 3), factor


@pytest.mark.parametrize(
    "inner", [lx.SVD(), lx.AutoLinearSolver(well_posed=False)], ids=["svd", "auto"]
)
def test_kronecker_pseudoinverse_of_a_singular_factor_has_the_pseudoinverse_jvp(
    inner,
):
    # With a pseudoinverse inner solver, `lx.Kronecker` solves `(A ⊗ B)⁺ b` for a
    # singular factor `A` correctly, but said "full rank": the JVP then used the
    # full-rank formula, e.g. [0.036, -0.074, 0.073, -0.147] against the
    # pseudoinverse's [0.018, -0.126, 0.150, -0.483] here.
    rng = np.random.default_rng(0)
    a = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # rank 1
    b_factor = jnp.asarray(rng.standard_normal((2, 2)))
    vector = jnp.asarray(rng.standard_normal(4))
    tangent = jnp.asarray(rng.standard_normal((2, 2)))

    def solve(a):
        operator = lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(a), lx.MatrixLinearOperator(b_factor)
        )
        return lx.linear_solve(operator, vector, lx.Kronecker(inner)).value

    def reference(a):
        return jnp.linalg.pinv(jnp.kron(a, b_factor)) @ vector

    value, jvp = jax.jvp(solve, (a,), (tangent,))
    expected_value, expected_jvp = jax.jvp(reference, (a,), (tangent,))
    np.testing.assert_allclose(value, expected_value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jvp, expected_jvp, rtol=1e-10, atol=1e-12)


# A matrix computed from finite operators can overflow: `linear_solve` tests the
# operators' arrays (finite), and the solvers divided by the infinite entries to a
# finite, wrong solution reported successful (as lineax 0.1.1 does). Each case:
# the operator, the solvers, and whether it overflows (the controls, whose matrix
# is stored or whose arithmetic stays finite, must still succeed).
def _overflowing_cases():
    big = lx.MatrixLinearOperator(jnp.array([[1e200, 1e200], [0.0, 1.0]]))
    diag = lx.MatrixLinearOperator(jnp.diag(jnp.array([1e200, 1.0])))
    lower = lx.MatrixLinearOperator(
        jnp.array([[1e300, 0.0], [1.0, 1.0]]), lx.lower_triangular_tag
    )
    psd = lx.MatrixLinearOperator(jnp.array([[1e300, 0.0], [0.0, 1.0]]))
    bands = lx.TridiagonalLinearOperator(
        jnp.array([1e300, 1.0]), jnp.array([0.5]), jnp.array([0.5])
    )
    # Well conditioned, with large entries.
    well = lx.MatrixLinearOperator(jnp.array([[2e150, 1e150], [1e150, 3e150]]))
    dense = (lx.LU(), lx.QR(), lx.SVD(), lx.AutoLinearSolver(well_posed=True))
    return [
        ("composed", big @ diag, dense, True),
        ("scaled", big * 1e200, dense, True),
        ("sum", big * 1e108 + big * 1e108, dense, True),
        ("triangular", lower * 1e10, (lx.Triangular(), dense[-1]), True),
        (
            "cholesky",
            lx.TaggedLinearOperator(psd * 1e10, lx.positive_semidefinite_tag),
            (lx.Cholesky(), dense[-1]),
            True,
        ),
        (
            "diagonal",
            lx.DiagonalLinearOperator(jnp.array([1e300, 1.0])) * 1e10,
            (lx.Diagonal(well_posed=True), dense[-1]),
            True,
        ),
        ("tridiagonal", bands * 1e10, (lx.Tridiagonal(), dense[-1]), True),
        # Controls: stored matrices (negated, tagged, in blocks), and arithmetic
        # that stays finite.
        ("negated", -well, dense, False),
        ("tagged", lx.TaggedLinearOperator(well, lx.symmetric_tag), dense, False),
        ("blocks", lx.BlockDiagonalLinearOperator([well, -well]), dense, False),
        ("composed finite", well @ (well * 1e-150), dense, False),
        ("scaled finite", well * 1e100, dense, False),
    ]


@pytest.mark.parametrize(
    "case", _overflowing_cases(), ids=[c[0] for c in _overflowing_cases()]
)
def test_a_computed_matrix_that_overflows_is_not_a_successful_solve(case):
    _, operator, solvers, overflows = case
    vector = jtu.tree_map(lambda s: jnp.ones(s.shape), operator.out_structure())
    solve = jax.jit(ft.partial(lx.linear_solve, throw=False), static_argnums=2)
    for solver in solvers:
        solution = solve(operator, vector, solver)
        assert (solution.result == lx.RESULTS.successful) != overflows, solver
        if overflows:
            assert solution.result == lx.RESULTS.singular, solver
            with pytest.raises(eqx.EquinoxRuntimeError, match="overflowed"):
                lx.linear_solve(operator, vector, solver)
            # With the state reused (the record was then tested among the inputs:
            # "contains NaN or inf", of finite inputs).
            # (Raised inside `jax.jit`: XLA's `JaxRuntimeError`, holding the
            # message.)
            state = solver.init(operator, {})
            reused = jax.jit(ft.partial(lx.linear_solve, solver=solver))
            with pytest.raises(RuntimeError, match="overflowed"):
                reused(operator, vector, state=state)
        else:
            expected = np.linalg.solve(
                np.asarray(operator.as_matrix()), np.ones(operator.out_size())
            )
            value = jnp.concatenate(jtu.tree_leaves(solution.value))
            scale = np.max(np.abs(expected))
            np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12 * scale)
