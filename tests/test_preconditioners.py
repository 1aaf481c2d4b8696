"""The preconditioners: each is the operator it claims to be (against a dense
float64 reference), has the tags it claims, cuts Krylov iteration counts on a small
Poisson problem, and leaves gradients through a preconditioned solve equal to the
dense ones."""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from conftest import raises_message

import lineax as lx


#
# Problems.
#


def _spd(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


def _nonsymmetric(n: int, seed: int = 1) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a + 2 * n * np.diag(np.linspace(1, 3, n))


def _poisson_1d(n: int) -> np.ndarray:
    return 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


def _poisson_2d(n: int) -> np.ndarray:
    """The 5-point Laplacian on an n × n grid with zero Dirichlet boundaries."""
    t = _poisson_1d(n)
    return np.kron(t, np.eye(n)) + np.kron(np.eye(n), t)


def _reaction_diffusion(n: int) -> np.ndarray:
    """Poisson plus a reaction term spanning four orders of magnitude: the case a
    diagonal preconditioner is for."""
    c = 10.0 ** np.random.default_rng(2).uniform(0, 4, size=n * n)
    return _poisson_2d(n) + np.diag(c)


def _psd(matrix) -> lx.MatrixLinearOperator:
    return lx.MatrixLinearOperator(jnp.asarray(matrix), lx.positive_semidefinite_tag)


def _blocks_inverse(matrix: np.ndarray, b: int) -> np.ndarray:
    n = matrix.shape[0]
    out = np.zeros_like(matrix)
    for start in range(0, n, b):
        s = slice(start, min(start + b, n))
        out[s, s] = np.linalg.inv(matrix[s, s])
    return out


@ft.cache
def _cg_steps_fn(rtol: float):
    # One jitted function per tolerance: the operator and preconditioner are
    # arguments, so every case with the same shapes reuses its compilation.
    solver = lx.CG(rtol=rtol, atol=0.0, max_steps=2000)

    @jax.jit
    def run(operator, vector, precond):
        options = {} if precond is None else {"preconditioner": precond}
        sol = lx.linear_solve(operator, vector, solver, options=options, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    return run


def _cg_steps(operator, precond, rtol=1e-8):
    b = jnp.ones(operator.out_size(), jnp.float64)
    value, result, steps = _cg_steps_fn(rtol)(operator, b, precond)
    assert result == lx.RESULTS.successful
    residual = np.asarray(operator.as_matrix()) @ np.asarray(value) - np.asarray(b)
    assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(b)
    return int(steps)


#
# Jacobi and block Jacobi.
#


def test_jacobi_is_inverse_diagonal_of_stored_operators():
    a = _spd(6)
    d, lo, up = np.arange(1.0, 7.0), np.ones(5), 2 * np.ones(5)
    cases = [
        (_psd(a), a),
        (lx.DiagonalLinearOperator(jnp.asarray(d)), np.diag(d)),
        (
            lx.TridiagonalLinearOperator(d, lo, up),
            np.diag(d) + np.diag(lo, -1) + np.diag(up, 1),
        ),
    ]
    for operator, dense in cases:
        precond = lx.JacobiPreconditioner(operator)
        np.testing.assert_allclose(
            precond.as_matrix(), np.diag(1 / np.diag(dense)), rtol=1e-14
        )
        np.testing.assert_allclose(lx.diagonal(precond), 1 / np.diag(dense))
        assert lx.is_diagonal(precond)


def test_jacobi_and_block_jacobi_read_structured_operators():
    # Kronecker, block-diagonal, low-rank and block operators of stored parts
    # have a cheap diagonal and a matrix read from their parts: the
    # preconditioners used to refuse them as matrix-free.
    a, b = _spd(3), _spd(2, seed=1)
    m = lx.MatrixLinearOperator
    operators = [
        lx.KroneckerLinearOperator(m(a), m(b)),
        lx.BlockDiagonalLinearOperator([m(a), m(a + 1)]),
        lx.BlockDiagonalLinearOperator([m(a), lx.DiagonalLinearOperator(np.ones(2))]),
        lx.LowRankUpdateLinearOperator(
            m(a), np.ones((3, 1)), np.eye(1), np.ones((1, 3))
        ),
        lx.BlockLinearOperator([[m(a), m(np.ones((3, 2)))], [None, m(b)]]),
    ]
    for operator in operators:
        dense = np.asarray(operator.as_matrix())
        precond = lx.JacobiPreconditioner(operator)
        np.testing.assert_allclose(
            precond.as_matrix(), np.diag(1 / np.diag(dense)), rtol=1e-14
        )
        precond = lx.BlockJacobiPreconditioner(operator, 2)
        np.testing.assert_allclose(
            precond.as_matrix(), _blocks_inverse(dense, 2), rtol=1e-12
        )
    # A matrix-free part still makes the whole matrix-free.
    struct = jax.ShapeDtypeStruct((2,), jnp.float64)
    free = lx.FunctionLinearOperator(lambda x: jnp.asarray(b) @ x, struct)
    with pytest.raises(ValueError, match="probes"):
        lx.JacobiPreconditioner(lx.KroneckerLinearOperator(m(a), free))
    with pytest.raises(ValueError, match="materialise"):
        lx.BlockJacobiPreconditioner(lx.BlockDiagonalLinearOperator([m(a), free]), 2)


def test_jacobi_reads_sparse_diagonal_through_sums_scalings_and_tags():
    # A sparse Laplacian plus a diagonal reaction term (the case Jacobi is for),
    # scaled, negated or tagged: its diagonal is read from the parts. These were
    # refused as matrix-free.
    # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
    laplacian = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(5, 5))  # pyright: ignore[reportArgumentType]
    sparse = lx.SparseLinearOperator(laplacian.tocsr(), lx.positive_semidefinite_tag)
    reaction = lx.DiagonalLinearOperator(jnp.asarray(10.0 ** np.arange(5.0)))
    operators = [
        sparse + reaction,
        2.0 * sparse,
        sparse / 2.0,
        -sparse,
        lx.TaggedLinearOperator(sparse, lx.symmetric_tag),
    ]
    for operator in operators:
        dense = np.asarray(operator.as_matrix())
        precond = lx.JacobiPreconditioner(operator)
        np.testing.assert_allclose(
            precond.as_matrix(), np.diag(1 / np.diag(dense)), rtol=1e-14
        )


def test_jacobi_tags_follow_definiteness():
    a = _spd(5)
    pos = lx.JacobiPreconditioner(_psd(a))
    assert lx.is_positive_semidefinite(pos) and lx.is_symmetric(pos)
    assert not lx.is_negative_semidefinite(pos)
    neg = lx.JacobiPreconditioner(
        lx.MatrixLinearOperator(-a, lx.negative_semidefinite_tag)
    )
    assert lx.is_negative_semidefinite(neg)
    assert not lx.is_positive_semidefinite(neg)
    plain = lx.JacobiPreconditioner(lx.MatrixLinearOperator(_nonsymmetric(5)))
    assert lx.is_diagonal(plain) and not lx.is_positive_semidefinite(plain)


def test_jacobi_of_matrix_free_operator_needs_probes():
    a = jnp.asarray(_spd(5))
    struct = jax.ShapeDtypeStruct((5,), jnp.float64)
    operator = lx.FunctionLinearOperator(lambda x: a @ x, struct)
    with pytest.raises(ValueError, match="probes"):
        lx.JacobiPreconditioner(operator)
    with pytest.raises(ValueError, match="probes"):
        lx.JacobiPreconditioner(operator + _psd(a))
    with pytest.raises(ValueError, match="probes"):
        lx.JacobiPreconditioner(_psd(a), probes=0)


def test_jacobi_probes_exact_for_diagonal_and_converging_otherwise():
    d = jnp.linspace(1.0, 4.0, 7)
    struct = jax.ShapeDtypeStruct((7,), jnp.float64)
    diagonal = lx.FunctionLinearOperator(lambda x: d * x, struct)
    precond = lx.JacobiPreconditioner(diagonal, probes=2)
    np.testing.assert_allclose(lx.diagonal(precond), 1 / d, rtol=1e-14)

    # Off the diagonal the estimate errs by ~ |row| / sqrt(probes).
    a = _poisson_1d(7) + 4 * np.eye(7)
    dense = jnp.asarray(a)
    operator = lx.FunctionLinearOperator(
        lambda x: dense @ x, struct, lx.positive_semidefinite_tag
    )
    precond = lx.JacobiPreconditioner(operator, probes=4096, key=jax.random.key(3))
    estimate = 1 / np.asarray(lx.diagonal(precond))
    np.testing.assert_allclose(estimate, np.diag(a), atol=4 * 2 / 64)
    assert lx.is_positive_semidefinite(precond)


def test_jacobi_zero_diagonal_falls_back_to_largest_entry():
    a = np.array([[0.0, 1.0, 0.0], [1.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    precond = lx.JacobiPreconditioner(lx.MatrixLinearOperator(a))
    np.testing.assert_allclose(lx.diagonal(precond), [1 / 4, 1 / 4, -1 / 2])


def test_jacobi_of_pytree_operator_maps_output_to_input_structure():
    a = np.arange(1.0, 1.0 + 6 * 6).reshape(6, 6) + 30 * np.eye(6)
    in_struct = {"x": jax.ShapeDtypeStruct((2,), jnp.float64)}
    in_struct["y"] = jax.ShapeDtypeStruct((4,), jnp.float64)
    out_struct = (jax.ShapeDtypeStruct((3, 2), jnp.float64),)
    pytree = ({"x": jnp.asarray(a[:, :2].reshape(3, 2, 2))},)
    pytree[0]["y"] = jnp.asarray(a[:, 2:].reshape(3, 2, 4))
    operator = lx.PyTreeLinearOperator(pytree, out_struct)
    assert operator.in_structure() == in_struct
    precond = lx.JacobiPreconditioner(operator)
    assert precond.in_structure() == operator.out_structure()
    assert precond.out_structure() == operator.in_structure()
    np.testing.assert_allclose(precond.as_matrix(), np.diag(1 / np.diag(a)))
    transposed = precond.T
    assert transposed.in_structure() == operator.in_structure()
    assert transposed.out_structure() == operator.out_structure()


@pytest.mark.parametrize("block_size", [1, 3, 4, 9])
def test_block_jacobi_is_inverse_of_diagonal_blocks(block_size):
    a = _nonsymmetric(7)
    precond = lx.BlockJacobiPreconditioner(lx.MatrixLinearOperator(a), block_size)
    reference = _blocks_inverse(a, min(block_size, 7))
    np.testing.assert_allclose(precond.as_matrix(), reference, rtol=1e-12)
    np.testing.assert_allclose(precond.T.as_matrix(), reference.T, rtol=1e-12)


def test_block_jacobi_of_tridiagonal_reads_bands():
    d, lo, up = np.arange(3.0, 10.0), np.ones(6), -2 * np.ones(6)
    dense = np.diag(d) + np.diag(lo, -1) + np.diag(up, 1)
    precond = lx.BlockJacobiPreconditioner(lx.TridiagonalLinearOperator(d, lo, up), 3)
    np.testing.assert_allclose(precond.as_matrix(), _blocks_inverse(dense, 3))


def test_block_jacobi_tags_and_bad_input():
    a = _spd(6)
    precond = lx.BlockJacobiPreconditioner(_psd(a), 2)
    assert lx.is_positive_semidefinite(precond) and lx.is_symmetric(precond)
    assert not lx.is_diagonal(precond)
    for bad in (0, 2.0, True):
        with raises_message(ValueError, "block_size"):
            lx.BlockJacobiPreconditioner(_psd(a), bad)  # pyright: ignore[reportArgumentType]
    struct = jax.ShapeDtypeStruct((6,), jnp.float64)
    matrix_free = lx.FunctionLinearOperator(lambda x: jnp.asarray(a) @ x, struct)
    with pytest.raises(ValueError, match="materialise"):
        lx.BlockJacobiPreconditioner(matrix_free, 2)
    wide = lx.MatrixLinearOperator(np.ones((3, 4)))
    with pytest.raises(ValueError, match="square"):
        lx.JacobiPreconditioner(wide)


def test_diagonal_preconditioners_cut_cg_iterations():
    operator = _psd(_reaction_diffusion(10))
    plain = _cg_steps(operator, None)
    jacobi = _cg_steps(operator, lx.JacobiPreconditioner(operator))
    block = _cg_steps(operator, lx.BlockJacobiPreconditioner(operator, 10))
    assert jacobi < plain / 2, (plain, jacobi)
    assert block < jacobi, (jacobi, block)


def test_preconditioner_of_another_operator_is_a_named_error():
    operator = _psd(_spd(5))
    other = lx.JacobiPreconditioner(_psd(_spd(6)))
    with pytest.raises(ValueError, match="preconditioner"):
        lx.linear_solve(
            operator,
            jnp.ones(5),
            lx.CG(rtol=1e-6, atol=1e-6),
            options={"preconditioner": other},
        )


#
# Gradients through preconditioned solves.
#


def _grad_check(make_precond, solver, matrix, tags=lx.positive_semidefinite_tag):
    """d/d(matrix, vector) of a weighted sum of the solution, preconditioned
    iterative vs dense."""
    n = matrix.shape[0]
    rng = np.random.default_rng(5)
    b = jnp.asarray(rng.normal(size=n))
    w = jnp.asarray(rng.normal(size=n))

    def iterative(a, b):
        operator = lx.MatrixLinearOperator(a, tags)
        options = {"preconditioner": make_precond(operator)}
        return w @ lx.linear_solve(operator, b, solver, options=options).value

    def dense(a, b):
        return w @ jnp.linalg.solve(a, b)

    a = jnp.asarray(matrix)
    # (Compiled once, not op by op: the library traces the same path.)
    got = jax.jit(jax.grad(iterative, argnums=(0, 1)))(a, b)
    want = jax.jit(jax.grad(dense, argnums=(0, 1)))(a, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-8)


def test_gradients_through_jacobi_preconditioned_cg():
    _grad_check(lx.JacobiPreconditioner, lx.CG(rtol=1e-12, atol=1e-12), _spd(6))


def test_gradients_through_block_jacobi_preconditioned_gmres():
    _grad_check(
        lambda op: lx.BlockJacobiPreconditioner(op, 3),
        lx.GMRES(rtol=1e-12, atol=1e-12),
        _nonsymmetric(6),
        tags=(),
    )


#
# Polynomial preconditioners.
#


def _chebyshev_polynomial_dense(matrix, degree, lo, hi):
    """`p(A)` with `1 - λ p(λ) = T_{d+1}((θ - λ)/δ) / T_{d+1}(θ/δ)`, evaluated on the
    eigendecomposition."""
    lam, vecs = np.linalg.eigh(matrix)
    theta, delta = (hi + lo) / 2, (hi - lo) / 2
    coeffs = [0] * (degree + 1) + [1]
    t = np.polynomial.chebyshev.chebval
    p = (1 - t((theta - lam) / delta, coeffs) / t(theta / delta, coeffs)) / lam
    return vecs @ np.diag(p) @ vecs.T


@pytest.mark.parametrize("degree", [0, 1, 5])
def test_chebyshev_is_the_chebyshev_polynomial(degree):
    a = _spd(8)
    lam = np.linalg.eigvalsh(a)
    interval = (0.9 * lam[0], 1.1 * lam[-1])
    precond = lx.ChebyshevPreconditioner(_psd(a), degree, interval)
    reference = _chebyshev_polynomial_dense(a, degree, *interval)
    np.testing.assert_allclose(precond.as_matrix(), reference, rtol=1e-10, atol=1e-14)
    assert lx.is_positive_semidefinite(precond) and lx.is_symmetric(precond)
    # A high degree on an interval holding the spectrum approaches the inverse.
    if degree == 5:
        error = np.linalg.norm(reference @ a - np.eye(8), 2)
        assert error < 0.1


def test_chebyshev_lanczos_interval_holds_the_spectrum():
    a = _poisson_2d(6)
    lam = np.linalg.eigvalsh(a)
    precond = lx.ChebyshevPreconditioner(_psd(a), 3)
    lo, hi = float(precond.lower), float(precond.upper)
    # Ritz values are inner bounds (up to rounding).
    assert lam[0] * (1 - 1e-12) <= lo < hi and lam[-1] <= hi <= 1.2 * lam[-1]
    reference = _chebyshev_polynomial_dense(a, 3, lo, hi)
    np.testing.assert_allclose(precond.as_matrix(), reference, rtol=1e-10, atol=1e-14)
    # Positive definite over the whole spectrum, below `lo` included.
    assert np.linalg.eigvalsh(reference).min() > 0


def test_chebyshev_negative_definite():
    a = -_spd(6)
    operator = lx.MatrixLinearOperator(a, lx.negative_semidefinite_tag)
    precond = lx.ChebyshevPreconditioner(operator, 2)
    assert float(precond.upper) < 0
    assert lx.is_negative_semidefinite(precond)
    assert not lx.is_positive_semidefinite(precond)
    np.testing.assert_array_less(np.linalg.eigvalsh(precond.as_matrix()), 0)


def test_chebyshev_interval_containing_zero_is_a_named_error():
    operator = _psd(_spd(5))
    for interval in ((-1.0, 2.0), (0.0, 3.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="interval"):
            lx.ChebyshevPreconditioner(operator, 2, interval)
    with pytest.raises(ValueError, match="interval"):
        lx.ChebyshevPreconditioner(operator, 2, (1.0,))
    # Not definite: Lanczos cannot provide an interval.
    with pytest.raises(ValueError, match="interval"):
        lx.ChebyshevPreconditioner(lx.MatrixLinearOperator(_nonsymmetric(5)), 2)
    with pytest.raises(ValueError, match="degree"):
        lx.ChebyshevPreconditioner(operator, -1)

    @jax.jit
    def traced(lo):
        precond = lx.ChebyshevPreconditioner(operator, 2, (lo, 3.0))
        return precond.mv(jnp.ones(5))

    traced(1.0)
    # (Blocking: on a GPU the error surfaces when the result is waited for.)
    with pytest.raises(Exception, match="interval"):
        jax.block_until_ready(traced(-1.0))


def test_neumann_is_the_truncated_series():
    a = _spd(6)
    lam_max = np.linalg.eigvalsh(a)[-1]
    for degree, scale in ((0, 0.01), (3, 1 / lam_max), (6, None)):
        precond = lx.NeumannPreconditioner(_psd(a), degree, scale)
        omega = float(precond.scale)
        if scale is not None:
            assert omega == scale
        else:
            assert 0.9 / lam_max < omega <= 1 / lam_max
        step = np.eye(6) - omega * a
        reference = omega * sum(
            np.linalg.matrix_power(step, k) for k in range(degree + 1)
        )
        np.testing.assert_allclose(precond.as_matrix(), reference, rtol=1e-12)
        assert lx.is_positive_semidefinite(precond)


def test_neumann_bad_input():
    operator = _psd(_spd(5))
    with pytest.raises(ValueError, match="scale"):
        lx.NeumannPreconditioner(operator, 2, -0.1)
    with pytest.raises(ValueError, match="scale"):
        lx.NeumannPreconditioner(lx.MatrixLinearOperator(_nonsymmetric(5)), 2)
    in_struct = jax.ShapeDtypeStruct((2, 3), jnp.float64)
    flat = lx.FunctionLinearOperator(lambda x: x.reshape(-1), in_struct)
    with pytest.raises(ValueError, match="structures"):
        lx.NeumannPreconditioner(flat, 2, 1.0)


def test_polynomial_preconditioners_transpose_and_materialise():
    a = _nonsymmetric(6)
    struct = jax.ShapeDtypeStruct((6,), jnp.float64)
    matrix = jnp.asarray(a)
    operator = lx.FunctionLinearOperator(lambda x: matrix @ x, struct)
    lam = np.linalg.eigvals(a).real
    for precond in (
        lx.ChebyshevPreconditioner(operator, 3, (0.5 * lam.min(), 1.5 * lam.max())),
        lx.NeumannPreconditioner(operator, 3, 0.5 / lam.max()),
    ):
        dense = np.asarray(precond.as_matrix())
        np.testing.assert_allclose(precond.T.as_matrix(), dense.T, rtol=1e-12)
        materialised = lx.materialise(precond)
        assert isinstance(materialised, type(precond))
        assert isinstance(materialised.operator, lx.MatrixLinearOperator)
        np.testing.assert_allclose(materialised.as_matrix(), dense, rtol=1e-12)
        assert not lx.is_symmetric(precond)


def test_polynomial_preconditioners_cut_cg_iterations():
    # Each application costs `degree` products, so iteration counts fall by less
    # than the degree: ~(37, 12, 19) on this grid.
    operator = _psd(_poisson_2d(20))
    plain = _cg_steps(operator, None)
    chebyshev = _cg_steps(operator, lx.ChebyshevPreconditioner(operator, 8))
    neumann = _cg_steps(operator, lx.NeumannPreconditioner(operator, 4))
    assert chebyshev < plain / 2.5, (plain, chebyshev)
    assert neumann < plain / 1.5, (plain, neumann)


def test_gradients_through_chebyshev_preconditioned_cg():
    _grad_check(
        lambda op: lx.ChebyshevPreconditioner(op, 3),
        lx.CG(rtol=1e-12, atol=1e-12),
        _spd(6),
    )


def test_gradients_through_neumann_preconditioned_gmres():
    a = _nonsymmetric(6)
    scale = 0.5 / np.abs(np.linalg.eigvals(a)).max()
    _grad_check(
        lambda op: lx.NeumannPreconditioner(op, 2, scale),
        lx.GMRES(rtol=1e-12, atol=1e-12),
        a,
        tags=(),
    )


#
# SSOR.
#


def _ssor_dense(a, omega):
    d = np.diag(np.diag(a)) / omega
    lower = np.tril(a, -1) + d
    upper = np.triu(a, 1) + d
    return (2 - omega) / omega * np.linalg.solve(upper, d @ np.linalg.inv(lower))


@pytest.mark.parametrize("omega", [1.0, 1.5])
def test_ssor_is_the_ssor_inverse(omega):
    a = _nonsymmetric(6)
    precond = lx.SSORPreconditioner(lx.MatrixLinearOperator(a), omega)
    reference = _ssor_dense(a, omega)
    np.testing.assert_allclose(precond.as_matrix(), reference, rtol=1e-10)
    np.testing.assert_allclose(
        precond.T.as_matrix(), _ssor_dense(a.T, omega), rtol=1e-10
    )
    np.testing.assert_allclose(precond.T.as_matrix(), reference.T, rtol=1e-10)
    assert not lx.is_symmetric(precond)


def test_ssor_tags_and_bad_input():
    a = _spd(6)
    precond = lx.SSORPreconditioner(_psd(a), 1.2)
    assert lx.is_positive_semidefinite(precond) and lx.is_symmetric(precond)
    dense = np.asarray(precond.as_matrix())
    np.testing.assert_allclose(dense, dense.T, rtol=1e-10)
    assert np.linalg.eigvalsh(dense).min() > 0
    for omega in (0.0, 2.0, -1.0):
        with pytest.raises(ValueError, match="omega"):
            lx.SSORPreconditioner(_psd(a), omega)
    struct = jax.ShapeDtypeStruct((6,), jnp.float64)
    matrix_free = lx.FunctionLinearOperator(lambda x: jnp.asarray(a) @ x, struct)
    with pytest.raises(ValueError, match="materialise"):
        lx.SSORPreconditioner(matrix_free)


def test_ssor_cuts_cg_iterations_and_gradients():
    operator = _psd(_poisson_2d(20))
    plain = _cg_steps(operator, None)
    ssor = _cg_steps(operator, lx.SSORPreconditioner(operator, 1.5))
    assert ssor < plain / 1.8, (plain, ssor)  # ~(37, 18)
    _grad_check(
        lambda op: lx.SSORPreconditioner(op, 1.3),
        lx.CG(rtol=1e-12, atol=1e-12),
        _spd(6),
    )


#
# Multigrid.
#


def _laplacian(u, h):
    padded = jnp.pad(u, 1)
    neighbours = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    )
    return (4 * u - neighbours) / h**2


def _convection_diffusion(u, h):
    # Upwinded convection to the right: not symmetric.
    padded = jnp.pad(u, 1)
    return _laplacian(u, h) + 20 * (u - padded[:-2, 1:-1]) / h


def _stencil_matrix(stencil, n, h):
    eye = np.eye(n * n).reshape(n * n, n, n)
    return np.asarray(jax.jit(jax.vmap(lambda e: stencil(e, h).reshape(-1)))(eye)).T


# A preconditioner's matrix in one compiled program: eagerly, each operation of a
# multigrid cycle compiles a program of its own (about 80-110 per grid).
_as_matrix = eqx.filter_jit(lambda operator: operator.as_matrix())


def _interpolation_1d(n):
    m = n // 2
    p = np.zeros((n, m))
    for j in range(m):
        p[2 * j + 1, j] = 1
        p[2 * j, j] = 0.5
        if 2 * j + 2 < n:
            p[2 * j + 2, j] = 0.5
    return p


@pytest.mark.parametrize("n", [7, 8])
def test_multigrid_two_grid_is_the_dense_two_grid_cycle(n):
    h = 0.1
    precond = lx.MultigridPreconditioner(
        _laplacian, (n, n), h, dtype=jnp.float64, levels=2, omega=0.8
    )
    a = _stencil_matrix(_laplacian, n, h)
    coarse = _stencil_matrix(_laplacian, n // 2, 2 * h)
    p = np.kron(_interpolation_1d(n), _interpolation_1d(n))
    r = p.T / 4  # full weighting
    smooth = 0.8 * np.diag(1 / np.diag(a))
    # Two Jacobi sweeps from zero, exact coarse correction, two sweeps.
    pre = smooth + smooth @ (np.eye(n * n) - a @ smooth)
    step = np.eye(n * n) - smooth @ a
    correct = np.eye(n * n) - p @ np.linalg.solve(coarse, r @ a)
    cycle = step @ step @ correct @ (np.eye(n * n) - pre @ a)
    reference = (np.eye(n * n) - cycle) @ np.linalg.inv(a)
    np.testing.assert_allclose(_as_matrix(precond), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("smoother", ["jacobi", "chebyshev"])
def test_multigrid_symmetric_positive_definite_for_poisson(smoother):
    n, h = 15, 1 / 16
    precond = lx.MultigridPreconditioner(
        _laplacian,
        (n, n),
        h,
        dtype=jnp.float64,
        tags=lx.positive_semidefinite_tag,
        coarsest_size=16,
        smoother=smoother,
    )
    assert precond.shapes == ((15, 15), (7, 7), (3, 3))
    assert lx.is_positive_semidefinite(precond) and lx.is_symmetric(precond)
    assert precond.T is precond
    b = np.asarray(_as_matrix(precond))
    np.testing.assert_allclose(b, b.T, atol=1e-12 * np.abs(b).max())
    # The V-cycle is a good approximate inverse: BA has spectrum close to 1.
    spectrum = np.linalg.eigvals(b @ _stencil_matrix(_laplacian, n, h)).real
    assert 0.6 < spectrum.min() and spectrum.max() < 1.0 + 1e-8


@eqx.filter_jit
def _preconditioned_and_plain_cg(operator, precond, b):
    solver = lx.CG(rtol=1e-8, atol=0.0)
    sol = lx.linear_solve(operator, b, solver, options={"preconditioner": precond})
    plain = lx.linear_solve(operator, b, solver)
    return sol.value, sol.stats["num_steps"], plain.value, plain.stats["num_steps"]


def test_multigrid_cg_iterations_do_not_grow_with_the_grid():
    steps = []
    for n in (15, 31, 63):
        h = 1 / (n + 1)
        struct = jax.ShapeDtypeStruct((n, n), jnp.float64)
        tags = lx.positive_semidefinite_tag
        operator = lx.FunctionLinearOperator(ft.partial(_laplacian, h=h), struct, tags)
        precond = lx.MultigridPreconditioner(
            _laplacian, (n, n), h, dtype=jnp.float64, tags=tags
        )
        b = jnp.asarray(np.random.default_rng(n).normal(size=(n, n)))
        # One compiled program per grid (eagerly, each operation outside CG's
        # loop compiles on its own, for each grid).
        value, num_steps, plain_value, plain_steps = _preconditioned_and_plain_cg(
            operator, precond, b
        )
        np.testing.assert_allclose(value, plain_value, rtol=1e-6, atol=1e-10)
        steps.append(int(num_steps))
        assert steps[-1] < int(plain_steps) / 5
    assert max(steps) <= 10, steps


def test_multigrid_gmres_convection_diffusion_and_transpose():
    n, h = 15, 1 / 16
    struct = jax.ShapeDtypeStruct((n, n), jnp.float64)
    operator = lx.FunctionLinearOperator(ft.partial(_convection_diffusion, h=h), struct)
    precond = lx.MultigridPreconditioner(
        _convection_diffusion, (n, n), h, dtype=jnp.float64
    )
    assert not lx.is_symmetric(precond)
    dense = np.asarray(_as_matrix(precond))
    np.testing.assert_allclose(_as_matrix(precond.T), dense.T, rtol=1e-9, atol=1e-12)
    b = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
    solver = lx.GMRES(rtol=1e-8, atol=0.0, restart=20)
    sol = lx.linear_solve(operator, b, solver, options={"preconditioner": precond})
    plain = lx.linear_solve(operator, b, solver)
    np.testing.assert_allclose(sol.value, plain.value, rtol=1e-6, atol=1e-10)
    assert int(sol.stats["num_steps"]) < int(plain.stats["num_steps"]) / 3


def test_multigrid_gradients_through_preconditioned_cg():
    n, h = 7, 1 / 8
    precond = lx.MultigridPreconditioner(
        _laplacian, (n, n), h, dtype=jnp.float64, tags=lx.positive_semidefinite_tag
    )
    struct = jax.ShapeDtypeStruct((n, n), jnp.float64)
    operator = lx.FunctionLinearOperator(
        ft.partial(_laplacian, h=h), struct, lx.positive_semidefinite_tag
    )
    w = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)))
    a = jnp.asarray(_stencil_matrix(_laplacian, n, h))

    def iterative(b):
        solver = lx.CG(rtol=1e-12, atol=1e-12)
        options = {"preconditioner": precond}
        return jnp.sum(w * lx.linear_solve(operator, b, solver, options=options).value)

    def dense(b):
        return jnp.sum(w * jnp.linalg.solve(a, b.reshape(-1)).reshape(n, n))

    b = jnp.asarray(np.random.default_rng(2).normal(size=(n, n)))
    np.testing.assert_allclose(
        jax.jit(jax.grad(iterative))(b),
        jax.jit(jax.grad(dense))(b),
        rtol=1e-7,
        atol=1e-10,
    )


def test_multigrid_bad_input():
    def make(**kwargs):
        args: dict[str, Any] = dict(stencil=_laplacian, grid_shape=(8, 8), spacing=0.1)
        return lx.MultigridPreconditioner(**(args | kwargs))

    with pytest.raises(ValueError, match="smoother"):
        make(smoother="gauss-seidel")
    with pytest.raises(ValueError, match="chebyshev"):
        make(smoother="chebyshev")  # no symmetric definite tag
    with pytest.raises(ValueError, match="omega"):
        make(omega=2.5)
    with pytest.raises(ValueError, match="levels"):
        make(levels=6)
    with pytest.raises(ValueError, match="grid_shape"):
        make(grid_shape=(0, 8))
    with pytest.raises(ValueError, match="spacing"):
        make(spacing=(0.1, 0.1, 0.1))
    with pytest.raises(TypeError, match="stencil"):
        make(stencil="laplacian")


def test_cg_refuses_a_preconditioner_known_not_definite():
    # ILU(0)-like nonsymmetric preconditioners, and Jacobi of an operator not tagged
    # definite, carry no definiteness tag, and lineax's preconditioners' tags are
    # complete: CG and MINRES say so at trace time instead of failing at run time.
    matrix = jnp.asarray(np.diag(np.arange(1.0, 5.0)))
    untagged = lx.MatrixLinearOperator(matrix)
    psd = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)
    b = jnp.ones(4)
    for solver in (lx.CG(1e-6, 1e-6), lx.MINRES(1e-6, 1e-6)):
        with pytest.raises(ValueError, match="positive definite `preconditioner`"):
            lx.linear_solve(
                psd,
                b,
                solver,
                options={"preconditioner": lx.JacobiPreconditioner(untagged)},
            )
        solution = lx.linear_solve(
            psd, b, solver, options={"preconditioner": lx.JacobiPreconditioner(psd)}
        )
        np.testing.assert_allclose(solution.value, 1 / np.arange(1.0, 5.0))
