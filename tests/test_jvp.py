"""Forward-mode derivatives of `linear_solve`: each of the paper's equations (1)-(4)
against central finite differences in float64, and higher order; the Krylov
solvers' against the dense derivative."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import case_operator, CASES_BY_NAME, krylov_sample, make_matrix, sample

import lineax as lx


def _random(shape, seed, complex_=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if complex_:
        x = x + 1j * rng.standard_normal(shape)
    return jnp.asarray(x)


# Which equation each case exercises (from the solver's rank flags and shape):
# LU (4); QR tall (2); QR wide (3); SVD (1).
BRANCH_CASES = [
    "lu",
    "qr_tall",
    "qr_wide",
    "svd_tall",
    "svd_rank_deficient",
    "cholesky_pos",
]


@jax.jit
def _pinv_jvp(args, tangents):
    """The reference: the JVP of `jnp.linalg.pinv(A) @ b` (compiled once per shape;
    run op by op, its SVD and their derivatives compiled each operation)."""
    return jax.jvp(lambda a, b: jnp.linalg.pinv(a) @ b, args, tangents)


def _fd_jvp(fn, primals, tangents, eps=1e-6):
    plus = fn(*[p + eps * t for p, t in zip(primals, tangents)])
    minus = fn(*[p - eps * t for p, t in zip(primals, tangents)])
    return (plus - minus) / (2 * eps)


# Each case on one of the two operator kinds, alternating (a fixed-seed slice of
# the two; both with LINEAX_EXHAUSTIVE=1): each differentiates un-jitted solves.
@pytest.mark.parametrize(
    "kind, name",
    [
        (kind, name)
        for i, name in enumerate(BRANCH_CASES)
        for kind in sample(["matrix", "function"], i % 2)
    ],
)
def test_jvp_matches_finite_differences(name, kind):
    case = CASES_BY_NAME[name]
    matrix = jnp.asarray(make_matrix(case.matrix_kind, jnp.float64))
    m, n = matrix.shape
    vector = _random((m,), 1)
    if case.matrix_kind == "rank_deficient":
        # Perturb within the set of rank-2 matrices, where the pseudoinverse is
        # differentiable: A(t) = (B + t dB)(C + t dC).
        b_factor, c_factor = _random((m, 2), 2), _random((2, n), 3)
        db, dc = _random((m, 2), 4), _random((2, n), 5)

        def build(t):
            return (b_factor + t * db) @ (c_factor + t * dc)

        matrix_tangent = db @ c_factor + b_factor @ dc
        matrix = build(0.0)
    else:
        matrix_tangent = _random((m, n), 4)
        if case.tags:  # keep the tagged structure (symmetric here)
            matrix_tangent = matrix_tangent + matrix_tangent.T
    vector_tangent = _random((m,), 6)

    def solve(a, b):
        operator = case_operator(kind, a, case.tags)
        return lx.linear_solve(operator, b, case.solver).value

    _, got = jax.jvp(solve, (matrix, vector), (matrix_tangent, vector_tangent))
    if case.matrix_kind == "rank_deficient":
        fd = _fd_jvp(
            lambda t, b: solve(build(t), b), (0.0, vector), (1.0, vector_tangent)
        )
    else:
        fd = _fd_jvp(solve, (matrix, vector), (matrix_tangent, vector_tangent))
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["lu", "qr_tall", "qr_wide", "svd_rank_deficient"])
def test_jvp_complex(name):
    """Complex operators: compared with the JVP of `jnp.linalg.pinv(A) @ b`."""
    case = CASES_BY_NAME[name]
    matrix = jnp.asarray(make_matrix(case.matrix_kind, jnp.complex128))
    m, n = matrix.shape
    vector = _random((m,), 1, True)
    if case.matrix_kind == "rank_deficient":
        return  # covered by the real test; a generic complex perturbation changes rank
    matrix_tangent = _random((m, n), 2, True)
    vector_tangent = _random((m,), 3, True)

    def solve(a, b):
        return lx.linear_solve(lx.MatrixLinearOperator(a), b, case.solver).value

    got = jax.jvp(solve, (matrix, vector), (matrix_tangent, vector_tangent))[1]
    want = _pinv_jvp((matrix, vector), (matrix_tangent, vector_tangent))[1]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", krylov_sample(0), ids=lambda c: c.name)
def test_krylov_jvp_matches_dense(case):
    """A matrix-free Krylov solve's JVP (a second Krylov solve) against the JVP of
    `jnp.linalg.pinv(A) @ b`."""
    matrix = jnp.asarray(make_matrix(case.matrix_kind, jnp.float64))
    m, n = matrix.shape
    vector = _random((m,), 1)
    matrix_tangent = _random((m, n), 2)
    if case.tags:  # keep the tagged structure (symmetric here)
        matrix_tangent = matrix_tangent + matrix_tangent.T
    vector_tangent = _random((m,), 3)
    solver = case.with_tolerance(1e-13)

    @jax.jit
    def solve(a, b):
        operator = case_operator("function", a, case.tags)
        return lx.linear_solve(operator, b, solver).value

    args, tangents = (matrix, vector), (matrix_tangent, vector_tangent)
    got_primal, got = jax.jvp(solve, args, tangents)
    want_primal, want = _pinv_jvp(args, tangents)
    np.testing.assert_allclose(got_primal, want_primal, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-9)


_REVERSE_CASES = [
    CASES_BY_NAME[name]
    for name in ["lu", "qr_tall", "qr_wide", "svd_rank_deficient_square"]
] + krylov_sample(1)


@pytest.mark.parametrize("case", _REVERSE_CASES, ids=lambda c: c.name)
def test_reverse_agrees_with_forward(case):
    """Reverse mode (a solve with the transposed operator) against forward mode:
    `<u, J t> = <J^T u, t>` for three random pairs of a tangent `t` (of the matrix
    and the vector) and a cotangent `u`, J the solution's Jacobian. (Equal for all
    pairs only if the two Jacobians are equal, up to a set of measure zero; the
    full Jacobians cost one batched solve per entry of the matrix and compile the
    Krylov solves batched, about twice the time.)"""
    matrix = jnp.asarray(make_matrix(case.matrix_kind, jnp.float64))
    vector = _random((matrix.shape[0],), 1)

    def solve(a, b):
        operator = lx.MatrixLinearOperator(a, case.tags)
        return lx.linear_solve(operator, b, case.solver).value

    forward = jax.jit(lambda a, b, ta, tb: jax.jvp(solve, (a, b), (ta, tb))[1])
    reverse = jax.jit(lambda a, b, u: jax.vjp(solve, a, b)[1](u))
    for seed in (2, 3, 4):
        ta, tb = _random(matrix.shape, seed), _random(vector.shape, seed + 10)
        u = _random((matrix.shape[1],), seed + 20)
        jt = forward(matrix, vector, ta, tb)
        ja, jb = reverse(matrix, vector, u)
        lhs = float(jnp.vdot(u, jt))
        rhs = float(jnp.vdot(ja, ta) + jnp.vdot(jb, tb))
        scale = float(jnp.linalg.norm(u) * jnp.linalg.norm(jt)) + 1
        np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-9 * scale)


def test_higher_order():
    """jvp of jvp, grad of grad and hessian, against the dense reference."""
    matrix = jnp.asarray(make_matrix("square", jnp.float64))
    vector = _random((5,), 1)

    def ours(a):
        return jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), vector).value ** 2)

    def reference(a):
        return jnp.sum(jnp.linalg.solve(a, vector) ** 2)

    tangent = _random((5, 5), 2)

    def jvp_jvp(f):
        g = lambda a: jax.jvp(f, (a,), (tangent,))[1]
        return jax.jvp(g, (matrix,), (tangent,))[1]

    def grad_grad(f):
        return jax.grad(lambda a: jnp.sum(jax.grad(f)(a) ** 2))(matrix)

    # One compiled program for all of them, not one per operation run eagerly (the
    # first-order tests above differentiate un-jitted solves).
    derivatives = jax.jit(
        lambda: (
            [jvp_jvp(f) for f in (ours, reference)],
            [grad_grad(f) for f in (ours, reference)],
            [jax.hessian(f)(matrix) for f in (ours, reference)],
        )
    )
    (got, want), (got2, want2), (hess, hess_ref) = derivatives()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(got2, want2, rtol=1e-8)
    np.testing.assert_allclose(hess, hess_ref, rtol=1e-8, atol=1e-10)


def test_least_squares_hessian():
    """Second derivatives of a least-squares solve (equation (2) differentiated
    again) against finite differences of the first derivative."""
    matrix = jnp.asarray(make_matrix("tall", jnp.float64))
    vector = _random((7,), 1)

    def loss(a):
        x = lx.linear_solve(lx.MatrixLinearOperator(a), vector, lx.QR()).value
        return jnp.sum(jnp.sin(x))

    tangent = _random(matrix.shape, 2)
    hvp = jax.jit(lambda a, t: jax.jvp(jax.grad(loss), (a,), (t,))[1])(matrix, tangent)
    fd = _fd_jvp(jax.jit(jax.grad(loss)), (matrix,), (tangent,), eps=1e-5)
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-7)


def test_pytree_operator_gradient():
    """Gradients flow to every leaf of a PyTree operator and of a PyTree vector."""
    matrix = jnp.asarray(make_matrix("square", jnp.float64))
    operator = case_operator("pytree", matrix)
    vector = jax.tree_util.tree_map(jnp.ones_like, operator.out_structure())

    def loss(op, vec):
        sol = lx.linear_solve(op, vec).value
        return sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(sol))

    grads = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))(operator, vector)

    def dense_loss(a, b):
        return jnp.sum(jnp.linalg.solve(a, b) ** 2)

    flat_b = jnp.concatenate(
        [jnp.reshape(x, -1) for x in jax.tree_util.tree_leaves(vector)]
    )
    dense_grads = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(matrix, flat_b)
    got_b = jnp.concatenate(
        [jnp.reshape(x, -1) for x in jax.tree_util.tree_leaves(grads[1])]
    )
    np.testing.assert_allclose(got_b, dense_grads[1], rtol=1e-9)
    got_a = lx.PyTreeLinearOperator(
        grads[0].pytree, operator.out_structure()
    ).as_matrix()
    np.testing.assert_allclose(got_a, dense_grads[0], rtol=1e-9, atol=1e-12)


# A matrix tagged diagonal, tridiagonal, triangular or definite, differentiated with
# respect to all its entries: `lx.Diagonal`, `lx.Tridiagonal` and `lx.Triangular` read
# only those entries (not the diagonal under `unit_diagonal_tag`), `lx.Cholesky` only
# the symmetric part, so the solution (and its finite differences) ignores the rest,
# and so must the derivative. It used `V x` for the whole tangent `V`. `LU` reads the
# whole matrix, and gets the whole tangent.
_BANDED_CASES = {
    "diagonal": (lx.diagonal_tag, lambda a: np.diag(np.diag(a))),
    "tridiagonal": (lx.tridiagonal_tag, lambda a: np.triu(np.tril(a, 1), -1)),
    "lower": (lx.lower_triangular_tag, np.tril),
    "upper_unit": (
        (lx.upper_triangular_tag, lx.unit_diagonal_tag),
        lambda a: np.triu(a, 1) + np.eye(4),
    ),
    "negative_definite": (lx.negative_semidefinite_tag, lambda a: -a @ a.T),
}


@pytest.mark.parametrize(
    "case, solver",
    [
        ("diagonal", lx.AutoLinearSolver(well_posed=True)),
        ("diagonal", lx.AutoLinearSolver(well_posed=False)),
        ("tridiagonal", lx.Tridiagonal()),
        ("tridiagonal", lx.LU()),
        ("lower", lx.AutoLinearSolver(well_posed=None)),
        ("upper_unit", lx.Triangular()),
        ("negative_definite", lx.AutoLinearSolver(well_posed=True)),
    ],
)
def test_jvp_of_banded_solve_ignores_off_band_tangent(case, solver):
    tag, keep = _BANDED_CASES[case]
    matrix = keep(np.asarray(_random((4, 4), 20)))
    shift = -4 if case == "negative_definite" else 4
    matrix = jnp.asarray(matrix + shift * np.eye(4))
    tangent = _random((4, 4), 21)
    vector = _random((4,), 22)

    def solve(a):
        return lx.linear_solve(lx.MatrixLinearOperator(a, tag), vector, solver).value

    expected = _fd_jvp(solve, (matrix,), (tangent,))
    _, got = jax.jvp(solve, (matrix,), (tangent,))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    grad = jax.grad(lambda a: jnp.sum(solve(a)))(matrix)
    np.testing.assert_allclose(jnp.sum(grad * tangent), jnp.sum(expected), rtol=1e-6)
