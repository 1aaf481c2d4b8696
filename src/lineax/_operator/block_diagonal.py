"""`BlockDiagonalLinearOperator`: operators acting side by side on the parts of a
tuple."""

from collections.abc import Sequence

import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._misc import result_dtype
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_unit_diagonal,
    is_cacheable,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    is_tridiagonal,
    is_upper_triangular,
    linearise,
    materialise,
    tridiagonal,
)


class BlockDiagonalLinearOperator(AbstractLinearOperator):
    """A block-diagonal operator: block `i` maps part `i` of the input to part `i`
    of the output, and nothing else.

    Input and output are tuples, with one entry per block (the blocks' own
    structures, which may be PyTrees). Its matrix is
    `jax.scipy.linalg.block_diag` of the blocks' matrices, which `mv` never forms.
    Solve it with [`lineax.BlockDiagonal`][] (which
    [`lineax.AutoLinearSolver`][] picks): each block by its own solver.

    **Arguments:**

    - `blocks`: a sequence of one or more linear operators (not necessarily
        square, nor of one size or dtype).
    """

    blocks: tuple[AbstractLinearOperator, ...]

    def __init__(self, blocks: Sequence[AbstractLinearOperator]):
        if isinstance(blocks, AbstractLinearOperator) or not isinstance(
            blocks, Sequence
        ):
            raise TypeError(
                "`blocks` must be a sequence (list or tuple) of linear operators, "
                f"got {type(blocks).__name__}."
            )
        if len(blocks) == 0:
            raise ValueError("`blocks` must hold at least one operator.")
        for i, block in enumerate(blocks):
            if not isinstance(block, AbstractLinearOperator):
                raise TypeError(
                    f"`blocks[{i}]` must be a `lineax.AbstractLinearOperator`, got "
                    f"{type(block).__name__}."
                )
        self.blocks = tuple(blocks)

    def mv(self, vector):
        return tuple(block.mv(x) for block, x in zip(self.blocks, vector))

    def as_matrix(self):
        dtype = result_dtype(self.in_structure(), self.out_structure())
        return jsl.block_diag(*(b.as_matrix().astype(dtype) for b in self.blocks))

    def transpose(self):
        return BlockDiagonalLinearOperator([b.transpose() for b in self.blocks])

    def in_structure(self):
        return tuple(block.in_structure() for block in self.blocks)

    def out_structure(self):
        return tuple(block.out_structure() for block in self.blocks)


def _square_blocks(operator: BlockDiagonalLinearOperator) -> bool:
    return all(b.in_size() == b.out_size() for b in operator.blocks)


# With square blocks on the diagonal, the matrix is of a kind (diagonal,
# tridiagonal, triangular, symmetric, definite, unit diagonal) when every block is.
for _pred in (
    is_symmetric,
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
    is_positive_semidefinite,
    is_negative_semidefinite,
    has_unit_diagonal,
):
    _pred.register(BlockDiagonalLinearOperator)(
        lambda op, p=_pred: _square_blocks(op) and all(p(b) for b in op.blocks)
    )


def _dtype(operator: BlockDiagonalLinearOperator):
    return result_dtype(operator.in_structure(), operator.out_structure())


@diagonal.register(BlockDiagonalLinearOperator)
def _(operator):
    if not _square_blocks(operator):
        return jnp.diagonal(operator.as_matrix())
    dtype = _dtype(operator)
    return jnp.concatenate([diagonal(b).astype(dtype) for b in operator.blocks])


@tridiagonal.register(BlockDiagonalLinearOperator)
def _(operator):
    if not _square_blocks(operator):
        return tridiagonal.dispatch(AbstractLinearOperator)(operator)
    dtype = _dtype(operator)
    diags, lowers, uppers = [], [], []
    for i, block in enumerate(operator.blocks):
        d, lower, upper = (x.astype(dtype) for x in tridiagonal(block))
        diags.append(d)
        # Between two blocks the off-diagonal bands are zero.
        gap = [] if i == 0 else [jnp.zeros(1, dtype)]
        lowers += gap + [lower]
        uppers += gap + [upper]
    return (
        jnp.concatenate(diags),
        jnp.concatenate(lowers),
        jnp.concatenate(uppers),
    )


def _map(fn):
    return lambda op: BlockDiagonalLinearOperator([fn(b) for b in op.blocks])


materialise.register(BlockDiagonalLinearOperator)(_map(materialise))
linearise.register(BlockDiagonalLinearOperator)(_map(linearise))
conj.register(BlockDiagonalLinearOperator)(_map(conj))
is_cacheable.register(BlockDiagonalLinearOperator)(
    lambda op: all(is_cacheable(b) for b in op.blocks)
)
