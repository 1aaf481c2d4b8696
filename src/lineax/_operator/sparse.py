"""`SparseLinearOperator`: a sparse matrix in one of JAX's formats
(`jax.experimental.sparse` BCOO or BCSR)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.experimental import sparse as jsparse

from .._misc import default_floating_dtype
from .._tags import as_tags, transpose_tags
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    conj,
    diagonal,
    is_cacheable,
    register_tag_predicates,
    tridiagonal,
)


# 2**24 entries: 128 MiB in float64, e.g. a 4096×4096 matrix.
DEFAULT_MAX_DENSE_SIZE = 2**24


def _to_jax_sparse(matrix: Any) -> jsparse.BCOO | jsparse.BCSR:
    if isinstance(matrix, (jsparse.BCOO, jsparse.BCSR)):
        return matrix
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover - scipy is a dependency of jax
        scipy = None
    if scipy is not None and scipy.sparse.issparse(matrix):
        return jsparse.BCSR.from_scipy_sparse(matrix.tocsr())
    raise TypeError(
        "`matrix` must be a `jax.experimental.sparse.BCOO` or `BCSR` matrix, or a "
        f"`scipy.sparse` matrix, got {type(matrix).__name__}. For a dense array use "
        "`lx.MatrixLinearOperator`."
    )


class SparseLinearOperator(AbstractLinearOperator):
    """A sparse matrix, stored in one of JAX's sparse formats, acting on 1-D vectors.

    `mv` is JAX's sparse matrix-vector product (`O(nnz)` time and memory), so the
    Krylov solvers ([`lineax.CG`][], [`lineax.GMRES`][], [`lineax.BiCGStab`][],
    ...) use it matrix-free. [`lineax.diagonal`][] and [`lineax.tridiagonal`][]
    read the stored entries without densifying, so [`lineax.Diagonal`][] and
    [`lineax.Tridiagonal`][] (picked by tags) are `O(nnz)` too.

    A dense direct solver ([`lineax.LU`][], and [`lineax.AutoLinearSolver`][]
    for an untagged operator) calls `as_matrix`, which densifies: `O(n²)` memory.
    Above `max_dense_size` entries that raises a `ValueError` saying so, rather
    than running out of memory.

    **Arguments:**

    - `matrix`: a 2-D `jax.experimental.sparse.BCOO` or `BCSR` matrix without
        batch or dense dimensions, or a `scipy.sparse` matrix or array (converted
        to BCSR). Integer data are converted to the default floating dtype.
    - `tags`: a tag or iterable of tags (e.g. [`lineax.positive_semidefinite_tag`][]
        to solve with [`lineax.CG`][]).
    - `max_dense_size`: the largest number of entries (`rows × columns`) that
        `as_matrix` may materialise. Default `2**24`.
    """

    matrix: jsparse.BCOO | jsparse.BCSR
    tags: frozenset = eqx.field(static=True)
    max_dense_size: int = eqx.field(static=True)

    def __init__(
        self,
        matrix: Any,
        tags: Any = (),
        max_dense_size: int = DEFAULT_MAX_DENSE_SIZE,
    ):
        matrix = _to_jax_sparse(matrix)
        if matrix.n_batch != 0 or matrix.n_dense != 0 or matrix.ndim != 2:
            raise ValueError(
                "`matrix` must be a 2-D sparse matrix with no batch or dense "
                f"dimensions, got shape {matrix.shape} with n_batch={matrix.n_batch} "
                f"and n_dense={matrix.n_dense}. For a batch of sparse matrices, "
                "`jax.vmap` over a function that builds one `SparseLinearOperator` "
                "from each."
            )
        if not jnp.issubdtype(matrix.dtype, jnp.inexact):
            # `data` is the first leaf of both formats.
            leaves, treedef = jtu.tree_flatten(matrix)
            data = leaves[0].astype(default_floating_dtype())
            matrix = jtu.tree_unflatten(treedef, [data, *leaves[1:]])
        if not isinstance(max_dense_size, int) or max_dense_size < 0:
            raise ValueError(
                f"`max_dense_size` must be a nonnegative int, got {max_dense_size!r}."
            )
        self.matrix = matrix
        self.tags = as_tags(tags)
        self.max_dense_size = max_dense_size

    def mv(self, vector):
        return self.matrix @ vector

    def as_matrix(self):
        rows, columns = self.matrix.shape
        if rows * columns > self.max_dense_size:
            raise ValueError(
                f"Densifying this {rows}×{columns} `SparseLinearOperator` would "
                f"allocate {rows * columns} entries, more than its "
                f"`max_dense_size={self.max_dense_size}`. A dense direct solver "
                "(`lx.LU`, or `lx.AutoLinearSolver` for an untagged operator) "
                "needs the dense matrix: solve matrix-free instead with `lx.CG` "
                "(tag it `lx.positive_semidefinite_tag`), `lx.GMRES` or "
                "`lx.BiCGStab`, or pass a larger `max_dense_size` if the memory is "
                "available."
            )
        return self.matrix.todense()

    def transpose(self):
        if isinstance(self.matrix, jsparse.BCSR):
            # (BCSR has no transpose of its own: go through BCOO, sorted by row.)
            coo = self.matrix.to_bcoo().transpose().sort_indices()
            transposed = jsparse.BCSR.from_bcoo(coo)
        else:
            transposed = self.matrix.T
        return SparseLinearOperator(
            transposed, transpose_tags(self.tags), self.max_dense_size
        )

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[1],), self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)


register_tag_predicates(SparseLinearOperator)


def _entries(operator: SparseLinearOperator):
    """`(rows, columns, values)` of the stored entries. Padding entries (which
    BCOO stores with out-of-range indices) are dropped by the scatters below."""
    coo = operator.matrix
    if isinstance(coo, jsparse.BCSR):
        coo = coo.to_bcoo()
    return coo.indices[:, 0], coo.indices[:, 1], coo.data


def _band(operator: SparseLinearOperator, offset: int, length: int):
    """Entries `A[i, i + offset]`, as a vector of `length`, indexed by `min(i,
    i + offset)`: one scatter over the stored entries, O(nnz)."""
    rows, columns, values = _entries(operator)
    on_band = columns - rows == offset
    index = jnp.minimum(rows, columns)
    out = jnp.zeros(length, values.dtype)
    # Stored duplicates are summed, as in the sparse product.
    return out.at[index].add(jnp.where(on_band, values, 0), mode="drop")


@diagonal.register(SparseLinearOperator)
def _(operator):
    return _band(operator, 0, min(operator.matrix.shape))


@tridiagonal.register(SparseLinearOperator)
def _(operator):
    n = operator.matrix.shape[0]
    return _band(operator, 0, n), _band(operator, -1, n - 1), _band(operator, 1, n - 1)


@conj.register(SparseLinearOperator)
def _(operator):
    return SparseLinearOperator(
        jtu.tree_map(jnp.conj, operator.matrix), operator.tags, operator.max_dense_size
    )


is_cacheable.register(SparseLinearOperator)(lambda op: concrete_arrays(op.matrix))
