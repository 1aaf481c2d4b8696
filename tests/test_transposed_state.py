"""A state transposed by the solver itself (`solver.transpose(state, options)`) is
a state of the transposed operator: `linear_solve(op.T, b, solver, state=...)`
accepts it, as lineax 0.1.1 does. Its static flags may differ from those of
`solver.init(op.T, options)` (`LU`'s `transposed`, `QR`'s `wide` and `Normal`'s
`tall` for a square operator), and it was refused as "does not match"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _matrix(shape, tags=()):
    rng = np.random.default_rng(sum(shape))
    m = rng.standard_normal(shape) + 3 * np.eye(*shape)
    if lx.positive_semidefinite_tag in tags:
        m = m @ m.T
    if lx.lower_triangular_tag in tags:
        m = np.tril(m)
    return m


_CASES = {
    "lu": (lx.LU(), (4, 4), ()),
    "qr": (lx.QR(), (4, 4), ()),
    "qr_tall": (lx.QR(), (6, 4), ()),
    "qr_wide": (lx.QR(), (4, 6), ()),
    "svd": (lx.SVD(), (4, 4), ()),
    "cholesky": (lx.Cholesky(), (4, 4), (lx.positive_semidefinite_tag,)),
    "triangular": (lx.Triangular(), (4, 4), (lx.lower_triangular_tag,)),
    "normal": (lx.Normal(lx.Cholesky()), (4, 4), ()),
    "normal_tall": (lx.Normal(lx.Cholesky()), (6, 4), ()),
    "auto": (lx.AutoLinearSolver(well_posed=True), (4, 4), ()),
    "auto_none": (lx.AutoLinearSolver(well_posed=None), (4, 4), ()),
    "auto_tall": (lx.AutoLinearSolver(well_posed=None), (6, 4), ()),
}


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("jit", [False, True])
def test_transposed_state_solves_transposed_operator(name, jit):
    solver, shape, tags = _CASES[name]
    matrix = _matrix(shape, tags)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    state, _ = solver.transpose(solver.init(op, {}), {})
    b = jnp.asarray(np.arange(1.0, shape[1] + 1))

    def solve(state, b):
        return lx.linear_solve(op.T, b, solver, state=state).value

    x = (jax.jit(solve) if jit else solve)(state, b)
    want = np.linalg.lstsq(matrix.T, np.asarray(b), rcond=None)[0]
    np.testing.assert_allclose(x, want, rtol=1e-10, atol=1e-10)


def test_transposed_state_of_woodbury():
    a = lx.DiagonalLinearOperator(jnp.arange(1.0, 5.0))
    u = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1)))
    v = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4)))
    op = lx.LowRankUpdateLinearOperator(a, u, jnp.eye(1), v)
    solver = lx.Woodbury()
    state, _ = solver.transpose(solver.init(op, {}), {})
    b = jnp.arange(1.0, 5.0)
    x = lx.linear_solve(op.T, b, solver, state=state).value
    want = np.linalg.solve(np.asarray(op.as_matrix()).T, np.asarray(b))
    np.testing.assert_allclose(x, want, rtol=1e-10)


def test_a_state_of_another_shape_is_still_refused():
    op = lx.MatrixLinearOperator(jnp.asarray(_matrix((4, 4))))
    other = lx.MatrixLinearOperator(jnp.eye(3))
    solvers: list[lx.AbstractLinearSolver] = [lx.LU(), lx.QR()]
    for solver in solvers:
        state, _ = solver.transpose(solver.init(other, {}), {})
        with pytest.raises(ValueError, match="does not match"):
            lx.linear_solve(op.T, jnp.ones(4), solver, state=state)
