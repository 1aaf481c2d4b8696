"""`MatrixLinearOperator`: a dense 2-D matrix."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Inexact

from .._jax_sparse import jsparse
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
    SQUARE_ONLY_TAGS,
    tridiagonal,
)


class _MatrixOperatorMeta(type(AbstractLinearOperator)):
    """Builds a `MatrixLinearOperator` of a concrete JAX array, with tags seen
    before, the way JAX's `tree_unflatten` does, from a PyTree structure cached
    per `tags` argument: `lx.linear_solve(lx.MatrixLinearOperator(A), b)` called
    un-jitted builds one on every call, and Equinox's generic construction (its
    field, static-array and `__check_init__` checks) took 8 of the 11 us that
    building one took (10x10, CPU). Every check that `__init__` makes is a
    property of the matrix's type, rank and dtype and of `tags`, each tested here
    or by the cache key, and, for tags that only a square operator may carry
    (`SQUARE_ONLY_TAGS`), of its shape, tested here too; anything else takes the
    usual path, which fills the cache."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is not MatrixLinearOperator:
            return super().__call__(*args, **kwargs)
        if len(args) == 1 and not kwargs.keys() - {"tags"}:
            matrix, tags = args[0], kwargs.get("tags", ())
        elif len(args) == 2 and not kwargs:
            matrix, tags = args
        else:
            return super().__call__(*args, **kwargs)
        try:
            treedef, square_only = _TREEDEF_OF_TAGS.get(tags, (None, False))
        except TypeError:  # unhashable tags (a list): the usual path, uncached
            return super().__call__(*args, **kwargs)
        if (
            treedef is not None
            and type(matrix) in _ARRAY_TYPES
            and len(matrix.shape) == 2
            and matrix.dtype.kind in "fc"
            and (not square_only or matrix.shape[0] == matrix.shape[1])
        ):
            return jtu.tree_unflatten(treedef, (matrix,))
        operator = super().__call__(*args, **kwargs)
        # Cached where `__init__` stored the matrix as given: a concrete JAX
        # array of an inexact dtype.
        if operator.matrix is matrix and not isinstance(matrix, jax.core.Tracer):
            _ARRAY_TYPES.add(type(matrix))
            if len(_TREEDEF_OF_TAGS) >= 64:
                _TREEDEF_OF_TAGS.clear()
            _TREEDEF_OF_TAGS[tags] = (
                jtu.tree_structure(operator),
                not operator.tags.isdisjoint(SQUARE_ONLY_TAGS),
            )
        return operator


# The types of concrete JAX array (not tracers) that `__init__` stores unchanged,
# and the PyTree structure of an operator built with each `tags` argument (with
# whether those tags need a square matrix).
_ARRAY_TYPES: set[type] = set()
_TREEDEF_OF_TAGS: dict = {}


class MatrixLinearOperator(AbstractLinearOperator, metaclass=_MatrixOperatorMeta):
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
