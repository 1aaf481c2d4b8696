"""Regression tests from a review through the libraries built on lineax
(Optimistix and Diffrax, used as their users use them, against lineax 0.1.1 run
as an oracle outside the test suite), reduced to lineax alone: each case is one
where a client crashed, or ran slower, on this package and not on 0.1.1. The
client-level reproductions are in `test_clients.py`.

Small sizes, one compiled function per test where possible.
"""

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


def _residual(y, a):
    return jnp.stack([y[0] ** 3 + y[1] - a, jnp.sin(y[1]) + a * y[0], y[1] - y[0]])


# Optimistix's Chord and Diffrax's VeryChord (Diffrax's default root finder)
# factorise the linearised Jacobian once and keep the solver's state across
# steps, through `lax.stop_gradient`, which accepts arrays only. `Normal` kept
# the operator itself in its state, a function operator holding its
# closure-converted jaxpr: "TypeError: Argument '{ lambda ... }' of type Jaxpr is
# not a valid JAX type" (lineax 0.1.1 materialises it for Cholesky). With a
# direct inner solver the state now holds arrays only.
def test_normal_with_direct_inner_solver_state_is_arrays_only():
    y = jnp.array([1.0, 0.3])
    jacobian = lx.JacobianLinearOperator(_residual, y, jnp.array(2.0))
    operator = lx.linearise(jacobian)
    matrix = np.asarray(jacobian.as_matrix())
    b = np.array([1.0, -2.0, 0.5])
    want = np.linalg.lstsq(matrix, b, rcond=None)[0]
    for inner in (lx.Cholesky(), lx.LU(), lx.AutoLinearSolver(well_posed=None)):
        solver = lx.Normal(inner)
        state = jax.lax.stop_gradient(solver.init(operator, {}))
        for leaf in jax.tree_util.tree_leaves(state):
            assert isinstance(leaf, jax.Array), (inner, type(leaf))
        sol = lx.linear_solve(operator, jnp.asarray(b), solver, state=state)
        np.testing.assert_allclose(sol.value, want, rtol=1e-10)


# `Normal(Cholesky())` on a function operator (Optimistix's Gauss-Newton and
# Levenberg-Marquardt solve with the linearised residual) materialised `A` for
# each factor of `A^H A` and applied the function once more for `A^H b`: three
# evaluations of the user's function in the compiled program (XLA kept them
# all), one now, as in lineax 0.1.1; 370 -> 275 lines of compiled HLO (0.1.1:
# 299).
def test_normal_cholesky_evaluates_a_function_operator_once():
    struct = jax.ShapeDtypeStruct((4,), jnp.float32)

    def fn(v):  # `cumsum`: its mark in the program (one `reduce-window`)
        return jnp.concatenate([3.0 * v + jnp.cumsum(v), v[:2]])

    def solve(b, throw=True):
        operator = lx.FunctionLinearOperator(fn, struct)
        solver = lx.Normal(lx.Cholesky())
        return lx.linear_solve(operator, b, solver, throw=throw).value

    b = jnp.arange(1.0, 7.0, dtype=jnp.float32)
    # (`throw=False`: with `throw=True` the error branch, run only where the
    # solve failed, applies the operator to a probe to say why.)
    compiled = jax.jit(solve, static_argnums=1).lower(b, False).compile().as_text()
    assert compiled is not None
    assert compiled.count("reduce-window(") == 1
    matrix = np.asarray(jax.vmap(fn, out_axes=1)(jnp.eye(4, dtype=jnp.float32)))
    want = np.linalg.lstsq(matrix, np.asarray(b), rcond=None)[0]
    np.testing.assert_allclose(jax.jit(solve)(b), want, rtol=1e-4)


# The same crash with every Krylov solver, in lineax 0.1.1 too: a Krylov state
# is the operator itself, and a linearised function's operator holds a jaxpr
# leaf, so Chord and VeryChord could not keep it. The state now holds the
# operator's arrays as its leaves and the rest in its PyTree structure
# (`HeldArrays`); a state passed back is still accepted where `init` builds new
# functions each time it runs (`Normal(CG())` transposes `A`).
def _square_residual(y, a):
    return jnp.stack([y[0] ** 3 + y[1] - a, jnp.sin(y[1]) + a * y[2], y[2] - y[0]])


def test_krylov_state_of_a_function_operator_is_arrays_only():
    y = jnp.array([1.0, 0.3, -0.4])
    jacobian = lx.JacobianLinearOperator(_square_residual, y, jnp.array(2.0))
    operator = lx.linearise(jacobian)
    matrix = np.asarray(jacobian.as_matrix())
    b = np.array([1.0, -2.0, 0.5])
    for solver in (
        lx.GMRES(1e-12, 1e-12),
        lx.BiCGStab(1e-12, 1e-12),
        lx.LSMR(1e-12, 1e-12),
        lx.Normal(lx.CG(1e-12, 1e-12)),
    ):
        state = jax.lax.stop_gradient(solver.init(operator, {}))
        for leaf in jax.tree_util.tree_leaves(state):
            assert isinstance(leaf, jax.Array), (solver, type(leaf))
        sol = lx.linear_solve(operator, jnp.asarray(b), solver, state=state)
        np.testing.assert_allclose(sol.value, np.linalg.solve(matrix, b), rtol=1e-8)


def _every_solver_with_an_operator():
    """(solver, operator) for every solver of lineax, on a linearised function
    (wrapped to fit what the solver accepts)."""
    function = lx.linearise(
        lx.JacobianLinearOperator(_square_residual, jnp.array([1.0, 0.3, -0.4]), 2.0)
    )
    spd = lx.TaggedLinearOperator(function.T @ function, lx.positive_semidefinite_tag)
    diagonal = lx.MatrixLinearOperator(jnp.eye(3) * 5.0)
    block = lx.BlockLinearOperator([[diagonal, function], [function, diagonal]])
    tol = (1e-10, 1e-10)
    return {
        "LU": (lx.LU(), function),
        "QR": (lx.QR(), function),
        "SVD": (lx.SVD(), function),
        "Auto": (lx.AutoLinearSolver(well_posed=None), function),
        "Cholesky": (lx.Cholesky(), spd),
        "Normal(LU)": (lx.Normal(lx.LU()), function),
        "GMRES": (lx.GMRES(*tol), function),
        "FGMRES": (lx.FGMRES(*tol), function),
        "BiCGStab": (lx.BiCGStab(*tol), function),
        "LSMR": (lx.LSMR(*tol), function),
        "Normal(CG)": (lx.Normal(lx.CG(*tol)), function),
        "CG": (lx.CG(*tol), spd),
        "FlexibleCG": (lx.FlexibleCG(*tol), spd),
        "PipelinedCG": (lx.PipelinedCG(*tol), spd),
        "MINRES": (lx.MINRES(*tol), spd),
        "Schur": (lx.Schur(), block),
    }


def test_every_solver_state_of_a_function_operator_passes_stop_gradient():
    # As above, for every solver of lineax (Schur's state kept its off-diagonal
    # blocks as operators, with the same crash).
    for name, (solver, operator) in _every_solver_with_an_operator().items():
        state = solver.init(operator, {})
        for leaf in jax.tree_util.tree_leaves(state):
            assert isinstance(leaf, jax.Array), (name, type(leaf))
        jax.lax.stop_gradient(state)
