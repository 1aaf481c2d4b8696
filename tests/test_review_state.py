"""Review of reusing solver state: `state = solver.init(operator, options)` then
`linear_solve(operator, b, solver, state=state)`, and `Solution.state`.

Reviewed (float64 central finite differences and NumPy as references): `jax.grad`
and `jax.jacfwd` with respect to the operator and the vector with the state made
outside the differentiated function and inside it (from the traced operator),
`jvp` of `jvp`, `vmap` of `jvp`, for LU, QR, SVD, Cholesky, Diagonal,
Triangular, Tridiagonal, `AutoLinearSolver`, CG, GMRES, BiCGStab, LSMR and
`Normal(CG)`; `jit` with the state as an argument and closed over,
`eqx.filter_jit`, `lax.scan` over right-hand sides, `vmap` of batched states
with an unbatched operator and the reverse, `eqx.tree_serialise_leaves`,
`Solution.state` reused, complex operators, tall and wide operators, PyTree
operators, and the result codes of singular and non-finite problems (the same
with and without `state=`). All of these were right.

The defects found (each test says which fails before its fix):

- A Krylov solver's state holds its operator: the state of `op * 2.0` (a Python
  float) was refused as "`state` does not match" for `op * t` with `t` traced
  by `jit` or `jax.grad`, and a state made under `jit` for the eager
  `op * 2.0` (GMRES, BiCGStab, LSMR, `Normal`; lineax 0.1.1 solves with it).
- The state of `AutoLinearSolver(well_posed=False)` (SVD: the pseudoinverse)
  was accepted by `AutoLinearSolver(well_posed=True or None)`, whose JVP then
  assumed full rank: at a rank-deficient operator a silently wrong derivative
  (error 0.7 against 1e-10), from a primal solve that raised nothing (so does
  lineax 0.1.1). It is now a `ValueError` naming `state`.
"""

import io
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from conftest import EXHAUSTIVE
from helpers import central_differences
from jaxtyping import Array, Float, jaxtyped

import lineax as lx


N = 4
_RNG = np.random.default_rng(20261129)
_A = _RNG.normal(size=(N, N)) + N * np.eye(N)
_S = _A @ _A.T + np.eye(N)
_B = _RNG.normal(size=N)
_W = _RNG.normal(size=N)
_PSD = (lx.positive_semidefinite_tag,)
_KRYLOV: dict[str, Any] = dict(rtol=1e-12, atol=1e-12, max_steps=100)

# (solver, the matrix it solves, its tags).
CASES = {
    "LU": (lx.LU(), _A, ()),
    "QR": (lx.QR(), _A, ()),
    "SVD": (lx.SVD(), _A, ()),
    "Cholesky": (lx.Cholesky(), _S, _PSD),
    "Diagonal": (lx.Diagonal(), np.diag(np.diag(_A)), (lx.diagonal_tag,)),
    "Triangular": (lx.Triangular(), np.tril(_A), (lx.lower_triangular_tag,)),
    "Tridiagonal": (
        lx.Tridiagonal(),
        np.triu(np.tril(_A, 1), -1),
        (lx.tridiagonal_tag,),
    ),
    "Auto": (lx.AutoLinearSolver(well_posed=True), _A, ()),
    "AutoPSD": (lx.AutoLinearSolver(well_posed=True), _S, _PSD),
    "AutoNone": (lx.AutoLinearSolver(well_posed=None), _A, ()),
    "CG": (lx.CG(**_KRYLOV), _S, _PSD),
    "GMRES": (lx.GMRES(**_KRYLOV), _A, ()),
    "BiCGStab": (lx.BiCGStab(**_KRYLOV), _A, ()),
    "LSMR": (lx.LSMR(**_KRYLOV), _A, ()),
    "NormalCG": (lx.Normal(lx.CG(**_KRYLOV)), _A, ()),
}
DEFAULT = ["LU", "SVD", "Cholesky", "AutoPSD"]
NAMES = list(CASES) if EXHAUSTIVE else DEFAULT


def _loss(name: str, where: str):
    """`w . x(M, b)`, solved with a state made `where`: "outside" (from the
    concrete operator), "inside" (from the traced one) or "none"."""
    solver, matrix, tags = CASES[name]
    outside = solver.init(lx.MatrixLinearOperator(jnp.asarray(matrix), tags), {})

    def loss(m, b):
        operator = lx.MatrixLinearOperator(m, tags)
        if where == "none":
            return jnp.dot(_W, lx.linear_solve(operator, b, solver).value)
        state = outside if where == "outside" else solver.init(operator, {})
        return jnp.dot(_W, lx.linear_solve(operator, b, solver, state=state).value)

    return loss


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("name", NAMES)
def test_derivatives_with_a_reused_state_match_finite_differences(name, where):
    # The state is a constant; derivatives come from the operator, whichever
    # way the state was made.
    _, matrix, _ = CASES[name]
    loss = _loss(name, where)
    reference = jax.jit(_loss(name, "none"))
    fd_m = central_differences(lambda m: float(reference(jnp.asarray(m), _B)), matrix)
    fd_b = central_differences(
        lambda b: float(reference(jnp.asarray(matrix), jnp.asarray(b))), _B
    )
    grad_m, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(
        jnp.asarray(matrix), jnp.asarray(_B)
    )
    np.testing.assert_allclose(grad_m, fd_m, atol=1e-8)
    np.testing.assert_allclose(grad_b, fd_b, atol=1e-8)
    jac_m = jax.jacfwd(loss)(jnp.asarray(matrix), jnp.asarray(_B))
    np.testing.assert_allclose(jac_m, fd_m, atol=1e-8)


@pytest.mark.parametrize("name", ["LU"] if not EXHAUSTIVE else NAMES)
def test_second_order_and_vmapped_jvp_with_a_reused_state(name):
    solver, matrix, tags = CASES[name]
    m = jnp.asarray(matrix)
    state = solver.init(lx.MatrixLinearOperator(m, tags), {})
    d1, d2 = (jnp.asarray(_RNG.normal(size=(N, N))) for _ in range(2))

    def solve(m, with_state):
        operator = lx.MatrixLinearOperator(m, tags)
        kwargs = {"state": state} if with_state else {}
        return lx.linear_solve(operator, jnp.asarray(_B), solver, **kwargs).value

    def jvp1(m, d, with_state):
        return jax.jvp(lambda m: solve(m, with_state), (m,), (d,))[1]

    @jax.jit
    def both(m):
        second = jax.jvp(lambda m: jvp1(m, d1, True), (m,), (d2,))[1]
        batched = jax.vmap(lambda d: jvp1(m, d, True))(jnp.stack([d1, d2]))
        return second, batched

    second, batched = both(m)
    eps = 1e-5
    fd2 = (jvp1(m + eps * d2, d1, False) - jvp1(m - eps * d2, d1, False)) / (2 * eps)
    np.testing.assert_allclose(second, fd2, atol=1e-7)
    np.testing.assert_allclose(batched[0], jvp1(m, d1, False), atol=1e-10)
    np.testing.assert_allclose(batched[1], jvp1(m, d2, False), atol=1e-10)


@pytest.mark.parametrize(
    "name", ["LU", "QR", "Auto", "CG", "BiCGStab"] if EXHAUSTIVE else ["LU", "CG"]
)
def test_one_factorisation_many_right_hand_sides(name):
    # The main use: a scan over right-hand sides with one state, under `jit`
    # (state as an argument); a batched state with an unbatched operator and
    # the reverse; the state serialised and read back.
    solver, matrix, tags = CASES[name]
    m = jnp.asarray(matrix)
    operator = lx.MatrixLinearOperator(m, tags)
    state = solver.init(operator, {})
    rhs = jnp.asarray(_RNG.normal(size=(3, N)))

    @jax.jit
    def scanned(state, rhs):
        def body(carry, b):
            return carry, lx.linear_solve(operator, b, solver, state=state).value

        return lax.scan(body, 0, rhs)[1]

    np.testing.assert_allclose(
        scanned(state, rhs), np.linalg.solve(matrix, np.asarray(rhs).T).T, atol=1e-10
    )
    scales = jnp.array([1.0, 1.5])
    states = jax.vmap(lambda s: solver.init(lx.MatrixLinearOperator(s * m, tags), {}))(
        scales
    )
    batched = jax.vmap(
        lambda s: lx.linear_solve(operator, jnp.asarray(_B), solver, state=s).value
    )(states)
    expected = [np.linalg.solve(float(s) * matrix, _B) for s in scales]
    np.testing.assert_allclose(batched, np.stack(expected), atol=1e-10)
    unbatched = jax.vmap(
        lambda s: (
            lx.linear_solve(
                lx.MatrixLinearOperator(s * m, tags),
                jnp.asarray(_B),
                solver,
                state=state,
            ).value
        )
    )(scales)
    np.testing.assert_allclose(
        unbatched, np.stack([np.linalg.solve(matrix, _B)] * 2), atol=1e-10
    )
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    like = solver.init(lx.MatrixLinearOperator(jnp.eye(N) + 0 * m, tags), {})
    read = eqx.tree_deserialise_leaves(buffer, like)
    np.testing.assert_allclose(
        lx.linear_solve(operator, jnp.asarray(_B), solver, state=read).value,
        np.linalg.solve(matrix, _B),
        atol=1e-10,
    )


def _scaled(t) -> lx.AbstractLinearOperator:
    return lx.MatrixLinearOperator(jnp.asarray(_A)) * t


@jaxtyped(typechecker=beartype)
def _scaled_solve(
    t: Float[Array, ""], solver: lx.AbstractLinearSolver, state
) -> Float[Array, " n"]:
    return lx.linear_solve(_scaled(t), jnp.asarray(_B), solver, state=state).value


_scaled_solve_jit = eqx.filter_jit(_scaled_solve)


_HOLDING = [lx.GMRES(**_KRYLOV)]
if EXHAUSTIVE:
    _HOLDING += [
        lx.BiCGStab(**_KRYLOV),
        lx.LSMR(**_KRYLOV),
        lx.Normal(lx.CG(**_KRYLOV)),
    ]


@pytest.mark.parametrize("solver", _HOLDING, ids=lambda s: type(s).__name__)
def test_krylov_state_of_an_operator_scaled_by_a_python_float(solver):
    # Fails before the fix: "`state` does not match `solver.init(operator,
    # options)`". The state of `op * 2.0` holds the Python float `2.0` where
    # `init` of `op * t`, `t` traced, holds an array.
    state = solver.init(_scaled(2.0), {})
    expected = np.linalg.solve(2.0 * _A, _B)
    np.testing.assert_allclose(
        _scaled_solve_jit(jnp.asarray(2.0), solver, state), expected, atol=1e-10
    )
    grad = jax.grad(lambda t: jnp.dot(_W, _scaled_solve(t, solver, state)))
    fd = central_differences(lambda t: _W @ np.linalg.solve(t * _A, _B), np.array(2.0))
    np.testing.assert_allclose(grad(jnp.asarray(2.0)), fd, atol=1e-8)
    # And a state made under `jit` (the scale an array) for the eager operator.
    traced = eqx.filter_jit(lambda t: solver.init(_scaled(t), {}))(jnp.asarray(2.0))
    np.testing.assert_allclose(
        lx.linear_solve(_scaled(2.0), jnp.asarray(_B), solver, state=traced).value,
        expected,
        atol=1e-10,
    )


def test_krylov_state_of_an_operator_scaled_by_a_python_int():
    # Fails before the fix: "`state` does not match" for a state of `op * 2`
    # given with `op * 2.0` (and the other way round), where both scale a float
    # operator alike.
    expected = np.linalg.solve(2.0 * _A, _B)
    solver = _HOLDING[0]
    for made, used in ((2, 2.0), (2.0, 2), (2, 2)):
        state = solver.init(_scaled(made), {})
        solution = lx.linear_solve(_scaled(used), jnp.asarray(_B), solver, state=state)
        np.testing.assert_allclose(solution.value, expected, atol=1e-10)


def test_auto_state_of_another_well_posed_is_refused():
    # Fails before the fix: accepted, and at a rank-deficient matrix the JVP
    # of `well_posed=True` (full rank assumed) from the SVD state was off by
    # 0.7, against 1e-10 with `well_posed=False`.
    u, v = _RNG.normal(size=(N, 2)), _RNG.normal(size=(2, N))
    matrix = jnp.asarray(u @ v)  # rank 2
    operator = lx.MatrixLinearOperator(matrix)
    pinv_state = lx.AutoLinearSolver(well_posed=False).init(operator, {})
    for well_posed in (True, None):
        solver = lx.AutoLinearSolver(well_posed=well_posed)
        with pytest.raises(ValueError, match="`state` was made by `lx.SVD"):
            lx.linear_solve(operator, jnp.asarray(_B), solver, state=pinv_state)
    # The state's own solver differentiates it right (a rank-preserving
    # tangent, against finite differences of NumPy's pseudoinverse).
    du, dv = _RNG.normal(size=(N, 2)), _RNG.normal(size=(2, N))
    solver = lx.AutoLinearSolver(well_posed=False)
    _, tangent = jax.jvp(
        lambda m: (
            lx.linear_solve(
                lx.MatrixLinearOperator(m), jnp.asarray(_B), solver, state=pinv_state
            ).value
        ),
        (matrix,),
        (jnp.asarray(du @ v + u @ dv),),
    )

    def pinv_solve(e):
        return np.linalg.pinv((u + e * du) @ (v + e * dv), rcond=1e-8) @ _B

    eps = 1e-6
    fd = (pinv_solve(eps) - pinv_solve(-eps)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, atol=1e-8)
    # And the other way round: the LU state of `well_posed=True` is not one
    # that `well_posed=False` makes. (A state made from a tagged operator for
    # the same operator without tags is still accepted: see
    # test_auto_adversarial.py.)
    lu_state = lx.AutoLinearSolver(well_posed=True).init(
        lx.MatrixLinearOperator(jnp.asarray(_A)), {}
    )
    with pytest.raises(ValueError, match="`state` was made by `lx.LU"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(_A)),
            jnp.asarray(_B),
            solver,
            state=lu_state,
        )


@pytest.mark.parametrize(
    "state",
    [
        lambda: lx.QR().init(lx.MatrixLinearOperator(jnp.asarray(_A)), {}),
        lambda: lx.LU().init(lx.MatrixLinearOperator(jnp.asarray(_A, jnp.float32)), {}),
        lambda: lx.LU().init(lx.MatrixLinearOperator(jnp.eye(N + 1)), {}),
        lambda: jax.vmap(lambda m: lx.LU().init(lx.MatrixLinearOperator(m), {}))(
            jnp.stack([jnp.asarray(_A)] * 2)
        ),
        lambda: lx.AutoLinearSolver(well_posed=True).init(
            lx.MatrixLinearOperator(jnp.asarray(_A)), {}
        ),
        lambda: None,
    ],
    ids=["other_solver", "other_dtype", "other_shape", "batched", "auto", "none"],
)
def test_a_state_that_does_not_fit_is_a_clear_error(state):
    with pytest.raises(ValueError, match="`state`"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(_A)),
            jnp.asarray(_B),
            lx.LU(),
            state=state(),
        )
