"""What the incomplete factorisations (`ILUPreconditioner`,
`IncompleteCholeskyPreconditioner`) share: the sparsity pattern, the elimination
schedule and the level-scheduled triangular solves.

The split between host and device is the contract of this module:

- Everything that depends only on the sparsity *pattern* (which entries are stored,
  the order in which they may be eliminated, which rows of a triangular solve are
  independent) is computed once, with NumPy, from the concrete index arrays of the
  sparse matrix, and stored as integer arrays. The pattern must therefore be known
  when the preconditioner is built: indices may be closed-over constants inside
  `jit`, but not traced.
- Everything that depends on the *values* is JAX code over those integer arrays, so
  the values may be traced: `jit`, `vmap` and `grad` over them work.
- Loops run over *stages* (groups of eliminations that touch different rows) and
  *levels* (groups of rows of a triangular solve that do not depend on each other),
  each one vectorised gather/scatter, so the number of sequential steps is the
  depth of the dependency graph (`2√n` for a 2-D grid in natural order), not `n`.
  This is the level scheduling of Anderson and Saad ("Solving sparse triangular
  linear systems on parallel computers", 1989; Saad, "Iterative Methods for Sparse
  Linear Systems", 2nd ed., §11.6).
- Everything a construction computes from the values (scattering them onto the
  pattern, the elimination, the breakdown test, gathering the factors into the
  level layout) is one function of the values and of the integer arrays, which
  each preconditioner compiles with `jit_when_eager`. Built un-jitted, as a
  constructor usually is, it ran operation by operation: 30-40 small XLA programs
  compiled for each new size of pattern (1-1.5 s, CPU), where one is now compiled
  per shape (0.3-0.4 s) and reused by every matrix of that shape.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact, Int

from .._jax_sparse import jsparse
from .._misc import jit_when_eager
from .._operator.base import AbstractLinearOperator
from .._operator.sparse import SparseLinearOperator
from .._operator.tagged import unwrap_tagged


#
# The pattern, read from the concrete index arrays.
#


class Pattern(NamedTuple):
    """A sparsity pattern in CSR order (sorted by row, then column, no duplicates,
    the whole diagonal included), as NumPy arrays. Built on the host, never stored
    in a preconditioner."""

    size: int
    indptr: np.ndarray  # (size + 1,)
    columns: np.ndarray  # (nnz,)
    rows: np.ndarray  # (nnz,)
    diagonal: np.ndarray  # (size,): the slot of (i, i)

    @property
    def nnz(self) -> int:
        return len(self.columns)


def sparse_operator_of(operator: Any, who: str) -> tuple[SparseLinearOperator, Any]:
    """The `SparseLinearOperator` inside `operator` (which may be tagged), and the
    operator whose tags count."""
    inner = unwrap_tagged(operator)
    if not isinstance(inner, SparseLinearOperator):
        kind = (
            type(operator).__name__
            if isinstance(operator, AbstractLinearOperator)
            else f"a {type(operator).__name__}"
        )
        raise TypeError(
            f"`{who}` factorises a sparse matrix on its sparsity pattern, so "
            "`operator` must be a `lx.SparseLinearOperator` (BCSR or BCOO), got "
            f"{kind}. For a dense or matrix-free operator use "
            "`lx.JacobiPreconditioner`, `lx.SSORPreconditioner` (dense) or a "
            "polynomial preconditioner."
        )
    rows, cols = inner.matrix.shape
    if rows != cols:
        raise ValueError(
            f"`{who}` needs a square `operator`, got a {rows}×{cols} sparse matrix."
        )
    return inner, operator


def _concrete(array: Any, who: str) -> np.ndarray:
    if isinstance(array, jax.core.Tracer):
        raise ValueError(
            f"`{who}` computes its elimination schedule from the sparsity pattern "
            "when it is built, so the sparse matrix's index arrays must be concrete "
            "(not traced). Build the `lx.SparseLinearOperator` from index arrays "
            "closed over by the jitted function (only its values traced), or build "
            "the preconditioner outside `jit` and pass it in. (NumPy index arrays "
            "given to `BCOO`/`BCSR` inside `jit` are traced too: convert them with "
            "`jnp.asarray` outside `jit`, or build the matrix inside `with "
            "jax.ensure_compile_time_eval():`.)"
        )
    return np.asarray(array)


def stored_entries(matrix: jsparse.BCOO | jsparse.BCSR, who: str):
    """`(rows, columns)` of every stored slot as NumPy arrays; padding slots get
    the out-of-range row `n`."""
    n = matrix.shape[0]
    if isinstance(matrix, jsparse.BCSR):
        indptr = _concrete(matrix.indptr, who).astype(np.int64)
        columns = _concrete(matrix.indices, who).astype(np.int64)
        rows = np.repeat(np.arange(n), np.diff(indptr))
        rows = np.concatenate([rows, np.full(len(columns) - len(rows), n)])
    else:
        indices = _concrete(matrix.indices, who).astype(np.int64)
        rows, columns = indices[:, 0].copy(), indices[:, 1].copy()
    valid = (rows >= 0) & (rows < n) & (columns >= 0) & (columns < n)
    rows[~valid] = n
    columns[~valid] = 0
    return rows, columns


def make_pattern(keys: np.ndarray, n: int) -> Pattern:
    """The pattern of the entries with keys `row * n + column`, plus the diagonal."""
    keys = np.union1d(keys, np.arange(n, dtype=np.int64) * (n + 1))
    rows, columns = np.divmod(keys, n)
    indptr = np.searchsorted(rows, np.arange(n + 1))
    diagonal = np.searchsorted(keys, np.arange(n, dtype=np.int64) * (n + 1))
    return Pattern(n, indptr, columns, rows, diagonal)


def slots_of(pattern: Pattern, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The pattern slot of each `(row, column)`; `nnz` (out of range, so dropped by
    the scatters) for rows `>= n` and for entries not in the pattern."""
    n = pattern.size
    keys = pattern.rows * n + pattern.columns
    query = np.where(rows < n, rows * n + columns, -1)
    slot = np.minimum(np.searchsorted(keys, query), pattern.nnz - 1)
    found = (rows < n) & (keys[slot] == query)
    return np.where(found, slot, pattern.nnz)


def scatter_values(data: Array, slots: Int[Array, " entries"], nnz: int) -> Array:
    """The values on the pattern: stored duplicates summed, padding dropped."""
    return jax.ops.segment_sum(data, slots, num_segments=nnz)


#
# Grouping items by stage or level into padded arrays.
#


def _padded_groups(
    group: np.ndarray, num_groups: int, columns: list[np.ndarray], fills: list[int]
) -> list[np.ndarray]:
    """Arrays of shape `(num_groups, width)`: row `g` holds the items of group `g`
    (in their original order), padded with `fills`."""
    counts = np.bincount(group, minlength=num_groups)
    width = max(int(counts.max(initial=0)), 1)
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(group)) - starts[sorted_group]
    out = []
    for column, fill in zip(columns, fills):
        padded = np.full((num_groups, width), fill, dtype=np.int64)
        padded[sorted_group, position] = column[order]
        out.append(padded)
    return out


def index_array(array: np.ndarray) -> Int[Array, "..."]:
    """A host index array as a JAX `int32` array. (Cast on the host and
    `device_put`: `jnp.asarray` compiles a copy for each new shape, when eager.)"""
    return jax.device_put(np.asarray(array, np.int32))


#
# The ILU(0) elimination, by stages.
#


class Elimination(eqx.Module):
    """The ILU(0) elimination of a pattern (Saad, Algorithm 10.4, the IKJ variant),
    grouped into stages.

    Elimination `(i, k)` (for a stored `a_ik`, `k < i`) sets `l_ik = a_ik / u_kk`
    and then `a_ij -= l_ik u_kj` for every stored `a_ij` with `j > k` and stored
    `u_kj`. It reads row `k`, which must be final (all its eliminations done), and
    writes row `i`, whose own eliminations must run in the order of `k`. Stage of
    `(i, k)` = one more than the later of the previous elimination in row `i` and
    the last one of row `k`; eliminations in one stage write distinct rows and read
    only final rows, so each stage is one gather and one scatter.
    """

    # (stages, width): slots of a_ik and u_kk, padded with nnz.
    lower: Int[Array, "stages width"]
    pivot: Int[Array, "stages width"]
    # (stages, updates): slots of a_ij, l_ik and u_kj, padded with nnz.
    target: Int[Array, "stages updates"]
    factor: Int[Array, "stages updates"]
    source: Int[Array, "stages updates"]


def elimination(pattern: Pattern) -> Elimination:
    n, indptr, columns = pattern.size, pattern.indptr, pattern.columns
    nnz = pattern.nnz
    rows = pattern.rows
    # The eliminations are the strictly lower slots, in CSR order (rows ascending,
    # columns ascending within a row): the order the stages must respect.
    lower = np.flatnonzero(columns < rows)
    op_rows, op_cols = rows[lower], columns[lower]
    stage = np.empty(len(lower), dtype=np.int64)
    done = [-1] * n
    previous_row, previous_stage = -1, -1
    for index, (i, k) in enumerate(zip(op_rows.tolist(), op_cols.tolist())):
        if i != previous_row:
            if previous_row >= 0:
                done[previous_row] = previous_stage
            previous_row, previous_stage = i, -1
        previous_stage = max(previous_stage + 1, done[k] + 1)
        stage[index] = previous_stage
    num_stages = int(stage.max(initial=-1)) + 1

    # The updates of elimination (i, k): slots (k, j) with j > k in row k, and the
    # matching slot (i, j) where it is stored.
    first = pattern.diagonal[op_cols] + 1
    counts = indptr[op_cols + 1] - first
    owner = np.repeat(np.arange(len(lower)), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    source = np.repeat(first - offsets, counts) + np.arange(int(counts.sum()))
    target = slots_of(pattern, op_rows[owner], columns[source])
    keep = target < nnz
    owner, source, target = owner[keep], source[keep], target[keep]

    lower_slots, pivot_slots = _padded_groups(
        stage, num_stages, [lower, pattern.diagonal[op_cols]], [nnz, nnz]
    )
    targets, factors, sources = _padded_groups(
        stage[owner], num_stages, [target, lower[owner], source], [nnz, nnz, nnz]
    )
    return Elimination(
        index_array(lower_slots),
        index_array(pivot_slots),
        index_array(targets),
        index_array(factors),
        index_array(sources),
    )


def gathered(array: Array, index: Int[Array, "..."], fill: int) -> Array:
    """`array[index]`, `fill` where `index` is out of range (the padding slots).
    An empty `array` (a matrix of size 0, or one storing no entry) gathers only
    `fill`: JAX rejects a gather from an empty array, even in fill mode."""
    if array.shape[0] == 0:
        return jnp.full(index.shape, fill, array.dtype)
    return array.at[index].get(mode="fill", fill_value=fill)


# (Called within each preconditioner's jitted factorisation, so it is compiled once
# per shape, not traced again at every construction.)
def eliminate(schedule: Elimination, values: Array) -> Array:
    """The ILU(0) factors on the pattern: `L` (unit diagonal, not stored) in the
    strictly lower slots, `U` in the others."""

    def stage(values, slots):
        lower, pivot, target, factor, source = slots
        divided = gathered(values, lower, 0) / gathered(values, pivot, 1)
        values = values.at[lower].set(divided, mode="drop")
        update = gathered(values, factor, 0) * gathered(values, source, 0)
        return values.at[target].add(-update, mode="drop"), None

    if schedule.lower.shape[0] == 0:
        # No eliminations (a diagonal pattern, or an empty matrix, whose values
        # have no entry that the stage's gathers could read: JAX rejects them).
        return values
    slots = (
        schedule.lower,
        schedule.pivot,
        schedule.target,
        schedule.factor,
        schedule.source,
    )
    values, _ = lax.scan(stage, values, slots)
    return values


#
# Sparse triangular solves, by levels.
#


class TriangularFactor(eqx.Module):
    """A sparse triangular matrix `T`, stored for the solve `T x = b` by levels:
    level `l` holds the rows whose off-diagonal entries only reference rows of
    earlier levels, so all its rows are computed at once.

    The values are gathered into the level layout when the factor is built (once
    per preconditioner), so that each level of a solve is one gather of `x`, a
    segment sum and one scatter; gathering them per solve made it ~3x slower.
    """

    # (levels, width): the rows of each level, padded with n, n + 1, ... (out of
    # range: dropped).
    rows: Int[Array, "levels width"]
    # (levels, entries): per off-diagonal entry of the level's rows, its column,
    # the position of its row within the level (padded with width, dropped by the
    # segment sum), and its value (padded with 0).
    columns: Int[Array, "levels entries"]
    segments: Int[Array, "levels entries"]
    values: Inexact[Array, "levels entries"]
    # (levels, width): the diagonal of each level's rows (padded with 1), or None
    # for a unit diagonal.
    diagonal: Inexact[Array, "levels width"] | None


class TriangularLayout(eqx.Module):
    """The integer arrays of a `TriangularFactor`, computed on the host from the
    pattern, and the pattern slot of each of its entries (padded with `nnz`), from
    which `triangular_factor` gathers the values."""

    rows: Int[Array, "levels width"]
    columns: Int[Array, "levels entries"]
    segments: Int[Array, "levels entries"]
    slots: Int[Array, "levels entries"]


def triangular_layout(
    n: int,
    rows: np.ndarray,
    columns: np.ndarray,
    slots: np.ndarray,
    nnz: int,
    *,
    lower: bool,
) -> TriangularLayout:
    """The layout of the triangular matrix with off-diagonal entries `(rows,
    columns)` (strictly lower if `lower`, else strictly upper) holding the values of
    the pattern slots `slots` (of `nnz`)."""
    level = [0] * n
    order = np.argsort(rows if lower else -rows, kind="stable")
    for i, k in zip(rows[order].tolist(), columns[order].tolist()):
        # Rows are visited in dependency order, so `level[k]` is final here.
        if level[k] + 1 > level[i]:
            level[i] = level[k] + 1
    level = np.asarray(level, dtype=np.int64)
    num_levels = int(level.max(initial=0)) + 1
    (level_rows,) = _padded_groups(level, num_levels, [np.arange(n)], [n])
    width = level_rows.shape[1]
    # Padding rows distinct too (`n`, `n + 1`, ..., all out of range, so dropped),
    # so that the solve's scatter may declare its indices unique (see
    # `solve_triangular`).
    level_rows = np.where(level_rows < n, level_rows, n + np.arange(width))
    position = np.empty(n, dtype=np.int64)
    for row in level_rows:
        real = row[row < n]
        position[real] = np.arange(len(real))
    entry_slots, entry_columns, segments = _padded_groups(
        level[rows], num_levels, [slots, columns, position[rows]], [nnz, 0, width]
    )
    return TriangularLayout(
        index_array(level_rows),
        index_array(entry_columns),
        index_array(segments),
        index_array(entry_slots),
    )


def triangular_factor(
    layout: TriangularLayout,
    values: Inexact[Array, " nnz"],
    diagonal: Inexact[Array, " size"] | None,
) -> TriangularFactor:
    """The triangular matrix of `layout` holding `values` (on the pattern), with
    diagonal `diagonal` (`None`: unit)."""
    if diagonal is not None:
        diagonal = gathered(diagonal, layout.rows, 1)
    return TriangularFactor(
        layout.rows,
        layout.columns,
        layout.segments,
        gathered(values, layout.slots, 0),
        diagonal,
    )


@jit_when_eager
def solve_triangular(
    factor: TriangularFactor, vector: Inexact[Array, " size"]
) -> Array:
    """Solve `T x = vector`, one level at a time."""
    if vector.shape[0] == 0:
        # (Its levels would gather from the empty `x`, which JAX rejects.)
        return vector
    width = factor.rows.shape[1]
    level_vector = gathered(vector, factor.rows, 0)

    def level(x, inputs):
        rows, columns, segments, values, rhs, diagonal = inputs
        sums = jax.ops.segment_sum(values * x[columns], segments, num_segments=width)
        new = rhs - sums
        if diagonal is not None:
            new = new / diagonal
        # (`unique_indices`, true of a level's rows, padding included: without
        # it JAX cannot transpose the scatter, and reverse mode through LSMR with
        # this preconditioner, which transposes the solve, raised
        # NotImplementedError.)
        return x.at[rows].set(new, mode="drop", unique_indices=True), None

    inputs = (
        factor.rows,
        factor.columns,
        factor.segments,
        factor.values,
        level_vector,
        factor.diagonal,
    )
    x, _ = lax.scan(level, jnp.zeros_like(vector), inputs)
    return x
