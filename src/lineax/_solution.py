"""The result codes of a solve, and the `Solution` it returns."""

from collections.abc import Callable
from typing import Any, TYPE_CHECKING

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import instance_dict, no_active_trace, select


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
        "or the solver returned non-finite output. A matrix computed from finite "
        "operators (a product, a sum, a scaling, the Gram matrix of `lx.Normal`) "
        "that overflowed the dtype's range is reported so too: rescale the "
        "problem. So is a solve with `lx.Woodbury` (`AutoLinearSolver`'s choice "
        "for a `LowRankUpdateLinearOperator`) whose updated operator is too "
        "ill-conditioned for the dtype: solve `lx.materialise(operator)` with "
        "`lx.LU()`. For the pseudoinverse "
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


def concrete_value(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array where it is concrete (not traced), else `None`.

    Result codes and their predicates are decided on the host where they are
    concrete (a direct solver's constant success, a flag known at trace time).
    Equinox compares and selects concrete `RESULTS` items eagerly
    (`ensure_compile_time_eval`), moving a Python scalar to the device while the
    solve is traced: a `jax.jit` of a Woodbury, Schur or block-diagonal solve
    failed under `jax.transfer_guard("disallow")` ("Disallowed host-to-device
    transfer"), and each first call paid for a tiny eager program. Every such
    decision reads its code or predicate through here."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def concrete_code(value: Any) -> Any:
    """A code (or a reduction of codes) decided on the host, as a solve holds it:
    a JAX array outside of every trace, as every other code and state leaf of an
    eager solve is, else the NumPy value itself (a constant of the program being
    traced). `RESULTS.singular`'s own value is a NumPy one: an un-jitted singular
    solve of a function operator returned it as its `result`, and handed it on to
    its error check, typed for JAX arrays."""
    return jnp.asarray(value) if no_active_trace() else value


def is_successful(result: RESULTS) -> Any:
    """`result == RESULTS.successful`, as a boolean array: a NumPy one where the
    code is concrete (see `concrete_value`), else traced."""
    success = RESULTS.successful._value
    code = concrete_value(result._value)
    return result._value == success if code is None else code == success


def results_where(pred: ArrayLike, a: RESULTS, b: RESULTS) -> RESULTS:
    """`RESULTS.where(pred, a, b)`. A concrete scalar `pred` is decided here (see
    `concrete_value`), giving `a` or `b` itself; otherwise one `select` rather
    than `jnp.where`'s nested `jit` (see `select`)."""
    decided = concrete_value(pred)
    if decided is not None and decided.ndim == 0:
        chosen = a if decided else b
        value = concrete_code(chosen._value)
        return jtu.tree_unflatten(jtu.tree_structure(chosen), [value])
    return jtu.tree_unflatten(jtu.tree_structure(a), [select(pred, a._value, b._value)])


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

    # A solve called un-jitted returns its `result`, `stats` and `state`
    # pending (see `pending_solution`): computed, or built from the compiled
    # program's outputs, when first read. Every way to read a field gets them:
    # an attribute (`__getattr__`, called when the instance has no such
    # attribute yet), Equinox's flatten (which reads `obj.__dict__` itself:
    # `jax.tree_util`, `jit`, `==`, `repr`, `eqx.tree_at`), `vars`, `copy` and
    # `pickle` (`__getstate__`). The instance stays a `Solution` with the
    # usual four fields, so its PyTree structure is that of any other.
    if not TYPE_CHECKING:
        # Python's own attribute access, not Equinox's (`Module.__getattribute__`,
        # a Python function, which wraps bound methods as modules: a `Solution`
        # has none). `sol.value` of an un-jitted solve took 0.4 us through it,
        # 0.04 without.
        __getattribute__ = object.__getattribute__

        @property
        def __dict__(self) -> dict[str, Any]:
            fields = _instance_dict(self)
            if _PENDING in fields:
                _fill(fields, _PENDING_FIELDS)
            return fields

        def __getattr__(self, name: str) -> Any:
            fields = _instance_dict(self)
            if name in _PENDING_FIELDS and _PENDING in fields:
                _fill(fields, (name,))
                return fields[name]
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )

        def __getstate__(self) -> dict[str, Any]:
            return dict(self.__dict__)


# The instance dictionary itself, past the `__dict__` property above.
_instance_dict = instance_dict
_PENDING = "_lineax_pending"
# (In the order of the fields: a filled instance dictionary has the order of
# any other.)
_PENDING_FIELDS = ("result", "stats", "state")


def _fill(fields: dict[str, Any], names: tuple[str, ...]) -> None:
    """Compute the fields `names` of a `Solution` (its instance dictionary
    `fields`) that are still pending. (Two threads reading one at once may both
    compute it, alike: each is set whole, and the marker removed after the last.)"""
    pending = fields.get(_PENDING)
    if pending is None:  # filled by another thread meanwhile
        return
    for name in names:
        if name not in fields:
            try:
                fields[name] = pending(name)
            except AttributeError as error:
                # (Raised from `__getattr__`, it would read as a missing field.)
                raise RuntimeError(
                    f"Computing `Solution.{name}` failed: {error}"
                ) from error
    if all(name in fields for name in _PENDING_FIELDS):
        fields.pop(_PENDING, None)


def pending_solution(value: PyTree[Array], pending: Callable[[str], Any]) -> Solution:
    """A `Solution` whose `result`, `stats` and `state` are `pending("result")`,
    `pending("stats")` and `pending("state")`, each called when its field is first
    read.

    An un-jitted small solve is as fast as its program's outputs are few and
    the Python objects made on each call: the condition estimate of a direct
    solver's `stats["rcond"]` (Hager's method: several triangular solves) and
    the Equinox modules of the result and the state cost as much as the solve
    itself at n = 10, for what most callers never read.
    """
    solution = object.__new__(Solution)
    fields = _instance_dict(solution)
    fields["value"] = value
    fields[_PENDING] = pending
    return solution


def solution_of(
    value: PyTree[Array], result: RESULTS, stats: dict[str, Any], state: PyTree[Any]
) -> Solution:
    """`Solution(value, result, stats, state)`, built as Equinox's unflatten
    builds one (`Solution` checks nothing at construction): 1-2 us less than
    its `__init__` on an un-jitted solve."""
    solution = object.__new__(Solution)
    fields = _instance_dict(solution)
    fields["value"] = value
    fields["result"] = result
    fields["stats"] = stats
    fields["state"] = state
    return solution
