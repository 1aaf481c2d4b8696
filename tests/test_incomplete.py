"""The incomplete factorisations IC(0) and ILU(0): each is the claimed operator
(against float64 NumPy implementations of the textbook algorithms), exact where the
exact factors fit the pattern, has the tags it claims, transposes, reports a
breakdown, cuts Krylov iteration counts, and leaves gradients through a
preconditioned solve equal to the dense ones."""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import raises_message
from helpers import sample
from jax.experimental import sparse as jsparse

import lineax as lx


#
# NumPy references: the textbook algorithms, entry by entry.
#


def _ilu0(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ILU(0), Saad's Algorithm 10.4 (IKJ), on the pattern of `a` plus diagonal."""
    a = a.copy()
    n = len(a)
    pattern = a != 0
    np.fill_diagonal(pattern, True)
    for i in range(1, n):
        for k in range(i):
            if pattern[i, k]:
                a[i, k] /= a[k, k]
                for j in range(k + 1, n):
                    if pattern[i, j]:
                        a[i, j] -= a[i, k] * a[k, j]
    return np.tril(a, -1) + np.eye(n), np.triu(a)


def _ic0(a: np.ndarray) -> np.ndarray:
    """IC(0), right-looking, on the pattern of the lower triangle of `a`."""
    n = len(a)
    pattern = np.tril(a != 0)
    np.fill_diagonal(pattern, True)
    lower = np.tril(a).astype(a.dtype)
    for k in range(n):
        lower[k, k] = np.sqrt(lower[k, k])
        for i in range(k + 1, n):
            if pattern[i, k]:
                lower[i, k] /= lower[k, k]
        for j in range(k + 1, n):
            for i in range(j, n):
                if pattern[i, j]:
                    lower[i, j] -= lower[i, k] * np.conj(lower[j, k])
    return lower


#
# Problems.
#


def _poisson_2d(m: int) -> sp.csr_matrix:
    t = sp.csr_matrix(2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1))
    eye = sp.eye_array(m)
    return sp.csr_matrix(sp.kron(t, eye) + sp.kron(eye, t))


def _convection_diffusion(m: int, wind: float) -> sp.csr_matrix:
    """`-Δu + wind·(∂x + ∂y) u` on an m × m grid, central differences (times h²)."""
    h = 1 / (m + 1)
    c = sp.csr_matrix(np.eye(m, k=1) - np.eye(m, k=-1))
    eye = sp.eye_array(m)
    return _poisson_2d(m) + sp.csr_matrix(
        wind * h / 2 * (sp.kron(c, eye) + sp.kron(eye, c))
    )


def _random_sparse(n: int, seed: int, symmetric: bool) -> np.ndarray:
    a = sp.random_array((n, n), density=0.25, rng=seed).toarray()
    if symmetric:
        a = a + a.T
    return a + n / 2 * np.eye(n)


def _sparse(matrix, *tags) -> lx.SparseLinearOperator:
    return lx.SparseLinearOperator(sp.csr_matrix(matrix), tags)


def _close(actual, desired):
    np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-14)


def _inverse_agrees_on_pattern(precond, matrix):
    """`P⁻¹ = LU` (or `L D Lᵀ`) equals the matrix on its pattern: the defining
    property of a zero-fill factorisation."""
    inverse = np.linalg.inv(np.asarray(precond.as_matrix()))
    on = (matrix != 0) | np.eye(len(matrix), dtype=bool)
    np.testing.assert_allclose(inverse[on], matrix[on], rtol=1e-10, atol=1e-10)


#
# The claimed operator.
#


# One of the two random patterns (a fixed-seed slice; both with
# LINEAX_EXHAUSTIVE=1): each compiles the factorisation of its own pattern.
@pytest.mark.parametrize("seed", sample([0, 1]))
def test_ilu_equals_numpy_ilu0_and_transposes(seed):
    a = _random_sparse(14, seed, symmetric=False)
    lower, upper = _ilu0(a)
    reference = np.linalg.inv(upper) @ np.linalg.inv(lower)
    precond = lx.ILUPreconditioner(_sparse(a))
    _close(precond.as_matrix(), reference)
    np.testing.assert_allclose(
        precond.transpose().as_matrix(), reference.T, rtol=1e-12, atol=1e-14
    )
    assert not bool(precond.breakdown)
    assert precond.tags == frozenset()


def test_ilu_of_bcoo_with_duplicates_unsorted_and_padding():
    a = _random_sparse(9, 2, symmetric=False)
    rows, cols = np.nonzero(a)
    values = a[rows, cols]
    # Split every entry into two stored halves, shuffle, and pad with an
    # out-of-range entry, as BCOO arithmetic produces.
    order = np.random.default_rng(0).permutation(2 * len(rows))
    indices = np.concatenate([np.stack([rows, cols], 1)] * 2)[order]
    data = np.concatenate([values / 2, values / 2])[order]
    indices = np.concatenate([indices, [[9, 9]]])
    data = np.concatenate([data, [123.0]])
    bcoo = jsparse.BCOO((jnp.asarray(data), jnp.asarray(indices)), shape=(9, 9))
    precond = lx.ILUPreconditioner(lx.SparseLinearOperator(bcoo))
    lower, upper = _ilu0(a)
    reference = np.linalg.inv(upper) @ np.linalg.inv(lower)
    _close(precond.as_matrix(), reference)


def test_ic_equals_numpy_ic0_and_reads_the_lower_triangle():
    a = _random_sparse(15, 3, symmetric=True)
    factor = _ic0(a)
    reference = np.linalg.inv(factor @ factor.T)
    for stored in (a, np.tril(a)):
        operator = _sparse(stored, lx.positive_semidefinite_tag)
        precond = lx.IncompleteCholeskyPreconditioner(operator)
        _close(precond.as_matrix(), reference)
        _close(precond.T.as_matrix(), reference)
        assert lx.is_positive_semidefinite(precond) and lx.is_symmetric(precond)
    indefinite = lx.IncompleteCholeskyPreconditioner(_sparse(a, lx.symmetric_tag))
    assert lx.is_symmetric(indefinite)
    assert not lx.is_positive_semidefinite(indefinite)


def test_ic_of_hermitian_complex_matrix():
    real = _random_sparse(8, 4, symmetric=True)
    skew = np.triu(real != 0, 1) * np.random.default_rng(1).normal(size=real.shape)
    a = real + 1j * (skew - skew.T)
    factor = _ic0(a)
    reference = np.linalg.inv(factor @ factor.conj().T)
    operator = _sparse(a, lx.positive_semidefinite_tag)
    precond = lx.IncompleteCholeskyPreconditioner(operator)
    _close(precond.as_matrix(), reference)
    _close(precond.T.as_matrix(), reference.T)


def test_exact_where_the_factors_fit_the_pattern():
    # Tridiagonal: the exact LU and Cholesky factors have no fill.
    dense = 3 * np.eye(10) - np.eye(10, k=-1) - 1.5 * np.eye(10, k=1)
    ilu = lx.ILUPreconditioner(_sparse(dense))
    np.testing.assert_allclose(ilu.as_matrix(), np.linalg.inv(dense), rtol=1e-12)
    spd = (dense + dense.T) / 2
    ic = lx.IncompleteCholeskyPreconditioner(_sparse(spd, lx.positive_semidefinite_tag))
    np.testing.assert_allclose(ic.as_matrix(), np.linalg.inv(spd), rtol=1e-12)
    # 2-D Poisson: fill is dropped, but the product of the factors still equals
    # the matrix on its pattern.
    poisson = _poisson_2d(5).toarray()
    _inverse_agrees_on_pattern(lx.ILUPreconditioner(_sparse(poisson)), poisson)
    _inverse_agrees_on_pattern(
        lx.IncompleteCholeskyPreconditioner(
            _sparse(poisson, lx.positive_semidefinite_tag)
        ),
        poisson,
    )


#
# Breakdown and bad input.
#


def test_breakdown_applies_as_nan_and_a_shift_recovers():
    # Kershaw's matrix: positive definite, not an M-matrix, IC(0) meets a negative
    # pivot.
    kershaw = np.array([[3.0, -2, 0, 2], [-2, 3, -2, 0], [0, -2, 3, -2], [2, 0, -2, 3]])
    operator = _sparse(kershaw, lx.positive_semidefinite_tag)
    b = jnp.ones(4)
    solver = lx.CG(rtol=1e-10, atol=1e-10)
    broken = lx.IncompleteCholeskyPreconditioner(operator)
    assert bool(broken.breakdown)
    assert np.all(np.isnan(broken.mv(b)))
    sol = lx.linear_solve(
        operator, b, solver, options={"preconditioner": broken}, throw=False
    )
    assert sol.result != lx.RESULTS.successful
    shifted = lx.IncompleteCholeskyPreconditioner(operator, shift=0.5)
    assert not bool(shifted.breakdown)
    sol = lx.linear_solve(operator, b, solver, options={"preconditioner": shifted})
    np.testing.assert_allclose(sol.value, np.linalg.solve(kershaw, np.ones(4)))
    # A zero pivot in ILU(0).
    swap = lx.ILUPreconditioner(_sparse(np.array([[0.0, 1.0], [1.0, 0.0]])))
    assert bool(swap.breakdown)
    assert np.all(np.isnan(swap.mv(jnp.ones(2))))


def test_bad_input_is_a_named_error():
    dense = lx.MatrixLinearOperator(jnp.eye(3), lx.positive_semidefinite_tag)
    for cls in (lx.ILUPreconditioner, lx.IncompleteCholeskyPreconditioner):
        with pytest.raises(TypeError, match="SparseLinearOperator"):
            cls(dense)
        # (An array is not an operator: under the test run's type checking the
        # signature's check comes first; `.ci/run` checks the message without it.)
        with raises_message(TypeError, "SparseLinearOperator"):
            cls(np.eye(3))  # pyright: ignore[reportArgumentType]
        # (A symmetric tag on a rectangular operator is refused when it is built.)
        with pytest.raises(ValueError, match="square"):
            cls(
                lx.SparseLinearOperator(
                    sp.csr_matrix(np.ones((2, 3))), lx.symmetric_tag
                )
            )
        with pytest.raises(ValueError, match="square"):
            lx.ILUPreconditioner(
                lx.SparseLinearOperator(sp.csr_matrix(np.ones((2, 3))))
            )
        with pytest.raises(ValueError, match="shift"):
            cls(_sparse(np.eye(3), lx.positive_semidefinite_tag), shift=-1.0)
    with pytest.raises(ValueError, match="symmetric"):
        lx.IncompleteCholeskyPreconditioner(_sparse(np.eye(3)))
    traced = jax.jit(lambda op: lx.ILUPreconditioner(op).breakdown)
    with pytest.raises(ValueError, match="concrete"):
        traced(_sparse(np.eye(3)))


def test_tagged_sparse_operator_is_accepted():
    a = _poisson_2d(3).toarray()
    tagged = lx.TaggedLinearOperator(_sparse(a), lx.positive_semidefinite_tag)
    precond = lx.IncompleteCholeskyPreconditioner(tagged)
    assert lx.is_positive_semidefinite(precond)
    _inverse_agrees_on_pattern(precond, a)


#
# Transformations over the values.
#


def _from_values(matrix: sp.csr_matrix, *tags):
    """A function of the stored values giving the sparse operator, with the index
    arrays closed over (concrete under `jit`)."""
    indices, indptr = jnp.asarray(matrix.indices), jnp.asarray(matrix.indptr)
    n = len(matrix.indptr) - 1

    def make(data):
        bcsr = jsparse.BCSR((data, indices, indptr), shape=(n, n))
        return lx.SparseLinearOperator(bcsr, tags)

    return make, jnp.asarray(matrix.data)


def test_jit_and_vmap_over_values():
    make, data = _from_values(_convection_diffusion(4, 30.0))
    b = jnp.arange(1.0, 17.0)

    def apply(data):
        return lx.ILUPreconditioner(make(data)).mv(b)

    eager = apply(data)
    np.testing.assert_allclose(jax.jit(apply)(data), eager, rtol=1e-14)
    # ILU(0) of cA is (L)(cU): P(cA) = P(A)/c.
    scales = jnp.array([1.0, 2.0, 0.5])
    batched = jax.vmap(apply)(scales[:, None] * data[None])
    np.testing.assert_allclose(batched, eager[None] / scales[:, None], rtol=1e-13)


@pytest.mark.parametrize(
    "precond, tags",
    [
        (lx.ILUPreconditioner, ()),
        (lx.IncompleteCholeskyPreconditioner, (lx.positive_semidefinite_tag,)),
    ],
    ids=["ilu", "ic"],
)
def test_eager_construction_is_one_compiled_function(precond, tags):
    # Built un-jitted (a script, a notebook), the construction ran operation by
    # operation: 47 (ILU) and 43 (IC) small XLA programs compiled for each new
    # size of pattern, 1-1.5 s (CPU). It is now one program per shape, which a new
    # matrix of that shape (or a new shift) only dispatches, and its factors are
    # those of a construction inside `jit`, bit for bit.
    make, data = _from_values(_poisson_2d(4), *tags)
    operators = [make(data), make(2 * data + 1)]
    jax.clear_caches()
    compiles = []

    # Counted as programs lowered, not XLA compiles: the run's persistent
    # compilation cache (conftest) serves a program another test compiled without
    # a compile event.
    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = precond(operators[0])
        first_compiles = len(compiles)
        second = precond(operators[1], shift=0.25)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first_compiles == 1
    assert len(compiles) == first_compiles
    jitted = jax.jit(lambda data, shift: precond(make(data), shift=shift))
    for eager, values, shift in ((first, data, 0.0), (second, 2 * data + 1, 0.25)):
        for got, want in zip(
            jax.tree_util.tree_leaves(eager),
            jax.tree_util.tree_leaves(jitted(values, shift)),
        ):
            np.testing.assert_array_equal(got, want)


#
# Iteration counts and gradients.
#


@ft.cache
def _steps_fn(solver):
    @jax.jit
    def run(operator, vector, precond):
        options = {} if precond is None else {"preconditioner": precond}
        sol = lx.linear_solve(operator, vector, solver, options=options, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    return run


def _steps(solver, operator, precond):
    b = jnp.asarray(np.random.default_rng(0).normal(size=operator.out_size()))
    value, result, steps = _steps_fn(solver)(operator, b, precond)
    assert result == lx.RESULTS.successful
    residual = operator.mv(value) - b
    assert np.linalg.norm(residual) <= 1e-6 * np.linalg.norm(b)
    return int(steps)


def test_ic_cuts_cg_iterations_on_poisson():
    operator = lx.SparseLinearOperator(_poisson_2d(16), lx.positive_semidefinite_tag)
    solver = lx.CG(rtol=1e-8, atol=0.0, max_steps=1000)
    plain = _steps(solver, operator, None)
    ic = _steps(solver, operator, lx.IncompleteCholeskyPreconditioner(operator))
    assert ic * 2 <= plain, (plain, ic)


def test_ilu_cuts_gmres_iterations_on_convection_diffusion():
    operator = lx.SparseLinearOperator(_convection_diffusion(16, 100.0))
    solver = lx.GMRES(rtol=1e-8, atol=0.0, restart=20, max_steps=2000)
    plain = _steps(solver, operator, None)
    ilu = _steps(solver, operator, lx.ILUPreconditioner(operator))
    assert ilu * 3 <= plain, (plain, ilu)


@pytest.mark.parametrize(
    "make_precond, solver, symmetric",
    [
        (lx.IncompleteCholeskyPreconditioner, lx.CG(rtol=1e-12, atol=1e-12), True),
        (lx.ILUPreconditioner, lx.GMRES(rtol=1e-12, atol=1e-12), False),
    ],
    ids=["ic-cg", "ilu-gmres"],
)
def test_gradients_through_preconditioned_solve(make_precond, solver, symmetric):
    matrix = _poisson_2d(3) if symmetric else _convection_diffusion(3, 40.0)
    tags = (lx.positive_semidefinite_tag,) if symmetric else ()
    make, data = _from_values(matrix, *tags)
    rng = np.random.default_rng(7)
    b = jnp.asarray(rng.normal(size=9))
    w = jnp.asarray(rng.normal(size=9))

    def iterative(data, b):
        operator = make(data)
        options = {"preconditioner": make_precond(operator)}
        return w @ lx.linear_solve(operator, b, solver, options=options).value

    def dense(data, b):
        return w @ jnp.linalg.solve(make(data).as_matrix(), b)

    got = jax.jit(jax.grad(iterative, argnums=(0, 1)))(data, b)
    want = jax.jit(jax.grad(dense, argnums=(0, 1)))(data, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-10)
