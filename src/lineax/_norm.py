"""Norms and inner products on PyTrees of arrays.

These are used for the stopping rules of the iterative solvers, and are exported
through `lineax.internal` for client libraries. They are plain functions of one
argument (clients wrap them by signature).
"""

import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from ._misc import select


def _common_dtype(xs: list[Array]) -> Any:
    """JAX's result dtype of `xs`; where `jax_numpy_dtype_promotion="strict"`
    forbids that (the leaves of a mixed-dtype PyTree, `float32` with `float64` say),
    NumPy's promotion of their dtypes."""
    try:
        return jnp.result_type(*xs)
    except jax.dtypes.TypePromotionError:
        return ft.reduce(np.promote_types, [x.dtype for x in xs])


def _sum_promoted(terms: list[Array]) -> Array:
    """The sum of scalars of possibly different dtypes, promoted explicitly."""
    dtype = _common_dtype(terms)
    terms = [t.astype(dtype) for t in terms]
    return sum(terms[1:], terms[0])


def tree_dot(tree1: PyTree[ArrayLike], tree2: PyTree[ArrayLike]) -> Array:
    """The inner product `sum(conj(tree1) * tree2)` over all leaves.

    The first argument is conjugated, so that `tree_dot(x, x)` is the (real,
    nonnegative) squared 2-norm also for complex `x`.
    """
    leaves1, treedef1 = jtu.tree_flatten(tree1)
    leaves2, treedef2 = jtu.tree_flatten(tree2)
    if treedef1 != treedef2:
        raise ValueError("`tree1` and `tree2` must have the same PyTree structure.")
    if len(leaves1) == 0:
        return jnp.array(0.0)
    terms = [
        jnp.vdot(jnp.asarray(a), jnp.asarray(b), precision=jax.lax.Precision.HIGHEST)
        for a, b in zip(leaves1, leaves2)
    ]
    return _sum_promoted(terms)


def sum_squares(x: PyTree[ArrayLike]) -> Scalar:
    """The sum of the squared absolute values of every element of `x`."""
    leaves = jtu.tree_leaves(x)
    if len(leaves) == 0:
        return jnp.array(0.0)
    terms = [jnp.sum(_abs_sq(jnp.asarray(leaf))) for leaf in leaves]
    return _sum_promoted(terms)


def _abs_sq(x: Array) -> Array:
    if jnp.iscomplexobj(x):
        return x.real**2 + x.imag**2
    return x**2


@jax.custom_jvp
def _sqrt_with_zero_derivative(x):
    return jnp.sqrt(x)


@_sqrt_with_zero_derivative.defjvp
def _sqrt_jvp(primals, tangents):
    # The 2-norm is not differentiable at zero; we pick the subgradient 0 there
    # instead of the NaN that `sqrt` would give, so that e.g. a converged iterative
    # solve (zero residual) can be differentiated.
    (x,) = primals
    (tx,) = tangents
    out = jnp.sqrt(x)
    safe = select(x == 0, 1, out)
    return out, select(x == 0, 0, tx / (2 * safe))


def two_norm(x: PyTree[ArrayLike]) -> Scalar:
    """The 2-norm of all elements of `x`, as if flattened into one vector.

    Its derivative at zero is taken to be zero.
    """
    leaves = jtu.tree_leaves(x)
    if len(leaves) == 0:
        return jnp.array(0.0)
    # Scale by the largest magnitude to avoid overflow/underflow in the squares
    # (as LAPACK's `nrm2` does): float32 residuals of 1e20 must not become inf.
    scale = jax.lax.stop_gradient(max_norm(x))
    safe_scale = select((scale == 0) | ~jnp.isfinite(scale), 1, scale)
    scaled = jtu.tree_map(
        lambda leaf: jnp.asarray(leaf) / safe_scale.astype(jnp.result_type(leaf)), x
    )
    return safe_scale * _sqrt_with_zero_derivative(sum_squares(scaled))


def rms_norm(x: PyTree[ArrayLike]) -> Scalar:
    """The root-mean-square of all elements of `x`."""
    leaves = jtu.tree_leaves(x)
    size = sum(jnp.size(leaf) for leaf in leaves)
    if size == 0:
        return jnp.array(0.0)
    return two_norm(x) / jnp.sqrt(size)


def max_norm(x: PyTree[ArrayLike]) -> Scalar:
    """The largest absolute value of any element of `x` (the infinity norm).

    Its derivative at zero is taken to be zero.
    """
    leaves = [jnp.asarray(leaf) for leaf in jtu.tree_leaves(x) if jnp.size(leaf) > 0]
    if len(leaves) == 0:
        return jnp.array(0.0)
    maxes = [jnp.max(jnp.abs(leaf)) for leaf in leaves]
    if len(maxes) == 1:
        out = maxes[0]
    else:
        dtype = _common_dtype(maxes)
        out = jnp.max(jnp.stack([m.astype(dtype) for m in maxes]))
    return _zero_derivative_at_zero(out)


@jax.custom_jvp
def _zero_derivative_at_zero(norm: Scalar) -> Scalar:
    return norm


@_zero_derivative_at_zero.defjvp
def _zero_derivative_at_zero_jvp(primals, tangents):
    # The max norm is not differentiable at zero, where JAX's `abs` has derivative
    # 1: the gradient at `x = 0` would be `1/size` on every element, and a tangent
    # `t` would give `max(t)`, not `max|t|`. As for `two_norm`, and as in lineax
    # 0.1.1 (whose norms Optimistix re-exports), the derivative is zero there.
    # (A `custom_jvp`, not a `select` in the primal: the Krylov solvers call the
    # norm every pass and never differentiate it, and this adds nothing to what
    # they lower.)
    (norm,) = primals
    (t_norm,) = tangents
    return norm, select(norm == 0, 0, t_norm)
