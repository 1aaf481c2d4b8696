"""`options` keys that some solver reads are accepted, and ignored, by the solvers
that do not read them, as in lineax 0.1.1 (documented in `linear_solve`'s
`options`): `damp` (LSMR's) changes nothing elsewhere."""

import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


@pytest.mark.parametrize(
    "solver",
    [
        lx.LU(),
        lx.SVD(),
        lx.QR(),
        lx.CG(rtol=1e-10, atol=1e-10),
        lx.AutoLinearSolver(well_posed=True),
        lx.Normal(lx.Cholesky()),
    ],
    ids=["LU", "SVD", "QR", "CG", "Auto", "Normal(Cholesky)"],
)
def test_damp_is_ignored_by_solvers_that_do_not_read_it(solver):
    op = lx.MatrixLinearOperator(
        jnp.array([[2.0, 0.5], [0.5, 3.0]]), lx.positive_semidefinite_tag
    )
    b = jnp.array([1.0, 2.0])
    plain = lx.linear_solve(op, b, solver).value
    damped = lx.linear_solve(op, b, solver, options={"damp": 1.0}).value
    np.testing.assert_array_equal(damped, plain)
    # (LSMR does read it: the damped problem's answer differs.)
    lsmr = lx.LSMR(rtol=1e-10, atol=1e-10)
    assert not np.allclose(
        lx.linear_solve(op, b, lsmr, options={"damp": 1.0}).value, plain
    )
