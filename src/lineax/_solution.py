"""The result codes of a solve, and the `Solution` it returns."""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import select


class RESULTS(eqxi.Enumeration):
    """The outcome of a linear solve. `successful` is the only non-failure.

    Compare under `jit` with `sol.result == lx.RESULTS.successful`; read the message
    with `lx.RESULTS[sol.result]`.
    """

    # Client libraries subclass `RESULTS` and may redefine members only with the
    # identical message, so the first two messages are part of the API contract.
    successful = ""
    max_steps_reached = (
        "The maximum number of solver steps was reached. Try increasing `max_steps`."
    )
    singular = (
        "The operator is singular (a pivot of the factorisation is exactly zero), "
        "or the solver returned non-finite output. For the pseudoinverse "
        "(least-squares / minimum-norm) solution of a singular system use "
        "`lx.AutoLinearSolver(well_posed=False)` or `lx.SVD()`. "
        "If you used `lx.Cholesky()` or `lx.CG()`, check that the operator really "
        "is positive (or negative) definite, as its tag claims."
    )
    breakdown = (
        "A breakdown occurred in the iterative solver (a division by a quantity "
        "that vanished). This typically means the operator is singular, or is not of "
        "the class the solver supports (e.g. not positive definite for CG, not "
        "symmetric for MINRES). Try `lx.GMRES` or a direct solver such as `lx.LU()` "
        "or `lx.SVD()`, or supply a preconditioner. If you supplied one, it may be "
        "the cause: it must be positive definite for CG and MINRES, and finite (a "
        "zero on the diagonal used by Jacobi, SSOR or multigrid makes it infinite)."
    )
    stagnation = (
        "The iterative solver stagnated: its true residual stopped decreasing "
        "before reaching the tolerance (the best iterate is returned, with its "
        "residual in `stats['residual_norm']`). Usually the tolerance is below "
        "what the dtype can reach: the smallest reachable relative residual is "
        "about eps * cond(A) (eps = 1.2e-7 in float32, 2.2e-16 in float64). Try "
        "float64 if the solve was in float32, a preconditioner, looser tolerances, "
        "a larger `restart` for GMRES, or a direct solver."
    )
    conlim = (
        "The condition number of the operator exceeded `conlim`: the problem is too "
        "ill-conditioned for LSMR to make progress. Increase `conlim`, regularise "
        "the problem (the `damp` option), or use `lx.SVD()`."
    )
    nonfinite_input = (
        "The operator, the right-hand side or the initial guess `y0` contains NaN "
        "or inf, so the solution is meaningless. Check the inputs of "
        "`linear_solve` (e.g. with `jnp.isfinite`) and whatever computed them."
    )


def results_where(pred: ArrayLike, a: RESULTS, b: RESULTS) -> RESULTS:
    """`RESULTS.where(pred, a, b)`; traced, as one `select` rather than
    `jnp.where`'s nested `jit` (see `select`)."""
    values = (pred, a._value, b._value)
    if not any(isinstance(x, jax.core.Tracer) for x in values):
        return RESULTS.where(pred, a, b)
    return jtu.tree_unflatten(jtu.tree_structure(a), [select(*values)])


class Solution(eqx.Module):
    """The output of [`lineax.linear_solve`][].

    **Attributes:**

    - `value`: the solution, a PyTree with the structure of the operator's input.
    - `result`: a [`lineax.RESULTS`][] saying whether the solve succeeded.
    - `stats`: a dictionary of statistics. Iterative solvers give `num_steps`,
        `max_steps`, `num_mv` (operator applications), `residual_norm` (the true
        residual of `value`, in the solver's norm) and `residual_history` (the
        residual estimate after each step, zero after the last; see "Iterative
        solvers" in the docs).
    - `state`: the solver state that was used (from `solver.init`), which may be
        passed back to `linear_solve(..., state=...)` to reuse a factorisation.
    """

    value: PyTree[Array]
    result: RESULTS
    stats: dict[str, PyTree[Array]]
    state: PyTree[Any]
