"""The realified problem of an operator that mixes real and complex leaves.

An operator whose input has a real leaf and whose output is complex (the
Jacobian of complex residuals in real parameters) is not complex-linear: its
input space is real, and `i x` is not in it. Its pseudoinverse solution is that
of the real operator `x -> (Re L(x), Im L(x))`, with the right-hand side `(Re b,
Im b)`: each complex leaf, of the output or of the input, becomes a pair `(re,
im)` of real leaves, and the real leaves stay as they are. For a complex-linear
map the realified pseudoinverse is the complex one (`|z|^2 = re^2 + im^2`), so
splitting the complex leaves of a mixed input too is consistent.

`linear_solve` solves (and so differentiates) the realified problem where the
solver accepts it, a least-squares one (another shape, no tags): the primitive
then sees only real operators, vectors and solutions. A solver for square
operators solves the promoted complex system instead, as lineax 0.1.1 and NumPy
do, and the real leaves of its solution get their real part (`_in_dtypes` in
`_linear_solve.py`).
"""

from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import complex_to_real_dtype, tree_is_complex
from .base import AbstractLinearOperator
from .function import FunctionLinearOperator


def mixes_real_and_complex(
    in_structure: PyTree[jax.ShapeDtypeStruct],
    out_structure: PyTree[jax.ShapeDtypeStruct],
) -> bool:
    """Whether the leaves of an operator's input and output structures are
    neither all real nor all complex: then `linear_solve` solves its realified
    problem. A question about dtypes only (no trace)."""
    complex_ = [
        tree_is_complex(x) for x in jtu.tree_leaves((in_structure, out_structure))
    ]
    return any(complex_) and not all(complex_)


def _split(x: Array) -> Array | tuple[Array, Array]:
    """A complex array as the pair `(re, im)`; a real one as it is."""
    return (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else x


def _split_structure(struct: jax.ShapeDtypeStruct) -> Any:
    if not tree_is_complex(struct):
        return struct
    part = jax.ShapeDtypeStruct(struct.shape, complex_to_real_dtype(struct.dtype))
    return (part, part)


def joined(structure: PyTree[jax.ShapeDtypeStruct], x: PyTree[Array]) -> PyTree[Array]:
    """The inverse of splitting: `x`, a realified vector, with each pair `(re,
    im)` at a complex leaf of `structure` made the complex leaf again (and in the
    structure's dtypes)."""

    def join(struct, leaf):
        if not tree_is_complex(struct):
            return jnp.asarray(leaf).astype(struct.dtype)
        re, im = leaf
        real_dtype = complex_to_real_dtype(struct.dtype)
        return lax.complex(re.astype(real_dtype), im.astype(real_dtype))

    # (`structure` is a prefix of `x`: a pair is one subtree of `x`.)
    return jtu.tree_map(join, structure, x)


class _RealifiedAction(eqx.Module):
    """`x -> split(L(join(x)))`. A Module, not a closure: the operator's arrays
    are PyTree leaves of the realified operator (and of a solver state holding
    it), so they are differentiated, and a `Solution` can leave `jax.jit`."""

    operator: AbstractLinearOperator

    def __call__(self, x: PyTree[Array]) -> PyTree[Array]:
        out = self.operator.mv(joined(self.operator.in_structure(), x))
        # Split by the dtype of each output leaf as computed, not as declared: a
        # PyTree operator with a complex block in a row declared real computes a
        # complex leaf there, and the equation is about what it computes.
        return jtu.tree_map(_split, out)


def realified(operator: AbstractLinearOperator) -> FunctionLinearOperator:
    """The real operator `x -> (Re L(x), Im L(x))`, leaf by leaf, acting on the
    input with each complex leaf split into `(re, im)`. It carries no tags: a
    symmetric or definite complex operator is not one as a map of real pairs
    to the realified output, which has another size."""
    in_struct = jtu.tree_map(_split_structure, operator.in_structure())
    return FunctionLinearOperator(
        _RealifiedAction(operator), in_struct, closure_convert=False
    )


def realified_vector(
    operator: AbstractLinearOperator,
    problem: AbstractLinearOperator,
    vector: PyTree[Array],
) -> PyTree[Array]:
    """`vector`, a right-hand side for `operator`, as one for its realified
    operator `problem`: split where `problem`'s output has a pair (a real leaf
    where the operator computes a complex one gets a zero imaginary part), in
    the dtypes that `problem` computes (a PyTree operator's float32 row with a
    complex128 block computes complex128 there: Krylov solvers need the vector
    in those dtypes)."""

    def split(_, realified_struct, leaf):
        if isinstance(realified_struct, tuple):
            dtype = realified_struct[0].dtype
            return (jnp.real(leaf).astype(dtype), jnp.imag(leaf).astype(dtype))
        return leaf.astype(realified_struct.dtype)

    return jtu.tree_map(
        split, operator.out_structure(), problem.out_structure(), vector
    )


def realified_options(
    operator: AbstractLinearOperator, options: dict[str, Any]
) -> dict[str, Any]:
    """`options` for the realified solve: an initial guess `y0` lives in the
    operator's input space, split where it has complex leaves; a preconditioner
    (on the input or, for LSMR on the left, the output space) with complex leaves
    is realified too, as a map of real pairs."""
    in_struct = operator.in_structure()
    options = dict(options)
    y0 = options.get("y0", None)
    # A guess of another structure (a list for an array) is left whole, for the
    # solver's check of `y0` to say so: split, it was a `TypeError` from
    # `jnp.real` (of a list) or from `tree_map`.
    if (
        y0 is not None
        and tree_is_complex(in_struct)
        and jtu.tree_structure(y0) == jtu.tree_structure(in_struct)
    ):
        options["y0"] = jtu.tree_map(
            lambda s, y: (jnp.real(y), jnp.imag(y)) if tree_is_complex(s) else y,
            in_struct,
            y0,
        )
    precond = options.get("preconditioner", None)
    if isinstance(precond, AbstractLinearOperator) and tree_is_complex(
        (precond.in_structure(), precond.out_structure())
    ):
        options["preconditioner"] = realified(precond)
    return options
