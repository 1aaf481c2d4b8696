"""Norms and inner products on PyTrees of arrays.

These are used for the stopping rules of the iterative solvers, and are exported
through `lineax.internal` for client libraries. They are plain functions of one
argument (clients wrap them by signature).
"""

import functools as ft
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from ._misc import complex_to_real_dtype, select


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
    """The root-mean-square of all elements of `x`.

    Computed in one pass, without overflow or underflow of the squares (see
    `_one_pass_two_norm`); its derivative at zero is taken to be zero."""
    leaves = jtu.tree_leaves(x)
    size = sum(jnp.size(leaf) for leaf in leaves)
    if size == 0:
        return jnp.array(0.0)
    return _rms_norm(x)


# Jitted so that its trace is cached (keyed on the PyTree's structure, shapes
# and dtypes): Diffrax calls it several times in each step, each call traced
# anew was 2% of tracing Kvaerno5 on Robertson's problem. (Inlined by XLA.)
@jax.jit
def _rms_norm(x: PyTree[ArrayLike]) -> Scalar:
    size = sum(jnp.size(leaf) for leaf in jtu.tree_leaves(x))
    return _one_pass_two_norm(x) / jnp.sqrt(size)


def _blue_constants(dtype: Any) -> tuple[float, float, float, float, float]:
    """Blue's thresholds and scalings for `dtype` (LAPACK's `la_constants`):
    entries below `tsml` may have squares that underflow, entries above `tbig`
    squares that overflow; `ssml` and `sbig` scale them into range. And
    `tlow`, below which an entry's square scaled up by `ssml` cannot overflow
    (see `_one_pass_two_norm`). Powers of two: every scaling is exact."""
    info = jnp.finfo(dtype)
    # (Fortran's MINEXPONENT and DIGITS: NumPy's `minexp` + 1, `nmant` + 1.)
    low, high, digits = int(info.minexp) + 1, int(info.maxexp), int(info.nmant) + 1
    tsml = 2.0 ** math.ceil((low - 1) / 2)
    tbig = 2.0 ** math.floor((high - digits + 1) / 2)
    small = -math.floor((low - digits) / 2)
    sbig = 2.0 ** -math.ceil((high + digits - 1) / 2)
    tlow = 2.0 ** math.floor((high - digits - 2 * small) / 2)
    return tsml, tbig, 2.0**small, sbig, tlow


def _sums(leaf: Array, dtype: Any) -> list[Array]:
    """The four sums of squares of `_one_pass_two_norm`, over `leaf`'s entries
    (real and imaginary parts): one reduction of four accumulators."""
    tsml, tbig, ssml, sbig, tlow = _blue_constants(dtype)
    if jnp.iscomplexobj(leaf):
        parts = [jnp.real(leaf), jnp.imag(leaf)]
    else:
        parts = [leaf]
    sums = []
    for part in parts:
        a = jnp.abs(part.astype(dtype)).ravel()
        zero = jnp.zeros_like(a)
        big = a > tbig
        small = a < tsml
        down = a * sbig
        # NaN is neither big nor small: summed as medium, so that it propagates.
        # (Scaled up only where selected: no square overflows, not even one
        # discarded, which `jax_debug_infs` would report without `jit`.)
        terms = (
            jnp.square(select(big, down, zero)),
            jnp.square(select(small, zero, down)),
            jnp.square(select(big | small, zero, a)),
            _scaled_square(select(a < tlow, a, zero), ssml),
        )
        sums.append(
            jax.lax.reduce(
                terms,
                (jnp.zeros((), dtype),) * 4,
                lambda u, v: tuple(ui + vi for ui, vi in zip(u, v)),
                (0,),
            )
        )
    return _add_up(sums)


def _add_up(sums: list[Any]) -> list[Array]:
    """The sums of `sums`' tuples, position by position."""
    return [ft.reduce(lambda u, v: u + v, column) for column in zip(*sums)]


def _scaled_square(a: Array, scale: float) -> Array:
    """`(a * scale)^2` for a non-negative `a`. (XLA rewrites `(a c) (a c)` as `(a
    a) c^2`, and folds `c^2`, which over- or underflows for Blue's scalings:
    `inf * 0`. The maximum with zero, which changes no value (NaN propagates),
    keeps the product apart.)"""
    scaled = jnp.maximum(a * scale, 0)
    return scaled * scaled


@jax.custom_jvp
def _one_pass_two_norm(x: PyTree[ArrayLike]) -> Scalar:
    """`two_norm(x)` in one pass over `x`, with Blue's thresholds (J. L. Blue, "A
    portable Fortran program to find the Euclidean norm of a vector", ACM TOMS
    4, 1978; LAPACK 3.10's `xNRM2`): no square overflows or underflows, as with
    `two_norm`'s scaling by the largest entry, but one reduction (of four
    accumulators) instead of a maximum and then a sum, each a kernel, and the
    input read by both a kernel more where it is computed (Diffrax's Kvaerno5
    on Robertson's problem: 4 kernels in its Newton and step-size loops).
    `rms_norm` is what Optimistix and Diffrax call, once per step, outside
    lineax's loops. For entries of moderate size it is `sqrt(sum(x^2))`, as
    lineax 0.1.1's.

    The sums: the large entries' squares (in `sbig`'s units), the large and
    medium entries' (in `sbig`'s units, where the small ones are negligible),
    the medium entries', and the entries below `tlow` (in `ssml`'s units). With
    a large entry, the second is the norm; else, with medium entries whose sum
    is at least `tlow^2`, the third (the small ones are negligible); else every
    entry is below `tlow`, and the fourth. One square root, of the sum chosen."""
    leaves = [jnp.asarray(leaf) for leaf in jtu.tree_leaves(x)]
    out_dtype = complex_to_real_dtype(_common_dtype(leaves))
    # (Half precision accumulates in single: its range leaves Blue's units no
    # room.)
    dtype = np.promote_types(out_dtype, np.float32)
    _, _, ssml, sbig, tlow = _blue_constants(dtype)
    big, large, medium, low = _add_up([_sums(leaf, dtype) for leaf in leaves])
    has_big = big > 0
    is_low = medium < tlow * tlow
    total = select(has_big, large, select(is_low, low, medium))
    unit = select(has_big, 1 / sbig, select(is_low, 1 / ssml, 1.0)).astype(dtype)
    return (jnp.sqrt(total) * unit).astype(out_dtype)


@_one_pass_two_norm.defjvp
def _one_pass_two_norm_jvp(primals, tangents):
    # `d|x| = Re<x, dx> / |x|`, as `x / |x|` (each entry at most 1: no overflow
    # of `x dx`), and zero at `x = 0` (as `two_norm`).
    (x,), (tx,) = primals, tangents
    norm = _one_pass_two_norm(x)
    safe = select(norm == 0, jnp.ones_like(norm), norm)
    unit = jtu.tree_map(lambda leaf: jnp.asarray(leaf) / safe.astype(leaf.dtype), x)
    t = jnp.real(tree_dot(unit, tx)).astype(norm.dtype)
    return norm, select(norm == 0, jnp.zeros_like(t), t)


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
