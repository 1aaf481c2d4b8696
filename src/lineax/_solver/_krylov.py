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
- The outer loop is one helper, `iterate`, shared by every method: it runs the
  method's inner iteration for a pass, verifies on a true residual, keeps the best
  iterate by true residual (returned whenever the solve does not succeed), adapts
  the inner threshold with one rule, and stops on stagnation (no new best true
  residual in `patience` verifications; or, for MINRES and LSMR, which verify every
  `CHECK_EVERY` steps, the method's estimate falling by `GAP` while the true
  quantity it estimates did not even halve) with `RESULTS.stagnation`. Each pass makes
  at least one step, so every pass makes progress and the loop ends within
  `max_steps` steps plus one verification per pass.
- The right-hand side is scaled by a power of two (exact in floating point) before
  the iteration, so `b` and `2^k b` give bit-identical iterations and `1e±20 b`
  the same iteration count, and in-loop norms neither overflow nor underflow.
  (With an initial guess, by the larger of `b` and the residual `b - A y0`, the
  latter at most `2^64` times `b` in float32, see `_excess_scale`; the
  verification then uses the solver's own, guarded, norm. BiCGStab and MINRES
  make each fresh start in the units of its residual, see `Iteration.rescue`.)
  GMRES, FGMRES, MINRES, BiCGStab and LSMR scale the operator too, by a power of
  two estimated from one product made before the first step (see
  `Problem.op_inverse`), so the same holds for `A` and `2^k A` or `1e±20 A`. (CG
  and its variants need not: their in-loop quantities do not square `||A||`;
  they break down, reported, only for operators near the ends of the range,
  1e-33 or 1e36 in float32, and the scaling cost 21% of CG's compile time. They
  do scale the Gram operator of `Normal`, which squares `A`'s scale, see
  `SCALE_OPERATOR`.)
- Loops are `lax.while_loop`s. Under `vmap`, JAX runs a batched loop until every
  element is done and keeps the carry of finished elements unchanged (it selects
  between the old and new carry with the per-element predicate), so each element
  stops on its own; the bodies avoid producing NaN for finished elements anyway.
  The outer loop's body still runs for finished elements (its result discarded):
  their passes make no steps, so that they do not hold up the others.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, PyTree, Scalar

# (`tree_sub` is also imported from here by the solvers.)
from .._misc import (
    check_static_float,
    HeldArrays,
    lineax_class_named,
    manual_axes,
    select,
    structure_of,
    tree_sub,
    varying_like,
)
from .._norm import max_norm, rms_norm, tree_dot, two_norm
from .._operator.base import (
    AbstractLinearOperator,
    check_structures_equal,
    conj,
    has_no_precision,
    is_negative_semidefinite,
    is_positive_semidefinite,
    linearise,
)
from .._solution import RESULTS, results_where
from .base import AbstractLinearSolver, check_square, statistics_wanted


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


def tree_where(pred: Any, x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda xi, yi: select(pred, xi, yi), x, y)


def tree_zeros(structure: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    return jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)


def norm2(x: PyTree[Array]) -> Scalar:
    """The 2-norm, as `sqrt(<x, x>)`: one reduction, used inside the loops (where
    the overflow guard of `two_norm` is not worth a second pass)."""
    return jnp.sqrt(jnp.real(tree_dot(x, x)))


def safe_div(num: ArrayLike, den: Array) -> Array:
    """`num / den`, and 0 where `den == 0` (never NaN from a finished element)."""
    zero = den == 0
    return select(zero, 0, num / select(zero, 1, den))


def counts_exactly(dtype: Any, max_steps: int) -> bool:
    """Whether floats of `dtype` count steps up to `max_steps` exactly (a step
    count carried among a method's stacked scalars, see `Iteration.steps`)."""
    return max_steps < 2 ** (jnp.finfo(dtype).nmant + 1)


def real_dtype(structure: PyTree[jax.ShapeDtypeStruct]) -> Any:
    dtypes = [x.dtype for x in jtu.tree_leaves(structure)]
    return jnp.finfo(jnp.result_type(*dtypes)).dtype


def eps_of(structure: PyTree[jax.ShapeDtypeStruct]) -> float:
    """Machine epsilon of the (real) working precision."""
    return float(jnp.finfo(real_dtype(structure)).eps)


#
# Solver state and options.
#

# A key of the options that `Normal` hands its Krylov inner solver (never a
# user's: `linear_solve` accepts only a solver's `option_keys`): the operator, a
# Gram operator `A^H A` whose scale is `A`'s squared, is to be scaled by a power
# of two (see `Problem.op_inverse`) by CG and its variants too, which otherwise do
# not (see `AbstractDefiniteKrylovSolver.definite_problem`).
SCALE_OPERATOR = "_scale_operator"


class KrylovState(eqx.Module):
    """State of the Krylov solvers: the operator itself (a Krylov solver does no
    up-front work), whether it is solved as its negation (CG on a negative
    definite operator), and whether the `preconditioner` option applies on the left
    (LSMR's transposed solve: see `AbstractKrylovSolver.transpose`)."""

    held: HeldArrays  # the operator, with arrays as its only leaves
    negative: bool = eqx.field(static=True)
    left: bool = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator,
        negative: bool = False,
        left: bool = False,
    ):
        # Linearised (as lineax 0.1.1's Krylov solvers did): a Krylov solve applies
        # the operator at several places (the loop body, the verified true
        # residual, the solves of a JVP and of a transpose), and a Jacobian
        # operator's `mv` traced the user's function again at each of them (a
        # GMRES solve of `JacobianLinearOperator(f, x)`: `f` traced 5 times, 8
        # under `jax.grad`). Linearised, `f` is traced once, here, and computed
        # once per solve rather than on every product.
        self.held = HeldArrays(linearise(operator))
        self.negative = negative
        self.left = left

    @property
    def operator(self) -> AbstractLinearOperator:
        return self.held.value


def check_definite_preconditioner(options: dict[str, Any], solver_name: str) -> None:
    """Raise a ValueError if the `preconditioner` option is known not to be
    positive (semi)definite: CG and MINRES rely on it (they work in the inner
    product it defines), and an indefinite one makes them fail or, worse, stop at
    a wrong answer.

    Only tags can say so. A lineax preconditioner's tags are complete (see
    `AbstractPreconditioner.complete_tags`), so one without a definiteness tag
    (e.g. ILU, or Jacobi of an indefinite operator) is refused; an operator of the
    user's own without tags is accepted, as its definiteness is just unknown."""
    precond = options.get("preconditioner", None)
    if (
        isinstance(precond, AbstractLinearOperator)
        and getattr(precond, "complete_tags", False)
        and not is_positive_semidefinite(precond)
    ):
        if is_negative_semidefinite(precond):
            # (Every lineax preconditioner of a negative definite operator is
            # negative definite, as an approximate inverse of it is: the message
            # below, about building it from a definite operator, misled there.)
            raise ValueError(
                f"`lx.{solver_name}` needs a positive definite `preconditioner`: "
                "for a negative definite operator `A` it solves `(-A) x = -b`, so "
                f"the preconditioner must approximate `(-A)⁻¹`, but the "
                f"{type(precond).__name__} given is negative definite (an "
                "approximation of `A⁻¹`). Pass its negation, `-preconditioner`, "
                "or build it from `-operator`."
            )
        raise ValueError(
            f"`lx.{solver_name}` needs a positive definite `preconditioner` (for a "
            "negative definite operator: one approximating the inverse of its "
            f"negation), but the {type(precond).__name__} given is not tagged "
            "positive semidefinite (it would be if the operator it was built from "
            "were tagged so and it preserved that). Use `lx.GMRES` or "
            "`lx.FlexibleCG`, which accept any preconditioner."
        )


def preconditioner_of(
    options: dict[str, Any],
    operator: AbstractLinearOperator,
    right: bool = False,
    left: bool = False,
) -> AbstractLinearOperator | None:
    """The `preconditioner` option, checked; `None` means the identity (and costs
    nothing: no identity operator is applied).

    A preconditioner approximates the inverse of `operator`, so maps its output
    space to its input space; with `right=True` (LSMR) it maps the input space to
    itself, and with `right=True, left=True` (LSMR's transposed solve) the output
    space to itself.
    """
    precond = options.get("preconditioner", None)
    if precond is None:
        return None
    if not isinstance(precond, AbstractLinearOperator):
        # (Options reach here traced: an array shows as a tracer, so say "array".)
        if eqx.is_array(precond):
            got = (
                f"an array of shape {tuple(precond.shape)}; wrap a matrix as "
                "`lx.MatrixLinearOperator(matrix)`"
            )
        elif isinstance(precond, type):
            got = (
                f"the class `{precond.__name__}`; build one from the operator, e.g. "
                f"`lx.{precond.__name__}(operator)`"
            )
        elif isinstance(precond, str):
            named = lineax_class_named(
                precond, AbstractLinearOperator, suffix="Preconditioner"
            )
            example = "JacobiPreconditioner" if named is None else named.__name__
            got = (
                f"the string {precond!r}; preconditioners are operators built from "
                f"the operator, e.g. `lx.{example}(operator)`"
            )
        else:
            got = type(precond).__name__
        raise ValueError(
            "The `preconditioner` option must be a `lineax.AbstractLinearOperator` "
            f"(approximating the inverse of the operator), got {got}."
        )
    if right and left:
        space, name = operator.out_structure(), "output"
        in_space, in_name = space, name
    elif right:
        space, name = operator.in_structure(), "input"
        in_space, in_name = space, name
    else:
        space, name = operator.in_structure(), "input"
        in_space, in_name = operator.out_structure(), "output"
    check_structures_equal(
        precond.in_structure(),
        in_space,
        f"The `preconditioner`'s input structure must be the operator's {in_name} "
        "structure",
        expected=True,
    )
    check_structures_equal(
        precond.out_structure(),
        space,
        f"The `preconditioner`'s output structure must be the operator's {name} "
        "structure",
        expected=True,
    )
    return precond


def apply(precond: AbstractLinearOperator | None, x: PyTree[Array]) -> PyTree[Array]:
    return x if precond is None else precond.mv(x)


def y0_of(
    options: dict[str, Any], operator: AbstractLinearOperator
) -> PyTree[Array] | None:
    """The `y0` option (initial guess), checked; `None` if absent.

    Leaves of a dtype that the operator's input dtype holds exactly (a float32
    guess, e.g. from a cheaper solve, for a float64 operator), integers and Python
    numbers are cast to it, as the right-hand side is (see `linear_solve`);
    others (complex for a real operator) are an error. (Integers were cast only
    where NumPy casts them safely: an int64 guess for a float32 operator was
    refused as "got float64[3]", the dtype it would have been converted to.)"""
    y0 = options.get("y0", None)
    if y0 is None:
        return None
    in_structure = operator.in_structure()
    if jtu.tree_structure(y0) == jtu.tree_structure(in_structure):

        def cast(leaf, struct):
            if not eqx.is_array_like(leaf) or jnp.shape(leaf) != struct.shape:
                return leaf
            dtype = jnp.result_type(leaf)
            target = jnp.dtype(struct.dtype)
            if dtype == target:
                return leaf
            complex_to_real = jnp.issubdtype(
                dtype, jnp.complexfloating
            ) and not jnp.issubdtype(target, jnp.complexfloating)
            if (
                not jnp.issubdtype(dtype, jnp.inexact)
                or np.can_cast(dtype, target, "safe")
                or (has_no_precision(leaf) and not complex_to_real)
            ):
                return jnp.asarray(leaf).astype(target)
            return leaf

        y0 = jtu.tree_map(cast, y0, in_structure)
    check_structures_equal(
        structure_of(y0, "y0"),
        operator.in_structure(),
        "The `y0` option (initial guess) must have the operator's input structure",
        expected=True,
    )
    return y0


def initial_residual(
    mv: Callable, vector: PyTree[Array], y0: PyTree[Array] | None, structure
) -> tuple[PyTree[Array], PyTree[Array]]:
    """`(x0, b - A x0)`; no matrix-vector product when there is no initial guess."""
    if y0 is None:
        return tree_zeros(structure), vector
    return y0, tree_sub(vector, mv(y0))


def _options_for(
    options: dict[str, Any],
    mapped: Callable[[AbstractLinearOperator], AbstractLinearOperator],
) -> dict[str, Any]:
    """Options for the solve with `mapped(operator)` (its transpose or its
    conjugate): the preconditioner mapped alike, `y0` dropped (it is an initial
    guess for a different problem, of a different structure for a transpose)."""
    new = {k: v for k, v in options.items() if k not in ("y0", "preconditioner")}
    precond = options.get("preconditioner", None)
    if precond is not None:
        new["preconditioner"] = mapped(precond)
    return new


#
# Tolerances, the stopping rule, results.
#


MAX_INT32 = 2**31 - 1


class AbstractKrylovSolver(AbstractLinearSolver[KrylovState]):
    """Shared behaviour of the Krylov solvers: checked tolerances (`rtol`, `atol`),
    the `norm` of the stopping rule, `max_steps` (`None`: 10 × the problem size;
    that many restart cycles for GMRES and FGMRES),
    the residual history (`history_length`), the progress print (`verbose`), and
    `transpose`/`conj` of the state."""

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable[[PyTree[Array]], Scalar]]
    max_steps: AbstractVar[int | None]
    history_length: AbstractVar[int | None]
    verbose: AbstractVar[bool | int]

    option_keys = frozenset({"preconditioner", "y0"})  # see `checked_options`
    # Whether the `preconditioner` option acts on the operator's input space (LSMR).
    right_preconditioned = False

    def __check_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            check_static_float(value, name)
            if not value >= 0:
                raise ValueError(f"`{name}` must be nonnegative, got {value}.")
        for name in ("max_steps", "history_length"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(
                    f"`{name}` must be None or a nonnegative int, got {value!r}."
                )
        # Steps are counted in int32 (also with x64); a larger budget
        # (`max_steps=10**10` for "no limit") failed deep in JAX with an
        # OverflowError ("while parsing an argument to a jitted computation").
        if self.max_steps is not None and self.max_steps > MAX_INT32:
            raise ValueError(
                f"`max_steps` must be at most 2**31 - 1 = {MAX_INT32} (steps are "
                f"counted in int32), got {self.max_steps}."
            )
        if self.rtol == 0 and self.atol == 0 and self.max_steps is None:
            raise ValueError(
                "`rtol` and `atol` are both zero and `max_steps` is None: the solver "
                "could never stop. Set a nonzero `rtol` or `atol`, or a `max_steps` "
                "(with both tolerances zero, exactly `max_steps` steps are made)."
            )
        if not callable(self.norm):
            raise TypeError(f"`norm` must be callable, got {type(self.norm).__name__}.")
        if not isinstance(self.verbose, (bool, int)) or self.verbose < 0:
            raise ValueError(
                "`verbose` must be a bool or a nonnegative int (print every that "
                f"many steps), got {self.verbose!r}."
            )

    def checked_options(
        self,
        operator: AbstractLinearOperator,
        options: dict[str, Any],
        left: bool = False,
    ) -> tuple[AbstractLinearOperator | None, PyTree[Array] | None]:
        """`(preconditioner, y0)` from `options`, checked against the operator
        (called from `init` too, so that bad options fail before any solve)."""
        precond = preconditioner_of(
            options, operator, right=self.right_preconditioned, left=left
        )
        return precond, y0_of(options, operator)

    def square_state(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        """`init` of a method for any square operator (GMRES, FGMRES, BiCGStab):
        the operator and the options checked, nothing computed."""
        check_square_krylov(operator, type(self).__name__)
        self.checked_options(operator, options)
        return KrylovState(operator)

    def scaled_problem(
        self,
        state: KrylovState,
        vector: PyTree[Array],
        options: dict[str, Any],
        lift: bool = True,
    ) -> tuple[AbstractLinearOperator | None, "Problem"]:
        """`(preconditioner, problem)` for the methods that scale the operator
        too (GMRES, FGMRES, BiCGStab, MINRES; see `problem`)."""
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        problem = self.problem(
            operator, vector, y0, precond=precond, scale_operator=True, lift=lift
        )
        return precond, problem

    def resolve_max_steps(self, operator: AbstractLinearOperator) -> int:
        if self.max_steps is None:
            sizes = (operator.in_size(), operator.out_size())
            if not all(isinstance(size, int) for size in sizes):
                # The loop's bounds and its residual history are laid out at
                # trace time, from the step budget.
                raise ValueError(
                    "`max_steps=None` means 10 times the size of the operator, "
                    "which is symbolic here (`jax.export.symbolic_shape`): pass an "
                    "explicit `max_steps`."
                )
            return 10 * max(sizes)
        return self.max_steps

    def checked_norm(self, x: PyTree[Array]) -> Scalar:
        """`norm(x)`, with the solver's `norm`, checked to be a scalar."""
        return _checked_norm(self.norm)(x)

    def tolerance(self, vector: PyTree[Array]) -> Scalar:
        """`atol + rtol * norm(b)`: the bound on `norm(b - A y)` that is success."""
        return self.atol + self.rtol * self.checked_norm(vector)

    def problem(
        self,
        operator: AbstractLinearOperator,
        vector: PyTree[Array],
        y0: PyTree[Array] | None,
        mv: Callable | None = None,
        precond: AbstractLinearOperator | None = None,
        scale_operator: bool = False,
        lift: bool = True,
    ) -> "Problem":
        """The scaled problem a method iterates on (see `Problem`).

        With `scale_operator`, the operator is scaled too, by a power of two
        estimated from one product with `A P` (`precond`'s `P`, on the right): see
        `Problem.op_inverse`. `lift=False` for a method whose tests depend on the
        size of `b` (MINRES: its estimate of `|A|` holds `|b|`): an operator
        smaller than 1 is then scaled on the input side instead."""
        _check_one_dtype(operator, type(self).__name__)
        mv = checked_mv(operator, type(self).__name__, mv)
        structure = operator.in_structure()
        rdtype = real_dtype(structure)
        scale, inverse = _power_of_two_scale(vector, rdtype)
        vector = tree_scale(inverse, vector)
        initial_mv = 0 if y0 is None else 1
        one = jnp.ones((), rdtype)
        op_scale, op_inverse = one, None
        if scale_operator:
            op_scale, op_inverse = operator_scale(mv(apply(precond, vector)), rdtype)
            mv = _scaled_operator(mv, op_inverse, both_sides=not lift)
            initial_mv += 1
            # An operator smaller than 1 (`2^-s > 1`, scaled up on the output
            # side) would make its products with the small vectors late in a
            # solve subnormal, flushed to zero on CPU: float32 entries ~1e-34
            # stagnated. The right-hand side (so every vector, and the iterate)
            # is made larger instead (by up to the square root of `2^-s`, see
            # `_lift`), which keeps both the products and the iterate in range;
            # exact (a power of two) and without a multiplication per product.
            # (Scaling the product's input instead was a pass over memory before
            # each product under `vmap`, see `_scaled_operator`.)
            if lift:
                up, down = _lift(op_inverse, rdtype)
                vector = tree_scale(up, vector)
                scale, inverse = scale * down, inverse * up
        if y0 is not None:
            y0 = tree_scale(op_scale, tree_scale(inverse, y0))
        x0, r0 = initial_residual(mv, vector, y0, structure)
        if y0 is not None:
            # An initial guess far larger than the solution it corrects (a warm
            # start near a root: `b` of 1e-20 and `y0` of 1 in float32, or `b = 0`
            # and `y0` of 1e30) leaves a residual far larger than `b`, and in the
            # units of `b` its squared norms overflowed: every method reported a
            # breakdown at its first step and returned `y0`. The units are then
            # those of the residual.
            up, down = _excess_scale(r0, vector, rdtype)
            vector, x0, r0 = (tree_scale(down, v) for v in (vector, x0, r0))
            scale, inverse = scale * up, inverse * down
        # (With an initial guess, `b` and the residuals late in the solve may be
        # far below the units of the initial residual: 1e-30 of it for `y0` of
        # 1e15 and `b` of 1e-15, whose squares underflow to zero in float32.
        # `sqrt(<r, r>)` then made both `norm(b)`, hence the target, and the
        # verified residual 0, and a solve with a relative error of 3e10 passed as
        # `successful`. The solver's own norm is guarded against that.)
        norm = _checked_norm(self.scaled_norm() if y0 is None else self.norm)
        user_norm = not is_builtin_norm(self.norm)
        if user_norm:
            # A user's norm need not be homogeneous (`lx.internal.sum_squares`, a
            # squared norm): evaluated in these units, with `atol` scaled as for
            # a norm, its `atol` test passed 1000 times above `atol` for `b` of
            # 1e3, reported `successful`. It is evaluated in the user's units,
            # then scaled as a norm (the identity for a homogeneous norm), so that
            # `norm(r) <= tol` here is the user's `norm(r) <= atol + rtol norm(b)`.
            raw_norm = norm
            norm = lambda x: raw_norm(tree_scale(scale, x)) * inverse  # noqa: E731
        bnorm = norm(vector)
        # A `b` holding an infinity has an infinite norm, hence an infinite target,
        # and `inf <= inf` would pass the first convergence test at `x = 0` (a zero
        # solution, "successful"). A NaN target passes no test: the solve stops on
        # its non-finite residual instead, reported as a failure.
        usable = jnp.isfinite(bnorm)
        if user_norm:
            # A user's `norm` that is zero on a nonzero `b` (`lambda x: 0.0`, or a
            # seminorm blind to `b`) made `x = 0` pass the first convergence test:
            # the zero vector returned as `successful` by every method. It is not
            # a norm of this problem, so the solve fails instead (a NaN target).
            nonzero = jtu.tree_reduce(
                jnp.logical_or, [jnp.any(leaf != 0) for leaf in jtu.tree_leaves(vector)]
            )
            usable = usable & ((bnorm != 0) | ~nonzero)
        # Without `atol` (a static 0, the default) its term is left out: `0 *
        # inverse` is exactly 0 (`inverse` is a finite power of two), but it made
        # every kernel that reads the target (the initial packings of the book and
        # of a method's scalars) read the scale of `b` too, and with the operator's
        # scale (BiCGStab, GMRES) that scale was then a kernel of its own before
        # the loops. The target is the same bit for bit.
        target = self.rtol * bnorm
        if self.atol != 0:
            target = self.atol * inverse + target
        tol = select(usable, target, jnp.nan)
        return Problem(
            mv=mv,
            norm=norm,
            vector=vector,
            x0=x0,
            r0=r0,
            tol=tol.astype(rdtype),
            scale=scale,
            max_steps=self.resolve_max_steps(operator),
            fixed=self.rtol == 0 and self.atol == 0,
            eps=eps_of(structure),
            rdtype=rdtype,
            initial_mv=initial_mv,
            op_inverse=op_inverse,
            warm=y0 is not None,
            user_norm=user_norm,
        )

    def scaled_norm(self) -> Callable[[PyTree[Array]], Scalar]:
        """The solver's `norm`, for vectors in the units of `Problem` (`b` divided by
        a power of two so that `max|b|` is in `[0.5, 1)`).

        In those units `two_norm`'s overflow guard (a max-reduction, then a sum of
        rescaled squares: two passes and two kernels) is not needed, and
        `sqrt(<x, x>)` is used: `<b, b>` is at most the size of the problem, and a
        residual overflows only if the iteration diverged by 1e19 (float32), which
        is then reported as a non-finite residual. Squares underflow only for
        entries below 1e-19 (float32) of `max|b|`, far below any reachable
        tolerance.
        """
        return norm2 if self.norm is two_norm else self.norm

    def transpose(self, state: KrylovState, options: dict[str, Any]):
        # A right preconditioner `N` of `A` (`A N` well conditioned) is a left
        # preconditioner `N^T` of `A^T` (`N^T A^T` well conditioned): for the
        # consistent transposed system of a full-column-rank `A`, left
        # preconditioning keeps the minimum-norm solution.
        left = (not state.left) if self.right_preconditioned else state.left
        new = KrylovState(state.operator.transpose(), state.negative, left)
        return new, _options_for(options, lambda op: op.transpose())

    def conj(self, state: KrylovState, options: dict[str, Any]):
        new = KrylovState(conj(state.operator), state.negative, state.left)
        return new, _options_for(options, conj)

    def assume_full_rank(self) -> bool:
        return True


# The norms lineax defines (`norm2` is `two_norm` in the loops' units, see
# `scaled_norm`). Each returns a scalar array and is homogeneous, so what a user's
# norm needs does not apply to them: the check of its value (`_checked_norm`), its
# evaluation in the user's units and the NaN target where it vanishes on a nonzero
# `b` (`AbstractKrylovSolver.problem`, `Problem.user_norm`). One list for both, so
# that a norm added to lineax is exempted from all of them or from none.
_BUILTIN_NORMS = (norm2, two_norm, max_norm, rms_norm)


def is_builtin_norm(norm: Callable) -> bool:
    """Whether `norm` is one of lineax's own norms (see `_BUILTIN_NORMS`).
    (Identity, not `in`: a user's norm may be an object whose `==` is not a
    bool, or that cannot be hashed.)"""
    return any(norm is builtin for builtin in _BUILTIN_NORMS)


def _checked_norm(
    norm: Callable[[PyTree[Array]], Any],
) -> Callable[[PyTree[Array]], Scalar]:
    """`norm`, its value made an array and checked to be a scalar at trace time.

    A user's norm returning a Python float (`lambda x: 1.0`) failed deep in the
    loops with "'float' object has no attribute 'astype'", and one returning a
    1-element array (`jnp.linalg.norm(x, keepdims=True)`, `norm(x)[None]`) with
    "Cannot stack arrays with different numbers of dimensions": neither named the
    `norm`."""
    if is_builtin_norm(norm):
        return norm

    def checked(x: PyTree[Array]) -> Scalar:
        value = jnp.asarray(norm(x))
        if value.shape != ():
            raise ValueError(
                "The solver's `norm` must return a scalar (an array of shape ()), "
                f"got an array of shape {value.shape}. Reduce over every element "
                "of the vector, e.g. `lambda x: jnp.max(jnp.abs(x))`."
            )
        return value

    return checked


def check_square_krylov(operator: AbstractLinearOperator, name: str) -> None:
    """`check_square`, and equal input and output structures: the solvers for
    square operators add and combine vectors of the input (the iterate) with
    vectors of the output (the residual), so a different PyTree of the same size
    is not enough (it failed inside JAX's tracing, with a message about
    closure-converted functions)."""
    check_square(operator, name)
    check_structures_equal(
        operator.in_structure(),
        operator.out_structure(),
        f"`lx.{name}` needs an operator whose input and output structures are "
        "the same (it combines iterates and residuals); wrap the operator to "
        "map one to the other, or use a direct solver (`lx.LU()`), which "
        "accepts different structures of the same size. The operator's input "
        "and output structures",
    )


def check_product_structure(operator: AbstractLinearOperator, name: str) -> None:
    """Raise a ValueError naming the operator's class unless its `mv` returns its
    `out_structure()` (see `checked_mv`), tested by tracing one product: for a
    composition that feeds the product to another operator before a Krylov
    method sees it (`Normal`'s `A^H A`)."""
    _check_product(jax.eval_shape(operator.mv, operator.in_structure()), operator, name)


def checked_mv(
    operator: AbstractLinearOperator, name: str, mv: Callable | None = None
) -> Callable:
    """`mv` (default `operator.mv`), raising a ValueError naming the operator's
    class, at trace time, where a product does not have the operator's
    `out_structure()`. A direct solver reads `as_matrix()` only, but a Krylov
    method carries the products in its loops: a user's operator whose `mv`
    disagreed with its structures (a wrong shape, dtype or PyTree) failed deep in
    `lax` ("dot_general requires contracting dimensions to have the same shape",
    "dynamic_update_slice requires arguments to have the same dtypes"). (Checked
    on the products the method makes, not by tracing one more: that would trace
    a user's function once more in every solve.)"""
    mv = operator.mv if mv is None else mv

    def checked(vector):
        product = mv(vector)
        _check_product(product, operator, name)
        return product

    return checked


def _check_product(product: Any, operator: AbstractLinearOperator, name: str) -> None:
    check_structures_equal(
        jtu.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), product),
        operator.out_structure(),
        f"`lx.{name}` applies the operator with its `mv`, but "
        f"`{type(operator).__name__}.mv` returns a different structure from the "
        "operator's `out_structure()`; make them agree",
        expected=True,
    )


def _check_one_dtype(operator: AbstractLinearOperator, name: str) -> None:
    """A Krylov method combines the leaves of its vectors in one recurrence (their
    inner products are sums over all leaves; its scalars multiply every leaf), so
    they must share a dtype: with mixed ones the loops' carries change dtype from
    one step to the next, which JAX rejects with a message about `while_loop`."""
    leaves = jtu.tree_leaves((operator.in_structure(), operator.out_structure()))
    dtypes = sorted({jnp.dtype(x.dtype).name for x in leaves})
    if len(dtypes) > 1:
        raise ValueError(
            f"`lx.{name}` needs every leaf of the operator's input and output "
            f"structures to have one dtype, got {', '.join(dtypes)}. Cast the "
            "operator's arrays and the vector to one dtype (e.g. with "
            "`jax.tree.map(lambda x: x.astype(jnp.float64), ...)`), or use a direct "
            "solver (`lx.LU()`, `lx.QR()`, `lx.SVD()`), which accepts mixed dtypes."
        )


def _field_format(rdtype: Any) -> tuple[Any, Any, int, int]:
    """`(wide, itype, bias, nmant)`: the float type the scale is computed in (at
    least single precision, where the subnormals of half precision are normal
    numbers), the integer type of its bits, its exponent bias and mantissa
    bits."""
    wide = jnp.dtype(rdtype) if jnp.finfo(rdtype).bits >= 32 else jnp.dtype(jnp.float32)
    info = jnp.finfo(wide)
    itype = jnp.int32 if info.bits == 32 else jnp.int64
    return wide, itype, info.maxexp - 1, info.nmant


def _exponent_field(x: Array, rdtype: Any) -> Array:
    """The exponent field of `x` (its bits, the sign and mantissa masked off), in
    the format of `_field_format(rdtype)`."""
    wide, itype, bias, nmant = _field_format(rdtype)
    mask = jnp.asarray((2 * bias + 1) << nmant, itype)
    return lax.bitcast_convert_type(x.astype(wide), itype) & mask


def _scale_of_field(field: Array, rdtype: Any) -> tuple[Array, Array]:
    """`(2^s, 2^-s)` with `2^(s - 1) <= m < 2^s`, where `field` is the exponent
    field of `m` (`_exponent_field`); `(1, 1)` where `m` is zero, subnormal or not
    finite. Made with integer operations: cheap elementwise operations, which XLA
    computes inside the kernels that use them, where `frexp`, `ldexp` and a
    division are kernels of their own.

    `s` is clamped to the range where `2^s` and `2^-s` are normal numbers of
    `rdtype`: a vector whose largest entry is near the largest float (2^127 or more
    in float32) is scaled by 2^125, where `2^s` would be infinite; an operator of
    norm 2^20 in float16 by 2^14, as far as it goes, rather than not at all."""
    wide, itype, bias, nmant = _field_format(rdtype)
    mask = (2 * bias + 1) << nmant
    narrow = jnp.finfo(rdtype)
    lo = max(narrow.minexp, 1 - narrow.maxexp)
    hi = min(narrow.maxexp - 1, -narrow.minexp)
    # `m = 2^(e - bias) (1 + f)` has the field `e << nmant`, and `2^s`, `s = e -
    # bias + 1`, the bits `(e + 1) << nmant`: the field plus one unit, clamped in
    # that form (the bits of positive floats are ordered as the floats), and
    # `2^-s` the bits `(2 bias << nmant)` minus those. (Written on the bits
    # rather than on `s`: fewer operations, in each kernel XLA copies them into.
    # A non-finite `m`, whose field plus one overflows, is not usable.)
    unit = 1 << nmant
    # (`lax.clamp`: `jnp.clip` is a nested `jit`, see `_misc.select`.)
    bits = lax.clamp(
        jnp.asarray((lo + bias) * unit, field.dtype),
        field + unit,
        jnp.asarray((hi + bias) * unit, field.dtype),
    )
    usable = (field > 0) & (field < mask)  # a normal, finite number
    scale = lax.bitcast_convert_type(bits, wide)
    inverse = lax.bitcast_convert_type(2 * bias * unit - bits, wide)
    scale = select(usable, scale, 1).astype(rdtype)
    return scale, select(usable, inverse, 1).astype(rdtype)


def _power_of_two_scale(vector: PyTree[Array], rdtype: Any) -> tuple[Array, Array]:
    """`(2^e, 2^-e)` with `max|b| = m 2^e`, `0.5 <= m < 1` (clamped, see
    `_scale_of_field`); `(1, 1)` for a zero, subnormal or non-finite `b`. (A
    subnormal of single or double precision gives 1, as it did with `frexp` on
    CPU, where XLA flushes them to zero.)"""
    one = jnp.ones((), rdtype)
    # (Empty leaves have no largest entry: a problem of size 0 has scale 1.)
    leaves = [x for x in jtu.tree_leaves(vector) if x.size]
    if len(leaves) == 0:
        return one, one
    wide = _field_format(rdtype)[0]
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(wide) for x in leaves]))
    return _scale_of_field(_exponent_field(big, rdtype), rdtype)


def _excess_scale(
    r0: PyTree[Array], vector: PyTree[Array], rdtype: Any
) -> tuple[Array, Array]:
    """`(2^k, 2^-k)` where the largest entry of `r0` is `2^k` times that of `vector`
    (rounded to powers of two, see `_power_of_two_scale`; a zero `vector` counts
    as 1), or `(1, 1)` where it is not larger; `k` at most half the largest
    exponent of `rdtype` (64 in single precision).

    (Uncapped, `b` of 1e-25 and `y0` of 1e10 in float32 put `b` at 1e-36 of the
    units, the residuals at the target at 1e-41, subnormal and flushed to zero on
    CPU: the verification saw a zero residual, and MINRES, LSMR and BiCGStab
    passed answers with a relative error of 4e-3 as `successful`. Capped, the
    initial residual is up to `2^k` in the units, whose squares the methods'
    loops and the verification's guarded norm still hold.)"""
    r_scale, r_inverse = _power_of_two_scale(r0, rdtype)
    b_scale, b_inverse = _power_of_two_scale(vector, rdtype)
    larger = r_scale > b_scale
    cap = 2.0 ** (jnp.finfo(rdtype).maxexp // 2)
    up = jnp.minimum(r_scale * b_inverse, jnp.asarray(cap, rdtype))
    down = jnp.maximum(r_inverse * b_scale, jnp.asarray(1 / cap, rdtype))
    return select(larger, up, 1), select(larger, down, 1)


def operator_scale(product: PyTree[Array], rdtype: Any) -> tuple[Array, Array]:
    """`(2^s, 2^-s)` with `2^(s - 1) <= max|product| < 2^s` (over the real and
    imaginary parts; clamped, see `_scale_of_field`), for `product` a product of
    the operator with a vector whose largest entry is in `[0.5, 1)`: a
    power-of-two estimate of the operator's scale. `(1, 1)` where that is zero,
    subnormal or not finite.

    The largest exponent is found as the largest exponent *field* (the bits with
    sign and mantissa masked off), reduced as the floats those bits are (`2^e`,
    0 or infinity: nonnegative, so ordered as the fields): XLA fuses the masking
    with the operator's last elementwise operations, and the reduction is one
    kernel of XLA:CPU's library. (An integer max-reduction of 4096 fields was
    three kernels, from the tree-reduction rewrite; a float max-reduction of
    `|product|` itself took the terms of a stencil as operands, each computed by
    a kernel of its own.)"""
    one = jnp.ones((), rdtype)
    leaves = [x for x in jtu.tree_leaves(product) if x.size]  # (as above)
    if len(leaves) == 0:
        return one, one
    parts = []
    for x in leaves:
        parts += [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    wide, itype = _field_format(rdtype)[:2]

    def as_float(field):
        return lax.bitcast_convert_type(field, wide)

    # The product behind a barrier: XLA otherwise moves the reshape that ends an
    # operator's action on an image (a stencil on `(N, N)`, flattened) past the
    # masking, and compiles the product with its masking as a 2-D kernel, which
    # took XLA:CPU three times as long to compile as the 1-D one (75 against 26
    # ms for a 64 x 64 stencil, the largest kernel of a BiCGStab solve). The
    # barrier costs no kernel: the masking is still fused with the product.
    parts = [lax.optimization_barrier(x) for x in parts]
    fields = [jnp.max(as_float(_exponent_field(x, rdtype))) for x in parts]
    field = fields[0] if len(fields) == 1 else jnp.max(jnp.stack(fields))
    return _scale_of_field(lax.bitcast_convert_type(field, itype), rdtype)


def _lift(inverse: Array, rdtype: Any) -> tuple[Array, Array]:
    """`(2^h, 2^-h)`, `h = min(floor(k / 2), m)` for `inverse = 2^k` with `k > 0`,
    else `(1, 1)`, where `2^(8 m)` is about the largest float of `rdtype` (m = 16
    in single precision, 128 in double, 2 in half): the vectors stay small enough
    that the methods' squared norms, divided by `eps^2` in their rounding-level
    tests, stay finite. With integer operations on the bits of `inverse`, a
    positive normal power of two, `(k + bias) << nmant` (see `_scale_of_field`)."""
    wide, itype, bias, nmant = _field_format(rdtype)
    bits = lax.bitcast_convert_type(inverse.astype(wide), itype)
    # `(k << nmant) >> (nmant + 1)` is `floor(k / 2)`.
    shift = jnp.asarray(nmant + 1, itype)
    floor_half = lax.shift_right_arithmetic(bits - (bias << nmant), shift)
    cap = jnp.asarray(jnp.finfo(rdtype).maxexp // 8, itype)
    half = lax.clamp(jnp.zeros((), itype), floor_half, cap)
    up_bits = (half + bias) << nmant
    up = lax.bitcast_convert_type(up_bits, wide).astype(rdtype)
    down = lax.bitcast_convert_type((2 * bias << nmant) - up_bits, wide)
    return up, down.astype(rdtype)


def _scaled_operator(mv: Callable, inverse: Array, both_sides: bool) -> Callable:
    """`v -> 2^-s A v`: the operator divided by its scale (exactly, a power of
    two, so `A (2^-s v)` would round the same). On the output side: there the
    multiplication fuses into the product's consumers (the inner products and
    updates that read it), where on the input side XLA made it a pass over memory
    of its own before every product that is a library call (a matrix-vector
    product; under `vmap`, any `dot`): BiCGStab on 200 right-hand sides, n = 300,
    made two extra passes per step."""

    # An operator smaller than 1, whose products of small vectors would be
    # subnormal (flushed to zero on CPU: float32 entries ~1e-34 stagnated), is
    # met by a larger right-hand side (see `problem`), or with `both_sides` by
    # scaling its input up: each side then takes the part of `2^-s` that shrinks
    # nothing. (Input-side scaling alone failed the other way: an operator of
    # float32 entries ~1e34 underflowed its scaled inputs.)
    if both_sides:
        up, down = jnp.maximum(inverse, 1), jnp.minimum(inverse, 1)

        def scaled_both_sides(v):
            return tree_scale(down, mv(tree_scale(up, v)))

        return scaled_both_sides

    def scaled_mv(v):
        return tree_scale(inverse, mv(v))

    return scaled_mv


@dataclasses.dataclass(frozen=True)
class Problem:
    """A Krylov solve as a method iterates on it: the right-hand side divided by
    `scale` (a power of two), the initial iterate and residual, the tolerance in
    those units, and the step budget. `fixed` means `rtol = atol = 0`: exactly
    `max_steps` steps, reported successful (a fixed-iteration inexact solve)."""

    mv: Callable[[PyTree[Array]], PyTree[Array]]
    norm: Callable[[PyTree[Array]], Scalar]  # the solver's norm, in these units
    vector: PyTree[Array]
    x0: PyTree[Array]
    r0: PyTree[Array]
    tol: Array
    scale: Array
    max_steps: int
    fixed: bool
    eps: float
    rdtype: Any
    initial_mv: int
    # `2^-s` where the method iterates on the operator divided by `2^s`
    # (`AbstractKrylovSolver.problem`'s `scale_operator`), else `None`: its iterate
    # `x'` solves `(2^-s A) x' = b / scale`, so `x = scale 2^-s x'`. The residual
    # is unchanged, so are the tolerance and the statistics. A method whose in-loop
    # norms are of vectors that scale with the operator (`||A v||` for unit `v`:
    # GMRES's Hessenberg entries, MINRES's Lanczos scalars) needs it: `sqrt(<w,
    # w>)` overflows for an operator of norm 1e20 in float32 (1e155 in float64)
    # and underflows for 1e-20; with it `A` and `2^k A` give bit-identical
    # iterations, as `b` and `2^k b` do.
    op_inverse: Array | None = None
    # Whether the iteration starts from an initial guess (`y0`).
    warm: bool = False
    # Whether `norm` is the user's (not one of `_BUILTIN_NORMS`): its
    # target may be NaN at a zero norm of a nonzero `b` (see
    # `AbstractKrylovSolver.problem`), which the initial test must not pass.
    user_norm: bool = False


# A recurrence is started afresh (`Iteration.rescue`) only if the residual it
# started from was this many times that of `b`, and the true residual fell this many
# times below it since: so a solve at the floor of the dtype stops as before, and
# each fresh start is paid for by a 16-fold fall of the true residual.
RESCUE_GAP = 16.0


def rescue_allowed(start: Array, rnorm: Array, bnorm: Array) -> Array:
    """Whether a recurrence started from a residual of 2-norm `start` is started
    afresh from one of 2-norm `rnorm`, in a problem whose `b` has 2-norm `bnorm`
    (see `Iteration.rescue`)."""
    return (start > RESCUE_GAP * bnorm) & (RESCUE_GAP * rnorm <= start)


def first_pass_factor(rtol: float, eps: float) -> float:
    """The factor of the first pass's target (`adapted_tolerance`) where the initial
    residual already meets the tolerance: the estimate is to fall by `rtol` (at
    most 1, at least the dtype's `eps`). See `iterate`."""
    return max(min(rtol, 1.0), eps)


def adapted_tolerance(
    estimate: Array, true_norm: Array, tol: Array, factor: Array
) -> Array:
    """The threshold for a solver's cheap residual estimate that should mean
    `norm(r) <= tol`.

    At a verification point we know both the estimate and the true `norm(r)`, so
    the estimate that corresponds to `tol` is `estimate * tol / norm(r)` (exact when
    `norm` is the 2-norm and the estimate is exact). `factor` (at most 1) is
    halved each time an inner iteration stopped on this threshold but the true
    residual then failed, as SciPy's GMRES does with its `ptol` (after the
    method's `Iteration.free_misses` in a row). (It starts at `rtol` where the
    initial residual already meets `tol`: see `iterate`.)
    """
    ratio = jnp.minimum(factor, safe_div(tol, true_norm))
    return estimate * ratio


#
# The shared outer loop.
#


_Carry = TypeVar("_Carry")

# Verifications in a row without a new best true residual after which the solve
# stops with `stagnation` (GMRES: its `stagnation_iters`).
PATIENCE = 20
# Steps between true-residual checks of the methods whose passes otherwise end
# only on their estimate (MINRES, LSMR): without them, a pass on a problem whose
# tolerance is below the floor can run for thousands of steps before anything
# notices. One verification per this many steps (2% more products).
CHECK_EVERY = 50
# The fall of a method's estimate, with no halving of the true measure it
# estimates, that means stagnation (see `Iteration.progress`).
GAP = 16.0
# A pass whose recursive residual ends this far below the true one has run on
# rounding errors (see `Iteration.below_floor`); this many such passes without the
# true residual halving mean stagnation.
FLOOR_GAP = 4.0
FLOOR_PATIENCE = 3
# Default bound on the length of `stats["residual_history"]`.
HISTORY_CAP = 10_000
# The longest pass whose steps are recorded into a buffer of the pass's length
# (see `_history_buffer`).
HISTORY_BUFFER_CAP = 128


@dataclasses.dataclass(frozen=True)
class Iteration(Generic[_Carry]):
    """What a Krylov method gives the shared outer loop, `iterate`.

    - `step`: one step (`mv_per_step` operator products).
    - `estimate`: the method's cheap residual estimate (recorded in
        `residual_history`, and compared with the adapted tolerance to end a pass).
    - `squared`: `estimate` gives the square of the estimate (CG's `<r, r>`): the
        loop compares it with the squared threshold and takes the square root of
        the history once at the end, so that no step computes one.
    - `solution`: the current iterate.
    - `restart`: the carry to continue from after a verification that failed,
        given the iterate, its true residual and whether the pass ended on the
        estimate (rather than on `pass_length`).
    - `halted`: no further progress is possible (a breakdown, an invariant Krylov
        space, an estimated condition number over a limit); `halt_result` says
        which. A `restart` may clear it.
    - `settled`: an extra, method-specific reason to end a pass and verify, given
        the current tightening `factor` (LSMR's normal-equations estimate).
    - `ends_pass`: the pass cannot go on (GMRES: the Krylov space became
        invariant); unlike `halted`, the next pass starts afresh after `restart`.
    - `accept`: an extra success test on a true residual (LSMR's normal-equations
        test), given the carry, the iterate and its residual.
    - `pass_length`: the most steps per pass (CG's residual replacement, GMRES's
        restart length); `None`: a pass ends only on the estimate.
    - `verify_mv`: operator products per verification.
    - `patience`: verifications without a new best true residual before
        `stagnation`.
    - `progress`, `progress_estimate`: for the second stagnation test (off when
        `progress_estimate` is `None`): a true measure of progress, given the carry,
        the iterate, its residual and `rnorm`, and the method's recursive estimate
        of the same quantity in the same norm (equal in exact arithmetic: MINRES's
        `phibar` and the residual's 2-norm; LSMR's `||A^H r||`). When the estimate
        has fallen by `GAP` since the best true measure last halved, the recursion
        is running on rounding errors (the true residual has reached the floor the
        dtype allows) and the solve stops with `stagnation` at once, rather than
        after `patience` verifications (which, for a method that verifies only when
        its estimate passes a tightening threshold, can be thousands of steps).
        `progress` defaults to `rnorm`.
    - `accept_at_floor`: where a verification would stop the solve with
        `stagnation`, whether its iterate is a success nonetheless (given the
        carry, the iterate and its residual): the requested tolerance is below
        what the dtype can reach and the iterate meets the level it can (LSMR's
        normal-equations test at `eps cond(A)`). `None`: it never is.
    - `steps`: the number of steps made, read from the carry, for a method that
        counts them itself among its stacked scalars (`AbstractStackedScalars`),
        as a float that `counts_exactly` to `max_steps`: there the count costs no
        kernel of its own, where the loop's integer counter costs two per step
        (its increment, and a copy XLA makes of it for the history write). The
        count starts at 0, `step` adds 1 and `restart` keeps it; `None`: the loop
        counts.
    - `below_floor`: for a method whose estimate restarts from the true residual
        after each verification (CG's residual replacement), so that the test above
        cannot see a fall across passes: whether this pass's estimate fell below
        the true residual `rnorm` by more than `FLOOR_GAP`, given the carry and
        `rnorm`. `FLOOR_PATIENCE` such passes without the true residual halving
        stop the solve with `stagnation`. (On a problem that converges the two
        agree within a few per cent, at the float32 floor they differ 5-20-fold:
        2-D Poisson 40 x 40 stopped after 60 steps past the floor, not 400.)
    - `free_misses`: passes in a row that may end on the estimate and then fail
        their verification before the next pass's target is tightened
        (`adapted_tolerance`'s `factor`, halved from then on). A method whose
        `restart` resets its estimate to the true residual (CG's residual
        replacement) sets 2: its next pass starts from the truth, so the target
        `tol` itself is right for a true residual that missed by the drift of
        one pass (1-5% in float32), where half of it cost 3-5 steps instead of
        1-2. At the floor of the dtype (the recursive residual keeps passing,
        the true one does not) the halving then starts two passes later: never
        halving took up to 1.6x the products there before `stagnation`.
    - `rescue`: for a method with the second stagnation test whose recurrence
        never restarts (MINRES, LSMR), given the carry, the iterate and its true
        residual: `(carry, can)`, the carry of a recurrence started afresh from
        that iterate and residual, and whether to use it (see `rescue_allowed`).
        Where the second stagnation test fires or the method halts, and the
        verification failed, the solve goes on from it rather than stopping. A
        recurrence reaches a true residual of about `eps` times the residual it
        started from: from a far initial guess (`y0` of 1e3, `b` of 1e-3) that
        is far above `eps ||b||`, and the solve stopped with `stagnation`
        (relative error 0.2 in float32) where CG and GMRES, which restart from
        the true residual, converge. `None` (the default, and without `y0`, where
        the recurrence starts from `b`): never.
    """

    step: Callable[[_Carry], _Carry]
    estimate: Callable[[_Carry], Array]
    solution: Callable[[_Carry], PyTree[Array]]
    restart: Callable[[_Carry, PyTree[Array], PyTree[Array], Array], _Carry]
    squared: bool = False
    halted: Callable[[_Carry], Array] | None = None
    halt_result: Any = dataclasses.field(default_factory=lambda: RESULTS.breakdown)
    # (a `RESULTS` member, or a function of the carry giving one)
    settled: Callable[[_Carry, Array], Array] | None = None
    ends_pass: Callable[[_Carry], Array] | None = None
    accept: Callable[[_Carry, PyTree[Array], PyTree[Array]], Array] | None = None
    mv_per_step: int = 1
    verify_mv: int = 1
    pass_length: int | None = None
    patience: int = PATIENCE
    progress: Callable[[_Carry, PyTree[Array], PyTree[Array], Array], Array] | None = (
        None
    )
    progress_estimate: Callable[[_Carry], Array] | None = None
    below_floor: Callable[[_Carry, Array], Array] | None = None
    steps: Callable[[_Carry], Array] | None = None
    accept_at_floor: Callable[[_Carry, PyTree[Array], PyTree[Array]], Array] | None = (
        None
    )
    free_misses: int = 0
    rescue: (
        Callable[[_Carry, PyTree[Array], PyTree[Array]], tuple[_Carry, Array]] | None
    ) = None


class _Pass(eqx.Module):
    """The carry of a pass: the method's own carry plus the step bookkeeping."""

    carry: Any
    # Steps in total (a pass is told from its first step's number); `None` where
    # the method counts them (`Iteration.steps`).
    steps: Array | None
    # The residual history: this pass's entries where the outer loop carries the
    # history (`_Loop.history`), else all of it.
    history: Array


class _Loop(eqx.Module):
    """The outer loop's carry. Its scalars are carried stacked in one array,
    `book` (a packed `_Book`, see `AbstractStackedScalars`)."""

    inner: _Pass
    best_x: PyTree[Array]  # the iterate with the smallest true residual so far
    book: Array
    verifications: Array
    # The residual history, where the passes record into a buffer of their own
    # (`_Pass.history`, see `_history_buffer`); else `None`.
    history: Array | None


class AbstractStackedScalars(eqx.Module):
    """Scalars a loop carries stacked in one array (`pack`), each read by slicing
    it (`unpack`): carried one by one, each would be computed by a kernel of its
    own at the end of the loop body (XLA does not fuse computations that end in
    different outputs of a loop body), and on XLA:CPU each kernel costs several
    milliseconds of compile time. Fields that are `None` are not carried.

    Keep to at most 8 fields: XLA:CPU fuses a concatenation of at most 8
    operands into one kernel, and makes each operand of a larger one a kernel of
    its own (9 computed scalars: 11 kernels, against 2 for 8). BiCGStab with a
    `norm` other than `two_norm` carries 9 (its inner loop body is 28 kernels
    against 21 with `two_norm`); stacking them as two rows of 8 took it to 25, but
    compiled slower in an A/B run (XLA then made the two rows two kernels)."""

    def pack(self, dtype) -> Array:
        return jnp.stack([jnp.asarray(v).astype(dtype) for v in jtu.tree_leaves(self)])

    def unpack(self, stacked: Array) -> Any:
        # (`self` gives the layout: which of the optional fields are present.)
        names = [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        ]
        return _StackedView(stacked, names)


class _StackedView:
    """The fields of packed `AbstractStackedScalars`, each sliced from the array
    when read (so that fields a computation does not read cost nothing in it)."""

    def __init__(self, stacked: Array, names: list[str]):
        self._stacked = stacked
        self._names = names
        self._read = {}

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._names:
            return None  # an optional field that is not carried
        # (Each field is sliced once per view: a smaller jaxpr to trace and lower.)
        if name not in self._read:
            self._read[name] = self._stacked[self._names.index(name)]
        return self._read[name]


class _Book(AbstractStackedScalars):
    """The outer loop's scalars (counts and flags as floats: they are small
    integers, exact in any float dtype)."""

    rnorm: Scalar  # norm of the last true residual
    # The target, `Problem.tol`: carried here rather than closed over, where XLA
    # makes the loop-invariant product that computes it a kernel of its own.
    tol: Scalar
    best_rnorm: Scalar
    factor: Scalar  # tightening of the adapted tolerance
    since_best: Scalar  # verifications since `best_rnorm` last decreased
    # 2: the last verification passed (converged); 1: its iterate became
    # `best_x` (a new best true residual); 0: neither. (The flag that selects
    # `best_x` travels here, see `iterate`, in no field of its own: a ninth field
    # would make each a kernel, see `AbstractStackedScalars`.)
    converged: Scalar
    # The true progress measure when it last halved, and its estimate then (`None`
    # without the second stagnation test, so that it costs nothing).
    ref_progress: Scalar | None
    ref_estimate: Scalar | None
    floor_hits: Scalar | None  # passes below the floor since the last halving
    # The threshold of the estimate that ends the current pass (squared where
    # the estimate is, see `iterate`), where the book has room for it (`None`
    # otherwise: then the inner loop's condition computes it).
    bound: Scalar | None


def _history_layout(max_steps: int, history_length: int | None) -> tuple[int, int]:
    """`(length, every)`: step `s` is recorded at index `(s - 1) // every`, so entry
    `i` ends up holding step `min(every (i + 1), last step)`."""
    if history_length is None:
        history_length = min(max_steps, HISTORY_CAP)
    # (A solve whose statistics are unused keeps no history: see
    # `statistics_unused`.)
    if history_length == 0 or max_steps == 0 or not statistics_wanted():
        return 0, 1
    every = max(1, math.ceil(max_steps / history_length))
    # The documented length, although the last `history_length - ceil(max_steps /
    # every)` entries (30 - 25 for `max_steps=100`) are never written: histories
    # of one `history_length` stack whatever their `max_steps`.
    return history_length, every


def _history_buffer(length: int, every: int, pass_length: int | None) -> int:
    """The length of the buffer a pass records its steps into, which the outer
    loop copies into the history once per pass; 0: the steps are recorded into
    the history itself. Where every `k`-th step is recorded, the buffer holds
    the entries a pass can reach (`_group` of its steps), the first of which it
    always writes (every pass makes a step).

    Under `vmap` a `while_loop` selects, on every iteration, between the old and
    the new value of each carried array for the whole batch (each element stops
    on its own): a history of `max_steps` entries carried by the inner loop cost
    a select of batch x `max_steps` per step, 20-50% of the run time of CG on
    200 right-hand sides of size 300 (with `stats` read). Carried by the outer
    loop and written once per pass, it costs that once per pass; the inner loop
    carries batch x `pass_length`. (Without `vmap`, both write one entry in
    place per step.) And where the statistics are not read, XLA removes a
    buffered history (a loop value that only feeds itself), but not one carried
    through both loops: CG's on a 64 x 64 stencil, with `every = 5`, was 26 HLO
    instructions and 3 kernels of every compile. Passes with no bound (CG with
    `stabilise_every=None`) or a long one run in chunks of `HISTORY_BUFFER_CAP`
    steps, each copied into the history after it (see `iterate`); where every
    `k`-th step is recorded, those steps are recorded directly."""
    if length == 0 or HISTORY_BUFFER_CAP == 0:
        return 0
    if every == 1:
        if pass_length is None:
            return HISTORY_BUFFER_CAP
        return min(pass_length, HISTORY_BUFFER_CAP)
    if pass_length is None:
        return 0
    # Steps `first + 1 ... first + pass_length` reach this many entries at most.
    entries = (pass_length + every - 2) // every + 1
    return entries if entries <= HISTORY_BUFFER_CAP else 0


def _group(index: Array, every: int, bound: int) -> Array:
    """`index // every`, for `0 <= index < bound`: the history entry of step
    `index + 1`."""
    if every == 1:
        return index
    if bound <= 2**21:
        # In float32: exact below 2^21 (the rounding error is below the margin
        # `0.5 / every`), and, unlike an integer division, fused by XLA into the
        # kernel of the update (one kernel less a step).
        scaled = index.astype(jnp.float32) * (1 / every) + 0.5 / every
        return scaled.astype(index.dtype)
    return lax.div(index, jnp.asarray(every, index.dtype))


@jax.custom_batching.custom_vmap
def _write_rows(array: Array, rows: Array, start: Array) -> Array:
    """`update_rows` without its JVP rule; batched by `_write_rows_vmap`."""
    return lax.dynamic_update_slice_in_dim(
        array, rows, start, 0, allow_negative_indices=False
    )


# A `custom_jvp` around the `custom_vmap`: the write is linear in `array` and
# `rows` (and `start` is an integer), so its JVP is the same write of the
# tangents. Given as a rule, so that forward mode through a Krylov loop (e.g.
# `jax.jvp` of a solver's `compute`, as a user-defined solver that wraps one
# does, under `vmap`) never differentiates the `custom_vmap`: JAX's JVP of a
# `custom_vmap` under `vmap` gave the batch axis to the wrong operand
# ("dot_general requires contracting dimensions to have the same shape", GMRES,
# measured).
@jax.custom_jvp
def update_rows(array: Array, rows: Array, start: Array) -> Array:
    """`array` with its rows from `start` on replaced by `rows` (which fit:
    `0 <= start <= len(array) - len(rows)`), written in place, under `vmap` too.

    Under `vmap` the start is batched (each element of a batched loop is at its
    own step) and a dynamic-update-slice a scatter, which the batched
    `while_loop` follows with a `select` between the old and the new array for
    each element. The old array is then read after the scatter, so XLA copied
    the whole array before it, on every iteration: a second batch x (restart +
    1) x n Krylov basis (GMRES, restart 30 on a 2-D stencil, batch 50: 1.4x the
    memory per element of the unbatched solve, measured), or residual history
    (CG, `max_steps=10000`, the history read: 2.08 histories per element
    against 1.05 unbatched). Written as an elementwise `where` (of a gather, for
    more than one row), the write and the loop's `select` are one fusion, done
    in place. (Unbatched, it is the dynamic-update-slice.)"""
    return _write_rows(array, rows, start)


@update_rows.defjvp
def _update_rows_jvp(primals, tangents):
    array, rows, start = primals
    array_dot, rows_dot, _ = tangents
    # (Through `update_rows` itself: the same holds for derivatives of any order.)
    return update_rows(array, rows, start), update_rows(array_dot, rows_dot, start)


@_write_rows.def_vmap
def _write_rows_vmap(axis_size, in_batched, array, rows, start):
    array_batched, rows_batched, start_batched = in_batched
    if not array_batched:
        array = jnp.broadcast_to(array, (axis_size,) + array.shape)
    if not rows_batched:
        rows = jnp.broadcast_to(rows, (axis_size,) + rows.shape)
    if not start_batched:
        return lax.dynamic_update_slice_in_dim(
            array, rows, start, 1, allow_negative_indices=False
        ), True
    # `offset[b, i]`: the row of `rows[b]` that row `i` of `array[b]` receives.
    offset = jnp.arange(array.shape[1], dtype=start.dtype)[None, :] - start[:, None]
    inside = (offset >= 0) & (offset < rows.shape[1])
    if rows.shape[1] == 1:
        new = rows
    else:
        index = jnp.clip(offset, 0, rows.shape[1] - 1)
        new = jnp.take_along_axis(
            rows, lax.expand_dims(index, tuple(range(2, rows.ndim))), axis=1
        )
    inside = lax.expand_dims(inside, tuple(range(2, array.ndim)))
    return jnp.where(inside, new, array), True


def _record(history: Array, index: Array, value: Array) -> Array:
    # Every step overwrites its entry (one dynamic-update-slice: no read-back and
    # no select, which would be extra kernels in the loop body; the index is never
    # negative, so without JAX's wrapping of negative indices, another select).
    if history.shape[0] == 0:
        return history
    # (Not `lax.dynamic_update_index_in_dim`, a nested `jit`, see `_misc.select`.)
    return update_rows(
        history, lax.expand_dims(value.astype(history.dtype), (0,)), index
    )


def _print_progress(show, steps, estimate, tol, scale):
    # (`show` is tested here too: under `vmap` the `lax.cond` around the callback
    # becomes a select that runs it at every step, once per batch element.)
    if not show:
        return
    print(
        f"lineax Krylov: step {int(steps)}, residual estimate "
        f"{float(estimate * scale):.3e}, target {float(tol * scale):.3e}"
    )


def iterate(
    solver: AbstractKrylovSolver,
    problem: Problem,
    method: Iteration,
    carry: Any,
    rnorm: Array | None = None,
) -> tuple[PyTree[Array], RESULTS, dict[str, Array]]:
    """Run `method` from `carry` (whose iterate is `problem.x0`) with the shared
    verify-then-tighten outer loop, and return `(solution, result, stats)` in the
    units of the original problem.

    Each pass runs `method.step` until the estimate passes the adapted tolerance
    (at least one step), then recomputes `b - A y` (`rnorm`, the solver's norm) and
    decides: success, a new best iterate, tightening, stagnation, or a restart.
    `rnorm` is the norm of `problem.r0` if the caller already has it.
    """
    p = problem
    norm = p.norm
    tol = p.tol
    max_steps = p.max_steps
    length, every = _history_layout(max_steps, solver.history_length)
    verbose = int(solver.verbose)
    pass_length = method.pass_length
    buffer_length = _history_buffer(length, every, pass_length)
    # (Passes longer than the buffer record it in chunks.)
    chunked = (
        bool(buffer_length)
        and every == 1
        and (pass_length is None or pass_length > buffer_length)
    )

    def group(index: Array) -> Array:
        return _group(index, every, length * every)

    def steps_of(q: _Pass) -> Array:
        if method.steps is None:
            assert q.steps is not None
            return q.steps
        return method.steps(q.carry).astype(jnp.int32)

    def halted(c):
        return jnp.array(False) if method.halted is None else method.halted(c)

    def estimate_of(c):
        # The estimate itself (not its square): for the outer loop's decisions.
        e = method.estimate(c)
        return jnp.sqrt(e) if method.squared else e

    def bound_for(start, rnorm, tol, factor):
        # The threshold of the estimate that ends a pass started from `start`.
        inner_tol = adapted_tolerance(estimate_of(start), rnorm, tol, factor)
        return inner_tol**2 if method.squared else inner_tol

    if manual_axes():
        # Inside `jax.shard_map`: the loops start from constants, which vary over
        # no mesh axis, and after one step hold values computed from the inputs
        # (the operator's action included), which vary over theirs; a step or a
        # restart may set parts of them to constants again (LSMR's `started`,
        # GMRES's rotations). A loop's carry must keep one type: it is as varying
        # as the inputs, on entry and after every step and pass. (Outside
        # `shard_map`, nothing is done.)
        inputs = (p.vector, p.x0, p.r0, p.tol, p.scale, jax.eval_shape(p.mv, p.x0))

        def as_varying(tree: Any) -> Any:
            return varying_like(tree, inputs)

    else:

        def as_varying(tree: Any) -> Any:
            return tree

    def inner_step(first: Array, q: _Pass) -> _Pass:
        # Only the method's step, the step count and the history write: anything
        # else here would be paid on every step. (`first`: the step count at the
        # start of the pass.)
        c = method.step(q.carry)
        counter = None if q.steps is None else q.steps + 1  # (the loop counts)
        steps = steps_of(_Pass(c, counter, q.history))
        estimate = method.estimate(c)
        index = group(steps - 1)
        if buffer_length:
            index = index - group(first)
        history = _record(q.history, index, estimate)
        if verbose:
            shown = jnp.sqrt(estimate) if method.squared else estimate
            show = steps % verbose == 0
            lax.cond(
                show,
                lambda: jax.debug.callback(
                    _print_progress, show, steps, shown, tol, p.scale
                ),
                lambda: None,
            )
        return as_varying(_Pass(c, counter, history))

    def going(k: Any) -> Array:
        # Whether the book `k` lets the solve go on (a halt and `max_steps` may
        # still end it). Written as the conditions to go on, not as the negation
        # of those to stop: the loop conditions read it, and each `not` is an
        # operation of their kernels. (The flag and the count are never NaN.)
        go = (k.converged <= 1) & jnp.isfinite(k.rnorm)
        if not p.fixed:
            go = go & (k.since_best < method.patience)
        return go

    def outer_body(o: _Loop) -> _Loop:
        start = o.inner.carry
        k = book_of(o)

        # The threshold of the estimate that ends the pass: computed by the
        # previous pass's packing of the book where it has room (one kernel
        # computes both), else where it is used (in the inner loop's condition,
        # and once after it) rather than once here: as a value of its own it
        # would be a separate kernel of this body. So is the step count at which
        # the pass ends at the latest.
        def bound_of():
            # (The scalars are read from `o.book` here, so that the inner loop
            # takes the whole array rather than slices of it made by kernels.)
            b = book_of(o)
            if carries_bound:
                return b.bound
            return bound_for(start, b.rnorm, b.tol, b.factor)

        def inner_running(q: _Pass):
            c = q.carry
            # The first step of a pass is always made: every pass makes progress,
            # whatever the (possibly underflowed) estimate says.
            # (The pass's first step number, like the bound, is computed where it
            # is used: from the carry the pass started from.)
            first = steps_of(o.inner)
            steps = steps_of(q)
            is_first = steps == first
            go = is_first | (method.estimate(c) > bound_of())
            if method.settled is not None:
                go = go & (is_first | ~method.settled(c, book_of(o).factor))
            if method.ends_pass is not None:
                go = go & (is_first | ~method.ends_pass(c))
            go = go & ~halted(c) & (steps < max_steps)
            if pass_length is not None:
                go = go & (steps - first < pass_length)
            # Under `vmap` the outer body runs for every element while any runs,
            # its result discarded for those already done; their passes must make
            # no steps, or each outer iteration of the others waits for a whole
            # pass of theirs (BiCGStab's 100 steps after a stagnation), and the
            # batch made up to twice the steps of its slowest element. (Without
            # `vmap` this is always true here.)
            return go & going(book_of(o))

        first = steps_of(o.inner)
        chunked_history = None
        if chunked:
            # A pass longer than the buffer: a loop of chunks, each recorded into
            # the buffer and copied into the history after it.
            def chunk_running(m):
                return inner_running(m[0])

            def chunk(m):
                q, history = m
                start = steps_of(q)

                def running(q):
                    return inner_running(q) & (steps_of(q) - start < buffer_length)

                q = lax.while_loop(running, functools.partial(inner_step, start), q)
                history = update_rows(history, q.history, start)
                q = _Pass(q.carry, q.steps, jnp.zeros_like(q.history))
                return as_varying((q, history))

            q, chunked_history = lax.while_loop(
                chunk_running, chunk, (o.inner, o.history)
            )
        else:
            step = functools.partial(inner_step, first)
            q = lax.while_loop(inner_running, step, o.inner)
        c = q.carry
        x = method.solution(c)
        r = tree_sub(p.vector, p.mv(x))
        rnorm = norm(r)
        converged = rnorm <= k.tol
        if method.accept is not None:
            converged = converged | method.accept(c, x, r)
        improved = rnorm < k.best_rnorm
        best_rnorm = select(improved, rnorm, k.best_rnorm)
        since_best = select(improved, 0, k.since_best + 1)
        ref_progress, ref_estimate = k.ref_progress, k.ref_estimate
        floor_hits = k.floor_hits
        halved = jnp.zeros((), bool)  # (no reference progress: never "halved")
        rescue = rescued = progress = None
        if ref_progress is not None:
            progress = (
                rnorm if method.progress is None else method.progress(c, x, r, rnorm)
            )
            # (An unset reference acts as infinity: `x <= inf` is `x == x`.)
            halved = select(
                ref_progress < 0, progress == progress, progress <= 0.5 * ref_progress
            )
            ref_progress = select(halved, progress, ref_progress)
        if method.progress_estimate is not None:
            estimate = method.progress_estimate(c)
            # Set whenever `progress_estimate` is (see the carry's initial value).
            assert ref_estimate is not None
            ref_estimate = select(halved, estimate, ref_estimate)
            # The estimate fell by `GAP` and the true measure did not even halve.
            # (`x < inf`, for an unset reference, is `x <= max`.)
            fallen = estimate * GAP
            limit = jnp.finfo(p.rdtype).max
            fallen = select(ref_estimate < 0, fallen <= limit, fallen < ref_estimate)
            stalled = ~converged & fallen
            if method.rescue is not None:
                # A recurrence started from a residual far above `b` (a far
                # initial guess) stalls at rounding errors of *that* residual;
                # started again from the true residual of its iterate, it goes on
                # (see `Iteration.rescue`). It is then the new reference.
                rescued, can = method.rescue(c, x, r)
                # Also where the estimate is already `GAP` below the true measure:
                # the recurrence runs on rounding errors, and would run on until
                # its estimate fell `GAP` below its reference (or underflowed to
                # 0, where it cannot be seen to fall): MINRES took 200 steps,
                # not 120, from `y0` of 1e10 for `b` of 1e-25 in float32.
                assert progress is not None
                ended = stalled | halted(c) | (estimate * GAP < progress)
                rescue = ~converged & ended & can
                stalled = stalled & ~rescue
                ref_estimate = select(
                    rescue, method.progress_estimate(rescued), ref_estimate
                )
                assert ref_progress is not None
                ref_progress = select(rescue, progress, ref_progress)
            since_best = select(stalled, method.patience, since_best)
        if method.below_floor is not None:
            assert floor_hits is not None
            # (A converged solve stops here whatever the count says.)
            hit = method.below_floor(c, rnorm)
            floor_hits = select(halved, 0, floor_hits) + hit.astype(p.rdtype)
            since_best = select(
                floor_hits >= FLOOR_PATIENCE, method.patience, since_best
            )
        if method.accept_at_floor is not None:
            # The solve would stop with `stagnation` here.
            stuck = ~converged & (since_best >= method.patience)
            converged = converged | (stuck & method.accept_at_floor(c, x, r))
        passed = method.estimate(c) <= bound_of()
        if method.settled is not None:
            passed = passed | method.settled(c, k.factor)
        # (A pass that ended on the estimate, then failed: tighten the target.)
        tightened = jnp.maximum(p.eps, 0.5 * k.factor)
        if method.free_misses:
            # A free miss lowers the factor by `eps` (a count, no tighter in
            # effect: the target is `min(factor rnorm, tol)`); it recovers to 1
            # after a pass that did not end on the estimate.
            free = k.factor > 1 - (method.free_misses - 0.5) * p.eps
            tightened = select(free, k.factor - p.eps, tightened)
        factor = select(passed & ~converged, tightened, jnp.minimum(1, 1.5 * k.factor))
        c = method.restart(c, x, r, passed)
        if rescue is not None:
            c = tree_where(rescue, rescued, c)
        # A converged iterate is returned, so it is kept as the "best" one. So is
        # one that ties with the best (not an improvement for `since_best`): in
        # the max norm the largest entry of the residual may be one that no
        # iterate can reduce (a singular inconsistent system), and the first
        # iterate, often `x = 0`, won every tie.
        # (2 if converged, else 1 if kept: one select, where the sum of the two
        # flags as numbers was four operations of the packing kernel.)
        # A fixed-iteration solve returns its last iterate, whatever its residual:
        # it is the result of `max_steps` steps that the user asked for (an inner
        # solve used as a preconditioner). The best one could be the initial guess:
        # CG's first iterates often have residuals above `b`'s, and a few steps
        # of it from zero gave zero, a singular preconditioner.
        kept = (
            jnp.ones((), p.rdtype)
            if p.fixed
            else (rnorm <= k.best_rnorm).astype(p.rdtype)
        )
        flag = select(converged, 2, kept)
        bound = bound_for(c, rnorm, k.tol, factor) if carries_bound else None
        packed = _Book(
            rnorm, k.tol, best_rnorm, factor, since_best, flag,
            ref_progress, ref_estimate, floor_hits, bound,
        ).pack(p.rdtype)  # fmt: skip
        # The selection of `best_x` reads its flag back from the packed scalars
        # (behind a barrier, so that XLA does not fold the slice into the
        # concatenation): there `rnorm`, a square root for the 2-norm, has one
        # user, the concatenation, where with two XLA made it a kernel of its
        # own (it does not copy a square root into several kernels).
        packed = lax.optimization_barrier(packed)
        best_x = tree_where(unpack_book(packed).converged > 0, x, o.best_x)
        history, buffer = o.history, q.history
        if chunked:
            history = chunked_history  # (and the buffer is zero)
        elif buffer_length:
            assert history is not None  # (carried wherever there is a buffer)
            # The pass's entries (zero after its last step; the history has
            # `buffer_length` entries more than it returns, so that the write
            # never moves back to fit).
            history = update_rows(history, buffer, group(first))
            buffer = jnp.zeros_like(buffer)
        inner = _Pass(c, q.steps, buffer)
        return as_varying(_Loop(inner, best_x, packed, o.verifications + 1, history))

    if rnorm is None:
        rnorm = norm(p.r0)
    rnorm = rnorm.astype(p.rdtype)
    # The entries after the last step are zero, not NaN (as they were): a NaN
    # that a solve returns, or computes outside `jit` (under an un-jitted
    # `jax.grad`), is an error under `jax_debug_nans`, and so is an infinity
    # under `jax_debug_infs`; lineax 0.1.1 raised neither.
    history = jnp.zeros((length + buffer_length,), p.rdtype)
    buffer = jnp.zeros((buffer_length,), p.rdtype)
    # The references of the second stagnation test start unset, which their tests
    # read as infinity, and the first verification sets them. Unset is -1 (they
    # are never negative), not infinity itself: an infinite carry, computed outside
    # `jit` (under an un-jitted `jax.grad`), is an error under `jax_debug_infs`.
    unset = None
    if method.progress_estimate is not None or method.below_floor is not None:
        unset = jnp.full((), -1, p.rdtype)
    zero = jnp.array(0, jnp.int32)
    # An initial residual that already meets `tol` gets the relative target: the
    # first pass runs until the estimate fell by `rtol` (`factor`, the ratio of
    # `adapted_tolerance`, is then `rtol`), or to its end (`pass_length`, an
    # invariant Krylov space). This is the Newton case: there the right-hand side is
    # the nonlinear residual, which falls below the linear solver's `atol` near the
    # root, and a single Krylov step from it (all that `tol` asks for) on a stiff
    # Jacobian hardly lowers the residual, so Newton stalled at the linear solver's
    # `atol` (Diffrax's implicit solvers on the Robertson problem then failed; see
    # `docs/iterative.md`). lineax 0.1.1 ran a whole GMRES cycle there. (Success is
    # still decided by `tol`; a pass that ends above it continues as any other,
    # with `factor` recovering as usual.)
    # (Both in the working dtype: two Python numbers would make a float64 select,
    # slow on a GPU and an error on a TPU, in every float32 solve.)
    first = jnp.asarray(first_pass_factor(solver.rtol, p.eps), p.rdtype)
    factor = select(rnorm <= tol, first, jnp.ones((), p.rdtype))
    book = _Book(
        rnorm,
        tol,
        rnorm,
        factor,
        zero,
        # Converged before any step only with an exact zero residual. An initial
        # guess that merely meets the tolerance still gets at least one step (as
        # lineax 0.1.1 does): a Newton method whose right-hand side fell below the
        # solver's `atol` needs a step from it, not zero, or it stalls. (Success is
        # then decided at the verification after that step, as always; a step that
        # made the residual worse is followed by more, and a failed solve returns
        # the best iterate, which may be the initial guess.)
        # (With `max_steps=0` no step can be made: the initial guess is judged by
        # the tolerance itself.)
        # (Not with a NaN target: a user's `norm` that vanishes on a nonzero `b`,
        # see `problem`, has an exact zero "residual" at `x = 0`. Tested for a
        # user's norm only: two operations in every kernel that reads it.)
        select(
            (rnorm <= tol)
            if max_steps == 0
            else ((rnorm == 0) & (tol == tol))
            if problem.user_norm
            else (rnorm == 0),
            2,
            0,
        ),
        unset,
        None if method.progress_estimate is None else unset,
        None if method.below_floor is None else zero,
        None,
    )
    # The pass's threshold travels in the book where it has room (at most 8
    # fields, see `AbstractStackedScalars`): XLA made the loop-invariant parts of
    # its computation in the inner loop's condition two kernels of the outer
    # loop's body, and the condition, which runs every step, bigger.
    carries_bound = len(jtu.tree_leaves(book)) < 8
    if carries_bound:
        book = dataclasses.replace(
            book, bound=bound_for(carry, rnorm, tol, factor).astype(p.rdtype)
        )

    def unpack_book(packed: Array) -> Any:
        return book.unpack(packed)

    def book_of(o: _Loop) -> Any:
        return unpack_book(o.book)

    counter = zero if method.steps is None else None
    if buffer_length:
        inner, history = _Pass(carry, counter, buffer), history
    else:
        inner, history = _Pass(carry, counter, history), None
    loop = _Loop(inner, p.x0, book.pack(p.rdtype), zero, history)

    def running(o: _Loop):
        return (
            going(book_of(o)) & ~halted(o.inner.carry) & (steps_of(o.inner) < max_steps)
        )

    loop = lax.while_loop(running, outer_body, as_varying(loop))
    k = book_of(loop)
    stop = halted(loop.inner.carry)
    nonfinite = ~jnp.isfinite(k.rnorm)
    stagnation = k.since_best >= method.patience
    halt_result = method.halt_result
    if callable(halt_result):
        halt_result = halt_result(loop.inner.carry)
    assert isinstance(halt_result, RESULTS)  # a RESULTS, or a function giving one
    loop_converged = k.converged > 1
    if p.fixed:
        # A fixed-iteration solve succeeds when it made its steps, or stopped early
        # because the method can go no further (an exhausted Krylov space), but not
        # on a breakdown.
        converged = loop_converged | ~(
            nonfinite | (stop & (halt_result == RESULTS.breakdown))
        )
        stagnation = jnp.array(False)
    else:
        converged = loop_converged
    # Converged (or a fixed-iteration solve): the last iterate; otherwise the best
    # one seen.
    value = loop.best_x
    value_rnorm = k.rnorm if p.fixed else select(loop_converged, k.rnorm, k.best_rnorm)
    result = results_where(stop, halt_result, RESULTS.max_steps_reached)
    result = results_where(nonfinite, RESULTS.breakdown, result)
    result = results_where(stagnation & ~stop, RESULTS.stagnation, result)
    result = results_where(converged, RESULTS.successful, result)
    steps = steps_of(loop.inner)
    if loop.history is None:
        history = loop.inner.history
    else:
        history = loop.history[:length]
    if method.squared:
        history = jnp.sqrt(history)
    verify_mv = method.verify_mv * loop.verifications
    num_mv = p.initial_mv + method.mv_per_step * steps + verify_mv
    stats = {
        "num_steps": steps,
        "max_steps": jnp.asarray(max_steps, jnp.int32),
        "num_mv": num_mv,
        "residual_norm": value_rnorm * p.scale,
        "residual_history": history * p.scale,
    }
    if p.op_inverse is not None:
        # One factor, `2^-s` and the right-hand side's scale multiplied first: the
        # iterate of an operator scaled up (a small `A`, whose solution is large)
        # is also lifted (`_lift`), and multiplied by `2^-s` alone it overflowed
        # before the right-hand side's scale brought it back. (`P (1e-300 I)`
        # with `b` of 1: a solution of 1e300 came back as inf from GMRES and
        # BiCGStab, reported singular; float32 overflowed for solutions above
        # 2^112, about 5e33.)
        return tree_scale(p.scale * p.op_inverse, value), result, stats
    return tree_scale(p.scale, value), result, stats
