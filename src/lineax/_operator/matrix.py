"""`MatrixLinearOperator`: a dense 2-D matrix."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
from jaxtyping import Array, Inexact

from .._jax_sparse import jsparse
from .._misc import inexact_asarray, instance_dict
from .._tags import as_tags, transpose_tags
from ._arguments import check_not_sequence
from .base import (
    AbstractLinearOperator,
    bands_of_matrix,
    concrete_arrays,
    conj,
    diagonal,
    is_cacheable,
    register_flat,
    register_stored,
    register_tag_predicates,
    SQUARE_ONLY_TAGS,
    tridiagonal,
)


class _MatrixOperatorMeta(type(AbstractLinearOperator)):
    """Builds a `MatrixLinearOperator` of a concrete JAX array, with tags seen
    before, as Equinox's unflatten builds one (`object.__new__` and its fields
    set), with the tags as `__init__` stored them, cached per `tags` argument:
    `lx.linear_solve(lx.MatrixLinearOperator(A), b)` called un-jitted builds one
    on every call, and Equinox's generic construction (its field, static-array
    and `__check_init__` checks) took 8 of the 11 us that building one took
    (10x10, CPU); `jtu.tree_unflatten` of a cached structure, 1.5 of the 3 us
    left. Every check that `__init__` makes is a property of the matrix's type,
    rank and dtype and of `tags`, each tested here or by the cache key, and, for
    tags that only a square operator may carry (`SQUARE_ONLY_TAGS`), of its
    shape, tested here too; anything else takes the usual path, which fills the
    cache."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is not MatrixLinearOperator:
            return super().__call__(*args, **kwargs)
        if len(args) == 1 and not kwargs:  # (the usual call, tested first)
            matrix, tags = args[0], ()
        elif len(args) == 1 and not kwargs.keys() - {"tags"}:
            matrix, tags = args[0], kwargs.get("tags", ())
        elif len(args) == 2 and not kwargs:
            matrix, tags = args
        else:
            return super().__call__(*args, **kwargs)
        try:
            known = _TAGS.get(tags)
        except TypeError:  # unhashable tags (a list): the usual path, uncached
            return super().__call__(*args, **kwargs)
        if known is not None and type(matrix) in _ARRAY_TYPES:
            # (Through the abstract value: `Array.shape` and `.dtype` are Python
            # properties that read it.)
            aval = matrix.aval
            shape = aval.shape
            if (
                len(shape) == 2
                and aval.dtype.kind in "fc"
                and (not known[1] or shape[0] == shape[1])
            ):
                operator = object.__new__(MatrixLinearOperator)
                fields = instance_dict(operator)
                fields["matrix"] = matrix
                fields["tags"] = known[0]
                return operator
        operator = super().__call__(*args, **kwargs)
        # Cached where `__init__` stored the matrix as given: a concrete JAX
        # array of an inexact dtype.
        if operator.matrix is matrix and not isinstance(matrix, jax.core.Tracer):
            _ARRAY_TYPES.add(type(matrix))
            if len(_TAGS) >= 64:
                _TAGS.clear()
            _TAGS[tags] = (
                operator.tags,
                not operator.tags.isdisjoint(SQUARE_ONLY_TAGS),
            )
        return operator


# The types of concrete JAX array (not tracers) that `__init__` stores unchanged,
# and the tags that `__init__` stores for each `tags` argument (with whether
# they need a square matrix).
_ARRAY_TYPES: set[type] = set()
_TAGS: dict = {}


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
register_flat(MatrixLinearOperator)
