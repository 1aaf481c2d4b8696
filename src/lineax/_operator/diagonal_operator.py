"""`DiagonalLinearOperator`: elementwise multiplication by a PyTree of arrays."""

from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import inexact_asarray, structure_of, tree_conj
from .._tags import diagonal_tag
from ._arguments import check_leaf_arrays, check_not_number_sequence
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    conj,
    diagonal,
    flatten_vector,
    is_cacheable,
    register_stored,
    register_structure,
    tridiagonal,
)


class DiagonalLinearOperator(AbstractLinearOperator):
    """A diagonal linear operator: `mv(x) = diagonal * x`, elementwise.

    **Arguments:**

    - `diagonal`: a PyTree of arrays, with the structure of the input (and output)
        vectors. A 1-D array gives the usual diagonal matrix. Leaves may be JAX or
        NumPy arrays or Python scalars; they are converted as by `jnp.asarray`,
        with integers and booleans in the default floating dtype.
    """

    diagonal: PyTree[Array]

    def __init__(self, diagonal: PyTree[Any]):
        check_not_number_sequence(diagonal, "diagonal")
        check_leaf_arrays(diagonal, "diagonal")
        if len(jtu.tree_leaves(diagonal)) == 0:
            raise ValueError("`diagonal` must have at least one array leaf.")
        self.diagonal = jtu.tree_map(inexact_asarray, diagonal)

    def mv(self, vector):
        return jtu.tree_map(lambda d, v: d * v, self.diagonal, vector)

    def as_matrix(self):
        return jnp.diag(flatten_vector(self.diagonal))

    def transpose(self):
        return self

    def in_structure(self):
        return structure_of(self.diagonal)

    def out_structure(self):
        return structure_of(self.diagonal)


register_structure(DiagonalLinearOperator, diagonal_tag)


@diagonal.register(DiagonalLinearOperator)
def _(operator):
    return flatten_vector(operator.diagonal)


@tridiagonal.register(DiagonalLinearOperator)
def _(operator):
    diag = flatten_vector(operator.diagonal)
    zeros = jnp.zeros(diag.shape[0] - 1, diag.dtype)
    return diag, zeros, zeros


@conj.register(DiagonalLinearOperator)
def _(operator):
    return DiagonalLinearOperator(tree_conj(operator.diagonal))


is_cacheable.register(DiagonalLinearOperator)(concrete_arrays)
register_stored(DiagonalLinearOperator)
