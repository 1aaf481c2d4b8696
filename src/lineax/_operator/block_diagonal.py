"""`BlockDiagonalLinearOperator`: operators acting side by side on the parts of a
tuple."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._misc import result_dtype, Static
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_cheap_diagonal,
    has_unit_diagonal,
    holds_values,
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
    matrix_is_stored,
    reads_every_leaf,
    register_scaled,
    scaled,
    tridiagonal,
)
from .block import check_parts


def stack_alike(blocks: Sequence[Any]) -> Any | None:
    """The blocks as one PyTree whose array leaves gain a leading axis, if they
    differ only in the values of their arrays (one PyTree structure, equal
    non-array data, equal array shapes and dtypes); else `None`. Also `None` for
    blocks without arrays (identities, or scaled by a Python scalar): a `vmap`
    over a stack of no arrays has no axis to map, and failed ("Cannot resolve
    batch dimension") in every method but `mv`."""
    parts = [eqx.partition(block, eqx.is_array) for block in blocks]
    dynamic0, static0 = parts[0]
    treedef0 = jtu.tree_structure(dynamic0)
    shapes0 = [(x.shape, x.dtype) for x in jtu.tree_leaves(dynamic0)]
    if not shapes0:
        return None
    for dynamic, static in parts[1:]:
        if jtu.tree_structure(dynamic) != treedef0:
            return None
        if [(x.shape, x.dtype) for x in jtu.tree_leaves(dynamic)] != shapes0:
            return None
        if jtu.tree_structure(static) != jtu.tree_structure(static0):
            return None
        if eqx.tree_equal(static, static0) is not True:
            return None
    stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *(d for d, _ in parts))
    return eqx.combine(stacked, static0)


def index_stacked(stacked: Any, i: int) -> Any:
    """Entry `i` of a PyTree stacked by `stack_alike`."""
    return jtu.tree_map(lambda x: x[i] if eqx.is_array(x) else x, stacked)


class BlockDiagonalLinearOperator(AbstractLinearOperator):
    """A block-diagonal operator: block `i` maps part `i` of the input to part `i`
    of the output, and nothing else.

    Input and output are tuples, with one entry per block (the blocks' own
    structures, which may be PyTrees). Its matrix is
    `jax.scipy.linalg.block_diag` of the blocks' matrices, which `mv` never forms.
    Solve it with [`lineax.BlockDiagonal`][] (which
    [`lineax.AutoLinearSolver`][] picks): each block by its own solver.

    When the blocks are alike (one operator type, with the same shapes, dtypes
    and tags: e.g. 100 `lx.MatrixLinearOperator`s of 50×50), they are stored
    stacked, as one operator whose arrays gain a leading axis, and every method
    (`mv`, `transpose`, the solve, ...) is one `vmap` over them: the program's
    size, and so its compile time, does not grow with the number of blocks.

    **Arguments:**

    - `blocks`: a sequence of one or more linear operators (not necessarily
        square, nor of one size or dtype).
    """

    # Exactly one of `_blocks` (the blocks as given) and `_stacked` (alike blocks,
    # stacked by `stack_alike`) is set. The stack is held split: its arrays, which
    # have the leading axis, and the rest in a static field. (The rest may hold a
    # Python number, the scalar of `2.0 * block`: a PyTree leaf, `jax.jit` traced
    # it as a 0-d array, with no leading axis to index or map, and every method of
    # `jax.jit(f)(2.0 * blockdiag, b)` failed with an `IndexError`.)
    _blocks: tuple[AbstractLinearOperator, ...] | None
    _stacked_arrays: AbstractLinearOperator | None
    _stacked_rest: AbstractLinearOperator | None = eqx.field(static=True)
    _count: int = eqx.field(static=True)
    _structures: Static = eqx.field(static=True)

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
        blocks = tuple(blocks)
        stacked = stack_alike(blocks) if len(blocks) > 1 else None
        self._blocks = blocks if stacked is None else None
        self._stacked_arrays, self._stacked_rest = _split(stacked)
        self._count = len(blocks)
        self._structures = Static(
            (
                tuple(b.in_structure() for b in blocks),
                tuple(b.out_structure() for b in blocks),
            )
        )

    @classmethod
    def _from_stacked(
        cls, stacked: AbstractLinearOperator, count: int, structures: Static
    ) -> "BlockDiagonalLinearOperator":
        out = object.__new__(cls)
        object.__setattr__(out, "_blocks", None)
        arrays, rest = _split(stacked)
        object.__setattr__(out, "_stacked_arrays", arrays)
        object.__setattr__(out, "_stacked_rest", rest)
        object.__setattr__(out, "_count", count)
        object.__setattr__(out, "_structures", structures)
        return out

    @property
    def _stacked(self) -> AbstractLinearOperator | None:
        if self._stacked_arrays is None:
            return None
        return eqx.combine(self._stacked_arrays, self._stacked_rest)

    @property
    def blocks(self) -> tuple[AbstractLinearOperator, ...]:
        """The blocks, one operator each (sliced out of the stack if stored
        stacked)."""
        if self._blocks is not None:
            return self._blocks
        return tuple(index_stacked(self._stacked, i) for i in range(self._count))

    @property
    def stacked(self) -> AbstractLinearOperator | None:
        """The alike blocks as one operator whose arrays have a leading axis of
        length `len(blocks)` (apply its methods under `eqx.filter_vmap`), or
        `None` if the blocks are not alike."""
        return self._stacked

    def representatives(self) -> tuple[AbstractLinearOperator, ...]:
        """Blocks enough to decide a structural question (a tag, a shape) for all
        of them: the first block if stacked (they are alike), else every block."""
        if self._stacked is not None:
            return (index_stacked(self._stacked, 0),)
        return self.blocks

    def map_blocks(self, fn: Callable, *, transposed: bool = False):
        """The block-diagonal operator of `fn(block)` for each block; `fn` maps an
        operator to one of the same structures (swapped if `transposed`)."""
        if self._stacked is None:
            return BlockDiagonalLinearOperator([fn(b) for b in self.blocks])
        stacked = eqx.filter_vmap(fn)(self._stacked)
        structures = self._structures
        if transposed:
            structures = Static(structures.value[::-1])
        return BlockDiagonalLinearOperator._from_stacked(
            stacked, self._count, structures
        )

    def mv(self, vector):
        check_parts(vector, self.in_structure(), "BlockDiagonalLinearOperator")
        if self._stacked is None:
            return tuple(block.mv(x) for block, x in zip(self.blocks, vector))
        xs = stack_vectors(vector)
        ys = eqx.filter_vmap(lambda block, x: block.mv(x))(self._stacked, xs)
        return unstack_vectors(ys, self._count)

    def as_matrix(self):
        dtype = result_dtype(self.in_structure(), self.out_structure())
        if self._stacked is None:
            return jsl.block_diag(*(b.as_matrix().astype(dtype) for b in self.blocks))
        matrices = eqx.filter_vmap(lambda b: b.as_matrix())(self._stacked)
        count, rows, columns = matrices.shape
        eye = jnp.eye(count, dtype=dtype)
        out = jnp.einsum(
            "ij,iab->iajb", eye, matrices.astype(dtype), precision=lax.Precision.HIGHEST
        )
        return out.reshape(count * rows, count * columns)

    def transpose(self):
        return self.map_blocks(lambda b: b.transpose(), transposed=True)

    def in_structure(self):
        return self._structures.value[0]

    def out_structure(self):
        return self._structures.value[1]


def _split(stacked: AbstractLinearOperator | None) -> tuple[Any, Any]:
    """A stack of blocks as (its arrays, the rest); `(None, None)` for none."""
    if stacked is None:
        return None, None
    return eqx.partition(stacked, eqx.is_array)


def stack_vectors(vectors: tuple) -> PyTree:
    """A tuple of alike PyTrees of arrays as one PyTree with a leading axis."""
    return jtu.tree_map(lambda *xs: jnp.stack(xs), *vectors)


def unstack_vectors(tree: PyTree, count: int) -> tuple:
    """Inverse of `stack_vectors`."""
    return tuple(jtu.tree_map(lambda x, i=i: x[i], tree) for i in range(count))


def _size(structure: PyTree) -> int:
    return sum(math.prod(s.shape) for s in jtu.tree_leaves(structure))


def square_blocks(operator: BlockDiagonalLinearOperator) -> bool:
    ins, outs = operator._structures.value
    return all(_size(i) == _size(o) for i, o in zip(ins, outs))


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
        lambda op, p=_pred: (
            square_blocks(op) and all(p(b) for b in op.representatives())
        )
    )


def _dtype(operator: BlockDiagonalLinearOperator):
    return result_dtype(operator.in_structure(), operator.out_structure())


@diagonal.register(BlockDiagonalLinearOperator)
def _(operator):
    if not square_blocks(operator):
        return jnp.diagonal(operator.as_matrix())
    dtype = _dtype(operator)
    if operator.stacked is not None:
        return eqx.filter_vmap(diagonal)(operator.stacked).astype(dtype).reshape(-1)
    return jnp.concatenate([diagonal(b).astype(dtype) for b in operator.blocks])


@tridiagonal.register(BlockDiagonalLinearOperator)
def _(operator):
    if not square_blocks(operator):
        return tridiagonal.dispatch(AbstractLinearOperator)(operator)
    dtype = _dtype(operator)
    if operator.stacked is not None:
        d, lower, upper = eqx.filter_vmap(tridiagonal)(operator.stacked)

        def bands(x):
            # Between two blocks the off-diagonal bands are zero: one zero after
            # each block's band, and none after the last.
            return jnp.pad(x.astype(dtype), ((0, 0), (0, 1))).reshape(-1)[:-1]

        return d.astype(dtype).reshape(-1), bands(lower), bands(upper)
    diags, lowers, uppers = [], [], []
    for i, block in enumerate(operator.blocks):
        d, lower, upper = (x.astype(dtype) for x in tridiagonal(block))
        diags.append(d)
        gap = [] if i == 0 else [jnp.zeros(1, dtype)]
        lowers += gap + [lower]
        uppers += gap + [upper]
    return (
        jnp.concatenate(diags),
        jnp.concatenate(lowers),
        jnp.concatenate(uppers),
    )


@register_scaled(BlockDiagonalLinearOperator)
def _(operator, kind, scalar=None):
    # Each block scaled: block diagonal still, solved block by block.
    return operator.map_blocks(lambda block: scaled(block, kind, scalar))


materialise.register(BlockDiagonalLinearOperator)(lambda op: op.map_blocks(materialise))
linearise.register(BlockDiagonalLinearOperator)(lambda op: op.map_blocks(linearise))
conj.register(BlockDiagonalLinearOperator)(lambda op: op.map_blocks(conj))
is_cacheable.register(BlockDiagonalLinearOperator)(
    lambda op: all(is_cacheable(b) for b in op.representatives())
)
# (Of the stacked operator itself, whose leaves are the blocks' leaves stacked: a
# question of structure, asked without indexing them.)
reads_every_leaf.register(BlockDiagonalLinearOperator)(
    lambda op: (
        all(reads_every_leaf(b) for b in op.blocks)
        if op._stacked is None
        else reads_every_leaf(op._stacked)
    )
)
matrix_is_stored.register(BlockDiagonalLinearOperator)(
    lambda op: all(matrix_is_stored(b) for b in op.representatives())
)
holds_values.register(BlockDiagonalLinearOperator)(
    lambda op: all(holds_values(b) for b in op.representatives())
)


@has_cheap_diagonal.register(BlockDiagonalLinearOperator)
def _(operator):
    # As `diagonal` above: the blocks' diagonals, or the matrix's.
    if square_blocks(operator):
        return all(has_cheap_diagonal(b) for b in operator.representatives())
    return holds_values(operator)
