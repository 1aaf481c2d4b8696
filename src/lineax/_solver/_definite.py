"""What the conjugate gradient solvers (`CG`, `PipelinedCG`, `FlexibleCG`) share:
the tag checks of a (semi)definite square operator, `stabilise_every`, and the
solve of a negative definite operator as `(-A) x = -b`."""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, PyTree

from .._operator.base import (
    AbstractLinearOperator,
    is_negative_semidefinite,
    is_positive_semidefinite,
)
from ._krylov import (
    AbstractKrylovSolver,
    check_definite_preconditioner,
    check_square_krylov,
    KrylovState,
    Problem,
    SCALE_OPERATOR,
)
from .base import check_tag


class AbstractDefiniteKrylovSolver(AbstractKrylovSolver):
    """A Krylov solver for positive or negative (semi)definite operators, with
    residual replacement every `stabilise_every` steps. A negative definite operator
    is solved as `(-A) x = -b` (`KrylovState.negative`), so the method itself only
    sees positive definite ones."""

    stabilise_every: AbstractVar[int | None]

    # Whether the `preconditioner` must be one fixed positive definite map (CG's
    # short recurrence needs it; FlexibleCG does not).
    definite_preconditioner = True

    def __check_init__(self):
        if self.stabilise_every is not None and (
            isinstance(self.stabilise_every, bool)
            or not isinstance(self.stabilise_every, int)
            or self.stabilise_every < 1
        ):
            raise ValueError(
                "`stabilise_every` must be None or a positive int, got "
                f"{self.stabilise_every!r}."
            )

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        name = type(self).__name__
        check_square_krylov(operator, name)
        positive = is_positive_semidefinite(operator)
        negative = (not positive) and is_negative_semidefinite(operator)
        check_tag(
            positive or negative,
            name,
            "positive or negative (semi)definite",
            "`lx.positive_semidefinite_tag` or `lx.negative_semidefinite_tag`",
        )
        self.checked_options(operator, options)
        if self.definite_preconditioner:
            check_definite_preconditioner(options, name)
        return KrylovState(operator, negative)

    def definite_problem(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[AbstractLinearOperator | None, Problem, Callable]:
        """`(preconditioner, problem, mv)` of the positive definite problem: the
        operator and `vector` negated where the operator is negative definite."""
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        if state.negative:
            vector = jtu.tree_map(jnp.negative, vector)

            def mv(v):
                return jtu.tree_map(jnp.negative, operator.mv(v))
        else:
            mv = operator.mv  # pyright: ignore[reportAssignmentType]
        # The Gram operator of `Normal` squares `A`'s scale: there the operator is
        # scaled too (see `Problem.op_inverse`, and `SCALE_OPERATOR`), at the cost
        # of one product before the loop and nothing in the step. Unscaled,
        # `Normal(CG)` of Optimistix's Levenberg-Marquardt damped by the largest
        # float (its setting at convergence) had a solution of 5e-309 in the
        # units of `b`, and `<p, A p>` overflowed: 0 with `breakdown` (lineax
        # 0.1.1: successful). CG itself does not: the product and the kernels it
        # compiles cost 21% of CG's compile time (issue 16), for operators of
        # 1e-33 or 1e36 in float32 (1e-305, 1e306 in float64), which break down
        # or stagnate, reported. (`precond` is read only where it scales.)
        problem = self.problem(
            operator,
            vector,
            y0,
            mv,
            precond=precond,
            scale_operator=bool(options.get(SCALE_OPERATOR, False)),
        )
        # (`problem.mv` is `mv`, with its products' structures checked.)
        return precond, problem, problem.mv
