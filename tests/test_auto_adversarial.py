"""Adversarial checks of `AutoLinearSolver`, of solver-state reuse (`state=`), of
`invert` and of `Solution`/`RESULTS`, as a demanding user would run them, with
NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


@pytest.mark.parametrize("well_posed", [1, 0])
def test_auto_well_posed_int_is_refused(well_posed):
    # `1 == True`, but `select_solver` tests `is True`: an int used to pass the
    # check and silently pick SVD (the published package refuses it too).
    with pytest.raises(ValueError, match="well_posed"):
        lx.AutoLinearSolver(well_posed=well_posed)


def test_auto_well_posed_numpy_bool_means_bool():
    # A NumPy bool (e.g. from `np.all(...)`) used to pass the check and pick SVD
    # for `np.True_`; it means the Python bool.
    operator = lx.MatrixLinearOperator(np.eye(3))
    assert isinstance(
        lx.AutoLinearSolver(well_posed=np.True_).select_solver(operator), lx.LU
    )
    assert lx.AutoLinearSolver(well_posed=np.True_).well_posed is True
    assert isinstance(
        lx.AutoLinearSolver(well_posed=np.False_).select_solver(operator), lx.SVD
    )


_P = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
_B = np.array([1.0, -2.0, 0.5])


def _scaled_psd(t) -> lx.AbstractLinearOperator:
    return t * lx.MatrixLinearOperator(_P, lx.positive_semidefinite_tag)


def test_auto_state_reused_under_grad_of_python_scale():
    # `2.0 * op` is known positive definite (Cholesky); `t * op` with `t` traced
    # by `jax.grad` is not (LU). A state made once from the former used to be
    # refused ("`state` does not match") when the latter was solved with it; the
    # state's own solver is used, as in the published package.
    solver = lx.AutoLinearSolver(well_posed=True)
    state = solver.init(_scaled_psd(2.0), {})

    def f(t):
        return jnp.sum(lx.linear_solve(_scaled_psd(t), _B, solver, state=state).value)

    def f_np(t):
        return np.sum(np.linalg.solve(t * _P, _B))

    eps = 1e-6
    fd = (f_np(2.0 + eps) - f_np(2.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(f(2.0)), f_np(2.0), rtol=1e-12)
    np.testing.assert_allclose(float(jax.grad(f)(2.0)), fd, rtol=1e-7)


def test_auto_state_of_wrong_shape_is_refused():
    # A state of the wrong shape is refused with the clear message (not a deep
    # JAX error from the chosen solver's `compute`).
    solver = lx.AutoLinearSolver(well_posed=True)
    state = solver.init(lx.MatrixLinearOperator(_P, lx.positive_semidefinite_tag), {})
    for operator in (
        lx.MatrixLinearOperator(np.eye(2)),
        lx.MatrixLinearOperator(np.eye(2), lx.positive_semidefinite_tag),
    ):
        with pytest.raises(ValueError, match="`state` does not match"):
            lx.linear_solve(operator, _B[:2], solver, state=state)


def test_auto_state_from_tagged_operator_solves_untagged_one():
    # As in the published package: the state's solver (Cholesky) is used.
    solver = lx.AutoLinearSolver(well_posed=True)
    state = solver.init(lx.MatrixLinearOperator(_P, lx.positive_semidefinite_tag), {})
    x = lx.linear_solve(lx.MatrixLinearOperator(_P), _B, solver, state=state).value
    np.testing.assert_allclose(x, np.linalg.solve(_P, _B), rtol=1e-12)
