"""`SparseLinearOperator`: a sparse matrix in one of JAX's formats
(`jax.experimental.sparse` BCOO or BCSR)."""

import dataclasses
from typing import Any, SupportsIndex

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Int

from .._jax_sparse import jsparse
from .._misc import checked_count, default_floating_dtype
from .._tags import as_tags, transpose_tags
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    conj,
    diagonal,
    has_cheap_diagonal,
    is_cacheable,
    reads_every_leaf,
    register_tag_predicates,
    STATE_SIGNATURES,
    tridiagonal,
)


# 2**24 entries: 128 MiB in float64, e.g. a 4096×4096 matrix.
DEFAULT_MAX_DENSE_SIZE = 2**24
# The diagonal layout (see `_diagonal_layout`) is used when it stores at most this
# many slots per stored entry.
DIAGONAL_LAYOUT_OVERHEAD = 2


def _to_jax_sparse(matrix: Any) -> jsparse.BCOO | jsparse.BCSR:
    if isinstance(matrix, (jsparse.BCOO, jsparse.BCSR)):
        return matrix
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover - scipy is a dependency of jax
        scipy = None
    if scipy is not None and scipy.sparse.issparse(matrix):
        # A SciPy matrix is concrete: keep it so inside `jit` too (where `jnp`
        # arrays made from NumPy ones are traced), so that the banded layout of
        # `mv` and the incomplete factorisations can read its pattern.
        with jax.ensure_compile_time_eval():
            return jsparse.BCSR.from_scipy_sparse(matrix.tocsr())
    raise TypeError(
        "`matrix` must be a `jax.experimental.sparse.BCOO` or `BCSR` matrix, or a "
        f"`scipy.sparse` matrix, got {type(matrix).__name__}. For a dense array use "
        "`lx.MatrixLinearOperator`."
    )


class SparseLinearOperator(AbstractLinearOperator):
    """A sparse matrix, stored in one of JAX's sparse formats, acting on 1-D vectors.

    `mv` is a gather and a sorted segment sum over the stored entries (`O(nnz)`
    time and memory; faster than JAX's BCSR/BCOO product on the CPU). A banded
    matrix (its entries on a few diagonals, as a finite-difference stencil's)
    given with concrete indices -- built outside `jax.jit`, then passed in or
    closed over -- is multiplied diagonal by diagonal instead, with shifted
    slices of the vector and no scatter: as fast as the matrix-free stencil.
    Either way the Krylov solvers ([`lineax.CG`][], [`lineax.GMRES`][],
    [`lineax.BiCGStab`][], ...) use it matrix-free. [`lineax.diagonal`][] and
    [`lineax.tridiagonal`][] read the stored entries without densifying, so
    [`lineax.Diagonal`][] and [`lineax.Tridiagonal`][] (picked by tags) are
    `O(nnz)` too.

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
    # Derived at construction for the product (see `_product_indices`): the row
    # and column of each stored entry, and whether the rows are sorted.
    _rows: Int[Array, " nse"]
    _columns: Int[Array, " nse"]
    _rows_sorted: bool = eqx.field(static=True)
    # The diagonal layout (see `_diagonal_layout`), or `None` and `()`.
    _diagonal_slots: Int[Array, "diagonals rows"] | None
    _offsets: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        matrix: Any,
        tags: Any = (),
        max_dense_size: SupportsIndex = DEFAULT_MAX_DENSE_SIZE,
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
        max_dense_size = checked_count(max_dense_size, "max_dense_size", 0)
        self.matrix = matrix
        self.tags = as_tags(tags)
        self.max_dense_size = max_dense_size
        self._rows, self._columns, self._rows_sorted = _product_indices(matrix)
        layout = _diagonal_layout(matrix)
        if layout is None:
            self._diagonal_slots, self._offsets = None, ()
        else:
            self._diagonal_slots, self._offsets = layout

    def mv(self, vector):
        vector = jnp.asarray(vector)
        if vector.shape != (self.matrix.shape[1],):
            # (Checked here: the gather below clips out-of-range columns, so a
            # vector of the wrong length would give a wrong product silently.)
            raise ValueError(
                f"`vector` has shape {vector.shape}, but this "
                f"{self.matrix.shape[0]}×{self.matrix.shape[1]} "
                f"`SparseLinearOperator` takes vectors of shape "
                f"{(self.matrix.shape[1],)}."
            )
        if self._diagonal_slots is not None:
            return self._diagonal_mv(vector)
        # y[i] = sum over the entries (i, j, a) of a * x[j]: a gather and a sorted
        # segment sum, rather than JAX's BCSR/BCOO matmul (see `_product_indices`).
        # Padding entries have row index `n_rows`, which `segment_sum` drops.
        # (Padding entries may hold an out-of-range column too: clipped, as their
        # products are dropped anyway.)
        columns = vector.at[self._columns].get(mode="clip")
        products = self.matrix.data * columns
        return jax.ops.segment_sum(
            products,
            self._rows,
            num_segments=self.matrix.shape[0],
            indices_are_sorted=self._rows_sorted,
        )

    def _diagonal_mv(self, vector):
        # y[i] = sum over diagonals d of A[i, i + offset_d] * x[i + offset_d]: each
        # term a slice of `x` (padded with zeros where `i + offset_d` leaves it).
        rows, columns = self.matrix.shape
        # The values are read from `matrix.data` at each product (slots past the
        # end are zero), so that gradients land on it (see `_product_indices`).
        values = self.matrix.data.at[self._diagonal_slots].get(
            mode="fill", fill_value=0
        )
        before = max(0, -min(self._offsets))
        after = max(0, rows + max(self._offsets) - columns)
        padded = jnp.pad(vector, (before, after))
        terms = [
            values[d] * padded[before + offset : before + offset + rows]
            for d, offset in enumerate(self._offsets)
        ]
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return out

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
        transposed = _transpose_on_host(self.matrix)
        if transposed is not None:
            return SparseLinearOperator(
                transposed, transpose_tags(self.tags), self.max_dense_size
            )
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


def _product_indices(matrix: jsparse.BCOO | jsparse.BCSR) -> tuple[Array, Array, bool]:
    """The row and column of each stored entry, for the product in `mv`, and
    whether the rows are sorted (always, for BCSR).

    Why not `matrix @ vector`: on the CPU, JAX lowers the BCSR and BCOO products
    to generic gather/scatter code that is 10-20x slower than a gather followed
    by a sorted `segment_sum` (measured on a 2-D Poisson matrix, 256² unknowns:
    ~5-9 ms against ~0.4 ms per product, float32). The matrix stays stored as
    given; only integer indices are added (O(nnz) memory, computed once here, as
    `jnp` operations so that this works on traced matrices under `jit`), and the
    values are always read from `matrix.data`, so that gradients with respect to
    the operator land on `matrix.data` and nothing derived can go stale.
    """
    if isinstance(matrix, jsparse.BCSR):
        n_rows = matrix.shape[0]
        counts = jnp.diff(matrix.indptr)
        rows = jnp.repeat(
            jnp.arange(n_rows, dtype=matrix.indptr.dtype),
            counts,
            total_repeat_length=matrix.nse,
        )
        # Stored slots past `indptr[-1]` (padding) get row `n_rows`: dropped.
        slot = jnp.arange(matrix.nse, dtype=matrix.indptr.dtype)
        rows = jnp.where(slot < matrix.indptr[-1], rows, n_rows)
        return rows, matrix.indices, True
    rows, columns = matrix.indices[:, 0], matrix.indices[:, 1]
    return rows, columns, bool(matrix.indices_sorted)


def _transpose_on_host(
    matrix: jsparse.BCOO | jsparse.BCSR,
) -> jsparse.BCOO | jsparse.BCSR | None:
    """The transpose of `matrix`, in its format with indices sorted by row, its
    pattern computed with NumPy from concrete index arrays (`None` if they are
    traced); only the values are permuted by JAX.

    Why: JAX's transposes sort the indices together with the values, so under
    `jit` (values traced) the transposed indices came out traced: the transposed
    operator lost its banded layout and could not be factorised by
    `lx.ILUPreconditioner`. Padding slots stay at the end, out of range.
    """
    is_csr = isinstance(matrix, jsparse.BCSR)
    index_arrays = (matrix.indptr, matrix.indices) if is_csr else (matrix.indices,)
    if not concrete_arrays(index_arrays):
        return None
    n_rows, n_columns = matrix.shape
    if is_csr:
        indptr = np.asarray(matrix.indptr, np.int64)
        stored = int(indptr[-1])
        rows = np.full(matrix.nse, n_rows, np.int64)
        rows[:stored] = np.repeat(np.arange(n_rows), np.diff(indptr))
        columns = np.asarray(matrix.indices, np.int64)
    else:
        indices = np.asarray(matrix.indices, np.int64)
        rows, columns = indices[:, 0], indices[:, 1]
    valid = (rows >= 0) & (rows < n_rows) & (columns >= 0) & (columns < n_columns)
    slots = np.flatnonzero(valid)
    # By the new row (old column), then the new column (old row).
    slots = slots[np.lexsort((rows[slots], columns[slots]))]
    padding = np.flatnonzero(~valid)
    order = np.concatenate([slots, padding])
    data = matrix.data[jnp.asarray(order, np.int32 if len(order) < 2**31 else None)]
    new_rows, new_columns = columns[slots], rows[slots]
    index_dtype = matrix.indices.dtype
    with jax.ensure_compile_time_eval():
        if is_csr:
            new_indptr = np.searchsorted(new_rows, np.arange(n_columns + 1))
            new_indices = np.concatenate([new_columns, np.zeros(len(padding))])
            return jsparse.BCSR(
                (
                    data,
                    jnp.asarray(new_indices, index_dtype),
                    jnp.asarray(new_indptr, matrix.indptr.dtype),
                ),
                shape=(n_columns, n_rows),
            )
        new_indices = np.concatenate(
            [
                np.stack([new_rows, new_columns], axis=1),
                np.broadcast_to([n_columns, n_rows], (len(padding), 2)),
            ]
        )
        return jsparse.BCOO(
            (data, jnp.asarray(new_indices, index_dtype)),
            shape=(n_columns, n_rows),
            indices_sorted=True,
            unique_indices=bool(matrix.unique_indices),
        )


def _diagonal_layout(
    matrix: jsparse.BCOO | jsparse.BCSR,
) -> tuple[Array, tuple[int, ...]] | None:
    """For a matrix whose stored entries lie on few diagonals: the offsets
    `column - row` of those diagonals, and `slots[d, i]`, the position in
    `matrix.data` of the entry `(i, i + offsets[d])` (`nse`, past the end, where
    none is stored). `None` if the indices are traced (the layout is computed
    once, on the host), if it would take more than `DIAGONAL_LAYOUT_OVERHEAD`
    slots per stored entry, or if an entry is stored twice.

    Why: on the CPU the sorted segment sum of `mv` is a serial scatter, 3-6x
    slower than the 5-point stencil it stands for on a 2-D Poisson matrix; a sum
    of shifted slices weighted by gathered values is as fast as the stencil
    (measured, 256² and 512² unknowns, float32). A padded-row (ELL) layout, a
    two-dimensional gather, was slower than the segment sum.
    """
    if isinstance(matrix, jsparse.BCSR):
        index_arrays = (matrix.indptr, matrix.indices)
    else:
        index_arrays = (matrix.indices,)
    if not concrete_arrays(index_arrays):
        return None
    n_rows, n_columns = matrix.shape
    nse = matrix.nse
    if n_rows == 0 or nse == 0:
        return None
    if isinstance(matrix, jsparse.BCSR):
        indptr = np.asarray(matrix.indptr, np.int64)
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))
        columns = np.asarray(matrix.indices, np.int64)[: indptr[-1]]
    else:
        indices = np.asarray(matrix.indices, np.int64)
        rows, columns = indices[:, 0], indices[:, 1]
    position = np.arange(len(rows))
    # Padding entries hold out-of-range indices.
    stored = (rows >= 0) & (rows < n_rows) & (columns >= 0) & (columns < n_columns)
    rows, columns, position = rows[stored], columns[stored], position[stored]
    offsets, which = np.unique(columns - rows, return_inverse=True)
    if len(offsets) == 0 or len(offsets) * n_rows > DIAGONAL_LAYOUT_OVERHEAD * max(
        len(rows), n_rows
    ):
        return None
    slots = np.full((len(offsets), n_rows), nse, np.int64)
    slots[which, rows] = position
    if np.count_nonzero(slots != nse) != len(rows):
        return None  # duplicates: left to the segment sum, which adds them
    dtype = np.int32 if nse < 2**31 else np.int64
    return jnp.asarray(slots, dtype), tuple(int(o) for o in offsets)


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
    # The values only: the index arrays stay as they are (concrete ones concrete
    # under `jit`, where `jnp.conj` of them would be traced).
    matrix = operator.matrix
    data = jnp.conj(matrix.data)
    if isinstance(matrix, jsparse.BCSR):
        matrix = jsparse.BCSR((data, matrix.indices, matrix.indptr), shape=matrix.shape)
    else:
        matrix = jsparse.BCOO(
            (data, matrix.indices),
            shape=matrix.shape,
            indices_sorted=matrix.indices_sorted,
            unique_indices=matrix.unique_indices,
        )
    return SparseLinearOperator(matrix, operator.tags, operator.max_dense_size)


is_cacheable.register(SparseLinearOperator)(lambda op: concrete_arrays(op.matrix))
reads_every_leaf.register(SparseLinearOperator)(lambda op: True)
has_cheap_diagonal.register(SparseLinearOperator)(lambda op: True)


@dataclasses.dataclass(frozen=True)
class _StateSignature:
    format: type
    shape: tuple
    dtype: Any
    nse: int
    tags: frozenset
    max_dense_size: int


def _state_signature(operator: SparseLinearOperator) -> _StateSignature:
    """A sparse operator in a solver's state counts by its format, shape, dtype,
    number of stored entries and tags, not by its static layout (diagonal
    offsets, sortedness), which is computed on the host from concrete indices
    (see `_transpose_on_host`, `_diagonal_layout`): the transpose that
    `Normal(CG())`'s `init` makes of an operator with concrete indices has one,
    and the same transpose in `init` traced (the state check, the compiled
    solve) has none. The state of `solver.init(sparse_op, {})` was refused as
    "does not match" by `linear_solve(sparse_op, b, solver, state=state)`.
    Either layout solves alike."""
    matrix = operator.matrix
    return _StateSignature(
        type(matrix),
        tuple(matrix.shape),
        jnp.dtype(matrix.data.dtype),
        int(matrix.data.shape[0]),
        operator.tags,
        operator.max_dense_size,
    )


STATE_SIGNATURES[SparseLinearOperator] = _state_signature
