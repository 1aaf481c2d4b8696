"""`AutoLinearSolver`: picks a solver at trace time from the operator's tags and
shape (figure 1 of the lineax paper)."""

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import numpy as np
from jaxtyping import Array

from .._operator.base import (
    AbstractLinearOperator,
    check_operator,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_tridiagonal,
    is_upper_triangular,
    sizes,
)
from .._operator.tagged import TaggedLinearOperator
from .._tags import (
    diagonal_tag,
    lower_triangular_tag,
    negative_semidefinite_tag,
    positive_semidefinite_tag,
    tridiagonal_tag,
    unit_diagonal_tag,
    upper_triangular_tag,
)
from ._structured import structured_solver
from .base import AbstractLinearSolver, rank_flags
from .cholesky import Cholesky
from .diagonal import Diagonal
from .lu import LU
from .qr import QR
from .svd import SVD
from .triangular import Triangular
from .tridiagonal import Tridiagonal


class AutoState(eqx.Module):
    """State of [`lineax.AutoLinearSolver`][]: the chosen solver and its state."""

    # Static: the choice is made at trace time, and a static field keeps the state
    # cheap to pass through `jit` (no PyTree node to rebuild).
    solver: AbstractLinearSolver = eqx.field(static=True)
    state: Any


def _square_solver(
    operator: AbstractLinearOperator, well_posed: bool
) -> AbstractLinearSolver:
    # Operator types with a structure-exploiting solve (see `_structured.py`).
    if (structured := structured_solver(operator)) is not None:
        return structured
    # Cheapest first: O(n), O(n), O(n^2), then the O(n^3) factorisations.
    if is_diagonal(operator):
        # Least squares where it is as cheap as the solve (the paper's rule, and
        # the published package's): `well_posed=None` gets the pseudoinverse, so a
        # zero entry (e.g. a padded one) gives zero, not inf.
        return Diagonal(well_posed=well_posed)
    if is_tridiagonal(operator):
        return Tridiagonal()
    if is_lower_triangular(operator) or is_upper_triangular(operator):
        return Triangular()
    if is_positive_semidefinite(operator) or is_negative_semidefinite(operator):
        return Cholesky()
    return LU()


# The tag sets for which `_square_solver` picks a structure-exploiting solver
# (the empty set first: no tag). A reused state is checked against the operator
# tagged with each (see `linear_solve`'s `_check_state`): the choice may have been
# made from tags that the operator at hand no longer carries.
CHOICE_TAGS = (
    frozenset(),
    frozenset({positive_semidefinite_tag}),
    frozenset({negative_semidefinite_tag}),
    frozenset({diagonal_tag}),
    frozenset({tridiagonal_tag}),
    frozenset({lower_triangular_tag}),
    frozenset({upper_triangular_tag}),
    frozenset({lower_triangular_tag, unit_diagonal_tag}),
    frozenset({upper_triangular_tag, unit_diagonal_tag}),
)


def _to_well_posed(x: Any) -> Any:
    # A NumPy bool (e.g. from `np.all(...)` or a config array) means the same as
    # the Python bool; anything else is checked in `__check_init__`.
    return bool(x) if isinstance(x, np.bool_) else x


class AutoLinearSolver(AbstractLinearSolver[AutoState]):
    """Chooses a solver automatically, at trace time, from the operator's tags and
    shape. No run-time check of values is made, so tag your operators.

    **Arguments:**

    - `well_posed`: what kind of problem to expect.
        - `True`: the operator must be square and nonsingular. Diagonal →
          [`lineax.Diagonal`][]; tridiagonal → [`lineax.Tridiagonal`][];
          triangular → [`lineax.Triangular`][]; positive or negative
          semidefinite → [`lineax.Cholesky`][]; otherwise [`lineax.LU`][].
          A non-square operator is a `ValueError`.
        - `None`: square operators as for `True`, except that a diagonal one
          (including the identity and any 1x1 operator) gets the pseudoinverse
          `lineax.Diagonal(well_posed=False)`, as cheap as the solve: a zero
          entry gives zero in the solution. Non-square operators by
          [`lineax.QR`][] (least squares / minimum norm, full rank assumed).
        - `False`: any operator, including rank-deficient ones (the
          pseudoinverse solution). Diagonal → `lineax.Diagonal(well_posed=False)`;
          otherwise [`lineax.SVD`][].

    `options` are passed on to the chosen solver. (Any key some solver reads is
    accepted, whichever solver is chosen: see
    [`lineax.AbstractLinearSolver`][].)
    """

    well_posed: bool | None = eqx.field(static=True, converter=_to_well_posed)

    option_keys = frozenset()  # `options` are passed on to the chosen solver

    def __check_init__(self):
        # By identity: `1 == True` and `0 == False`, and `select_solver` tests
        # `is True` / `is None`, so an int would silently pick SVD.
        if not any(self.well_posed is x for x in (True, False, None)):
            raise ValueError(
                f"`well_posed` must be True, False or None, got {self.well_posed!r}."
            )

    def select_solver(self, operator: AbstractLinearOperator) -> AbstractLinearSolver:
        """The solver that would be used for `operator` (decided from tags and
        shape only).

        **Arguments:**

        - `operator`: a linear operator.

        **Returns:**

        A linear solver instance.
        """
        check_operator(operator, who="AutoLinearSolver.select_solver")
        in_size, out_size = sizes(operator)
        return _choice(self.well_posed, operator, in_size == out_size)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> AutoState:
        solver = self.select_solver(operator)
        return AutoState(solver, solver.init(operator, options))

    def compute(self, state: AutoState, vector, options):
        return state.solver.compute(state.state, vector, options)

    def transpose(self, state: AutoState, options):
        inner, options = state.solver.transpose(state.state, options)
        return AutoState(state.solver, inner), options

    def conj(self, state: AutoState, options):
        inner, options = state.solver.conj(state.state, options)
        return AutoState(state.solver, inner), options

    def recorded_operator_finite(self, state: AutoState) -> Array | None:
        return state.solver.recorded_operator_finite(state.state)

    def part_read(self, operator, other):
        return self.select_solver(operator).part_read(operator, other)

    def solved_operator(self, operator):
        return self.select_solver(operator).solved_operator(operator)

    def has_full_rank(self, state: AutoState):
        return state.solver.has_full_rank(state.state)

    def initial_guess(self, operator, y0):
        return self.select_solver(operator).initial_guess(operator, y0)

    def assume_full_rank(self) -> bool:
        return self.well_posed is not False

    def allow_dependent_rows(self, operator: AbstractLinearOperator) -> bool:
        return rank_flags(self.select_solver(operator), operator)[0]

    def allow_dependent_columns(self, operator: AbstractLinearOperator) -> bool:
        return rank_flags(self.select_solver(operator), operator)[1]


def _choice(
    well_posed: bool | None, operator: AbstractLinearOperator, square: bool
) -> AbstractLinearSolver:
    """`AutoLinearSolver(well_posed).select_solver(operator)`, for a checked
    operator that is `square` or not."""
    if well_posed is True:
        if not square:
            raise ValueError(
                "`AutoLinearSolver(well_posed=True)` needs a square operator, but "
                f"the operator has input size {sizes(operator)[0]} and output "
                f"size {sizes(operator)[1]}. For a least-squares "
                "(overdetermined) or minimum-norm (underdetermined) solution use "
                "`lx.AutoLinearSolver(well_posed=None)` (full rank, via QR) or "
                "`lx.AutoLinearSolver(well_posed=False)` (any rank, via SVD)."
            )
        return _square_solver(operator, well_posed=True)
    if well_posed is None:
        return _square_solver(operator, well_posed=False) if square else QR()
    if square and is_diagonal(operator):
        return Diagonal(well_posed=False)
    return SVD()


def tagged_choices(
    solver: "AutoLinearSolver", operator: AbstractLinearOperator
) -> Iterator[tuple[AbstractLinearOperator, AbstractLinearSolver]]:
    """`(tagged, solver.select_solver(tagged))` for `operator` with each tag set
    of `CHOICE_TAGS` added, lazily and in that order (the untagged operator
    first), skipping those it chooses nothing for (a non-square operator for
    `well_posed=True`). For a reused state (`linear_solve`'s `_check_state`): the
    choice it holds may have been made for tags that the operator at hand no
    longer carries.

    Tags change neither the operator's type nor its sizes, so it is checked and
    its sizes read once, not for each tag set."""
    try:
        check_operator(operator)
        in_size, out_size = sizes(operator)
    except Exception:  # noqa: BLE001 - then it is chosen for no tags
        return
    if solver.well_posed is True and in_size != out_size:
        return  # (no tags make it square: `_choice` would raise for each)
    for tags in CHOICE_TAGS:
        tagged = TaggedLinearOperator(operator, tags) if tags else operator
        try:
            choice = _choice(solver.well_posed, tagged, in_size == out_size)
        except Exception:  # noqa: BLE001 - e.g. non-square for well_posed=True
            continue
        yield tagged, choice
