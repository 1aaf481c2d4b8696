"""Adversarial checks of `AutoLinearSolver`, of solver-state reuse (`state=`), of
`invert` and of `Solution`/`RESULTS`, as a demanding user would run them, with
NumPy float64 references."""

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
