"""Adversarial review, round 4: the structured operators and their solvers, the
preconditioners, and MINRES, FGMRES, FlexibleCG, PipelinedCG and LSMR, fed what
users pass (Python and NumPy scalars, lists, complex and float32 data, rows
scaled by 10^±6, zero, tiny and huge right-hand sides, singular and inconsistent
systems), under `jit`, `vmap`, `jvp`, `grad` and their compositions, against
NumPy/SciPy in float64 and central finite differences.

Reviewed and found right (no test here): Kronecker, Woodbury, Schur,
BlockDiagonal, Tridiagonal and Triangular solves against NumPy (also complex,
transposed, PyTree factors and blocks, mixed float32/float64 and real/complex
blocks, nested structures such as a Woodbury update of a Kronecker product inside
a block diagonal), singular parts (RESULTS.singular, pseudoinverse inner solvers),
`jvp`, `grad`, `vmap` over one factor or block, `vmap` of `jvp` and `jvp` of
`jvp` against finite differences, scaled structured operators (Python, NumPy,
traced, negative and complex scalars, under `jit`, `scan` and `cond`), `state=`
reuse and `lx.invert`; sparse operators (padded BCOO/BCSR, duplicates, built
under `jit`, rectangular, complex, empty) and their diagonal, bands, transpose
and gradients; ILU(0) and IC(0) against dense reference factorisations (also
complex, unsorted with duplicates, under `jit`/`vmap`/`grad`, breakdown), Jacobi,
block Jacobi, SSOR, Chebyshev, Neumann and multigrid (1-, 2-, 3-D, anisotropic,
convection, transposed); MINRES, FGMRES, FlexibleCG, PipelinedCG and LSMR on
zero, 1e±300 and float32 1e±30 right-hand sides, unreachable tolerances, NaN
and inf inputs (RESULTS codes, no hang), `y0`, negative definite and Hermitian
operators, preconditioned gradients, LSMR's `damp` and right preconditioner.

Found and left: `options={"damp": ...}` given to a solver that does not read it
(LU, `AutoLinearSolver`, CG, ...) is accepted and ignored, so the undamped
solution comes back (`test_option_keys_another_solvers_key_is_accepted` asks
for that); a traced `omega` outside (0, 2) for SSOR, or a traced non-positive
`scale` for Neumann, is not checked (the solve then reports a breakdown).

Each test here failed before the fix it protects. Small sizes; solves shared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_LSMR = lx.LSMR(rtol=1e-10, atol=1e-10)
_TALL = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)))
_B6 = jnp.ones(6)


def _damped_shape(damp):
    operator = lx.MatrixLinearOperator(_TALL)
    return jax.eval_shape(
        lambda: lx.linear_solve(operator, _B6, _LSMR, options={"damp": damp})
    )


@pytest.mark.parametrize(
    "damp, error, match",
    [
        # Complex: "float() argument must be a string or a real number, not
        # 'complex'" from the cast to the real dtype.
        (0.5j, TypeError, "`damp` option of `lx.LSMR` must be real"),
        (jnp.asarray(0.5 + 0.0j), TypeError, "`damp` option of `lx.LSMR` must be real"),
        # A vector broadcast against the unknowns inside `mv`: "mul got
        # incompatible shapes for broadcasting: (2,), (3,)".
        (jnp.array([0.5, 0.5]), ValueError, r"must be a real scalar, got .*\(2,\)"),
        ([0.5], TypeError, "must be a real scalar"),
        ("0.5", TypeError, "must be a real scalar"),
    ],
)
def test_lsmr_damp_that_is_not_a_real_scalar_is_refused_by_name(damp, error, match):
    with pytest.raises(error, match=match):
        _damped_shape(damp)


def test_lsmr_damp_real_scalars_are_accepted():
    for damp in (0.5, 1, np.float32(0.5), jnp.asarray(0.5), np.asarray(0.5)):
        _damped_shape(damp)
    # Traced (a hyperparameter under `jit`/`grad`, as the docs promise).
    jax.eval_shape(
        jax.grad(lambda d: jnp.sum(_damped_solve_value(d))), jnp.asarray(0.5)
    )


def _damped_solve_value(damp):
    operator = lx.MatrixLinearOperator(_TALL)
    return lx.linear_solve(operator, _B6, _LSMR, options={"damp": damp}).value


@pytest.mark.parametrize(
    "cls", [lx.ILUPreconditioner, lx.IncompleteCholeskyPreconditioner]
)
@pytest.mark.parametrize("shift", [1j, 0.1 + 0.5j, np.complex64(2j)])
def test_incomplete_factorisation_complex_shift_is_refused(cls, shift):
    # The shift multiplies the diagonal by `1 + shift`; a complex one was taken as
    # its real part (`1j` as 0, no shift) without a word.
    import scipy.sparse as sp

    operator = lx.SparseLinearOperator(
        sp.csr_matrix(np.eye(3) * 2.0), lx.positive_semidefinite_tag
    )
    with pytest.raises(ValueError, match="`shift` must be a real, non-negative"):
        cls(operator, shift=shift)


def _laplacian_1d(u, h):
    padded = jnp.pad(u, 1)
    return (2 * u - padded[:-2] - padded[2:]) / h**2


@pytest.mark.parametrize(
    "stencil",
    [
        # Only the interior points it reaches: "cannot reshape array of shape
        # (15, 13) (size 195) into shape (15, 15)" from deep in JAX.
        lambda u, h: (2 * u[1:-1] - u[:-2] - u[2:]) / h**2,
        # The padded grid.
        lambda u, h: jnp.pad(_laplacian_1d(u, h), 1),
        # Not an array.
        lambda u, h: (_laplacian_1d(u, h),),
    ],
)
def test_multigrid_stencil_changing_the_grid_shape_is_refused_by_name(stencil):
    with pytest.raises(ValueError, match=r"`stencil\(u, h\)` must return an array"):
        lx.MultigridPreconditioner(stencil, (15,), 1 / 16, dtype=jnp.float64)
    # A right one is accepted.
    lx.MultigridPreconditioner(_laplacian_1d, (15,), 1 / 16, dtype=jnp.float64)
