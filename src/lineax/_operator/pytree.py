"""`PyTreeLinearOperator`: a "PyTree of matrices" acting on PyTrees of arrays."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import inexact_asarray, result_dtype, Static, structure_of
from .._tags import as_tags, transpose_tags
from ._arguments import check_not_operator
from .base import (
    AbstractLinearOperator,
    bands_of_matrix,
    concrete_arrays,
    conj,
    diagonal,
    is_cacheable,
    register_stored,
    register_tag_predicates,
    tridiagonal,
)


class PyTreeLinearOperator(AbstractLinearOperator):
    """A linear operator between PyTrees, given as a PyTree of matrices.

    If the output structure has leaves `y_i` and the input structure has leaves
    `x_j`, then `pytree` is a PyTree whose outer structure is that of the output and
    whose inner structure (below each output leaf) is that of the input, with the
    block for `(i, j)` an array of shape `y_i.shape + x_j.shape`. That is, it is
    the shape of the Jacobian `jax.jacfwd(f)(x)` of a function `f` from the input
    to the output.

    **Arguments:**

    - `pytree`: the PyTree of matrices described above. Leaves may be JAX or NumPy
        arrays or Python scalars; they are converted as by `jnp.asarray`, with
        integers and booleans in the default floating dtype.
    - `output_structure`: the structure of the output: a PyTree of
        `jax.ShapeDtypeStruct`s (or of arrays, whose shapes and dtypes are used).
    - `tags`: a tag or iterable of tags.

    The input structure is inferred from `pytree` and `output_structure`.
    """

    pytree: PyTree[Array]
    output_structure: Static = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(self, pytree: PyTree, output_structure: PyTree, tags: Any = ()):
        check_not_operator(pytree, "pytree")
        check_not_operator(output_structure, "output_structure")
        out_struct = structure_of(output_structure, "output_structure")
        out_leaves, out_treedef = jtu.tree_flatten(out_struct)
        if len(out_leaves) == 0:
            raise ValueError("`output_structure` must have at least one leaf.")
        try:
            subtrees = out_treedef.flatten_up_to(pytree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`pytree` must have the PyTree structure of `output_structure` at its "
                f"top level ({out_treedef}), with the input structure below each "
                "output leaf. Got a `pytree` of structure "
                f"{jtu.tree_structure(pytree)}."
            ) from e
        for leaf in jtu.tree_leaves(pytree):
            if not eqx.is_array_like(leaf):
                raise TypeError(
                    "Every leaf of `pytree` must be an array (or a Python or NumPy "
                    f"scalar), but got a leaf of type {type(leaf).__name__}."
                )
        # Python scalars and NumPy arrays become JAX arrays, as `jnp.asarray` makes
        # them (integers and booleans in the default floating dtype).
        pytree = jtu.tree_map(inexact_asarray, pytree)
        subtrees = out_treedef.flatten_up_to(pytree)
        in_struct = None
        for out_leaf, subtree in zip(out_leaves, subtrees):
            sub_struct = jtu.tree_map(lambda x, o=out_leaf: _input_leaf(x, o), subtree)
            if in_struct is None:
                in_struct = sub_struct
            elif jtu.tree_structure(in_struct) != jtu.tree_structure(sub_struct) or any(
                a.shape != b.shape
                for a, b in zip(jtu.tree_leaves(in_struct), jtu.tree_leaves(sub_struct))
            ):
                raise ValueError(
                    "Every output leaf's block of `pytree` must have the same input "
                    f"structure; got {in_struct} and {sub_struct}."
                )
        assert in_struct is not None
        if len(jtu.tree_leaves(in_struct)) == 0:
            raise ValueError("`pytree` must have at least one leaf per output leaf.")
        self.pytree = pytree
        # Input leaves take the dtype of the blocks mapping into them.
        dtype_tree = jtu.tree_map(
            lambda x: x.dtype, out_treedef.flatten_up_to(self.pytree)[0]
        )
        in_struct = jtu.tree_map(
            lambda s, d: jax.ShapeDtypeStruct(s.shape, d), in_struct, dtype_tree
        )
        self.output_structure = Static(out_struct)
        self.input_structure = Static(in_struct)
        self.tags = as_tags(tags)

    def mv(self, vector):
        out_struct = self.output_structure.value
        out_leaves, out_treedef = jtu.tree_flatten(out_struct)
        blocks = out_treedef.flatten_up_to(self.pytree)
        vec_leaves = jtu.tree_leaves(vector)
        results = []
        for out_leaf, block in zip(out_leaves, blocks):
            block_leaves = jtu.tree_leaves(block)
            # Promote explicitly: blocks may mix real and complex dtypes, which
            # strict dtype promotion refuses to combine implicitly.
            dtype = result_dtype(block_leaves, vec_leaves)
            terms = [
                jnp.tensordot(
                    b.astype(dtype),
                    jnp.asarray(v).astype(dtype),
                    axes=jnp.ndim(v),
                    precision=jax.lax.Precision.HIGHEST,
                )
                for b, v in zip(block_leaves, vec_leaves)
            ]
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            results.append(jnp.reshape(total, out_leaf.shape))
        return jtu.tree_unflatten(out_treedef, results)

    def as_matrix(self):
        out_leaves, out_treedef = jtu.tree_flatten(self.output_structure.value)
        in_leaves = jtu.tree_leaves(self.input_structure.value)
        blocks = out_treedef.flatten_up_to(self.pytree)
        dtype = result_dtype(self.pytree)
        rows = []
        for out_leaf, block in zip(out_leaves, blocks):
            out_size = math.prod(out_leaf.shape)
            row = [
                jnp.reshape(b, (out_size, math.prod(i.shape))).astype(dtype)
                for b, i in zip(jtu.tree_leaves(block), in_leaves)
            ]
            rows.append(row[0] if len(row) == 1 else jnp.concatenate(row, axis=1))
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)

    def transpose(self):
        out_leaves, out_treedef = jtu.tree_flatten(self.output_structure.value)
        in_leaves, in_treedef = jtu.tree_flatten(self.input_structure.value)
        blocks = [jtu.tree_leaves(b) for b in out_treedef.flatten_up_to(self.pytree)]
        new_blocks = []
        for j, in_leaf in enumerate(in_leaves):
            row = []
            for i, out_leaf in enumerate(out_leaves):
                block = blocks[i][j]
                n_out = len(out_leaf.shape)
                n_in = len(in_leaf.shape)
                perm = tuple(range(n_out, n_out + n_in)) + tuple(range(n_out))
                row.append(jnp.transpose(block, perm))
            new_blocks.append(jtu.tree_unflatten(out_treedef, row))
        pytree = jtu.tree_unflatten(in_treedef, new_blocks)
        transposed = PyTreeLinearOperator(
            pytree, self.input_structure.value, transpose_tags(self.tags)
        )
        # The transpose maps this operator's outputs, so it takes exactly their
        # structure. Inferring it from the transposed blocks' first row would give
        # another dtype where blocks mix dtypes (a real block in a complex row: the
        # transpose would declare a real input), and `A^T @ A` (e.g. `lx.Normal`)
        # would then refuse to compose.
        return with_input_structure(transposed, self.output_structure.value)

    def in_structure(self):
        return self.input_structure.value

    def out_structure(self):
        return self.output_structure.value


def with_input_structure(
    operator: PyTreeLinearOperator, structure: PyTree[jax.ShapeDtypeStruct]
) -> PyTreeLinearOperator:
    """`operator` with the input structure `structure` (of the same shapes) in place
    of the one inferred from its blocks' dtypes. For operators derived from another
    (its transpose, its conjugate, a materialised function): where blocks mix
    dtypes, the inferred structure can differ from the original's, and the derived
    operator must keep the structures it stands for."""
    inferred = operator.input_structure.value
    assert jtu.tree_structure(inferred) == jtu.tree_structure(structure)
    assert all(
        a.shape == b.shape
        for a, b in zip(jtu.tree_leaves(inferred), jtu.tree_leaves(structure))
    )
    # Set on the freshly built (unshared) operator: the constructor's signature is
    # public and has no place for an input structure.
    object.__setattr__(operator, "input_structure", Static(structure))
    return operator


def _input_leaf(block: Any, out_leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    shape = jnp.shape(block)
    n = len(out_leaf.shape)
    if shape[:n] != out_leaf.shape:
        raise ValueError(
            f"Each leaf of `pytree` must have shape `output_leaf.shape + "
            f"input_leaf.shape`; a block for the output leaf of shape {out_leaf.shape} "
            f"has shape {shape}."
        )
    return jax.ShapeDtypeStruct(shape[n:], jnp.result_type(block))


register_tag_predicates(PyTreeLinearOperator)


@conj.register(PyTreeLinearOperator)
def _(operator):
    conjugated = PyTreeLinearOperator(
        jtu.tree_map(jnp.conj, operator.pytree),
        operator.output_structure.value,
        operator.tags,
    )
    return with_input_structure(conjugated, operator.input_structure.value)


# The blocks are dense: read the bands off them, rather than probing `mv` (which
# would also cast complex probes to the dtype of real input leaves).
@diagonal.register(PyTreeLinearOperator)
def _(operator):
    return jnp.diagonal(operator.as_matrix())


@tridiagonal.register(PyTreeLinearOperator)
def _(operator):
    return bands_of_matrix(operator.as_matrix())


is_cacheable.register(PyTreeLinearOperator)(concrete_arrays)
register_stored(PyTreeLinearOperator)
