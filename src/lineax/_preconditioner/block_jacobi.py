"""`BlockJacobiPreconditioner`: the inverses of an operator's diagonal blocks."""

from typing import Any, SupportsIndex

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, Inexact, Int

from .._jax_sparse import jsparse
from .._misc import checked_count, Static
from .._operator.base import (
    AbstractLinearOperator,
    concrete_arrays,
    holds_values,
    is_cacheable,
    is_tridiagonal,
    reads_every_leaf,
    tridiagonal,
)
from .._operator.sparse import SparseLinearOperator
from .._operator.tagged import unwrap_tagged
from .base import (
    AbstractPreconditioner,
    apply_flat,
    check_square,
    definite_tags,
    replace_fields,
)


def _stored_sparse(operator: Any) -> SparseLinearOperator | None:
    """The `SparseLinearOperator` that `operator` is (or wraps in tags), if any."""
    operator = unwrap_tagged(operator)
    return operator if isinstance(operator, SparseLinearOperator) else None


def _sparse_diagonal_blocks(
    sparse: SparseLinearOperator, block_size: int, num_blocks: int
) -> Array:
    """The diagonal blocks of a sparse matrix, from its stored entries: one
    scatter, `O(nnz + n b)`, never the dense matrix. Duplicates are summed."""
    matrix = sparse.matrix
    n = matrix.shape[0]
    if isinstance(matrix, jsparse.BCSR):
        matrix = matrix.to_bcoo()
    rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
    block = rows // block_size
    inside = (rows < n) & (cols < n) & (block == cols // block_size)
    block = jnp.where(inside, block, num_blocks)  # out of range: dropped
    values = jnp.where(inside, matrix.data, 0)
    padded = num_blocks * block_size
    # The padding of the last block is the identity.
    pad = (jnp.arange(padded) >= n).reshape(num_blocks, block_size)
    blocks = jax.vmap(jnp.diag)(pad.astype(matrix.dtype))
    return blocks.at[block, rows % block_size, cols % block_size].add(
        values, mode="drop"
    )


def _diagonal_blocks(operator: Any, block_size: int) -> Array:
    """The diagonal blocks of `operator`'s matrix, shape `(blocks, b, b)`, the last
    one padded with the identity when `b` does not divide the size."""
    n = operator.in_size()
    num_blocks = -(-n // block_size)
    padded = num_blocks * block_size
    sparse = _stored_sparse(operator)
    if sparse is not None:
        return _sparse_diagonal_blocks(sparse, block_size, num_blocks)
    index = np.arange(padded).reshape(num_blocks, block_size)
    rows, cols = index[:, :, None], index[:, None, :]
    if is_tridiagonal(operator):
        # From the bands, never forming the n × n matrix.
        diag, lower, upper = tridiagonal(operator)
        dtype = diag.dtype
        pad = padded - n
        diag = jnp.concatenate([diag, jnp.ones(pad, dtype)])
        lower = jnp.concatenate([lower, jnp.zeros(pad + 1, dtype)])
        upper = jnp.concatenate([upper, jnp.zeros(pad + 1, dtype)])
        blocks = jnp.where(rows == cols, diag[rows], 0)
        blocks = jnp.where(rows == cols + 1, lower[cols], blocks)
        return jnp.where(rows + 1 == cols, upper[rows], blocks)
    matrix = operator.as_matrix()
    if padded > n:
        eye = jnp.eye(padded, dtype=matrix.dtype)
        matrix = eye.at[:n, :n].set(matrix)
    return matrix[rows, cols]


class BlockJacobiPreconditioner(AbstractPreconditioner):
    """The block-Jacobi preconditioner: the inverse of the block-diagonal part of
    the operator's matrix, with blocks of `block_size` consecutive unknowns (in
    PyTree-leaf order, as `as_matrix` flattens them).

    The blocks are extracted and LU-factorised once, all together (a batched
    factorisation), when the preconditioner is built; each application is a
    batched pair of triangular solves. `block_size=1` is the Jacobi preconditioner.
    When `block_size` does not divide the size, the last block is smaller.

    The operator must hold its matrix (a matrix or PyTree operator, one tagged
    diagonal or tridiagonal, whose blocks come from its bands, or a
    [`lineax.SparseLinearOperator`][], whose blocks come from its stored entries
    without densifying it): the blocks of a matrix-free operator cannot be read
    without materialising it, which is left to the user
    ([`lineax.materialise`][]).

    The result is tagged symmetric or positive (negative) semidefinite when the
    operator is (diagonal blocks of a definite matrix are definite).

    **Arguments:**

    - `operator`: a square linear operator.
    - `block_size`: the size of the diagonal blocks, a positive int.
    """

    lu: Inexact[Array, "blocks block_size block_size"]
    pivots: Int[Array, "blocks block_size"]
    transposed: bool = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(self, operator: AbstractLinearOperator, block_size: SupportsIndex):
        check_square(operator, "BlockJacobiPreconditioner")
        block_size = checked_count(block_size, "block_size", 1)
        if not (holds_values(operator) or _stored_sparse(operator) is not None):
            raise ValueError(
                "`BlockJacobiPreconditioner` needs the matrix of the operator, but "
                f"{type(operator).__name__} is matrix-free. Pass "
                "`lx.materialise(operator)` if it is small enough to materialise, or "
                "use `lx.JacobiPreconditioner(operator, probes=k)` or a polynomial "
                "preconditioner instead."
            )
        # (At least 1: an operator of size 0 has no blocks, of any size.)
        block_size = max(min(block_size, operator.in_size()), 1)
        blocks = _diagonal_blocks(operator, block_size)
        self.lu, self.pivots = jax.vmap(jsl.lu_factor)(blocks)
        self.transposed = False
        self.input_structure = Static(operator.out_structure())
        self.output_structure = Static(operator.in_structure())
        self.tags = definite_tags(operator)

    def mv(self, vector):
        num_blocks, block_size = self.pivots.shape
        trans = 1 if self.transposed else 0

        def solve(x):
            n = x.shape[0]
            x = jnp.concatenate([x, jnp.zeros(num_blocks * block_size - n, x.dtype)])
            x = x.reshape(num_blocks, block_size)
            out = jax.vmap(lambda lu, piv, b: jsl.lu_solve((lu, piv), b, trans))(
                self.lu, self.pivots, x
            )
            return out.reshape(-1)[:n]

        return apply_flat(solve, vector, self.out_structure())

    def transpose(self):
        return replace_fields(
            self,
            transposed=not self.transposed,
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


is_cacheable.register(BlockJacobiPreconditioner)(concrete_arrays)
reads_every_leaf.register(BlockJacobiPreconditioner)(lambda p: True)
