"""`AbstractLinearSolver`, and the rank flags that pick the JVP equation."""

import abc
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._operator.base import AbstractLinearOperator
from .._solution import RESULTS


_SolverState = TypeVar("_SolverState")


class AbstractLinearSolver(eqx.Module, Generic[_SolverState]):
    """The base class for linear solvers (and least-squares solvers).

    A solver works in two stages: `init` does the work that depends only on the
    operator (e.g. a factorisation), and `compute` solves for one right-hand side.
    `transpose` and `conj` give the state for the transposed / conjugated operator
    cheaply, which is what reverse-mode differentiation and the pseudoinverse JVP
    need: a solve is never factorised twice.

    Subclasses implement `init`, `compute`, `transpose` and `conj`, and say what
    they assume about the rank of the operator, either with `assume_full_rank()`
    or (the form in the paper) with `allow_dependent_rows(operator)` and
    `allow_dependent_columns(operator)`. Differentiation then works with no further
    code: [`lineax.linear_solve`][] picks the cheapest valid JVP equation.
    """

    @abc.abstractmethod
    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> _SolverState:
        """Do the operator-dependent work of a solve (e.g. factorise).

        **Arguments:**

        - `operator`: the linear operator.
        - `options`: a dictionary of options (solver-specific; e.g.
            `"preconditioner"`).

        **Returns:**

        The solver state: a PyTree of arrays and static data.
        """

    @abc.abstractmethod
    def compute(
        self, state: _SolverState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
        """Solve for one right-hand side.

        **Arguments:**

        - `state`: from `init`.
        - `vector`: the right-hand side, a PyTree with the operator's output
            structure.
        - `options`: as passed to `init`.

        **Returns:**

        A 3-tuple `(solution, result, stats)`: the (pseudoinverse) solution, a
        [`lineax.RESULTS`][], and a dictionary of statistics.
        """

    @abc.abstractmethod
    def transpose(
        self, state: _SolverState, options: dict[str, Any]
    ) -> tuple[_SolverState, dict[str, Any]]:
        """The state and options for solving with the transposed operator, derived
        from `state` without factorising again."""

    @abc.abstractmethod
    def conj(
        self, state: _SolverState, options: dict[str, Any]
    ) -> tuple[_SolverState, dict[str, Any]]:
        """The state and options for solving with the elementwise conjugate of the
        operator."""

    def assume_full_rank(self) -> bool:
        """Whether this solver only handles operators of full rank (independent rows
        if wide, independent columns if tall, both if square).

        Either override this, or both of `allow_dependent_rows` and
        `allow_dependent_columns`.
        """
        if _overrides(self, "allow_dependent_rows") or _overrides(
            self, "allow_dependent_columns"
        ):
            raise NotImplementedError(
                f"{type(self).__name__} defines `allow_dependent_rows`/"
                "`allow_dependent_columns`; call those with the operator instead of "
                "`assume_full_rank()`."
            )
        raise NotImplementedError(
            f"{type(self).__name__} must implement `assume_full_rank()` (or both "
            "`allow_dependent_rows(operator)` and `allow_dependent_columns(operator)`)"
            " so that `linear_solve` knows which derivative formula is valid."
        )

    def allow_dependent_rows(self, operator: AbstractLinearOperator) -> bool:
        """Whether this solver can handle an operator with linearly dependent rows
        (e.g. any tall matrix). If `False`, the JVP may assume independent rows."""
        return (not self.assume_full_rank()) or operator.out_size() > operator.in_size()

    def allow_dependent_columns(self, operator: AbstractLinearOperator) -> bool:
        """Whether this solver can handle an operator with linearly dependent
        columns (e.g. any wide matrix). If `False`, the JVP may assume independent
        columns."""
        return (not self.assume_full_rank()) or operator.in_size() > operator.out_size()


def _overrides(solver: AbstractLinearSolver, name: str) -> bool:
    return getattr(type(solver), name) is not getattr(AbstractLinearSolver, name)


def rank_flags(
    solver: AbstractLinearSolver, operator: AbstractLinearOperator
) -> tuple[bool, bool]:
    """`(dependent_rows, dependent_columns)`: which the solver may meet, from
    whichever form of the rank flags it implements."""
    if _overrides(solver, "allow_dependent_rows") or _overrides(
        solver, "allow_dependent_columns"
    ):
        return (
            bool(solver.allow_dependent_rows(operator)),
            bool(solver.allow_dependent_columns(operator)),
        )
    full_rank = bool(solver.assume_full_rank())
    rows = (not full_rank) or operator.out_size() > operator.in_size()
    columns = (not full_rank) or operator.in_size() > operator.out_size()
    return rows, columns


def check_square(operator: AbstractLinearOperator, solver_name: str) -> None:
    """Raise a ValueError if `operator` is not square, suggesting what to use."""
    if operator.in_size() != operator.out_size():
        raise ValueError(
            f"`lx.{solver_name}` can only solve square systems, but `operator` has "
            f"input size {operator.in_size()} and output size {operator.out_size()}. "
            "For least-squares or minimum-norm solutions use `lx.QR()` (full rank), "
            "`lx.SVD()` (any rank) or `lx.AutoLinearSolver(well_posed=False)`."
        )


def check_tag(ok: bool, solver_name: str, what: str, tag_hint: str) -> None:
    """Raise a ValueError if the operator lacks the structure a solver needs."""
    if not ok:
        raise ValueError(
            f"`lx.{solver_name}` requires the operator to be {what}, which is known "
            f"only from its tags; mark it with {tag_hint} (e.g. "
            f"`lx.TaggedLinearOperator(operator, {tag_hint.split(' or ')[0]})`), or "
            "use `lx.AutoLinearSolver`, which picks a solver from the tags."
        )


def numerically_singular(diagonal: Array) -> Array:
    """Whether a triangular factor with this diagonal makes the system numerically
    singular: some pivot is zero, or at most `n * eps` relative to the largest one
    (the rank tolerance of `numpy.linalg.matrix_rank`). Since the condition number
    of a triangular matrix is at least `max|d| / min|d|`, a solve past that point
    has no correct digits left; LAPACK flags only exact zeros, and would return
    garbage silently."""
    absd = jnp.abs(diagonal)
    eps = jnp.finfo(absd.dtype).eps
    n = diagonal.shape[0]
    return jnp.any(absd <= n * eps * jnp.max(absd, initial=0))
