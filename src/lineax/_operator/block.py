"""`BlockLinearOperator`: a 2-D grid of operators, acting on tuples."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import describe, result_dtype, strip_weak_dtype, tree_size
from .._tags import as_tags, transpose_tags
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_cheap_diagonal,
    holds_values,
    is_cacheable,
    linearise,
    materialise,
    matrix_is_stored,
    reads_every_leaf,
    register_scaled,
    register_tag_predicates,
    scaled,
    scaled_tags,
    shape_mismatch,
)


def check_parts(vector: Any, structure: tuple, who: str) -> None:
    """Raise a ValueError unless `vector` is a tuple (or list) of parts with the
    PyTree structures and shapes of the parts of `structure`, an operator's input
    structure (one part per block column). `mv` pairs blocks with parts by `zip`,
    which silently dropped a missing or extra part (a wrong product, no error)
    and split a single array into its scalars (an error from deep in JAX)."""
    if not isinstance(vector, (tuple, list)) or len(vector) != len(structure):
        got = (
            f"a {type(vector).__name__} of {len(vector)} parts"
            if isinstance(vector, (tuple, list))
            else type(vector).__name__
        )
        raise ValueError(
            f"`vector` of this `{who}` must be a tuple of {len(structure)} parts, "
            f"one per block column (its `in_structure()`: {describe(structure)}), "
            f"got {got}."
        )
    for i, (part, want) in enumerate(zip(vector, structure)):
        mismatch = shape_mismatch(part, want)
        if mismatch is not None:
            raise ValueError(
                f"`vector[{i}]` of this `{who}` must have the structure and shapes "
                f"of {describe(want)}, got {mismatch}."
            )


class BlockLinearOperator(AbstractLinearOperator):
    """A block operator: a 2-D grid of operators, with `None` for a zero block.

    Block `(i, j)` maps part `j` of the input to part `i` of the output:
    `mv(x)[i] = sum_j blocks[i][j].mv(x[j])`. Input and output are tuples with
    one entry per block column / row (each a block's own structure, which may
    be a PyTree). All blocks of a row must have one output structure, and all
    blocks of a column one input structure; each row and column needs at least
    one block that is not `None`.

    [`lineax.AutoLinearSolver`][] solves it densely (LU of the whole matrix);
    for a 2×2 grid, [`lineax.Schur`][] solves through the Schur complement of the
    top-left block instead.

    **Arguments:**

    - `blocks`: a sequence of rows, each a sequence of linear operators or
        `None`, all rows of one length.
    - `tags`: structure of the whole operator (e.g.
        [`lineax.symmetric_tag`][] for `[[A, Bᵀ], [B, D]]` with `A`, `D`
        symmetric), which cannot be read from the blocks at trace time.
    """

    blocks: tuple[tuple[AbstractLinearOperator | None, ...], ...]
    tags: frozenset = eqx.field(static=True)

    def __init__(self, blocks: Sequence[Sequence[Any]], tags: Any = ()):
        if not isinstance(blocks, Sequence) or not all(
            isinstance(row, Sequence) for row in blocks
        ):
            raise TypeError(
                "`blocks` must be a sequence of rows, each a sequence of operators "
                "or None (e.g. `[[a, b], [c, None]]`)."
            )
        rows = tuple(tuple(row) for row in blocks)
        if len(rows) == 0 or len(rows[0]) == 0:
            raise ValueError("`blocks` must have at least one row and one column.")
        if any(len(row) != len(rows[0]) for row in rows):
            raise ValueError(
                "Every row of `blocks` must have the same number of blocks; got row "
                f"lengths {[len(row) for row in rows]}."
            )
        for i, row in enumerate(rows):
            for j, block in enumerate(row):
                if block is not None and not isinstance(block, AbstractLinearOperator):
                    raise TypeError(
                        f"`blocks[{i}][{j}]` must be a `lineax.AbstractLinearOperator`"
                        f" or None, got {type(block).__name__}."
                    )
        self.blocks = rows
        self.tags = as_tags(tags)
        # Raise now if a row or column has mismatched or no blocks.
        self._row_structures()
        self._column_structures()

    def _row_structures(self) -> tuple:
        out = []
        for i, row in enumerate(self.blocks):
            structures = [
                (f"blocks[{i}][{j}]", b.out_structure())
                for j, b in enumerate(row)
                if b is not None
            ]
            out.append(_common(structures, f"row {i}", "output"))
        return tuple(out)

    def _column_structures(self) -> tuple:
        out = []
        for j in range(len(self.blocks[0])):
            column = [row[j] for row in self.blocks]
            structures = [
                (f"blocks[{i}][{j}]", b.in_structure())
                for i, b in enumerate(column)
                if b is not None
            ]
            out.append(_common(structures, f"column {j}", "input"))
        return tuple(out)

    def mv(self, vector):
        check_parts(vector, self.in_structure(), "BlockLinearOperator")
        out = []
        for row in self.blocks:
            parts = [b.mv(x) for b, x in zip(row, vector) if b is not None]
            total = parts[0]
            for part in parts[1:]:
                total = jtu.tree_map(lambda a, b: a + b, total, part)
            out.append(total)
        return tuple(out)

    def as_matrix(self):
        dtype = result_dtype(self.in_structure(), self.out_structure())
        rows = self._row_structures()
        columns = self._column_structures()
        grid = [
            [
                jnp.zeros((tree_size(r), tree_size(c)), dtype)
                if b is None
                else b.as_matrix().astype(dtype)
                for b, c in zip(row, columns)
            ]
            for row, r in zip(self.blocks, rows)
        ]
        return jnp.block(grid)

    def transpose(self):
        columns = [
            [None if b is None else b.transpose() for b in column]
            for column in zip(*self.blocks)
        ]
        return BlockLinearOperator(columns, transpose_tags(self.tags))

    def in_structure(self):
        return self._column_structures()

    def out_structure(self):
        return self._row_structures()


def _common(structures: list, where: str, kind: str):
    """The one structure shared by the blocks of a row or column, given as
    `(name, structure)` pairs."""
    if len(structures) == 0:
        raise ValueError(
            f"{where.capitalize()} of `blocks` holds only None: its {kind} structure "
            "is unknown. Put a zero operator there (e.g. `lx.MatrixLinearOperator("
            "jnp.zeros((m, n)))`)."
        )
    first_name, first = structures[0]
    for name, structure in structures[1:]:
        if strip_weak_dtype(structure) != strip_weak_dtype(first):
            raise ValueError(
                f"Mismatched block shapes in {where} of `blocks`: `{first_name}` has "
                f"{kind} {describe(first)} but `{name}` has {kind} "
                f"{describe(structure)}; all blocks of a {where.split()[0]} must "
                f"have one {kind} structure."
            )
    return first


register_tag_predicates(BlockLinearOperator)


def _map(fn):
    def mapped(operator: BlockLinearOperator) -> BlockLinearOperator:
        rows = [[None if b is None else fn(b) for b in row] for row in operator.blocks]
        return BlockLinearOperator(rows, operator.tags)

    return mapped


def _square_diagonal_blocks(operator: BlockLinearOperator) -> bool:
    if len(operator.blocks) != len(operator.blocks[0]):
        return False
    diagonal_blocks = [row[i] for i, row in enumerate(operator.blocks)]
    return all(b is not None and b.in_size() == b.out_size() for b in diagonal_blocks)


@diagonal.register(BlockLinearOperator)
def _(operator):
    # With square diagonal blocks, the diagonal is theirs; the other blocks are
    # never read.
    n = min(len(operator.blocks), len(operator.blocks[0]))
    if not _square_diagonal_blocks(operator):
        return jnp.diagonal(operator.as_matrix())
    dtype = result_dtype(operator.in_structure(), operator.out_structure())
    return jnp.concatenate(
        [diagonal(operator.blocks[i][i]).astype(dtype) for i in range(n)]
    )


@register_scaled(BlockLinearOperator)
def _(operator, kind, scalar=None):
    # Each block scaled: a block operator still, which `lx.Schur` solves.
    return BlockLinearOperator(
        [
            [None if b is None else scaled(b, kind, scalar) for b in row]
            for row in operator.blocks
        ],
        scaled_tags(operator, kind, scalar),
    )


materialise.register(BlockLinearOperator)(_map(materialise))
linearise.register(BlockLinearOperator)(_map(linearise))
conj.register(BlockLinearOperator)(_map(conj))
is_cacheable.register(BlockLinearOperator)(
    lambda op: all(is_cacheable(b) for row in op.blocks for b in row if b is not None)
)
reads_every_leaf.register(BlockLinearOperator)(
    lambda op: all(
        reads_every_leaf(b) for row in op.blocks for b in row if b is not None
    )
)
# (Its matrix places the blocks' matrices, and zeros for the missing blocks.)
matrix_is_stored.register(BlockLinearOperator)(
    lambda op: all(
        matrix_is_stored(b) for row in op.blocks for b in row if b is not None
    )
)
holds_values.register(BlockLinearOperator)(
    lambda op: all(holds_values(b) for row in op.blocks for b in row if b is not None)
)


@has_cheap_diagonal.register(BlockLinearOperator)
def _(operator):
    # As `diagonal` above: the diagonal blocks' diagonals, or the matrix's.
    if _square_diagonal_blocks(operator):
        return all(
            has_cheap_diagonal(operator.blocks[i][i])
            for i in range(len(operator.blocks))
        )
    return holds_values(operator)
