"""`MatrixLinearOperator`: a dense 2-D matrix."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Inexact

from .._misc import inexact_asarray
from .._tags import as_tags, transpose_tags
from ._arguments import check_not_sequence
from .base import (
    AbstractLinearOperator,
    bands_of_matrix,
    concrete_arrays,
    conj,
    diagonal,
    is_cacheable,
    register_stored,
    register_tag_predicates,
    tridiagonal,
)


class MatrixLinearOperator(AbstractLinearOperator):
    """A linear operator given by a dense 2-D matrix of shape `(out_size, in_size)`,
    acting on 1-D vectors.

    **Arguments:**

    - `matrix`: a 2-D array (JAX or NumPy), converted as by `jnp.asarray`; integer
        arrays are converted to the default floating dtype. (A nested Python list
        is refused: its dtype would be a guess; convert it with `jnp.asarray`.)
    - `tags`: a tag or iterable of tags describing structure (e.g.
        [`lineax.positive_semidefinite_tag`][]), used by solvers at trace time.
    """

    matrix: Inexact[Array, "a b"]
    tags: frozenset = eqx.field(static=True)

    def __init__(self, matrix: Any, tags: Any = ()):
        check_not_sequence(matrix, "matrix")
        if _is_sparse(matrix):
            raise TypeError(
                f"`matrix` is a sparse matrix ({type(matrix).__name__}): wrap it in "
                "`lx.SparseLinearOperator(matrix)`, or densify it first (e.g. "
                "`matrix.todense()`)."
            )
        if not hasattr(matrix, "shape"):
            raise TypeError(
                f"`matrix` must be a 2-D array, got {type(matrix).__name__}."
            )
        matrix = inexact_asarray(matrix)  # pyright: ignore[reportArgumentType]
        if matrix.ndim != 2:
            raise ValueError(
                f"`matrix` must be a 2-D array, but has shape {matrix.shape}. Use "
                "`lx.PyTreeLinearOperator` for higher-dimensional inputs/outputs."
            )
        self.matrix = matrix
        self.tags = as_tags(tags)

    def mv(self, vector):
        return jnp.matmul(self.matrix, vector, precision=jax.lax.Precision.HIGHEST)

    def as_matrix(self):
        return self.matrix

    def transpose(self):
        return MatrixLinearOperator(self.matrix.T, transpose_tags(self.tags))

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[1],), self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)


def _is_sparse(matrix: Any) -> bool:
    # (`jnp.asarray` of one fails with "setting an array element with a sequence".)
    if isinstance(matrix, jsparse.JAXSparse):
        return True
    return type(matrix).__module__.startswith("scipy.sparse")


register_tag_predicates(MatrixLinearOperator)


@diagonal.register(MatrixLinearOperator)
def _(operator):
    return jnp.diagonal(operator.matrix)


@tridiagonal.register(MatrixLinearOperator)
def _(operator):
    return bands_of_matrix(operator.matrix)


@conj.register(MatrixLinearOperator)
def _(operator):
    return MatrixLinearOperator(jnp.conj(operator.matrix), operator.tags)


is_cacheable.register(MatrixLinearOperator)(concrete_arrays)
register_stored(MatrixLinearOperator)
