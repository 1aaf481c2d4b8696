"""`Diagonal`: for diagonal operators, including the pseudoinverse of singular
ones."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._operator.base import AbstractLinearOperator, diagonal, is_diagonal
from .._operator.diagonal_operator import DiagonalLinearOperator
from .._solution import RESULTS
from ._packing import (
    pack_structures,
    PackedStructures,
    ravel_vector,
    transpose_packed_structures,
    unravel_solution,
)
from .base import (
    AbstractLinearSolver,
    check_rcond,
    check_square,
    check_tag,
    embed_like,
    static_number,
)


class DiagonalState(eqx.Module):
    """State of [`lineax.Diagonal`][]: the diagonal as a 1-D array."""

    # (A NumPy array where JAX passes a constant, e.g. the primal of a Python
    # float under `jax.grad`.)
    diagonal: Array | np.ndarray
    packed_structures: PackedStructures = eqx.field(static=True)


class Diagonal(AbstractLinearSolver[DiagonalState]):
    """Solves with a diagonal operator (tagged [`lineax.diagonal_tag`][], or a
    [`lineax.DiagonalLinearOperator`][]) by elementwise division.

    **Arguments:**

    - `well_posed`: if `False` (default), diagonal entries with
        `|d| <= rcond * max|d|` are treated as zero and give zero in the solution:
        the pseudoinverse solution. If `True`, every entry is divided by, and a zero
        entry gives [`lineax.RESULTS.singular`][].
    - `rcond`: the relative cutoff when `well_posed=False`. `None` means
        `2 * eps * n` for the dtype's machine epsilon (as for [`lineax.SVD`][],
        whose singular values here are `|d|`, and in the published lineax 0.1.1).

    `stats["rcond"]` holds the reciprocal condition number `min|d| / max|d|`
    (exact). This solver reads no `options`.
    """

    well_posed: bool = eqx.field(static=True, default=False)
    rcond: float | None = static_number(float | None, default=None)

    option_keys = frozenset()

    def __check_init__(self):
        # (None, by analogy with `lx.AutoLinearSolver(well_posed=None)`, reads as
        # False, as the published lineax accepts it.)
        if not (self.well_posed is None or isinstance(self.well_posed, bool)):
            raise TypeError(
                f"`well_posed` must be True or False, got {self.well_posed!r}."
            )
        check_rcond(self.rcond)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> DiagonalState:
        del options
        check_square(operator, "Diagonal")
        check_tag(is_diagonal(operator), "Diagonal", "diagonal", "`lx.diagonal_tag`")
        return DiagonalState(diagonal(operator), pack_structures(operator))

    def compute(self, state: DiagonalState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        d = state.diagonal
        absd = jnp.abs(d)
        dmax = jnp.max(absd, initial=0)
        rcond = jnp.min(absd, initial=jnp.inf) / jnp.where(dmax == 0, 1, dmax)
        stats = {"rcond": jnp.where(dmax == 0, jnp.zeros_like(rcond), rcond)}
        if self.well_posed:
            # `b / 0` is inf or NaN: `linear_solve` reports the non-finite
            # solution as singular. So is an infinite entry (`+ 0 * d`): `b / inf`
            # is a finite 0, and the diagonal of a scaled or summed operator can
            # overflow from finite parts (`diag(1e300, 1) * 1e10` solved to `(0,
            # 1e-10)`, reported successful), which `linear_solve`'s test of the
            # operator's finite arrays does not see.
            x = b / d + 0 * d
        else:
            rcond = self.rcond
            if rcond is None:
                rcond = 2 * jnp.finfo(d.dtype).eps * d.shape[0]
            keep = absd > rcond * dmax
            x = jnp.where(keep, b / jnp.where(keep, d, 1), 0)
            # A NaN could hide in an entry treated as zero: it must not. `0 * d`
            # is NaN exactly where `d` is not finite; `linear_solve` then finds
            # the non-finite input.
            x = x + 0 * d + 0 * b
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: DiagonalState, options):
        new = DiagonalState(
            state.diagonal, transpose_packed_structures(state.packed_structures)
        )
        return new, options

    def conj(self, state: DiagonalState, options):
        return DiagonalState(jnp.conj(state.diagonal), state.packed_structures), options

    def part_read(self, operator, other):
        # The solve reads the diagonal only.
        return embed_like(operator, DiagonalLinearOperator(diagonal(other)))

    def assume_full_rank(self) -> bool:
        return self.well_posed
