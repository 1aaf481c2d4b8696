"""Property-based tests: operator kind x PyTree structure x dtype x solver x
transformation, against NumPy/JAX float64 references.

The default ("ci") hypothesis profile runs a dozen examples; the exhaustive
profile runs thousands:

    LINEAX_EXHAUSTIVE=1 LINEAX_EXAMPLES=10000 python -m pytest tests/test_properties.py
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from helpers import (
    CASE_KINDS,
    case_operator,
    DTYPES,
    flatten_jax as flatten,
    make_matrix,
    make_vector,
    SOLVER_CASES,
    STRUCTURED_KINDS,
    tolerance,
)
from hypothesis import given

import lineax as lx


TRANSFORMS = ("none", "jit", "vmap", "jvp", "grad")


def _tolerance(dtype) -> float:
    # `helpers.tolerance` times 20 in float32 and 100 in float64, absolute on the
    # scale of the answer: matrices drawn with random seeds for every case,
    # operator kind and transformation, against a pseudoinverse reference.
    return (20 if dtype == jnp.float32 else 100) * tolerance(dtype)


def _real(x):
    """A real scalar loss of a (possibly complex) solution."""
    x = flatten(x)
    return (
        jnp.sum(jnp.real(x) ** 2 + jnp.imag(x) ** 2)
        if jnp.iscomplexobj(x)
        else jnp.sum(x**2)
    )


@ft.cache
def _compiled(case_index: int, kind: str, transform: str) -> Callable[..., Any]:
    """One jitted function per combination, reused across examples (hypothesis
    varies values, not shapes, so nothing is recompiled)."""
    case = SOLVER_CASES[case_index]

    def solve(matrix, vector):
        operator = case_operator(kind, matrix, case.tags)
        return lx.linear_solve(operator, vector, case.solver).value

    if transform == "jit":
        return jax.jit(solve)
    if transform == "vmap":
        return jax.jit(jax.vmap(solve, in_axes=(None, 0)))
    if transform == "jvp":
        return jax.jit(lambda m, v, tm, tv: jax.jvp(solve, (m, v), (tm, tv)))
    if transform == "grad":
        return jax.jit(jax.grad(lambda m, v: _real(solve(m, v)), argnums=(0, 1)))
    return solve


def _reference(matrix, vector, dtype):
    rcond = 10 * max(matrix.shape) * float(jnp.finfo(dtype).eps)
    return jnp.linalg.pinv(matrix, rtol=rcond) @ vector


@given(
    case_index=st.integers(0, len(SOLVER_CASES) - 1),
    kind=st.sampled_from(CASE_KINDS + STRUCTURED_KINDS),
    dtype=st.sampled_from(DTYPES),
    transform=st.sampled_from(TRANSFORMS),
    seed=st.integers(0, 2**16),
)
def test_solve_property(case_index, kind, dtype, transform, seed):
    case = SOLVER_CASES[case_index]
    if dtype == jnp.float32 and transform in ("jvp", "grad"):
        dtype = jnp.float64  # derivatives are checked in float64
    rank_deficient = (
        case.matrix_kind.startswith("rank_deficient")
        or case.matrix_kind == "diagonal_singular"
    )
    if rank_deficient and transform in ("jvp", "grad"):
        # Differentiable only along rank-preserving directions: tested in
        # test_jvp.py with such a direction.
        transform = "jit"
    matrix64 = make_matrix(case.matrix_kind, dtype, seed)
    matrix = jnp.asarray(matrix64, dtype)
    operator = case_operator(kind, matrix, case.tags)
    vector = make_vector(operator, seed + 1)
    fn = _compiled(case_index, kind, transform)
    ref_matrix = jnp.asarray(matrix64)
    flat_vector = flatten(vector).astype(ref_matrix.dtype)
    tol = _tolerance(dtype)

    def close(got, want):
        got = np.asarray(got, np.complex128)
        want = np.asarray(want, np.complex128)
        scale = 1 + np.max(np.abs(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)

    if transform in ("none", "jit"):
        close(flatten(fn(matrix, vector)), _reference(ref_matrix, flat_vector, dtype))
    elif transform == "vmap":
        batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), vector)
        out = fn(matrix, batch)
        for i in range(2):
            got = flatten(jax.tree_util.tree_map(lambda x, i=i: x[i], out))
            close(got, _reference(ref_matrix, (i + 1) * flat_vector, dtype))
    elif transform == "jvp":
        rng = np.random.default_rng(seed + 2)
        t_matrix = jnp.asarray(rng.standard_normal(matrix.shape), dtype)
        if case.tags:  # keep symmetric / banded structure
            t_matrix = jnp.asarray(matrix64 * rng.standard_normal(), dtype)
        t_vector = jax.tree_util.tree_map(lambda x: -x, vector)
        _, got = fn(matrix, vector, t_matrix, t_vector)
        _, want = jax.jvp(
            lambda m, v: _reference(m, v, dtype),
            (ref_matrix, flat_vector),
            (
                t_matrix.astype(ref_matrix.dtype),
                flatten(t_vector).astype(ref_matrix.dtype),
            ),
        )
        close(flatten(got), want)
    else:
        got_m, got_v = fn(matrix, vector)
        want_m, want_v = jax.grad(
            lambda m, v: _real(_reference(m, v, dtype)), argnums=(0, 1)
        )(ref_matrix, flat_vector)
        close(flatten(got_v), want_v)
        if case.tags:
            return  # the structured part of the gradient is compared in test_jvp.py
        close(got_m, want_m)
