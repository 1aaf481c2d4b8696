"""What the Krylov solvers share: tolerances and their validation, the stopping rule,
`preconditioner` and `y0` handling, the true-residual verification, result codes and
statistics, and the PyTree vector arithmetic they are written in.

Every Krylov solver in lineax follows the same contract:

- Success means `norm(b - A y) <= atol + rtol * norm(b)`, with the solver's `norm`,
  and is only ever reported after that test passed on a *recomputed* residual
  `b - A y` (never on a recursively updated one or on an estimate), so a singular
  or badly conditioned system cannot be reported `successful` with a wrong answer.
- Solvers whose cheap per-step convergence measure is a 2-norm estimate (GMRES,
  MINRES, LSMR) stop their inner iteration when that estimate passes an *adapted*
  tolerance (`adapted_tolerance`), then verify; if the verification fails they
  tighten the adapted tolerance and carry on.
- Breakdown tests compare a quantity with the norms of the vectors it was computed
  from (cosines, relative sizes), never with absolute thresholds, so they do not
  depend on the scale or the size of the problem.
- Loops are `lax.while_loop`s. Under `vmap`, JAX runs a batched loop until every
  element is done and keeps the carry of finished elements unchanged (it selects
  between the old and new carry with the per-element predicate), so each element
  stops on its own; the bodies avoid producing NaN for finished elements anyway.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._misc import describe, strip_weak_dtype, structure_of
from .._norm import tree_dot
from .._operator.base import AbstractLinearOperator, conj
from .._solution import RESULTS
from .base import AbstractLinearSolver


#
# PyTree vector arithmetic. Scalars are cast to each leaf's dtype, so that strict
# dtype promotion holds and a real coefficient can scale a complex vector.
#


def _cast(a: Any, leaf: Array) -> Array:
    a = jnp.asarray(a)
    if jnp.iscomplexobj(a) and not jnp.iscomplexobj(leaf):
        a = jnp.real(a)
    return a.astype(leaf.dtype)


def tree_axpy(a: Any, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    """`a * x + y` for a scalar `a`."""
    return jtu.tree_map(lambda xi, yi: _cast(a, xi) * xi + yi, x, y)


def tree_scale(a: Any, x: PyTree[Array]) -> PyTree[Array]:
    """`a * x` for a scalar `a`."""
    return jtu.tree_map(lambda xi: _cast(a, xi) * xi, x)


def tree_sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda xi, yi: xi - yi, x, y)


def tree_where(pred: Any, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda xi, yi: jnp.where(pred, xi, yi), x, y)


def tree_zeros(structure: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)


def norm2(x: PyTree[Array]) -> Scalar:
    """The 2-norm, as `sqrt(<x, x>)`: one reduction, used inside the loops (where
    the overflow guard of `two_norm` is not worth a second pass)."""
    return jnp.sqrt(jnp.real(tree_dot(x, x)))


def safe_div(num: ArrayLike, den: Array) -> Array:
    """`num / den`, and 0 where `den == 0` (never NaN from a finished element)."""
    zero = den == 0
    return jnp.where(zero, 0, num / jnp.where(zero, 1, den))


def real_dtype(structure: PyTree[jax.ShapeDtypeStruct]) -> Any:
    dtypes = [x.dtype for x in jtu.tree_leaves(structure)]
    return jnp.finfo(jnp.result_type(*dtypes)).dtype


def eps_of(structure: PyTree[jax.ShapeDtypeStruct]) -> float:
    """Machine epsilon of the (real) working precision."""
    return float(jnp.finfo(real_dtype(structure)).eps)


#
# Solver state and options.
#


class KrylovState(eqx.Module):
    """State of the Krylov solvers: the operator itself (a Krylov solver does no
    up-front work), and whether it is solved as its negation (CG on a negative
    definite operator)."""

    operator: AbstractLinearOperator
    negative: bool = eqx.field(static=True, default=False)


def check_structure(
    struct: PyTree[jax.ShapeDtypeStruct],
    expected: PyTree[jax.ShapeDtypeStruct],
    what: str,
) -> None:
    if strip_weak_dtype(struct) != strip_weak_dtype(expected):
        raise ValueError(
            f"{what}: expected {describe(expected)}, got {describe(struct)}."
        )


def preconditioner_of(
    options: dict[str, Any], operator: AbstractLinearOperator, right: bool = False
) -> AbstractLinearOperator | None:
    """The `preconditioner` option, checked; `None` means the identity (and costs
    nothing: no identity operator is applied).

    A preconditioner approximates the inverse of `operator`, so maps its output
    space to its input space; with `right=True` (LSMR) it maps the input space to
    itself.
    """
    precond = options.get("preconditioner", None)
    if precond is None:
        return None
    if not isinstance(precond, AbstractLinearOperator):
        raise ValueError(
            "The `preconditioner` option must be a `lineax.AbstractLinearOperator` "
            "(approximating the inverse of the operator), got "
            f"{type(precond).__name__}."
        )
    check_structure(
        precond.in_structure(),
        operator.in_structure() if right else operator.out_structure(),
        "The `preconditioner`'s input structure must be the operator's "
        + ("input" if right else "output")
        + " structure",
    )
    check_structure(
        precond.out_structure(),
        operator.in_structure(),
        "The `preconditioner`'s output structure must be the operator's input "
        "structure",
    )
    return precond


def apply(precond: AbstractLinearOperator | None, x: PyTree[Array]) -> PyTree[Array]:
    return x if precond is None else precond.mv(x)


def y0_of(
    options: dict[str, Any], operator: AbstractLinearOperator
) -> PyTree[Array] | None:
    """The `y0` option (initial guess), checked; `None` if absent."""
    y0 = options.get("y0", None)
    if y0 is None:
        return None
    check_structure(
        structure_of(y0, "y0"),
        operator.in_structure(),
        "The `y0` option (initial guess) must have the operator's input structure",
    )
    return y0


def initial_residual(
    mv: Callable, vector: PyTree[Array], y0: PyTree[Array] | None, structure
) -> tuple[PyTree[Array], PyTree[Array]]:
    """`(x0, b - A x0)`; no matrix-vector product when there is no initial guess."""
    if y0 is None:
        return tree_zeros(structure), vector
    return y0, tree_sub(vector, mv(y0))


def transpose_options(options: dict[str, Any], keep_preconditioner: bool = True):
    """Options for the transposed solve: the preconditioner transposed, `y0` dropped
    (it is an initial guess for a different problem, of a different structure)."""
    new = {k: v for k, v in options.items() if k not in ("y0", "preconditioner")}
    precond = options.get("preconditioner", None)
    if precond is not None and keep_preconditioner:
        new["preconditioner"] = precond.transpose()
    return new


def conj_options(options: dict[str, Any]):
    """Options for the solve with the conjugated operator: the preconditioner
    conjugated, `y0` dropped."""
    new = {k: v for k, v in options.items() if k not in ("y0", "preconditioner")}
    precond = options.get("preconditioner", None)
    if precond is not None:
        new["preconditioner"] = conj(precond)
    return new


#
# Tolerances, the stopping rule, results.
#


class AbstractKrylovSolver(AbstractLinearSolver[KrylovState]):
    """Shared behaviour of the Krylov solvers: checked tolerances (`rtol`, `atol`),
    the `norm` of the stopping rule, and `max_steps` (`None`: 10 × the problem
    size)."""

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree[Array]], Scalar]]
    max_steps: AbstractVar[int | None]

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"`{name}` must be a Python float (it is static data), got "
                    f"{type(value).__name__}."
                )
            if not value >= 0:
                raise ValueError(f"`{name}` must be nonnegative, got {value}.")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool)
            or not isinstance(self.max_steps, int)
            or self.max_steps < 0
        ):
            raise ValueError(
                "`max_steps` must be None or a nonnegative int, got "
                f"{self.max_steps!r}."
            )
        if self.rtol == 0 and self.atol == 0 and self.max_steps is None:
            raise ValueError(
                "`rtol` and `atol` are both zero and `max_steps` is None: the solver "
                "could never stop. Set a nonzero `rtol` or `atol`, or a `max_steps`."
            )
        if not callable(self.norm):
            raise TypeError(f"`norm` must be callable, got {type(self.norm).__name__}.")

    def checked_options(
        self,
        operator: AbstractLinearOperator,
        options: dict[str, Any],
        right_preconditioner: bool = False,
    ) -> tuple[AbstractLinearOperator | None, PyTree[Array] | None]:
        """`(preconditioner, y0)` from `options`, checked against the operator
        (called from `init` too, so that bad options fail before any solve)."""
        precond = preconditioner_of(options, operator, right=right_preconditioner)
        return precond, y0_of(options, operator)

    def resolve_max_steps(self, operator: AbstractLinearOperator) -> int:
        if self.max_steps is None:
            return 10 * max(operator.in_size(), operator.out_size())
        return self.max_steps

    def tolerance(self, vector: PyTree[Array]) -> Scalar:
        """`atol + rtol * norm(b)`: the bound on `norm(b - A y)` that is success."""
        return self.atol + self.rtol * self.norm(vector)


def stats_of(num_steps: Array, max_steps: int) -> dict[str, Array]:
    return {
        "num_steps": num_steps,
        "max_steps": jnp.asarray(max_steps, dtype=num_steps.dtype),
    }


def result_of(
    converged: Array,
    breakdown: Array | bool = False,
    stagnation: Array | bool = False,
    conlim: Array | bool = False,
) -> RESULTS:
    """The result code: success (verified on a true residual) first, then the
    reason the iteration stopped; otherwise the step budget ran out."""
    result = RESULTS.where(conlim, RESULTS.conlim, RESULTS.max_steps_reached)
    result = RESULTS.where(stagnation, RESULTS.stagnation, result)
    result = RESULTS.where(breakdown, RESULTS.breakdown, result)
    return RESULTS.where(converged, RESULTS.successful, result)


def adapted_tolerance(
    estimate: Array, true_norm: Array, tol: Array, factor: Array
) -> Array:
    """The threshold for a solver's cheap 2-norm residual estimate that should mean
    `norm(r) <= tol`.

    At a verification point we know both the estimate and the true `norm(r)`, so
    the estimate that corresponds to `tol` is `estimate * tol / norm(r)` (exact when
    `norm` is the 2-norm and the estimate is exact). `factor` (at most 1) is
    halved each time an inner iteration stopped on this threshold but the true
    residual then failed, as SciPy's GMRES does with its `ptol`.
    """
    ratio = jnp.minimum(factor, safe_div(tol, true_norm))
    return estimate * ratio
