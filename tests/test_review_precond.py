"""An adversarial review, as a user, of the named preconditioners and
`SparseLinearOperator` in preconditioned Krylov solves: badly scaled rows,
derivatives through solves whose preconditioner is built from the differentiated
values, and negative definite operators.

Every expected value comes from NumPy/SciPy in float64 (`solve`, or the analytic
derivative of the solution), never from lineax itself. Small sizes; every solve
has a `max_steps` bound far above the steps it needs.

Reviewed and found to agree (no test here): `SparseLinearOperator` with duplicate,
unsorted, padded or explicitly zero entries, empty rows and columns, complex data,
non-square and banded shapes, against SciPy (`mv` of lists and NumPy arrays,
`.T`, `as_matrix`, `diagonal`, `tridiagonal`, inside `jit`); every preconditioner
of a Hermitian positive definite complex matrix (tags, transpose, CG, MINRES,
GMRES, BiCGStab, PipelinedCG); `jax.grad` and `jax.jvp` through CG, MINRES,
GMRES, BiCGStab and PipelinedCG with each preconditioner built from the
differentiated matrix; `jax.vmap` over matrices of different scales with the
preconditioner built inside; multigrid on anisotropic (1e±3), 3-D, rectangular
and one-level grids with both smoothers (symmetric positive definite, CG
converges); Chebyshev intervals that miss the spectrum and Neumann series that
diverge (CG reports a breakdown, never `successful`); IC(0) of an indefinite
matrix tagged positive semidefinite (a breakdown, raised under `throw=True`);
misspelled option names, preconditioners of the wrong size or dtype, and strings
given as preconditioners (named errors).

Each test here failed before the fix it protects.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from beartype import beartype
from conftest import EXHAUSTIVE
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Float, jaxtyped

import lineax as lx


_PSD = lx.positive_semidefinite_tag
_NSD = lx.negative_semidefinite_tag


@jaxtyped(typechecker=beartype)
def _poisson_1d(n: int) -> Float[np.ndarray, "n n"]:
    return 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


@jaxtyped(typechecker=beartype)
def _badly_scaled(n: int, decades: float) -> Float[np.ndarray, "n n"]:
    """`S T S`: the 1-D Poisson matrix `T` with its rows and columns scaled by
    `10^±decades` (in a fixed shuffled order), symmetric positive definite. Its
    Jacobi preconditioner undoes the scaling exactly: `D^-1/2 A D^-1/2 = T / 2`."""
    scales = 10.0 ** np.linspace(-decades, decades, n)
    scales = scales[np.random.default_rng(0).permutation(n)]
    return scales[:, None] * _poisson_1d(n) * scales[None, :]


#
# MINRES with a preconditioner whose scale varies across the unknowns.
#


@pytest.mark.parametrize(
    "dtype, decades, rtol, accuracy",
    [(jnp.float64, 4.0, 1e-6, 1e-9), (jnp.float32, 2.0, 1e-2, 1e-4)],
    ids=["float64", "float32"],
)
def test_minres_with_jacobi_of_badly_scaled_rows(dtype, decades, rtol, accuracy):
    # The preconditioned operator is `T / 2` (condition number ~100), which CG
    # solves in 16 steps. MINRES counted `sqrt(<b, P b>)`, the right-hand side in
    # the preconditioner's norm (~1e4 here), in its estimate of the norm of the
    # Lanczos matrix (entries ~1e-8 after the operator's scaling), so its test of
    # `||A r|| / (||A|| ||r||)` passed at the first step: it stopped there and
    # returned 0 as `singular` (relative error 1.0).
    n = 16
    matrix = _badly_scaled(n, decades)
    b = np.cos(np.arange(n))
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype), _PSD)
    precond = lx.JacobiPreconditioner(operator)
    solver = lx.MINRES(rtol=rtol, atol=0.0, max_steps=100)
    solution = lx.linear_solve(
        operator,
        jnp.asarray(b, dtype),
        solver,
        options={"preconditioner": precond},
        throw=False,
    )
    expected = np.linalg.solve(matrix, b)
    error = np.linalg.norm(np.asarray(solution.value, np.float64) - expected)
    assert error <= accuracy * np.linalg.norm(expected)
    assert solution.result == lx.RESULTS.successful


#
# Reverse mode through LSMR with an incomplete factorisation.
#


_N_SPARSE = 8


def _sparse_spd() -> sp.csr_matrix:
    matrix = _poisson_1d(_N_SPARSE) + np.diag(np.linspace(0.1, 1.0, _N_SPARSE))
    matrix[0, 3] = matrix[3, 0] = -0.3  # fill-in, so IC(0)/ILU(0) are not exact
    matrix[2, 6] = matrix[6, 2] = -0.2
    return sp.csr_matrix(matrix)


_CSR = _sparse_spd()
_ROWS = np.repeat(np.arange(_N_SPARSE), np.diff(_CSR.indptr))
_B_SPARSE = np.sin(np.arange(1.0, _N_SPARSE + 1))


def _dense_of(values: Float[Array, " nnz"]) -> Float[Array, "n n"]:
    zeros = jnp.zeros((_N_SPARSE, _N_SPARSE), values.dtype)
    return zeros.at[_ROWS, _CSR.indices].set(values)


@functools.cache
def _index_arrays() -> tuple[Array, Array]:
    # (Made outside `jit`, where `jnp.asarray` of a NumPy array is traced.)
    return jnp.asarray(_CSR.indices), jnp.asarray(_CSR.indptr)


def _sparse_of(values: Float[Array, " nnz"]) -> lx.SparseLinearOperator:
    # The index arrays closed over (concrete), the values traced.
    matrix = jsparse.BCSR((values, *_index_arrays()), shape=(_N_SPARSE, _N_SPARSE))
    return lx.SparseLinearOperator(matrix, _PSD)


_MAKE_INCOMPLETE = {
    "ilu": lx.ILUPreconditioner,
    "ic": lx.IncompleteCholeskyPreconditioner,
}


@pytest.mark.parametrize("name", sorted(_MAKE_INCOMPLETE))
def test_incomplete_factorisation_transposes_under_jax(name):
    # `jax.linear_transpose` of the preconditioner: the level-by-level scatter of
    # its triangular solves was not transposable (NotImplementedError).
    values = jnp.asarray(_CSR.data)
    precond = _MAKE_INCOMPLETE[name](_sparse_of(values))
    matrix = np.asarray(precond.as_matrix())
    vector = jnp.asarray(_B_SPARSE)
    (transposed,) = jax.linear_transpose(precond.mv, vector)(vector)
    np.testing.assert_allclose(transposed, matrix.T @ _B_SPARSE, rtol=1e-12)


# (Behind LINEAX_EXHAUSTIVE: its compilation takes 11 s of CPU; the default run
# checks the fault itself, the transposition above.)
@pytest.mark.exhaustive
@pytest.mark.parametrize("name", sorted(_MAKE_INCOMPLETE))
def test_lsmr_gradient_with_incomplete_factorisation_of_the_values(name):
    # LSMR poses `A N` and its reverse mode transposes the tangent of that
    # product, hence `N`'s triangular solves: NotImplementedError ("scatter
    # transpose is only implemented where unique_indices=True").
    solver = lx.LSMR(rtol=1e-12, atol=0.0, max_steps=200)
    b = jnp.asarray(_B_SPARSE)

    def loss(values):
        operator = _sparse_of(values)
        precond = _MAKE_INCOMPLETE[name](operator)
        solution = lx.linear_solve(
            operator, b, solver, options={"preconditioner": precond}
        )
        return jnp.sum(jnp.sin(solution.value))

    values = jnp.asarray(_CSR.data)
    _index_arrays()
    gradient = jax.jit(jax.grad(loss))(values)
    # d/dA sum(sin(A⁻¹ b)) = -A⁻ᵀ cos(x) xᵀ, read on the stored entries.
    matrix = np.asarray(_dense_of(values))
    x = np.linalg.solve(matrix, _B_SPARSE)
    dense = -np.outer(np.linalg.solve(matrix.T, np.cos(x)), x)
    np.testing.assert_allclose(
        gradient, dense[_ROWS, _CSR.indices], rtol=1e-8, atol=1e-10
    )


#
# Negative definite operators: CG needs a preconditioner of `-A`.
#


def _negative_definite_preconditioners(operator, sparse):
    return {
        "jacobi": lx.JacobiPreconditioner(operator),
        "block-jacobi": lx.BlockJacobiPreconditioner(operator, 3),
        "chebyshev": lx.ChebyshevPreconditioner(operator, 3),
        "ic": lx.IncompleteCholeskyPreconditioner(sparse),
    }


@pytest.mark.parametrize("solver_cls", [lx.CG, lx.MINRES, lx.PipelinedCG])
def test_negative_definite_preconditioner_is_refused_with_the_remedy(solver_cls):
    # Each preconditioner of a negative definite operator is negative definite
    # (an approximation of A⁻¹), which these solvers refuse: they need one of
    # `(-A)⁻¹`. The message said the preconditioner "would be [positive definite]
    # if the operator it was built from were tagged so" (it was: negative) and
    # named only other solvers; it now names `-preconditioner`, which works.
    n = 9
    matrix = -(_poisson_1d(n) + np.diag(np.linspace(0.0, 2.0, n)))
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), _NSD)
    sparse = lx.SparseLinearOperator(sp.csr_matrix(matrix), _NSD)
    b = jnp.cos(jnp.arange(n, dtype=jnp.float64))
    solver = solver_cls(rtol=1e-10, atol=0.0, max_steps=100)
    expected = np.linalg.solve(matrix, np.asarray(b))
    preconditioners = _negative_definite_preconditioners(operator, sparse)
    for name, precond in preconditioners.items():
        op = sparse if name == "ic" else operator
        # (Refused when the solve is set up, before anything is compiled.)
        with pytest.raises(ValueError, match=r"`-preconditioner`"):
            lx.linear_solve(op, b, solver, options={"preconditioner": precond})
        # (The remedy, solved: for one preconditioner in the default run.)
        if EXHAUSTIVE or name == "jacobi":
            solution = lx.linear_solve(
                op, b, solver, options={"preconditioner": -precond}
            )
            np.testing.assert_allclose(
                solution.value, expected, rtol=1e-8, err_msg=name
            )


#
# Multigrid of a Hermitian (complex) stencil.
#


def _magnetic_laplacian(u: Array, h: float) -> Array:
    # `-d²/dx²` with a constant magnetic phase, plus a shift: Hermitian positive
    # definite, complex, not symmetric.
    phase = np.exp(0.7j)
    padded = jnp.pad(u, 1)
    return (2.2 * u - phase * padded[2:] - np.conj(phase) * padded[:-2]) / h**2


def test_multigrid_of_hermitian_stencil_transposes():
    # Its transpose is the V-cycle of the transposed stencil, `conj(P)`; tagged
    # positive semidefinite (Hermitian), it returned itself, `P = conj(Pᵀ)`, off
    # by 84% of its largest entry.
    n = 15
    precond = lx.MultigridPreconditioner(
        _magnetic_laplacian,
        (n,),
        1 / (n + 1),
        dtype=jnp.complex128,
        tags=_PSD,
        coarsest_size=3,
    )
    # (Jitted: eager, the V-cycle ran as many small programs, compiled each.)
    matrix, transposed = jax.jit(lambda p: (p.as_matrix(), p.T.as_matrix()))(precond)
    matrix = np.asarray(matrix)
    assert np.abs(matrix - matrix.T).max() > 0.5 * np.abs(matrix).max()
    np.testing.assert_allclose(
        transposed, matrix.T, rtol=0, atol=1e-14 * np.abs(matrix).max()
    )


#
# Jacobi with an estimated diagonal, of a Hermitian operator.
#


def test_probed_jacobi_of_hermitian_operator_is_hermitian():
    # The estimate of the diagonal averages `v_i (A v)_i` over random signs,
    # which for complex off-diagonal entries has an imaginary part (here up to
    # 1.3, against real diagonal entries from 0.7): the preconditioner was not
    # Hermitian, yet tagged positive semidefinite, and CG ran to `max_steps`
    # (300) where it needs 60 steps unpreconditioned.
    rng = np.random.default_rng(0)
    n = 40
    m = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    matrix = m @ m.conj().T / n + np.diag(10.0 ** rng.uniform(-2, 2, n))
    b = rng.normal(size=n) + 1j * rng.normal(size=n)
    operator = lx.FunctionLinearOperator(
        lambda x: jnp.asarray(matrix) @ x,
        jax.ShapeDtypeStruct((n,), jnp.complex128),
        _PSD,
    )
    precond = lx.JacobiPreconditioner(operator, probes=4)
    inverse = np.asarray(lx.diagonal(precond))
    assert np.all(np.imag(inverse) == 0) and np.all(np.real(inverse) > 0)
    solver = lx.CG(rtol=1e-10, atol=0.0, max_steps=100)
    solution = lx.linear_solve(
        operator, jnp.asarray(b), solver, options={"preconditioner": precond}
    )
    np.testing.assert_allclose(solution.value, np.linalg.solve(matrix, b), rtol=1e-8)


#
# Polynomial preconditioners of float32 operators far from unit scale.
#


@pytest.mark.parametrize(
    "make",
    [
        lambda op: lx.ChebyshevPreconditioner(op, 4),
        lambda op: lx.NeumannPreconditioner(op, 4),
    ],
    ids=["chebyshev", "neumann"],
)
def test_polynomial_preconditioner_of_float32_operator_at_any_scale(make):
    # Their Lanczos estimate of the spectrum took `sqrt(<w, w>)` of vectors of
    # the operator's size: infinite for a norm of 2e19 (so the preconditioner
    # was NaN and CG broke down at once), and zero below 1e-19 (a wrong
    # interval, one more CG step). The preconditioned CG solves of `c T` are
    # those of `T` for any `c` that float32 holds.
    n = 12
    matrix = _poisson_1d(n) + np.diag(np.linspace(0.0, 1.0, n))
    b = np.cos(np.arange(n))
    solver = lx.CG(rtol=1e-5, atol=0.0, max_steps=50)
    steps = []
    for scale in [1.0, 1e25, 1e-25]:
        operator = lx.MatrixLinearOperator(
            jnp.asarray(scale * matrix, jnp.float32), _PSD
        )
        solution = lx.linear_solve(
            operator,
            jnp.asarray(b, jnp.float32),
            solver,
            options={"preconditioner": make(operator)},
            throw=False,
        )
        expected = np.linalg.solve(matrix, b) / scale
        error = np.abs(np.asarray(solution.value, np.float64) - expected).max()
        assert solution.result == lx.RESULTS.successful, scale
        assert error <= 1e-4 * np.abs(expected).max(), scale
        steps.append(int(solution.stats["num_steps"]))
    assert steps[1:] == steps[:1] * 2
