"""`TridiagonalLinearOperator`: a square matrix with three nonzero bands."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Inexact

from .._misc import inexact_asarray
from .._tags import tridiagonal_tag
from ._arguments import check_not_sequence
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    conj,
    diagonal,
    is_cacheable,
    register_stored,
    register_structure,
    tridiagonal,
)


class TridiagonalLinearOperator(AbstractLinearOperator):
    """A tridiagonal matrix, stored by its three bands, acting on 1-D vectors.

    **Arguments:**

    - `diagonal`: the main diagonal, a 1-D array of length `n`.
    - `lower_diagonal`: the band below the diagonal, `A[i + 1, i]`, length `n - 1`.
    - `upper_diagonal`: the band above the diagonal, `A[i, i + 1]`, length `n - 1`.

    Each band may be a JAX or NumPy array, converted as by `jnp.asarray`
    (integers in the default floating dtype). (A Python list is refused: its
    dtype would be a guess; convert it with `jnp.asarray`.)
    """

    diagonal: Inexact[Array, " size"]
    lower_diagonal: Inexact[Array, " size-1"]
    upper_diagonal: Inexact[Array, " size-1"]

    def __init__(
        self,
        diagonal: ArrayLike,
        lower_diagonal: ArrayLike,
        upper_diagonal: ArrayLike,
    ):
        check_not_sequence(diagonal, "diagonal")
        check_not_sequence(lower_diagonal, "lower_diagonal")
        check_not_sequence(upper_diagonal, "upper_diagonal")
        diagonal = inexact_asarray(diagonal)
        lower_diagonal = inexact_asarray(lower_diagonal)
        upper_diagonal = inexact_asarray(upper_diagonal)
        if diagonal.ndim != 1:
            raise ValueError(
                f"`diagonal` must be a 1-D array, but has shape {diagonal.shape}."
            )
        (n,) = diagonal.shape
        if n == 0:
            raise ValueError("`diagonal` must have at least one element.")
        for name, band in (
            ("lower_diagonal", lower_diagonal),
            ("upper_diagonal", upper_diagonal),
        ):
            if band.shape != (n - 1,):
                raise ValueError(
                    f"`{name}` must be a 1-D array of length {n - 1} (one less than "
                    f"`diagonal`), but has shape {band.shape}."
                )
        dtypes = {diagonal.dtype, lower_diagonal.dtype, upper_diagonal.dtype}
        if len(dtypes) != 1:
            raise ValueError(
                "`diagonal`, `lower_diagonal` and `upper_diagonal` must have the same "
                f"dtype, got {', '.join(sorted(str(d) for d in dtypes))}."
            )
        self.diagonal = diagonal
        self.lower_diagonal = lower_diagonal
        self.upper_diagonal = upper_diagonal

    def mv(self, vector):
        out = self.diagonal * vector
        out = out.at[1:].add(self.lower_diagonal * vector[:-1])
        out = out.at[:-1].add(self.upper_diagonal * vector[1:])
        return out

    def as_matrix(self):
        return (
            jnp.diag(self.diagonal)
            + jnp.diag(self.lower_diagonal, k=-1)
            + jnp.diag(self.upper_diagonal, k=1)
        )

    def transpose(self):
        return TridiagonalLinearOperator(
            self.diagonal, self.upper_diagonal, self.lower_diagonal
        )

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.diagonal.shape, self.diagonal.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct(self.diagonal.shape, self.diagonal.dtype)


register_structure(TridiagonalLinearOperator, tridiagonal_tag)


@diagonal.register(TridiagonalLinearOperator)
def _(operator):
    return operator.diagonal


@tridiagonal.register(TridiagonalLinearOperator)
def _(operator):
    return operator.diagonal, operator.lower_diagonal, operator.upper_diagonal


@conj.register(TridiagonalLinearOperator)
def _(operator):
    return TridiagonalLinearOperator(
        jnp.conj(operator.diagonal),
        jnp.conj(operator.lower_diagonal),
        jnp.conj(operator.upper_diagonal),
    )


is_cacheable.register(TridiagonalLinearOperator)(concrete_arrays)
register_stored(TridiagonalLinearOperator)
