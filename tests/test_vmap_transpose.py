"""`vmap` of solves and of their derivatives; reverse mode reusing the factorisation;
user-defined operators and solvers differentiating with no derivative code."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    CASES_BY_NAME,
    DelegatingLU,
    KRYLOV_CASES,
    krylov_sample,
    make_matrix,
)
from jaxtyping import Array, Float

import lineax as lx


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _solve(solver, tags=()):
    def solve(a, b):
        return lx.linear_solve(lx.MatrixLinearOperator(a, tags), b, solver).value

    return solve


_VMAP_CASES = [
    CASES_BY_NAME[name] for name in ["lu", "qr_tall", "svd_rank_deficient"]
] + krylov_sample(2)


@pytest.mark.parametrize("case", _VMAP_CASES, ids=lambda c: c.name)
def test_vmap_matches_loop(case):
    # Compiled: each batching below is one compilation (op-by-op dispatch is slower).
    solve = jax.jit(_solve(case.solver, case.tags))
    # A Krylov solve stops at its tolerance, after a number of steps that batching
    # may change.
    atol = 1e-8 if case in KRYLOV_CASES else 1e-12
    base = jnp.asarray(make_matrix(case.matrix_kind, jnp.float64))
    m, n = base.shape
    matrices = jnp.stack([base + 0.1 * i * jnp.eye(m, n) for i in range(3)])
    vectors = _random((3, m), 1)
    loop = jnp.stack([solve(a, b) for a, b in zip(matrices, vectors)])
    # Batched over the operator, the vector, both, and both with the batch
    # dimension in another position.
    np.testing.assert_allclose(
        jax.jit(jax.vmap(solve))(matrices, vectors), loop, atol=atol
    )
    np.testing.assert_allclose(
        jax.jit(jax.vmap(solve, in_axes=(None, 0)))(base, vectors),
        jnp.stack([solve(base, b) for b in vectors]),
        atol=atol,
    )
    if case in KRYLOV_CASES:
        return  # the other batchings go through the same batched solve
    np.testing.assert_allclose(
        jax.jit(jax.vmap(solve, in_axes=(0, None)))(matrices, vectors[0]),
        jnp.stack([solve(a, vectors[0]) for a in matrices]),
        atol=atol,
    )
    np.testing.assert_allclose(
        jax.jit(jax.vmap(solve, in_axes=(2, 1), out_axes=1))(
            jnp.moveaxis(matrices, 0, 2), vectors.T
        ),
        loop.T,
        atol=atol,
    )


def test_vmap_of_vmap_and_of_derivatives():
    solve = _solve(lx.LU())
    base = jnp.asarray(make_matrix("square", jnp.float64))
    matrices = jnp.stack(
        [
            jnp.stack([base + (i + 2 * j) * jnp.eye(5) for i in range(2)])
            for j in range(3)
        ]
    )
    vectors = _random((3, 2, 5), 1)
    # (Each transformation compiled once, not op by op: the library traces the same
    # path either way.)
    got = jax.jit(jax.vmap(jax.vmap(solve)))(matrices, vectors)
    want = jnp.linalg.solve(matrices, vectors[..., None])[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-12)

    tangents = _random((3, 5, 5), 2)
    flat_m = matrices[:, 0]
    flat_v = vectors[:, 0]

    def jvp(a, b, t):
        return jax.jvp(solve, (a, b), (t, jnp.zeros_like(b)))[1]

    def jvp_ref(a, b, t):
        return jax.jvp(lambda a: jnp.linalg.solve(a, b), (a,), (t,))[1]

    np.testing.assert_allclose(
        jax.jit(jax.vmap(jvp))(flat_m, flat_v, tangents),
        jax.jit(jax.vmap(jvp_ref))(flat_m, flat_v, tangents),
        rtol=1e-9,
    )
    grad = jax.jit(jax.vmap(jax.grad(lambda a, b: jnp.sum(solve(a, b) ** 2))))
    grad_ref = jax.jit(
        jax.vmap(jax.grad(lambda a, b: jnp.sum(jnp.linalg.solve(a, b) ** 2)))
    )
    np.testing.assert_allclose(
        grad(flat_m, flat_v), grad_ref(flat_m, flat_v), rtol=1e-9
    )
    # grad of vmap
    loss = lambda a: jnp.sum(jax.vmap(solve, in_axes=(None, 0))(a, flat_v) ** 2)
    loss_ref = lambda a: jnp.sum(jnp.linalg.solve(a, flat_v.T) ** 2)
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(base), jax.jit(jax.grad(loss_ref))(base), rtol=1e-9
    )


class _CountingLU(DelegatingLU):
    """LU, counting (at trace time) how often it factorises."""

    counter: list = eqx.field(static=True)

    def init(self, operator, options):
        self.counter.append(1)
        return lx.LU().init(operator, options)


def test_reverse_mode_does_not_factorise_again():
    counter: list = []
    solver = _CountingLU(counter)
    matrix = jnp.asarray(make_matrix("square", jnp.float64))
    vector = _random((5,), 1)

    def loss(a, b):
        return jnp.sum(
            lx.linear_solve(lx.MatrixLinearOperator(a), b, solver).value ** 2
        )

    grads = jax.grad(loss, argnums=(0, 1))(matrix, vector)
    assert len(counter) == 1
    ref = jax.grad(lambda a, b: jnp.sum(jnp.linalg.solve(a, b) ** 2), argnums=(0, 1))(
        matrix, vector
    )
    np.testing.assert_allclose(grads[0], ref[0], rtol=1e-9)
    np.testing.assert_allclose(grads[1], ref[1], rtol=1e-9)


class UserOperator(lx.AbstractLinearOperator):
    """A user's operator: `x -> a * x + b * roll(x)` on 1-D vectors, implementing
    only the five abstract methods, with no predicates registered."""

    a: Float[Array, ""]
    b: Float[Array, ""]
    size: int = eqx.field(static=True)
    transposed: bool = eqx.field(static=True, default=False)

    def mv(self, vector):
        shift = -1 if self.transposed else 1
        return self.a * vector + self.b * jnp.roll(vector, shift)

    def as_matrix(self):
        return jax.vmap(self.mv, out_axes=1)(jnp.eye(self.size, dtype=self.a.dtype))

    def transpose(self):
        return UserOperator(self.a, self.b, self.size, not self.transposed)

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.size,), self.a.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.size,), self.a.dtype)


class UserSolverState(eqx.Module):
    inverse: Array


class UserSolver(lx.AbstractLinearSolver[UserSolverState]):
    """A user's solver: explicit matrix inverse, using the paper's form of the rank
    flags."""

    def init(self, operator, options):
        return UserSolverState(jnp.linalg.inv(operator.as_matrix()))

    def compute(self, state, vector, options):
        return state.inverse @ vector, lx.RESULTS.successful, {}

    def transpose(self, state, options):
        return UserSolverState(state.inverse.T), options

    def conj(self, state, options):
        return UserSolverState(jnp.conj(state.inverse)), options

    def allow_dependent_rows(self, operator):
        return False

    def allow_dependent_columns(self, operator):
        return False


@pytest.mark.parametrize(
    "solver", [UserSolver(), lx.AutoLinearSolver(well_posed=True), lx.SVD()]
)
def test_user_operator_and_solver_gradients(solver):
    operator = UserOperator(jnp.array(3.0), jnp.array(0.5), 6)
    assert not lx.is_symmetric(operator) and not lx.is_positive_semidefinite(operator)
    vector = _random((6,), 1)

    def loss(a, b, vec):
        op = UserOperator(a, b, 6)
        return jnp.sum(jnp.sin(lx.linear_solve(op, vec, solver).value))

    def loss_ref(a, b, vec):
        return jnp.sum(
            jnp.sin(jnp.linalg.solve(UserOperator(a, b, 6).as_matrix(), vec))
        )

    args = (jnp.array(3.0), jnp.array(0.5), vector)
    got = jax.grad(loss, argnums=(0, 1, 2))(*args)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9)
    got_fwd = jax.jacfwd(loss, argnums=(0, 1))(*args)
    for g, w in zip(got_fwd, want[:2]):
        np.testing.assert_allclose(g, w, rtol=1e-9)


def test_solver_without_rank_flags_errors_clearly():
    class NoFlags(lx.AbstractLinearSolver):
        def init(self, operator, options):
            return None

        def compute(self, state, vector, options):
            return vector, lx.RESULTS.successful, {}

        def transpose(self, state, options):
            return state, options

        def conj(self, state, options):
            return state, options

    operator = lx.MatrixLinearOperator(jnp.eye(2))
    with pytest.raises(NotImplementedError, match="assume_full_rank"):
        jax.jvp(
            lambda b: lx.linear_solve(operator, b, NoFlags()).value,
            (jnp.ones(2),),
            (jnp.ones(2),),
        )


def test_state_passes_through_while_loop_and_stop_gradient():
    """The pattern of client libraries: init once, reuse the state in a loop."""
    matrix = jnp.asarray(make_matrix("square", jnp.float64))
    operator = lx.MatrixLinearOperator(matrix)
    solver = lx.LU()
    state = jax.lax.stop_gradient(solver.init(operator, {}))
    dynamic, static = eqx.partition(state, eqx.is_array)

    def body(carry):
        i, x, dyn = carry
        st = eqx.combine(dyn, static)
        sol = lx.linear_solve(operator, x, solver, state=st, throw=False)
        return i + 1, sol.value, dyn

    _, x, _ = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.ones(5), dynamic))
    inv = np.linalg.inv(matrix)
    np.testing.assert_allclose(x, inv @ inv @ inv @ np.ones(5), rtol=1e-9)
