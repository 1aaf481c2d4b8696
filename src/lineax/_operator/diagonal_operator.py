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
        return jnp.diag(_flat_diagonal(self))

    def transpose(self):
        return self

    def in_structure(self):
        return structure_of(self.diagonal)

    def out_structure(self):
        return structure_of(self.diagonal)


register_structure(DiagonalLinearOperator, diagonal_tag)


@diagonal.register(DiagonalLinearOperator)
def _(operator):
    return _flat_diagonal(operator)


def _flat_diagonal(operator: DiagonalLinearOperator) -> Array:
    """The diagonal as one array, in the dtype of the operator's structure: an
    integer diagonal put in after construction (`eqx.tree_at`), which the
    structure reports as the default floating dtype as the constructor would
    have converted it, failed deep in JAX in `lx.Diagonal()` ("data type int32
    not inexact") and `lx.LU()` ("lu does not accept dtype int32")."""
    dtype = jnp.result_type(
        *(s.dtype for s in jtu.tree_leaves(operator.in_structure()))
    )
    return flatten_vector(operator.diagonal, dtype)


@tridiagonal.register(DiagonalLinearOperator)
def _(operator):
    diag = _flat_diagonal(operator)
    zeros = jnp.zeros(diag.shape[0] - 1, diag.dtype)
    return diag, zeros, zeros


@conj.register(DiagonalLinearOperator)
def _(operator):
    return DiagonalLinearOperator(tree_conj(operator.diagonal))


is_cacheable.register(DiagonalLinearOperator)(concrete_arrays)
register_stored(DiagonalLinearOperator)
